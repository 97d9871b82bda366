"""The tests of significance a canary analysis needs, in a few lines each (no SciPy at runtime;
tests/quality check them against SciPy and statsmodels).

    two_proportion_test(x_champion, n_champion, x_candidate, n_candidate)  # one-sided p
    mann_whitney_greater(candidate_ms, champion_ms)                       # candidate slower?
    required_samples(0.88, 0.10, alpha=0.01 / 3, power=0.95, ratio=19)    # candidate answers

All are one-sided: a canary asks whether the candidate is *worse*, never merely different.
Normal approximations, good for the sample sizes a canary looks at (tens or more per arm).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np

_NORMAL = NormalDist()


def normal_sf(z: float) -> float:
    """P(Z > z) for a standard normal Z (exact in the tails, where 1 - cdf would round to 0)."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def two_proportion_test(
    x_a: int, n_a: int, x_b: int, n_b: int, margin: float = 0.0
) -> tuple[float, float]:
    """(z, one-sided p) for H1: p_a - p_b > margin, i.e. B's rate is below A's by more than
    `margin` (B worse when the rate is an accuracy).

    With Yates' continuity correction: without it the test is too eager for rates near 0 or
    1 at a canary's sample sizes (simulated at 0.835 with 319 vs 6061 samples: 0.0044 false
    alarms for a nominal 0.0033; 0.0036 with it). With `margin` 0 the pooled standard error
    (the classic test); with a margin the unpooled one (a shifted null has no common rate to
    pool). No evidence either way -- an arm without samples, or no variation at all -- gives
    (0, 1).
    """
    if n_a <= 0 or n_b <= 0:
        return 0.0, 1.0
    p_a, p_b = x_a / n_a, x_b / n_b
    if margin == 0.0:
        pooled = (x_a + x_b) / (n_a + n_b)
        se = math.sqrt(pooled * (1.0 - pooled) * (1.0 / n_a + 1.0 / n_b))
    else:
        se = math.sqrt(p_a * (1.0 - p_a) / n_a + p_b * (1.0 - p_b) / n_b)
    if se == 0.0:
        return 0.0, 1.0
    difference = p_a - p_b - margin
    correction = min(abs(difference), 0.5 * (1.0 / n_a + 1.0 / n_b))
    z = (difference - math.copysign(correction, difference)) / se
    return z, normal_sf(z)


def _ranks(values: np.ndarray) -> tuple[np.ndarray, float]:
    """Mid-ranks (ties share their average rank) and the tie term sum(t^3 - t)."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    # Start of each run of equal values, and its length.
    starts = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1])))
    counts = np.diff(np.concatenate((starts, [len(values)])))
    mid = starts + (counts + 1) / 2.0  # 1-based average rank of each run
    ranks = np.empty(len(values))
    ranks[order] = np.repeat(mid, counts)
    return ranks, float(np.sum(counts.astype(np.float64) ** 3 - counts))


def mann_whitney_greater(
    x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray
) -> tuple[float, float]:
    """(U of x, one-sided p) for H1: x tends to be larger than y (Mann-Whitney U, normal
    approximation with tie and continuity correction, as SciPy's `method="asymptotic"`)."""
    a = np.asarray(x, dtype=np.float64)
    b = np.asarray(y, dtype=np.float64)
    n1, n2 = len(a), len(b)
    if n1 == 0 or n2 == 0:
        return 0.0, 1.0
    ranks, ties = _ranks(np.concatenate((a, b)))
    u = float(ranks[:n1].sum() - n1 * (n1 + 1) / 2.0)
    n = n1 + n2
    variance = n1 * n2 / 12.0 * ((n + 1) - ties / (n * (n - 1))) if n > 1 else 0.0
    if variance <= 0.0:
        return u, 1.0  # every value equal: no evidence
    z = (u - n1 * n2 / 2.0 - 0.5) / math.sqrt(variance)
    return u, normal_sf(z)


def required_samples(
    p_champion: float, gap: float, alpha: float, power: float, ratio: float = 1.0
) -> int:
    """Candidate samples `two_proportion_test` needs to find the candidate's rate `gap` below
    the champion's with probability `power`, at level `alpha`, when the champion has `ratio`
    times as many samples (its traffic share over the candidate's).

    n = (z_a sqrt(p(1-p)(1 + 1/k)) + z_b sqrt(p1(1-p1) + p2(1-p2)/k))^2 / gap^2, with p the
    pooled rate, p1 the candidate's, p2 the champion's and k = ratio; then Fleiss' continuity
    correction, n (1 + sqrt(1 + 2 (k + 1) / (n k gap)))^2 / 4, as the test corrects too.
    """
    if not 0.0 < gap < p_champion <= 1.0:
        raise ValueError(f"need 0 < gap < p_champion <= 1, got gap={gap}, p={p_champion}")
    p2, p1, k = p_champion, p_champion - gap, ratio
    pooled = (p1 + k * p2) / (1.0 + k)
    z_a, z_b = _NORMAL.inv_cdf(1.0 - alpha), _NORMAL.inv_cdf(power)
    root = z_a * math.sqrt(pooled * (1.0 - pooled) * (1.0 + 1.0 / k))
    root += z_b * math.sqrt(p1 * (1.0 - p1) + p2 * (1.0 - p2) / k)
    n = root**2 / gap**2
    return math.ceil(n / 4.0 * (1.0 + math.sqrt(1.0 + 2.0 * (k + 1.0) / (n * k * gap))) ** 2)
