"""Canary analysis: compare a candidate version with the champion on live traffic, step by step.

    canary = Canary(CanaryPolicy(steps=(5, 25, 50, 100), min_samples=300), "3", "4")
    canary.ab                              # the split to set now: 5 % to version 4
    window = canary.window(since=t0)       # fill it with prediction-log records
    window.add(records)
    if canary.due(window):
        decision = canary.decide(window)   # advance | hold | rollback | promote

Each step below 100 % ends in one *look*: once the candidate has answered `min_samples`
requests in the step (and, when feedback labels arrive, has `min_samples` labelled answers),
the first `min_samples` of them are compared with what the champion answered over the same
time, on three checks, each one-sided ("is the candidate worse?"):

- error rate: two-proportion test on server errors (5xx);
- latency: Mann-Whitney U (candidate slower?) *and* its p95 over `max_p95_ratio` times the
  champion's: both, because a small traffic share alone changes batching and queueing;
- accuracy, where feedback arrives: two-proportion test of the labelled answers, the
  candidate's accuracy below the champion's by more than `max_accuracy_drop`.

A check is significant below `alpha / looks` (Bonferroni over the steps below 100 %), so the
whole canary wrongly rolls back a candidate as good as the champion with probability at most
`alpha` per check. Any significant check rolls back; a p95 over the ratio that is not (yet)
significant holds the step for another look (at most `max_holds` times, then rolls back);
otherwise the canary advances, and passing the last step below 100 % promotes. Pure logic:
the runner (`dlpipe.quality.canary_runner`) moves traffic and writes the audit trail.
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from dlpipe.quality.live import VersionStats
from dlpipe.quality.significance import mann_whitney_greater, two_proportion_test
from dlpipe.routing import ABTestConfig

Verdict = Literal["worse", "suspect", "ok", "skipped"]
MIN_CHAMPION_LABELS = 30
Action = Literal["advance", "hold", "rollback", "promote"]


class CanaryPolicy(BaseModel):
    """How a canary moves and what counts as worse (each field is a `dlpipe registry canary`
    flag, its docstring the flag's help)."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    steps: list[Annotated[int, Field(gt=0, le=100)]] = Field(default=[5, 25, 50, 100])
    """Candidate traffic per step in percent, increasing, ending at 100 (= promoted)."""
    min_samples: int = Field(300, ge=10)
    """Candidate answers per look, and labelled answers when feedback arrives
    (docs/monitoring.md: the accuracy gap each size detects)."""
    alpha: float = Field(0.01, gt=0.0, lt=0.5)
    """Chance, per check, that the canary rolls back a candidate as good as the champion
    (each look tests at alpha / number of looks)."""
    max_accuracy_drop: float = Field(0.0, ge=0.0, lt=1.0)
    """Accuracy drop tolerated: only a drop significantly larger rolls back."""
    max_p95_ratio: float = Field(1.5, ge=1.0)
    """Candidate p95 latency over the champion's beyond which it is held, or rolled back when
    significantly slower."""
    max_holds: int = Field(2, ge=0)
    """Extra looks a step may take on a suspicion (slower, not yet significantly) before the
    canary rolls back."""
    step_timeout_s: float = Field(3600.0, gt=0.0)
    """A step whose look is not due by then (too little traffic or feedback) rolls back."""

    @model_validator(mode="after")
    def _steps_climb_to_100(self) -> CanaryPolicy:
        steps = self.steps
        if not steps or steps[-1] != 100 or list(steps) != sorted(set(steps)) or len(steps) < 2:
            raise ValueError(
                f"steps must increase and end at 100, with one below it at least, got {steps}"
            )
        return self

    @property
    def looks(self) -> int:
        """Steps that end in a look (those below 100 %)."""
        return len(self.steps) - 1

    @property
    def alpha_per_look(self) -> float:
        return self.alpha / self.looks


@dataclass(frozen=True)
class Check:
    metric: str
    verdict: Verdict
    p_value: float | None
    detail: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        p = None if self.p_value is None else float(f"{self.p_value:.6g}")
        return {"verdict": self.verdict, "p_value": p, **self.detail}


def _rate(x: int, n: int) -> float | None:
    return round(x / n, 6) if n else None


def check_errors(champion: VersionStats, candidate: VersionStats, alpha: float) -> Check:
    _, p = two_proportion_test(
        candidate.errors, candidate.requests, champion.errors, champion.requests
    )
    detail: dict[str, Any] = {
        "candidate": [candidate.errors, candidate.requests],
        "champion": [champion.errors, champion.requests],
        "candidate_rate": _rate(candidate.errors, candidate.requests),
        "champion_rate": _rate(champion.errors, champion.requests),
    }
    return Check("error_rate", "worse" if p < alpha else "ok", p, detail)


def check_latency(
    champion: VersionStats, candidate: VersionStats, alpha: float, max_ratio: float
) -> Check:
    if not len(candidate.latencies_ms) or not len(champion.latencies_ms):
        return Check("latency", "skipped", None, {"reason": "no latencies"})
    _, p = mann_whitney_greater(candidate.latencies_ms, champion.latencies_ms)
    p95_candidate = float(np.quantile(candidate.latencies_ms, 0.95))
    p95_champion = float(np.quantile(champion.latencies_ms, 0.95))
    ratio = p95_candidate / p95_champion if p95_champion > 0 else float("inf")
    verdict: Verdict = "ok"
    if ratio > max_ratio:
        verdict = "worse" if p < alpha else "suspect"
    detail = {
        "candidate_p95_ms": round(p95_candidate, 3),
        "champion_p95_ms": round(p95_champion, 3),
        "p95_ratio": round(ratio, 3),
        "max_p95_ratio": max_ratio,
        "n": [len(candidate.latencies_ms), len(champion.latencies_ms)],
    }
    return Check("latency", verdict, p, detail)


def check_accuracy(
    champion: VersionStats, candidate: VersionStats, alpha: float, min_samples: int, margin: float
) -> Check:
    # The champion may have fewer labels than the candidate at a 50 % step: the test stays
    # valid (with less power) as long as the normal approximation holds.
    if candidate.labeled < min_samples or champion.labeled < MIN_CHAMPION_LABELS:
        reason = f"fewer than {min_samples} (candidate) or {MIN_CHAMPION_LABELS} labels"
        labelled = [candidate.labeled, champion.labeled]
        return Check("accuracy", "skipped", None, {"reason": reason, "labelled": labelled})
    _, p = two_proportion_test(
        champion.correct, champion.labeled, candidate.correct, candidate.labeled, margin
    )
    detail: dict[str, Any] = {
        "candidate": [candidate.correct, candidate.labeled],
        "champion": [champion.correct, champion.labeled],
        "candidate_accuracy": _rate(candidate.correct, candidate.labeled),
        "champion_accuracy": _rate(champion.correct, champion.labeled),
        "max_accuracy_drop": margin,
    }
    return Check("accuracy", "worse" if p < alpha else "ok", p, detail)


@dataclass
class _Arm:
    requests: list[tuple[float, float, int]] = dataclass_field(default_factory=list)  # ts, ms, code
    labels: list[tuple[float, bool]] = dataclass_field(default_factory=list)  # ts, correct


class Window:
    """Prediction-log records of one look, per version, from `since` (unix time) on."""

    def __init__(self, champion: str, candidate: str, since: float) -> None:
        self.since = since
        self.arms = {champion: _Arm(), candidate: _Arm()}
        self.champion, self.candidate = champion, candidate

    def add(self, records: list[dict[str, Any]]) -> None:
        for r in records:
            arm = self.arms.get(str(r.get("model_version")))
            if arm is None or r.get("ts", 0.0) < self.since:
                continue
            kind = r.get("type")
            if kind in ("prediction", "error"):
                arm.requests.append((r["ts"], float(r.get("latency_ms", 0.0)), int(r["status"])))
            elif kind == "feedback":
                arm.labels.append((r["ts"], bool(r["correct"])))

    def counts(self) -> dict[str, int]:
        c, h = self.arms[self.candidate], self.arms[self.champion]
        return {
            "candidate_requests": len(c.requests),
            "candidate_labelled": len(c.labels),
            "champion_requests": len(h.requests),
            "champion_labelled": len(h.labels),
        }

    def cut(self, n: int) -> tuple[VersionStats, VersionStats]:
        """(champion, candidate) over the candidate's first `n` answers (and first `n` labels)
        and what the champion did until the candidate's n-th: a fixed-size sample per look."""
        arms = {v: (sorted(a.requests), sorted(a.labels)) for v, a in self.arms.items()}
        c_req, c_lab = arms[self.candidate]
        req_until = c_req[n - 1][0] if len(c_req) >= n else float("inf")
        lab_until = c_lab[n - 1][0] if len(c_lab) >= n else float("inf")

        def stats(version: str) -> VersionStats:
            requests, labels = arms[version]
            first = n if version == self.candidate else None
            req = [r for r in requests if r[0] <= req_until][:first]
            lab = [x for x in labels if x[0] <= lab_until][:first]
            status: dict[int, int] = {}
            for _, _, code in req:
                status[code] = status.get(code, 0) + 1
            return VersionStats(
                version=version,
                requests=len(req),
                latencies_ms=np.array([r[1] for r in req if r[2] < 400], dtype=np.float64),
                status_counts=status,
                class_counts={},
                labeled=len(lab),
                correct=sum(ok for _, ok in lab),
            )

        return stats(self.champion), stats(self.candidate)


@dataclass(frozen=True)
class Decision:
    action: Action
    share: int
    """Candidate traffic (percent) during the look."""
    next_share: int
    """Candidate traffic from now on (0: rolled back, 100: promoted)."""
    reasons: list[str]
    checks: dict[str, dict[str, Any]]
    counts: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "share": self.share,
            "next_share": self.next_share,
            "reasons": self.reasons,
            "checks": self.checks,
            "counts": self.counts,
        }


