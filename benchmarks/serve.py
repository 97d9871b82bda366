"""Serving benchmark: the real `dlpipe serve` process vs a naive PyTorch-eager FastAPI server,
both driven over HTTP by a separate closed-loop load process, plus in-process ONNX Runtime.

    OMP_NUM_THREADS=1 python benchmarks/serve.py                      # every scenario
    python benchmarks/serve.py --scenario cnn --duration 10
    python benchmarks/serve.py --scenario resnet --scenario overload --scenario rollback

With `--baseline-src DIR` (the `src/` of another checkout, e.g. a `git worktree` of the commit
before a change), every `dlpipe serve` measurement of the `cnn` and `resnet` scenarios is repeated
on that code under the same load, in the same run: before/after figures for a change.

Scenarios: `cnn` (Fashion-MNIST CNN, 28x28 PNG uploads, 32 clients), `resnet` (ResNet-50
224x224 JPEG uploads, INT8 variant, 1 and 8 clients), `overload` (open-loop arrivals at 2x what
the server sustained, then 0.5x to show recovery), `rollback` (promotion then rollback in the
MLflow registry during load), `workers`, `predlog` (the prediction log on against off, alternating
in one run). Models are untrained (speed does not depend on the weights) and
cached under --workdir. Prints one table per scenario and a JSON line per measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

HERE = Path(__file__).resolve().parent
PY = sys.executable
BASELINE_SRC: str | None = None
WORKERS: list[int] = [1, 2]
ROUNDS = 6
"""Off / on pairs of the `predlog` scenario."""
"""`--workers 1,2,...`: server process counts of the `workers` scenario."""
"""`--baseline-src`: measure our server again with this source tree first on PYTHONPATH."""


# --------------------------------------------------------------------------- models
def _cnn_package(work: Path) -> Path:
    out = work / "cnn"
    if (out / "model.onnx").exists():
        return out
    import torch

    from dlpipe.config import PipelineConfig
    from dlpipe.models import create_model
    from dlpipe.optimize.onnx_export import export_onnx
    from dlpipe.tracking.metadata import ModelMetadata, utc_now
    from dlpipe.tracking.package import save_model_package

    cfg = PipelineConfig.model_validate({"preprocessing": {"augment": False}})
    net = create_model("simple_cnn", 10, 1).eval()
    onnx_path = work / "cnn.onnx"
    export_onnx(net, (torch.randn(2, 1, 28, 28),), onnx_path, ["input"])
    meta = ModelMetadata(
        "fashion", "onnx", "fp32", 0.0, utc_now(), {"acc": 0.0}, cfg.preprocessing, version="1"
    )
    return save_model_package(out, cfg, meta, net=net, onnx_path=onnx_path)


def _resnet_packages(work: Path) -> tuple[Path, Path]:
    """(fp32 package with weights.pt for the naive server, INT8 ONNX package for ours)."""
    fp32, int8 = work / "resnet50_fp32", work / "resnet50_int8"
    if (int8 / "model.onnx").exists() and (fp32 / "weights.pt").exists():
        return fp32, int8
    import torch

    from dlpipe.config import PipelineConfig
    from dlpipe.models import create_model
    from dlpipe.optimize.onnx_export import export_onnx
    from dlpipe.optimize.quantize import quantize_int8_static
    from dlpipe.tracking.metadata import ModelMetadata, utc_now
    from dlpipe.tracking.package import save_model_package

    cfg = PipelineConfig.model_validate(
        {
            "model": {"name": "resnet50", "in_channels": 3},
            "preprocessing": {
                "image_size": [224, 224],
                "channels": 3,
                "augment": False,
                "normalization_mean": [0.485, 0.456, 0.406],
                "normalization_std": [0.229, 0.224, 0.225],
            },
        }
    )
    torch.manual_seed(0)
    net = create_model("resnet50", 10, 3).eval()
    onnx_path = work / "resnet50.onnx"
    if not onnx_path.exists():
        export_onnx(net, (torch.randn(2, 3, 224, 224),), onnx_path, ["input"])
    meta = ModelMetadata(
        "resnet", "pytorch", "fp32", 0.0, utc_now(), {"acc": 0.0}, cfg.preprocessing, version="1"
    )
    save_model_package(fp32, cfg, meta, net=net)
    from dlpipe.data import DataPreprocessor

    pre = DataPreprocessor(cfg.preprocessing)
    calibration = [pre.preprocess_inference_batch([_jpeg(seed)]) for seed in range(16)]
    int8_path = work / "resnet50.int8.onnx"
    quantize_int8_static(onnx_path, int8_path, calibration)
    meta8 = ModelMetadata(
        "resnet", "onnx", "int8", 0.0, utc_now(), {"acc": 0.0}, cfg.preprocessing, version="1"
    )
    save_model_package(int8, cfg, meta8, onnx_path=int8_path)
    return fp32, int8


def _png(seed: int) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(seed: int) -> bytes:
    """A smooth photo-like 224x224 colour image (JPEG of realistic size, ~10-20 kB)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:224, 0:224] / 224.0
    channels = [
        np.sin(2 * np.pi * (rng.uniform(1, 4) * x + rng.uniform(1, 4) * y + rng.uniform()))
        for _ in range(3)
    ]
    img = (np.stack(channels, -1) * 100 + 128 + rng.normal(0, 12, (224, 224, 3))).clip(0, 255)
    buf = io.BytesIO()
    Image.fromarray(img.astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


# -------------------------------------------------------------------------- processes
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A server in its own process; `kind` is `dlpipe` (ours) or `naive`."""

    def __init__(self, kind: str, args: list[str], env: dict[str, str], log: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = (
            [PY, "-m", "dlpipe.cli", "serve"]
            if kind == "dlpipe"
            else [PY, str(HERE / "naive_server.py")]
        )
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [*cmd, *args, "--port", str(self.port)],
            env={**os.environ, "DLPIPE_ACCESS_LOG": "false", **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 180
        path = "/ready" if kind == "dlpipe" else "/health"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{kind} server exited; see {log}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"{kind} server not ready; see {log}")

    def metrics(self) -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.url + "/metrics", timeout=5).text
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name in (
                    "dlpipe_batch_size_sum",
                    "dlpipe_batch_size_count",
                    "dlpipe_inference_seconds_sum",
                ):
                    out[s.name] = out.get(s.name, 0.0) + s.value
        return out

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


def load(
    url: str,
    files: list[Path],
    clients: int,
    duration: float,
    *extra: str,
    path: str = "/predict",
) -> dict[str, Any]:
    """Run the load generator as its own process; returns its JSON summary."""
    cmd = [
        PY,
        str(HERE / "loadgen.py"),
        "--url",
        url + path,
        "--clients",
        str(clients),
        "--duration",
        str(duration),
        *extra,
    ]
    for f in files:
        cmd += ["--file", str(f)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def mean_batch(before: dict[str, float], after: dict[str, float]) -> float:
    n = after.get("dlpipe_batch_size_count", 0) - before.get("dlpipe_batch_size_count", 0)
    s = after.get("dlpipe_batch_size_sum", 0) - before.get("dlpipe_batch_size_sum", 0)
    return s / n if n else 0.0


def ort_limit(package: Path, batch: int, seconds: float = 3.0, threads: int = 0) -> float:
    """Items per second ONNX Runtime reaches in-process on batches of `batch` (the limit)."""
    from dlpipe.serving.engine import InferenceEngine

    engine = InferenceEngine(package, "cpu", intra_op_threads=threads)
    shape = [batch] + [int(d) for d in engine.inputs[0]["shape"][1:]]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    engine.predict_batch(x)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        engine.predict_batch(x)
        n += batch
    return n / (time.perf_counter() - start)


def _measure_ours(
    pkg: Path,
    env: dict[str, str],
    log: Path,
    files: list[Path],
    clients: int,
    duration: float,
    *extra: str,
    path: str = "/predict",
    src: str | None = None,
) -> tuple[dict[str, Any], float]:
    """`dlpipe serve` on `pkg`: a warm-up run, then the measured one; (summary, mean batch).

    `src`: run the server from this source tree instead (the baseline of a before/after run).
    """
    if src is not None:
        env = {**env, "PYTHONPATH": src}
    server = Server("dlpipe", ["--package", str(pkg)], env, log)
    try:
        load(server.url, files, clients, 2.0, *extra, path=path)  # warm-up run, not measured
        before = server.metrics()
        ours = load(server.url, files, clients, duration, *extra, path=path)
        return ours, mean_batch(before, server.metrics())
    finally:
        server.stop()


# -------------------------------------------------------------------------- scenarios
def _row(name: str, r: dict[str, Any], extra: str = "") -> str:
    return (
        f"  {name:34s} {r['throughput_rps']:8.1f} req/s  p50 {r['p50_ms']!s:>7} ms  "
        f"p95 {r['p95_ms']!s:>7} ms  p99 {r['p99_ms']!s:>7} ms  errors {r['errors']}{extra}"
    )


def _compare(
    title: str,
    ours_pkg: Path,
    naive_pkg: Path,
    files: list[Path],
    clients: list[int],
    duration: float,
    work: Path,
    env: dict[str, str],
) -> list[dict[str, Any]]:
    """Same load on our server and on the naive one, plus the in-process ORT limit."""
    print(f"\n== {title}")
    results = []
    for n in clients:
        ours, batch = _measure_ours(ours_pkg, env, work / "server.log", files, n, duration)
        base = None
        if BASELINE_SRC is not None:
            base, _ = _measure_ours(
                ours_pkg, env, work / "base.log", files, n, duration, src=BASELINE_SRC
            )
        naive_server = Server("naive", ["--package", str(naive_pkg)], {}, work / "naive.log")
        try:
            load(naive_server.url, files, n, 2.0)
            naive = load(naive_server.url, files, n, duration)
        finally:
            naive_server.stop()
        threads = int(env.get("DLPIPE_ORT_INTRA_OP_THREADS", "0"))
        limit = ort_limit(ours_pkg, max(1, round(batch)), threads=threads)
        share = ours["throughput_rps"] / limit
        print(f" {n} client(s):")
        print(_row("dlpipe serve (ONNX Runtime, batching)", ours, f"  mean batch {batch:.1f}"))
        if base is not None:
            ratio = ours["throughput_rps"] / max(base["throughput_rps"], 1e-9)
            print(_row("baseline dlpipe serve (--baseline-src)", base, f"  now/base {ratio:.3f}"))
        print(_row("naive FastAPI + PyTorch eager", naive))
        print(
            f"  in-process ONNX Runtime, batch {max(1, round(batch))}: {limit:8.1f} items/s "
            f"(served = {share:.0%} of it); vs naive: "
            f"{ours['throughput_rps'] / max(naive['throughput_rps'], 1e-9):.2f}x throughput"
        )
        row = {
            "scenario": title,
            "clients": n,
            "ours": ours,
            "naive": naive,
            "mean_batch": batch,
            "ort_items_per_s": limit,
            "baseline": base,
        }
        print(json.dumps(row))
        results.append(row)
    return results


def scenario_cnn(work: Path, duration: float) -> list[dict[str, Any]]:
    pkg = _cnn_package(work)
    files = []
    for seed in range(8):
        (work / f"cnn{seed}.png").write_bytes(_png(seed))
        files.append(work / f"cnn{seed}.png")
    env = {"DLPIPE_MAX_BATCH_SIZE": "32", "DLPIPE_MAX_WAIT_MS": "2"}
    rows = _compare("Fashion-MNIST CNN, PNG uploads", pkg, pkg, files, [32], duration, work, env)
    rows.append(_batch_endpoint(pkg, files, duration, work, env))
    return rows


def scenario_workers(work: Path, duration: float) -> list[dict[str, Any]]:
    """Fashion-MNIST CNN, 32 clients, for each `--workers` count: requests/s, and the server's
    own request count (summed over its processes) against the load generator's."""
    pkg = _cnn_package(work)
    files = []
    for seed in range(8):
        (work / f"cnn{seed}.png").write_bytes(_png(seed))
        files.append(work / f"cnn{seed}.png")
    print(
        f"\n== Server processes (--workers), Fashion-MNIST CNN, 32 clients, {os.cpu_count()} cores"
    )
    rows = []
    for n in WORKERS:
        env = {"DLPIPE_MAX_BATCH_SIZE": "32", "DLPIPE_MAX_WAIT_MS": "2", "DLPIPE_WORKERS": str(n)}
        server = Server("dlpipe", ["--package", str(pkg)], env, work / f"workers-{n}.log")
        try:
            load(server.url, files, 32, 2.0)  # warm-up, not measured
            before = _requests_counted(server)
            result = load(server.url, files, 32, duration, "--warmup", "0")
            counted = _requests_counted(server) - before
        finally:
            server.stop()
        print(
            _row(
                f"{n} worker(s)", result, f"  server counted {counted:.0f} of {result['requests']}"
            )
        )
        row = {"scenario": "workers", "workers": n, "ours": result, "server_counted": counted}
        print(json.dumps(row))
        rows.append(row)
    return rows


def scenario_predlog(work: Path, duration: float) -> list[dict[str, Any]]:
    """Fashion-MNIST CNN, 32 clients on /predict: the prediction log on (every request recorded,
    summarized and written to a directory) against off (`prediction_log_sample=0`: nothing
    recorded), in one run, alternating off / on `ROUNDS` times so slow drifts of a shared machine
    hit both alike; medians of the paired ratios, and the server's CPU time per request beside
    requests/s (less disturbed by other load than requests/s). Also
    counts the log's lines against the server's own count of 200 answers."""
    import shutil

    pkg = _cnn_package(work)
    files = []
    for seed in range(8):
        (work / f"cnn{seed}.png").write_bytes(_png(seed))
        files.append(work / f"cnn{seed}.png")
    base = {"DLPIPE_MAX_BATCH_SIZE": "32", "DLPIPE_MAX_WAIT_MS": "2"}
    print(f"\n== Prediction log on / off, Fashion-MNIST CNN, 32 clients, {os.cpu_count()} cores")
    rows: list[dict[str, Any]] = []
    for round_ in range(ROUNDS):
        for mode in ("off", "on"):
            log_dir = work / "predlog"
            shutil.rmtree(log_dir, ignore_errors=True)
            env = {**base, "DLPIPE_PREDICTION_LOG_SAMPLE": "0"}
            if mode == "on":
                env = {**base, "DLPIPE_PREDICTION_LOG_DIR": str(log_dir)}
            server = Server("dlpipe", ["--package", str(pkg)], env, work / f"predlog-{mode}.log")
            try:
                load(server.url, files, 32, 2.0)  # warm-up, not measured
                cpu, before = _cpu_s(server.proc.pid), _requests_counted(server)
                result = load(server.url, files, 32, duration, "--warmup", "0")
                # CPU per request: the server's own cost, far less disturbed than requests/s
                # by whatever else runs on a shared machine.
                cpu_us = (_cpu_s(server.proc.pid) - cpu) / (_requests_counted(server) - before)
                answered = _requests_counted(server, status="200")
            finally:
                server.stop()  # the log is complete once the server has stopped
            result["server_cpu_us_per_request"] = round(cpu_us * 1e6, 1)
            lines = 0
            if mode == "on":
                lines = sum(len(f.read_bytes().splitlines()) for f in log_dir.glob("*.jsonl"))
            extra = f"  CPU {cpu_us * 1e6:.0f} us/request"
            if mode == "on":
                extra += f"  log lines {lines} of {answered:.0f} answered 200"
            print(_row(f"round {round_ + 1}, log {mode}", result, extra))
            row = {"scenario": "predlog", "round": round_ + 1, "log": mode, "ours": result}
            row.update(answered_200=answered, log_lines=lines)
            print(json.dumps(row))
            rows.append(row)

    def median(mode: str, key: str) -> float:
        return float(np.median([r["ours"][key] for r in rows if r["log"] == mode]))

    def ratios(key: str) -> list[float]:
        return [
            rows[i + 1]["ours"][key] / max(rows[i]["ours"][key], 1e-9)
            for i in range(0, len(rows), 2)
        ]

    for key in ("throughput_rps", "server_cpu_us_per_request", "p50_ms", "p99_ms"):
        paired = ratios(key)
        print(
            f"  {key}: median off {median('off', key):.1f}, on {median('on', key):.1f}; "
            f"on/off per round {', '.join(f'{p:.3f}' for p in paired)} "
            f"(median {float(np.median(paired)):.3f})"
        )
    return rows


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _requests_counted(server: Server, status: str | None = None) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.url + "/metrics", timeout=5).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        # Requests shed at the door (before routing) are recorded as "unmatched".
        if s.name == "dlpipe_requests_total"
        and s.labels.get("endpoint") in ("/predict", "unmatched")
        and status in (None, s.labels.get("status"))
    )


