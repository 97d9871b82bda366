"""Data: preprocessing shared by training and serving, data sources, the Lightning DataModule."""

from dlpipe.data.datamodule import ClassifierDataModule, build_datamodule
from dlpipe.data.preprocessing import DataPreprocessor, InvalidInputError, decode_image
from dlpipe.data.sources import SkippedSamplesWarning

__all__ = [
    "ClassifierDataModule",
    "DataPreprocessor",
    "InvalidInputError",
    "SkippedSamplesWarning",
    "build_datamodule",
    "decode_image",
]
