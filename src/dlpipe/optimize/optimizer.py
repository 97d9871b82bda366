"""`ModelOptimizer` (design section 4): one trained network in, optimized variants out.

    opt = ModelOptimizer(net, model_name="simple_cnn", preprocessing=cfg.preprocessing)
    opt.export_onnx("out/model.onnx")
    opt.quantize("int8", calibration_inputs=batches)      # static for CNNs, dynamic for text
    opt.quantize("fp16")
    opt.optimize_tensorrt("out/model.onnx", "out/model.plan")  # skipped in one line on CPU

    opt = ModelOptimizer.from_onnx("model.fp32.onnx", preprocessing=cfg.preprocessing)
    opt.quantize("int8", calibration_inputs=batches)      # no nn.Module: Keras, imported models

`optimize_version` (in `dlpipe.optimize.variants`) drives this for a registered version.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dlpipe.optimize.accuracy import AccuracyReport, ModelLike, validate_accuracy
from dlpipe.optimize.onnx_export import Exporter, ExportResult, export_onnx
from dlpipe.optimize.prune import PruneMethod, PruneReport, finetune_pruned, prune_model
from dlpipe.optimize.quantize import (
    QuantizationResult,
    convert_fp16,
    quantize_int8_dynamic,
    quantize_int8_static,
)
from dlpipe.optimize.tensorrt import TensorRTResult, TrtPrecision, build_tensorrt_engine

if TYPE_CHECKING:
    from dlpipe.config import PreprocessingConfig


class ModelOptimizer:
    """Export, quantize, prune and validate one PyTorch model, or quantize an ONNX graph.

    Args:
        model: the trained network (never modified: pruning works on a copy); None only
            through `from_onnx`.
        model_name: its `dlpipe.models` name; gives ONNX input names and example inputs.
        preprocessing: shapes for the example inputs (image size, channels, sequence length).
        work_dir: where files go when no output path is given (default: a temp directory).
        opset: ONNX opset for export.
    """

    def __init__(
        self,
        model: nn.Module | None,
        *,
        model_name: str | None = None,
        preprocessing: PreprocessingConfig | None = None,
        work_dir: str | Path | None = None,
        opset: int = 18,
        exporter: Exporter = "auto",
    ):
        self.model = model.eval() if model is not None else None
        self.model_name = model_name
        self.preprocessing = preprocessing
        self.opset = opset
        self.exporter: Exporter = exporter
        self._tmp = None if work_dir else tempfile.TemporaryDirectory(prefix="dlpipe-opt-")
        self.work_dir = Path(work_dir or self._tmp.name)  # type: ignore[union-attr]
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.onnx_path: Path | None = None
        self.export_result: ExportResult | None = None

    @classmethod
    def from_onnx(
        cls,
        onnx_path: str | Path,
        *,
        preprocessing: PreprocessingConfig | None = None,
        work_dir: str | Path | None = None,
        export_result: ExportResult | None = None,
    ) -> ModelOptimizer:
        """Start from an FP32 ONNX graph instead of a PyTorch module (a Keras model exported
        by tf2onnx, an imported ONNX model): quantization and TensorRT work on it; export and
        pruning need PyTorch weights and raise.

        Args:
            preprocessing: shapes for example inputs (latency); the graph gives names and order.
            export_result: how the graph was made (exporter, parity), when it was exported here.
        """
        path = Path(onnx_path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX file not found: {path}")
        opt = cls(None, preprocessing=preprocessing, work_dir=work_dir)
        opt.onnx_path, opt.export_result = path, export_result
        return opt

    def _require_model(self, what: str) -> nn.Module:
        if self.model is None:
            raise ValueError(f"{what} needs the PyTorch model; this optimizer holds only ONNX")
        return self.model

    def _graph_inputs(self) -> list[tuple[str, str]]:
        """(name, ONNX element type) of each graph input, in order."""
        import onnxruntime as ort

        assert self.onnx_path is not None
        session = ort.InferenceSession(str(self.onnx_path), providers=["CPUExecutionProvider"])
        return [(i.name, i.type) for i in session.get_inputs()]

    # -- inputs -------------------------------------------------------------------------

    @property
    def is_text(self) -> bool:
        if self.model_name is None and self.preprocessing is not None:
            return self.preprocessing.task_type == "text_classification"
        from dlpipe.models import model_task

        return self.model_name is not None and model_task(self.model_name) == "text_classification"

    def input_names(self) -> list[str]:
        if self.model is None and self.onnx_path is not None:
            return [name for name, _ in self._graph_inputs()]
        from dlpipe.models import input_names

        return input_names(self.model_name) if self.model_name else ["input"]

    def example_inputs(
        self, batch_size: int, input_shape: Sequence[int] | None = None
    ) -> tuple[torch.Tensor, ...]:
        """Inputs in forward order: from `input_shape` (images) or the model registry."""
        if input_shape is not None:
            return (torch.randn(batch_size, *tuple(input_shape)[1:]),)
        if self.model is None and self.onnx_path is not None and self.preprocessing is not None:
            return self._graph_example_inputs(batch_size)
        if self.model_name is None or self.preprocessing is None:
            raise ValueError("give input_shape, or model_name and preprocessing, to build inputs")
        from dlpipe.models import example_inputs

        return example_inputs(self.model_name, batch_size, self.preprocessing)

    def _graph_example_inputs(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        """Inputs in the ONNX graph's own order, shaped as the preprocessing produces them:
        token ids and an all-ones mask for int64 inputs, random images for float ones."""
        assert self.preprocessing is not None
        pre = self.preprocessing
        length = pre.max_sequence_length or 128
        h, w = pre.image_size or (28, 28)
        out = []
        for name, kind in self._graph_inputs():
            if "int" in kind:
                if "mask" in name:
                    out.append(torch.ones(batch_size, length, dtype=torch.long))
                else:
                    out.append(torch.randint(1, 1000, (batch_size, length), dtype=torch.long))
            else:
                out.append(torch.randn(batch_size, pre.channels or 1, h, w))
        return tuple(out)

    # -- design interface ---------------------------------------------------------------

    def export_onnx(
        self, output_path: str | Path, input_shape: Sequence[int] | None = None
    ) -> ExportResult:
        """Export with dynamic axes, check the graph and ORT/PyTorch parity.

        Args:
            input_shape: e.g. (1, 3, 224, 224) for an image model without a registry name;
                the batch entry is ignored (the batch axis is dynamic).

        Raises:
            ExportError: lists unsupported operators; `self.model` stays usable.
        """
        model = self._require_model("ONNX export")
        if input_shape is None and self.model_name and self.preprocessing:
            from dlpipe.optimize.onnx_export import export_architecture

            result = export_architecture(
                model, self.model_name, self.preprocessing, output_path, self.opset,
                self.exporter,
            )  # fmt: skip
        else:
            example = self.example_inputs(2, input_shape)
            result = export_onnx(
                model, example, output_path, self.input_names(), opset=self.opset,
                exporter=self.exporter,
            )  # fmt: skip
        self.onnx_path, self.export_result = result.path, result
        return result

    def fp32_onnx(self) -> Path:
        """The FP32 ONNX file, exported on first use."""
        if self.onnx_path is None:
            self.export_onnx(self.work_dir / "model.fp32.onnx")
        assert self.onnx_path is not None
        return self.onnx_path

    def quantize(
        self,
        precision: str,
        output_path: str | Path | None = None,
        calibration_inputs: Iterable[Any] | None = None,
        **options: Any,
    ) -> QuantizationResult:
        """An `int8` or `fp16` ONNX variant of the model.

        int8: static QDQ calibrated on `calibration_inputs` for image models; dynamic for text
        models (or when no calibration inputs are given). fp16: half-precision weights, float32
        inputs and outputs.
        """
        source = self.fp32_onnx()
        out = Path(output_path or self.work_dir / f"model.{precision}.onnx")
        if precision == "fp16":
            return convert_fp16(source, out, **options)
        if precision != "int8":
            raise ValueError(f"precision must be 'int8' or 'fp16', not {precision!r}")
        if self.is_text or calibration_inputs is None:
            return quantize_int8_dynamic(source, out, **options)
        return quantize_int8_static(source, out, calibration_inputs, **options)

    def prune(
        self,
        sparsity: float,
        method: PruneMethod = "unstructured",
        finetune_batches: Iterable[Any] | None = None,
        finetune_epochs: int = 0,
    ) -> tuple[nn.Module, PruneReport]:
        """A pruned copy of the model (permanent zeros), optionally fine-tuned briefly."""
        pruned, report = prune_model(self._require_model("pruning"), sparsity, method)
        if finetune_batches is not None and finetune_epochs > 0:
            finetune_pruned(pruned, finetune_batches, epochs=finetune_epochs)
            report.finetune_epochs = finetune_epochs
        return pruned, report

    def optimize_tensorrt(
        self, onnx_path: str | Path, output_path: str | Path, precision: TrtPrecision = "fp16"
    ) -> TensorRTResult:
        """A TensorRT engine, or a result whose `reason` is the one-line skip message."""
        return build_tensorrt_engine(onnx_path, output_path, precision)

    def validate_accuracy(
        self, original_model: ModelLike, optimized_model: ModelLike, test_loader: Iterable[Any]
    ) -> AccuracyReport:
        """Both accuracies on `test_loader` and the drop (design: returns the comparison)."""
        return validate_accuracy(original_model, optimized_model, test_loader)
