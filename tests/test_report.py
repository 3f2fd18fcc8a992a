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
N, N_AA, N_APGD = 100, 20, 40  # clean and PGD on 100 images, APGD on the first 40, AutoAttack on the first 20


def evaluated(eps, warnings: dict | None = None, **counts):
    """An evaluate JSON and its flags file. `counts`: e.g. best=(80, 40, 38, 7) correct images under clean, PGD-20,
    PGD-50 (of N) and AutoAttack (of the first N_AA); APGD leaves two fewer of the first N_APGD than PGD-50. Each flag
    string is that many 1s followed by 0s, so that two models' flags differ only in the images between their counts
    (only one side is ever right alone). The worst cases: on AutoAttack's 20 images the per-image AND of every
    evaluation, on APGD's 40 that of clean, the PGDs and APGD; for (80, 40, 38, 7): 7 of 20 and 36 of 40. The files
    also hold a stale `worst` over the first 40 (earlier evaluations' definition), which the report ignores."""
    ev = {"eps": eps, "n_examples": N, "aa_examples": N_AA, "apgd_examples": N_APGD, "worst_examples": N_APGD,
          "restarts": 3}
    fl = {"format": "energyat-flags/1", "run": "r", "variant": "v", "test_sha256": "abc", "n": N, "aa_n": N_AA,
          "apgd_n": N_APGD, "worst_n": N_APGD}
    for ck, values in counts.items():
        for name, k in zip(("clean", "pgd20", "pgd50", "aa"), values):
            n = N_AA if name == "aa" else N
            fl[f"{ck}.{name}"] = "1" * k + "0" * (n - k)
        apgd = max(0, min(values[2], N_APGD) - 2)
        fl[f"{ck}.apgd"] = "1" * apgd + "0" * (N_APGD - apgd)
        fl[f"{ck}.worst"] = "".join(
            "1" if all(fl[f"{ck}.{name}"][i] == "1" for name in ("clean", "pgd20", "pgd50"))
            and (i >= N_AA or fl[f"{ck}.aa"][i] == "1") else "0" for i in range(N_APGD))
        for name in ("clean", "pgd20", "pgd50", "apgd", "aa", "worst"):
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
    s = tables.summary(METHODS, EVALS, TRAINS, FLAGS, STANDARD, {"gen.pca-local.der.fid": 31.5}, STANDARD_FLAGS)
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
    # Holm over the CO table's family (clean, PGD-50, PGD-50 + APGD, AA, worst case of the one CO run): clean is 3rd
    # smallest -> 3 p; AA and the worst case, the largest two, 2 p each (step-down, kept monotone)
    assert s["co.fgsm.der_gain.clean_acc_p_holm"] == 0.0007324 and s["co.fgsm.der_gain.aa_acc_p_holm"] == 0.01562
    # the worst case on AutoAttack's 20 images (not the stale `worst` of the files, over 40): base none, DER images
    # 0-7, those AutoAttack left; PGD-50 + APGD on APGD's 40: DER images 0-37 (APGD breaks 38 and 39)
    assert (s["co.fgsm.base.worst_acc"], s["co.fgsm.der.worst_acc"], s["co.fgsm.der.worst_acc_n"]) == (0, 0.4, 20)
    assert (s["co.fgsm.der.pgd_apgd_acc"], s["co.fgsm.der.pgd_apgd_acc_n"], s["co.fgsm.der.pgd_apgd_acc_lo"]) == \
        (0.95, 40, 0.835)
    assert (s["co.fgsm.der_gain.worst_acc"], s["co.fgsm.der_gain.worst_acc_p"]) == (0.4, 0.007812)  # 2 / 2^8
    assert (s["co.fgsm.der_gain.pgd_apgd_acc"], s["co.fgsm.der_gain.pgd_apgd_acc_p"]) == (0.95, 7.276e-12)  # 2 / 2^38
    assert s["co.fgsm.der_gain.worst_acc_p_holm"] == 0.01562 and s["co.fgsm.der_gain.worst_acc_n"] == 20
    # every accuracy and difference names the images it counts
    assert (s["co.fgsm.der.clean_acc_n"], s["co.fgsm.der.aa_acc_n"], s["co.fgsm.der_gain.clean_acc_n"]) == (100, 20, 100)
    assert "co.fgsm.der_gain.pgd20_acc_p" in s and "co.fgsm.der_gain.pgd20_acc_p_holm" not in s  # not in the table
    assert s["co.fgsm.eps"] == 0.3 and s["co.fgsm.der.aa_warnings"] == 0
    # robust overfitting: both checkpoints, DER gain per checkpoint, best − last per variant
    assert s["ro.pgd.der.best.pgd50_acc"] == 0.7 and s["ro.pgd.base.last.aa_acc"] == 0.55
    assert s["ro.pgd.base.last.aa_warnings"] == 2 and s["ro.pgd.base.best.aa_warnings"] == 0
    assert (s["ro.pgd.der_gain.last.pgd50_acc"], s["ro.pgd.der_gain.last.pgd50_acc_p"]) == (0.07, 0.01562)
    assert (s["ro.pgd.der_gain.best.clean_acc"], s["ro.pgd.der_gain.best.clean_acc_p"]) == (-0.01, 1.0)
    assert (s["ro.pgd.base.best_minus_last.pgd50_acc"], s["ro.pgd.base.best_minus_last.pgd50_acc_p"]) == \
        (0.09, 0.003906)
    # Holm over the RO table's 20 Δ cells: the smallest p times 20, the next (0.0156) times 19
    assert s["ro.pgd.base.best_minus_last.pgd50_acc_p_holm"] == 0.07812
    assert s["ro.pgd.der_gain.last.pgd50_acc_p_holm"] == 0.2969 and s["ro.pgd.der_gain.best.clean_acc_p_holm"] == 1.0
    assert (s["ro.pgd.base.best.worst_acc"], s["ro.pgd.base.last.worst_acc"]) == (0.65, 0.55)
    assert (s["ro.pgd.base.best_minus_last.worst_acc"], s["ro.pgd.base.best_minus_last.worst_acc_p"]) == (0.1, 0.5)
    assert (s["ro.pgd.base.best_minus_last.clean_acc"], s["ro.pgd.base.best_minus_last.clean_acc_p"]) == (-0.03, 0.25)
    assert s["ro.pgd.der.best_minus_last.aa_acc"] == 0 and s["ro.pgd.der.best_minus_last.aa_acc_p"] == 1.0
    assert s["ro.pgd.base.robust_overfitting_gap"] == 0.1 and "ro.pgd.base.co_epoch" not in s
    assert s["standard.clean_acc"] == 0.92 and s["standard.aa_acc"] == 0.0 and s["standard.aa_acc_hi"] == 0.1611
    assert (s["n_examples"], s["aa_examples"]) == (100, 20)
    assert s["gen.pca-local.der.fid"] == 31.5
    assert not any(isinstance(v, dict) for v in s.values())
    # APGD alone: a component of the worst cases, like AutoAttack's per-attack accuracies
    assert not any("seconds" in k or "apgd_acc" in k.replace("pgd_apgd_acc", "") or "check." in k for k in s)


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
        "| Method | ε | Clean | PGD-50 | PGD-50 + APGD | AA | Worst case |\n"
        "|---|---:|---:|---:|---:|---:|---:|\n"
        "| FGSM | 0.3 | 90.0 [82.6, 94.5] | 0.0 [0.0, 3.7] | 0.0 [0.0, 8.8] | 0.0 [0.0, 16.1] | 0.0 [0.0, 16.1] |\n"
        "| FGSM + DER | 0.3 | 77.0 [67.8, 84.2] | 45.0 [35.6, 54.8] | 95.0 [83.5, 98.6] | 40.0 [21.9, 61.3] "
        "| 40.0 [21.9, 61.3] |\n"
        "| Δ DER − base | | -13.0 [-20.6, -6.2], p < 0.001 (Holm < 0.001) | +45.0 [+34.9, +54.8], p < 0.001 "
        "(Holm < 0.001) | +95.0 [+80.5, +98.6], p < 0.001 (Holm < 0.001) | +40.0 [+15.8, +61.3], p = 0.008 "
        "(Holm 0.016) | +40.0 [+15.8, +61.3], p = 0.008 (Holm 0.016) |\n"
        "\nAccuracy (%) with its Wilson 95 % interval: clean and PGD on the first 100 test images; PGD-50 + APGD on "
        "the first 40 of them (an image counts when it is classified correctly clean and under every PGD and APGD-CE "
        "+ APGD-T); AA (standard AutoAttack) on the first 20; worst case on those 20, AutoAttack's images: correct "
        "clean and under every PGD, APGD-CE + APGD-T and AA; final checkpoint; PGD with 3 random starts. Differences "
        "(Δ rows) in percentage points on the same images: Newcombe's paired score 95 % interval and exact McNemar "
        "p-value, Holm-adjusted over the table's 5 Δ cells in brackets.\n")


