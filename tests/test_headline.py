"""Headline rows: what `dvc metrics show` prints, one row per model, comparison, sampler, study cell or paper job."""
import json

from energyat.infra.artifacts import write_rows
from energyat.reporting import headline

SUMMARY = {
    "n_examples": 1000, "co.fgsm.eps": 0.3,
    "standard.clean_acc": 0.904, "standard.clean_acc_lo": 0.88, "standard.pgd50_acc": 0.007,
    "co.fgsm.base.clean_acc": 0.746, "co.fgsm.base.pgd50_acc": 0.02, "co.fgsm.base.pgd10_acc": 0.05,
    "co.fgsm.base.co_at_end": True, "co.fgsm.base.co_epoch": 4, "co.fgsm.base.aa_warnings": 0,
    "co.fgsm.der_gain.pgd50_acc": 0.024, "co.fgsm.der_gain.pgd50_acc_p": 0.0015,
    "co.fgsm.der_gain.pgd50_acc_p_holm": 0.0045, "co.fgsm.der_gain.clean_acc_p_holm": 0.0,
    "ro.pgd.base.last.worst_acc": 0.48, "ro.pgd.base.last.worst_acc_lo": 0.4118, "ro.pgd.base.last.worst_acc_hi": 0.549,
    "ro.pgd.base.last.pgd50_acc_lo": 0.48, "ro.pgd.base.best_epoch": 32,
    "ro.pgd.der_gain.last.worst_acc": 0.005, "ro.pgd.der_gain.last.worst_acc_lo": -0.0257,
    "ro.pgd.der_gain.last.worst_acc_hi": 0.0357, "ro.pgd.der_gain.last.worst_acc_p_holm": 1.0,
    "ro.pgd.der_gain.last.pgd50_acc": 0.021, "ro.pgd.der_gain.last.pgd50_acc_p_holm": 0.09,
    "ro.pgd.der.best_minus_last.pgd50_acc": 0.005, "ro.pgd.der.best_minus_last.pgd50_acc_p_holm": 0.2266,
    "gen.pca-local.der.fid": 0.11793, "gen.pca-local.der.inception_fid": "not computed", "gen.pca-local.der.steps": 50.0,
    "gen.real.is": 7.3454,
}


def test_rows_of_a_run_summary_map_each_key_to_its_row_and_column():
    rows = headline.from_summary(SUMMARY)
    assert rows == {
        "standard.base.last": {"clean": 0.904, "pgd": 0.007},
        "fgsm.base.last": {"clean": 0.746, "pgd": 0.02, "co": 1},  # the strongest PGD only: PGD-10 left out
        "fgsm.der-base.last": {"pgd": 0.024, "p_holm": 0.0045},
        "pgd.base.last": {"worst": 0.48, "worst_lo": 0.4118, "worst_hi": 0.549},
        "pgd.der-base.last": {"worst": 0.005, "worst_lo": -0.0257, "worst_hi": 0.0357, "pgd": 0.021, "p_holm": 1.0},
        "pgd.der.best-last": {"pgd": 0.005, "p_holm": 0.2266},
        "gen.pca-local.der": {"fid": 0.1179, "steps": 50.0},  # "not computed" is no number
        "gen.real": {"is": 7.3454},
    }
    assert {c for row in rows.values() for c in row} <= set(headline.COLUMNS)


def _setting(title, label, cells):
    return {"title": title, "label": label, "pgd": "pgd50_acc", "cells": cells}


def test_study_rows_hold_means_over_seeds_and_the_ro_differences_with_holm_p():
    stats = {"clean_acc": {"mean": 0.7533}, "pgd50_acc": {"mean": 0.0}, "aa_acc": {"mean": 0.0},
             "worst_acc": {"mean": 0.0, "lo": 0.0, "hi": 0.0}}
    study = {"settings": [
        _setting("fashion-mnist", "", [{"eps": 0.3, "run": "fgsm", "variant": "base", "n": 3, "co_at_end": 3,
                                        "stats": stats}]),
        _setting("image-folder (cifar10-jpeg.tar.gz)", 'data.dataset="image-folder", der.aae_norm="batch"',
                 [{"eps": 16 / 255, "run": "fgsm", "variant": "der", "n": 1, "co_at_end": 0, "stats": {}}])]}
    diff = {"mean": 0.041, "lo": 0.0281, "hi": 0.0539, "paired_t_p_holm": 0.037183}
    seeds = {"groups": [{"seeds": [0, 1, 2], "metrics": {
        "metrics/eval/pgd.base.json": {"last.worst_acc": {"mean": 0.4633, "lo": 0.4346, "hi": 0.492},
                                       "best.worst_acc": {"mean": 0.9}},
        "metrics/eval/pgd.der.json": {"last.pgd50_acc": {"mean": 0.5707}}},
        "robust_overfitting": {"pgd": {
            "pgd": "pgd50_acc", "der_gain_last": {"worst_acc": diff, "pgd50_acc": {"mean": 0.0467}},
            "gap": {"base": {"mean": 0.0233, "paired_t_p_holm": 0.2968}, "der": {"mean": 0.0086}},
            "gap_worst": {"base": {"mean": 0.013, "lo": -0.0168, "hi": 0.0428, "paired_t_p_holm": 0.6042}}}}}]}
    rows = headline.from_studies(study, seeds)
    assert rows == {
        "co.fashion-mnist.eps0.3.fgsm.base": {"clean": 0.7533, "pgd": 0.0, "aa": 0.0, "worst": 0.0, "worst_lo": 0.0,
                                              "worst_hi": 0.0, "seeds": 3, "co": 3},
        "co.cifar10-jpeg-batch-norm-der.eps16-255.fgsm.der": {"seeds": 1, "co": 0},
        "ro.pgd.base.last": {"worst": 0.4633, "worst_lo": 0.4346, "worst_hi": 0.492, "seeds": 3},
        "ro.pgd.der.last": {"pgd": 0.5707, "seeds": 3},
        "ro.pgd.base.best-last": {"pgd": 0.0233, "worst": 0.013, "worst_lo": -0.0168, "worst_hi": 0.0428,
                                  "p_holm": 0.6042, "seeds": 3},
        "ro.pgd.der.best-last": {"pgd": 0.0086, "seeds": 3},
        "ro.pgd.der-base.last": {"worst": 0.041, "worst_lo": 0.0281, "worst_hi": 0.0539, "pgd": 0.0467,
                                 "p_holm": 0.03718, "seeds": 3},
    }


def test_writing_rows_replaces_the_rows_of_an_earlier_run(tmp_path):
    write_rows(tmp_path, {"a.base.last": {"clean": 0.5}, "b.base.last": {"clean": 0.6}})
    (tmp_path / "notes.txt").write_text("kept")
    write_rows(tmp_path, {"a.base.last": {"clean": 0.7}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.base.last.json", "notes.txt"]
    assert json.loads((tmp_path / "a.base.last.json").read_text()) == {"clean": 0.7}
