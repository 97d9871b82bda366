"""One TensorFlow process for the TensorFlow variant of a property test (its 100 examples).

    with KerasSession() as tf:
        tf.build("keras_cnn", path, num_classes=5, width=8)   # keras_runner build
        tf.to_onnx(path, onnx_path, parity_inputs=[x])        # keras_runner export (tf2onnx)
        logits = tf.predict(path, x)                          # keras_runner predict
        snaps = tf.train(job_dir, keep="u")                   # keras_worker.Worker on a job
        after = tf.steps({"u": base}, batches, probe)         # kept models, trained further

Each request runs the code of dlpipe's one-shot TensorFlow subprocesses in this long-lived one:
`keras_runner.main(argv)` for build / predict / export, and `keras_worker.Worker(job_dir,
0).run()` for training (a subclass that records, after each epoch's checkpoint, the live
model's variables and copies of the files it published). Starting a process and importing
TensorFlow takes seconds; a request takes tens of milliseconds to a second. The pytest process
never imports TensorFlow: it may have torch loaded (`import tensorflow` then `import
torchvision` crashes a process).

Requests and replies are `keras_runner` frames (arrays by name, a JSON header) on the child's
stdin and stdout; the child's own output goes to a log file quoted when a request fails.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dlpipe.models.keras_runner import load_batches, save_batches

HERE = Path(__file__).resolve().parent
HAVE_TENSORFLOW = all(importlib.util.find_spec(m) for m in ("tensorflow", "keras", "tf2onnx"))
FRAMEWORKS = [
    "pytorch",
    pytest.param(
        "tensorflow",
        marks=pytest.mark.skipif(
            not HAVE_TENSORFLOW, reason="tensorflow, keras, tf2onnx: pip install -e '.[tensorflow]'"
        ),
    ),
]
"""`@pytest.mark.parametrize("framework", FRAMEWORKS)`: both frameworks of a property test."""

Inputs = np.ndarray | dict[str, np.ndarray]


class KerasSessionError(RuntimeError):
    """A request failed in the TensorFlow process (the message ends with its log)."""


# -- the pytest side ----------------------------------------------------------------------


def load_arrays(path: str | Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


class KerasSession:
    """The TensorFlow process and its requests (one at a time)."""

    def __init__(self, timeout_s: float = 600.0) -> None:
        from dlpipe.models.keras_runner import read_frame, stream_reader

        self.timeout_s = timeout_s
        self.tmp = Path(tempfile.mkdtemp(prefix="dlpipe-keras-session-"))
        self.log_path = self.tmp / "session.log"
        env = dict(os.environ)
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        env.pop("TF_CONFIG", None)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve())],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=env,
            )
        assert self.proc.stdout is not None
        self._read = stream_reader(self.proc.stdout)
        self._read_frame = read_frame
        self._count = 0

    def __enter__(self) -> KerasSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace").strip().splitlines()
        return "\n  ".join(text[-lines:])

    def call(self, command: str, arrays: dict[str, np.ndarray] | None = None, **params: Any) -> Any:
        """Send one request; its JSON reply (arrays travel through files, see `train`)."""
        from dlpipe.models.keras_runner import encode_frame

        assert self.proc.stdin is not None
        request = {"request": np.array(json.dumps({"command": command, **params}))}
        try:
            self.proc.stdin.write(encode_frame({**request, **(arrays or {})}))
            self.proc.stdin.flush()
            reply = self._read_frame(self._read)
        except (OSError, EOFError) as err:
            raise KerasSessionError(
                f"the TensorFlow process died ({err}):\n  {self.log_tail()}"
            ) from None
        if "error" in reply:
            raise KerasSessionError(f"{command} failed: {reply['error']}\n  {self.log_tail()}")
        return json.loads(str(reply["reply"]))

    def scratch(self, suffix: str) -> Path:
        self._count += 1
        return self.tmp / f"{self._count}{suffix}"

    # keras_runner's commands, in this process

    def run(self, *argv: str) -> None:
        self.call("runner", argv=list(argv))

    def build(
        self,
        name: str,
        path: str | Path,
        num_classes: int,
        in_channels: int = 1,
        *,
        seed: int = 0,
        **kwargs: Any,
    ) -> Path:
        """`keras_runner.keras_build` in the session."""
        spec = {"name": name, "num_classes": num_classes, "in_channels": in_channels}
        self.run("build", str(path), json.dumps({**spec, "seed": seed, "kwargs": kwargs}))
        return Path(path)

    def predict(self, model: str | Path, inputs: Inputs | Sequence[Inputs]) -> Any:
        """`keras_runner.keras_predict` in the session: logits per batch (one for one)."""
        single = isinstance(inputs, np.ndarray | dict)
        batches = [inputs] if isinstance(inputs, np.ndarray | dict) else list(inputs)
        src, dst = self.scratch(".in.npz"), self.scratch(".out.npz")
        save_batches(src, batches)
        self.run("predict", str(model), str(src), str(dst))
        logits = [b["logits"] for b in load_batches(dst)]
        src.unlink()
        dst.unlink()
        return logits[0] if single else logits

    def to_onnx(
        self,
        model: str | Path,
        onnx_path: str | Path,
        *,
        opset: int = 18,
        parity_inputs: Sequence[Inputs] = (),
    ) -> list[np.ndarray]:
        """`keras_runner.keras_to_onnx` in the session (tf2onnx); the parity inputs' logits."""
        src, dst = self.scratch(".in.npz"), self.scratch(".out.npz")
        save_batches(src, list(parity_inputs))
        self.run("export", str(model), str(onnx_path), str(opset), str(src), str(dst))
        return [b["logits"] for b in load_batches(dst)] if parity_inputs else []

    # keras_worker.Worker in the session

    def train(self, job_dir: str | Path, keep: str | None = None) -> dict[str, Any]:
        """Run `Worker(job_dir, 0)`; what it recorded (see `SnapshotWorker`), arrays loaded.

        `keep`: hold the model (and the worker) under this key for `steps` and `save`.
        """
        reply = self.call("train", job_dir=str(job_dir), keep=keep)
        return {**reply, "arrays": load_arrays(reply["arrays"])}

    def steps(
        self,
        bases: dict[str, str],
        batches: Sequence[tuple[np.ndarray, np.ndarray]],
        probe: np.ndarray,
    ) -> dict[str, np.ndarray]:
        """Set each kept model to a recorded state, `fit` it on `batches`, one after the other
        (one optimizer step each), then record its variables and its inference logits on
        `probe`. `bases`: kept key -> recorded state (`"epoch<k>"` or `"restored"`)."""
        arrays = {"probe": probe}
        for i, (x, y) in enumerate(batches):
            arrays[f"x{i}"], arrays[f"y{i}"] = x, y
        out = self.scratch(".npz")
        self.call("steps", arrays, bases=bases, batches=len(batches), out=str(out))
        return load_arrays(out)

    def save(
        self, key: str, directory: str | Path, state: dict[str, Any], improved: bool
    ) -> dict[str, np.ndarray]:
        """The kept worker's `save_checkpoints(model, directory, state, improved)`; the kept
        model's variables at that moment."""
        out = self.scratch(".npz")
        self.call("save", key=key, directory=str(directory), state=state, improved=improved,
                  out=str(out))  # fmt: skip
        return load_arrays(out)


