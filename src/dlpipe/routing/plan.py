"""`RoutingPlan`: what one server applies -- the versions it serves and who answers whom."""

from __future__ import annotations

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

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "champion": self.state.champion,
            "latest": self.state.latest,
            "ab": ab_config_to_dict(self.state.ab),
            "serving_versions": self.state.serving_versions(),
        }