class Canary:
    """The state of one canary: its step, its holds, and the decision at each look."""

    def __init__(self, policy: CanaryPolicy, champion: str, candidate: str) -> None:
        if str(champion) == str(candidate):
            raise ValueError(f"the candidate is the champion (version {champion})")
        self.policy = policy
        self.champion, self.candidate = str(champion), str(candidate)
        self.step = 0
        self.holds = 0
        self.feedback_seen = False
        self.finished: Action | None = None

    @property
    def share(self) -> int:
        return self.policy.steps[self.step]

    @property
    def ab(self) -> ABTestConfig:
        """The split of the current step (A, the champion, keeps the rest)."""
        return ABTestConfig(self.champion, self.candidate, 1.0 - self.share / 100.0)

    def window(self, since: float) -> Window:
        return Window(self.champion, self.candidate, since)

    def due(self, window: Window) -> bool:
        """The step's look can be taken (the candidate has its samples)."""
        counts = window.counts()
        if counts["candidate_labelled"] or counts["champion_labelled"]:
            self.feedback_seen = True
        n = self.policy.min_samples
        enough = counts["candidate_requests"] >= n
        return enough and (not self.feedback_seen or counts["candidate_labelled"] >= n)

    def decide(self, window: Window) -> Decision:
        """Take the step's look and move on: advance, hold, roll back or promote."""
        p = self.policy
        champion, candidate = window.cut(p.min_samples)
        alpha = p.alpha_per_look
        checks = [
            check_errors(champion, candidate, alpha),
            check_latency(champion, candidate, alpha, p.max_p95_ratio),
            check_accuracy(champion, candidate, alpha, p.min_samples, p.max_accuracy_drop),
        ]
        if self.feedback_seen and checks[2].verdict == "skipped":
            checks[2] = Check("accuracy", "suspect", None, checks[2].detail)
        worse = [c.metric for c in checks if c.verdict == "worse"]
        suspect = [c.metric for c in checks if c.verdict == "suspect"]
        share = self.share
        action: Action
        if worse:
            action, reasons = "rollback", [f"{m} significantly worse" for m in worse]
        elif suspect and self.holds >= p.max_holds:
            action, reasons = "rollback", [f"{m} still not shown acceptable" for m in suspect]
        elif suspect:
            action, reasons = "hold", [f"{m} worse but not significantly (yet)" for m in suspect]
            self.holds += 1
        else:
            self.step, self.holds = self.step + 1, 0
            action = "promote" if self.share == 100 else "advance"
            reasons = ["no check worse"]
        if action in ("rollback", "promote"):
            self.finished = action
        next_share = {"rollback": 0, "promote": 100}.get(action, self.share)
        sized = {"alpha_per_look": alpha, "min_samples": p.min_samples}
        return Decision(
            action,
            share,
            next_share,
            reasons,
            {c.metric: c.to_dict() for c in checks},
            {**window.counts(), **sized},
        )

    def timed_out(self, window: Window, now: float) -> Decision | None:
        """A rollback when the step's look is still not due after `step_timeout_s`."""
        if now - window.since < self.policy.step_timeout_s:
            return None
        self.finished = "rollback"
        reason = f"no look within {self.policy.step_timeout_s:g} s: too little traffic or feedback"
        return Decision("rollback", self.share, 0, [reason], {}, window.counts())
