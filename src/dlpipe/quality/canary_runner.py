"""`CanaryRunner`: a canary as a long-lived process, from the prediction log to the registry.

    runner = CanaryRunner(ModelRegistry(uri), "fashion", "4", CanaryPolicy(),
                          log_dir="/var/lib/dlpipe/predictions", wait=wait_for_servers)
    result = runner.run()          # blocks until version 4 is promoted or rolled back

What `dlpipe registry canary` runs. Each step sets the registry's A/B split (champion = A) and,
with `wait`, waits until every live server applies it, so a look's window holds only traffic
routed by that step. The runner follows the servers' prediction log (`dlpipe.quality.predlog`:
predictions, failures and feedback labels, written by every server process into the shared
directory) and hands each step's records to `dlpipe.quality.canary.Canary`, which decides.
Every decision goes into the registry's audit trail with its statistics (`canary_start`,
`canary_advance`, `canary_hold`, `canary_rollback`, `canary_promote`, `canary_abort`); a
rollback or a promotion is the registry's own `rollback` / `promote`. Interrupted (Ctrl-C,
SIGTERM, an error), the runner sends all traffic back to the champion before it exits.

The runner's state is also Prometheus metrics (`CanaryMetrics`), served on `--metrics-port`
for the dashboard while it runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from dlpipe.quality.canary import Canary, CanaryPolicy, Decision, Window
from dlpipe.quality.predlog import LogReader
from dlpipe.routing import ABTestConfig, RoutingState

log = logging.getLogger(__name__)


class CanaryRegistry(Protocol):
    """What the runner needs of `dlpipe.tracking.registry.ModelRegistry`."""

    def fetch_routing(self, name: str) -> RoutingState: ...

    def set_ab_config(self, name: str, config: ABTestConfig) -> None: ...

    def rollback(self, name: str, to_version: str | int) -> dict[str, Any]: ...

    def promote(self, name: str, version: str | int, alias: str = ...) -> str: ...

    def clear_ab_config(self, name: str) -> bool: ...

    def audit(
        self, name: str, action: str, from_value: Any, to_value: Any, **detail: Any
    ) -> None: ...


class CanaryMetrics:
    """`dlpipe_canary_*` on a registry of their own (the runner is not a server)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.step = Gauge(
            "dlpipe_canary_step_percent",
            "Candidate traffic share of the running canary (0 once rolled back, 100 promoted).",
            ("model_name", "candidate"),
            registry=r,
        )
        self.decisions = Counter(
            "dlpipe_canary_decisions",
            "Canary decisions: advance, hold, rollback, promote, abort.",
            ("model_name", "decision"),
            registry=r,
        )
        self.p_value = Gauge(
            "dlpipe_canary_p_value",
            "p-value of each check at the last look (error_rate, latency, accuracy).",
            ("model_name", "check"),
            registry=r,
        )
        self.samples = Gauge(
            "dlpipe_canary_window_samples",
            "Samples in the current step's window (candidate/champion requests and labels).",
            ("model_name", "kind"),
            registry=r,
        )

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        """Expose them on http://addr:port/metrics for Prometheus (a daemon thread)."""
        start_http_server(port, addr=addr, registry=self.registry)


@dataclass
class CanaryResult:
    model: str
    champion: str
    candidate: str
    outcome: str
    """`promote`, `rollback` or `abort`."""
    decisions: list[dict[str, Any]] = field(default_factory=list)
    started_at: float = 0.0
    ended_at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "champion": self.champion,
            "candidate": self.candidate,
            "outcome": self.outcome,
            "decisions": self.decisions,
            "duration_s": round(self.ended_at - self.started_at, 3),
        }


