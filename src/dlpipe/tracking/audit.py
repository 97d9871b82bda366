"""The registry's audit trail: one registered-model tag per routing change (MLflow keeps no
alias history), read back oldest first."""

from __future__ import annotations

import getpass
import json
import socket
import time
import uuid
from datetime import UTC, datetime
from typing import Any

AUDIT_PREFIX = "dlpipe.audit."
"""Registered-model tags `dlpipe.audit.<ns timestamp>-<random>`: one audit entry each."""


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
