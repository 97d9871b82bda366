"""Hostile and half-written checkpoints: never executed, never mistaken for corrupt ones."""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import shlex
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from dlpipe.config import PipelineConfig, save_config
from dlpipe.training.checkpoint import (
    CheckpointCorruptedWarning,
    CheckpointError,
    ChecksummedCheckpointIO,
    Integrity,
    UnverifiedCheckpointWarning,
    check_checkpoint,
    checksum_path,
    load_verified_checkpoint,
    resolve_checkpoint,
    write_checksum,
)


class Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def plant(path: Path, marker: Path, fmt: str) -> Path:
    """Write a file that runs code on unpickling, and prove that the code really runs."""
    contents = {"state_dict": {}, "epoch": 0, "callbacks": {"x": Payload(marker)}}
    if fmt == "torch":
        torch.save(contents, path)
    else:
        path.write_bytes(pickle.dumps(Payload(marker)))
    # A live payload, so the assertions below can fail (a raw pickle then fails torch's magic
    # number check, after the code ran).
    with contextlib.suppress(RuntimeError):
        torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()
    return path


def good_checkpoint(path: Path, epoch: int) -> Path:
    io = ChecksummedCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.full((3,), float(epoch))}, "epoch": epoch}, path)
    return path


def corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def age(path: Path, seconds: float) -> None:
    past = time.time() - seconds
    os.utime(path, (past, past))


@pytest.mark.parametrize("fmt", ["torch", "pickle"])
def test_resume_from_a_hostile_file_is_refused_without_running_it(
    fmnist_config: Callable[..., PipelineConfig],
    tmp_mlflow_uri: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    fmt: str,
) -> None:
    from dlpipe.training.cli import main

    marker = tmp_path / "pwned"
    hostile = plant(tmp_path / "evil.ckpt", marker, fmt)
    config_file = tmp_path / "tiny.yaml"
    save_config(fmnist_config(), config_file)
    capsys.readouterr()

    # Without -c the config is read from the checkpoint; with -c, train() resumes from it.
    for argv, status in (
        (["--resume", str(hostile)], 2),
        (["-c", str(config_file), "--resume", str(hostile)], 1),
    ):
        with pytest.warns(UnverifiedCheckpointWarning, match="no checksum"):
            assert main(argv) == status, argv
        err = capsys.readouterr().err
        assert not marker.exists(), argv
        assert "Traceback" not in err
        assert err.strip().splitlines()[-1].startswith("dlpipe train:")
        assert str(hostile) in err and "refusing to load it" in err
        if fmt == "torch":
            assert "posix.system" in err or "os.system" in err
    assert not list(tmp_path.rglob("*.ckpt.sha256")), "nothing was trained"


def test_fallback_never_opens_a_file_without_a_checksum(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    good = good_checkpoint(tmp_path / "epoch000.ckpt", 0)
    last = good_checkpoint(tmp_path / "last.ckpt", 1)
    age(good, 60)
    age(last, 30)
    planted = plant(tmp_path / "epoch999.ckpt", marker, "torch")  # the newest file
    corrupt(last)

    with pytest.warns(CheckpointCorruptedWarning, match="checksum mismatch"):
        used, contents = load_verified_checkpoint(last)
    assert used == good and contents["epoch"] == 0
    assert not marker.exists()

    # With the good one gone too, the planted file is still not a candidate.
    corrupt(good)
    with pytest.raises(CheckpointError, match="no other good checkpoint"):
        resolve_checkpoint(last)
    assert not marker.exists()
    assert check_checkpoint(planted)[0] is Integrity.UNVERIFIED


def test_a_forged_checksum_does_not_make_a_hostile_file_loadable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dlpipe.training.cli import main

    marker = tmp_path / "pwned"
    last = good_checkpoint(tmp_path / "last.ckpt", 1)
    age(last, 30)
    planted = plant(tmp_path / "epoch999.ckpt", marker, "torch")
    write_checksum(planted)  # anyone can compute a SHA-256: it proves integrity, not origin
    corrupt(last)

    with pytest.warns(CheckpointCorruptedWarning):
        assert resolve_checkpoint(last) == planted
    with pytest.warns(CheckpointCorruptedWarning):
        assert main(["--resume", str(last)]) == 2
    err = capsys.readouterr().err.strip()
    assert not marker.exists()
    assert "Traceback" not in err and err.splitlines()[-1].startswith("dlpipe train:")
    assert f"{planted} is not a plain checkpoint" in err


def test_failed_write_keeps_the_previous_checkpoint_and_its_checksum(tmp_path: Path) -> None:
    last = good_checkpoint(tmp_path / "last.ckpt", 1)
    before = last.read_bytes()
    with pytest.raises(Exception, match=r"lambda|pickle"):
        ChecksummedCheckpointIO().save_checkpoint({"unpicklable": lambda: 0}, last)
    assert last.read_bytes() == before
    assert check_checkpoint(last)[0] is Integrity.VERIFIED
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "last.ckpt.sha256"]