class CanaryRunner:
    """Runs one canary to its end (see the module docstring).

    Args:
        wait: called after each routing change; returns once every server applies it (raises
            when they do not): `dlpipe.tracking.heartbeats.wait_until_applied`.
        on_decision: called with each decision (the CLI prints a line).
    """

    def __init__(
        self,
        registry: CanaryRegistry,
        name: str,
        candidate: str,
        policy: CanaryPolicy,
        log_dir: str | Path,
        *,
        wait: Callable[[], Any] | None = None,
        poll_s: float = 1.0,
        metrics: CanaryMetrics | None = None,
        on_decision: Callable[[Decision], None] | None = None,
    ) -> None:
        self.registry = registry
        self.name = name
        self.candidate = str(candidate)
        self.policy = policy
        self.reader = LogReader(log_dir, tail_bytes=1)  # from now on: skip what is logged
        self.wait = wait
        self.poll_s = poll_s
        self.metrics = metrics or CanaryMetrics()
        self.on_decision = on_decision

    def run(self) -> CanaryResult:
        state = self.registry.fetch_routing(self.name)
        if state.ab is not None:
            raise ValueError(f"model {self.name!r} has an A/B split already; clear it first")
        if state.champion is None:
            raise ValueError(f"model {self.name!r} has no champion to compare with")
        canary = Canary(self.policy, state.champion, self.candidate)
        result = CanaryResult(self.name, canary.champion, canary.candidate, "abort")
        result.started_at = time.time()
        self.reader.poll()  # position at the end of the log
        self.registry.audit(
            self.name,
            "canary_start",
            canary.champion,
            canary.candidate,
            policy={
                "steps": list(self.policy.steps),
                "min_samples": self.policy.min_samples,
                "alpha": self.policy.alpha,
                "alpha_per_look": self.policy.alpha_per_look,
                "max_accuracy_drop": self.policy.max_accuracy_drop,
                "max_p95_ratio": self.policy.max_p95_ratio,
                "max_holds": self.policy.max_holds,
            },
        )
        try:
            result.outcome = self._steps(canary, result)
        except BaseException as err:  # interrupted or failed: the champion takes all traffic
            self._abort(canary, err)
            raise
        finally:
            result.ended_at = time.time()
        return result

    def _steps(self, canary: Canary, result: CanaryResult) -> str:
        window = self._route(canary)
        while canary.finished is None:
            window.add(self.reader.poll())
            self._show_counts(window)
            decision = canary.decide(window) if canary.due(window) else None
            decision = decision or canary.timed_out(window, time.time())
            if decision is None:
                time.sleep(self.poll_s)
                continue
            result.decisions.append(decision.to_dict())
            self._record(canary, decision)
            if decision.action == "rollback":
                self.registry.rollback(self.name, canary.champion)
            elif decision.action == "promote":
                self.registry.promote(self.name, canary.candidate)
                self.registry.clear_ab_config(self.name)
            if decision.action in ("rollback", "promote"):
                self._wait()
                self.metrics.step.labels(self.name, canary.candidate).set(decision.next_share)
                return decision.action
            window = self._route(canary) if decision.action == "advance" else self._fresh(canary)
        return canary.finished

    def _route(self, canary: Canary) -> Window:
        """Set the current step's split; its window opens once the servers apply it."""
        self.registry.set_ab_config(self.name, canary.ab)
        self._wait()
        self.metrics.step.labels(self.name, canary.candidate).set(canary.share)
        return self._fresh(canary)

    def _fresh(self, canary: Canary) -> Window:
        window = canary.window(since=time.time())
        window.add(self.reader.poll())  # anything logged before `since` is dropped
        return window

    def _wait(self) -> None:
        if self.wait is not None:
            self.wait()

    def _record(self, canary: Canary, decision: Decision) -> None:
        self.metrics.decisions.labels(self.name, decision.action).inc()
        for check, values in decision.checks.items():
            if values.get("p_value") is not None:
                self.metrics.p_value.labels(self.name, check).set(values["p_value"])
        detail = decision.to_dict()
        del detail["action"]  # the entry's own action: canary_<action>
        detail.update(champion=canary.champion, candidate=canary.candidate)
        self.registry.audit(
            self.name, f"canary_{decision.action}", decision.share, decision.next_share, **detail
        )
        log.info("canary %s at %d %%: %s", decision.action, decision.share, decision.reasons)
        if self.on_decision is not None:
            self.on_decision(decision)

    def _show_counts(self, window: Window) -> None:
        for kind, value in window.counts().items():
            self.metrics.samples.labels(self.name, kind).set(value)

    def _abort(self, canary: Canary, err: BaseException) -> None:
        if canary.finished is not None:
            return  # the decision was made; only waiting for the servers failed
        reason = f"{type(err).__name__}: {err}".strip(": ")
        try:
            self.registry.rollback(self.name, canary.champion)
            self.registry.audit(
                self.name, "canary_abort", canary.share, 0, reason=reason,
                champion=canary.champion, candidate=canary.candidate,
            )  # fmt: skip
            self.metrics.decisions.labels(self.name, "abort").inc()
            self.metrics.step.labels(self.name, canary.candidate).set(0)
        except Exception:
            log.exception("canary abort: could not send traffic back to the champion")