# -- jobs as train_keras writes them ----------------------------------------------------------


class Splits:
    """`raw_samples(split)` as the DataModule gives them (what `keras_fit.write_splits` reads)."""

    def __init__(self, samples: dict[str, list[tuple[Any, int]]]) -> None:
        self.samples = samples

    def raw_samples(self, split: str) -> list[tuple[Any, int]]:
        return self.samples[split]


def write_job(
    job_dir: Path,
    cfg: Any,
    splits: Splits,
    *,
    resume: str | Path | None = None,
    stop_after_epochs: int | None = None,
) -> Path:
    """A job directory as `keras_fit.train_keras` writes it for one worker."""
    from dlpipe.training.keras_fit import write_splits
    from dlpipe.training.keras_worker import DATA_FILE, JOB_FILE

    job_dir.mkdir(parents=True, exist_ok=True)
    write_splits(splits, job_dir / DATA_FILE)
    job = {
        "config": cfg.model_dump(mode="json"),
        "world": 1,
        "ports": [],
        "checkpoint_dir": str((job_dir / "checkpoints").resolve()),
        "resume": str(Path(resume).resolve()) if resume else None,
        "stop_after_epochs": stop_after_epochs,
    }
    (job_dir / JOB_FILE).write_text(json.dumps(job))
    return job_dir


