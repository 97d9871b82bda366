"""Serving fixtures: one exported simple_cnn per test session, packages derived from it."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from serving_helpers import make_package

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def serving_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("serving")


@pytest.fixture(scope="session")
def cnn_package(serving_root: Path) -> Path:
    """A simple_cnn package (ONNX + weights), exported once per session (~10 s)."""
    return make_package(serving_root / "cnn", version="1", seed=0, onnx=True, width=8)


@pytest.fixture(scope="session")
def base_onnx(cnn_package: Path) -> Path:
    return cnn_package / "model.onnx"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """No DLPIPE_* variables from the caller's shell leak into a test."""
    for key in list(os.environ):
        if key.startswith("DLPIPE_"):
            monkeypatch.delenv(key)
    yield monkeypatch
