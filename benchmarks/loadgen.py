"""A light closed-loop HTTP load generator (raw asyncio streams, keep-alive, pre-encoded bodies).

    python benchmarks/loadgen.py --url http://127.0.0.1:8000/predict --file a.png \
        --clients 32 --duration 10

Each client sends a request, waits for the whole response, records the latency, and sends the
next one. Prints one JSON line: p50/p95/p99 latency (ms), throughput, status counts, and
the `model_version` seen in responses (with the send time of each, for switch checks).
The generator is kept light (no HTTP library per request) because on a small machine it
shares the CPU with the server it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import re
import sys
import time
import uuid
from pathlib import Path
from typing import Any

_VERSION = re.compile(rb'"model_version":\s*"([^"]*)"')


def multipart_request(
    host: str,
    port: int,
    path: str,
    field: str,
    filename: str,
    data: bytes | list[bytes],
    ctype: str,
    headers: dict[str, str] | None = None,
) -> bytes:
    """One complete HTTP/1.1 POST with a multipart body, encoded once and reused.

    `data` as a list sends one part per item, all in `field` (for /predict/batch).
    """
    boundary = uuid.uuid4().hex
    parts = b"".join(
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; '
            f'filename="{i}-{filename}"\r\nContent-Type: {ctype}\r\n\r\n'
        ).encode()
        + item
        + b"\r\n"
        for i, item in enumerate(data if isinstance(data, list) else [data])
    )
    body = parts + f"--{boundary}--\r\n".encode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    )
    return head.encode() + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
            break
    body = await reader.readexactly(length) if length else b""
    return status, body


async def _exchange(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    payload: bytes,
    sent: float,
    results: list[tuple[float, float, int, str]],
) -> bool:
    """Send one request and record its row; False when the connection broke (and is closed)."""
    writer.write(payload)
    try:
        status, body = await _read_response(reader)
    except (asyncio.IncompleteReadError, ConnectionError):
        results.append((sent, time.perf_counter(), 599, ""))
        writer.close()
        return False
    m = _VERSION.search(body)
    results.append((sent, time.perf_counter(), status, m.group(1).decode() if m else ""))
    return True


async def _client(
    host: str,
    port: int,
    requests: list[bytes],
    stop_at: float,
    index: int,
    results: list[tuple[float, float, int, str]],
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    i = index
    try:
        while time.perf_counter() < stop_at:
            payload = requests[i % len(requests)]
            i += 1
            if not await _exchange(reader, writer, payload, time.perf_counter(), results):
                reader, writer = await asyncio.open_connection(host, port)
    finally:
        writer.close()


def summarize(results: list[tuple[float, float, int, str]], duration: float) -> dict[str, Any]:
    """Latency percentiles over successful requests, throughput, status and version counts."""
    ok = [(end - start) * 1000.0 for start, end, status, _ in results if status == 200]
    statuses: dict[str, int] = {}
    versions: dict[str, int] = {}
    for _, _, status, version in results:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
        if version:
            versions[version] = versions.get(version, 0) + 1
    return {
        "requests": len(results),
        "ok": len(ok),
        "errors": len(results) - len(ok),
        "throughput_rps": round(len(ok) / duration, 1),
        "p50_ms": _percentile(ok, 0.50),
        "p95_ms": _percentile(ok, 0.95),
        "p99_ms": _percentile(ok, 0.99),
        "statuses": statuses,
        "versions": versions,
    }


async def run_load(
    url: str, requests: list[bytes], clients: int, duration: float, warmup: float = 1.0
) -> tuple[dict[str, Any], list[tuple[float, float, int, str]]]:
    """Closed loop: `clients` connections for `warmup + duration` s; stats over `duration`."""
    m = re.match(r"http://([^:/]+):(\d+)", url)
    if not m:
        raise ValueError(f"url must look like http://host:port/..., got {url!r}")
    host, port = m.group(1), int(m.group(2))
    results: list[tuple[float, float, int, str]] = []
    start = time.perf_counter()
    stop_at = start + warmup + duration
    await asyncio.gather(
        *(_client(host, port, requests, stop_at, i, results) for i in range(clients))
    )
    measured = [r for r in results if r[0] >= start + warmup]
    return summarize(measured, duration), measured


async def _one(
    pool: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]],
    host: str,
    port: int,
    payload: bytes,
    scheduled: float,
    results: list[tuple[float, float, int, str]],
    lags: list[float],
) -> None:
    lags.append(time.perf_counter() - scheduled)
    try:
        reader, writer = pool.pop() if pool else await asyncio.open_connection(host, port)
    except OSError:
        results.append((scheduled, time.perf_counter(), 598, ""))  # connection refused
        return
    if await _exchange(reader, writer, payload, scheduled, results):
        pool.append((reader, writer))


def _percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile, rounded to 0.01."""
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[max(0, math.ceil(q * len(ordered)) - 1)], 2)


