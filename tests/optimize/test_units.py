"""Quantization errors, pruning, the accuracy gate, TensorRT skipping and CLI parsing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from dlpipe.optimize.accuracy import (
    AccuracyDegradationError,
    AccuracyReport,
    check_accuracy_gate,
    evaluate_accuracy,
    validate_accuracy,
)
from dlpipe.optimize.cli import main, parse_model_ref
from dlpipe.optimize.onnx_export import export_onnx, make_session
from dlpipe.optimize.prune import finetune_pruned, prune_model, weight_sparsity
from dlpipe.optimize.quantize import QuantizationError, quantize_int8_static
from dlpipe.optimize.tensorrt import build_tensorrt_engine


@pytest.fixture
def mlp_onnx(tmp_path: Path, mlp_factory: Any) -> tuple[nn.Module, Path]:
    net = mlp_factory([8, 32, 4], 0)
    result = export_onnx(
        net, (torch.randn(2, 8),), tmp_path / "m.onnx", ["input"], exporter="torchscript"
    )
    return net, result.path


def test_static_quantization_rejects_bad_calibration(mlp_onnx: Any, tmp_path: Path) -> None:
    _, src = mlp_onnx
    previous = tmp_path / "q.onnx"
    previous.write_bytes(b"an earlier quantized model")
    with pytest.raises(QuantizationError, match="at least one calibration sample"):
        quantize_int8_static(src, previous, [])
    with pytest.raises(QuantizationError, match="lacks inputs"):
        quantize_int8_static(src, previous, [{"wrong": np.zeros((1, 8), np.float32)}])
    bad_shape = [np.zeros((2, 5), np.float32)]  # the model takes 8 features
    with pytest.raises(QuantizationError, match="static INT8 quantization"):
        quantize_int8_static(src, previous, bad_shape)
    assert previous.read_bytes() == b"an earlier quantized model"  # nothing stored is lost
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "q.onnx"]


def test_cnn_with_batchnorm_quantizes_with_bn_folded(tmp_path: Path, cnn_factory: Any) -> None:
    import onnx

    net = cnn_factory(1, 8, 8, 3, 0)
    example = (torch.randn(2, 1, 8, 8),)
    src = export_onnx(net, example, tmp_path / "c.onnx", ["input"], exporter="torchscript").path
    calib = [np.random.default_rng(0).standard_normal((16, 1, 8, 8)).astype(np.float32)]
    out = quantize_int8_static(src, tmp_path / "c8.onnx", calib)
    ops = {n.op_type for n in onnx.load(str(out.path)).graph.node}
    assert "BatchNormalization" not in ops and "QuantizeLinear" in ops
    assert out.settings["preprocess"] in ("full", "no-symbolic")


@pytest.mark.parametrize("method", ["unstructured", "structured"])
@pytest.mark.parametrize("sparsity", [0.3, 0.7])
def test_pruning_reaches_the_target_and_is_permanent(
    cnn_factory: Any, method: Any, sparsity: float
) -> None:
    net = cnn_factory(1, 16, 8, 4, 0)
    before = [p.clone() for p in net.parameters()]
    pruned, report = prune_model(net, sparsity, method)  # type: ignore[arg-type]
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
    # Permanent: no masks or re-parametrization left, zeros live in the plain weights.
    assert not any(n.endswith(("_orig", "_mask")) for n, _ in pruned.named_parameters())
    assert not any(n.endswith("_mask") for n, _ in pruned.named_buffers())
    zero, total = weight_sparsity(pruned)
    assert report.zero_weights == zero and report.total_weights == total
    if method == "unstructured":
        assert abs(report.sparsity - sparsity) < 0.01
    else:  # whole output channels of every layer but the classifier
        conv = pruned.features[0].weight.detach()
        dead = (conv.flatten(1).abs().sum(1) == 0).sum().item()
        assert dead == round(sparsity * conv.shape[0])
        assert 0 < report.sparsity < sparsity + 0.01


def test_finetune_keeps_pruned_weights_at_zero(mlp_factory: Any) -> None:
    pruned, _ = prune_model(mlp_factory([8, 32, 4], 0), 0.6)
    zeros = [(m.weight == 0).clone() for m in pruned.modules() if isinstance(m, nn.Linear)]
    batches = [(torch.randn(16, 8), torch.randint(0, 4, (16,))) for _ in range(5)]
    finetune_pruned(pruned, batches, epochs=2, learning_rate=1e-2)
    after = [m.weight for m in pruned.modules() if isinstance(m, nn.Linear)]
    assert all(bool((w[z] == 0).all()) for w, z in zip(after, zeros, strict=True))


def test_prune_rejects_bad_sparsity(mlp_factory: Any) -> None:
    with pytest.raises(ValueError, match="sparsity"):
        prune_model(mlp_factory([4, 4], 0), 1.0)


def test_accuracy_gate_refuses_a_degraded_variant(mlp_onnx: Any, tmp_path: Path) -> None:
    net, good = mlp_onnx
    x = torch.randn(300, 8)
    with torch.no_grad():
        y = net(x).argmax(1)  # labels the original gets all right
    batches = [(x[i : i + 100], y[i : i + 100]) for i in range(0, 300, 100)]
    # A broken variant: the same graph with every weight negated.
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(good))
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        init.CopyFrom(numpy_helper.from_array(-arr, init.name))
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))

    ok = validate_accuracy(net, good, batches)
    assert ok.original_accuracy == 1.0 and ok.drop == 0.0 and ok.agreement == 1.0
    check_accuracy_gate(ok, 0.0)  # an exact copy passes even with zero tolerance

    report = validate_accuracy(net, make_session(bad), batches)
    assert report.drop > 0.1
    assert evaluate_accuracy(bad, batches) == pytest.approx(report.optimized_accuracy)
    with pytest.raises(AccuracyDegradationError, match="refused: accuracy dropped"):
        check_accuracy_gate(report, 0.01)


def test_gate_boundary_is_inclusive() -> None:
    report = AccuracyReport(0.90, 0.89, 100, 0.99)
    check_accuracy_gate(report, 0.01)
    with pytest.raises(AccuracyDegradationError):
        check_accuracy_gate(report, 0.009)


def test_tensorrt_without_gpu_is_skipped_in_one_line(
    mlp_onnx: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the skip path does not apply")
    _, src = mlp_onnx
    for precision in ("fp16", "int8"):
        result = build_tensorrt_engine(src, tmp_path / "m.plan", precision)  # type: ignore[arg-type]
        assert result.skipped and result.engine_path is None
        assert result.reason.startswith("tensorrt skipped:") and "\n" not in result.reason
    assert not (tmp_path / "m.plan").exists()


def test_tensorrt_missing_package_is_skipped(
    mlp_onnx: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import builtins
    import sys

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU we cannot have here
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    real_import = builtins.__import__

    def no_tensorrt(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "tensorrt":
            raise ImportError("No module named 'tensorrt'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorrt)
    result = build_tensorrt_engine(mlp_onnx[1], tmp_path / "m.plan")
    assert result.skipped and "tensorrt package is not installed" in result.reason


@pytest.mark.parametrize(
    ("ref", "expected"),
    [("cnn", ("cnn", None)), ("cnn@champion", ("cnn", "champion")), ("cnn:3", ("cnn", "3"))],
)
def test_model_reference_parsing(ref: str, expected: tuple[str, str | None]) -> None:
    assert parse_model_ref(ref) == expected


def test_cli_bad_input_is_one_usage_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cnn:1", "--targets", "onnx,int4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "int4" in err[0] and "'onnx', 'int8'" in err[0]
    assert main(["cnn:x:y"]) == 2
    assert "NAME@alias" in capsys.readouterr().err
    assert main(["cnn:1", "--max-accuracy-drop", "1.5"]) == 2
    assert "--max-accuracy-drop" in capsys.readouterr().err


def test_model_optimizer_design_interface(tmp_path: Path, cnn_factory: Any) -> None:
    from weight_precision import precision_violations

    from dlpipe.optimize.optimizer import ModelOptimizer

    net = cnn_factory(1, 8, 8, 3, 0)
    opt = ModelOptimizer(net, work_dir=tmp_path, exporter="torchscript")
    exported = opt.export_onnx(tmp_path / "m.onnx", input_shape=(1, 1, 8, 8))
    assert exported.path.is_file() and exported.max_abs_diff < 1e-4
    calib = [np.random.default_rng(0).standard_normal((16, 1, 8, 8)).astype(np.float32)]
    int8 = opt.quantize("int8", calibration_inputs=calib)
    fp16 = opt.quantize("fp16")
    assert int8.settings["method"] == "static" and precision_violations(int8.path, "int8") == []
    assert precision_violations(fp16.path, "fp16") == []
    with pytest.raises(ValueError, match="int8' or 'fp16"):
        opt.quantize("int4")
    x = torch.randn(64, 1, 8, 8)
    batches = [(x, net(x).argmax(1).detach())]
    report = opt.validate_accuracy(net, int8.path, batches)
    assert report.original_accuracy == 1.0 and report.drop < 0.1
    if not torch.cuda.is_available():
        assert opt.optimize_tensorrt(exported.path, tmp_path / "m.plan").skipped
