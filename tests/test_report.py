"""Summary keys and the CO / RO tables, from hand-made metrics dicts; the report stage on disk."""
from __future__ import annotations

import json

import pytest

from energyat import report
from energyat.errors import UserError
from energyat.params import parse
from energyat.stages import report as report_stage

METHODS = {"fgsm": "fgsm", "pgd": "pgd"}


def ev(eps, **acc):
    """An evaluate JSON: acc keys like best_clean=0.9 -> best.clean_acc."""
    out = {"eps": eps, "n_examples": 100, "restarts": 10, "best.seconds.aa": 12.0, "best.aa.apgd-ce_acc": 0.5}
    out.update({f"{k.split('_')[0]}.{k.split('_', 1)[1]}_acc": v for k, v in acc.items()})
    return out


EVALS = {
    ("fgsm", "base"): ev(0.3, best_clean=0.80, best_pgd20=0.40, best_pgd50=0.38, best_aa=0.35,
                         last_clean=0.90, last_pgd20=0.01, last_pgd50=0.0, last_aa=0.0),
    ("fgsm", "der"): ev(0.3, best_clean=0.78, best_pgd20=0.45, best_pgd50=0.44, best_aa=0.41,
                        last_clean=0.77, last_pgd20=0.46, last_pgd50=0.45, last_aa=0.4212),
    ("pgd", "base"): ev(0.1, best_clean=0.82, best_pgd20=0.70, best_pgd50=0.69, best_aa=0.66,
                        last_clean=0.85, last_pgd20=0.61, last_pgd50=0.60, last_aa=0.57),
    ("pgd", "der"): ev(0.1, best_clean=0.81, best_pgd20=0.71, best_pgd50=0.70, best_aa=0.67,
                       last_clean=0.83, last_pgd20=0.68, last_pgd50=0.67, last_aa=0.65),
}
TRAINS = {
    ("fgsm", "base"): {"catastrophic_overfitting": True, "co_epoch": 4, "best_epoch": 3, "diverged": False},
    ("fgsm", "der"): {"catastrophic_overfitting": False, "co_epoch": None, "best_epoch": 8},
    ("pgd", "base"): {"best_epoch": 12, "best_val_pgd_acc": 0.71, "robust_overfitting_gap": 0.1},
    ("pgd", "der"): {"best_epoch": 25, "best_val_pgd_acc": 0.72, "robust_overfitting_gap": 0.03},
}
STANDARD = ev(0.1, best_clean=0.91, best_pgd20=0.0, last_clean=0.92, last_pgd20=0.0, last_pgd50=0.0, last_aa=0.0)


def test_summary_keys_are_flat_and_stable():
    s = report.summary(METHODS, EVALS, TRAINS, STANDARD, {"gen.pca-local.der.fid": 31.5})
    assert s["co.fgsm.base.aa_acc"] == 0.0 and s["co.fgsm.der.aa_acc"] == 0.4212  # final checkpoint
    assert s["co.fgsm.der.pgd50_acc"] == 0.45 and "co.fgsm.base.best.aa_acc" not in s
    assert s["co.fgsm.base.catastrophic_overfitting"] is True and s["co.fgsm.base.co_epoch"] == 4
    assert s["co.fgsm.der_gain.aa_acc"] == pytest.approx(0.4212) and s["co.fgsm.eps"] == 0.3
    assert s["ro.pgd.der.best.pgd50_acc"] == 0.70 and s["ro.pgd.base.last.aa_acc"] == 0.57
    assert s["ro.pgd.der_gain.last.aa_acc"] == pytest.approx(0.08) and s["ro.pgd.der_gain.best.clean_acc"] == -0.01
    assert s["ro.pgd.base.robust_overfitting_gap"] == 0.1 and "ro.pgd.base.co_epoch" not in s
    assert s["standard.clean_acc"] == 0.92 and s["standard.aa_acc"] == 0.0 and s["n_examples"] == 100
    assert s["gen.pca-local.der.fid"] == 31.5
    assert not any(isinstance(v, dict) for v in s.values())
    assert not any("seconds" in k or "apgd-ce" in k for k in s)


def test_co_table_in_paper_layout():
    assert report.co_table(METHODS, EVALS) == (
        "| Method | ε | Clean | PGD-50 | AA |\n"
        "|---|---:|---:|---:|---:|\n"
        "| FGSM | 0.3 | 90.0 | 0.0 | 0.0 |\n"
        "| FGSM + DER | 0.3 | 77.0 | 45.0 | 42.1 |\n"
        "\nAccuracy (%) on the first 100 test images, final checkpoint; PGD with 10 restarts; "
        "AA: standard AutoAttack.\n")


