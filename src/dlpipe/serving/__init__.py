"""Inference service: FastAPI on ONNX Runtime with dynamic batching and version routing."""

from dlpipe.serving.app import create_app
from dlpipe.serving.batcher import MicroBatcher
from dlpipe.serving.engine import InferenceEngine
from dlpipe.serving.settings import ServeSettings, get_settings

__all__ = ["InferenceEngine", "MicroBatcher", "ServeSettings", "create_app", "get_settings"]
