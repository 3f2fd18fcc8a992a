"""Summary keys, intervals, paired tests and the CO / RO tables from hand-made evaluate outputs; the report stage
on disk."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from energyat.errors import UserError
from energyat.evaluation import stats
from energyat.params import parse
from energyat.reporting import tables
from energyat.stages import report as report_stage

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"fgsm": "fgsm", "pgd": "pgd"}
N, N_AA, N_WORST = 100, 20, 40  # worst case: the first max(apgd_examples, aa_examples) = 40 images


def evaluated(eps, warnings: dict | None = None, **counts):
    """An evaluate JSON and its flags file. `counts`: e.g. best=(80, 40, 38, 7) correct images under clean, PGD-20,
    PGD-50 (of N) and AutoAttack (of the first N_AA); each flag string is that many 1s followed by 0s, so that two
    models' flags differ only in the images between their counts (only one side is ever right alone). The worst case
    on the first N_WORST images is their per-image AND (AutoAttack on its first N_AA): for (80, 40, 38, 7) images
    0-6 and 20-37, 25 of 40."""
    ev = {"eps": eps, "n_examples": N, "aa_examples": N_AA, "apgd_examples": N_WORST, "worst_examples": N_WORST,
          "restarts": 3}
    fl = {"format": "energyat-flags/1", "run": "r", "variant": "v", "test_sha256": "abc", "n": N, "aa_n": N_AA,
          "apgd_n": N_WORST, "worst_n": N_WORST}
    for ck, values in counts.items():
        for name, k in zip(("clean", "pgd20", "pgd50", "aa"), values):
            n = N_AA if name == "aa" else N
            fl[f"{ck}.{name}"] = "1" * k + "0" * (n - k)
        fl[f"{ck}.worst"] = "".join(
            "1" if all(fl[f"{ck}.{name}"][i] == "1" for name in ("clean", "pgd20", "pgd50"))
            and (i >= N_AA or fl[f"{ck}.aa"][i] == "1") else "0" for i in range(N_WORST))
        for name in ("clean", "pgd20", "pgd50", "aa", "worst"):
            k, n = fl[f"{ck}.{name}"].count("1"), len(fl[f"{ck}.{name}"])
            lo, hi = stats.wilson(k, n)
            ev.update({f"{ck}.{name}_acc": round(k / n, 4), f"{ck}.{name}_acc_lo": round(lo, 4),
                       f"{ck}.{name}_acc_hi": round(hi, 4)})
        ev[f"{ck}.aa.warnings"] = (warnings or {}).get(ck, 0)
        ev[f"{ck}.aa.apgd-ce_acc"] = 0.5
        ev[f"{ck}.seconds.aa"] = 12.0
    return ev, fl


RUNS = {
    ("fgsm", "base"): evaluated(0.3, best=(80, 40, 38, 7), last=(90, 1, 0, 0)),
    ("fgsm", "der"): evaluated(0.3, best=(78, 45, 44, 8), last=(77, 46, 45, 8)),
    ("pgd", "base"): evaluated(0.1, {"last": 2}, best=(82, 70, 69, 13), last=(85, 61, 60, 11)),
    ("pgd", "der"): evaluated(0.1, best=(81, 71, 70, 13), last=(83, 68, 67, 13)),
}
EVALS = {k: v[0] for k, v in RUNS.items()}
FLAGS = {k: v[1] for k, v in RUNS.items()}
TRAINS = {
    ("fgsm", "base"): {"catastrophic_overfitting": True, "co_epoch": 4, "best_epoch": 3, "diverged": False},
    ("fgsm", "der"): {"catastrophic_overfitting": False, "co_epoch": None, "best_epoch": 8},
    ("pgd", "base"): {"best_epoch": 12, "best_val_pgd_acc": 0.71, "robust_overfitting_gap": 0.1},
    ("pgd", "der"): {"best_epoch": 25, "best_val_pgd_acc": 0.72, "robust_overfitting_gap": 0.03},
}
STANDARD, STANDARD_FLAGS = evaluated(0.1, best=(91, 0, 0, 0), last=(92, 0, 0, 0))


def test_summary_keys_are_flat_and_stable():
    s = tables.summary(METHODS, EVALS, TRAINS, FLAGS, STANDARD, {"gen.pca-local.der.fid": 31.5})
    # accuracies of the final checkpoint (CO) with their Wilson 95 % intervals
    assert (s["co.fgsm.der.aa_acc"], s["co.fgsm.der.aa_acc_lo"], s["co.fgsm.der.aa_acc_hi"]) == (0.4, 0.2188, 0.6134)
    assert (s["co.fgsm.base.clean_acc"], s["co.fgsm.base.clean_acc_lo"], s["co.fgsm.base.clean_acc_hi"]) == \
        (0.9, 0.8256, 0.9448)
    assert s["co.fgsm.der.pgd50_acc"] == 0.45 and "co.fgsm.base.best.aa_acc" not in s
    assert s["co.fgsm.base.catastrophic_overfitting"] is True and s["co.fgsm.base.co_epoch"] == 4
    # DER − base on the same images: 8 of 20 AA images only DER gets right -> exact McNemar p = 2 / 2^8
    assert (s["co.fgsm.der_gain.aa_acc"], s["co.fgsm.der_gain.aa_acc_p"]) == (0.4, 0.007812)
    # Newcombe's paired interval (values from an independent high-precision computation): base has none of the 20
    # AA images, an empty marginal, so phi is 0 and the bounds are those of unpaired square-and-add
    assert s["co.fgsm.der_gain.aa_acc_lo"] == 0.1575 and s["co.fgsm.der_gain.aa_acc_hi"] == 0.6134
    assert (s["co.fgsm.der_gain.clean_acc"], s["co.fgsm.der_gain.clean_acc_p"]) == (-0.13, 0.0002441)
    assert (s["co.fgsm.der_gain.clean_acc_lo"], s["co.fgsm.der_gain.clean_acc_hi"]) == (-0.2056, -0.0623)
    # Holm over the CO table's family (clean, PGD-50, AA, worst case of the one CO run): clean is 3rd smallest -> 2 p
    assert s["co.fgsm.der_gain.clean_acc_p_holm"] == 0.0004883 and s["co.fgsm.der_gain.aa_acc_p_holm"] == 0.007812
    # worst case on the first 40 images: base none, DER images 0-7 and 20-39 (AA broke 8-19); 2nd smallest p -> 3 p
    assert (s["co.fgsm.base.worst_acc"], s["co.fgsm.der.worst_acc"], s["co.fgsm.der.worst_acc_lo"]) == (0, 0.7, 0.5457)
    assert (s["co.fgsm.der_gain.worst_acc"], s["co.fgsm.der_gain.worst_acc_p"]) == (0.7, 7.451e-09)  # 2 / 2^28
    assert s["co.fgsm.der_gain.worst_acc_p_holm"] == 2.235e-08
    assert "co.fgsm.der_gain.pgd20_acc_p" in s and "co.fgsm.der_gain.pgd20_acc_p_holm" not in s  # not in the table
    assert s["co.fgsm.eps"] == 0.3 and s["co.fgsm.der.aa_warnings"] == 0
    # robust overfitting: both checkpoints, DER gain per checkpoint, best − last per variant
    assert s["ro.pgd.der.best.pgd50_acc"] == 0.7 and s["ro.pgd.base.last.aa_acc"] == 0.55
    assert s["ro.pgd.base.last.aa_warnings"] == 2 and s["ro.pgd.base.best.aa_warnings"] == 0
    assert (s["ro.pgd.der_gain.last.pgd50_acc"], s["ro.pgd.der_gain.last.pgd50_acc_p"]) == (0.07, 0.01562)
    assert (s["ro.pgd.der_gain.best.clean_acc"], s["ro.pgd.der_gain.best.clean_acc_p"]) == (-0.01, 1.0)
    assert (s["ro.pgd.base.best_minus_last.pgd50_acc"], s["ro.pgd.base.best_minus_last.pgd50_acc_p"]) == \
        (0.09, 0.003906)
    # Holm over the RO table's 16 Δ cells: the smallest p times 16, the next (0.0156) times 15
    assert s["ro.pgd.base.best_minus_last.pgd50_acc_p_holm"] == 0.0625
    assert s["ro.pgd.der_gain.last.pgd50_acc_p_holm"] == 0.2344 and s["ro.pgd.der_gain.best.clean_acc_p_holm"] == 1.0
    assert (s["ro.pgd.base.best.worst_acc"], s["ro.pgd.base.last.worst_acc"]) == (0.825, 0.775)
    assert (s["ro.pgd.base.best_minus_last.worst_acc"], s["ro.pgd.base.best_minus_last.worst_acc_p"]) == (0.05, 0.5)
    assert (s["ro.pgd.base.best_minus_last.clean_acc"], s["ro.pgd.base.best_minus_last.clean_acc_p"]) == (-0.03, 0.25)
    assert s["ro.pgd.der.best_minus_last.aa_acc"] == 0 and s["ro.pgd.der.best_minus_last.aa_acc_p"] == 1.0
    assert s["ro.pgd.base.robust_overfitting_gap"] == 0.1 and "ro.pgd.base.co_epoch" not in s
    assert s["standard.clean_acc"] == 0.92 and s["standard.aa_acc"] == 0.0 and s["standard.aa_acc_hi"] == 0.1611
    assert (s["n_examples"], s["aa_examples"]) == (100, 20)
    assert s["gen.pca-local.der.fid"] == 31.5
    assert not any(isinstance(v, dict) for v in s.values())
    assert not any("seconds" in k or "apgd" in k or "check." in k for k in s)  # APGD alone: a worst-case component


def test_paired_differences_have_newcombe_intervals_around_the_difference():
    s = tables.summary(METHODS, EVALS, TRAINS, FLAGS, STANDARD)
    d = stats.paired_difference([c == "1" for c in FLAGS["pgd", "base"]["last.pgd50"]],
                                [c == "1" for c in FLAGS["pgd", "der"]["last.pgd50"]])
    assert (d["only_a"], d["only_b"]) == (0, 7)
    assert (s["ro.pgd.der_gain.last.pgd50_acc_lo"], s["ro.pgd.der_gain.last.pgd50_acc_hi"]) == \
        (round(d["lo"], 4), round(d["hi"], 4)) == (0.0163, 0.1235)
    # no discordant image (AA, best checkpoint: 13 of 20 for both): an interval, not [0, 0]
    assert (s["ro.pgd.der_gain.best.aa_acc"], s["ro.pgd.der_gain.best.aa_acc_lo"],
            s["ro.pgd.der_gain.best.aa_acc_hi"]) == (0, -0.1019, 0.1019)


def test_tables_format_accuracies_from_the_flag_counts_not_the_rounded_bounds():
    """3 of 11: Wilson [0.097461, 0.565645]; evaluate stores 0.0975, which would print 9.8 instead of 9.7."""
    ev, fl = evaluated(0.3, last=(90, 1, 0, 0))
    fl["last.aa"] = "11100000000"
    ev.update({"last.aa_acc": round(3 / 11, 4), "last.aa_acc_lo": 0.0975, "last.aa_acc_hi": 0.5656})
    acc = tables.with_intervals(ev, "last", fl)
    assert stats.fmt_pct_interval(acc["aa_acc"], acc["aa_acc_lo"], acc["aa_acc_hi"]) == "27.3 [9.7, 56.6]"
    assert tables.with_intervals(ev, "last")["aa_acc_lo"] == 0.0975  # without flags: the stored value as is


def test_co_table_in_paper_layout_with_intervals_and_paired_differences():
    assert tables.co_table(METHODS, EVALS, FLAGS) == (
        "| Method | ε | Clean | PGD-50 | AA | Worst case |\n"
        "|---|---:|---:|---:|---:|---:|\n"
        "| FGSM | 0.3 | 90.0 [82.6, 94.5] | 0.0 [0.0, 3.7] | 0.0 [0.0, 16.1] | 0.0 [0.0, 8.8] |\n"
        "| FGSM + DER | 0.3 | 77.0 [67.8, 84.2] | 45.0 [35.6, 54.8] | 40.0 [21.9, 61.3] | 70.0 [54.6, 81.9] |\n"
        "| Δ DER − base | | -13.0 [-20.6, -6.2], p < 0.001 (Holm < 0.001) | +45.0 [+34.9, +54.8], p < 0.001 "
        "(Holm < 0.001) | +40.0 [+15.8, +61.3], p = 0.008 (Holm 0.008) | +70.0 [+52.3, +81.9], p < 0.001 "
        "(Holm < 0.001) |\n"
        "\nAccuracy (%) with its Wilson 95 % interval: clean and PGD on the first 100 test images, AA (standard "
        "AutoAttack) on the first 20 of them; worst case on the first 40: an image counts when it is classified "
        "correctly clean and under every PGD, APGD-CE + APGD-T (first 40) and AA; final checkpoint; PGD with 3 random "
        "starts. Differences (Δ rows) in percentage points on the same images: Newcombe's paired score 95 % interval "
        "and exact McNemar p-value, Holm-adjusted over the table's 4 Δ cells in brackets.\n")


def test_ro_table_rows_flag_autoattack_warnings_and_show_missing_cells():
    evals = {**EVALS, ("pgd", "der"): {k: v for k, v in EVALS["pgd", "der"].items() if not k.startswith("last.aa_")}}
    table = tables.ro_table({"pgd": "pgd", "trades-run": "trades"},
                            {**evals, ("trades-run", "base"): EVALS["pgd", "base"],
                             ("trades-run", "der"): EVALS["pgd", "der"]},
                            {**FLAGS, ("trades-run", "base"): FLAGS["pgd", "base"],
                             ("trades-run", "der"): FLAGS["pgd", "der"]})
    lines = table.splitlines()
    assert lines[0] == "| Method | ε | Checkpoint | Clean | PGD-50 | AA | Worst case |"
    assert lines[2:11] == [
        "| PGD-AT | 0.1 | best | 82.0 [73.3, 88.3] | 69.0 [59.4, 77.2] | 65.0 [43.3, 81.9] | 82.5 [68.1, 91.3] |",
        "| PGD-AT | 0.1 | last | 85.0 [76.7, 90.7] | 60.0 [50.2, 69.1] | 55.0 [34.2, 74.2] † | 77.5 [62.5, 87.7] |",
        "| PGD-AT | | Δ best − last | -3.0 [-7.8, +1.3], p = 0.250 (Holm 1.000) "
        "| +9.0 [+3.0, +14.9], p = 0.004 (Holm 0.125) | +10.0 [-5.9, +24.9], p = 0.500 (Holm 1.000) "
        "| +5.0 [-4.2, +14.9], p = 0.500 (Holm 1.000) |",
        "| PGD-AT + DER | 0.1 | best | 81.0 [72.2, 87.5] | 70.0 [60.4, 78.1] | 65.0 [43.3, 81.9] | 82.5 [68.1, 91.3] |",
        # AA's accuracy is missing from this evaluate JSON; the worst case comes from the flags
        "| PGD-AT + DER | 0.1 | last | 83.0 [74.5, 89.1] | 67.0 [57.3, 75.4] | – | 82.5 [68.1, 91.3] |",
        "| PGD-AT + DER | | Δ best − last | -2.0 [-6.2, +1.9], p = 0.500 (Holm 1.000) "
        "| +3.0 [-1.0, +7.1], p = 0.250 (Holm 1.000) | +0.0 [-10.2, +10.2], p = 1.000 (Holm 1.000) "
        "| +0.0 [-7.4, +7.4], p = 1.000 (Holm 1.000) |",
        "| Δ DER − base | | best | -1.0 [-4.7, +2.5], p = 1.000 (Holm 1.000) "
        "| +1.0 [-2.0, +4.1], p = 1.000 (Holm 1.000) | +0.0 [-10.2, +10.2], p = 1.000 (Holm 1.000) "
        "| +0.0 [-7.4, +7.4], p = 1.000 (Holm 1.000) |",
        "| Δ DER − base | | last | -2.0 [-6.3, +2.0], p = 0.500 (Holm 1.000) "
        "| +7.0 [+1.6, +12.4], p = 0.016 (Holm 0.469) | +10.0 [-5.9, +24.9], p = 0.500 (Holm 1.000) "
        "| +5.0 [-4.2, +14.9], p = 0.500 (Holm 1.000) |",
        "| TRADES (trades-run) | 0.1 | best | 82.0 [73.3, 88.3] | 69.0 [59.4, 77.2] | 65.0 [43.3, 81.9] "
        "| 82.5 [68.1, 91.3] |"]
    assert len(lines) == 2 + 2 * 8 + 2 and "†: AutoAttack's own checks raised warnings" in lines[-1]
    assert "Holm-adjusted over the table's 32 Δ cells" in lines[-1]  # one family: both runs' 8 Δ rows × 4
    assert "†" not in tables.co_table(METHODS, EVALS, FLAGS)  # no CO checkpoint warned


def test_paired_tests_refuse_flags_of_different_images():
    other = {**FLAGS["pgd", "der"], "test_sha256": "def", "run": "pgd", "variant": "der"}
    with pytest.raises(UserError, match=r"metrics/eval/r\.v\.flags\.json and metrics/eval/pgd\.der\.flags\.json "
                                        r"cover different test images \(test_sha256 'abc' vs 'def'\)"):
        tables.summary(METHODS, EVALS, TRAINS, {**FLAGS, ("pgd", "der"): other}, STANDARD)


def test_family_follows_the_method():
    assert [tables.family(m) for m in ("fgsm", "rs-fgsm", "n-fgsm", "gradalign", "pgd", "trades")] == \
        ["co"] * 4 + ["ro"] * 2


def test_report_stage_merges_score_and_writes_tables(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "metrics/eval").mkdir(parents=True)
    (tmp_path / "metrics/train").mkdir(parents=True)
    for (run, variant), (e, f) in RUNS.items():
        (tmp_path / f"metrics/eval/{run}.{variant}.json").write_text(json.dumps(e))
        (tmp_path / f"metrics/eval/{run}.{variant}.flags.json").write_text(json.dumps(f))
        (tmp_path / f"metrics/train/{run}.{variant}.json").write_text(json.dumps(TRAINS[run, variant]))
    params = parse({"runs": {"fgsm": {"method": "fgsm", "eps": 0.3}, "pgd": {"method": "pgd", "der": {"start_epoch": -1}}}})
    with pytest.raises(UserError, match="metrics/eval/standard.base.json: file not found"):
        report_stage.run(params)
    (tmp_path / "metrics/eval/standard.base.json").write_text(json.dumps(STANDARD))
    (tmp_path / "metrics/train/standard.base.json").write_text(json.dumps({"eps": 0.1, "final_val_clean_acc": 0.9}))
    (tmp_path / "plots/history").mkdir(parents=True)  # the per-epoch histories the report draws: the repo's own
    for run in ("standard.base", *(f"{r}.{v}" for r, v in RUNS)):
        shutil.copy(ROOT / f"plots/history/{run}.tsv", tmp_path / f"plots/history/{run}.tsv")
    report_stage.run(params)
    first = json.loads((tmp_path / "metrics/summary.json").read_text())
    assert first == tables.summary(METHODS, EVALS, TRAINS, FLAGS, STANDARD)
    (tmp_path / "metrics/score.json").write_text(json.dumps({"gen.pca-local.der.fid": 31.5}))
    report_stage.run(params)
    summary = json.loads((tmp_path / "metrics/summary.json").read_text())
    assert summary == {**first, "gen.pca-local.der.fid": 31.5}
    assert (tmp_path / "metrics/co_table.md").read_text() == tables.co_table(METHODS, EVALS, FLAGS)
    assert (tmp_path / "metrics/ro_table.md").read_text() == tables.ro_table(METHODS, EVALS, FLAGS)
    (tmp_path / "metrics/eval/pgd.der.flags.json").unlink()
    with pytest.raises(UserError, match="metrics/eval/pgd.der.flags.json: file not found"):
        report_stage.run(params)


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
    rows = tables.training_table({"fgsm": "fgsm"}, trains).splitlines()
    assert rows[2] == ("| fgsm | base | FGSM | 0.3 | 0.757 | 0.013 | 0.202 (2) | 5 | no | 0.189 (0.121) | -0.881 | -0.471 "
                       "| 0.531 (0.531) |")
    assert rows[3].startswith("| fgsm | der | FGSM | 0.3 | 0.104 | 0.104 | 0.104 (4) | no | epoch 4 | – (–) |")
