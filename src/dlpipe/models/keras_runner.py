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

MODEL may also be a SavedModel directory (its `serving_default` signature, one output): what
`dlpipe import` converts. `python -m dlpipe.models.keras_runner serve MODEL.keras` is the
long-lived variant the server uses (`dlpipe.serving.keras_engine`): frames of arrays on
stdin/stdout (`encode_frame`, `read_frame`), one reply per request, until stdin closes.

Exported graphs and the serve worker name their inputs as serving feeds them (`input` for a
one-input model, whatever Keras called it; `input_ids` and `attention_mask` in that order for
text), so an imported Keras model fits the same contract as a catalogue one.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
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


def save_batches(path: Path, batches: Sequence[Inputs]) -> None:
    """Batches as the runner reads them: `"<i>:<input name>"` ("" for a lone array)."""
    arrays: dict[str, np.ndarray] = {}
    for i, batch in enumerate(batches):
        items = batch.items() if isinstance(batch, dict) else [("", batch)]
        for name, value in items:
            arrays[f"{i}:{name}"] = np.ascontiguousarray(value)
    np.savez(path, allow_pickle=False, **arrays)


def load_batches(path: Path) -> list[dict[str, np.ndarray]]:
    """What `save_batches` wrote (or the runner's replies): one dict of arrays per batch."""
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
        save_batches(src, batches)
        _call(["predict", str(model_path), str(src), str(dst)], timeout)
        logits = [b["logits"] for b in load_batches(dst)]
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
        save_batches(src, list(parity_inputs))
        args = ["export", str(model_path), str(onnx_path), str(opset), str(src), str(dst)]
        _call(args, timeout)
        return [b["logits"] for b in load_batches(dst)] if parity_inputs else []


# -- frames: arrays over a pipe (both sides; numpy only) -----------------------------------

_COUNT = struct.Struct("<I")  # arrays in a frame
_NAME = struct.Struct("<I")  # bytes of one array's name
_SIZE = struct.Struct("<Q")  # bytes of one array's np.save payload
MAX_FRAME_ARRAYS = 64


def encode_frame(arrays: dict[str, np.ndarray]) -> bytes:
    """Named arrays as one frame: count, then per array its name and its `np.save` bytes, each
    length-prefixed (no pickles: `allow_pickle=False` on both sides)."""
    parts = [_COUNT.pack(len(arrays))]
    for name, value in arrays.items():
        buf = io.BytesIO()
        np.save(buf, np.asarray(value), allow_pickle=False)
        payload, label = buf.getvalue(), name.encode()
        parts += [_NAME.pack(len(label)), label, _SIZE.pack(len(payload)), payload]
    return b"".join(parts)


def read_frame(read_exact: Callable[[int], bytes]) -> dict[str, np.ndarray]:
    """One frame from `read_exact(n)` (which returns exactly n bytes or raises EOFError)."""
    (count,) = _COUNT.unpack(read_exact(_COUNT.size))
    if count > MAX_FRAME_ARRAYS:
        raise ValueError(f"frame claims {count} arrays; the protocol is out of step")
    out: dict[str, np.ndarray] = {}
    for _ in range(count):
        (name_len,) = _NAME.unpack(read_exact(_NAME.size))
        name = read_exact(name_len).decode()
        (size,) = _SIZE.unpack(read_exact(_SIZE.size))
        out[name] = np.load(io.BytesIO(read_exact(size)), allow_pickle=False)
    return out


def stream_reader(stream: Any) -> Callable[[int], bytes]:
    """`read_exact` over a blocking binary stream (EOFError when it ends early)."""

    def read_exact(n: int) -> bytes:
        data = stream.read(n)
        if len(data) != n:
            raise EOFError(f"stream ended after {len(data)} of {n} bytes")
        return bytes(data)

    return read_exact


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


def serving_names(own: list[str]) -> tuple[list[str], list[str]]:
    """(a model's own input names in the order served graphs take them, the names serving uses
    for them): one input becomes `input`; text inputs go in input_ids, attention_mask order."""
    if len(own) == 1:
        return list(own), ["input"]
    if set(own) == {"input_ids", "attention_mask"}:
        return ["input_ids", "attention_mask"], ["input_ids", "attention_mask"]
    return list(own), list(own)