def test_ro_table_rows_flag_autoattack_warnings_and_show_missing_cells():
    evals = {**EVALS, ("pgd", "der"): {k: v for k, v in EVALS["pgd", "der"].items() if not k.startswith("last.aa_")}}
    table = tables.ro_table({"pgd": "pgd", "trades-run": "trades"},
                            {**evals, ("trades-run", "base"): EVALS["pgd", "base"],
                             ("trades-run", "der"): EVALS["pgd", "der"]},
                            {**FLAGS, ("trades-run", "base"): FLAGS["pgd", "base"],
                             ("trades-run", "der"): FLAGS["pgd", "der"]})
    lines = table.splitlines()
    assert lines[0] == "| Method | ε | Checkpoint | Clean | PGD-50 | PGD-50 + APGD | AA | Worst case |"
    nil = "+0.0 [-9.2, +9.2], p = 1.000 (Holm 1.000)"  # PGD-50 + APGD: the same 38 of 40 images in every model
    assert lines[2:11] == [
        "| PGD-AT | 0.1 | best | 82.0 [73.3, 88.3] | 69.0 [59.4, 77.2] | 95.0 [83.5, 98.6] | 65.0 [43.3, 81.9] "
        "| 65.0 [43.3, 81.9] |",
        "| PGD-AT | 0.1 | last | 85.0 [76.7, 90.7] | 60.0 [50.2, 69.1] | 95.0 [83.5, 98.6] | 55.0 [34.2, 74.2] † "
        "| 55.0 [34.2, 74.2] |",
        "| PGD-AT | | Δ best − last | -3.0 [-7.8, +1.3], p = 0.250 (Holm 1.000) "
        f"| +9.0 [+3.0, +14.9], p = 0.004 (Holm 0.156) | {nil} | +10.0 [-5.9, +24.9], p = 0.500 (Holm 1.000) "
        "| +10.0 [-5.9, +24.9], p = 0.500 (Holm 1.000) |",
        "| PGD-AT + DER | 0.1 | best | 81.0 [72.2, 87.5] | 70.0 [60.4, 78.1] | 95.0 [83.5, 98.6] | 65.0 [43.3, 81.9] "
        "| 65.0 [43.3, 81.9] |",
        # AA's accuracy is missing from this evaluate JSON; the worst case comes from the flags
        "| PGD-AT + DER | 0.1 | last | 83.0 [74.5, 89.1] | 67.0 [57.3, 75.4] | 95.0 [83.5, 98.6] | – "
        "| 65.0 [43.3, 81.9] |",
        "| PGD-AT + DER | | Δ best − last | -2.0 [-6.2, +1.9], p = 0.500 (Holm 1.000) "
        f"| +3.0 [-1.0, +7.1], p = 0.250 (Holm 1.000) | {nil} | +0.0 [-10.2, +10.2], p = 1.000 (Holm 1.000) "
        "| +0.0 [-10.2, +10.2], p = 1.000 (Holm 1.000) |",
        "| Δ DER − base | | best | -1.0 [-4.7, +2.5], p = 1.000 (Holm 1.000) "
        f"| +1.0 [-2.0, +4.1], p = 1.000 (Holm 1.000) | {nil} | +0.0 [-10.2, +10.2], p = 1.000 (Holm 1.000) "
        "| +0.0 [-10.2, +10.2], p = 1.000 (Holm 1.000) |",
        "| Δ DER − base | | last | -2.0 [-6.3, +2.0], p = 0.500 (Holm 1.000) "
        f"| +7.0 [+1.6, +12.4], p = 0.016 (Holm 0.594) | {nil} | +10.0 [-5.9, +24.9], p = 0.500 (Holm 1.000) "
        "| +10.0 [-5.9, +24.9], p = 0.500 (Holm 1.000) |",
        "| TRADES (trades-run) | 0.1 | best | 82.0 [73.3, 88.3] | 69.0 [59.4, 77.2] | 95.0 [83.5, 98.6] "
        "| 65.0 [43.3, 81.9] | 65.0 [43.3, 81.9] |"]
    assert len(lines) == 2 + 2 * 8 + 2 and "†: AutoAttack's own checks raised warnings" in lines[-1]
    assert "Holm-adjusted over the table's 40 Δ cells" in lines[-1]  # one family: both runs' 8 Δ rows × 5
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
    (tmp_path / "metrics/eval/standard.base.flags.json").write_text(json.dumps(STANDARD_FLAGS))
    (tmp_path / "metrics/train/standard.base.json").write_text(json.dumps({"eps": 0.1, "final_val_clean_acc": 0.9}))
    (tmp_path / "plots/history").mkdir(parents=True)  # the per-epoch histories the report draws: the repo's own
    for run in ("standard.base", *(f"{r}.{v}" for r, v in RUNS)):
        shutil.copy(ROOT / f"plots/history/{run}.tsv", tmp_path / f"plots/history/{run}.tsv")
    report_stage.run(params)
    first = json.loads((tmp_path / "metrics/summary.json").read_text())
    assert first == tables.summary(METHODS, EVALS, TRAINS, FLAGS, STANDARD, None, STANDARD_FLAGS)
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