async def run_open_loop(
    url: str, requests: list[bytes], rate: float, duration: float
) -> tuple[dict[str, Any], list[tuple[float, float, int, str]]]:
    """Open loop: requests arrive at `rate` per second whatever the server does (overload).

    Each latency counts from the request's scheduled arrival, not from when this process got
    round to sending it, so a late client cannot hide server delay (coordinated omission);
    `client_lag_p99_ms` says how late the client itself was.
    """
    m = re.match(r"http://([^:/]+):(\d+)", url)
    if not m:
        raise ValueError(f"bad url {url!r}")
    host, port = m.group(1), int(m.group(2))
    pool: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    results: list[tuple[float, float, int, str]] = []
    lags: list[float] = []
    tasks = []
    start = time.perf_counter()
    for i in range(int(rate * duration)):
        scheduled = start + i / rate
        delay = scheduled - time.perf_counter()
        await asyncio.sleep(max(0.0, delay))  # sleep(0) still lets running requests progress
        payload = requests[i % len(requests)]
        tasks.append(
            asyncio.ensure_future(_one(pool, host, port, payload, scheduled, results, lags))
        )
    await asyncio.gather(*tasks)
    for _, writer in pool:
        writer.close()
    summary = summarize(results, duration)
    by_status: dict[int, list[float]] = {}
    for s, e, st, _ in results:
        by_status.setdefault(st, []).append((e - s) * 1000.0)
    summary["offered_rps"] = rate
    summary["p95_503_ms"] = _percentile(by_status.get(503, []), 0.95)
    summary["p99_503_ms"] = _percentile(by_status.get(503, []), 0.99)
    summary["max_ok_ms"] = round(max(by_status.get(200, [0.0])), 2)
    summary["client_lag_p99_ms"] = _percentile([x * 1000.0 for x in lags], 0.99)
    failed_at = [s - start for s, _, st, _ in results if st != 200]
    summary["last_error_at_s"] = round(max(failed_at), 3) if failed_at else None
    return summary, results


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", required=True, help="http://host:port/path")
    p.add_argument("--file", action="append", required=True, help="image file(s) to upload")
    p.add_argument("--field", default="file")
    p.add_argument(
        "--per-request",
        type=int,
        default=1,
        help="files per request (with --field files and a /predict/batch url)",
    )
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--header", action="append", default=[], help="Name: value")
    p.add_argument("--rate", type=float, help="open loop: requests per second (ignores --clients)")
    p.add_argument("--timeline", help="write (sent, done, status, version) rows here as JSON")
    args = p.parse_args(argv)
    m = re.match(r"http://([^:/]+):(\d+)(/.*)", args.url)
    if not m:
        print(f"bad --url {args.url!r}", file=sys.stderr)
        return 2
    host, port, path = m.group(1), int(m.group(2)), m.group(3)
    headers = dict(h.split(": ", 1) for h in args.header)
    requests = []
    blobs = [Path(f).read_bytes() for f in args.file]
    for i, f in enumerate(args.file):
        ctype = "image/png" if f.endswith(".png") else "image/jpeg"
        data: bytes | list[bytes] = blobs[i]
        if args.per_request > 1:
            data = [blobs[(i + j) % len(blobs)] for j in range(args.per_request)]
        requests.append(
            multipart_request(host, port, path, args.field, Path(f).name, data, ctype, headers)
        )
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    # A collection pause here would make this process send a burst afterwards (open loop)
    # or stall its clients (closed loop): the server would be blamed for our own pause.
    gc.collect()
    gc.freeze()
    gc.disable()
    if args.rate:
        summary, rows = asyncio.run(run_open_loop(args.url, requests, args.rate, args.duration))
    else:
        load = run_load(args.url, requests, args.clients, args.duration, args.warmup)
        summary, rows = asyncio.run(load)
    if args.timeline:
        Path(args.timeline).write_text(json.dumps(rows))
    summary["items_per_s"] = round(summary["throughput_rps"] * args.per_request, 1)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
