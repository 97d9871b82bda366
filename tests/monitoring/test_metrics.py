"""MetricsCollector: contract names, buckets, exposition and the get_metrics snapshot."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from dlpipe.monitoring import LATENCY_BUCKETS, METRIC_NAMES, MetricsCollector

CONTRACT = {  # docs/architecture.md, "Monitoring metric names"
    "dlpipe_request_latency_seconds": ("histogram", {"endpoint", "model_version", "status"}),
    "dlpipe_requests": ("counter", {"endpoint", "model_version", "status"}),
    "dlpipe_errors": ("counter", {"error_type"}),
    "dlpipe_queue_wait_seconds": ("histogram", {"model_version"}),
    "dlpipe_inference_seconds": ("histogram", {"model_version"}),
    "dlpipe_batch_size": ("histogram", {"model_version"}),
    "dlpipe_in_flight_requests": ("gauge", set()),
    "dlpipe_queue_depth": ("gauge", {"model_version"}),
    "dlpipe_queue_capacity": ("gauge", {"model_version"}),
    "dlpipe_routed_requests": ("counter", {"model_name", "model_version", "route"}),
    "dlpipe_gpu_utilization_percent": ("gauge", {"gpu"}),
    "dlpipe_gpu_memory_used_bytes": ("gauge", {"gpu"}),
    "dlpipe_gpu_memory_total_bytes": ("gauge", {"gpu"}),
    "dlpipe_model_info": ("gauge", {"model_name", "model_version", "framework", "precision"}),
    "dlpipe_up": ("gauge", set()),
}


def _families(collector: MetricsCollector) -> dict:
    body, content_type = collector.render()
    assert content_type.startswith("text/plain")
    families = text_string_to_metric_families(body.decode())
    # prometheus_client also exposes `<name>_created` timestamps of counters and histograms.
    return {f.name: f for f in families if not f.name.endswith("_created")}


def _exercise(c: MetricsCollector) -> None:
    c.record_latency(12.0, endpoint="predict", model_version="3", status="200")
    c.record_error("invalid_input", "not a PNG")
    c.record_batch(4, 0.002, 0.003, "3")
    c.set_queue("3", depth=2, capacity=64)
    c.record_route("fmnist", "3", "champion")
    c.record_gpu_utilization(40.0)
    c.record_gpu_memory(1_000, 8_000)
    c.set_model_info("fmnist", "3", "onnx", "int8")


def test_exposes_exactly_the_contract_metrics_with_their_types_and_labels() -> None:
    c = MetricsCollector()
    _exercise(c)
    with c.track_in_flight():
        families = _families(c)
    contract_names = set(CONTRACT) | {"dlpipe_throughput_rps"}
    assert set(families) == contract_names
    for name, (kind, labels) in CONTRACT.items():
        fam = families[name]
        assert fam.type == kind, name
        sample_labels = {k for s in fam.samples for k in s.labels} - {"le"}
        assert sample_labels == labels, name
    exposed = {
        s.name for f in families.values() for s in f.samples if not s.name.endswith("_created")
    }
    assert "dlpipe_requests_total" in exposed and "dlpipe_errors_total" in exposed
    assert {n.removesuffix("_total") for n in METRIC_NAMES} == contract_names


def test_latency_buckets_are_the_contract_buckets() -> None:
    c = MetricsCollector()
    c.record_latency(0.5)
    fam = _families(c)["dlpipe_request_latency_seconds"]
    bounds = [float(s.labels["le"]) for s in fam.samples if s.name.endswith("_bucket")]
    assert bounds == [*LATENCY_BUCKETS, float("inf")]
    assert LATENCY_BUCKETS[:4] == (0.001, 0.0025, 0.005, 0.0075) and LATENCY_BUCKETS[-1] == 10


def test_record_latency_observes_histogram_and_counts_request() -> None:
    c = MetricsCollector()
    for ms in (3.0, 8.0, 60.0):
        c.record_latency(ms, endpoint="predict", model_version="2", status="200")
    c.record_latency(1.0, endpoint="predict", model_version="2", status="400")
    reg = c.registry
    labels = {"endpoint": "predict", "model_version": "2", "status": "200"}
    assert reg.get_sample_value("dlpipe_requests_total", labels) == 3
    assert reg.get_sample_value("dlpipe_request_latency_seconds_count", labels) == 3
    assert reg.get_sample_value("dlpipe_request_latency_seconds_sum", labels) == pytest.approx(
        0.071
    )
    le_10ms = reg.get_sample_value(
        "dlpipe_request_latency_seconds_bucket", {**labels, "le": "0.01"}
    )
    assert le_10ms == 2
    assert reg.get_sample_value("dlpipe_requests_total", {**labels, "status": "400"}) == 1


def test_collectors_are_independent_and_never_touch_the_global_registry() -> None:
    from prometheus_client import REGISTRY

    a, b = MetricsCollector(), MetricsCollector()
    a.record_latency(5.0)
    labels = {"endpoint": "predict", "model_version": "", "status": "200"}
    assert a.registry.get_sample_value("dlpipe_requests_total", labels) == 1
    assert b.registry.get_sample_value("dlpipe_requests_total", labels) is None
    assert REGISTRY.get_sample_value("dlpipe_requests_total", labels) is None
    shared = CollectorRegistry()
    assert MetricsCollector(shared).registry is shared


def test_record_error_counts_by_type_and_logs_the_detail(caplog: pytest.LogCaptureFixture) -> None:
    c = MetricsCollector()
    with caplog.at_level(logging.WARNING, logger="dlpipe.monitoring"):
        c.record_error("invalid_input", "file is not an image")
        c.record_error("invalid_input")
        c.record_error("timeout", "deadline 200 ms")
    reg = c.registry
    assert reg.get_sample_value("dlpipe_errors_total", {"error_type": "invalid_input"}) == 2
    assert reg.get_sample_value("dlpipe_errors_total", {"error_type": "timeout"}) == 1
    records = [r for r in caplog.records if getattr(r, "event", None) == "error"]
    assert [r.error_type for r in records] == ["invalid_input", "invalid_input", "timeout"]
    assert records[0].detail == "file is not an image"
    assert c.get_metrics()["errors_by_type"] == {"invalid_input": 2, "timeout": 1}


def test_batch_queue_route_gpu_and_model_info_gauges() -> None:
    c = MetricsCollector()
    _exercise(c)
    c.record_batch(16, 0.004, 0.010, "3")
    reg = c.registry
    v = {"model_version": "3"}
    assert reg.get_sample_value("dlpipe_batch_size_count", v) == 2
    assert reg.get_sample_value("dlpipe_batch_size_sum", v) == 20
    assert reg.get_sample_value("dlpipe_queue_wait_seconds_sum", v) == pytest.approx(0.006)
    assert reg.get_sample_value("dlpipe_inference_seconds_sum", v) == pytest.approx(0.013)
    assert reg.get_sample_value("dlpipe_queue_depth", v) == 2
    assert reg.get_sample_value("dlpipe_queue_capacity", v) == 64
    route = {"model_name": "fmnist", "model_version": "3", "route": "champion"}
    assert reg.get_sample_value("dlpipe_routed_requests_total", route) == 1
    assert reg.get_sample_value("dlpipe_gpu_utilization_percent", {"gpu": "0"}) == 40
    assert reg.get_sample_value("dlpipe_gpu_memory_used_bytes", {"gpu": "0"}) == 1000
    assert reg.get_sample_value("dlpipe_gpu_memory_total_bytes", {"gpu": "0"}) == 8000
    info = {"model_name": "fmnist", "model_version": "3", "framework": "onnx", "precision": "int8"}
    assert reg.get_sample_value("dlpipe_model_info", info) == 1
    c.remove_model_info("fmnist", "3", "onnx", "int8")
    c.remove_model_info("fmnist", "99")  # never set: no error
    assert reg.get_sample_value("dlpipe_model_info", info) is None
    assert reg.get_sample_value("dlpipe_up") == 1
    c.record_throughput(12.5)
    assert reg.get_sample_value("dlpipe_throughput_rps") == 12.5


def test_in_flight_gauge_returns_to_zero_even_when_the_block_raises() -> None:
    c = MetricsCollector()
    with c.track_in_flight(), c.track_in_flight():
        assert c.registry.get_sample_value("dlpipe_in_flight_requests") == 2
        assert c.get_metrics()["in_flight"] == 2
    with pytest.raises(RuntimeError), c.track_in_flight():
        raise RuntimeError("boom")
    assert c.registry.get_sample_value("dlpipe_in_flight_requests") == 0
    assert c.get_metrics()["in_flight"] == 0


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda c: c.record_latency(-1.0), "latency_ms"),
        (lambda c: c.record_latency(float("nan")), "latency_ms"),
        (lambda c: c.record_error(""), "error_type"),
        (lambda c: c.record_batch(0, 0.0, 0.0, "1"), "batch_size"),
        (lambda c: c.record_batch(2, -0.1, 0.0, "1"), "queue_wait_s"),
        (lambda c: c.record_route("m", "1", "random"), "route"),
        (lambda c: c.record_gpu_utilization(101.0), "utilization_percent"),
        (lambda c: c.record_gpu_memory(10, 5), "used_bytes"),
        (lambda c: c.set_queue("1", -1, 4), "depth"),
        (lambda c: c.record_throughput(-3), "requests_per_second"),
    ],
)
def test_bad_values_raise_a_clear_error_and_record_nothing(call, message: str) -> None:
    c = MetricsCollector()
    before = c.render()[0]
    with pytest.raises(ValueError, match=message):
        call(c)
    after = c.render()[0]
    strip = lambda b: [ln for ln in b.decode().splitlines() if "_created" not in ln]  # noqa: E731
    assert strip(after) == strip(before)


def test_get_metrics_snapshot_counts_quantiles_and_windowed_throughput(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import json

    import dlpipe.monitoring.metrics as metrics_module

    clock = [1000.0]
    monkeypatch.setattr(metrics_module.time, "monotonic", lambda: clock[0])
    c = MetricsCollector(window_s=10.0)
    empty = c.get_metrics()
    assert empty["requests_total"] == 0 and empty["throughput_rps"] == 0
    assert empty["latency"]["p95_ms"] is None
    for i in range(100):  # 100 requests over 5 s, latency 1..100 ms
        clock[0] = 1000.0 + i * 0.05
        c.record_latency(float(i + 1))
    clock[0] = 1010.0  # window now covers t in [1000, 1010] -> all 100 requests
    snap = c.get_metrics()
    json.dumps(snap)
    assert snap["requests_total"] == 100
    assert snap["latency"] == {"p50_ms": 50.0, "p95_ms": 95.0, "p99_ms": 99.0}
    assert snap["throughput_rps"] == pytest.approx(100 / 10.0)
    clock[0] = 1012.5  # requests before t=1002.5 (the first 50) drop out of the window
    snap = c.get_metrics()
    assert snap["requests_in_window"] == 50
    assert snap["throughput_rps"] == pytest.approx(50 / 10.0)
    assert snap["requests_total"] == 100
    assert snap["latency"]["p50_ms"] == 75.0
