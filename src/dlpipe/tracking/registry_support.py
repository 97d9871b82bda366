"""Helpers of `ModelRegistry`: errors, sqlite lock retries, metadata tags and the audit trail."""

from __future__ import annotations

import getpass
import json
import random
import socket
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from mlflow.exceptions import MlflowException

from dlpipe.tracking.metadata import REQUIRED_FIELDS, ModelMetadata

T = TypeVar("T")

TAG_PREFIX = "dlpipe."
METADATA_TAG = "dlpipe.metadata"
"""Model-version tag holding the full `ModelMetadata` JSON."""
AB_TAG = "dlpipe.ab_config"
"""Registered-model tag holding the active `ABTestConfig` JSON."""
AUDIT_PREFIX = "dlpipe.audit."
"""Registered-model tags `dlpipe.audit.<ns timestamp>-<random>`: one audit entry each."""
MAX_TAG_VALUE = 100_000  # MLflow's limit for model registry tag values

# File names of a model package, as in `tracking.package` (not imported here: it pulls in torch,
# which registry readers such as an ONNX Runtime server do not need). A test keeps them equal.
PACKAGE_METADATA_FILE = "metadata.json"
PACKAGE_MODEL_FILES = ("weights.pt", "model.onnx")


class RegistryError(ValueError):
    """A registry request that cannot be done; the message says what was wrong."""


def is_locked_error(err: BaseException) -> bool:
    text = str(err).lower()
    return "database is locked" in text or "database table is locked" in text


def retry_locked(call: Callable[[], T], attempts: int = 40, first_delay: float = 0.02) -> T:
    """Run `call`, retrying with jittered exponential backoff while sqlite reports a lock."""
    delay = first_delay
    for attempt in range(attempts):
        try:
            return call()
        except Exception as err:
            if not is_locked_error(err) or attempt == attempts - 1:
                raise
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 1.0)
    raise AssertionError("unreachable")


def error_code(err: MlflowException) -> str:
    return str(getattr(err, "error_code", ""))


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


def current_user() -> str:
    """`user@host` of whoever runs this process (for the audit trail)."""
    try:
        user = getpass.getuser()
    except Exception:  # no login name in some containers
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def audit_entry(
    action: str, from_value: Any, to_value: Any, **detail: Any
) -> tuple[str, str, dict[str, Any]]:
    """(tag key, tag value, entry) for one audit record; keys sort by time."""
    now = time.time_ns()
    entry: dict[str, Any] = {
        "time": datetime.fromtimestamp(now / 1e9, UTC).isoformat(),
        "user": current_user(),
        "action": action,
        "from": from_value,
        "to": to_value,
    }
    if detail:
        entry["detail"] = detail
    key = f"{AUDIT_PREFIX}{now:020d}-{uuid.uuid4().hex[:6]}"
    return key, json.dumps(entry, sort_keys=True), entry


def audit_entries(tags: dict[str, str]) -> list[dict[str, Any]]:
    """Audit records from registered-model tags, oldest first."""
    out = []
    for key in sorted(k for k in tags if k.startswith(AUDIT_PREFIX)):
        try:
            out.append(json.loads(tags[key]))
        except json.JSONDecodeError:
            out.append({"action": "unreadable", "raw": tags[key]})
    return out
