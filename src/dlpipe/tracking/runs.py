"""Optimization variants as child runs of the run that produced their parent version.

    run_id = start_variant_run(registry, "fashion_mnist_cnn", parent, variant, max_drop)
    registry.register_model(package, meta, run_id=run_id, artifact_path="model")  # kept only
    end_variant_run(registry, run_id, variant, version="4")

Every variant (kept, refused, skipped or failed) becomes one run named after its target, nested
under the parent's source run (MLflow's `mlflow.parentRunId` tag, same experiment), so the UI
lists the variants under the training run and compares them side by side:

    metrics  accuracy, accuracy_drop, parent_accuracy, agreement, size_mb,
             latency_p50_ms, latency_p95_ms, latency_min_ms, throughput_per_s
    params   target, precision, parent_version, max_accuracy_drop, detail.<build setting>
    tags     dlpipe.status, dlpipe.reason, dlpipe.model_version (when registered)

`variant` is `VariantResult.to_dict()` (dlpipe.optimize.variants): tracking reads the dict and
does not import the optimizer.
"""

from __future__ import annotations

import math
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.utils.time import get_current_time_millis

from dlpipe.tracking.metadata import ModelMetadata
from dlpipe.tracking.store import retry_locked

STATUS_TAG = "dlpipe.status"
REASON_TAG = "dlpipe.reason"
VERSION_TAG = "dlpipe.model_version"
_MAX_TAG = 5000  # MLflow's run tag value limit is 8000 characters; keep room
_MAX_PARAM = 6000
_LATENCY_METRICS = {
    "p50_ms": "latency_p50_ms",
    "p95_ms": "latency_p95_ms",
    "min_ms": "latency_min_ms",
    "throughput_per_s": "throughput_per_s",
}


def variant_metrics(variant: dict[str, Any]) -> dict[str, float]:
    """The numbers a variant run logs (only those that were measured)."""
    out: dict[str, float | None] = {
        "accuracy": variant.get("accuracy"),
        "accuracy_drop": variant.get("drop"),
        "size_mb": variant.get("size_mb"),
        "agreement": (variant.get("details") or {}).get("agreement"),
    }
    if variant.get("accuracy") is not None and variant.get("drop") is not None:
        out["parent_accuracy"] = float(variant["accuracy"]) + float(variant["drop"])
    for key, name in _LATENCY_METRICS.items():
        out[name] = (variant.get("latency") or {}).get(key)
    return {
        k: float(v)
        for k, v in out.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }


def variant_params(
    variant: dict[str, Any], parent_version: str, max_accuracy_drop: float
) -> dict[str, str]:
    params = {
        "target": str(variant["target"]),
        "precision": str(variant["precision"]),
        "parent_version": str(parent_version),
        "max_accuracy_drop": str(max_accuracy_drop),
    }
    for key, value in sorted((variant.get("details") or {}).items()):
        if key != "agreement" and isinstance(value, str | int | float | bool):
            params[f"detail.{key}"] = str(value)[:_MAX_PARAM]
    return params


def start_variant_run(
    registry: Any,
    model_name: str,
    parent: ModelMetadata,
    variant: dict[str, Any],
    max_accuracy_drop: float,
) -> str:
    """Open the variant's run under the parent version's source run, with everything logged
    but the registered version; returns the run id (close it with `end_variant_run`)."""
    tags = {STATUS_TAG: str(variant["status"])}
    if variant.get("reason"):
        tags[REASON_TAG] = str(variant["reason"])[:_MAX_TAG]
    run_id: str = registry.start_run(
        model_name, str(variant["target"]), parent_run_id=parent.source_run_id, tags=tags
    )
    now = get_current_time_millis()
    metrics = [Metric(k, v, now, 0) for k, v in variant_metrics(variant).items()]
    params = [
        Param(k, v) for k, v in variant_params(variant, parent.version, max_accuracy_drop).items()
    ]
    client = registry.client
    retry_locked(lambda: client.log_batch(run_id, metrics=metrics, params=params))
    return run_id


def end_variant_run(
    registry: Any, run_id: str, variant: dict[str, Any], version: str | None = None
) -> None:
    """Tag the registered version (if any) and close the run (FAILED for a failed variant)."""
    client = registry.client
    if version is not None:
        tag = [RunTag(VERSION_TAG, str(version))]
        retry_locked(lambda: client.log_batch(run_id, tags=tag))
    status = "FAILED" if variant.get("status") == "failed" else "FINISHED"
    retry_locked(lambda: client.set_terminated(run_id, status=status))


def log_variant_run(
    registry: Any,
    model_name: str,
    parent: ModelMetadata,
    variant: dict[str, Any],
    max_accuracy_drop: float,
) -> str:
    """A variant that was not registered (refused, skipped, failed): its run, opened and closed."""
    run_id = start_variant_run(registry, model_name, parent, variant, max_accuracy_drop)
    end_variant_run(registry, run_id, variant)
    return run_id
