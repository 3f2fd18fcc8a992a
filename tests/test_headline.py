"""Headline rows: what `dvc metrics show` prints, one row per model, comparison, sampler, study cell or paper job."""
import json

import pytest

from energyat.errors import UserError
from energyat.infra.artifacts import write_rows
from energyat.reporting import headline

SUMMARY = {
    "n_examples": 1000, "co.fgsm.eps": 0.3,
    "standard.clean_acc": 0.904, "standard.clean_acc_lo": 0.88, "standard.clean_acc_n": 1000,
    "standard.pgd50_acc": 0.007, "standard.pgd50_acc_n": 1000,
    "co.fgsm.base.clean_acc": 0.746, "co.fgsm.base.pgd50_acc": 0.02, "co.fgsm.base.pgd10_acc": 0.05,
    "co.fgsm.base.pgd10_acc_n": 1000, "co.fgsm.base.pgd_apgd_acc": 0.0, "co.fgsm.base.pgd_apgd_acc_n": 100,
    "co.fgsm.base.co_at_end": True, "co.fgsm.base.co_epoch": 4, "co.fgsm.base.aa_warnings": 0,
    "co.fgsm.der_gain.pgd50_acc": 0.024, "co.fgsm.der_gain.pgd50_acc_p": 0.0015, "co.fgsm.der_gain.pgd50_acc_n": 1000,
    "co.fgsm.der_gain.pgd50_acc_p_holm": 0.0045, "co.fgsm.der_gain.clean_acc_p_holm": 0.0,
    "ro.pgd.base.last.worst_acc": 0.48, "ro.pgd.base.last.worst_acc_lo": 0.4118, "ro.pgd.base.last.worst_acc_hi": 0.549,
    "ro.pgd.base.last.worst_acc_n": 50, "ro.pgd.base.last.pgd50_acc_lo": 0.48, "ro.pgd.base.best_epoch": 32,
    "ro.pgd.der_gain.last.worst_acc": 0.005, "ro.pgd.der_gain.last.worst_acc_lo": -0.0257,
    "ro.pgd.der_gain.last.worst_acc_hi": 0.0357, "ro.pgd.der_gain.last.worst_acc_p_holm": 1.0,
    "ro.pgd.der_gain.last.pgd50_acc": 0.021, "ro.pgd.der_gain.last.pgd50_acc_p_holm": 0.09,
    "ro.pgd.der.best_minus_last.pgd50_acc": 0.005, "ro.pgd.der.best_minus_last.pgd50_acc_p_holm": 0.2266,
    "ro.pgd.der.best_minus_last.worst_acc": 0.01, "ro.pgd.der.best_minus_last.worst_acc_p_holm": 1.0,
    "gen.pca-local.der.fid": 0.11793, "gen.pca-local.der.inception_fid": "not computed", "gen.pca-local.der.steps": 50.0,
    "gen.real.is": 7.3454,
}


def test_rows_of_a_run_summary_map_each_key_to_its_row_and_column():
    rows = headline.from_summary(SUMMARY)
    assert rows == {
        "standard.base.last": {"clean": 0.904, "n_clean": 1000, "pgd": 0.007, "n_pgd": 1000},
        # the strongest PGD only: PGD-10 and its n left out
        "fgsm.base.last": {"clean": 0.746, "pgd": 0.02, "pgd_apgd": 0.0, "n_pgd_apgd": 100, "co": 1},
        "fgsm.der-base.last": {"pgd": 0.024, "n_pgd": 1000, "p_pgd": 0.0045, "p_clean": 0.0},
        "pgd.base.last": {"worst": 0.48, "worst_lo": 0.4118, "worst_hi": 0.549, "n_worst": 50},
        "pgd.der-base.last": {"worst": 0.005, "worst_lo": -0.0257, "worst_hi": 0.0357, "pgd": 0.021, "p_worst": 1.0,
                              "p_pgd": 0.09},
        # one p per column, each that column's own (Holm-adjusted) p
        "pgd.der.best-last": {"pgd": 0.005, "p_pgd": 0.2266, "worst": 0.01, "p_worst": 1.0},
        "gen.pca-local.der": {"fid": 0.1179, "steps": 50.0},  # "not computed" is no number
        "gen.real": {"is": 7.3454},
    }
    assert {c for row in rows.values() for c in row} <= set(headline.COLUMNS)


def _setting(title, label, cells, **extra):
    return {"title": title, "label": label, "pgd": "pgd50_acc", "cells": cells, **extra}


