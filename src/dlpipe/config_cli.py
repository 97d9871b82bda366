"""`dlpipe config`: every config key with its type, default, current value and docstring.

    dlpipe config keys -c configs/fashion_mnist.yaml             # a table of every key
    dlpipe config keys -c configs/fashion_mnist.yaml --json      # [{"key", "type", ...}, ...]
    dlpipe config get tracking.registered_model_name -c configs/fashion_mnist.yaml

`get` prints the bare value for shell scripts (nothing for null; lists and booleans as YAML
reads them back in `-o KEY=VALUE`). The keys and docstrings come from the config models
themselves (`dlpipe.config`), so a new key is listed the day it is added.
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from typing import Any

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from dlpipe.cli_support import (
    CommandParser,
    Outcome,
    UsageError,
    add_config_flags,
    add_json_flag,
    as_usage_error,
    run_command,
)
from dlpipe.config import ConfigError, PipelineConfig, load_config


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="dlpipe config", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=CommandParser)
    keys = sub.add_parser("keys", help="every key: type, default, current value, docstring")
    add_config_flags(keys)
    add_json_flag(keys, "the list of keys")
    get = sub.add_parser("get", help="the current value of one key (for scripts)")
    get.add_argument("key", help="section.key, e.g. training.learning_rate")
    add_config_flags(get)
    add_json_flag(get, "the value")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `dlpipe config`; returns the exit status."""
    return run_command(build_parser(), _job, argv)


def _job(args: argparse.Namespace) -> Outcome:
    with as_usage_error(ConfigError):
        cfg = load_config(args.config, args.override)
    rows = config_keys(cfg)
    if args.command == "keys":
        return Outcome(rows, lambda console: _render_keys(rows, console))
    values = {row["key"]: row["value"] for row in rows}
    if args.key not in values:
        raise UsageError(f"unknown key {args.key!r}; `dlpipe config keys` lists them")
    value = values[args.key]
    return Outcome(value, lambda console: console.out(_shell_text(value), highlight=False))


def config_keys(cfg: PipelineConfig) -> list[dict[str, Any]]:
    """One row per leaf key: `key`, `type`, `default`, `value` (JSON-ready), `description`."""
    current = cfg.model_dump(mode="json")
    rows: list[dict[str, Any]] = []

    def walk(model: type[BaseModel], prefix: str, values: dict[str, Any]) -> None:
        for name, info in model.model_fields.items():
            key = f"{prefix}{name}"
            section = _section_model(info.annotation)
            if section is not None:
                walk(section, f"{key}.", values.get(name) or {})
                continue
            default = info.get_default(call_default_factory=True)
            rows.append(
                {
                    "key": key,
                    "type": type_text(info),
                    "default": json.loads(json.dumps(default, default=str)),
                    "value": values.get(name),
                    "description": " ".join((info.description or "").split()),
                }
            )

    walk(PipelineConfig, "", current)
    return rows


def type_text(info: FieldInfo) -> str:
    """`int, >= 1`, `'32' | '16-mixed'`, `list['onnx' | 'int8'] | None`, ..."""
    limits = []
    for item in info.metadata:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if isinstance(item, getattr(annotated_types, attr.capitalize())):
                limits.append(f"{sign} {getattr(item, attr)}")
    return ", ".join([_annotation_text(info.annotation), *limits])


def _annotation_text(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_annotation_text(a) for a in args)
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else _annotation_text(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))


def _section_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _shell_text(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value)


def _render_keys(rows: list[dict[str, Any]], console: Console) -> None:
    table = Table(title="dlpipe config keys (-o KEY=VALUE sets one)")
    for col in ("key", "type", "default", "value", "description"):
        table.add_column(col, overflow="fold")
    for row in rows:
        default, value = json.dumps(row["default"]), json.dumps(row["value"])
        changed = Text(value, style="bold" if value != default else "")
        cells = (row["key"], row["type"], default)
        table.add_row(*map(escape, cells), changed, escape(row["description"]))
    console.print(table)
