"""`dlpipe registry`: list, show, promote, A/B split, roll back and audit model versions.

    dlpipe registry list fashion
    dlpipe registry show fashion@champion --json
    dlpipe registry ab fashion --a 3 --b 4 --split 0.9
    dlpipe registry rollback fashion --to 3 --wait     # returns once every live server applies it

The store is `--tracking-uri`, else MLflow's environment (MLFLOW_REGISTRY_URI, then
MLFLOW_TRACKING_URI). With `--json` stdout holds one JSON value. An error prints one line to
stderr and changes nothing: exit 2 for a bad command line, 1 when the registry refuses (unknown
model, version or alias). `--wait` (promote, ab, rollback) then waits until every live server
reports applying the new routing (its heartbeat, `dlpipe.tracking.heartbeats`); exit 1 naming
the servers still behind after `--wait-timeout` seconds (the change itself stays made).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import warnings
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.table import Table

from dlpipe.cli_support import (
    EXIT_FAILED,
    CommandParser,
    Outcome,
    UsageError,
    add_json_flag,
    add_tracking_flag,
    parse_model_ref,
    run_command,
)
from dlpipe.routing import ABTestConfig, ab_config_to_dict
from dlpipe.tracking.canary_cli import CanaryRolledBack, add_canary_parser, run_canary

Render = Callable[[Console], None]


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be within [0, 1], got {text}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not 0.0 < value < 86400.0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    common = CommandParser(add_help=False)
    add_tracking_flag(common)
    add_json_flag(common, "the result")
    waiting = CommandParser(add_help=False)
    waiting.add_argument(
        "--wait", action="store_true",
        help="return only once every live server applies the change (servers report it in "
        "heartbeats after draining the versions routed away from)",
    )  # fmt: skip
    waiting.add_argument(
        "--wait-timeout", type=_seconds, default=60.0, metavar="S",
        help="with --wait: give up after S seconds, exit 1 naming the servers behind (default 60)",
    )  # fmt: skip
    parser = CommandParser(prog="dlpipe registry", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=CommandParser)
    p = sub.add_parser("list", parents=[common], help="every version with metadata and aliases")
    p.add_argument("name")
    p = sub.add_parser("show", parents=[common], help="one version: NAME, NAME@alias, NAME:3")
    p.add_argument("spec", metavar="NAME[@alias|:version]")
    p = sub.add_parser(
        "promote", parents=[common, waiting], help="point an alias (champion) at a version"
    )
    p.add_argument("name")
    p.add_argument("version")
    p.add_argument("--alias", default="champion")
    p = sub.add_parser(
        "ab", parents=[common, waiting], help="set (--a --b --split) or --clear an A/B split"
    )
    p.add_argument("name")
    p.add_argument("--a", dest="model_a", help="version A")
    p.add_argument("--b", dest="model_b", help="version B")
    p.add_argument("--split", type=_fraction, help="share of traffic for A, in [0, 1]")
    p.add_argument("--clear", action="store_true", help="end the A/B split")
    p = sub.add_parser("rollback", parents=[common, waiting], help="send all traffic to a version")
    p.add_argument("name")
    p.add_argument("--to", required=True, dest="to_version")
    p = sub.add_parser("history", parents=[common], help="audit trail of alias and A/B changes")
    p.add_argument("name")
    add_canary_parser(sub, [common, waiting], _seconds)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one `dlpipe registry` command; returns the exit status."""
    return run_command(build_parser(), _job, argv)


def _job(args: argparse.Namespace) -> Outcome:
    from dlpipe.tracking.registry import ModelRegistry

    _quiet_mlflow()  # after importing mlflow, which sets its own log levels
    registry = ModelRegistry(args.tracking_uri)
    try:
        result, render = _COMMANDS[args.command](registry, args)
    except CanaryRolledBack as err:  # a report, and a failed job
        return Outcome(err.result, lambda console: None, EXIT_FAILED, str(err))
    if getattr(args, "wait", False):
        return _wait_applied(registry, args, result, render)
    return Outcome(result, render)


def _wait_applied(reg: Any, args: argparse.Namespace, result: Any, render: Render) -> Outcome:
    """Wait until every live server applies the routing now in the registry."""
    from dlpipe.tracking.heartbeats import RolloutTimeout, wait_until_applied

    try:
        applied = wait_until_applied(reg, args.name, args.wait_timeout)
    except RolloutTimeout as err:
        behind = [h.server_id for h in err.laggards]
        waited = {"applied": False, "digest": err.digest, "laggards": behind}
        return Outcome({**result, "wait": waited}, render, EXIT_FAILED, str(err))
    waited = {"applied": True, **applied.to_dict()}

    def render_all(console: Console) -> None:
        render(console)
        console.print(
            f"applied by {len(applied.servers)} live server(s) after {applied.waited_s:.2f} s"
        )

    return Outcome({**result, "wait": waited}, render_all)


