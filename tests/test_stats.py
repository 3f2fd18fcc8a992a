"""stats: Wilson intervals and their formatting, Newcombe's paired interval with the exact McNemar test, the paired
t-test, Holm's adjustment."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from energyat.evaluation import stats


def flags(both: int, only_a: int, only_b: int, neither: int) -> tuple[list[bool], list[bool]]:
    """Two flag vectors with the given paired 2×2 cells."""
    a = [True] * both + [True] * only_a + [False] * only_b + [False] * neither
    b = [True] * both + [False] * only_a + [True] * only_b + [False] * neither
    return a, b


def reference(a, b, z=stats.Z95) -> tuple[float, float]:
    """Newcombe's method 10 for p_b − p_a written another way: Wilson bounds as the roots of the score quadratic
    (n + z²) π² − (2k + z²) π + k²/n = 0, phi as the Pearson correlation of the flags with the n/2 correction
    applied to its numerator, and the bounds as the distance from the difference of the marginal bounds."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    n = len(a)

    def bounds(k):
        return sorted(np.roots([n + z * z, -(2 * k + z * z), k * k / n]).real)

    (la, ua), (lb, ub) = bounds(a.sum()), bounds(b.sum())
    pa, pb = a.mean(), b.mean()
    phi = 0.0
    if 0 < pa < 1 and 0 < pb < 1:
        raw = np.corrcoef(a, b)[0, 1]
        sd = math.sqrt(pa * (1 - pa) * pb * (1 - pb))  # raw = (ad − bc) / (n² sd)
        phi = raw if raw < 0 else max(0.0, raw - 1 / (2 * n * sd))

    def reach(x, y):  # sqrt(x² − 2 phi x y + y²) as |(x, y)| sqrt(1 − 2 phi cos sin)
        r = math.hypot(x, y)
        return r * math.sqrt(1 - 2 * phi * x * y / (r * r)) if r else 0.0

    return (pb - pa) - reach(pb - lb, ua - pa), (pb - pa) + reach(pa - la, ub - pb)


# ------------------------------------------------------------------------------------------ Wilson, formatting

def test_wilson_and_its_formatting_on_known_values():
    assert stats.wilson(0, 50) == (pytest.approx(0.0, abs=1e-15), pytest.approx(0.0713476, abs=1e-7))
    assert stats.wilson(25, 50) == (pytest.approx(0.3664451, abs=1e-7), pytest.approx(0.6335549, abs=1e-7))
    assert stats.fmt_pct_interval(0.0, *stats.wilson(0, 50)) == "0.0 [0.0, 7.1]"
    assert stats.fmt_pct_interval(0.5, *stats.wilson(25, 50)) == "50.0 [36.6, 63.4]"


def test_formatting_from_the_count_avoids_double_rounding():
    """3 of 11: lower bound 0.0974606 -> 9.7 %; rounded first to 4 decimals (0.0975, as evaluate stores it) it
    prints 9.8. 14 of 17 = 0.823529: 82.4 %, but 82.3 from the stored 0.8235."""
    lo, hi = stats.wilson(3, 11)
    assert stats.fmt_pct_interval(3 / 11, lo, hi) == "27.3 [9.7, 56.6]"
    assert stats.fmt_pct_interval(round(3 / 11, 4), round(lo, 4), round(hi, 4)) == "27.3 [9.8, 56.6]"
    assert stats.fmt_pct_interval(14 / 17, *stats.wilson(14, 17)).startswith("82.4 ")
    assert stats.fmt_pct_interval(round(14 / 17, 4), 0.5897, 0.9381).startswith("82.3 ")


def test_fmt_p_and_fmt_diff():
    assert [stats.fmt_p(p) for p in (0.0004, 0.0125, 1.0, float("nan"), None)] == \
        ["< 0.001", "0.013", "1.000", "n/a", "n/a"]
    d = {"diff": 0.052, "lo": 0.029, "hi": 0.074, "p": 0.006}
    assert stats.fmt_diff(d) == "+5.2 [+2.9, +7.4], p = 0.006"
    assert stats.fmt_diff({**d, "p_holm": 0.018}) == "+5.2 [+2.9, +7.4], p = 0.006 (Holm 0.018)"
    assert stats.fmt_diff({**d, "p": 1e-5, "p_holm": 4e-5}) == "+5.2 [+2.9, +7.4], p < 0.001 (Holm < 0.001)"
    assert stats.fmt_diff({**d, "p": float("nan")}).endswith("p = n/a")


# ------------------------------------------------------------------------------------------ paired proportions

