"""Hostile traffic against a real `dlpipe serve` process, with figures (issue "Hostile traffic").

    OMP_NUM_THREADS=1 python benchmarks/hostile.py                  # every scenario, 30 s each
    python benchmarks/hostile.py --scenario bombs --duration 30
    python benchmarks/hostile.py --scenario uploads --duration 20

`bombs`: one client sends /predict/batch requests of 48 PNGs of 13,000 x 13,000 pixels in a
loop while 16 clients send normal /predict requests and a probe times /health every 50 ms.
`uploads`: 64 clients upload 10 MB bodies slowly and 64 upload them as fast as they can, while
the server's RSS is sampled; slow senders must get 408, RSS must stay under the configured
in-flight body budget plus the server's idle size. Prints one JSON line per scenario.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from serve import Server, _cnn_package, _png  # noqa: E402


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return 0.0


def _bomb_png(side: int = 13_000) -> bytes:
    """A `side` x `side` grayscale PNG: ~169 Mpx that compress to a small file."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (side, side)).save(buf, format="PNG", compress_level=9)
    return buf.getvalue()


def probe_health(url: str, duration: float, every_s: float = 0.05) -> list[float]:
    """/health latencies (ms) for `duration` s; a failed probe counts as 10 s."""
    out: list[float] = []
    end = time.perf_counter() + duration
    with httpx.Client(timeout=10) as client:
        while time.perf_counter() < end:
            started = time.perf_counter()
            try:
                ok = client.get(url + "/health").status_code == 200
            except httpx.HTTPError:
                ok = False
            out.append((time.perf_counter() - started) * 1000.0 if ok else 10_000.0)
            time.sleep(every_s)
    return out


