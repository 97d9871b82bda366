"""Routing: which version of a model answers a request.

One home for the routing state a registry holds (`RoutingState`: champion, latest, A/B split),
the per-request draw (`choose_version`, sticky by request key), the cached read every process
keeps (`RoutingCache`) with its cross-process change signal (`RoutingSignal`), the plan a
server applies (`RoutingPlan`, fingerprinted by `routing_digest`) and the heartbeats in which
servers report it (`Heartbeat`, `laggards`). The MLflow registry writes and reads these through
`dlpipe.tracking.registry`; the server follows them through `dlpipe.serving.sources`. No
dependency on MLflow or any framework.
"""

from dlpipe.routing.ab import (
    ABTestConfig,
    RoutingState,
    ab_config_to_dict,
    choose_version,
    request_bucket,
)
from dlpipe.routing.cache import RoutingCache
from dlpipe.routing.heartbeat import Heartbeat, laggards, live_heartbeats
from dlpipe.routing.plan import RoutingPlan, routing_digest
from dlpipe.routing.signal import RoutingSignal, signal_path_for

__all__ = [
    "ABTestConfig",
    "Heartbeat",
    "RoutingCache",
    "RoutingPlan",
    "RoutingSignal",
    "RoutingState",
    "ab_config_to_dict",
    "choose_version",
    "laggards",
    "live_heartbeats",
    "request_bucket",
    "routing_digest",
    "signal_path_for",
]