def _batch_endpoint(
    pkg: Path, files: list[Path], duration: float, work: Path, env: dict[str, str]
) -> dict[str, Any]:
    """A small model pays more for HTTP than for inference: 16 images per request amortize it."""
    per_request, clients = 16, 4
    extra = ("--field", "files", "--per-request", str(per_request))
    log = work / "server-batch.log"
    ours, batch = _measure_ours(
        pkg, env, log, files, clients, duration, *extra, path="/predict/batch"
    )
    limit = ort_limit(pkg, max(1, round(batch)))
    share = ours["items_per_s"] / limit
    print(f" /predict/batch, {per_request} PNGs per request, {clients} clients:")
    images = f"  {ours['items_per_s']:.0f} images/s  mean batch {batch:.1f}"
    print(_row("dlpipe serve", ours, images))
    print(
        f"  in-process ONNX Runtime, batch {max(1, round(batch))}: {limit:8.1f} items/s "
        f"(served = {share:.0%} of it)"
    )
    row = {
        "scenario": "Fashion-MNIST CNN, /predict/batch",
        "clients": clients,
        "per_request": per_request,
        "ours": ours,
        "mean_batch": batch,
        "ort_items_per_s": limit,
    }
    print(json.dumps(row))
    return row


def scenario_resnet(work: Path, duration: float) -> list[dict[str, Any]]:
    fp32, int8 = _resnet_packages(work)
    files = []
    for seed in range(4):
        (work / f"photo{seed}.jpg").write_bytes(_jpeg(seed))
        files.append(work / f"photo{seed}.jpg")
    env = {"DLPIPE_MAX_BATCH_SIZE": "8", "DLPIPE_MAX_WAIT_MS": "1"}
    title = "ResNet-50 224x224 JPEG (ours: INT8 ONNX; naive: FP32 eager)"
    return _compare(title, int8, fp32, files, [1, 8], duration, work, env)