def _quiet_mlflow() -> None:
    """Keep stderr for our own error line: no MLflow INFO logs, warnings or progress bars."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    warnings.filterwarnings("ignore")
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _cmd_list(reg: Any, args: argparse.Namespace) -> tuple[Any, Render]:
    rows = reg.list_versions(args.name)
    ab = reg.get_ab_config(args.name)

    def render(console: Console) -> None:
        table = Table(title=f"{args.name}: {len(rows)} version(s)")
        for col in (
            "version",
            "aliases",
            "framework",
            "precision",
            "size MB",
            "metrics",
            "trained",
            "parent",
        ):
            table.add_column(col)
        for r in rows:
            table.add_row(
                r["version"],
                ", ".join(r["aliases"]),
                r.get("framework", "?"),
                r.get("precision", "?"),
                str(r.get("model_size_mb", "?")),
                _metrics(r.get("accuracy_metrics")),
                str(r.get("training_date", "?"))[:19],
                str(r.get("parent_version") or ""),
            )
        console.print(table)
        if ab is not None:
            console.print(
                f"A/B: {ab.model_a_version} gets {ab.traffic_split:.1%}, "
                f"{ab.model_b_version} the rest"
            )

    return rows, render


def _cmd_show(reg: Any, args: argparse.Namespace) -> tuple[Any, Render]:
    name, version = parse_model_ref(args.spec)
    meta = reg.get_metadata(name, version)
    aliases: list[str] = next(
        (r["aliases"] for r in reg.list_versions(name) if r["version"] == meta.version), []
    )
    result = {**meta.to_dict(), "aliases": aliases}

    def render(console: Console) -> None:
        table = Table(title=f"{name} version {meta.version}", show_header=False)
        table.add_column("field")
        table.add_column("value")
        for key, value in result.items():
            text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
            table.add_row(key, text)
        console.print(table)

    return result, render


def _cmd_promote(reg: Any, args: argparse.Namespace) -> tuple[Any, Render]:
    version = reg.promote(args.name, args.version, alias=args.alias)
    result = {"model": args.name, "alias": args.alias, "version": version}
    return result, lambda console: console.print(f"{args.name}@{args.alias} -> version {version}")


def _cmd_ab(reg: Any, args: argparse.Namespace) -> tuple[Any, Render]:
    given = [x is not None for x in (args.model_a, args.model_b, args.split)]
    if args.clear:
        if any(given):
            raise UsageError("use either --clear or --a/--b/--split, not both")
        cleared = reg.clear_ab_config(args.name)
        result = {"model": args.name, "cleared": cleared, "ab_config": None}
        text = "A/B split ended" if cleared else "no A/B split was active"
        return result, lambda console: console.print(f"{args.name}: {text}")
    if not all(given):
        raise UsageError("ab needs --a, --b and --split together, or --clear")
    config = ABTestConfig(args.model_a, args.model_b, args.split)
    reg.set_ab_config(args.name, config)
    result = {"model": args.name, "ab_config": ab_config_to_dict(config)}
    return result, lambda console: console.print(
        f"{args.name}: version {config.model_a_version} gets {config.traffic_split:.1%}, "
        f"version {config.model_b_version} the rest"
    )


def _cmd_rollback(reg: Any, args: argparse.Namespace) -> tuple[Any, Render]:
    result = reg.rollback(args.name, args.to_version)
    gone = ", ".join(result["rolled_back_from"]) or "none"
    return result, lambda console: console.print(
        f"{args.name}: all traffic -> version {result['to']} (rolled back from: {gone})"
    )


def _cmd_history(reg: Any, args: argparse.Namespace) -> tuple[Any, Render]:
    entries = reg.history(args.name)

    def render(console: Console) -> None:
        table = Table(title=f"{args.name}: audit trail")
        for col in ("time", "user", "action", "from", "to", "detail"):
            table.add_column(col)
        for e in entries:
            table.add_row(
                str(e.get("time", ""))[:23],
                str(e.get("user", "")),
                str(e.get("action", "")),
                _short(e.get("from")),
                _short(e.get("to")),
                _short(e.get("detail")),
            )
        console.print(table)

    return entries, render


_COMMANDS = {
    "list": _cmd_list,
    "show": _cmd_show,
    "promote": _cmd_promote,
    "ab": _cmd_ab,
    "rollback": _cmd_rollback,
    "history": _cmd_history,
    "canary": run_canary,
}


def _metrics(metrics: dict[str, float] | None) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in (metrics or {}).items())


def _short(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dict) and "traffic_split" in value:  # an A/B config
        return (
            f"A={value['model_a_version']} B={value['model_b_version']} {value['traffic_split']:g}"
        )
    if isinstance(value, dict):
        return ", ".join(f"{k}={_short(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ",".join(_short(v) for v in value)
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)
