"""Run Keras models from a process that must not load TensorFlow (it may have torch loaded).

    path = keras_build("keras_cnn", "m.keras", num_classes=10, seed=0)        # random init
    logits = keras_predict("m.keras", images)                                  # N×K float32
    logits = keras_predict("m.keras", {"input_ids": ids, "attention_mask": mask})
    keras_to_onnx("m.keras", "m.onnx", opset=18, parity_inputs=[{"input": x}])

Each call starts `python -m dlpipe.models.keras_runner COMMAND ...` (a few seconds: importing
TensorFlow dominates) and exchanges arrays through `.npz` files. `import tensorflow` followed by
`import torchvision` crashes a process, so TensorFlow work never happens in the caller. Models
trained under mixed precision run and export in float32 (ONNX Runtime's CPU kernels have
little bfloat16 support); their weights are float32 anyway.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

Inputs = np.ndarray | dict[str, np.ndarray]


class KerasRunnerError(RuntimeError):
    """The TensorFlow subprocess failed; the message carries the end of its output."""


def _call(args: list[str], timeout: float | None) -> None:
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.pop("TF_CONFIG", None)  # a leftover cluster spec would make TensorFlow wait for peers
    done = subprocess.run(
        [sys.executable, "-m", "dlpipe.models.keras_runner", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        tail = "\n  ".join((done.stdout + done.stderr).strip().splitlines()[-20:])
        raise KerasRunnerError(f"keras_runner {args[0]} failed ({done.returncode}):\n  {tail}")


def _save_batches(path: Path, batches: Sequence[Inputs]) -> None:
    arrays: dict[str, np.ndarray] = {}
    for i, batch in enumerate(batches):
        items = batch.items() if isinstance(batch, dict) else [("", batch)]
        for name, value in items:
            arrays[f"{i}:{name}"] = np.ascontiguousarray(value)
    np.savez(path, allow_pickle=False, **arrays)


def _load_batches(path: Path) -> list[dict[str, np.ndarray]]:
    out: dict[int, dict[str, np.ndarray]] = {}
    with np.load(path) as data:
        for key in data.files:
            index, _, name = key.partition(":")
            out.setdefault(int(index), {})[name] = data[key]
    return [out[i] for i in sorted(out)]


def keras_build(
    name: str,
    path: str | Path,
    num_classes: int,
    in_channels: int = 1,
    *,
    seed: int = 0,
    timeout: float | None = 300,
    **kwargs: Any,
) -> Path:
    """Build catalogue architecture `name` with random weights (seeded) and save it as `.keras`."""
    spec = {"name": name, "num_classes": num_classes, "in_channels": in_channels, "seed": seed}
    _call(["build", str(path), json.dumps({**spec, "kwargs": kwargs})], timeout)
    return Path(path)


def keras_predict(
    model_path: str | Path, inputs: Inputs | Sequence[Inputs], *, timeout: float | None = 300
) -> Any:
    """Inference-mode logits of a `.keras` model: one array per batch given (one for one)."""
    single = isinstance(inputs, np.ndarray | dict)
    batches: list[Inputs] = [inputs] if isinstance(inputs, np.ndarray | dict) else list(inputs)
    with tempfile.TemporaryDirectory(prefix="dlpipe-keras-run-") as tmp:
        src, dst = Path(tmp) / "in.npz", Path(tmp) / "out.npz"
        _save_batches(src, batches)
        _call(["predict", str(model_path), str(src), str(dst)], timeout)
        logits = [b["logits"] for b in _load_batches(dst)]
    return logits[0] if single else logits


def keras_to_onnx(
    model_path: str | Path,
    onnx_path: str | Path,
    *,
    opset: int = 18,
    parity_inputs: Sequence[Inputs] = (),
    timeout: float | None = 600,
) -> list[np.ndarray]:
    """Convert with tf2onnx (dynamic batch axis, and sequence axis for text; output `logits`).

    Returns the Keras logits of each `parity_inputs` batch, computed in the same subprocess,
    for the caller's ONNX Runtime parity check.
    """
    with tempfile.TemporaryDirectory(prefix="dlpipe-keras-run-") as tmp:
        src, dst = Path(tmp) / "in.npz", Path(tmp) / "out.npz"
        _save_batches(src, list(parity_inputs))
        args = ["export", str(model_path), str(onnx_path), str(opset), str(src), str(dst)]
        _call(args, timeout)
        return [b["logits"] for b in _load_batches(dst)] if parity_inputs else []


# -- the TensorFlow side -------------------------------------------------------------------


def _float32_model(model: Any) -> Any:
    """`model` itself, or a float32 copy when it was built under a mixed-precision policy."""
    import keras

    if all(layer.dtype_policy.name == "float32" for layer in model.layers):
        return model
    config = model.get_config()
    for layer in config["layers"]:
        layer["config"]["dtype"] = "float32"
    twin = keras.Model.from_config(config)
    twin.set_weights(model.get_weights())
    return twin


def _load(path: str) -> Any:
    import keras

    return _float32_model(keras.models.load_model(path, compile=False))


def _feed(model: Any, batch: dict[str, np.ndarray]) -> Any:
    names = [t.name for t in model.inputs]
    if set(batch) == {""}:
        return batch[""]
    missing = [n for n in names if n not in batch]
    if missing:
        raise ValueError(f"inputs lack {missing}; the model takes {names}")
    arrays = [batch[n] for n in names]
    return arrays[0] if len(arrays) == 1 else arrays


def _predict_all(model: Any, batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {
        f"{i}:logits": np.asarray(model(_feed(model, b), training=False), dtype=np.float32)
        for i, b in enumerate(batches)
    }


def _build(path: str, spec_json: str) -> None:
    import keras

    from dlpipe.models.architectures import get_architecture

    spec = json.loads(spec_json)
    keras.utils.set_random_seed(int(spec["seed"]))
    arch = get_architecture(spec["name"])
    if arch.framework != "tensorflow":
        raise ValueError(f"{arch.name!r} is a {arch.framework} model")
    model = arch.load_builder()(spec["num_classes"], spec["in_channels"], **spec["kwargs"])
    model.save(path)


def _export(model_path: str, onnx_path: str, opset: str, src: str, dst: str) -> None:
    import onnx
    import tf2onnx

    import tensorflow as tf

    model = _load(model_path)
    names = [t.name for t in model.inputs]
    signature = [tf.TensorSpec([None, *t.shape[1:]], t.dtype, name=t.name) for t in model.inputs]

    @tf.function(input_signature=signature)  # type: ignore[misc]
    def serve(*args: Any) -> dict[str, Any]:
        return {"logits": model(list(args) if len(args) > 1 else args[0], training=False)}

    proto, _ = tf2onnx.convert.from_function(serve, input_signature=signature, opset=int(opset))
    text = names == ["input_ids", "attention_mask"]
    for graph_input in proto.graph.input:
        dims = graph_input.type.tensor_type.shape.dim
        dims[0].dim_param = "batch"
        if text and len(dims) > 1:
            dims[1].dim_param = "sequence"
    proto.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    onnx.checker.check_model(proto, full_check=True)
    Path(onnx_path).parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(proto, onnx_path)
    np.savez(dst, allow_pickle=False, **_predict_all(model, _load_batches(Path(src))))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    command, rest = (args[0], args[1:]) if args else ("", [])
    if command == "build" and len(rest) == 2:
        _build(*rest)
    elif command == "predict" and len(rest) == 3:
        model = _load(rest[0])
        np.savez(rest[2], allow_pickle=False, **_predict_all(model, _load_batches(Path(rest[1]))))
    elif command == "export" and len(rest) == 5:
        _export(*rest)
    else:
        print(
            "usage: python -m dlpipe.models.keras_runner build PATH SPEC_JSON | "
            "predict MODEL IN.npz OUT.npz | export MODEL OUT.onnx OPSET IN.npz OUT.npz",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
