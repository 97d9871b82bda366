"""The prediction log: JSON Lines files written off the event loop, rotated, read back by any
process (`LogReader`).

    log = PredictionLog("/var/lib/dlpipe/predictions", prepare=to_records)
    log.start()
    log.submit(item)      # request path: one bounded append, never blocks, False when dropped
    log.close()           # shutdown: writes everything queued, fsyncs, closes

A writer thread drains the buffer every `flush_interval_s`, turns each item into log records
with `prepare` (summaries, top-k: the work is done here, not on the request path), appends
them as lines and flushes them to the OS; it fsyncs at most once a second, on rotation and on
close. A full buffer drops the item and counts it (`on_dropped`): the request path never waits
for the disk. Each process writes its own files, `predictions-<start>-<pid>-<seq>.jsonl`, so
the workers of `dlpipe serve --workers N` share a directory without interleaving lines;
a file is rotated beyond `max_bytes`, and with `max_files` the oldest finished files go.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
PREFIX = "predictions-"
SUFFIX = ".jsonl"
INACTIVE_S = 600.0
"""A writer's newest file is deleted by retention only after it has been idle this long."""

Prepare = Callable[[list[Any]], list[dict[str, Any]]]
"""Turns the items queued since the last drain into log records (in one go: vectorized)."""


def _identity(items: list[Any]) -> list[dict[str, Any]]:
    return list(items)


class PredictionLog:
    """One process's writer (see the module docstring)."""

    def __init__(
        self,
        directory: str | Path | None,
        *,
        prepare: Prepare = _identity,
        max_bytes: int = 64 * 1024 * 1024,
        max_files: int = 0,
        capacity: int = 10_000,
        flush_interval_s: float = 0.05,
        on_written: Callable[[int], None] | None = None,
        on_dropped: Callable[[str, int], None] | None = None,
    ) -> None:
        # None: items are still prepared (the statistics are kept in memory), nothing is written.
        self.directory = None if directory is None else Path(directory)
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        self.prepare = prepare
        self.max_bytes = max_bytes
        self.max_files = max_files
        self.capacity = capacity
        self.flush_interval_s = flush_interval_s
        self.on_written = on_written or (lambda n: None)
        self.on_dropped = on_dropped or (lambda reason, n: None)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        self.stem = f"{PREFIX}{stamp}-{os.getpid()}-"
        """Every file of this writer starts with it (`LogReader` skips them when told to)."""
        self.written = 0
        self.dropped = 0
        self._queue: deque[Any] = deque()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._seq = 0
        self._file: Any = None
        self._size = 0
        self._synced_at = 0.0
        self._drain_lock = threading.Lock()
        self._wake = threading.Event()

    # ------------------------------------------------------------------ request path
    def submit(self, item: Any) -> bool:
        """Queue one item for the writer; False (and counted) when the buffer is full."""
        if self._closed or len(self._queue) >= self.capacity:
            self.dropped += 1
            self.on_dropped("closed" if self._closed else "buffer_full", 1)
            return False
        self._queue.append(item)  # deque.append is atomic: no lock on the request path
        return True

    # ------------------------------------------------------------------ writer thread
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
            self._thread.start()

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop taking items, write what is queued, fsync and close (blocking)."""
        self._closed = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.error("prediction log: the writer did not finish within %g s", timeout_s)
                return
        else:
            self._drain()
        if self._file is not None:
            self._sync()
            self._file.close()
            self._file = None

    def flush(self) -> None:
        """Prepare and write everything queued now, in the calling thread (blocking)."""
        self._drain()

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(self.flush_interval_s)  # close() wakes it at once
            self._drain()
        self._drain()  # everything submitted before close()

    def _drain(self) -> None:
        with self._drain_lock:  # the writer thread, or flush() from another one
            items = [self._queue.popleft() for _ in range(len(self._queue))]
            if not items:
                records = []
            else:
                try:
                    records = self.prepare(items)
                except Exception:  # one bad item must not lose the others: one at a time
                    records = []
                    for item in items:
                        try:
                            records.extend(self.prepare([item]))
                        except Exception:
                            log.exception("prediction log: could not build a record")
                            self.dropped += 1
                            self.on_dropped("error", 1)
            if records and self.directory is not None:
                self._write([json.dumps(r, separators=(",", ":")) for r in records])
            if self._file is not None and time.monotonic() - self._synced_at > 1.0:
                self._sync()

    def _write(self, lines: list[str]) -> None:
        data = ("\n".join(lines) + "\n").encode()
        try:
            if self._file is None or self._size >= self.max_bytes:
                self._rotate()
            self._file.write(data)
            self._file.flush()  # in the OS now: a crash of this process loses nothing written
        except OSError:
            log.exception("prediction log: writing %d records failed", len(lines))
            self.dropped += len(lines)
            self.on_dropped("write_error", len(lines))
            return
        self._size += len(data)
        self.written += len(lines)
        self.on_written(len(lines))

    def _sync(self) -> None:
        try:
            os.fsync(self._file.fileno())
        except OSError:
            log.warning("prediction log: fsync failed", exc_info=True)
        self._synced_at = time.monotonic()

    def _rotate(self) -> None:
        assert self.directory is not None
        if self._file is not None:
            self._sync()
            self._file.close()
        self._seq += 1
        path = self.directory / f"{self.stem}{self._seq:05d}{SUFFIX}"
        self._file = open(path, "ab")  # noqa: SIM115 - kept open across drains, closed in close()
        self._size = path.stat().st_size
        if self.max_files:
            self._retire_old(path)

    def _retire_old(self, current: Path) -> None:
        """Delete the oldest files beyond `max_files`, never one a live writer may still use
        (the newest file of each writer, unless idle for `INACTIVE_S`)."""
        assert self.directory is not None
        files = log_files(self.directory)
        newest: dict[str, Path] = {}
        for f in files:
            newest[f.name.rsplit("-", 1)[0]] = f  # sorted by name: the last one per writer
        now = time.time()
        removable = [
            f
            for f in files
            if f != current
            and (newest.get(f.name.rsplit("-", 1)[0]) != f or now - _mtime(f) > INACTIVE_S)
        ]
        for f in removable[: max(0, len(files) - self.max_files)]:
            with contextlib.suppress(OSError):  # another worker deleted it first
                f.unlink()


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def log_files(directory: str | Path) -> list[Path]:
    """The log's files, oldest first (the names sort by start time, then process, then seq)."""
    return sorted(Path(directory).glob(f"{PREFIX}*{SUFFIX}"))


