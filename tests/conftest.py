"""Shared fixtures: each test gets real stores on disk, never the user's own."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# The load generator is benchmark tooling (benchmarks/loadgen.py); tests drive servers with it too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # shared test helpers (tls_helpers)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@pytest.fixture
def tmp_mlflow_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh MLflow sqlite store (tracking + registry) with artifacts under tmp_path."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    monkeypatch.chdir(tmp_path)  # default artifact root ./mlruns lands in tmp_path
    yield uri


def _migrated_sqlite(db: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """An empty, already migrated MLflow schema at `db`: the migrations (seconds) run once per
    session into a template file that each store copies."""
    from mlflow import MlflowClient

    template = tmp_path_factory.getbasetemp() / "mlflow-template.db"
    if not template.exists():
        staging = template.with_name(f"{template.name}.{os.getpid()}")
        MlflowClient(f"sqlite:///{staging}").search_experiments()
        os.replace(staging, template)
    shutil.copyfile(template, db)
    return f"sqlite:///{db}"


@pytest.fixture(scope="module")
def module_mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One sqlite store shared by a test module, created from a migrated template."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = _migrated_sqlite(root / "mlflow.db", tmp_path_factory)
    old = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ["MLFLOW_REGISTRY_URI"] = uri
    cwd = os.getcwd()
    os.chdir(root)
    try:
        yield uri
    finally:
        os.chdir(cwd)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# Files that start processes (training, TensorFlow, CLI runs) go first: `make test` runs the
# suite on two workers a file at a time, and a long file left for the end runs alone.
_FIRST = (
    "tests/training/test_launched.py",
    "tests/training/test_distributed.py",
    "tests/tensorflow/",
    "tests/test_importer.py",
    "tests/training/",
    "tests/test_cli.py",
    "tests/quality/",
    "tests/tracking/",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = Path(str(config.rootpath))

    def rank(item: pytest.Item) -> int:
        where = Path(str(item.path)).relative_to(root).as_posix()
        return next((i for i, p in enumerate(_FIRST) if where.startswith(p)), len(_FIRST))

    items.sort(key=rank)  # stable: the order inside a file is kept
