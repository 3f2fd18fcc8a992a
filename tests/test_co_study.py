"""The CO study's DER − base differences over seeds: paired, Holm-adjusted, with per-seed McNemar p."""
import pytest

from energyat.errors import UserError
from energyat.studies import co_study


def _cell(run, variant, values, eps=0.3):
    seeds = [{"seed": i, "name": f"co-s{i}", "rev": f"{run}{variant}{i}", "pgd50_acc": v, "clean_acc": 0.7}
             for i, v in enumerate(values)]
    return {"run": run, "variant": variant, "eps": eps, "label": f"{run} {variant}", "seeds": seeds}


def test_der_gains_pair_the_seeds_and_holm_adjust_over_the_setting():
    cells = [_cell("fgsm", "base", [0.0, 0.0, 0.0]), _cell("fgsm", "der", [0.062, 0.086, 0.026]),
             _cell("rs", "base", [0.10, 0.20, 0.30]), _cell("rs", "der", [0.11, 0.22, 0.33]),
             _cell("n", "base", [0.2, 0.2, 0.2])]  # no DER twin: no difference
    flags = {("fgsmbase0", "fgsm", "base"): {"test_sha256": "abc", "last.pgd50": "0000"},
             ("fgsmder0", "fgsm", "der"): {"test_sha256": "abc", "last.pgd50": "1110"}}
    gains = co_study.der_gains(cells, "pgd50_acc", flags)
    assert [(d["run"], d["seeds"]) for d in gains] == [("fgsm", [0, 1, 2]), ("rs", [0, 1, 2])]
    fgsm, rs = (d["metrics"]["pgd50_acc"] for d in gains)
    # differences 6.2, 8.6, 2.6 points: mean 5.8, sd 3.02, t = 3.33 on 2 df -> p = 0.0797 (the README's p = 0.08)
    assert fgsm["mean"] == pytest.approx(0.058) and fgsm["paired_t_p"] == pytest.approx(0.0797, abs=5e-4)
    assert rs["paired_t_p"] == pytest.approx(0.0742, abs=5e-4)  # 1, 2, 3 points: t = 3.46
    assert fgsm["paired_t_p_holm"] == rs["paired_t_p_holm"] == pytest.approx(2 * rs["paired_t_p"])  # step-down
    assert fgsm["mcnemar_p"] == [0.25, None, None]  # 3 discordant images one way (exact: 2 x 1/8); no flags kept
    assert gains[0]["metrics"]["clean_acc"]["mean"] == 0
    text = co_study._gain_lines({"pgd": "pgd50_acc", "der_gain": gains})
    assert "| fgsm der | 0.3 | +0.0 [+0.0, +0.0]" in text[4]
    assert "+5.8 [-1.7, +13.3], p 0.080 (Holm 0.148)" in text[4]
    assert "- fgsm der, ε = 0.3, PGD-50: seed 0: +6.2 (p 0.250), seed 1: +8.6, seed 2: +2.6" in text


def test_der_gains_refuse_flags_of_another_test_split():
    cells = [_cell("fgsm", "base", [0.0]), _cell("fgsm", "der", [0.062])]
    flags = {("fgsmbase0", "fgsm", "base"): {"test_sha256": "abc", "last.pgd50": "0000"},
             ("fgsmder0", "fgsm", "der"): {"test_sha256": "def", "last.pgd50": "1110"}}
    with pytest.raises(UserError, match=r"^co-s0: metrics/eval/fgsm\.base\.flags\.json and co-s0: "
                                        r"metrics/eval/fgsm\.der\.flags\.json cover different test images "
                                        r"\(test_sha256 'abc' vs 'def'\)"):
        co_study.der_gains(cells, "pgd50_acc", flags)
    flags["fgsmder0", "fgsm", "der"] = {"test_sha256": "abc", "last.pgd50": "11100"}  # another count of its images
    with pytest.raises(UserError, match=r"\(pgd50: the first 4 vs the first 5\)"):
        co_study.der_gains(cells, "pgd50_acc", flags)


def test_markdown_puts_methods_in_rows_and_eps_in_columns():
    def cell(label, eps, n, pgd, co):
        return {"label": label, "eps": eps, "n": n, "co_at_end": co, "diverged": 0, "seeds": [{"seed": 0}],
                "stats": {"pgd50_acc": {"mean": pgd, "std": 0.01 if n > 1 else None, "n": n},
                          "clean_acc": {"mean": 0.8, "std": 0.02, "n": n}}}
    setting = {"title": "mnist", "label": "", "pgd": "pgd50_acc", "eps": [0.1, 8 / 255], "rows": ["FGSM", "FGSM + DER"],
               "cells": [cell("FGSM", 0.1, 3, 0.0, 3), cell("FGSM + DER", 0.1, 3, 0.25, 1),
                         cell("FGSM + DER", 8 / 255, 1, 0.5, 0)]}
    lines = co_study.markdown({"settings": [setting]}).splitlines()
    pgd = lines.index("**PGD-50 accuracy (%)**")
    assert lines[pgd + 2:pgd + 6] == ["| Method | ε = 0.1 | ε = 8/255 |", "|---|---:|---:|",
                                      "| FGSM | 0.0 ± 1.0 | – |", "| FGSM + DER | 25.0 ± 1.0 | 50.0 (n=1) |"]
    assert "**AutoAttack accuracy (%)**" in lines and "**Worst-case accuracy (%)**" not in lines  # no cell has it
    collapsed = lines.index("**Collapsed seeds** (catastrophic overfitting at the end · diverged at some epoch)")
    assert lines[collapsed + 4:collapsed + 6] == ["| FGSM | CO 3/3 · div 0/3 | – |",
                                                  "| FGSM + DER | CO 1/3 · div 0/3 | CO 0/1 · div 0/1 |"]
    assert not any(line.startswith("## ") for line in lines)  # one setting, no label: no heading
