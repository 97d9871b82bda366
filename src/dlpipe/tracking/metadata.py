"""`ModelMetadata`: what every registered version carries (design: Model Metadata)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any, Literal

from dlpipe.config import PreprocessingConfig

Framework = Literal["pytorch", "tensorflow", "onnx", "tensorrt"]
Precision = Literal["fp32", "fp16", "int8"]

REQUIRED_FIELDS = (
    "model_name",
    "framework",
    "precision",
    "model_size_mb",
    "training_date",
    "accuracy_metrics",
    "preprocessing_config",
)


@dataclass
class ModelMetadata:
    """Metadata of one model version; `version` is assigned by the registry."""

    model_name: str
    framework: Framework
    precision: Precision
    model_size_mb: float
    training_date: datetime
    accuracy_metrics: dict[str, float]
    preprocessing_config: PreprocessingConfig
    version: str = ""
    source_run_id: str | None = None
    parent_version: str | None = None
    latency_ms: float | None = None
    format_details: dict[str, Any] = field(default_factory=dict)

    def missing_fields(self) -> list[str]:
        """Names of required fields that are empty."""
        missing = []
        for name in REQUIRED_FIELDS:
            value = getattr(self, name)
            if value is None or value == "" or (name == "accuracy_metrics" and not value):
                missing.append(name)
        if self.model_size_mb is not None and self.model_size_mb <= 0:
            missing.append("model_size_mb")
        return missing

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (dates as ISO 8601, preprocessing config as a dict)."""
        out = asdict(self)
        out["training_date"] = self.training_date.isoformat()
        out["preprocessing_config"] = self.preprocessing_config.model_dump(mode="json")
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelMetadata:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown metadata fields: {', '.join(unknown)}")
        values = dict(data)
        date = values.get("training_date")
        if isinstance(date, str):
            values["training_date"] = datetime.fromisoformat(date)
        pre = values.get("preprocessing_config")
        if isinstance(pre, dict):
            values["preprocessing_config"] = PreprocessingConfig.model_validate(pre)
        if isinstance(values.get("accuracy_metrics"), dict):
            values["accuracy_metrics"] = {
                k: float(v) for k, v in values["accuracy_metrics"].items()
            }
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> ModelMetadata:
        return cls.from_dict(json.loads(text))


def utc_now() -> datetime:
    return datetime.now(UTC)
