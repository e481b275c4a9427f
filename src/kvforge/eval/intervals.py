"""95% confidence intervals for a cell's mean score: Wilson for 0/1 scores, a seeded bootstrap otherwise."""

from __future__ import annotations

import hashlib
import math
import random

Z95 = 1.959963984540054  # two-sided 95% normal quantile
INDICATIVE_BELOW = 20  # cells with fewer samples are shown as "indicative only"


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion `successes / n` (95% by default)."""
    if n <= 0:
        raise ValueError(f"n={n}; a proportion needs at least one trial")
    if not 0 <= successes <= n:
        raise ValueError(f"successes={successes} is outside 0..{n}")
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_mean(values: list[float], seed: int | str = 0, resamples: int = 2000,
                   level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values`, deterministic for a given `seed`."""
    if not values:
        raise ValueError("no values to bootstrap")
    n = len(values)
    rng = random.Random(hashlib.sha256(str(seed).encode()).hexdigest())
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(resamples))
    tail = (1 - level) / 2
    lo = means[int(math.floor(tail * (resamples - 1)))]
    hi = means[int(math.ceil((1 - tail) * (resamples - 1)))]
    return lo, hi


def mean_interval(values: list[float], seed: int | str = 0) -> tuple[float, float] | None:
    """The 95% interval of the mean of a cell's per-sample scores: Wilson when every score is 0 or 1, a bootstrap
    seeded by `seed` otherwise; None for an empty cell."""
    values = [float(v) for v in values if v is not None and not math.isnan(v)]
    if not values:
        return None
    if all(v in (0.0, 1.0) for v in values):
        return wilson(int(sum(values)), len(values))
    return bootstrap_mean(values, seed)


def separated(a: tuple[float, float] | None, b: tuple[float, float] | None) -> int:
    """+1 when interval `a` lies wholly above `b`, -1 wholly below, 0 when they overlap or one is missing."""
    if a is None or b is None:
        return 0
    if a[0] > b[1]:
        return 1
    if a[1] < b[0]:
        return -1
    return 0