def keras_archive(path: str | Path) -> dict[str, Any]:
    """A `.keras` file's parts, read without TensorFlow: entry names, the dlpipe state, the
    layers' arrays (h5 path -> array) and the optimizer's arrays in their saved order."""
    import h5py

    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        state = (
            json.loads(archive.read("dlpipe_state.json")) if "dlpipe_state.json" in names else None
        )
        weights = archive.read("model.weights.h5")
    layers: dict[str, np.ndarray] = {}
    optimizer: dict[int, np.ndarray] = {}
    with h5py.File(io.BytesIO(weights), "r") as h5:

        def visit(name: str, node: object) -> None:
            if not isinstance(node, h5py.Dataset):
                return
            if name.startswith("optimizer/vars/"):
                optimizer[int(name.rsplit("/", 1)[1])] = np.asarray(node)
            elif name.startswith("layers/"):
                layers[name] = np.asarray(node)

        h5.visititems(visit)
    return {
        "names": names,
        "state": state,
        "layers": layers,
        "optimizer": [optimizer[i] for i in sorted(optimizer)],
    }


def same_arrays(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> bool:
    """The same multiset of arrays (shape, dtype and every bit), in any order."""

    def key(x: np.ndarray) -> tuple[Any, ...]:
        x = np.asarray(x)
        return (x.shape, x.dtype.str, x.tobytes())

    return sorted(map(key, a)) == sorted(map(key, b))


def recorded(arrays: dict[str, np.ndarray], prefix: str, part: str) -> list[np.ndarray]:
    """`<prefix>/<part>/<i>` arrays in order (part: model, optimizer, seeds)."""
    head = f"{prefix}/{part}/"
    found = {int(k[len(head) :]): v for k, v in arrays.items() if k.startswith(head)}
    return [found[i] for i in range(len(found))]


# -- the TensorFlow side ------------------------------------------------------------------------


def _serve() -> None:  # pragma: no cover - runs in the child
    from dlpipe.models.keras_runner import encode_frame, read_frame, stream_reader

    frames_out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # prints (TensorFlow, Keras) go to the log, frames own the real stdout
    sys.stdout = sys.stderr
    read_exact = stream_reader(sys.stdin.buffer)
    import tensorflow as tf

    from dlpipe.training.keras_recipe import set_threads

    set_threads(tf, 1)  # as every worker will (a thread pool can be set only before first use)
    handler = _Handler()
    while True:
        try:
            request = read_frame(read_exact)
        except EOFError:
            return
        params = json.loads(str(request.pop("request")))
        try:
            reply = {"reply": np.array(json.dumps(handler.handle(params, request)))}
        except Exception as err:
            import traceback

            traceback.print_exc()
            reply = {"error": np.array(f"{type(err).__name__}: {err}")}
        frames_out.write(encode_frame(reply))


class _Handler:  # pragma: no cover - runs in the child
    def __init__(self) -> None:
        self.kept: dict[str, Any] = {}

    def handle(self, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> Any:
        command = params.pop("command")
        if command == "runner":
            from dlpipe.models.keras_runner import main

            code = main(params["argv"])
            if code != 0:
                raise RuntimeError(f"keras_runner {params['argv'][0]} exited with {code}")
            return {}
        if command == "train":
            return self.train(params["job_dir"], params["keep"])
        if command == "steps":
            return self.steps(params, arrays)
        if command == "save":
            return self.save(params)
        raise ValueError(f"unknown command {command!r}")

    def train(self, job_dir: str, keep: str | None) -> dict[str, Any]:
        import keras

        from dlpipe.training.keras_recipe import configure_tensorflow
        from dlpipe.training.keras_worker import JOB_FILE

        keras.mixed_precision.set_global_policy("float32")
        configure_tensorflow(json.loads((Path(job_dir) / JOB_FILE).read_text()), 0)
        worker = _snapshot_worker_class()(Path(job_dir), 0)
        worker.run()
        worker.snapshots_on = False
        if keep is not None:
            self.kept[keep] = worker
        out = Path(job_dir) / "recorded.npz"
        np.savez(out, allow_pickle=False, **worker.recorded)
        paths = [v.path for v in worker.model.variables] if worker.model is not None else []
        return {"arrays": str(out), "epochs": worker.epochs_recorded, "model_paths": paths}

    def steps(self, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        import tensorflow as tf

        out: dict[str, np.ndarray] = {}
        for key, base in params["bases"].items():
            worker = self.kept[key]
            model = worker.model
            worker.assign(model, base)
            for i in range(int(params["batches"])):
                x, y = arrays[f"x{i}"], arrays[f"y{i}"]
                data = tf.data.Dataset.from_tensor_slices((x, y)).batch(len(x))
                model.fit(data, epochs=1, shuffle=False, verbose=0)
            out.update(worker.variables(model, key))
            out[f"{key}/logits"] = np.asarray(model(arrays["probe"], training=False))
        np.savez(params["out"], allow_pickle=False, **out)
        return {}

    def save(self, params: dict[str, Any]) -> dict[str, Any]:
        worker = self.kept[params["key"]]
        target = Path(params["directory"])
        target.mkdir(parents=True, exist_ok=True)
        worker.save_checkpoints(worker.model, target, params["state"], params["improved"])
        np.savez(params["out"], allow_pickle=False, **worker.variables(worker.model, "saved"))
        return {}


def _snapshot_worker_class() -> Any:  # pragma: no cover - runs in the child
    from dlpipe.training.checksums import checksum_path
    from dlpipe.training.keras_checkpoint import BEST_CHECKPOINT, LAST_CHECKPOINT
    from dlpipe.training.keras_worker import Worker

    class SnapshotWorker(Worker):  # type: ignore[misc]
        """The worker, recording what a test compares checkpoints with.

        After each epoch's checkpoints: `epoch<k>/model/<i>` (every model variable, dropout
        seed-generator states included, in `model.variables` order), `epoch<k>/optimizer/<i>`
        (`optimizer.variables` order), `epoch<k>/state` (the state it saved, as JSON), and
        copies of the files it published as `published/epoch<k>.<last|best>.keras` (+ sidecar).
        A resumed run also records `restored/...` as it enters its first epoch.
        """

        recorded: dict[str, np.ndarray]
        epochs_recorded: list[dict[str, Any]]
        snapshots_on = True
        model: Any = None

        def variables(self, model: Any, prefix: str) -> dict[str, np.ndarray]:
            out = {f"{prefix}/model/{i}": np.asarray(v) for i, v in enumerate(model.variables)}
            for i, v in enumerate(model.optimizer.variables):
                out[f"{prefix}/optimizer/{i}"] = np.asarray(v)
            return out

        def assign(self, model: Any, prefix: str) -> None:
            """Set every model and optimizer variable to the values recorded under `prefix`."""
            for part, variables in (("model", model.variables),
                                    ("optimizer", model.optimizer.variables)):  # fmt: skip
                for i, v in enumerate(variables):
                    v.assign(self.recorded[f"{prefix}/{part}/{i}"])

        def run(self) -> None:
            self.recorded, self.epochs_recorded = {}, []
            super().run()

        def train_epoch(self, model: Any, strategy: Any, epoch: int, steps: int) -> Any:
            self.model = model
            if self.job.get("resume") and "restored/model/0" not in self.recorded:
                self.recorded.update(self.variables(model, "restored"))
                self.recorded["restored/epoch"] = np.array(epoch)
            return super().train_epoch(model, strategy, epoch, steps)

        def save_checkpoints(
            self, model: Any, run_dir: Path, state: dict[str, Any], improved: bool
        ) -> None:
            super().save_checkpoints(model, run_dir, state, improved)
            if not self.snapshots_on:
                return
            k = int(state["epoch"]) - 1  # the epoch just finished
            prefix = f"epoch{k}"
            self.recorded.update(self.variables(model, prefix))
            self.recorded[f"{prefix}/state"] = np.array(json.dumps(state, sort_keys=True))
            copies = run_dir / "published"
            copies.mkdir(exist_ok=True)
            names = [LAST_CHECKPOINT] + ([BEST_CHECKPOINT] if improved and self.keep_best else [])
            for name in names:
                kind = name.split(".")[0]
                shutil.copyfile(run_dir / name, copies / f"epoch{k}.{kind}.keras")
                shutil.copyfile(checksum_path(run_dir / name),
                                checksum_path(copies / f"epoch{k}.{kind}.keras"))  # fmt: skip
            lr = model.optimizer.learning_rate
            self.epochs_recorded.append(
                {"epoch": k, "files": [n.split(".")[0] for n in names], "improved": improved,
                 "lr": float(np.asarray(lr.numpy() if hasattr(lr, "numpy") else lr)),
                 "iterations": int(model.optimizer.iterations.numpy())}
            )  # fmt: skip

        def finish(self, model: Any, run_dir: Path, state: dict[str, Any], seconds: float) -> None:
            self.model = model
            super().finish(model, run_dir, state, seconds)

    return SnapshotWorker


if __name__ == "__main__":  # pragma: no cover - the TensorFlow process
    # This directory holds a `tensorflow/` test folder: keep it off the import path.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
    _serve()
