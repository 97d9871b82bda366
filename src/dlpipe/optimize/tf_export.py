"""ONNX export of a Keras package (framework `tensorflow`) with tf2onnx, checked like PyTorch's.

    result = export_keras_package("registry/model", "out/model.onnx", parity_inputs=[images])
    result.max_abs_diff     # |ONNX Runtime - Keras| on the parity inputs

tf2onnx converts a `tf.function` with an input signature (Keras 3 models break its
`from_keras`), in a TensorFlow subprocess (`dlpipe.models.keras_runner`) that also computes the
Keras logits of the parity inputs. Here the graph passes `onnx.checker` and ONNX Runtime must
match those logits within `atol + rtol * |keras|`. Input names follow the catalogue (`input`, or
`input_ids` + `attention_mask`), the output is `logits`, the batch axis (and the sequence axis
of text) is dynamic: the file is a drop-in for the INT8/FP16 and serving paths.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx

from dlpipe.models.keras import KERAS_FILE
from dlpipe.models.keras_runner import Inputs, KerasRunnerError, keras_to_onnx
from dlpipe.optimize.onnx_export import (
    ExportError,
    ExportResult,
    ParityError,
    make_session,
    publish_onnx,
)
from dlpipe.tracking.package import load_package_config


def task_input_names(task_type: str) -> list[str]:
    """The ONNX input names serving feeds for a task (docs/architecture.md, Models)."""
    if task_type == "text_classification":
        return ["input_ids", "attention_mask"]
    return ["input"]


def default_parity_inputs(
    input_names: Sequence[str], shape: Sequence[int], seed: int = 0
) -> list[Inputs]:
    """Two random batches (sizes 1 and 3); text gets two lengths and a padded row."""
    rng = np.random.default_rng(seed)
    if list(input_names) == ["input_ids", "attention_mask"]:
        length = int(shape[0]) if shape and shape[0] else 16
        batches: list[Inputs] = []
        for batch, size in ((1, length), (3, max(2, length // 2))):
            ids = rng.integers(1, 100, (batch, size)).astype(np.int64)  # within any vocabulary
            mask = np.ones_like(ids)
            mask[-1, size // 2 :] = 0
            batches.append({"input_ids": ids, "attention_mask": mask})
        return batches
    return [
        {input_names[0]: rng.standard_normal((batch, *shape)).astype(np.float32)}
        for batch in (1, 3)
    ]


def check_keras_parity(
    onnx_path: str | Path,
    batches: Sequence[Inputs],
    expected: Sequence[np.ndarray],
    atol: float = 1e-4,
    rtol: float = 1e-3,
) -> float:
    """Largest |ORT - Keras| over the batches; raises `ParityError` beyond atol + rtol*|keras|."""
    session = make_session(onnx_path)
    names = [i.name for i in session.get_inputs()]
    worst = 0.0
    for batch, want in zip(batches, expected, strict=True):
        feeds = batch if isinstance(batch, dict) else {names[0]: batch}
        got = np.asarray(session.run(None, {n: feeds[n] for n in names})[0])
        if got.shape != want.shape:
            raise ParityError(f"ONNX output shape {got.shape} != Keras {want.shape}")
        diff = np.abs(got - want)
        worst = max(worst, float(diff.max(initial=0.0)))
        if not np.all(diff <= atol + rtol * np.abs(want)):
            raise ParityError(
                f"ONNX Runtime differs from Keras by up to {worst:.3g} "
                f"(tolerance atol={atol}, rtol={rtol})"
            )
    return worst


def export_keras(
    keras_path: str | Path,
    output_path: str | Path,
    input_names: Sequence[str],
    parity_inputs: Sequence[Inputs],
    opset: int = 18,
    atol: float = 1e-4,
    rtol: float = 1e-3,
) -> ExportResult:
    """Export a `.keras` file; the ONNX file reaches `output_path` only if it passed the checks.

    Raises:
        ExportError: tf2onnx failed or the graph failed `onnx.checker`.
        ParityError: ONNX Runtime differs from Keras beyond the tolerance.
    """
    result, _ = _export(keras_path, output_path, input_names, parity_inputs, (), opset, atol, rtol)
    return result


def _export(
    keras_path: str | Path,
    output_path: str | Path,
    input_names: Sequence[str],
    parity_inputs: Sequence[Inputs],
    predict_inputs: Sequence[Inputs],
    opset: int,
    atol: float,
    rtol: float,
) -> tuple[ExportResult, list[np.ndarray]]:
    """`export_keras`, and the Keras logits of `predict_inputs` from the same TensorFlow process
    (each TensorFlow start costs seconds)."""
    final = Path(output_path)
    final.parent.mkdir(parents=True, exist_ok=True)
    batches = [*parity_inputs, *predict_inputs]
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=".export-") as staging:
        staged = Path(staging) / final.name
        try:
            logits = keras_to_onnx(keras_path, staged, opset=opset, parity_inputs=batches)
            onnx.checker.check_model(str(staged), full_check=True)
        except (KerasRunnerError, onnx.checker.ValidationError) as err:
            raise ExportError(f"tf2onnx export of {keras_path} failed: {err}") from err
        graph = onnx.load(str(staged), load_external_data=False).graph
        graph_inputs = [i.name for i in graph.input]
        if graph_inputs != list(input_names):
            raise ExportError(f"exported inputs {graph_inputs} != expected {list(input_names)}")
        expected = logits[: len(parity_inputs)]
        diff = check_keras_parity(staged, parity_inputs, expected, atol, rtol)
        publish_onnx(staged, final)
    size = round(final.stat().st_size / 1e6, 4)
    result = ExportResult(final, "tf2onnx", opset, list(input_names), diff, size)
    return result, logits[len(parity_inputs) :]


def export_keras_package(
    package_dir: str | Path,
    output_path: str | Path,
    parity_inputs: Sequence[Inputs] | None = None,
    opset: int | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-3,
) -> ExportResult:
    """Export a registered Keras package (`model.keras` + `config.yaml`) to ONNX.

    The graph's inputs are the serving contract's names for the task (`input`, or
    `input_ids` + `attention_mask`), also for an imported Keras model whose own input is named
    otherwise: serving and the quantizers feed by these names.

    Args:
        parity_inputs: preprocessed batches (e.g. 100 test images); default: two random ones.
        opset: default the package config's `optimize.opset`.
    """
    result, _ = export_and_predict(package_dir, output_path, parity_inputs, (), opset, atol, rtol)
    return result


def export_and_predict(
    package_dir: str | Path,
    output_path: str | Path,
    parity_inputs: Sequence[Inputs] | None,
    predict_inputs: Sequence[Inputs],
    opset: int | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-3,
) -> tuple[ExportResult, list[np.ndarray]]:
    """`export_keras_package`, and the Keras logits of each `predict_inputs` batch computed by
    the same TensorFlow process (`dlpipe optimize`: the parent's predictions on the test set)."""
    package = Path(package_dir)
    keras_path = package / KERAS_FILE
    if not keras_path.is_file():
        raise FileNotFoundError(f"{package} has no {KERAS_FILE} (not a tensorflow package)")
    cfg = load_package_config(package)
    names = task_input_names(cfg.preprocessing.task_type)
    if parity_inputs is None:
        pre = cfg.preprocessing
        if pre.task_type == "text_classification":
            shape: list[int] = [pre.max_sequence_length or 16]
        else:
            assert pre.image_size is not None
            shape = [pre.channels or 1, *pre.image_size]
        parity_inputs = default_parity_inputs(names, shape)
    return _export(
        keras_path,
        output_path,
        names,
        parity_inputs,
        predict_inputs,
        opset or cfg.optimize.opset,
        atol,
        rtol,
    )
