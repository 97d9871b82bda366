"""Keras checkpoints: one `.keras` file each, resume state inside, a sha256 sidecar beside it.

    publish_checkpoint(staged, run_dir / "last.keras", state)   # worker, after each epoch
    path = resolve_keras_checkpoint("checkpoints/<run>/last.keras")   # parent, before a resume
    read_state(path)["epoch"]                                    # epochs completed

A `.keras` file is a zip archive (config, weights, optimizer variables). The state Keras does not
keep (epochs done, early-stopping counters, history, dropout seed-generator states, the config)
goes into the same archive as `dlpipe_state.json`, so one checksum covers everything a resume
reads. Publishing is crash-safe like the PyTorch path (`dlpipe.training.checkpoint_io`): the old
sidecar is removed, the staged file replaces the target (`os.replace`), then the new sidecar is
written through a temp file. Torch-free: the TensorFlow worker imports it.
"""

from __future__ import annotations

import json
import os
import uuid
import warnings
import zipfile
from pathlib import Path
from typing import Any

from dlpipe.training.checksums import checksum_path, file_sha256

STATE_ENTRY = "dlpipe_state.json"
LAST_CHECKPOINT = "last.keras"
BEST_CHECKPOINT = "best.keras"


class KerasCheckpointError(RuntimeError):
    """No usable Keras checkpoint: missing, corrupted, or without dlpipe's resume state."""


class KerasCheckpointCorruptedWarning(UserWarning):
    """A checkpoint failed verification and an older good one is used instead."""


def _write_atomically(target: Path, data: bytes) -> None:
    staged = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(staged, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staged, target)


def write_checksum(path: str | Path) -> Path:
    """Write `<path>.sha256` (`<hex>  <file name>`, the sha256sum format) atomically."""
    sidecar = checksum_path(path)
    _write_atomically(sidecar, f"{file_sha256(path)}  {Path(path).name}\n".encode())
    return sidecar


def publish_checkpoint(staged: str | Path, final: str | Path, state: dict[str, Any]) -> Path:
    """Add `state` to the staged `.keras` archive and move it to `final` with a fresh sidecar.

    `staged` must be in `final`'s directory (same file system, so the rename is atomic).
    """
    src, dst = Path(staged), Path(final)
    with zipfile.ZipFile(src, "a") as archive:
        archive.writestr(STATE_ENTRY, json.dumps(state, sort_keys=True))
    with open(src, "rb") as handle:
        os.fsync(handle.fileno())
    # The old sidecar vouches for the old bytes only: without it the file reads "unverified"
    # for an instant, never "corrupt".
    checksum_path(dst).unlink(missing_ok=True)
    os.replace(src, dst)
    write_checksum(dst)
    return dst


def read_state(path: str | Path) -> dict[str, Any]:
    """The resume state stored in a checkpoint by `publish_checkpoint`."""
    try:
        with zipfile.ZipFile(path) as archive:
            state: dict[str, Any] = json.loads(archive.read(STATE_ENTRY))
    except KeyError:
        raise KerasCheckpointError(f"{path} has no {STATE_ENTRY} (not from dlpipe)") from None
    except (OSError, zipfile.BadZipFile, json.JSONDecodeError) as err:
        raise KerasCheckpointError(f"{path} cannot be read: {err}") from None
    return state


def verify_keras_checkpoint(path: str | Path) -> str | None:
    """None when `path` is intact, else why it is not usable."""
    p = Path(path)
    if not p.is_file():
        return f"{p} does not exist"
    sidecar = checksum_path(p)
    if sidecar.is_file():
        fields = sidecar.read_text().split()
        actual = file_sha256(p)
        if not fields or fields[0] != actual:
            expected = fields[0] if fields else ""
            return f"{p}: checksum mismatch (expected {expected[:12]}…, got {actual[:12]}…)"
    try:  # no sidecar (copied from elsewhere): at least the archive and its state must read
        read_state(p)
    except KerasCheckpointError as err:
        return str(err)
    return None


def resolve_keras_checkpoint(path: str | Path) -> Path:
    """The checkpoint to resume from: `path` if intact, else the newest good one beside it.

    Raises:
        KerasCheckpointError: `path` is unusable and no good `.keras` checkpoint is beside it.
    """
    p = Path(path)
    problem = verify_keras_checkpoint(p)
    if problem is None:
        return p
    others = [c for c in p.parent.glob("*.keras") if c.resolve() != p.resolve()]
    good = [c for c in others if verify_keras_checkpoint(c) is None]
    if not good:
        raise KerasCheckpointError(f"{problem}; no other good checkpoint in {p.parent}")
    newest = max(good, key=lambda c: (int(read_state(c).get("epoch", 0)), c.stat().st_mtime))
    warnings.warn(
        f"{problem}; resuming from the previous good checkpoint {newest}",
        KerasCheckpointCorruptedWarning,
        stacklevel=2,
    )
    return newest
