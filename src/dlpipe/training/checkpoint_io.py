"""How checkpoint files are written, checked and read: atomically, with checksums, weights only.

`ChecksummedCheckpointIO` is the Trainer's `CheckpointIO` plugin (`plugins=[...]`), so every file
Lightning writes (top-k, `last.ckpt`, `trainer.save_checkpoint`) goes through it:

1. the checkpoint is serialised into a temp file in the target directory and fsynced;
2. the target's old `X.ckpt.sha256` is removed (it vouches for the old bytes only);
3. the temp file replaces `X.ckpt` (`os.replace`, atomic);
4. the new sidecar is written the same way (temp file, then rename).

A crash at any point leaves either the old or the new checkpoint whole, with a matching sidecar or
none: "unverified", never "corrupt". Reading always uses `torch.load(weights_only=True)`: a file
that needs anything beyond tensors and plain containers to unpickle is refused, not executed.
Checkpoints written by dlpipe need nothing allowlisted (`tests/training/test_checkpoint_safety.py`
checks a real one), so no `torch.serialization.add_safe_globals` is registered.
"""

from __future__ import annotations

import enum
import os
import pickle
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from dlpipe.training.checksums import checksum_path, file_sha256


class CheckpointError(RuntimeError):
    """No usable checkpoint: missing, corrupted, or not loadable as plain data."""


class Integrity(enum.Enum):
    """What a checkpoint's sidecar says about it (the file itself is never unpickled for this)."""

    VERIFIED = "verified"  # the sidecar's SHA-256 matches the file
    UNVERIFIED = "unverified"  # no sidecar: nothing to check against
    CORRUPT = "corrupt"  # the sidecar disagrees with the file
    MISSING = "missing"


def check_checkpoint(path: str | Path) -> tuple[Integrity, str]:
    """(integrity, human description) of `path`, from its bytes and its sidecar only."""
    p = Path(path)
    if not p.is_file():
        return Integrity.MISSING, f"{p} does not exist"
    sidecar = checksum_path(p)
    if not sidecar.is_file():
        return Integrity.UNVERIFIED, f"{p} has no checksum file {sidecar.name}"
    with open(sidecar, "rb") as handle:  # a sidecar is one short line; never read a huge one
        fields = handle.read(512).decode("ascii", "replace").split()
    expected = fields[0].lower() if fields else ""
    actual = file_sha256(p)
    if actual != expected:
        return Integrity.CORRUPT, (
            f"{p}: checksum mismatch (expected {expected[:12] or 'nothing'}…, got {actual[:12]}…)"
        )
    return Integrity.VERIFIED, f"{p} matches its checksum"


def verify_checkpoint(path: str | Path) -> str | None:
    """None when `path` exists and matches its `.sha256` sidecar, else why it is not verified."""
    integrity, why = check_checkpoint(path)
    return None if integrity is Integrity.VERIFIED else why


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself survive a power cut, not only a process crash.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temp(final: Path, write: Callable[[IO[bytes]], Any]) -> tuple[Path, str]:
    """Write a complete, fsynced temp file beside `final`; returns (temp path, its SHA-256).

    The temp name (`.NAME.<hex>.tmp`) never matches `*.ckpt`, so a crash's leftover is never
    taken for a checkpoint.
    """
    temp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(temp, "xb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        return temp, file_sha256(temp)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _replace(temp: Path, final: Path) -> None:
    try:
        os.replace(temp, final)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_directory(final.parent)


def atomic_write(target: str | Path, write: Callable[[IO[bytes]], Any]) -> str:
    """Write `target` through a temp file beside it and `os.replace`; returns the SHA-256."""
    final = Path(target)
    temp, digest = _write_temp(final, write)
    _replace(temp, final)
    return digest


def write_checksum(path: str | Path, digest: str | None = None) -> Path:
    """Write `<path>.sha256` (`<hex>  <file name>`, the sha256sum format) atomically."""
    sidecar = checksum_path(path)
    line = f"{digest or file_sha256(path)}  {Path(path).name}\n".encode()
    atomic_write(sidecar, lambda handle: handle.write(line))
    return sidecar


def _refusal_reason(err: BaseException) -> str:
    """The one informative line of a torch.load error (not its advice to drop weights_only)."""
    text = str(err)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"unpickling it would import and call {found.group(1)}"
    boilerplate = ("Weights only load failed", "Check the documentation", "Please file an issue")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(boilerplate)]
    return f"{type(err).__name__}: {useful[0] if useful else 'unreadable'}"


def load_checkpoint_file(
    path: str | Path, map_location: Any = "cpu", *, require_checksum: bool = False
) -> dict[str, Any]:
    """Load a checkpoint with `weights_only=True`; any failure is one clear `CheckpointError`.

    Args:
        require_checksum: refuse a file whose sidecar is missing or disagrees (a corrupt
            sidecar is refused either way).
    """
    integrity, why = check_checkpoint(path)
    if integrity is Integrity.MISSING or integrity is Integrity.CORRUPT:
        raise CheckpointError(why)
    if require_checksum and integrity is not Integrity.VERIFIED:
        raise CheckpointError(why)
    try:
        contents = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path} is not a plain checkpoint ({_refusal_reason(err)}); refusing to load it"
        ) from None
    except Exception as err:  # truncated zip, garbage bytes, ...: all mean "unusable"
        raise CheckpointError(f"{path} cannot be read ({_refusal_reason(err)})") from None
    if not isinstance(contents, dict):
        raise CheckpointError(f"{path} is not a Lightning checkpoint (holds {type(contents)})")
    return contents


class ChecksummedCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` for local files: atomic writes, `.sha256` sidecars, weights-only
    loads (see the module docstring for the write order)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        # Serialise completely before touching the old files: a failure (or a kill) while
        # writing leaves the previous checkpoint and its sidecar as they were.
        temp, digest = _write_temp(target, lambda handle: torch.save(checkpoint, handle))
        checksum_path(target).unlink(missing_ok=True)
        _replace(temp, target)
        write_checksum(target, digest)

    def load_checkpoint(
        self,
        path: str | Path,
        map_location: Any = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        # weights_only is always True here, whatever the caller asks: a resumed checkpoint may
        # come from anywhere, and ours never need more.
        return load_checkpoint_file(path, map_location)

    def remove_checkpoint(self, path: str | Path) -> None:
        super().remove_checkpoint(path)
        checksum_path(path).unlink(missing_ok=True)
