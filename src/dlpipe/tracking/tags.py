"""How dlpipe metadata and routing live in MLflow tags (model-version and registered-model tags)."""

from __future__ import annotations

import json
from typing import Any

from dlpipe.routing import ABTestConfig
from dlpipe.tracking.metadata import REQUIRED_FIELDS, ModelMetadata
from dlpipe.tracking.store import RegistryError

TAG_PREFIX = "dlpipe."
METADATA_TAG = "dlpipe.metadata"
"""Model-version tag holding the full `ModelMetadata` JSON."""
AB_TAG = "dlpipe.ab_config"
"""Registered-model tag holding the active `ABTestConfig` JSON."""
MAX_TAG_VALUE = 100_000  # MLflow's limit for model registry tag values


def coerce_metadata(metadata: ModelMetadata | dict[str, Any]) -> ModelMetadata:
    """A `ModelMetadata` from either form; incomplete metadata raises naming the missing fields."""
    if isinstance(metadata, ModelMetadata):
        meta = metadata
    elif isinstance(metadata, dict):
        absent = [
            name for name in REQUIRED_FIELDS if name not in metadata or metadata[name] in (None, "")
        ]
        if absent:
            raise RegistryError(f"metadata is missing required fields: {', '.join(absent)}")
        try:
            meta = ModelMetadata.from_dict(metadata)
        except (TypeError, ValueError) as err:
            raise RegistryError(f"invalid metadata: {err}") from err
    else:
        raise RegistryError(
            f"metadata must be ModelMetadata or dict, got {type(metadata).__name__}"
        )
    missing = meta.missing_fields()
    if missing:
        raise RegistryError(f"metadata is missing required fields: {', '.join(missing)}")
    return meta


def metadata_tags(meta: ModelMetadata) -> dict[str, str]:
    """One `dlpipe.<field>` tag per metadata field plus the full JSON (design Properties 8, 24).

    `version` has no tag of its own: it is the number of the model version holding the tags.

    Strings are stored as they are; everything else as JSON (so None is `null`).
    """
    data = meta.to_dict()
    tags = {
        TAG_PREFIX + key: value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        for key, value in data.items()
        if key != "version"  # that is the model version's own number
    }
    tags[METADATA_TAG] = json.dumps(data, sort_keys=True)
    too_long = [k for k, v in tags.items() if len(v) > MAX_TAG_VALUE]
    if too_long:
        raise RegistryError(
            f"metadata too large for the registry: {', '.join(too_long)} "
            f"over {MAX_TAG_VALUE} characters"
        )
    return tags


def ab_from_tags(name: str, tags: dict[str, str]) -> ABTestConfig | None:
    """The A/B split stored in a registered model's tags, if any."""
    raw = tags.get(AB_TAG)
    if not raw:
        return None
    try:
        return ABTestConfig.from_json(raw)
    except (ValueError, KeyError) as err:
        raise RegistryError(f"model {name!r} has an unreadable A/B config: {err}") from err
