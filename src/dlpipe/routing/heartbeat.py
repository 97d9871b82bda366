"""Server heartbeats: which routing each live server applies, so a change is *known* to land.

    hb = Heartbeat("host-4121-9f3a", generation=7, digest=plan.digest, plan=plan.to_dict())
    store(hb.to_json())                                   # the server, after each switch
    laggards([Heartbeat.from_json(t) for t in stored], routing_digest(state))   # a waiter

A server reports `digest` (see `routing_digest`) only once the plan it names is the one every
request is answered by: after the switch *and* after the versions it routed away from have
drained their queues. So when every live server reports the digest of the registry's new state,
no response from a version rolled back from can still be on its way.

A heartbeat is live while it is younger than `EXPIRY_INTERVALS` of its own refresh interval;
a server that stopped cleanly removes its own, one that died stops counting once it expires.
Times are wall-clock seconds (servers on several hosts need synchronised clocks, as MLflow's
own timestamps do).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

EXPIRY_INTERVALS = 3.0
"""A heartbeat not refreshed for this many of its intervals is no longer live."""


@dataclass(frozen=True)
class Heartbeat:
    """What one server process applies now."""

    server_id: str
    generation: int
    """The server's own count of routing switches (1 = its first plan)."""
    digest: str | None
    """`routing_digest` of the applied plan, once drained; None before the first plan."""
    plan: dict[str, Any] | None = None
    """The applied plan, readable (`RoutingPlan.to_dict()`)."""
    time: float = field(default_factory=time.time)
    interval_s: float = 10.0
    """How often this server refreshes its heartbeat."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Heartbeat:
        data = json.loads(text)
        return cls(
            server_id=str(data["server_id"]),
            generation=int(data["generation"]),
            digest=data.get("digest"),
            plan=data.get("plan"),
            time=float(data["time"]),
            interval_s=float(data.get("interval_s", 10.0)),
        )

    def age_s(self, now: float | None = None) -> float:
        return (time.time() if now is None else now) - self.time

    def live(self, now: float | None = None) -> bool:
        """Refreshed recently enough to count as a running server."""
        return self.age_s(now) <= EXPIRY_INTERVALS * self.interval_s

    def describe(self, now: float | None = None) -> str:
        """One phrase for error messages: `host-1 (generation 4, plan 1a2b3c4d, 2.1 s ago)`."""
        digest = (self.digest or "none")[:8]
        return (
            f"{self.server_id} (generation {self.generation}, plan {digest}, "
            f"{self.age_s(now):.1f} s ago)"
        )


def live_heartbeats(heartbeats: Iterable[Heartbeat], now: float | None = None) -> list[Heartbeat]:
    """The live ones, by server id."""
    now = time.time() if now is None else now
    return sorted((h for h in heartbeats if h.live(now)), key=lambda h: h.server_id)


def laggards(
    heartbeats: Iterable[Heartbeat], digest: str, now: float | None = None
) -> list[Heartbeat]:
    """Live servers that do not (yet) report `digest`; empty: the change has landed everywhere."""
    return [h for h in live_heartbeats(heartbeats, now) if h.digest != digest]
