"""Structured JSON logs: one JSON object per line, carrying the current request id.

configure_logging("INFO")
with bind_request_id("3f2a..."):
    logging.getLogger("dlpipe.serving").info("predicted", extra={"model_version": "3"})
# {"ts": "...", "level": "INFO", "logger": "dlpipe.serving", "message": "predicted",
#  "request_id": "3f2a...", "model_version": "3"}
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import IO, Any

from dlpipe.monitoring.tracing import trace_id_var

request_id_var: ContextVar[str | None] = ContextVar("dlpipe_request_id", default=None)

# Attributes every LogRecord has; anything else on a record came from `extra=` and is logged.
_STANDARD_ATTRS = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys()
) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line: time, level, logger, message, request id, extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,  # which server process, with `dlpipe serve --workers N`
        }
        request_id = getattr(record, "request_id", None) or request_id_var.get()
        if request_id is not None:
            entry["request_id"] = request_id
        trace_id = trace_id_var.get()
        if trace_id is not None:
            entry["trace_id"] = trace_id
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class JsonLogHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler `configure_logging` installs (so a second call can find and replace it)."""


def configure_logging(level: str | int = "INFO", stream: IO[str] | None = None) -> logging.Handler:
    """Send every log record of the process as JSON lines to `stream` (stderr by default).

    Calling it again replaces the handler it installed before (no duplicate lines).
    """
    if isinstance(level, str):
        resolved = logging.getLevelName(level.upper())
        if not isinstance(resolved, int):
            raise ValueError(f"unknown log level {level!r}; use DEBUG, INFO, WARNING or ERROR")
        level = resolved
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, JsonLogHandler)]:
        root.removeHandler(old)
    handler = JsonLogHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    root.setLevel(level)
    return handler


@contextmanager
def bind_request_id(request_id: str) -> Iterator[str]:
    """Attach `request_id` to every log line written inside the block (task/thread local)."""
    token = request_id_var.set(request_id)
    try:
        yield request_id
    finally:
        request_id_var.reset(token)