class Crash(BaseException):
    """Stands for the process dying at this point."""


def test_crash_before_the_new_checksum_leaves_an_unverified_not_a_corrupt_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dlpipe.training.checkpoint_io as checkpoint_io

    last = good_checkpoint(tmp_path / "last.ckpt", 1)
    other = good_checkpoint(tmp_path / "other.ckpt", 0)

    def crash(*args: object) -> None:
        raise Crash

    monkeypatch.setattr(checkpoint_io, "write_checksum", crash)
    with pytest.raises(Crash):
        good_checkpoint(last, 2)
    monkeypatch.undo()

    # The new checkpoint is whole; the old sidecar is gone rather than accusing it.
    assert not checksum_path(last).exists()
    assert check_checkpoint(last)[0] is Integrity.UNVERIFIED
    with pytest.warns(UnverifiedCheckpointWarning):
        used, contents = load_verified_checkpoint(last)
    assert used == last and contents["epoch"] == 2
    # ...but it is no fallback candidate for another broken checkpoint.
    age(last, -30)  # the newest file beside `other`
    corrupt(other)
    with pytest.raises(CheckpointError, match="no other good checkpoint"):
        resolve_checkpoint(other)


def test_crash_while_writing_the_checksum_leaves_no_partial_sidecar(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    last = good_checkpoint(tmp_path / "last.ckpt", 1)
    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:
        if str(dst).endswith(".sha256"):
            raise Crash
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Crash):
        good_checkpoint(last, 2)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert check_checkpoint(last)[0] is Integrity.UNVERIFIED


def _write_until_killed(path: Path, progress: int) -> None:
    """Child process: save checkpoints to `path` forever, one byte on `progress` after each."""
    try:
        io, step = ChecksummedCheckpointIO(), 0
        while True:
            io.save_checkpoint({"epoch": step, "w": torch.full((1_000_000,), float(step))}, path)
            os.write(progress, b".")
            step += 1
    finally:
        os._exit(1)


def test_killed_writer_never_leaves_a_corrupt_last_checkpoint(tmp_path: Path) -> None:
    last = tmp_path / "last.ckpt"
    rng = random.Random(0)
    for _ in range(10):
        read_end, write_end = os.pipe()
        pid = os.fork()  # not a fresh interpreter: ten real kills cost about a second each
        if pid == 0:
            os.close(read_end)
            _write_until_killed(last, write_end)
        os.close(write_end)
        try:
            assert os.read(read_end, 1) == b"."
            started = time.monotonic()
            assert os.read(read_end, 1) == b"."
            one_save = time.monotonic() - started
            time.sleep(rng.uniform(0.0, one_save))  # somewhere inside the next save
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(read_end)
        integrity, why = check_checkpoint(last)
        assert integrity in (Integrity.VERIFIED, Integrity.UNVERIFIED), why
        contents = torch.load(last, weights_only=True)
        assert torch.equal(contents["w"], torch.full((1_000_000,), float(contents["epoch"])))
        # A killed write may leave its temp file; it is never taken for a checkpoint.
        assert [p.name for p in tmp_path.glob("*.ckpt")] == ["last.ckpt"]