def scenario_overload(work: Path, duration: float) -> dict[str, Any]:
    """Open-loop arrivals at 2x the sustained rate, then 0.5x: prompt 503s, then recovery."""
    pkg = _cnn_package(work)
    (work / "cnn0.png").write_bytes(_png(0))
    files = [work / "cnn0.png"]
    timeout_ms = 250
    env = {
        "DLPIPE_REQUEST_TIMEOUT_MS": str(timeout_ms),
        "DLPIPE_MAX_IN_FLIGHT": os.environ.get("DLPIPE_MAX_IN_FLIGHT", "32"),
    }
    if "DLPIPE_MAX_LOOP_LAG_MS" in os.environ:  # default: a tenth of the deadline
        env["DLPIPE_MAX_LOOP_LAG_MS"] = os.environ["DLPIPE_MAX_LOOP_LAG_MS"]
    server = Server("dlpipe", ["--package", str(pkg)], env, work / "overload.log")
    try:
        sustained = load(server.url, files, 32, duration)["throughput_rps"]
        over = load(server.url, files, 0, duration, "--rate", str(2 * sustained))
        after = load(server.url, files, 0, duration, "--rate", str(0.5 * sustained))
    finally:
        server.stop()
    print(f"\n== Overload (deadline {timeout_ms} ms): sustained {sustained:.0f} req/s closed loop")
    for name, r in (("2x offered", over), ("0.5x offered (recovery)", after)):
        print(
            _row(
                f"{name}: {r['offered_rps']:.0f} req/s",
                r,
                f"  max {r['max_ok_ms']} ms  statuses {r['statuses']}  503s p95 "
                f"{r['p95_503_ms']} / p99 {r['p99_503_ms']} ms  client lag p99 "
                f"{r['client_lag_p99_ms']} ms  last error at {r['last_error_at_s']} s",
            )
        )
    result = {
        "scenario": "overload",
        "sustained_rps": sustained,
        "overload": over,
        "recovery": after,
        "deadline_ms": timeout_ms,
    }
    print(json.dumps(result))
    return result


