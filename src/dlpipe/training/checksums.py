"""Checkpoint checksums: a `<file>.sha256` sidecar beside each checkpoint, for both frameworks.

Torch-free: the Lightning checkpoint plugin (`checkpoint_io`) and the TensorFlow worker's Keras
checkpoints (`keras_checkpoint`) both import it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

CHECKSUM_SUFFIX = ".sha256"


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checksum_path(path: str | Path) -> Path:
    """The sidecar holding `path`'s checksum."""
    return Path(str(path) + CHECKSUM_SUFFIX)
