"""`RoutingPlan`: what one server applies -- the versions it serves and who answers whom."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from typing import Any

from dlpipe.routing.ab import RoutingState, ab_config_to_dict, choose_version


@dataclass(frozen=True)
class RoutingPlan:
    """The registry's routing state for one model, as a server applies it.

    Decisions use the same `choose_version` as `ModelRegistry.get_model_for_request`, so a
    sticky `X-Request-Key` lands on the same version in the server as in the registry.
    """

    model_name: str
    state: RoutingState

    @property
    def versions(self) -> frozenset[str]:
        return frozenset(self.state.serving_versions())

    def choose(
        self, request_key: str | None = None, rng: random.Random | None = None
    ) -> tuple[str, str]:
        """(version, route) for a request; sticky per `request_key` during an A/B test."""
        return choose_version(self.state, self.model_name, request_key, rng)

    @property
    def digest(self) -> str:
        """`routing_digest` of this plan's state: equal digests answer every request alike."""
        return routing_digest(self.state)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "champion": self.state.champion,
            "latest": self.state.latest,
            "ab": ab_config_to_dict(self.state.ab),
            "serving_versions": self.state.serving_versions(),
        }


def routing_digest(state: RoutingState) -> str:
    """A short fingerprint of what decides a request's version: the A/B split, else the default
    version (champion, else latest). Other aliases do not route, so they are left out: a server
    and a registry client agree on the digest whenever they route alike."""
    ab = state.ab
    routed = {
        "ab": ab_config_to_dict(ab),
        "default": None if ab is not None else (state.champion or state.latest),
    }
    text = json.dumps(routed, sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()
