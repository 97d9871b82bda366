"""`dlpipe serve --workers N`: N server processes answering on one port.

    dlpipe serve --model fashion --workers 4 --port 8000

For small models the server is bound by per-request Python work, so on a many-core machine one
process leaves most cores idle. The supervisor here binds the listening socket once and starts N
worker processes (spawned: no forked ONNX Runtime or thread state) that accept on it, each with
its own batcher, ONNX Runtime session (the CPU threads divided among them) and registry
follower. It restarts a worker that dies and, on SIGTERM, marks the server as draining (every
worker's /ready answers 503), waits `drain_s`, then asks the workers to finish their accepted
requests and exit.

Shared state lives in one temporary directory: Prometheus' multiprocess files (so /metrics,
answered by any worker, counts the whole server exactly), one `ready-<i>` file per worker that
serves, and a `draining` file.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.context import SpawnProcess
from pathlib import Path
from typing import Any

from dlpipe.serving.settings import ServeSettings

log = logging.getLogger("dlpipe.serving")
multiprocessing.allow_connection_pickling()  # listening sockets travel to spawned workers
_spawn = multiprocessing.get_context("spawn")


@dataclass(frozen=True)
class WorkerInfo:
    """Which worker this process is, and where the server's shared state lives."""

    index: int
    count: int
    state_dir: str

    def mark_ready(self) -> None:
        Path(self.state_dir, f"ready-{self.index}").touch()

    def server_ready(self) -> bool:
        """Every worker serves and the server is not draining."""
        state = Path(self.state_dir)
        if (state / "draining").exists():
            return False
        return all((state / f"ready-{i}").exists() for i in range(self.count))

    def draining(self) -> bool:
        return Path(self.state_dir, "draining").exists()


def worker_settings(settings: ServeSettings, workers: int) -> ServeSettings:
    """Each worker's share of the CPU: ONNX Runtime and decode threads divided among them."""
    cores = os.cpu_count() or 1
    share = max(1, cores // workers)
    update: dict[str, Any] = {}
    if settings.ort_intra_op_threads == 0:
        update["ort_intra_op_threads"] = share
    if settings.decode_workers == 0:
        update["decode_workers"] = min(4, share)
    return settings.model_copy(update=update)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _worker_main(settings: ServeSettings, info: WorkerInfo, sock: socket.socket) -> None:
    """A worker process: the usual app and server, on the supervisor's socket."""
    from dlpipe.serving.cli import serve_app

    os.environ["DLPIPE_WORKER_INDEX"] = str(info.index)
    serve_app(settings, sockets=[sock], worker=info)


class Supervisor:
    """Starts, watches and stops the worker processes of one server."""

    def __init__(self, settings: ServeSettings, workers: int) -> None:
        self.settings = worker_settings(settings, workers)
        self.count = workers
        self.state_dir = tempfile.mkdtemp(prefix="dlpipe-serve-")
        self.metrics_dir = Path(self.state_dir, "metrics")
        self.metrics_dir.mkdir()
        self.processes: list[SpawnProcess] = []
        self.stopping = False

    def run(self) -> int:
        # Set before any worker imports prometheus_client: every process then writes its
        # metrics to files that /metrics aggregates.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(self.metrics_dir)
        sock = _bind(self.settings.host, self.settings.port)
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.processes = [self._start(i, sock) for i in range(self.count)]
            log.info("workers started", extra={"event": "workers_started", "workers": self.count})
            while not self.stopping:
                self._keep_alive(sock)
                time.sleep(0.2)
            self._stop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            sock.close()
            shutil.rmtree(self.state_dir, ignore_errors=True)
        return 0

    def _start(self, index: int, sock: socket.socket) -> SpawnProcess:
        info = WorkerInfo(index, self.count, self.state_dir)
        process = _spawn.Process(
            target=_worker_main, args=(self.settings, info, sock), name=f"dlpipe-worker-{index}"
        )
        process.start()
        return process

    def _keep_alive(self, sock: socket.socket) -> None:
        for index, process in enumerate(self.processes):
            if process.is_alive() or self.stopping:
                continue
            log.error(
                "worker %d (pid %s) exited with %s; restarting it",
                index,
                process.pid,
                process.exitcode,
                extra={"event": "worker_restart"},
            )
            Path(self.state_dir, f"ready-{index}").unlink(missing_ok=True)
            if process.pid is not None:
                from prometheus_client import multiprocess

                multiprocess.mark_process_dead(process.pid, str(self.metrics_dir))
            self.processes[index] = self._start(index, sock)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.stopping = True

    def _stop(self) -> None:
        Path(self.state_dir, "draining").touch()  # every worker's /ready: 503 from now on
        if self.settings.drain_s > 0:
            log.info("draining before shutdown", extra={"event": "draining"})
            time.sleep(self.settings.drain_s)
        for process in self.processes:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)  # each finishes its accepted requests
        deadline = time.monotonic() + self.settings.shutdown_grace_s + 5
        for process in self.processes:
            process.join(max(0.1, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()


def run_workers(settings: ServeSettings, workers: int) -> int:
    """Serve with `workers` processes until SIGTERM/SIGINT; the exit status."""
    return Supervisor(settings, workers).run()
