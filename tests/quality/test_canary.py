"""Canary analysis, the pure parts: the tests of significance against SciPy and simulation,
the policy's limits, and the decisions a canary takes on windows of log records."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from dlpipe.quality.canary import Canary, CanaryPolicy
from dlpipe.quality.significance import (
    mann_whitney_greater,
    required_samples,
    two_proportion_test,
)


@pytest.mark.parametrize("seed", range(5))
def test_mann_whitney_equals_scipy_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = np.round(rng.lognormal(1.0, 0.5, 40 + seed * 17), 1)  # rounding makes ties
    y = np.round(rng.lognormal(1.1, 0.5, 60), 1)
    u, p = mann_whitney_greater(x, y)
    expected = stats.mannwhitneyu(x, y, alternative="greater", method="asymptotic")
    assert u == expected.statistic and p == pytest.approx(expected.pvalue, rel=1e-9)
    assert mann_whitney_greater([], y) == (0.0, 1.0)
    assert mann_whitney_greater([3.0] * 5, [3.0] * 5)[1] == 1.0


def test_two_proportion_test_equals_yates_chi_square_test() -> None:
    for xa, na, xb, nb in [(90, 100, 80, 100), (400, 500, 380, 520), (30, 40, 33, 40)]:
        z, p = two_proportion_test(xa, na, xb, nb)
        table = [[xa, na - xa], [xb, nb - xb]]
        chi2, p_two, _, _ = stats.chi2_contingency(table, correction=True)
        assert z**2 == pytest.approx(chi2) and min(p, 1 - p) * 2 == pytest.approx(p_two)
        assert (p < 0.5) == (xa / na > xb / nb)
    assert two_proportion_test(0, 0, 5, 10) == (0.0, 1.0)
    assert two_proportion_test(0, 50, 0, 50) == (0.0, 1.0)  # no errors anywhere: no evidence
    # A margin: a drop of 0.05 is not "more than 0.10 worse".
    assert two_proportion_test(900, 1000, 850, 1000, margin=0.10)[1] > 0.99


def test_required_samples_gives_the_power_it_promises() -> None:
    """Simulate the test at the computed size: it finds the gap about `power` of the time."""
    p, gap, alpha, power, k = 0.835, 0.10, 0.01 / 3, 0.95, 19
    n = required_samples(p, gap, alpha, power, k)
    assert n == 330  # docs/monitoring.md
    rng = np.random.default_rng(0)
    trials = 4000
    champion = rng.binomial(n * k, p, trials)
    candidate = rng.binomial(n, p - gap, trials)
    found = sum(
        two_proportion_test(int(c), n * k, int(x), n)[1] < alpha
        for c, x in zip(champion, candidate, strict=True)
    )
    assert found / trials == pytest.approx(power, abs=0.015)
    # When both are as good, the three looks of a canary (5, 25 and 50 %: the champion has
    # 19, 3 and 1 times the candidate's samples) together alarm at most alpha = 0.01 of the
    # time. (Yates' correction is what keeps it there: at 1:19 one look alarms 0.0035 for a
    # nominal 0.0033, the others less.)
    trials, alarm_rate = 60_000, 0.0
    for ratio in (19, 3, 1):
        champion, candidate = rng.binomial(n * ratio, p, trials), rng.binomial(n, p, trials)
        alarms = sum(
            two_proportion_test(int(c), n * ratio, int(x), n)[1] < alpha
            for c, x in zip(champion, candidate, strict=True)
        )
        alarm_rate += alarms / trials
    assert alarm_rate <= 3 * alpha
    assert required_samples(p, gap, alpha, 0.80, k) < n < required_samples(p, gap, alpha, 0.95, 1)
    with pytest.raises(ValueError):
        required_samples(0.5, 0.6, alpha, power)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"steps": [5, 50]}, "end at 100"),
        ({"steps": [50, 25, 100]}, "increase"),
        ({"steps": [100]}, "one below"),
        ({"steps": [0, 100]}, "greater than 0"),
        ({"min_samples": 5}, "greater than or equal to 10"),
        ({"alpha": 0.7}, "less than 0.5"),
        ({"max_p95_ratio": 0.9}, "greater than or equal to 1"),
        ({"surprise": 1}, "Extra inputs"),
    ],
)
def test_policy_refuses_impossible_settings(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CanaryPolicy.model_validate(fields)


def test_alpha_is_split_over_the_looks() -> None:
    assert CanaryPolicy().looks == 3 and CanaryPolicy().alpha_per_look == pytest.approx(0.01 / 3)
    assert CanaryPolicy(steps=[10, 100]).alpha_per_look == 0.01


def _records(version: str, n: int, t0: float, ms: float, correct: float | None, seed: int) -> list:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        t = t0 + i * 0.001
        out.append(
            {"type": "prediction", "ts": t, "model_version": version, "status": 200,
             "latency_ms": ms * float(rng.lognormal(0, 0.2))}
        )  # fmt: skip
        if correct is not None:
            ok = bool(rng.random() < correct)
            out.append({"type": "feedback", "ts": t, "model_version": version, "correct": ok})
    return out


def test_an_equal_candidate_advances_step_by_step_then_is_promoted() -> None:
    canary = Canary(CanaryPolicy(min_samples=50), "1", "2")
    shares = []
    for step in range(3):
        shares.append(canary.share)
        window = canary.window(since=step * 10.0)
        window.add(_records("2", 49, step * 10.0, 2.0, None, step))
        window.add(_records("1", 400, step * 10.0, 2.0, None, step + 10))
        window.add(_records("2", 1, step * 10.0 - 5, 2.0, None, 0))  # before the window
        assert not canary.due(window)
        window.add(_records("2", 1, step * 10.0 + 1, 2.0, None, step + 20))
        assert canary.due(window)
        decision = canary.decide(window)
        assert decision.action == ("promote" if step == 2 else "advance"), decision
    assert shares == [5, 25, 50] and canary.finished == "promote" and canary.share == 100
    assert decision.checks["accuracy"]["verdict"] == "skipped"  # no feedback: not tested


def test_a_look_uses_exactly_min_samples_of_the_candidate() -> None:
    canary = Canary(CanaryPolicy(min_samples=100), "1", "2")
    window = canary.window(since=0.0)
    window.add(_records("2", 130, 0.0, 2.0, 0.6, 1) + _records("1", 300, 0.0, 2.0, 0.9, 2))
    assert canary.due(window) and canary.feedback_seen
    champion, candidate = window.cut(100)
    assert candidate.requests == candidate.labeled == 100
    assert champion.requests == 100 and champion.labeled == 100  # same time span (0.1 s)
    decision = canary.decide(window)
    assert decision.action == "rollback" and decision.reasons == ["accuracy significantly worse"]
    assert decision.checks["accuracy"]["p_value"] < 0.01 / 3
    assert decision.checks["accuracy"]["candidate"][1] == 100


def test_feedback_makes_labels_part_of_the_quota() -> None:
    canary = Canary(CanaryPolicy(min_samples=50), "1", "2")
    window = canary.window(since=0.0)
    window.add(_records("2", 80, 0.0, 2.0, None, 1) + _records("1", 300, 0.0, 2.0, 0.9, 2))
    assert not canary.due(window)  # feedback arrives: the candidate's labels count too
    window.add(_records("2", 50, 1.0, 2.0, 0.9, 3))
    assert canary.due(window)


def test_slower_but_not_significantly_holds_then_rolls_back() -> None:
    policy = CanaryPolicy(min_samples=12, max_holds=1, max_p95_ratio=1.5)
    canary = Canary(policy, "1", "2")
    actions = []
    for look in range(2):
        window = canary.window(since=look * 10.0)
        # One slow outlier among 12: p95 doubles, the ranks barely move.
        fast = _records("2", 11, look * 10.0, 2.0, None, look)
        slow = _records("2", 1, look * 10.0 + 0.05, 40.0, None, look)
        window.add(fast + slow + _records("1", 200, look * 10.0, 2.0, None, 5))
        actions.append(canary.decide(window))
    assert [d.action for d in actions] == ["hold", "rollback"]
    assert actions[0].checks["latency"]["verdict"] == "suspect"
    assert actions[0].checks["latency"]["p95_ratio"] > 1.5
    assert actions[1].reasons == ["latency still not shown acceptable"]


def test_errors_roll_back_and_a_step_without_traffic_times_out() -> None:
    canary = Canary(CanaryPolicy(min_samples=40), "1", "2")
    window = canary.window(since=0.0)
    errors = [
        {"type": "error", "ts": 0.01 * i, "model_version": "2", "status": 500, "latency_ms": 1.0}
        for i in range(10)
    ]
    window.add(
        errors + _records("2", 30, 0.0, 2.0, None, 1) + _records("1", 800, 0.0, 2.0, None, 2)
    )
    decision = canary.decide(window)
    assert decision.action == "rollback" and decision.checks["error_rate"]["candidate"] == [10, 40]
    quiet = Canary(CanaryPolicy(min_samples=40, step_timeout_s=60), "1", "2")
    window = quiet.window(since=100.0)
    assert quiet.timed_out(window, 150.0) is None
    timed_out = quiet.timed_out(window, 161.0)
    assert timed_out is not None and timed_out.action == "rollback" and quiet.finished


def test_the_candidate_cannot_be_the_champion() -> None:
    with pytest.raises(ValueError, match="is the champion"):
        Canary(CanaryPolicy(), "3", "3")
    assert Canary(CanaryPolicy(), "3", "4").ab.traffic_split == pytest.approx(0.95)
