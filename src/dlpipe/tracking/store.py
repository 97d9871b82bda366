"""Talking to an MLflow store: the registry's error type, sqlite lock retries, name checks."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

from mlflow.exceptions import MlflowException

T = TypeVar("T")

NOT_FOUND = "RESOURCE_DOES_NOT_EXIST"
ALREADY_EXISTS = "RESOURCE_ALREADY_EXISTS"


class RegistryError(ValueError):
    """A registry request that cannot be done; the message says what was wrong."""


def is_locked_error(err: BaseException) -> bool:
    text = str(err).lower()
    return "database is locked" in text or "database table is locked" in text


def retry_locked(call: Callable[[], T], attempts: int = 40, first_delay: float = 0.02) -> T:
    """Run `call`, retrying with jittered exponential backoff while sqlite reports a lock."""
    delay = first_delay
    for attempt in range(attempts):
        try:
            return call()
        except Exception as err:
            if not is_locked_error(err) or attempt == attempts - 1:
                raise
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 1.0)
    raise AssertionError("unreachable")


def error_code(err: MlflowException) -> str:
    return str(getattr(err, "error_code", ""))


def check_name(name: str) -> str:
    """A registered-model name MLflow's search filters can carry safely."""
    if not isinstance(name, str) or not name.strip():
        raise RegistryError("model name must be a non-empty string")
    if "'" in name or "\\" in name:
        raise RegistryError(f"model name {name!r} may not contain quotes or backslashes")
    return name
