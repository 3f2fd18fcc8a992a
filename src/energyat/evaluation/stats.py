"""Statistics a reader can trust (docs/design.md §7): pure functions over counts and per-example flags.

- an accuracy is a count over a fixed set of test images: Wilson 95 % score interval, formatted from the count
  itself (a bound rounded once for storage and again for print can land on the wrong side of a digit);
- two models on the same images are compared pairwise: the difference of accuracies with Newcombe's hybrid score
  interval for paired proportions (Newcombe 1998, Stat. Med. 17:2635-2650, method 10), which stays informative
  when no image is discordant, and the exact McNemar test (two-sided binomial test on the discordant pairs);
- two attacks on the same images (is our PGD as strong as APGD?): the one-sided exact binomial test on the
  images only one of them breaks;
- seeds are aggregated as mean ± sample std with a Student-t interval on the mean, compared by a paired t-test;
- several p-values read together (one table) are Holm-adjusted.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

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
    return _mcnemar(*discordant(a, b))


def _binomial_half_cdf(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2), exact: integer counts over 2^n, rounded once. (Pure Python: scipy.stats
    takes ~1 s to import, which every evaluate stage would pay for these two tests.)"""
    return float(Fraction(sum(math.comb(n, i) for i in range(k + 1)), 2 ** n))


def _mcnemar(only_a: int, only_b: int) -> float:
    k = only_a + only_b
    if k == 0:
        return 1.0
    return min(1.0, 2 * _binomial_half_cdf(min(only_a, only_b), k))


def binomial_excess_p(more: int, fewer: int) -> float:
    """Exact one-sided binomial p-value that the `more` side of `more + fewer` discordant pairs is no more frequent
    than the other (H0: each discordant pair goes either way with probability 1/2; alternative: `more` > half).
    1 when there are no discordant pairs."""
    if more < 0 or fewer < 0:
        raise ValueError(f"binomial_excess_p: counts must be >= 0, got {more} and {fewer}")
    if more + fewer == 0:
        return 1.0
    return _binomial_half_cdf(fewer, more + fewer)  # P(X >= more) = P(X <= fewer) by symmetry


def newcombe_paired(both: int, only_a: int, only_b: int, neither: int, z: float = Z95) -> tuple[float, float]:
    """Newcombe's hybrid score interval (1998, method 10) of p_b − p_a from the paired 2×2 table: the Wilson
    intervals of the two marginals combined by square-and-add, with the continuity-corrected phi correlation."""
    n = both + only_a + only_b + neither
    pa, pb = (both + only_a) / n, (both + only_b) / n
    la, ua = wilson(both + only_a, n, z)
    lb, ub = wilson(both + only_b, n, z)
    denom = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    cross = both * neither - only_a * only_b
    # phi is corrected towards 0 by n/2 when positive, and 0 when a marginal is empty (denom 0)
    corrected = cross - n / 2 if cross > n / 2 else (cross if cross < 0 else 0.0)
    phi = corrected / math.sqrt(denom) if denom > 0 else 0.0
    d = pb - pa
    lo = d - math.sqrt(max(0.0, (pb - lb) ** 2 - 2 * phi * (pb - lb) * (ua - pa) + (ua - pa) ** 2))
    hi = d + math.sqrt(max(0.0, (pa - la) ** 2 - 2 * phi * (pa - la) * (ub - pb) + (ub - pb) ** 2))
    return max(-1.0, lo), min(1.0, hi)


def paired_difference(a, b, *, z: float = Z95) -> dict:
    """Accuracy of `b` minus accuracy of `a` on the same examples: the difference with Newcombe's paired 95 %
    interval (:func:`newcombe_paired`) and the exact McNemar p-value."""
    only_a, only_b = discordant(a, b)
    n = len(np.asarray(a))
    both = int(np.logical_and(np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)).sum())
    lo, hi = newcombe_paired(both, only_a, only_b, n - both - only_a - only_b, z)
    return {"diff": (only_b - only_a) / n, "lo": lo, "hi": hi, "p": _mcnemar(only_a, only_b),
            "n": n, "only_a": only_a, "only_b": only_b}


