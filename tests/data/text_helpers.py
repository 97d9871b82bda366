"""Tiny text-model packages for tests: a hand-built ONNX graph, no weights from anywhere.

The graph's logits are `[0.25 * tokens, 1.0]` (tokens = attention_mask.sum()), so a response's
probabilities tell how many tokens the server's tokenizer produced.
"""

from __future__ import annotations

import math
from pathlib import Path

from dlpipe.config import PipelineConfig
from dlpipe.tracking.metadata import ModelMetadata, utc_now
from dlpipe.tracking.package import save_model_package

CLASS_NAMES = ["short", "long"]


def write_text_onnx(path: Path) -> Path:
    """input_ids, attention_mask (int64 N×L) -> logits (float32 N×2) = [0.25 * Σmask, 1]."""
    import onnx
    from onnx import TensorProto, helper

    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])
    consts = [
        helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
        helper.make_tensor("scale", TensorProto.FLOAT, [], [0.25]),
        helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
        helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
    ]
    nodes = [
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["maskf", "axes"], ["count"], keepdims=1),  # N×1
        helper.make_node("Mul", ["count", "scale"], ["first"]),
        # input_ids must be a graph input the server feeds: 0 * Σids keeps it in the graph.
        helper.make_node("Cast", ["input_ids"], ["idsf"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["idsf", "axes"], ["idsum"], keepdims=1),
        helper.make_node("Mul", ["idsum", "zero"], ["nothing"]),
        helper.make_node("Add", ["nothing", "one"], ["second"]),
        helper.make_node("Concat", ["first", "second"], ["logits"], axis=1),
    ]
    graph = helper.make_graph(nodes, "text", [ids, mask], [logits], initializer=consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def write_embedding_onnx(path: Path, vocab: int) -> Path:
    """input_ids, attention_mask -> logits = Σ_t mask_t * E[ids_t] with a random [vocab, 2] table.

    Like a real text model it looks token ids up in a table, so an id outside the vocabulary
    makes ONNX Runtime fail for the whole batch it is in.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])
    table = np.random.default_rng(0).standard_normal((vocab, 2)).astype(np.float32)
    consts = [
        numpy_helper.from_array(table, "table"),
        helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
        helper.make_tensor("last", TensorProto.INT64, [1], [-1]),
    ]
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["emb"], axis=0),  # N×L×2
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "last"], ["mask3"]),
        helper.make_node("Mul", ["emb", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axes"], ["logits"], keepdims=0),
    ]
    graph = helper.make_graph(nodes, "embed", [ids, mask], [logits], initializer=consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def make_text_package(
    root: Path, tokenizer: str | Path, length: int = 12, embedding: bool = False
) -> Path:
    """An ONNX-only text package whose config names `tokenizer` (it gets a tokenizer.json).

    `embedding`: the graph looks ids up in a table (`write_embedding_onnx`) instead of counting.
    """
    root.mkdir(parents=True, exist_ok=True)
    cfg = PipelineConfig.model_validate(
        {
            "model": {"name": "minilm", "num_classes": 2},
            "preprocessing": {
                "task_type": "text_classification",
                "image_size": None,
                "channels": None,
                "normalization_mean": None,
                "normalization_std": None,
                "tokenizer_name": str(tokenizer),
                "max_sequence_length": length,
                "class_names": CLASS_NAMES,
            },
        }
    )
    meta = ModelMetadata(
        model_name="text",
        framework="onnx",
        precision="fp32",
        model_size_mb=0.0,
        training_date=utc_now(),
        accuracy_metrics={"val/acc": 0.5},
        preprocessing_config=cfg.preprocessing,
        version="1",
    )
    if embedding:
        from dlpipe.data import DataPreprocessor

        vocab = DataPreprocessor(cfg.preprocessing).vocab_size
        onnx_path = write_embedding_onnx(root / "text-tmp.onnx", vocab)
    else:
        onnx_path = write_text_onnx(root / "text-tmp.onnx")
    return save_model_package(root / "text-pkg", cfg, meta, onnx_path=onnx_path)


def long_probability(tokens: int) -> float:
    """P("long") the graph gives for `tokens` real tokens (rounded as the server rounds)."""
    return round(1.0 / (1.0 + math.exp(0.25 * tokens - 1.0)), 6)
