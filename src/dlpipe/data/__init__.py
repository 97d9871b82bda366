"""Data: preprocessing shared by training and serving, data sources, the Lightning DataModule.

The DataModule needs Lightning and torch; it is imported on first use (PEP 562), so serving can
import `dlpipe.data` with neither installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dlpipe.data.preprocessing import DataPreprocessor, InvalidInputError, decode_image
from dlpipe.data.sources import SkippedSamplesWarning

if TYPE_CHECKING:
    from dlpipe.data.datamodule import ClassifierDataModule, build_datamodule

__all__ = [
    "ClassifierDataModule",
    "DataPreprocessor",
    "InvalidInputError",
    "SkippedSamplesWarning",
    "build_datamodule",
    "decode_image",
]

_LAZY = {"ClassifierDataModule", "build_datamodule"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from dlpipe.data import datamodule

        return getattr(datamodule, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
