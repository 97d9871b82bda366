"""Test helper: which precision an ONNX file stores its weights in (design Property 9).

A *weight* is a stored tensor (initializer or Constant) that feeds the weight input of a
weight-bearing op: Conv/ConvTranspose kernels, Gemm/MatMul matrices, Gather embedding tables,
and their quantized forms (QLinearConv, MatMulInteger, ...), looked up through the
DequantizeLinear/Transpose/Cast that may sit in between. Biases, normalization parameters and
quantization scales are not weights: in INT8 models they legitimately stay float32 (dynamic) or
become int32 (static bias). FP16 is stricter: every floating tensor stored must be float16.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import onnx
from onnx import TensorProto

_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}
_INT8_TYPES = {TensorProto.INT8, TensorProto.UINT8}
# op type -> input positions that hold weights
WEIGHT_INPUTS: dict[str, tuple[int, ...]] = {
    "Conv": (1,),
    "ConvTranspose": (1,),
    "Gemm": (0, 1),
    "MatMul": (0, 1),
    "Gather": (0,),
    "QLinearConv": (3,),
    "QLinearMatMul": (0, 3),
    "QGemm": (0, 3),
    "ConvInteger": (1,),
    "MatMulInteger": (0, 1),
    "DynamicQuantizeMatMul": (1,),
    "MatMulIntegerToFloat": (0, 1),
    "Attention": (1,),
    "QAttention": (1,),
    "EmbedLayerNormalization": (2, 3, 4),
}
_PASS_THROUGH = {"DequantizeLinear", "Transpose", "Cast", "Identity", "Reshape"}


def _stored_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Initializers and Constant-node values, in subgraphs too."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Constant" and attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _stored_tensors(attr.g)
            for sub in attr.graphs:
                yield from _stored_tensors(sub)


def _load(model: str | Path | onnx.ModelProto) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    return onnx.load(str(model), load_external_data=False)


def _weights(graph: onnx.GraphProto) -> list[onnx.TensorProto]:
    stored = {t.name: t for t in _stored_tensors(graph) if t.name}
    for node in graph.node:  # Constant nodes are stored under their output name
        if node.op_type == "Constant" and node.attribute and node.attribute[0].type == 4:
            stored[node.output[0]] = node.attribute[0].t
    producer = {out: node for node in graph.node for out in node.output}
    found: dict[str, onnx.TensorProto] = {}
    for node in graph.node:
        for pos in WEIGHT_INPUTS.get(node.op_type, ()):
            if pos >= len(node.input):
                continue
            name = node.input[pos]
            for _ in range(3):  # follow DequantizeLinear / Transpose / Cast back to storage
                if name in stored or name not in producer:
                    break
                prev = producer[name]
                if prev.op_type not in _PASS_THROUGH or not prev.input:
                    break
                name = prev.input[0]
            tensor = stored.get(name)
            if tensor is not None and tensor.data_type in _FLOAT_TYPES | _INT8_TYPES:
                found[name] = tensor
    return list(found.values())


def weight_dtypes(model: str | Path | onnx.ModelProto) -> dict[str, str]:
    """Name -> ONNX dtype name of every weight (see module docstring)."""
    return {t.name: TensorProto.DataType.Name(t.data_type) for t in _weights(_load(model).graph)}


def float_tensor_dtypes(model: str | Path | onnx.ModelProto) -> dict[str, str]:
    """Name -> dtype name of every stored floating-point tensor."""
    return {
        t.name or f"<constant {i}>": TensorProto.DataType.Name(t.data_type)
        for i, t in enumerate(_stored_tensors(_load(model).graph))
        if t.data_type in _FLOAT_TYPES
    }


def precision_violations(model: str | Path | onnx.ModelProto, precision: str) -> list[str]:
    """Tensors not stored in `precision` ("int8" or "fp16"); empty when the claim holds.

    int8: every weight is int8/uint8. fp16: every weight and every other stored floating
    tensor is float16. A file without any weight fails too (an empty claim is not a valid one).
    """
    graph = _load(model).graph
    weights = _weights(graph)
    if precision == "int8":
        bad = [t for t in weights if t.data_type not in _INT8_TYPES]
    elif precision == "fp16":
        floats = [t for t in _stored_tensors(graph) if t.data_type in _FLOAT_TYPES]
        bad = [t for t in [*weights, *floats] if t.data_type != TensorProto.FLOAT16]
    else:
        raise ValueError(f"precision must be 'int8' or 'fp16', not {precision!r}")
    out = sorted({f"{t.name}: {TensorProto.DataType.Name(t.data_type)}" for t in bad})
    if not weights:
        out.append("no weights found")
    return out
