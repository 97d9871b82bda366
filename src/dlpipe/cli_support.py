"""The contract every `dlpipe` command keeps (docs/architecture.md, "Command line").

    def main(argv: list[str] | None = None) -> int:
        return run_command(build_parser(), my_job, argv)

- Exit status 0 success, 1 the job ran and failed, 2 usage or configuration error.
- An error is one line on stderr: `dlpipe optimize: error: ...` (DLPIPE_DEBUG=1 adds the
  traceback of an unexpected one).
- With `--json`, stdout holds exactly one JSON value. Everything else a job writes to stdout
  (our tables, Lightning's, workers and servers it starts) goes to stderr meanwhile.
- `NAME`, `NAME@alias` and `NAME:version` are read by one parser, `parse_model_ref`.
- The MLflow store is `--tracking-uri` everywhere (MLflow's own name).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import sys
import traceback
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError
from rich.console import Console

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_STATUS_HELP = "exit status: 0 success, 1 the job failed, 2 usage or configuration error"

EXTRA_OF_MODULE = {
    **dict.fromkeys(
        ("torch", "torchvision", "lightning", "torchmetrics", "onnx", "onnxscript"), "train"
    ),
    **dict.fromkeys(("transformers", "matplotlib", "sqlalchemy", "alembic"), "train"),
    **dict.fromkeys(("fastapi", "uvicorn", "onnxruntime", "mlflow", "tokenizers"), "serve"),
    **dict.fromkeys(("prometheus_client", "limits", "multipart", "PIL"), "serve"),
    **dict.fromkeys(("tensorflow", "tf2onnx", "keras"), "tensorflow"),
    "ray": "ray",
    "opentelemetry": "otel",
}
"""Top-level module -> the pyproject extra that installs it (a lean `[serve]` install lacks the
training stack, and the other way round)."""


class UsageError(ValueError):
    """A command line or configuration the command cannot use: exit status 2."""


class CommandParser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one line (via `UsageError`) and states the
    exit statuses in `--help`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("epilog", EXIT_STATUS_HELP)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        raise UsageError(message)


@dataclass
class Outcome:
    """What a job hands back: the `--json` value, how a person sees it, and the exit status
    (a job can finish with a report and still have failed, e.g. every variant broke)."""

    payload: Any
    render: Callable[[Console], None]
    status: int = EXIT_OK
    error: str = ""
    """With a non-zero status: the one line saying what failed."""


def run_command(
    parser: argparse.ArgumentParser,
    job: Callable[[argparse.Namespace], Outcome],
    argv: list[str] | None,
) -> int:
    """Parse `argv`, run `job`, print its outcome and map every failure to its exit status."""
    prog = parser.prog
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as err:
        return report_error(prog, err, EXIT_USAGE)
    except SystemExit as done:  # -h / --help
        return int(done.code or 0)
    as_json = bool(getattr(args, "json", False))
    stdout = sys.stdout
    try:
        with stdout_to_stderr() if as_json else contextlib.nullcontext():
            outcome = job(args)
            outcome.render(table_console())
    except UsageError as err:
        return report_error(prog, err, EXIT_USAGE)
    except ModuleNotFoundError as err:
        if (err.name or "dlpipe").startswith("dlpipe"):
            raise  # our own module missing is a bug, not an install choice
        print(missing_extra_line(prog, err), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if os.environ.get("DLPIPE_DEBUG"):
            traceback.print_exc()
        return report_error(prog, err, EXIT_FAILED)
    if as_json:
        print(json_text(outcome.payload), file=stdout, flush=True)
    if outcome.status != EXIT_OK and outcome.error:
        report_error(prog, Exception(outcome.error), outcome.status)
    return outcome.status


@contextlib.contextmanager
def as_usage_error(*kinds: type[Exception]) -> Iterator[None]:
    """Errors of these kinds raised inside are the user's (exit 2), e.g. `ConfigError` while
    reading the config they gave; the same error from a stored model's config is the job's."""
    try:
        yield
    except kinds as err:
        raise UsageError(str(err)) from err


def report_error(prog: str, err: BaseException, status: int) -> int:
    """Print `prog: error: message` as one line on stderr; returns `status`."""
    message = getattr(err, "message", None) or str(err) or type(err).__name__
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return status


def missing_extra_line(prog: str, err: ModuleNotFoundError, extra: str | None = None) -> str:
    """One line naming the missing package and the extra that installs it."""
    top = (err.name or "").split(".")[0]
    wanted = EXTRA_OF_MODULE.get(top) or extra or "all"
    return f"{prog}: needs the Python package {top!r}; install it: pip install 'dlpipe[{wanted}]'"


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send stdout to stderr while a job runs, so stdout can carry only the JSON afterwards.

    Both levels: Python's `sys.stdout` (rich tables, Lightning's bars and result table) and file
    descriptor 1, which DDP ranks, Ray workers and servers started by the job inherit.
    """
    sys.stdout.flush()
    try:  # pytest's capsys streams have no descriptor: then Python's level is all there is
        out_fd, err_fd = sys.stdout.fileno(), sys.stderr.fileno()
    except (OSError, ValueError, io.UnsupportedOperation):
        out_fd = err_fd = -1
    saved = os.dup(out_fd) if out_fd >= 0 else -1
    if saved >= 0:
        os.dup2(err_fd, out_fd)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stderr.flush()
        if saved >= 0:
            os.dup2(saved, out_fd)
            os.close(saved)


