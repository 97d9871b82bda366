"""ONNX export: contract names and axes, the failure path, and MiniLM parity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from dlpipe.config import PreprocessingConfig
from dlpipe.models import create_model
from dlpipe.optimize.onnx_export import (
    ExportError,
    export_architecture,
    export_onnx,
    make_session,
    unsupported_ops_from_error,
)


@torch.library.custom_op("dlpipetest::mystery_scale", mutates_args=())
def mystery_scale(x: torch.Tensor) -> torch.Tensor:
    """An operator no ONNX exporter knows."""
    return x * 2


@mystery_scale.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class _Unexportable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mystery_scale(self.linear(x))


def test_failed_export_names_the_operator_and_leaves_the_model_usable(tmp_path: Path) -> None:
    net = _Unexportable().train()  # in training mode, which must be restored afterwards
    x = torch.randn(3, 4)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ExportError) as info:
        export_onnx(net, (torch.randn(2, 4),), tmp_path / "m.onnx", ["input"])
    err = info.value
    assert any("mystery_scale" in op for op in err.unsupported_ops), err.unsupported_ops
    assert "mystery_scale" in str(err)
    assert list(tmp_path.iterdir()) == []  # no half-written graph left behind
    # The design's fallback: the PyTorch model is untouched and still serves.
    assert net.training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    with torch.no_grad():
        out = net.eval()(x)
    assert torch.allclose(out, net.linear(x) * 2)


def test_unsupported_ops_are_found_through_chained_errors() -> None:
    inner = RuntimeError("No ONNX function found for aten::fancy_op")
    outer = RuntimeError("conversion failed")
    outer.__cause__ = inner
    assert unsupported_ops_from_error(outer) == ["aten::fancy_op"]


def test_registry_cnn_exports_with_contract_names_and_dynamic_batch(tmp_path: Path) -> None:
    pre = PreprocessingConfig()  # Fashion-MNIST: 1x28x28
    net = create_model("simple_cnn", 10, 1, width=8)
    result = export_architecture(net, "simple_cnn", pre, tmp_path / "cnn.onnx")
    model = onnx.load(str(result.path))
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["logits"]
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # symbolic, not fixed
    assert not (tmp_path / "cnn.onnx.data").exists()  # weights kept inside the file
    assert result.max_abs_diff < 1e-4
    session = make_session(result.path)
    for batch in (1, 7):
        x = np.random.default_rng(batch).standard_normal((batch, 1, 28, 28)).astype(np.float32)
        assert session.run(None, {"input": x})[0].shape == (batch, 10)


def test_minilm_exports_with_dynamic_sequence_and_keeps_parity(tmp_path: Path) -> None:
    pre = PreprocessingConfig(
        task_type="text_classification", tokenizer_name="minilm", max_sequence_length=32,
        image_size=None, channels=None, normalization_mean=None, normalization_std=None,
    )  # fmt: skip
    net = create_model("minilm", 2, pretrained=True).eval()
    result = export_architecture(net, "minilm", pre, tmp_path / "minilm.onnx")
    assert result.input_names == ["input_ids", "attention_mask"]
    assert result.max_abs_diff < 1e-4
    session = make_session(result.path)
    # A sequence length and padding pattern the export never saw.
    ids = torch.randint(1, 30000, (2, 45))
    mask = torch.ones(2, 45, dtype=torch.long)
    mask[1, 20:] = 0
    with torch.no_grad():
        expected = net(ids, mask).numpy()
    got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-3)


def test_failed_export_keeps_an_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous good model")
    with pytest.raises(ExportError):
        export_onnx(
            _Unexportable(), (torch.randn(2, 4),), target, ["input"], exporter="torchscript"
        )
    assert target.read_bytes() == b"previous good model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