def t_interval(values, level: float = 0.95) -> dict:
    """Mean, sample std (ddof 1) and the Student-t interval of the mean of `values` (one per seed)."""
    v = np.asarray(values, dtype=float)
    if v.ndim != 1 or len(v) == 0:
        raise ValueError("t_interval needs a non-empty 1-D sequence")
    k, mean = len(v), float(v.mean())
    if k == 1:
        return {"n": 1, "mean": mean, "std": float("nan"), "lo": float("nan"), "hi": float("nan")}
    from scipy import stats as sps  # only the seed aggregates need scipy (see _binomial_half_cdf)

    std = float(v.std(ddof=1))
    half = float(sps.t.ppf(0.5 + level / 2, k - 1)) * std / math.sqrt(k)
    return {"n": k, "mean": mean, "std": std, "lo": mean - half, "hi": mean + half}


def paired_t(a, b) -> float:
    """Two-sided paired t-test p-value of `b - a` over seeds; nan with fewer than 2 pairs or no spread (the t
    statistic is undefined then, whatever the mean difference)."""
    d = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    # differences of stored accuracies that are equal on paper differ in the last bits (0.7 - 0.6 vs 0.8 - 0.7):
    # a spread that small is no spread, not a t of 1e15
    if len(d) < 2 or np.ptp(d) <= 1e-12 * max(1.0, float(np.abs(d).max())):
        return float("nan")
    from scipy import stats as sps

    return float(sps.ttest_1samp(d, 0.0).pvalue)


def holm(pvalues) -> list:
    """Holm–Bonferroni step-down adjusted p-values, in the input order: monotone in the raw p, capped at 1. nan or
    None entries are passed through as given and not counted in the family size."""
    out = list(pvalues)
    valid = sorted((p, i) for i, p in enumerate(out) if p is not None and not math.isnan(p))
    running = 0.0
    for rank, (p, i) in enumerate(valid):
        running = max(running, min(1.0, (len(valid) - rank) * p))
        out[i] = running
    return out


def fmt_p(p) -> str:
    """`0.008`, `< 0.001`, or `n/a` for a p-value that could not be computed (None or nan)."""
    if p is None or math.isnan(p):
        return "n/a"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def pct(p: float | Fraction, digits: int = 1, sign: bool = False) -> str:
    """`100·p` with `digits` decimals (`sign`: with + or −). The rounding rule: a `Fraction` (an exact count over its
    images, `Fraction(k, n)`) is rounded half away from zero on its exact value, in integer arithmetic, so
    471/2000 = 23.55 % prints 23.6 (and −471/2000 −23.6); a float is printed as Python rounds its binary value
    (0.2355 is stored as 0.23549999…, so `f"{100 * 0.2355:.1f}"` is 23.5): pass counts as Fractions."""
    if isinstance(p, Fraction):
        scaled = abs(p) * 100 * 10 ** digits
        units = int(scaled) + (scaled - int(scaled) >= Fraction(1, 2))
        text = f"{units // 10 ** digits}" + (f".{units % 10 ** digits:0{digits}d}" if digits else "")
        negative = p < 0 and units > 0
        return ("-" if negative else "+" if sign else "") + text
    return f"{100 * p:+.{digits}f}" if sign else f"{100 * p:.{digits}f}"


def fmt_pct_interval(p: float | Fraction, lo: float, hi: float) -> str:
    """`54.1 [52.7, 55.5]` (percent). Pass unrounded values (e.g. from :func:`wilson`), not stored rounded ones; the
    point as a Fraction of counts where there are counts (:func:`pct`'s rounding rule)."""
    return f"{pct(p)} [{100 * lo:.1f}, {100 * hi:.1f}]"


def fmt_diff(d: dict) -> str:
    """`+5.2 [+2.9, +7.4], p = 0.001` (percentage points) from :func:`paired_difference`'s dict, with
    ` (Holm 0.004)` when it carries a Holm-adjusted `p_holm`."""
    p = fmt_p(d["p"])
    text = (f"{pct(d['diff'], sign=True)} [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}], "
            f"p {'' if p[0] == '<' else '= '}{p}")
    return text + (f" (Holm {fmt_p(d['p_holm'])})" if "p_holm" in d else "")