def json_text(value: Any) -> str:
    """One line of strict JSON: NaN and infinities become null (jq and browsers reject them)."""

    def finite(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {str(k): finite(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [finite(x) for x in v]
        return v

    return json.dumps(finite(value), default=str, sort_keys=True, allow_nan=False)


def show_download_progress() -> None:
    """MLflow's own download bar (tqdm, on stderr) in a terminal; off in pipes and CI logs."""
    os.environ.setdefault(
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "true" if sys.stderr.isatty() else "false"
    )


def table_console() -> Console:
    """Where tables go: stdout (stderr under `--json`); no 80-column squeeze in pipes and logs."""
    console = Console()
    return console if console.is_terminal else Console(width=160)


# ---- shared flags ---------------------------------------------------------------------------


def add_json_flag(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--json", action="store_true", help=f"stdout: only {what} as JSON (tables go to stderr)"
    )


def add_config_flags(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    shown = f" (default {default})" if default else ""
    parser.add_argument("-c", "--config", default=default, help=f"YAML config{shown}")
    parser.add_argument(
        "-o", "--override", action="append", default=[], metavar="KEY=VALUE",
        help="set a config key, e.g. -o training.num_epochs=3 (repeatable; "
        "`dlpipe config keys` lists them)",
    )  # fmt: skip


class _DeprecatedAlias(argparse.Action):
    def __call__(self, parser: Any, namespace: Any, values: Any, option: Any = None) -> None:
        print(f"{parser.prog}: {option} is deprecated; use --tracking-uri", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_tracking_flag(parser: argparse.ArgumentParser) -> None:
    """`--tracking-uri` (and the hidden, deprecated `--registry-uri` some scripts still pass)."""
    parser.add_argument(
        "--tracking-uri", metavar="URI",
        help="MLflow store for runs and the registry (default: MLFLOW_TRACKING_URI, with "
        "MLFLOW_REGISTRY_URI for the registry if set, else MLflow's default)",
    )  # fmt: skip
    parser.add_argument(
        "--registry-uri", dest="tracking_uri", action=_DeprecatedAlias, help=argparse.SUPPRESS
    )


def add_field_flag(
    parser: argparse.ArgumentParser,
    model: type[BaseModel],
    field: str,
    flag: str | None = None,
    help_text: str = "",
    default_text: str = "",
) -> None:
    """A flag for one config field: the field's docstring is its help, and the field's own type
    and limits check the value (a bad one is a usage error naming the flag). Lists are
    comma-separated. The flag defaults to None: "keep what the config says"."""
    info = model.model_fields[field]
    checked: Any = info.annotation
    if info.metadata:  # the field's limits (ge, lt, ...) travel as Annotated metadata
        checked = typing.Annotated[info.annotation, *info.metadata]
    adapter: TypeAdapter[Any] = TypeAdapter(checked)
    listing = _is_list(info.annotation)

    def convert(text: str) -> Any:
        value: Any = [t.strip() for t in text.split(",") if t.strip()] if listing else text
        if listing and not value:
            raise argparse.ArgumentTypeError("give at least one value")
        try:
            return adapter.validate_python(value, strict=False)
        except ValidationError as err:
            first = err.errors()[0]
            raise argparse.ArgumentTypeError(f"{first['msg']} (got {first['input']!r})") from None

    described = " ".join((info.description or help_text).split())
    suffix = f" ({default_text})" if default_text else ""
    name = flag or f"--{field.replace('_', '-')}"
    metavar = "A,B,..." if listing else None
    parser.add_argument(name, type=convert, default=None, metavar=metavar, help=described + suffix)


def _is_list(annotation: Any) -> bool:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return _is_list(args[0])
    return typing.get_origin(annotation) is list


# ---- model references -----------------------------------------------------------------------

_REF = re.compile(r"^(?P<name>[^@:\s]+)(?:@(?P<alias>[\w.-]+)|:(?P<version>\d+))?$")


def parse_model_ref(ref: str) -> tuple[str, str | None]:
    """`NAME`, `NAME@alias` or `NAME:version` -> (name, alias or version or None for latest).

    Raises:
        UsageError: anything else.
    """
    match = _REF.match(ref.strip())
    if not match:
        raise UsageError(f"model reference {ref!r} must look like NAME, NAME@alias or NAME:version")
    return match["name"], match["alias"] or match["version"]
