"""A/B traffic split, the routing state and the per-request draw (design: ABTestConfig,
Property 25).

cfg = ABTestConfig(model_a_version="3", model_b_version="4", traffic_split=0.9)
choose_version(RoutingState(ab=cfg), "fashion", request_key="user-17")  # sticky "3" or "4"
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import asdict, dataclass, field
from typing import Any

_TWO_TO_64 = float(2**64)


@dataclass(frozen=True)
class ABTestConfig:
    """Send `traffic_split` of the requests to version A and the rest to version B."""

    model_a_version: str
    model_b_version: str
    traffic_split: float
    """Share of traffic for model A, in [0, 1]."""

    def __post_init__(self) -> None:
        # Accept ints for versions (MLflow reports them as ints); store strings.
        object.__setattr__(self, "model_a_version", str(self.model_a_version).strip())
        object.__setattr__(self, "model_b_version", str(self.model_b_version).strip())
        split = self.traffic_split
        if isinstance(split, bool) or not isinstance(split, int | float):
            raise ValueError(f"traffic_split must be a number in [0, 1], got {split!r}")
        if math.isnan(split) or not 0.0 <= float(split) <= 1.0:
            raise ValueError(f"traffic_split must be within [0, 1], got {split}")
        object.__setattr__(self, "traffic_split", float(split))
        for label, version in (
            ("model_a_version", self.model_a_version),
            ("model_b_version", self.model_b_version),
        ):
            if not version.isdigit():
                raise ValueError(f"{label} must be a version number, got {version!r}")
        if self.model_a_version == self.model_b_version:
            raise ValueError(f"model_a_version and model_b_version are both {self.model_a_version}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ABTestConfig:
        data = json.loads(text)
        return cls(data["model_a_version"], data["model_b_version"], data["traffic_split"])

    def involves(self, version: str | None) -> bool:
        return version is not None and str(version) in (self.model_a_version, self.model_b_version)


@dataclass(frozen=True)
class RoutingState:
    """What the registry says about one model's traffic at one moment."""

    champion: str | None = None
    latest: str | None = None
    ab: ABTestConfig | None = None
    aliases: dict[str, str] = field(default_factory=dict)

    def serving_versions(self) -> list[str]:
        """Every version that can currently receive a request."""
        if self.ab is not None:
            return [self.ab.model_a_version, self.ab.model_b_version]
        default = self.champion or self.latest
        return [default] if default else []


def request_bucket(model_name: str, request_key: str) -> float:
    """Stable position of a request key in [0, 1): the same key always lands in the same place."""
    digest = hashlib.blake2b(f"{model_name}\0{request_key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _TWO_TO_64


def choose_version(
    state: RoutingState,
    model_name: str,
    request_key: str | None = None,
    rng: random.Random | None = None,
) -> tuple[str, str]:
    """Pick the version for one request: returns (version, route) with route in
    `ab_a`, `ab_b`, `champion` (the champion alias, or the latest version when none is set).

    With an A/B config, A is chosen with probability `traffic_split`: a fresh random draw,
    or, with a `request_key`, the key's hash bucket (sticky; raising the split only moves keys
    from B to A).
    """
    if state.ab is not None:
        ab = state.ab
        u = request_bucket(model_name, request_key) if request_key is not None else None
        if u is None:
            u = (rng or random).random()
        if u < ab.traffic_split:
            return ab.model_a_version, "ab_a"
        return ab.model_b_version, "ab_b"
    version = state.champion or state.latest
    if version is None:
        raise LookupError(f"model {model_name!r} has no versions")
    return version, "champion"


def ab_config_to_dict(config: ABTestConfig | None) -> dict[str, Any] | None:
    return None if config is None else asdict(config)
