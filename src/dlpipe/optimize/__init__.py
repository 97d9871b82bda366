"""Model optimization (design section 4): ONNX export with parity, INT8/FP16, pruning, TensorRT,
the accuracy gate, and variants of a registered version. See `ModelOptimizer` and
`optimize_version`."""

from dlpipe.optimize.accuracy import (
    AccuracyDegradationError,
    AccuracyReport,
    check_accuracy_gate,
    evaluate_accuracy,
    validate_accuracy,
)
from dlpipe.optimize.onnx_export import ExportError, ExportResult, ParityError, export_onnx
from dlpipe.optimize.optimizer import ModelOptimizer
from dlpipe.optimize.prune import PruneReport, prune_model
from dlpipe.optimize.quantize import (
    QuantizationError,
    convert_fp16,
    quantize_int8_dynamic,
    quantize_int8_static,
)
from dlpipe.optimize.tensorrt import TensorRTResult, build_tensorrt_engine
from dlpipe.optimize.variants import OptimizationReport, VariantResult, optimize_version

__all__ = [
    "AccuracyDegradationError",
    "AccuracyReport",
    "ExportError",
    "ExportResult",
    "ModelOptimizer",
    "OptimizationReport",
    "ParityError",
    "PruneReport",
    "QuantizationError",
    "TensorRTResult",
    "VariantResult",
    "build_tensorrt_engine",
    "check_accuracy_gate",
    "convert_fp16",
    "evaluate_accuracy",
    "export_onnx",
    "optimize_version",
    "prune_model",
    "quantize_int8_dynamic",
    "quantize_int8_static",
    "validate_accuracy",
]
