"""The prediction log's writer and reader on real files: rotation, retention, drops, close,
readers that follow several writers and start at the tail."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from dlpipe.quality.predlog import LogReader, PredictionLog, log_files, read_records


def _records(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [
        {"type": "prediction", "request_id": f"r{i}", "pad": "x" * 100}
        for i in range(start, start + n)
    ]


def test_close_writes_everything_submitted(tmp_path: Path) -> None:
    log = PredictionLog(tmp_path, flush_interval_s=10.0)  # the thread would not drain in time
    log.start()
    for r in _records(500):
        assert log.submit(r)
    log.close()
    assert [r["request_id"] for r in read_records(tmp_path)] == [f"r{i}" for i in range(500)]
    assert log.written == 500 and log.dropped == 0
    assert not log.submit({"late": True}) and log.dropped == 1  # after close: counted, not written


def test_rotation_and_retention(tmp_path: Path) -> None:
    log = PredictionLog(tmp_path, max_bytes=2000, max_files=3)
    for r in _records(100):
        log.submit(r)
        log.flush()  # one record per write: the file is checked for size before each
    log.close()
    files = log_files(tmp_path)
    assert len(files) == 3, files
    assert all(f.name.startswith(log.stem) for f in files)
    assert all(f.stat().st_size < 2000 + 200 for f in files)
    kept = [r["request_id"] for r in read_records(tmp_path)]
    assert kept == [f"r{i}" for i in range(100 - len(kept), 100)]  # the newest, in order


def test_retention_spares_another_writers_current_file(tmp_path: Path) -> None:
    other = PredictionLog(tmp_path)
    other.stem = other.stem.replace(f"-{os.getpid()}-", "-1-")  # as another process would
    other.submit({"n": 0})
    other.flush()
    mine = PredictionLog(tmp_path, max_bytes=10, max_files=1)
    for r in _records(5):
        mine.submit(r)
        mine.flush()
    names = [f.name for f in log_files(tmp_path)]
    assert any(n.startswith(other.stem) for n in names), names  # still in use: kept
    other.close()
    mine.close()


def test_a_full_buffer_drops_and_counts_instead_of_waiting(tmp_path: Path) -> None:
    release = threading.Event()
    drops: list[tuple[str, int]] = []

    def slow(items: list[Any]) -> list[dict[str, Any]]:
        release.wait(10)
        return list(items)

    log = PredictionLog(
        tmp_path, prepare=slow, capacity=10, on_dropped=lambda r, n: drops.append((r, n))
    )
    log.start()
    started = time.perf_counter()
    accepted = sum(log.submit(r) for r in _records(100))
    elapsed = time.perf_counter() - started
    release.set()
    log.close()
    assert elapsed < 0.5  # never waited on the writer
    assert accepted <= 11 and log.dropped == 100 - accepted
    assert drops == [("buffer_full", 1)] * (100 - accepted)
    assert len(read_records(tmp_path)) == accepted


def test_a_bad_item_is_counted_and_the_rest_written(tmp_path: Path) -> None:
    def prepare(items: list[Any]) -> list[dict[str, Any]]:
        if "bad" in items:  # the batch fails, then each item alone: only "bad" is lost
            raise ValueError("cannot summarize")
        return list(items)

    log = PredictionLog(tmp_path, prepare=prepare)
    for item in ({"a": 1}, "bad", {"b": 2}):
        log.submit(item)
    log.close()
    assert read_records(tmp_path) == [{"a": 1}, {"b": 2}] and log.dropped == 1


def test_reader_follows_other_writers_and_skips_its_own(tmp_path: Path) -> None:
    mine, other = PredictionLog(tmp_path), PredictionLog(tmp_path)
    other.stem = other.stem.replace(f"-{os.getpid()}-", "-2-")
    reader = LogReader(tmp_path, skip=mine.stem)
    mine.submit({"who": "me"})
    other.submit({"who": "other", "n": 1})
    mine.flush()
    other.flush()
    assert reader.poll() == [{"who": "other", "n": 1}]
    assert reader.poll() == []  # nothing new
    other.submit({"who": "other", "n": 2})
    other.flush()
    # A line still being written is left for a later poll.
    with open(log_files(tmp_path)[-1], "ab") as f:
        f.write(b'{"who": "half')
    assert reader.poll() == [{"who": "other", "n": 2}]
    mine.close()
    other.close()


def test_reader_starts_at_the_tail(tmp_path: Path) -> None:
    log = PredictionLog(tmp_path)
    for r in _records(1000):
        log.submit(r)
    log.close()
    size = log_files(tmp_path)[0].stat().st_size
    line = size // 1000
    tail = LogReader(tmp_path, tail_bytes=line * 10 + line // 2).poll()
    # Ten whole lines; the cut one is skipped, not half-parsed.
    assert [r["request_id"] for r in tail] == [f"r{i}" for i in range(990, 1000)]
    assert all(json.dumps(r) for r in tail)
