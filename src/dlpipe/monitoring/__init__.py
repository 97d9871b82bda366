"""Monitoring: Prometheus metrics (`MetricsCollector`), NVML GPU gauges, structured JSON logs."""

from dlpipe.monitoring.metrics import LATENCY_BUCKETS, METRIC_NAMES, MetricsCollector

__all__ = ["LATENCY_BUCKETS", "METRIC_NAMES", "MetricsCollector"]