def scenario_rollback(work: Path, duration: float) -> dict[str, Any]:
    """Promote v2 then roll back to v1 in the MLflow registry while 32 clients send requests."""
    from dlpipe.tracking.metadata import ModelMetadata
    from dlpipe.tracking.registry import ModelRegistry

    pkg = _cnn_package(work)
    (work / "cnn0.png").write_bytes(_png(0))
    store = work / f"registry-{int(time.time())}"
    store.mkdir()
    uri = f"sqlite:///{store / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    old_cwd = os.getcwd()
    os.chdir(store)  # MLflow's default artifact root lands in the store dir
    try:
        registry = ModelRegistry(uri, cache_dir=store / "cache")
        for _ in range(2):
            meta = ModelMetadata.from_json((pkg / "metadata.json").read_text())
            meta.version = ""
            registry.register_model(pkg, meta)
        registry.promote("fashion", "1")
        env = {
            "DLPIPE_TRACKING_URI": uri,
            "DLPIPE_REGISTRY_REFRESH_S": "0.25",
            "DLPIPE_MODEL_CACHE": str(store / "server-cache"),
        }
        server = Server("dlpipe", ["--model", "fashion"], env, work / "rollback.log")
        try:
            result = asyncio.run(_switch_under_load(server, registry, work / "cnn0.png", duration))
        finally:
            server.stop()
    finally:
        os.chdir(old_cwd)
    print("\n== Promotion and rollback during load (32 clients)")
    print(json.dumps(result))
    return result