async def _probe(url: str, duration: float) -> list[float]:
    """`probe_health` in its own process: the load generators here must not delay it."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--probe", url, "--duration", str(duration),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await proc.communicate()
    latencies: list[float] = json.loads(out.decode().strip().splitlines()[-1])
    return latencies


async def _normal(url: str, png: bytes, stop: asyncio.Event, statuses: Counter[Any]) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        while not stop.is_set():
            try:
                r = await client.post(url + "/predict", files={"file": ("x.png", png, "image/png")})
                statuses[r.status_code] += 1
            except httpx.HTTPError as err:
                statuses[type(err).__name__] += 1


async def _bomber(url: str, bomb: bytes, stop: asyncio.Event, rows: list[Any]) -> None:
    files = [("files", (f"b{i}.png", bomb, "image/png")) for i in range(48)]
    async with httpx.AsyncClient(timeout=60) as client:
        while not stop.is_set():
            started = time.perf_counter()
            r = await client.post(url + "/predict/batch", files=files)
            rows.append((r.status_code, (time.perf_counter() - started) * 1000.0))


def scenario_bombs(work: Path, duration: float) -> dict[str, Any]:
    pkg = _cnn_package(work)
    bomb = _bomb_png()
    server = Server("dlpipe", ["--package", str(pkg)], {}, work / "hostile-bombs.log")

    async def run() -> tuple[list[float], Counter[Any], list[Any]]:
        stop = asyncio.Event()
        statuses: Counter[Any] = Counter()
        rows: list[Any] = []
        png = _png(1)
        tasks = [asyncio.create_task(_normal(server.url, png, stop, statuses)) for _ in range(16)]
        tasks.append(asyncio.create_task(_bomber(server.url, bomb, stop, rows)))
        probe = asyncio.create_task(_probe(server.url, duration))
        await asyncio.sleep(duration)
        stop.set()
        await asyncio.gather(*tasks)
        return await probe, statuses, rows

    try:
        health, statuses, rows = asyncio.run(run())
    finally:
        server.stop()
    hostile = Counter(status for status, _ in rows)
    result = {
        "scenario": "bombs",
        "duration_s": duration,
        "bomb": f"48 x {len(bomb)} byte PNGs of 13000x13000 per request",
        "health_max_ms": round(max(health), 1),
        "health_p99_ms": round(float(np.percentile(health, 99)), 1),
        "health_probes": len(health),
        "normal_statuses": {str(k): v for k, v in statuses.items()},
        "normal_5xx": sum(v for k, v in statuses.items() if isinstance(k, int) and k >= 500),
        "hostile_statuses": {str(k): v for k, v in hostile.items()},
        "hostile_max_ms": round(max(ms for _, ms in rows), 1),
    }
    print(json.dumps(result))
    return result


_PAYLOADS: dict[int, bytes] = {}


async def _upload(url: str, size: int, chunk: int, pause_s: float, statuses: Counter[Any]) -> None:
    boundary = "dlpipe-bench"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    if size not in _PAYLOADS:  # made once: the load generator must not eat the CPU it measures
        _PAYLOADS[size] = np.random.default_rng(size).integers(0, 256, size, np.uint8).tobytes()
    payload = _PAYLOADS[size]

    async def body() -> Any:
        yield head
        for i in range(0, size, chunk):
            yield payload[i : i + chunk]
            if pause_s:
                await asyncio.sleep(pause_s)
        yield tail

    headers = {
        "content-type": f"multipart/form-data; boundary={boundary}",
        "content-length": str(len(head) + size + len(tail)),
    }
    async with httpx.AsyncClient(timeout=120) as client:
        try:
            r = await client.post(url + "/predict", content=body(), headers=headers)
            statuses[r.status_code] += 1
        except httpx.HTTPError as err:
            statuses[type(err).__name__] += 1


def scenario_uploads(work: Path, duration: float) -> dict[str, Any]:
    pkg = _cnn_package(work)
    budget_mb = 256
    env = {
        "DLPIPE_MAX_BODY_BYTES_IN_FLIGHT": str(budget_mb * 1024 * 1024),
        "DLPIPE_BODY_TIMEOUT_S": str(duration / 2),
    }
    server = Server("dlpipe", ["--package", str(pkg)], env, work / "hostile-uploads.log")
    pid = server.proc.pid
    time.sleep(1.0)
    idle_mb = _rss_mb(pid)

    async def run() -> tuple[Counter[Any], Counter[Any], list[float], list[float]]:
        stop = asyncio.Event()
        slow: Counter[Any] = Counter()
        fast: Counter[Any] = Counter()
        size = 10_000_000  # 10 MB, just under the default 10 MiB per-request limit
        rss: list[float] = []

        async def sample() -> None:
            while not stop.is_set():
                rss.append(_rss_mb(pid))
                await asyncio.sleep(0.2)

        async def fast_loop() -> None:
            while not stop.is_set():
                await _upload(server.url, size, 256 * 1024, 0.0, fast)

        sampler = asyncio.create_task(sample())
        probe = asyncio.create_task(_probe(server.url, duration))
        slow_tasks = [
            asyncio.create_task(_upload(server.url, size, 64 * 1024, 1.0, slow)) for _ in range(64)
        ]
        fast_tasks = [asyncio.create_task(fast_loop()) for _ in range(64)]
        await asyncio.sleep(duration)
        stop.set()
        await asyncio.gather(*fast_tasks)
        await asyncio.gather(*slow_tasks)
        await sampler
        return slow, fast, rss, await probe

    try:
        slow, fast, rss, health = asyncio.run(run())
    finally:
        server.stop()
    result = {
        "scenario": "uploads",
        "duration_s": duration,
        "budget_mb": budget_mb,
        "idle_rss_mb": round(idle_mb, 1),
        "max_rss_mb": round(max(rss), 1),
        "rss_over_idle_mb": round(max(rss) - idle_mb, 1),
        "slow_statuses": {str(k): v for k, v in slow.items()},
        "fast_statuses": {str(k): v for k, v in fast.items()},
        "health_max_ms": round(max(health), 1),
        "health_probes": len(health),
    }
    print(json.dumps(result))
    return result


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description="dlpipe hostile-traffic benchmark")
    p.add_argument("--scenario", action="append", choices=["bombs", "uploads"])
    p.add_argument("--duration", type=float, default=30.0, help="seconds per scenario")
    p.add_argument("--workdir", default=os.environ.get("DLPIPE_BENCH_DIR", "/tmp/dlpipe-bench"))
    p.add_argument("--probe", metavar="URL", help=argparse.SUPPRESS)  # the prober's own process
    args = p.parse_args(argv)
    if args.probe:
        print(json.dumps(probe_health(args.probe, args.duration)))
        return 0
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    print(f"cpu cores: {os.cpu_count()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    runners = {"bombs": scenario_bombs, "uploads": scenario_uploads}
    for name in args.scenario or ["bombs", "uploads"]:
        runners[name](work, args.duration)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