class LogReader:
    """Reads records appended to a log directory since the last `poll()`, from every file
    (new ones included) but those whose name starts with `skip` (this process's own).

    Only complete lines are read: a line being written is picked up by a later poll.
    """

    def __init__(self, directory: str | Path, skip: str | None = None, tail_bytes: int = 0):
        """`tail_bytes`: at the first poll read at most this many bytes of the files already
        there, the newest ones (0: everything)."""
        self.directory = Path(directory)
        self.skip = skip
        self._offsets: dict[Path, int] = {}
        self._lock = threading.Lock()
        self._first = True
        self._tail_bytes = tail_bytes
        self._unaligned: set[Path] = set()

    def poll(self) -> list[dict[str, Any]]:
        with self._lock:
            skip = self.skip or None
            names = log_files(self.directory)
            files = [f for f in names if skip is None or not f.name.startswith(skip)]
            if self._first:
                self._first = False
                self._start_at_tail(files)
            records: list[dict[str, Any]] = []
            for path in files:
                records.extend(self._read_new(path))
            for gone in set(self._offsets) - set(files):
                del self._offsets[gone]  # deleted by retention
                self._unaligned.discard(gone)
            return records

    def _start_at_tail(self, files: list[Path]) -> None:
        if not self._tail_bytes:
            return
        budget = self._tail_bytes
        for path in reversed(files):
            size = path.stat().st_size
            if size > budget:
                self._offsets[path] = size - budget
                self._unaligned.add(path)
            budget = max(0, budget - size)

    def _read_new(self, path: Path) -> list[dict[str, Any]]:
        offset = self._offsets.get(path, 0)
        unaligned = path in self._unaligned
        try:
            with open(path, "rb") as f:
                # A tail start may fall mid-line: read one byte back to see where lines begin.
                f.seek(offset - 1 if unaligned else offset)
                data = f.read()
        except OSError:
            return []
        start = 0
        if unaligned:
            start = data.find(b"\n") + 1
            offset -= 1
        end = data.rfind(b"\n")
        if end < start:
            return []  # no complete line yet
        self._unaligned.discard(path)
        self._offsets[path] = offset + end + 1
        records = []
        for line in data[start : end + 1].splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                log.warning("prediction log: unreadable line in %s", path.name)
        return records


def read_records(directory: str | Path) -> list[dict[str, Any]]:
    """Every record of a log directory, file by file, oldest first."""
    return LogReader(directory).poll()
