"""Serve a Keras model (a package with only `model.keras`) from a TensorFlow worker process.

    worker = KerasWorker("package/model.keras")       # starts the worker, waits for its hello
    logits = worker.predict({"input": batch})          # N×K float32
    worker.close()                                     # when the version retires

`InferenceEngine` uses this for a TensorFlow version whose ONNX export failed (every other
package serves on ONNX Runtime). The server process never imports TensorFlow: its thread pools
would fight ONNX Runtime's, and `import tensorflow` with torch in the same process can crash it.
The worker is `python -m dlpipe.models.keras_runner serve MODEL`; requests and replies are
frames of `np.save` arrays on its stdin and stdout (`keras_runner.encode_frame`). A worker that
dies is started again at once (a watcher thread); one that dies or stops answering during a
batch is killed and started again, and the batch is retried once. Its stderr goes to a file
whose end is quoted when it fails.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import IO, Any

import numpy as np

from dlpipe.models.keras_runner import encode_frame, read_frame

log = logging.getLogger(__name__)

WORKER_MODULE = "dlpipe.models.keras_runner"
START_TIMEOUT_S = 120.0
"""Importing TensorFlow and loading the model: seconds on an idle machine, more under load."""
REPLY_TIMEOUT_S = 60.0


class KerasWorkerError(RuntimeError):
    """The worker could not be started, or failed a request twice."""


class KerasInputError(ValueError):
    """The worker refused a request's inputs (it keeps running)."""


def _stop(proc: subprocess.Popen[bytes], grace_s: float = 5.0) -> None:
    """Close the worker's stdin (it exits on EOF), then kill it if it lingers."""
    if proc.stdin is not None and not proc.stdin.closed:
        with contextlib.suppress(OSError):  # already broken: the worker is gone anyway
            proc.stdin.close()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def _stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            _stop(proc, grace_s=1.0)
    procs.clear()


