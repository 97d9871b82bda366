"""A routing generation counter beside a local MLflow store, read in about a microsecond.

Every routing change made through `ModelRegistry` (alias move, A/B change, rollback, new
version) first commits to the store and then bumps this counter (`RoutingCache.publish`).
Readers compare the counter with the one their cached routing state was fetched under, so a
change is visible to every call that starts after the writer returned, in any process on the
host, without a database query per request.

The counter lives in `<sqlite db file>.dlpipe-routing` (or `<file store>/.dlpipe-routing`).
Remote stores (http, postgres, ...) have no such file: there readers rely on the cache TTL and
`ModelRegistry.rollback` waits out that TTL before it returns.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
from pathlib import Path
from urllib.parse import unquote, urlparse

_log = logging.getLogger(__name__)
_WIDTH = 20  # decimal digits; one fixed-size record so reads never see a shorter value


def signal_path_for(store_uri: str) -> Path | None:
    """Where the counter of a store lives, or None when the store is not a local file."""
    if store_uri.startswith("sqlite:///"):
        db = store_uri.removeprefix("sqlite:///").split("?", 1)[0]
        if not db or db == ":memory:":
            return None
        return Path(os.path.abspath(db)).with_name(Path(db).name + ".dlpipe-routing")
    parsed = urlparse(store_uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path)) / ".dlpipe-routing"
    if parsed.scheme == "" and store_uri:  # a plain directory: MLflow's file store
        return Path(os.path.abspath(store_uri)) / ".dlpipe-routing"
    return None


class RoutingSignal:
    """Shared counter file; `read()` is one `pread` on a file descriptor kept open."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._fd: int | None = None
        self._lock = threading.Lock()
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as err:
                _log.warning("routing signal %s unavailable (%s); using the cache TTL", path, err)
                self.path = None

    @property
    def available(self) -> bool:
        return self._fd is not None

    def read(self) -> int:
        """Current generation (0 for a new file, -1 when there is no file)."""
        if self._fd is None:
            return -1
        raw = os.pread(self._fd, _WIDTH, 0)
        try:
            return int(raw) if raw else 0
        except ValueError:  # a torn read during a write: report something no cache holds
            return -2

    def bump(self) -> bool:
        """Advance the generation; False when it could not be written (readers fall back to TTL)."""
        if self._fd is None:
            return False
        try:
            with self._lock:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
                try:
                    raw = os.pread(self._fd, _WIDTH, 0)
                    current = int(raw) if raw.strip() else 0
                    os.pwrite(self._fd, f"{current + 1:0{_WIDTH}d}".encode(), 0)
                finally:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
            return True
        except (OSError, ValueError) as err:
            _log.warning("could not bump routing signal %s: %s", self.path, err)
            return False

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