def test_newcombe_matches_a_published_example():
    """Fagerland, Lydersen & Laake (2017), Statistical Analysis of Contingency Tables, ch. 8, Newcombe's
    square-and-add interval (method 10) on Cavo et al. (2012), table [[59, 6], [16, 80]]: estimate -0.0621, 95 % CI
    -0.1186 to -0.0046 (the first classification is `b`: 59 both, 6 only b, 16 only a, 80 neither)."""
    lo, hi = stats.newcombe_paired(59, 16, 6, 80)
    assert (round(lo, 4), round(hi, 4)) == (-0.1186, -0.0046)
    d = stats.paired_difference(*flags(59, 16, 6, 80))
    assert (round(d["diff"], 4), d["lo"], d["hi"]) == (-0.0621, lo, hi)
    assert d["p"] == pytest.approx(sps.binomtest(6, 22, 0.5).pvalue)  # exact McNemar on the 22 discordant pairs
    assert (d["n"], d["only_a"], d["only_b"]) == (161, 16, 6)


TABLES = [(59, 16, 6, 80), (12, 2, 9, 11), (25, 0, 0, 25), (0, 0, 0, 50), (50, 0, 0, 0), (0, 3, 0, 0), (7, 0, 3, 0),
          (0, 5, 5, 0), (3, 1, 0, 46), (1, 8, 0, 11), (40, 1, 1, 8), (0, 0, 8, 12), (1, 5, 5, 30)]  # phi: all branches


@pytest.mark.parametrize("cells", TABLES)
def test_newcombe_agrees_with_an_independent_derivation_and_its_properties(cells):
    a, b = flags(*cells)
    d, (lo, hi) = stats.paired_difference(a, b), reference(a, b)
    assert (d["lo"], d["hi"]) == (pytest.approx(lo, abs=1e-9), pytest.approx(hi, abs=1e-9))
    assert -1 <= d["lo"] <= d["diff"] <= d["hi"] <= 1
    assert d["hi"] - d["lo"] > 0.01  # never the degenerate [0, 0] of a bootstrap without discordant pairs
    swapped = stats.paired_difference(b, a)
    assert (swapped["diff"], swapped["lo"], swapped["hi"], swapped["p"]) == \
        (pytest.approx(-d["diff"]), pytest.approx(-d["hi"]), pytest.approx(-d["lo"]), d["p"])


def test_no_discordant_pair_still_has_an_interval():
    """AutoAttack on 50 images, two models right on the same 25: no difference, but no certainty either."""
    d = stats.paired_difference(*flags(25, 0, 0, 25))
    assert (d["diff"], d["p"]) == (0.0, 1.0)
    assert (round(d["lo"], 4), round(d["hi"], 4)) == (-0.0378, 0.0378)
    none = stats.paired_difference(*flags(0, 0, 0, 50))  # both wrong everywhere: the Wilson width of 0/50
    assert (round(none["lo"], 4), round(none["hi"], 4)) == (-0.0713, 0.0713)
    assert stats.fmt_diff(none) == "+0.0 [-7.1, +7.1], p = 1.000"


# ------------------------------------------------------------------------------------------ seeds

def test_paired_t_on_known_values_and_without_spread():
    # d = [1, 2, 3]: mean 2, sd 1, t = 2 sqrt(3), 2 degrees of freedom
    assert stats.paired_t([0, 0, 0], [1, 2, 3]) == pytest.approx(2 * sps.t.sf(2 * math.sqrt(3), 2))
    assert stats.paired_t([0, 0, 0], [1, 2, 3]) == pytest.approx(0.0741799, abs=1e-7)
    assert math.isnan(stats.paired_t([0, 0, 0], [1, 1, 1]))  # no spread: t undefined, not p = 0
    assert math.isnan(stats.paired_t([0.5, 0.5], [0.5, 0.5]))
    assert math.isnan(stats.paired_t([0.6, 0.7], [0.7, 0.8]))  # equal differences up to float noise
    assert math.isnan(stats.paired_t([0.5], [0.7]))


def test_holm_on_a_known_example():
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, 0.4]) == pytest.approx([0.8, 0.8])  # monotone: the larger p never adjusts lower
    assert stats.holm([0.6, 0.9]) == [1.0, 1.0]  # capped
    out = stats.holm([0.01, float("nan"), 0.02, None])  # missing ones kept, m = 2
    assert out[0] == pytest.approx(0.02) and out[2] == pytest.approx(0.02)
    assert math.isnan(out[1]) and out[3] is None
    assert stats.holm([]) == []