def test_study_rows_hold_means_over_seeds_the_images_and_a_holm_p_per_column():
    stats = {"clean_acc": {"mean": 0.7533}, "pgd50_acc": {"mean": 0.0}, "aa_acc": {"mean": 0.0},
             "worst_acc": {"mean": 0.0, "lo": 0.0, "hi": 0.0}}
    images = {"clean_acc": 500, "pgd50_acc": 500, "aa_acc": 50, "worst_acc": 50}
    study = {"settings": [
        _setting("fashion-mnist", "", [{"eps": 0.3, "run": "fgsm", "variant": "base", "n": 3, "co_at_end": 3,
                                        "stats": stats, "images": images}]),
        _setting("image-folder (cifar10-jpeg.tar.gz)", 'data.dataset="image-folder", der.aae_norm="batch"',
                 [{"eps": 16 / 255, "run": "fgsm", "variant": "der", "n": 1, "co_at_end": 0, "stats": {}}])]}
    diff = {"mean": 0.041, "lo": 0.0281, "hi": 0.0539, "paired_t_p_holm": 0.037183}
    seeds = {"groups": [{"seeds": [0, 1, 2], "metrics": {
        "metrics/eval/pgd.base.json": {"last.worst_acc": {"mean": 0.4633, "lo": 0.4346, "hi": 0.492},
                                       "best.worst_acc": {"mean": 0.9}},
        "metrics/eval/pgd.der.json": {"last.pgd50_acc": {"mean": 0.5707}}},
        "robust_overfitting": {"pgd": {
            "pgd": "pgd50_acc", "der_gain_last": {"worst_acc": diff, "pgd50_acc": {"mean": 0.0467,
                                                                                   "paired_t_p_holm": 0.0309}},
            "images": {"pgd50_acc": 5000, "worst_acc": 1000, "pgd_apgd_acc": 1000},
            "gap": {"base": {"mean": 0.0233, "paired_t_p_holm": 0.2968}, "der": {"mean": 0.0086}},
            "gap_pgd_apgd": {"base": {"mean": 0.013, "lo": -0.0168, "hi": 0.0428, "paired_t_p_holm": 0.6042}}}}}]}
    rows = headline.from_studies(study, seeds)
    assert rows == {
        "co.fashion-mnist.eps0.3.fgsm.base": {"clean": 0.7533, "pgd": 0.0, "aa": 0.0, "worst": 0.0, "worst_lo": 0.0,
                                              "worst_hi": 0.0, "n_clean": 500, "n_pgd": 500, "n_aa": 50,
                                              "n_worst": 50, "seeds": 3, "co": 3},
        "co.cifar10-jpeg-batch-norm-der.eps16-255.fgsm.der": {"seeds": 1, "co": 0},
        "ro.pgd.base.last": {"worst": 0.4633, "worst_lo": 0.4346, "worst_hi": 0.492, "n_worst": 1000, "seeds": 3},
        "ro.pgd.der.last": {"pgd": 0.5707, "n_pgd": 5000, "seeds": 3},
        # the gaps of PGD + APGD (on APGD's images): a column of its own, not the worst case
        "ro.pgd.base.best-last": {"pgd": 0.0233, "pgd_apgd": 0.013, "n_pgd": 5000, "n_pgd_apgd": 1000,
                                  "p_pgd": 0.2968, "p_pgd_apgd": 0.6042, "seeds": 3},
        "ro.pgd.der.best-last": {"pgd": 0.0086, "n_pgd": 5000, "seeds": 3},
        "ro.pgd.der-base.last": {"worst": 0.041, "worst_lo": 0.0281, "worst_hi": 0.0539, "pgd": 0.0467,
                                 "n_pgd": 5000, "n_worst": 1000, "p_worst": 0.03718, "p_pgd": 0.0309, "seeds": 3},
    }


def test_setting_names_are_unique_by_construction():
    fm = 'data.dataset="fashion-mnist", data.source="auto", train.epochs=5'
    settings = [
        _setting("fashion-mnist", fm, []),
        # differs from the first only in the data source: its file in the name
        _setting("fashion-mnist", 'data.dataset="fashion-mnist", data.source="/data/copy/fm.tar.gz", train.epochs=5',
                 []),
        # the DER variant spelt as it always was; the source sets it apart from the second
        _setting("fashion-mnist", fm + ', der.aae_norm="batch"', []),
        # a re-run setting records all its params; the same setting kept as aggregates only, its label's
        _setting("image-folder (cifar10-jpeg.tar.gz)", 'data.source="cifar10-jpeg.tar.gz"', [],
                 params={"data.source": "/work/shared/cifar10-jpeg.tar.gz", "der.aae_norm": "aae", "train.epochs": 10}),
        _setting("image-folder (cifar10-jpeg.tar.gz)",
                 'data.source="/elsewhere/cifar10-jpeg.tar.gz", der.aae_norm="aae", train.epochs=10', []),
        _setting("image-folder (cifar10-jpeg.tar.gz)", 'der.aae_norm="aae", train.epochs=20', []),
        _setting("cifar10", 'data.dataset="cifar10"', []),  # the real CIFAR-10 is not the JPEG copy
    ]
    assert headline.setting_names(settings) == [
        "fashion-mnist-source-auto", "fashion-mnist-source-fm-tar-gz", "fashion-mnist-batch-norm-der-source-auto",
        "cifar10-jpeg-epochs-10", "cifar10-jpeg-epochs-10", "cifar10-jpeg-epochs-20", "cifar10"]
    cell = {"eps": 0.3, "run": "fgsm", "variant": "base", "n": 1, "co_at_end": 0, "stats": {}}
    rows = headline.from_studies({"settings": [{**s, "cells": [cell]} for s in settings[:3]]}, {"groups": []})
    assert len(rows) == 3
    # cells that still share a name (two settings whose recorded params do not tell them apart) are refused
    twins = [_setting("fashion-mnist", fm, [cell]), _setting("fashion-mnist", 'train.epochs=5', [cell])]
    with pytest.raises(UserError, match=r"two rows named co\.fashion-mnist\.eps0\.3\.fgsm\.base"):
        headline.from_studies({"settings": twins}, {"groups": []})


def test_writing_rows_replaces_the_rows_of_an_earlier_run(tmp_path):
    write_rows(tmp_path, {"a.base.last": {"clean": 0.5}, "b.base.last": {"clean": 0.6}})
    (tmp_path / "notes.txt").write_text("kept")
    write_rows(tmp_path, {"a.base.last": {"clean": 0.7}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.base.last.json", "notes.txt"]
    assert json.loads((tmp_path / "a.base.last.json").read_text()) == {"clean": 0.7}