class KerasWorker:
    """One TensorFlow process running one `.keras` file; one request at a time (a lock)."""

    def __init__(
        self,
        keras_file: str | Path,
        *,
        threads: int = 0,
        use_gpu: bool = True,
        start_timeout_s: float = START_TIMEOUT_S,
        reply_timeout_s: float = REPLY_TIMEOUT_S,
    ) -> None:
        self.keras_file = Path(keras_file)
        if not self.keras_file.is_file():
            raise KerasWorkerError(f"Keras model not found: {self.keras_file}")
        self.threads, self.use_gpu = threads, use_gpu
        self.start_timeout_s, self.reply_timeout_s = start_timeout_s, reply_timeout_s
        self.restarts = 0
        self._closed = False
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        # Closed in close(): it outlives every restart, so the last crash can be quoted.
        self._stderr: IO[bytes] = tempfile.TemporaryFile(prefix="dlpipe-keras-worker-")  # noqa: SIM115
        # A worker outlives nothing: if this object is dropped without close() (a load that
        # timed out, an engine garbage-collected), the finalizer stops the process.
        self._procs: list[subprocess.Popen[bytes]] = []
        self._finalizer = weakref.finalize(self, _stop_all, self._procs)
        self.inputs: list[dict[str, Any]] = []
        self._start()

    # ----------------------------------------------------------------- lifecycle
    @property
    def pid(self) -> int | None:
        """The worker's process id (None when stopped)."""
        return self._proc.pid if self._proc is not None else None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _start(self) -> None:
        env = dict(os.environ)
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        env.pop("TF_CONFIG", None)  # a leftover cluster spec would make TensorFlow wait for peers
        if self.threads:
            env["DLPIPE_TF_THREADS"] = str(self.threads)
        if not self.use_gpu:
            env["CUDA_VISIBLE_DEVICES"] = ""
        self._proc = subprocess.Popen(
            [sys.executable, "-m", WORKER_MODULE, "serve", str(self.keras_file)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
            close_fds=True,
        )
        self._procs.append(self._proc)
        try:
            hello = self._read(self.start_timeout_s)
        except (EOFError, TimeoutError, OSError, ValueError) as err:
            self._kill()
            raise KerasWorkerError(
                f"the TensorFlow worker for {self.keras_file} did not start: {err}\n"
                f"{self.stderr_tail()}"
            ) from err
        spec = json.loads(str(hello["hello"]))
        self.inputs = [
            {"name": i["name"], "shape": list(i["shape"]), "dtype": np.dtype(i["dtype"])}
            for i in spec["inputs"]
        ]
        log.info(
            "tensorflow worker started",
            extra={"event": "keras_worker_started", "pid": self._proc.pid},
        )
        watch = threading.Thread(
            target=self._watch, args=(self._proc,), name="dlpipe-keras-watch", daemon=True
        )
        watch.start()

    def _watch(self, proc: subprocess.Popen[bytes]) -> None:
        """Start a new worker as soon as this one dies, not when the next request finds out."""
        proc.wait()
        with self._lock:
            if self._closed or self._proc is not proc:  # closed, or already replaced
                return
            self._kill()
            self.restarts += 1
            log.warning(
                "tensorflow worker died (status %s); starting a new one",
                proc.returncode,
                extra={"event": "keras_worker_restart", "restarts": self.restarts},
            )
            try:
                self._start()
            except KerasWorkerError as err:  # the next request tries again
                log.error("restarting the tensorflow worker failed: %s", err)

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        if proc in self._procs:
            self._procs.remove(proc)

    def close(self) -> None:
        """Stop the worker (it finishes the request in hand first); idempotent."""
        with self._lock:
            self._closed = True
            proc, self._proc = self._proc, None
            if proc is not None:
                _stop(proc)
                if proc in self._procs:
                    self._procs.remove(proc)
            self._finalizer.detach()
            self._stderr.close()

    def stderr_tail(self, lines: int = 15) -> str:
        if self._stderr.closed:
            return ""
        self._stderr.flush()
        self._stderr.seek(0)
        text = self._stderr.read().decode(errors="replace")
        self._stderr.seek(0, os.SEEK_END)
        return "\n".join(text.strip().splitlines()[-lines:])

    # ------------------------------------------------------------------- requests
    def _read(self, timeout_s: float) -> dict[str, np.ndarray]:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + timeout_s

        def read_exact(n: int) -> bytes:
            chunks, got = [], 0
            while got < n:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([fd], [], [], left)[0]:
                    raise TimeoutError(f"no reply within {timeout_s:g} s")
                chunk = os.read(fd, n - got)
                if not chunk:
                    raise EOFError("the worker closed its output (it exited)")
                chunks.append(chunk)
                got += len(chunk)
            return b"".join(chunks)

        return read_frame(read_exact)

    def predict(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        """Logits for one batch (arrays by serving input name).

        Raises:
            KerasInputError: the model refused these inputs.
            KerasWorkerError: the worker failed on this batch, was restarted, and failed again.
        """
        frame = encode_frame(feed)
        with self._lock:
            for attempt in (1, 2):
                try:
                    if not self.alive():
                        if self._closed:
                            raise KerasWorkerError("the worker was closed (version retired)")
                        self.restarts += 1
                        log.warning(
                            "tensorflow worker gone; starting a new one",
                            extra={"event": "keras_worker_restart", "restarts": self.restarts},
                        )
                        self._start()
                    assert self._proc is not None and self._proc.stdin is not None
                    self._proc.stdin.write(frame)
                    self._proc.stdin.flush()
                    reply = self._read(self.reply_timeout_s)
                except (BrokenPipeError, EOFError, TimeoutError, OSError, ValueError) as err:
                    # Dead, hung or out of step: a fresh worker gets the batch once more.
                    self._kill()
                    if attempt == 2:
                        raise KerasWorkerError(
                            f"the TensorFlow worker failed twice on a batch: {err}\n"
                            f"{self.stderr_tail()}"
                        ) from err
                    continue
                if "error" in reply:
                    raise KerasInputError(str(reply["error"]))
                return np.asarray(reply["logits"], dtype=np.float32)
        raise AssertionError("unreachable")
