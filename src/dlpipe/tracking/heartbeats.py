"""Server heartbeats in the registry, and waiting until a routing change has landed everywhere.

Each `dlpipe serve` process keeps one registered-model tag `dlpipe.server.<server id>` holding
its `dlpipe.routing.Heartbeat` (JSON): written after every routing switch, once the versions it
routed away from have drained, and refreshed periodically. Registered-model tags go through the
MLflow client, so this works alike for local stores (sqlite, file) and remote ones (an MLflow
server over http): no shared file system, no server addresses or keys needed by the waiter.

    reader = RegistryReader(uri)
    result = wait_until_applied(reader, "fashion", timeout_s=60)   # raises RolloutTimeout
"""

from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from dlpipe.routing import Heartbeat, laggards, live_heartbeats, routing_digest
from dlpipe.tracking.store import RegistryError, retry_locked

HEARTBEAT_PREFIX = "dlpipe.server."
"""Registered-model tags `dlpipe.server.<server id>`: one live heartbeat per server process."""


def heartbeat_key(server_id: str) -> str:
    # MLflow tag keys allow letters, digits, `_ - . / space`; host names may hold more.
    return HEARTBEAT_PREFIX + re.sub(r"[^A-Za-z0-9_.-]", "_", server_id)


def heartbeats_from_tags(tags: dict[str, str]) -> list[Heartbeat]:
    """Every heartbeat among a registered model's tags (live or not); unreadable ones skipped."""
    out = []
    for key, value in tags.items():
        if key.startswith(HEARTBEAT_PREFIX):
            try:
                out.append(Heartbeat.from_json(value))
            except (ValueError, KeyError, TypeError):
                continue  # a foreign or truncated tag is not a server we can wait for
    return sorted(out, key=lambda h: h.server_id)


def write_heartbeat(client: MlflowClient, name: str, heartbeat: Heartbeat) -> None:
    key = heartbeat_key(heartbeat.server_id)
    retry_locked(lambda: client.set_registered_model_tag(name, key, heartbeat.to_json()))


def delete_heartbeat(client: MlflowClient, name: str, server_id: str) -> None:
    """Remove a server's heartbeat (it stops cleanly); absent already is fine."""
    with contextlib.suppress(MlflowException):
        retry_locked(lambda: client.delete_registered_model_tag(name, heartbeat_key(server_id)))


def prune_heartbeats(client: MlflowClient, name: str, older_than_s: float = 3600.0) -> int:
    """Delete heartbeats not refreshed for `older_than_s` (servers that died); how many."""
    model = retry_locked(lambda: client.get_registered_model(name))
    now = time.time()
    stale = [h for h in heartbeats_from_tags(model.tags) if h.age_s(now) > older_than_s]
    for h in stale:
        delete_heartbeat(client, name, h.server_id)
    return len(stale)


class RolloutTimeout(RegistryError):
    """Some live servers did not apply the routing change in time; `laggards` names them."""

    def __init__(self, message: str, laggards: list[Heartbeat], digest: str) -> None:
        super().__init__(message)
        self.laggards = laggards
        self.digest = digest


@dataclass(frozen=True)
class Applied:
    """A routing change every live server applies."""

    digest: str
    servers: list[str]
    waited_s: float
    confirmed_at: float
    """Wall-clock time the waiter saw the last server confirm."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "servers": self.servers,
            "waited_s": round(self.waited_s, 3),
            "confirmed_at": self.confirmed_at,
        }


def wait_until_applied(
    reader: Any, name: str, timeout_s: float = 60.0, poll_s: float = 0.05
) -> Applied:
    """Block until every live server of `name` applies the registry's routing state now.

    Args:
        reader: a `RegistryReader` (or `ModelRegistry`) on the store the servers follow.
        timeout_s: then `RolloutTimeout` naming the servers that still apply another plan.

    No live server at all is success (nothing serves the old routing); a server that dies
    meanwhile stops being waited for once its heartbeat expires.
    """
    digest = routing_digest(reader.fetch_routing(name))
    started = time.monotonic()
    while True:
        beats = reader.server_heartbeats(name)
        now = time.time()
        behind = laggards(beats, digest, now)
        if not behind:
            servers = [h.server_id for h in live_heartbeats(beats, now)]
            return Applied(digest, servers, time.monotonic() - started, now)
        if time.monotonic() - started >= timeout_s:
            names = "; ".join(h.describe(now) for h in behind)
            raise RolloutTimeout(
                f"routing of {name!r} (plan {digest[:8]}) not applied within {timeout_s:g} s "
                f"by {len(behind)} live server(s): {names}",
                behind,
                digest,
            )
        time.sleep(poll_s)