def _serving(url: str) -> list[str]:
    routing = httpx.get(url + "/models", timeout=5).json()["routing"]
    return list(routing["serving_versions"]) if routing else []


async def _switch_under_load(
    server: Server, registry: Any, png: Path, duration: float
) -> dict[str, Any]:
    from loadgen import multipart_request, run_load

    req = [
        multipart_request(
            "127.0.0.1", server.port, "/predict", "file", "x.png", png.read_bytes(), "image/png"
        )
    ]
    marks: dict[str, float] = {}

    async def wait_for(version: str) -> float:
        while await asyncio.to_thread(_serving, server.url) != [version]:
            await asyncio.sleep(0.02)
        return time.perf_counter()

    async def operate() -> None:
        await asyncio.sleep(duration / 3)
        await asyncio.to_thread(registry.promote, "fashion", "2")
        marks["promote_returned"] = time.perf_counter()
        marks["switched_to_2"] = await wait_for("2")
        await asyncio.sleep(duration / 3)
        await asyncio.to_thread(registry.rollback, "fashion", "1")
        marks["rollback_returned"] = time.perf_counter()
        marks["switched_to_1"] = await wait_for("1")

    task = asyncio.create_task(run_load(server.url + "/predict", req, 32, duration, 0.0))
    await operate()
    summary, rows = await task
    stale = sum(1 for sent, _, _, v in rows if sent > marks["switched_to_1"] and v != "1")
    return {
        "requests": summary["requests"],
        "errors": summary["errors"],
        "versions": summary["versions"],
        "follow_promotion_s": round(marks["switched_to_2"] - marks["promote_returned"], 3),
        "follow_rollback_s": round(marks["switched_to_1"] - marks["rollback_returned"], 3),
        "responses_from_rolled_back_version_after_switch": stale,
        "p95_ms": summary["p95_ms"],
    }


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description="dlpipe serving benchmark")
    p.add_argument(
        "--scenario",
        action="append",
        choices=["cnn", "resnet", "overload", "rollback", "workers", "predlog"],
    )
    p.add_argument("--workers", default="1,2", help="server process counts for `workers`")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    p.add_argument("--workdir", default=os.environ.get("DLPIPE_BENCH_DIR", "/tmp/dlpipe-bench"))
    p.add_argument("--baseline-src", help="also measure the server from this src/ (before/after)")
    args = p.parse_args(argv)
    global BASELINE_SRC, WORKERS
    BASELINE_SRC = args.baseline_src
    WORKERS = [int(n) for n in args.workers.split(",")]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    scenarios = args.scenario or ["cnn", "resnet", "overload", "rollback"]
    print(f"cpu cores: {os.cpu_count()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    runners = {
        "cnn": scenario_cnn,
        "resnet": scenario_resnet,
        "overload": scenario_overload,
        "rollback": scenario_rollback,
        "workers": scenario_workers,
        "predlog": scenario_predlog,
    }
    for name in scenarios:
        runners[name](work, args.duration)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
