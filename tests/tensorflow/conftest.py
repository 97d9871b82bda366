"""Keras / TensorFlow tests: skipped as a whole, with the reason, when the extra is missing.

TensorFlow only ever runs in subprocesses started by dlpipe (`keras_worker`, `keras_runner`):
this pytest process may have torch loaded, and `import tensorflow` followed by
`import torchvision` crashes a process.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from dlpipe.config import PipelineConfig, load_config

sys.path.insert(0, str(Path(__file__).parent))  # keras_helpers, as tests/serving does

from keras_helpers import KERAS_CONFIG

MISSING = [m for m in ("tensorflow", "keras", "tf2onnx") if importlib.util.find_spec(m) is None]


@pytest.fixture(autouse=True)
def _needs_tensorflow() -> None:
    if MISSING:
        pytest.skip(
            f"{', '.join(MISSING)} not installed: install the extra with "
            "pip install -e '.[tensorflow]' (make test does)"
        )


@pytest.fixture
def keras_config(tmp_path: Path) -> Callable[..., PipelineConfig]:
    """`keras_config("training.num_epochs=2", ...)`: keras_cnn on a slice of Fashion-MNIST."""

    def make(*overrides: str) -> PipelineConfig:
        base = [
            "data.limit_train_samples=1024",
            "data.limit_eval_samples=256",
            "training.batch_size=64",
            "training.num_epochs=1",
            f"training.checkpoint_dir={tmp_path / 'checkpoints'}",
        ]
        return load_config(KERAS_CONFIG, [*base, *overrides])

    return make