def test_ro_table_in_paper_layout_with_missing_aa():
    evals = {**EVALS, ("pgd", "der"): {k: v for k, v in EVALS["pgd", "der"].items() if k != "last.aa_acc"}}
    table = report.ro_table({"pgd": "pgd", "trades-run": "trades"},
                            {**evals, ("trades-run", "base"): EVALS["pgd", "base"],
                             ("trades-run", "der"): EVALS["pgd", "der"]})
    lines = table.splitlines()
    assert lines[0] == "| Method | ε | Checkpoint | Clean | PGD-50 | AA |"
    assert lines[2:6] == ["| PGD-AT | 0.1 | best | 82.0 | 69.0 | 66.0 |",
                          "| PGD-AT | 0.1 | last | 85.0 | 60.0 | 57.0 |",
                          "| PGD-AT + DER | 0.1 | best | 81.0 | 70.0 | 67.0 |",
                          "| PGD-AT + DER | 0.1 | last | 83.0 | 67.0 | – |"]
    assert lines[6] == "| TRADES (trades-run) | 0.1 | best | 82.0 | 69.0 | 66.0 |" and len(lines) == 12


def test_family_follows_the_method():
    assert [report.family(m) for m in ("fgsm", "rs-fgsm", "n-fgsm", "pgd", "trades")] == ["co"] * 3 + ["ro"] * 2


def test_report_stage_merges_score_and_writes_tables(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "metrics/eval").mkdir(parents=True)
    (tmp_path / "metrics/train").mkdir(parents=True)
    for (run, variant), e in EVALS.items():
        (tmp_path / f"metrics/eval/{run}.{variant}.json").write_text(json.dumps(e))
        (tmp_path / f"metrics/train/{run}.{variant}.json").write_text(json.dumps(TRAINS[run, variant]))
    params = parse({"runs": {"fgsm": {"method": "fgsm", "eps": 0.3}, "pgd": {"method": "pgd"}}})
    with pytest.raises(UserError, match="metrics/eval/standard.base.json: file not found"):
        report_stage.run(params)
    (tmp_path / "metrics/eval/standard.base.json").write_text(json.dumps(STANDARD))
    (tmp_path / "metrics/train/standard.base.json").write_text(json.dumps({"eps": 0.1, "final_val_clean_acc": 0.9}))
    report_stage.run(params)
    first = json.loads((tmp_path / "metrics/summary.json").read_text())
    assert "gen.pca-local.der.fid" not in first and first["ro.pgd.base.last.aa_acc"] == 0.57
    (tmp_path / "metrics/score.json").write_text(json.dumps({"gen.pca-local.der.fid": 31.5}))
    report_stage.run(params)
    summary = json.loads((tmp_path / "metrics/summary.json").read_text())
    assert summary == {**first, "gen.pca-local.der.fid": 31.5}
    assert (tmp_path / "metrics/co_table.md").read_text() == report.co_table(METHODS, EVALS)
    assert (tmp_path / "metrics/ro_table.md").read_text().startswith("| Method | ε | Checkpoint |")


def test_training_table_rows_flag_co_divergence_and_gap():
    trains = {("fgsm", "base"): {"eps": 0.3, "final_val_clean_acc": 0.757, "final_val_pgd_acc": 0.013,
                                 "best_val_pgd_acc": 0.202, "best_epoch": 2, "catastrophic_overfitting": True,
                                 "co_epoch": 5, "diverged": False, "robust_overfitting_gap": 0.189,
                                 "robust_overfitting_gap_smoothed": 0.121,
                                 "final_dE_x": -0.881, "final_dE_xy": -0.471, "final_aae_frac": 0.531,
                                 "max_aae_frac": 0.531},
              ("fgsm", "der"): {"eps": 0.3, "final_val_clean_acc": 0.104, "final_val_pgd_acc": 0.104,
                                "best_val_pgd_acc": 0.104, "best_epoch": 4, "catastrophic_overfitting": False,
                                "co_epoch": None, "diverged": True, "diverged_epoch": 4}}
    rows = report.training_table({"fgsm": "fgsm"}, trains).splitlines()
    assert rows[2] == ("| fgsm | base | FGSM | 0.3 | 0.757 | 0.013 | 0.202 (2) | 5 | no | 0.189 (0.121) | -0.881 | -0.471 "
                       "| 0.531 (0.531) |")
    assert rows[3].startswith("| fgsm | der | FGSM | 0.3 | 0.104 | 0.104 | 0.104 (4) | no | epoch 4 | – (–) |")