class _Runnable:
    """A `.keras` model or a SavedModel's serving signature, called by serving input names.

    `specs[own]` is (shape without the batch axis, dtype) of each of the model's own inputs;
    `order`/`names` say how served graphs take them (`serving_names`).
    """

    def __init__(self, path: str) -> None:
        import tensorflow as tf

        if Path(path).is_dir():  # a SavedModel: its serving signature, keyword arguments
            loaded = tf.saved_model.load(path)
            if "serving_default" not in loaded.signatures:
                raise ValueError(f"{path}: the SavedModel has no serving_default signature")
            fn = loaded.signatures["serving_default"]
            arg_specs = fn.structured_input_signature[1]
            outputs = list(fn.structured_outputs)
            if len(outputs) != 1:
                raise ValueError(
                    f"{path}: the signature has outputs {outputs}; one (logits) needed"
                )
            self.own = list(arg_specs)
            self.specs = {k: (list(v.shape[1:]), v.dtype) for k, v in arg_specs.items()}
            self._keep = loaded  # the signature's variables live as long as this object
            out = outputs[0]
            self._call = lambda args: fn(**dict(zip(self.own, args, strict=True)))[out]
        else:
            model = _load(path)
            self.own = [t.name for t in model.inputs]
            self.specs = {t.name: (list(t.shape[1:]), tf.as_dtype(t.dtype)) for t in model.inputs}
            self._call = lambda args: model(args if len(args) > 1 else args[0], training=False)
        self.order, self.names = serving_names(self.own)

    def signature(self) -> list[Any]:
        """TensorSpecs of the served inputs (dynamic batch), in served order."""
        import tensorflow as tf

        return [
            tf.TensorSpec([None, *self.specs[o][0]], self.specs[o][1], name=n)
            for o, n in zip(self.order, self.names, strict=True)
        ]

    def call_served(self, args: Sequence[Any]) -> Any:
        """Logits for inputs given in served order."""
        given = dict(zip(self.order, args, strict=True))
        return self._call([given[o] for o in self.own])

    def feed(self, batch: dict[str, np.ndarray]) -> list[Any]:
        """A batch keyed by serving names (or "" / anything for a one-input model), in served
        order."""
        if len(self.names) == 1 and len(batch) == 1:  # one input: whatever the caller named it
            return [next(iter(batch.values()))]
        missing = [n for n in self.names if n not in batch]
        if missing:
            raise ValueError(f"inputs lack {missing}; the model takes {self.names}")
        return [batch[n] for n in self.names]

    def logits(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(self.call_served(self.feed(batch)), dtype=np.float32)


def _predict_all(model: _Runnable, batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {f"{i}:logits": model.logits(b) for i, b in enumerate(batches)}


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
    import tensorflow as tf
    import tf2onnx

    model = _Runnable(model_path)
    signature = model.signature()

    @tf.function(input_signature=signature)  # type: ignore[misc]
    def serve(*args: Any) -> dict[str, Any]:
        return {"logits": model.call_served(args)}

    proto, _ = tf2onnx.convert.from_function(serve, input_signature=signature, opset=int(opset))
    text = model.names == ["input_ids", "attention_mask"]
    for graph_input in proto.graph.input:
        dims = graph_input.type.tensor_type.shape.dim
        dims[0].dim_param = "batch"
        if text and len(dims) > 1:
            dims[1].dim_param = "sequence"
    proto.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    onnx.checker.check_model(proto, full_check=True)
    Path(onnx_path).parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(proto, onnx_path)
    np.savez(dst, allow_pickle=False, **_predict_all(model, load_batches(Path(src))))


def _set_threads(tf: Any) -> None:
    """The server's thread budget (DLPIPE_TF_THREADS, else OMP_NUM_THREADS), as training's."""
    threads = os.environ.get("DLPIPE_TF_THREADS") or os.environ.get("OMP_NUM_THREADS")
    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(int(threads))
        tf.config.threading.set_inter_op_parallelism_threads(1)


def _serve(model_path: str) -> None:
    """Answer frames on stdin with frames on stdout until stdin closes (the server retired the
    version, stopped, or died: a closed pipe ends this process either way).

    First frame out: `hello` (JSON: the inputs by serving name, shape and dtype). Then for each
    request frame (arrays by serving input name) one `logits` frame, or an `error` frame
    naming what was wrong with the input; the worker keeps running after an error.
    """
    # Frames own the real stdout; anything printed (TensorFlow, absl) goes to stderr instead.
    frames_out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    read_exact = stream_reader(sys.stdin.buffer)

    import tensorflow as tf

    _set_threads(tf)
    model = _Runnable(model_path)
    inputs = [
        {"name": n, "shape": ["batch", *model.specs[o][0]], "dtype": model.specs[o][1].name}
        for o, n in zip(model.order, model.names, strict=True)
    ]
    # Traced once per input signature (reduce_retracing generalizes the batch axis).
    forward = tf.function(model.call_served, reduce_retracing=True)

    def respond(request: dict[str, np.ndarray]) -> np.ndarray:
        missing = [n for n in model.names if n not in request]
        if missing:
            raise ValueError(f"request lacks inputs {missing}; the model takes {model.names}")
        return np.asarray(forward([request[n] for n in model.names]), dtype=np.float32)

    frames_out.write(encode_frame({"hello": np.array(json.dumps({"inputs": inputs}))}))
    while True:
        try:
            request = read_frame(read_exact)
        except EOFError:
            return
        try:
            reply = {"logits": respond(request)}
        except Exception as err:  # a bad input: say so and keep serving
            reply = {"error": np.array(f"{type(err).__name__}: {err}")}
        frames_out.write(encode_frame(reply))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    command, rest = (args[0], args[1:]) if args else ("", [])
    if command == "build" and len(rest) == 2:
        _build(*rest)
    elif command == "predict" and len(rest) == 3:
        model = _Runnable(rest[0])
        np.savez(rest[2], allow_pickle=False, **_predict_all(model, load_batches(Path(rest[1]))))
    elif command == "export" and len(rest) == 5:
        _export(*rest)
    elif command == "serve" and len(rest) == 1:
        _serve(rest[0])
    else:
        print(
            "usage: python -m dlpipe.models.keras_runner build PATH SPEC_JSON | "
            "predict MODEL IN.npz OUT.npz | export MODEL OUT.onnx OPSET IN.npz OUT.npz | "
            "serve MODEL",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
