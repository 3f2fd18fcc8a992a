"""Statistics a reader can trust (DESIGN.md §7): pure functions over counts and per-example flags.

- an accuracy is a count over a fixed set of test images: Wilson 95 % score interval;
- two models on the same images are compared pairwise: the difference of accuracies with a paired bootstrap
  interval, and the exact McNemar test (two-sided binomial test on the discordant pairs) for its p-value;
- seeds are aggregated as mean ± sample std with a Student-t interval on the mean.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats as sps

Z95 = 1.959963984540054  # standard normal 97.5 % quantile


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion `correct / n` (95 % by default)."""
    if n <= 0:
        raise ValueError("wilson: n must be positive")
    if not 0 <= correct <= n:
        raise ValueError(f"wilson: correct={correct} not in [0, {n}]")
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def discordant(a, b) -> tuple[int, int]:
    """(only a correct, only b correct) for two boolean flag vectors over the same examples."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired flags need equal 1-D shapes, got {a.shape} and {b.shape}")
    return int((a & ~b).sum()), int((~a & b).sum())


def mcnemar_exact(a, b) -> float:
    """Two-sided exact McNemar p-value for H0 "a and b are equally accurate" on paired flags."""
    only_a, only_b = discordant(a, b)
    k = only_a + only_b
    if k == 0:
        return 1.0
    return float(min(1.0, 2 * sps.binom.cdf(min(only_a, only_b), k, 0.5)))


def paired_difference(a, b, *, resamples: int = 10_000, seed: int = 0, level: float = 0.95) -> dict:
    """Accuracy of `b` minus accuracy of `a` on the same examples: the difference, a paired-bootstrap percentile
    interval (examples resampled with replacement, both models together) and the exact McNemar p-value.

    Only the discordant pairs move the difference, so a bootstrap resample is a multinomial draw of the
    three cells (only a, only b, agree): exact for the bootstrap, and instant for any n."""
    only_a, only_b = discordant(a, b)
    n = len(np.asarray(a))
    rng = np.random.default_rng(seed)
    cells = rng.multinomial(n, [only_a / n, only_b / n, (n - only_a - only_b) / n], size=resamples)
    diffs = (cells[:, 1] - cells[:, 0]) / n
    tail = (1 - level) / 2
    lo, hi = np.quantile(diffs, [tail, 1 - tail])
    return {"diff": (only_b - only_a) / n, "lo": float(lo), "hi": float(hi), "p": mcnemar_exact(a, b),
            "n": n, "only_a": only_a, "only_b": only_b}


def t_interval(values, level: float = 0.95) -> dict:
    """Mean, sample std (ddof 1) and the Student-t interval of the mean of `values` (one per seed)."""
    v = np.asarray(values, dtype=float)
    if v.ndim != 1 or len(v) == 0:
        raise ValueError("t_interval needs a non-empty 1-D sequence")
    k, mean = len(v), float(v.mean())
    if k == 1:
        return {"n": 1, "mean": mean, "std": float("nan"), "lo": float("nan"), "hi": float("nan")}
    std = float(v.std(ddof=1))
    half = float(sps.t.ppf(0.5 + level / 2, k - 1)) * std / math.sqrt(k)
    return {"n": k, "mean": mean, "std": std, "lo": mean - half, "hi": mean + half}


def paired_t(a, b) -> float:
    """Two-sided paired t-test p-value of `b - a` over seeds (nan with fewer than 2 pairs or no spread)."""
    d = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    if len(d) < 2 or np.all(d == d[0]):
        return float("nan") if len(d) < 2 else (1.0 if d[0] == 0 else 0.0)
    return float(sps.ttest_1samp(d, 0.0).pvalue)


def fmt_pct_interval(p: float, lo: float, hi: float) -> str:
    """`54.1 [52.7, 55.5]` (percent)."""
    return f"{100 * p:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def fmt_diff(d: dict) -> str:
    """`+5.2 [+2.9, +7.4], p = 0.001` (percentage points) from :func:`paired_difference`'s dict."""
    p = d["p"]
    ptxt = "p < 0.001" if p < 0.001 else f"p = {p:.3f}"
    return f"{100 * d['diff']:+.1f} [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}], {ptxt}"
