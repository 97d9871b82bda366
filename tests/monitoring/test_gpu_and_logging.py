"""GpuMonitor with injected readings (and real NVML absence), JSON log lines with request ids."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
import time

import pytest
import torch

from dlpipe.monitoring import MetricsCollector
from dlpipe.monitoring.gpu import GpuMonitor, GpuReading
from dlpipe.monitoring.logging import bind_request_id, configure_logging, request_id_var


class FakeReader:
    def __init__(self) -> None:
        self.calls = 0
        self.polled = threading.Event()

    def __call__(self) -> list[GpuReading]:
        self.calls += 1
        if self.calls >= 3:
            self.polled.set()
        return [
            GpuReading("0", 10.0 * self.calls, 1_000 * self.calls, 16_000),
            GpuReading("1", 5.0, 2_000, 16_000),
        ]


def test_poll_once_feeds_every_gpu_into_the_gauges() -> None:
    c = MetricsCollector()
    monitor = GpuMonitor(c, reader=FakeReader(), interval_s=1.0)
    readings = monitor.poll_once()
    assert [r.gpu for r in readings] == ["0", "1"]
    reg = c.registry
    assert reg.get_sample_value("dlpipe_gpu_utilization_percent", {"gpu": "0"}) == 10
    assert reg.get_sample_value("dlpipe_gpu_memory_used_bytes", {"gpu": "1"}) == 2000
    assert reg.get_sample_value("dlpipe_gpu_memory_total_bytes", {"gpu": "1"}) == 16000
    assert c.get_metrics()["gpus"]["0"] == {
        "utilization_percent": 10.0,
        "memory_used_bytes": 1000.0,
        "memory_total_bytes": 16000.0,
    }


def test_background_thread_polls_repeatedly_and_stops() -> None:
    c = MetricsCollector()
    reader = FakeReader()
    with GpuMonitor(c, reader=reader, interval_s=0.01) as monitor:
        assert reader.polled.wait(5.0)
    assert monitor._thread is None
    calls = reader.calls
    assert c.registry.get_sample_value("dlpipe_gpu_utilization_percent", {"gpu": "0"}) >= 30
    time.sleep(0.05)
    assert reader.calls == calls  # stopped: no more polls


def test_stop_then_start_resumes_polling() -> None:
    reader = FakeReader()
    monitor = GpuMonitor(MetricsCollector(), reader=reader, interval_s=0.01)
    monitor.start()
    assert reader.polled.wait(5.0)
    monitor.stop()
    reader.polled.clear()
    reader.calls = 0
    monitor.start()
    assert reader.polled.wait(5.0)
    monitor.stop()
    assert monitor.enabled  # an injected reader is not NVML: stop() leaves it in place


def test_a_failing_reader_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> list[GpuReading]:
        raise OSError("driver went away")

    monitor = GpuMonitor(MetricsCollector(), reader=broken)
    with caplog.at_level(logging.ERROR, logger="dlpipe.monitoring.gpu"):
        assert monitor.poll_once() == []
    assert "reading GPU metrics failed" in caplog.text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_without_a_gpu_the_nvml_monitor_is_a_logged_no_op(caplog: pytest.LogCaptureFixture) -> None:
    c = MetricsCollector()
    with caplog.at_level(logging.INFO, logger="dlpipe.monitoring.gpu"):
        monitor = GpuMonitor(c)
    assert not monitor.enabled
    assert "no GPU metrics" in caplog.text
    monitor.start()
    assert monitor.poll_once() == []
    monitor.stop()
    assert c.registry.get_sample_value("dlpipe_gpu_utilization_percent", {"gpu": "0"}) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_nvml_readings_on_a_gpu_host() -> None:
    c = MetricsCollector()
    monitor = GpuMonitor(c)
    assert monitor.enabled
    readings = monitor.poll_once()
    monitor.stop()
    assert not monitor.enabled  # NVML released
    monitor.start()  # and opened again
    assert monitor.enabled
    monitor.stop()
    assert readings and readings[0].memory_total_bytes > 0
    assert c.registry.get_sample_value("dlpipe_gpu_memory_total_bytes", {"gpu": "0"}) > 0


def test_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="interval_s"):
        GpuMonitor(MetricsCollector(), reader=FakeReader(), interval_s=0)


@pytest.fixture
def json_log() -> io.StringIO:
    stream = io.StringIO()
    root = logging.getLogger()
    level = root.level
    handler = configure_logging("DEBUG", stream=stream)
    yield stream
    root.removeHandler(handler)
    root.setLevel(level)


def test_log_lines_are_json_with_request_id_and_extras(json_log: io.StringIO) -> None:
    log = logging.getLogger("dlpipe.test")
    log.info("outside")
    with bind_request_id("req-42"):
        log.info("predicted %d", 3, extra={"model_version": "7"})
        try:
            raise ValueError("bad pixel")
        except ValueError:
            log.exception("failed")
    assert request_id_var.get() is None
    lines = [json.loads(x) for x in json_log.getvalue().splitlines()]
    assert len(lines) == 3
    assert "request_id" not in lines[0] and lines[0]["message"] == "outside"
    assert lines[1]["request_id"] == "req-42" and lines[1]["model_version"] == "7"
    assert lines[1]["message"] == "predicted 3" and lines[1]["level"] == "INFO"
    assert lines[1]["logger"] == "dlpipe.test"
    assert "ValueError: bad pixel" in lines[2]["exception"]


def test_collector_error_lines_are_structured(json_log: io.StringIO) -> None:
    with bind_request_id("abc"):
        MetricsCollector().record_error("timeout", "deadline 100 ms")
    (line,) = [json.loads(x) for x in json_log.getvalue().splitlines()]
    assert line["error_type"] == "timeout" and line["detail"] == "deadline 100 ms"
    assert line["request_id"] == "abc" and line["level"] == "WARNING"


def test_request_ids_do_not_leak_between_concurrent_tasks(json_log: io.StringIO) -> None:
    log = logging.getLogger("dlpipe.test")

    async def handle(rid: str) -> None:
        with bind_request_id(rid):
            await asyncio.sleep(0.01)
            log.info("done", extra={"expected": rid})

    async def main() -> None:
        await asyncio.gather(*(handle(f"r{i}") for i in range(5)))

    asyncio.run(main())
    lines = [json.loads(x) for x in json_log.getvalue().splitlines()]
    lines = [x for x in lines if x["logger"] == "dlpipe.test"]
    assert len(lines) == 5
    assert all(x["request_id"] == x["expected"] for x in lines)


def test_configuring_twice_does_not_duplicate_lines(json_log: io.StringIO) -> None:
    second = io.StringIO()
    handler = configure_logging("INFO", stream=second)
    try:
        logging.getLogger("dlpipe.test").info("once")
        assert json_log.getvalue() == ""
        assert len(second.getvalue().splitlines()) == 1
    finally:
        logging.getLogger().removeHandler(handler)
    with pytest.raises(ValueError, match="log level"):
        configure_logging("LOUD")
