"""The study figures draw what the aggregates say: one line per run and variant over ε, seeds and their interval."""
import json
from pathlib import Path

import pytest

from energyat.studies import figures

ROOT = Path(__file__).resolve().parents[1]


def _stats(mean, lo, hi):
    return {"mean": mean, "lo": lo, "hi": hi, "n": 3, "std": 0.01}


def test_co_sweep_draws_a_line_per_run_and_variant_over_eps():
    cells = [{"run": "fgsm", "variant": v, "label": "FGSM" + (" + DER" if v == "der" else ""), "eps": e,
              "stats": {"pgd50_acc": _stats(m, m - 0.02, m + 0.02)}}
             for v, e, m in (("base", 0.1, 0.6), ("base", 0.3, 0.0), ("der", 0.1, 0.62), ("der", 0.3, 0.05))]
    study = {"settings": [{"title": "fashion-mnist", "label": "train.epochs=5", "pgd": "pgd50_acc", "cells": cells}]}
    (ax,) = figures.co_sweep_figure(study).axes
    lines = {c.get_label(): (list(c.lines[0].get_xdata()), list(c.lines[0].get_ydata())) for c in ax.containers}
    assert lines["FGSM"] == ([0.1, 0.3], [60.0, 0.0]) and lines["FGSM + DER"] == ([0.1, 0.3], [62.0, 5.0])
    assert ax.get_title() == "fashion-mnist, 5 epochs" and ax.get_xlabel() == "ε"


def test_cells_kept_as_aggregates_only_join_the_curve_of_their_re_run_setting():
    def cell(e, m):
        return {"run": "fgsm", "variant": "base", "label": "FGSM", "eps": e, "stats": {"pgd50_acc": _stats(m, m, m)}}

    fresh = {"title": "fashion-mnist", "label": "train.epochs=5", "pgd": "pgd50_acc", "cells": [cell(0.3, 0.0)],
             "params": {"train.epochs": 5, "der.aae_norm": "aae"}}
    kept = {"title": "fashion-mnist", "label": 'der.aae_norm="aae"', "pgd": "pgd50_acc", "evidence": "aggregates only",
            "cells": [cell(0.1, 0.6)]}
    other = {**kept, "label": 'der.aae_norm="batch"'}  # another DER variant: a panel of its own
    axes = figures.co_sweep_figure({"settings": [fresh, kept, other]}).axes
    assert len(axes) == 2
    (line,) = [c.lines[0] for c in axes[0].containers]
    assert list(line.get_xdata()) == [0.1, 0.3] and list(line.get_ydata()) == [60.0, 0.0]
    assert "hollow: aggregates only" in axes[0].get_title() and "aggregates only" in axes[1].get_title()


def test_seeds_figure_shows_every_seed_and_the_mean():
    rep = json.loads((ROOT / "metrics/seeds.json").read_text())
    ax, _curves = figures.seeds_figure(rep).axes
    gain = rep["groups"][0]["robust_overfitting"]["pgd"]["der_gain_last"]["pgd50_acc"]
    dots = [list(line.get_xdata()) for line in ax.get_lines() if len(line.get_xdata()) == len(gain["values"])]
    assert [100 * v for v in gain["values"]] in [[float(x) for x in d] for d in dots]
    assert "percentage points" in ax.get_xlabel()


def test_history_figure_overlays_base_and_der_per_run_of_the_params():
    from energyat.reporting.history_figures import QUANTITIES, histories_figure

    def rows(offset):
        return [{"epoch": e, "val_clean_acc": 0.5 + offset, "val_pgd_acc": 0.1 * e + offset, "dE_x": offset,
                 "dE_xy": float("nan"), "aae_frac": 0.0} for e in (1, 2, 3)]

    nan_rows = [{**r, "dE_x": float("nan"), "aae_frac": float("nan")} for r in rows(0.0)]
    fig = histories_figure({("standard", "base"): nan_rows, ("any-name", "base"): rows(0.0),
                            ("any-name", "der"): rows(0.1)}, {"standard": "standard", "any-name": "pgd"})
    axes = fig.axes
    assert len(axes) == 2 * len(QUANTITIES)
    pgd_panel = axes[len(QUANTITIES) + 1]
    (base, der) = [list(line.get_ydata()) for line in pgd_panel.lines]
    assert base == pytest.approx([0.1, 0.2, 0.3]) and der == pytest.approx([0.2, 0.3, 0.4])
    assert pgd_panel.get_title() == "any-name (PGD-AT): validation PGD accuracy"
    assert not axes[2].get_visible() and not axes[len(QUANTITIES) + 3].get_visible()  # nothing to draw there


def test_seeds_figure_draws_the_per_epoch_band_over_seeds():
    from energyat.studies import seeds

    def history(offset):
        return [{"epoch": e, "val_pgd_acc": 0.1 * e + offset, "val_clean_acc": 0.5} for e in (1, 2, 3)]

    bands = seeds.epoch_bands([history(0.0), history(0.02), history(0.04)])
    assert bands["val_pgd_acc"]["epoch"] == [1, 2, 3]
    assert bands["val_pgd_acc"]["mean"] == pytest.approx([0.12, 0.22, 0.32])
    half = 4.302652729749464 * 0.02 / 3 ** 0.5  # t(0.975, 2 df) * sd / sqrt(3)
    assert bands["val_pgd_acc"]["lo"] == pytest.approx([0.12 - half, 0.22 - half, 0.32 - half])
    assert bands["val_clean_acc"]["lo"] == pytest.approx([0.5] * 3)  # no spread: the interval is the mean
    gap = {"values": [0.01, 0.02, 0.03], "mean": 0.02, "lo": 0.0, "hi": 0.04}
    ro = {"method": "pgd", "pgd": "pgd50_acc", "gap": {"base": gap, "der": gap},
          "der_gain_last": {"pgd50_acc": gap}, "epochs": {"base": bands, "der": bands}}
    _, curve = figures.seeds_figure({"groups": [{"label": "", "robust_overfitting": {"pgd": ro}}]}).axes
    (base, der) = [list(line.get_ydata()) for line in curve.lines]
    assert base == pytest.approx([12.0, 22.0, 32.0]) and der == base
    assert curve.get_ylabel() == "validation PGD accuracy (%)" and len(curve.collections) == 2
