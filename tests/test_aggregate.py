"""Seeds through DVC experiments: reading `dvc exp show --json`, grouping by params except seed, the refusal to
pool differing params, t-intervals, the robust-overfitting section, the CO study table, and one real queue."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml
from scipy import stats as sps
from test_pipeline import BIN, COPY_IGNORE, ROOT, dvc, synthetic_tarball, tiny_params

from energyat import cli
from energyat.commands import aggregate as stage
from energyat.errors import UserError
from energyat.studies import co_study, reevaluation, seeds

T975_2 = 4.302652729749464  # Student t, 97.5 % quantile, 2 degrees of freedom (3 seeds)
T975_1 = 12.706204736174707  # 1 degree of freedom (2 seeds)
MISSING = {"error": {"type": "FileNotFoundError", "msg": "[Errno 2] No such file or directory"}}


def params(seed=0, eps=0.1, lam=1.0, runs=None) -> dict:
    """An experiment's params.yaml, trimmed to what matters here."""
    return {"seed": seed, "threads": 1, "train": {"method": "pgd", "eps": eps, "epochs": 2},
            "der": {"lambda": lam, "gamma": 0.0}, "runs": runs or {"fgsm": {"method": "fgsm", "epochs": 2}}}


def data(rev: str, p: dict, metrics: dict | None, ts: str) -> dict:
    """`data` of a row of `dvc exp show --json` (DVC 3.67): per file {"data": ...} or {"error": ...}."""
    files = {"metrics/train/standard.base.json": MISSING,
             **{f: {"data": m} for f, m in (metrics or {}).items()}}
    return {"rev": rev, "timestamp": ts, "params": {"params.yaml": {"data": p}}, "metrics": files,
            "deps": {"src/energyat/train.py": {"hash": "9f0c", "size": 9000, "nfiles": None}}, "outs": {}, "meta": {}}


def exp(name: str, rev: str, p: dict, metrics: dict | None, state="success", ts="2026-01-01T10:00:00") -> dict:
    error = {"msg": "Experiment run failed", "type": ""} if state == "failed" else None
    row = {"rev": rev, "name": name, "data": data(rev, p, metrics, ts), "error": error, "experiments": None}
    return {"revs": [row],
            "executor": {"state": state, "name": "dvc-task",
                         "local": {"root": None, "log": None, "pid": None, "returncode": 0, "task_id": rev}},
            "name": name}


def show(head_metrics=None, experiments=(), head_params=None) -> list:
    head = "a" * 40
    return [{"rev": "workspace", "name": None, "data": data("workspace", params(), head_metrics, None),
             "error": None, "experiments": None},
            {"rev": head, "name": "master", "error": None, "experiments": list(experiments),
             "data": data(head, head_params or params(), head_metrics, "2026-01-01T09:00:00")}]


def train_metrics(pgd: float, diverged=False, co=False) -> dict:
    return {"metrics/train/fgsm.base.json": {"final_val_pgd_acc": pgd, "diverged": diverged, "co_at_end": co,
                                             "epochs": 2, "method": "fgsm"}}


# ------------------------------------------------------------------------------------------ reading, grouping

def test_experiments_keep_finished_ones_with_metrics_and_note_the_rest():
    rows = show(experiments=[
        exp("s0", "1" * 40, params(0), train_metrics(0.5)),
        exp("s1", "2" * 40, params(1), train_metrics(0.6)),
        exp("bad", "3" * 40, params(2), {}, state="failed"),
        exp("later", "4" * 40, params(3), {}, state="queued"),
        exp("busy", "5" * 40, params(4), {}, state="running"),
        exp("empty", "6" * 40, params(5), {}),
    ])
    found, notes = seeds.experiments(rows, head="a" * 40)
    assert [(e.name, e.seed, e.baseline[:1]) for e in found] == [("s0", 0, "a"), ("s1", 1, "a")]
    assert found[0].metrics == {"metrics/train/fgsm.base.json": train_metrics(0.5)["metrics/train/fgsm.base.json"]}
    assert notes == ["bad: skipped (failed)", "later: skipped (queued)", "busy: skipped (running)",
                     "master: skipped (no metrics)", "empty: skipped (no metrics)"]


def test_groups_are_params_except_seed_and_head_joins_as_a_seed():
    rows = show(head_metrics=train_metrics(0.4), experiments=[
        exp("e1-s1", "1" * 40, params(1), train_metrics(0.5)),
        exp("e1-s2", "2" * 40, params(2), train_metrics(0.6)),
        exp("e2-s0", "3" * 40, params(0, eps=0.2), train_metrics(0.1)),
        exp("e2-s1", "4" * 40, params(1, eps=0.2), train_metrics(0.2), ts="2026-01-01T11:00:00"),
        exp("e2-s1-old", "5" * 40, params(1, eps=0.2), train_metrics(0.3), ts="2026-01-01T08:00:00"),
        exp("lam2", "6" * 40, params(0, lam=2.0), train_metrics(0.7)),
    ])
    found, _ = seeds.experiments(rows, head="a" * 40)
    groups, notes = seeds.group(found)
    assert [[m.name for m in g.members] for g in groups] == [["master", "e1-s1", "e1-s2"], ["e2-s0", "e2-s1"]]
    assert seeds.labels(groups) == ["train.eps=0.1", "train.eps=0.2"]
    assert notes == ["e2-s1-old: skipped (seed 1 already pooled from e2-s1, newer)",
                     "lam2: not pooled (no other seed with the same params)"]
    singles, _ = seeds.group(found, min_members=1)
    assert [len(g.members) for g in singles] == [3, 2, 1]


def test_execution_settings_pool_but_another_device_type_does_not():
    def with_execution(seed, **kw):
        return {**params(seed), **kw}

    found, _ = seeds.experiments(show(experiments=[
        exp("gpu0", "1" * 40, with_execution(0, device="cuda:0", threads=8), train_metrics(0.5)),
        exp("gpu1", "2" * 40, with_execution(1, device="cuda:1", distributed={"nproc": 1, "eval_nproc": 2}, cuda_graphs=False),
            train_metrics(0.6)),
        exp("cpu", "3" * 40, with_execution(2, device="cpu"), train_metrics(0.7)),
        exp("gpu2", "4" * 40, with_execution(2, device="cuda:0", cuda_graphs=True), train_metrics(0.8)),
    ]), head=None)
    assert [e.name for e in seeds.pool(seeds.select(found, ["gpu0", "gpu1", "gpu2"])).members] == [
        "gpu0", "gpu1", "gpu2"]
    with pytest.raises(UserError, match=r"params other than seed differ \(device\)$"):
        seeds.pool(seeds.select(found, ["gpu0", "cpu"]))


def test_device_auto_never_pools_with_an_explicit_device():
    """auto ran on the CPU (fp32) or CUDA (bf16), and nothing an experiment records says which: it never pools with
    cpu or cuda, and says why (an experiment without the param counts as auto, its default)."""
    found, _ = seeds.experiments(show(experiments=[
        exp("auto0", "1" * 40, {**params(0), "device": "auto"}, train_metrics(0.5)),
        exp("auto1", "2" * 40, {**params(1), "device": "auto"}, train_metrics(0.6)),
        exp("cpu2", "3" * 40, {**params(2), "device": "cpu"}, train_metrics(0.7)),
        exp("cpu3", "4" * 40, {**params(3), "device": "cpu"}, train_metrics(0.8)),
        exp("gpu4", "5" * 40, {**params(4), "device": "cuda:1"}, train_metrics(0.9)),
        exp("unset5", "6" * 40, params(5), train_metrics(0.4)),
    ]), head=None)
    groups, notes = seeds.group(found)
    assert [[m.name for m in g.members] for g in groups] == [["auto0", "auto1"], ["cpu2", "cpu3"]]
    assert notes[-1] == ("auto0, auto1, unset5 (device auto) and cpu2, cpu3, gpu4 (device cpu, cuda) do not pool: auto "
                         "ran on the CPU (fp32) or CUDA (bf16 autocast), and no params or metrics file records which")
    for names, explicit in ((["auto0", "cpu2"], "cpu"), (["gpu4", "auto1"], "cuda"), (["unset5", "cpu3"], "cpu")):
        line = rf"^refusing to pool: \S+ \(device auto\) and \S+ \(device {explicit}\) do not pool: auto ran on"
        with pytest.raises(UserError, match=line):
            seeds.pool(seeds.select(found, names))
    assert [e.name for e in seeds.pool(seeds.select(found, ["auto0", "auto1"])).members] == ["auto0", "auto1"]


def test_a_data_source_pools_by_its_normalised_path():
    def with_source(seed, source):
        return {**params(seed), "data": {"dataset": "image-folder", "source": source}}

    found, _ = seeds.experiments(show(experiments=[
        exp("old", "1" * 40, with_source(0, "/work/shared/datasets/c.tar.gz"), train_metrics(0.5)),
        exp("new", "2" * 40, with_source(1, "/work/main/../shared//datasets/./c.tar.gz"), train_metrics(0.6)),
        exp("other", "3" * 40, with_source(2, "/work/shared/datasets/d.tar.gz"), train_metrics(0.7)),
    ]), head=None)
    assert [e.name for e in seeds.pool(seeds.select(found, ["old", "new"])).members] == ["old", "new"]
    with pytest.raises(UserError, match=r"params other than seed differ \(data.source\)$"):
        seeds.pool(seeds.select(found, ["old", "other"]))


def test_pool_refuses_experiments_whose_other_params_differ():
    found, _ = seeds.experiments(show(experiments=[
        exp("a", "1" * 40, params(0), train_metrics(0.5)),
        exp("b", "2" * 40, params(1, eps=0.2, lam=3.0), train_metrics(0.6)),
        exp("c", "3" * 40, params(1), train_metrics(0.7)),
    ]), head=None)
    with pytest.raises(UserError) as err:
        seeds.pool(seeds.select(found, ["a", "b"]))
    assert str(err.value) == "refusing to pool a, b: params other than seed differ (der.lambda, train.eps)"
    with pytest.raises(UserError, match="^refusing to pool b, c: same seed 1$"):
        seeds.pool([found[1], dataclasses.replace(found[2], params=found[1].params)])
    assert [e.name for e in seeds.pool(seeds.select(found, ["[ac]"])).members] == ["a", "c"]
    assert [e.name for e in seeds.select(found, ["3333"])] == ["c"]
    with pytest.raises(UserError, match="^nope: no finished experiment with metrics matches"):
        seeds.select(found, ["nope"])


# ------------------------------------------------------------------------------------------------ intervals

def test_seed_statistics_are_mean_sample_std_and_t_interval():
    s = seeds.summarize([0.5, 0.6, 0.7])
    half = T975_2 * 0.1 / math.sqrt(3)
    assert s["n"] == 3 and s["mean"] == pytest.approx(0.6, abs=1e-12) and s["std"] == pytest.approx(0.1, abs=1e-12)
    assert (s["lo"], s["hi"]) == (pytest.approx(0.6 - half, abs=1e-9), pytest.approx(0.6 + half, abs=1e-9))
    assert (round(s["lo"], 5), round(s["hi"], 5)) == (0.35159, 0.84841)
    two = seeds.summarize([1, None, 3])  # a seed without the key: n = 2
    assert (two["n"], two["mean"], two["std"], two["values"]) == (2, 2.0, pytest.approx(math.sqrt(2)), [1.0, None, 3.0])
    assert two["hi"] == pytest.approx(2 + T975_1 * math.sqrt(2) / math.sqrt(2))
    assert seeds.summarize([True, False, True]) == {"n": 3, "true": 2, "values": [True, False, True]}
    one = seeds.summarize([0.25, None])
    assert (one["mean"], one["std"], one["lo"]) == (0.25, None, None)  # strict JSON: no NaN
    assert seeds.summarize(["not computed"]) is None


def test_report_and_markdown_of_a_group():
    found, _ = seeds.experiments(show(experiments=[
        exp(f"s{i}", str(i + 1) * 40, params(i), train_metrics(v, diverged=i == 2))
        for i, v in enumerate((0.5, 0.6, 0.7))
    ]), head=None)
    groups, _ = seeds.group(found)
    rep = seeds.report(groups, {})
    g = rep["groups"][0]
    assert (g["label"], g["seeds"], g["robust_overfitting"]) == ("", [0, 1, 2], {})
    assert g["metrics"]["metrics/train/fgsm.base.json"]["epochs"]["std"] == 0.0
    md = seeds.markdown(rep)
    assert "| final_val_pgd_acc | 0.6 ± 0.1 | [0.3516, 0.8484] | 3 | 0.5 | 0.6 | 0.7 |" in md
    assert "| diverged | 1/3 true | | 3 | False | False | True |" in md
    assert "(2 of 4 keys shown)" in md  # epochs and co_at_end equal in every seed; method is text
    json.dumps(rep, allow_nan=False)


def test_markdown_reads_the_stage_files_when_summary_is_the_baselines():
    """Experiments that ran no `report` carry the baseline's summary.json, equal in every seed: the table then
    shows the stage files' varying keys; a summary that differs between seeds is shown alone."""
    def seed_row(i, v, summary):
        return exp(f"s{i}", str(i + 1) * 40, params(i),
                   {**train_metrics(v), "metrics/summary.json": {"co.fgsm.base.clean_acc": summary[i]}})
    for summary, shown, hidden in (((0.7, 0.7), "metrics/train/fgsm.base.json", "metrics/summary.json"),
                                   ((0.7, 0.8), "metrics/summary.json", "metrics/train/fgsm.base.json")):
        found, _ = seeds.experiments(show(experiments=[seed_row(i, v, summary) for i, v in enumerate((0.5, 0.6))]),
                                         head=None)
        md = seeds.markdown(seeds.report(seeds.group(found)[0], {}))
        assert f"`{shown}` (1 of " in md and f"`{hidden}`" not in md


# -------------------------------------------------------------------------------------- robust overfitting

def ro_eval(best: float, last: float, clean: float) -> dict:
    return {"best.pgd50_acc": best, "last.pgd50_acc": last, "best.pgd20_acc": 0.9, "last.pgd20_acc": 0.9,
            "last.pgd50_acc_lo": last - 0.1, "last.clean_acc": clean, "best.clean_acc": clean, "n_examples": 10}


def test_robust_overfitting_gap_and_der_gain_paired_over_seeds():
    runs = {"pgd": {"method": "pgd", "eps": 0.2}}
    base = [(0.50, 0.46, 0.80), (0.52, 0.46, 0.81), (0.48, 0.43, 0.79)]  # best, last, clean per seed
    der = [(0.51, 0.49, 0.79), (0.52, 0.50, 0.80), (0.50, 0.49, 0.80)]
    rows = [exp(f"ro-s{i}", str(i + 1) * 40, params(i, runs=runs),
                {"metrics/eval/pgd.base.json": ro_eval(*base[i]), "metrics/eval/pgd.der.json": ro_eval(*der[i])})
            for i in range(3)]
    found, _ = seeds.experiments(show(experiments=rows), head=None)
    groups, _ = seeds.group(found)
    # seed 0's flags: base best beats last on 5 images and loses on none (McNemar 2 * 0.5^5); DER gains 3 images
    kept = {"test_sha256": "abc", "n": 10}
    flags = {("1" * 40, "pgd", "base"): {**kept, "best.pgd50": "1111100000", "last.pgd50": "0000000000"},
             ("1" * 40, "pgd", "der"): {**kept, "last.pgd50": "1110000000"}}
    ro = seeds.robust_overfitting(groups[0], flags)["pgd"]
    assert ro["pgd"] == "pgd50_acc" and ro["method"] == "pgd"
    gap = ro["gap"]["base"]  # 0.04, 0.06, 0.05
    assert gap["values"] == pytest.approx([0.04, 0.06, 0.05]) and gap["mean"] == pytest.approx(0.05)
    assert gap["std"] == pytest.approx(0.01)
    assert gap["paired_t_p"] == pytest.approx(2 * sps.t.sf(0.05 / (0.01 / math.sqrt(3)), 2))
    assert gap["mcnemar_p"] == [0.0625, None, None]
    gain = ro["der_gain_last"]["pgd50_acc"]  # 0.03, 0.04, 0.06
    assert gain["mean"] == pytest.approx(13 / 300) and gain["std"] == pytest.approx(np.std([0.03, 0.04, 0.06], ddof=1))
    assert gain["lo"] == pytest.approx(13 / 300 - T975_2 * gain["std"] / math.sqrt(3))
    assert gain["mcnemar_p"] == [0.25, None, None]  # 3 discordant images, all for DER: 2 * 0.5^3
    assert set(ro["der_gain_last"]) == {"clean_acc", "pgd50_acc"}  # no AutoAttack key in these files
    assert ro["gap_change"]["values"] == pytest.approx([-0.02, -0.04, -0.04])
    assert "mcnemar_p" not in ro["gap_change"]
    # Holm over the table's 5 paired-t p-values: gap base 0.0131 (smallest, × 5), gap DER and gap change 0.0377
    # (t = 5 on 2 df, × 4 and × 3), PGD gain 0.0390 (× 2, raised to the running max), clean gain 0.667 (t = -0.5)
    p_der = 2 * sps.t.sf(5, 2)
    assert (gap["paired_t_p_holm"], ro["gap"]["der"]["paired_t_p_holm"], ro["gap_change"]["paired_t_p_holm"]) == \
        (pytest.approx(5 * gap["paired_t_p"]), pytest.approx(4 * p_der), pytest.approx(4 * p_der))
    assert gain["paired_t_p_holm"] == pytest.approx(4 * p_der)
    assert ro["der_gain_last"]["clean_acc"]["paired_t_p_holm"] == pytest.approx(2 * sps.t.sf(0.5, 2))
    md = seeds.markdown(seeds.report(groups, flags))
    assert "| best − last PGD-50, base | +5.0 ± 1.0 | [+2.5, +7.5] | 0.013 (Holm 0.065) | 0.062, –, – |" in md
    assert "| last.pgd50_acc | 0.45 ± 0.01732 | [0.407, 0.493] | 3 | 0.46 | 0.46 | 0.43 |" in md
    assert "| last.pgd50_acc_lo |" not in md  # Wilson bounds of one seed: in the JSON only


def test_robust_overfitting_reports_the_worst_case_and_the_paired_attack_check():
    """With per-image worst-case accuracies (AutoAttack not run: PGD + APGD) and the PGD-vs-APGD check in the eval
    files, the RO table gains the PGD + APGD gap, its DER gain, and the check per seed; no AutoAttack or worst-case
    row (without AutoAttack the worst case is PGD + APGD's)."""
    runs = {"pgd": {"method": "pgd", "eps": 0.2}}

    def ev(best, last, worst_best, worst_last, missed):
        return {**ro_eval(best, last, 0.8), "best.worst_acc": worst_best, "last.worst_acc": worst_last,
                **{f"{ck}.check.{k}": v for ck in ("best", "last")
                   for k, v in (("pgd_missed", missed), ("apgd_missed", 0), ("n", 1000), ("p", 0.5 ** missed))}}

    rows = [exp(f"ro-s{i}", str(i + 1) * 40, params(i, runs=runs),
                {"metrics/eval/pgd.base.json": ev(0.50, 0.46, 0.45, 0.42, 2),
                 "metrics/eval/pgd.der.json": ev(0.52, 0.50, 0.44 + 0.01 * i, 0.43 + 0.01 * i, 12)})
            for i in range(3)]
    groups, _ = seeds.group(seeds.experiments(show(experiments=rows), head=None)[0])
    rep = seeds.report(groups, {})
    ro = rep["groups"][0]["robust_overfitting"]["pgd"]
    assert ro["gap_pgd_apgd"]["base"]["values"] == pytest.approx([0.03] * 3)
    assert ro["der_gain_last"]["pgd_apgd_acc"]["values"] == pytest.approx([0.01, 0.02, 0.03])
    assert ro["attack_check"]["der.last"][2] == {"pgd_missed": 12, "apgd_missed": 0, "n": 1000, "p": 0.5 ** 12}
    # the worst-case gap with DER: 0.01 in every seed, against 0.03 without: a change of -0.02
    assert ro["gap_change_pgd_apgd"]["values"] == pytest.approx([-0.02] * 3)
    assert set(ro["der_gain_last"]) == {"clean_acc", "pgd50_acc", "pgd_apgd_acc"}
    # Holm's family is the whole table: 3 rows of the PGD gap, 3 of the PGD + APGD gap, 3 DER gains
    held = [r for r in (*ro["gap"].values(), ro["gap_change"], *ro["gap_pgd_apgd"].values(),
                        ro["gap_change_pgd_apgd"], *ro["der_gain_last"].values()) if r["paired_t_p"] is not None]
    assert all(r["paired_t_p_holm"] >= r["paired_t_p"] for r in held)
    gain = ro["der_gain_last"]["pgd_apgd_acc"]  # +1, +2, +3 points: t = 2 / (1 / sqrt 3)
    assert gain["paired_t_p"] == pytest.approx(2 * sps.t.sf(2 * math.sqrt(3), 2))
    md = seeds.markdown(rep)
    assert "| DER gain, last checkpoint, PGD-50 + APGD | +2.0 ± 1.0 | [-0.5, +4.5] |" in md
    assert "| gap change with DER (DER − base) PGD-50 + APGD | -2.0 ± 0.0 |" in md
    assert "| + DER, last | 12 / 0 of 1000 (p < 0.001) | 12 / 0 of 1000 (p < 0.001) | 12 / 0 of 1000 (p < 0.001) |" in md
    assert "| base, best | 2 / 0 of 1000 (p 0.250) |" in md


def test_paired_t_without_spread_is_not_computable():
    """Every seed's gap is 0.04 (up to float noise in best − last): no t-test, shown as n/a and left out of Holm."""
    runs = {"pgd": {"method": "pgd", "eps": 0.2}}
    base = [(0.50, 0.46, 0.80), (0.52, 0.48, 0.81), (0.48, 0.44, 0.79)]
    der = [(0.51, 0.49, 0.79), (0.52, 0.50, 0.80), (0.50, 0.49, 0.80)]
    rows = [exp(f"ro-s{i}", str(i + 1) * 40, params(i, runs=runs),
                {"metrics/eval/pgd.base.json": ro_eval(*base[i]), "metrics/eval/pgd.der.json": ro_eval(*der[i])})
            for i in range(3)]
    groups, _ = seeds.group(seeds.experiments(show(experiments=rows), head=None)[0])
    rep = seeds.report(groups, {})
    ro = rep["groups"][0]["robust_overfitting"]["pgd"]
    assert (ro["gap"]["base"]["paired_t_p"], ro["gap"]["base"]["paired_t_p_holm"]) == (None, None)
    # the family is the 4 others: gap change (-0.02, -0.02, -0.03: t = -7) × 4, then gap DER (t = 5) × 3
    assert ro["gap_change"]["paired_t_p_holm"] == pytest.approx(4 * 2 * sps.t.sf(7, 2))
    assert ro["gap"]["der"]["paired_t_p_holm"] == pytest.approx(3 * 2 * sps.t.sf(5, 2))
    md = seeds.markdown(rep)
    assert "| best − last PGD-50, base | +4.0 ± 0.0 | [+4.0, +4.0] | n/a | –, –, – |" in md
    json.dumps(rep, allow_nan=False)


# -------------------------------------------------------------------------------------------------- CO study

STUDY_RUNS = {"fgsm": {"method": "fgsm"}, "n-fgsm": {"method": "n-fgsm"},
              "fgsm-start-batch": {"method": "fgsm", "der": {"aae": "start", "aae_norm": "batch"}},
              "pgd": {"method": "pgd"}}  # a multi-step run: not a row of the CO table


def co_metrics(clean: float, pgd: float, aa: float, co: bool, div: bool = False) -> dict:
    return {"last.clean_acc": clean, "last.pgd20_acc": pgd + 0.01, "last.pgd50_acc": pgd, "last.aa_acc": aa,
            "best.pgd50_acc": 0.9}, {"co_at_end": co, "catastrophic_overfitting": co, "diverged": div}


def study_experiment(eps: float, seed: int, values: dict) -> dict:
    metrics = {}
    for (run, variant), v in values.items():
        ev, tr = co_metrics(*v)
        metrics[f"metrics/eval/{run}.{variant}.json"] = ev
        metrics[f"metrics/train/{run}.{variant}.json"] = tr
    return exp(f"co-{eps}-s{seed}", f"{seed}{int(eps * 10)}".ljust(40, "0"), params(seed, eps=eps, runs=STUDY_RUNS),
               metrics)


def test_co_study_table_rows_methods_columns_eps():
    rows = []
    for seed, (fa, fb) in enumerate(((0.30, 0.00), (0.34, 0.20))):
        rows.append(study_experiment(0.3, seed, {
            ("fgsm", "base"): (0.80, fb, fb, fb == 0), ("fgsm", "der"): (0.10, 0.10, 0.10, False, True),
            ("n-fgsm", "base"): (0.70, fa, fa - 0.02, False), ("n-fgsm", "der"): (0.70, fa + 0.01, fa, False),
            ("fgsm-start-batch", "base"): (0.80, fb, fb, fb == 0),
            ("fgsm-start-batch", "der"): (0.75, 0.25, 0.24, False)}))
    rows.append(study_experiment(0.1, 0, {("fgsm", "base"): (0.85, 0.60, 0.58, False),
                                          ("fgsm", "der"): (0.84, 0.61, 0.59, False)}))
    found, _ = seeds.experiments(show(experiments=rows), head=None)
    groups, _ = seeds.group(found, min_members=1)
    st = co_study.study(groups)
    (s,) = st["settings"]
    assert s["eps"] == [0.1, 0.3] and s["pgd"] == "pgd50_acc" and s["label"] == ""
    assert s["rows"] == ["FGSM", "FGSM + DER", "N-FGSM", "N-FGSM + DER", "FGSM + DER (aae: start, aae_norm: batch)"]
    cells = {(c["label"], c["eps"]): c for c in s["cells"]}
    fgsm = cells["FGSM", 0.3]
    assert (fgsm["n"], fgsm["co_at_end"], fgsm["diverged"]) == (2, 1, 0)
    assert fgsm["stats"]["pgd50_acc"]["mean"] == pytest.approx(0.10)
    assert fgsm["stats"]["pgd50_acc"]["std"] == pytest.approx(0.2 / math.sqrt(2))
    assert [x["pgd50_acc"] for x in fgsm["seeds"]] == [0.0, 0.2]
    assert (cells["FGSM + DER", 0.3]["diverged"], cells["FGSM", 0.1]["n"]) == (2, 1)
    assert ("N-FGSM", 0.1) not in cells
    md = co_study.markdown(st)
    assert "| Method | ε = 0.1 | ε = 0.3 |" in md
    assert "| N-FGSM | – | 32.0 ± 2.8 |" in md  # PGD-50 table comes first
    assert "| FGSM | 60.0 (n=1) | 10.0 ± 14.1 |" in md
    assert "| FGSM + DER | CO 0/1 · div 0/1 | CO 0/2 · div 2/2 |" in md
    json.dumps(st, allow_nan=False)


def test_co_study_ignores_files_an_experiment_kept_from_its_base_commit():
    """An experiment of one run's stages still holds the committed files of the others (the default run's, another
    eps or test-image count): they are not its cells."""
    own_ev, own_tr = co_metrics(0.7, 0.3, 0.3, False)
    stale_ev, stale_tr = co_metrics(0.9, 0.6, 0.6, False)
    p = {**params(0, eps=0.3, runs=STUDY_RUNS), "evaluate": {"n_examples": 500}}
    metrics = {"metrics/eval/n-fgsm.base.json": {**own_ev, "eps": 0.3, "method": "n-fgsm", "n_examples": 500},
               "metrics/train/n-fgsm.base.json": {**own_tr, "eps": 0.3, "method": "n-fgsm"},
               "metrics/eval/fgsm.base.json": {**stale_ev, "eps": 0.3, "method": "fgsm", "n_examples": 1000},
               "metrics/train/fgsm.base.json": {**stale_tr, "eps": 0.3, "method": "fgsm"},
               "metrics/eval/fgsm.der.json": {**stale_ev, "eps": 0.1, "method": "fgsm"},
               "metrics/train/fgsm.der.json": {**stale_tr, "eps": 0.1, "method": "fgsm"}}
    found, _ = seeds.experiments(show(experiments=[exp("partial", "7" * 40, p, metrics)]), head=None)
    (s,) = co_study.study(seeds.group(found, min_members=1)[0])["settings"]
    assert [(c["label"], c["stats"]["pgd50_acc"]["mean"]) for c in s["cells"]] == [("N-FGSM", pytest.approx(0.3))]


def test_co_study_takes_each_cell_from_the_newest_experiment_of_the_seed_that_ran_it():
    """A later experiment of one run's stages (seed 0) adds its cell; the others still come from the earlier one."""
    def cell(run, variant, pgd):
        ev, tr = co_metrics(0.7, pgd, pgd, False)
        return {f"metrics/eval/{run}.{variant}.json": {**ev, "eps": 0.3, "method": run, "n_examples": 500},
                f"metrics/train/{run}.{variant}.json": {**tr, "eps": 0.3, "method": run}}
    p = {**params(0, eps=0.3, runs=STUDY_RUNS), "evaluate": {"n_examples": 500}}
    early = exp("early", "6" * 40, p, {**cell("fgsm", "base", 0.0), **cell("n-fgsm", "base", 0.2)},
                ts="2026-01-01T10:00:00")
    stale_fgsm = {"metrics/eval/fgsm.base.json": {"last.pgd50_acc": 0.9, "eps": 0.1, "method": "fgsm"}}
    late = exp("late", "5" * 40, p, {**cell("n-fgsm", "base", 0.3), **stale_fgsm}, ts="2026-01-01T11:00:00")
    found, _ = seeds.experiments(show(experiments=[early, late]), head=None)
    groups, notes = seeds.group(found, min_members=1, keep_older=True)
    assert notes == ["early: fills only what late (seed 0, newer) lacks"]
    (s,) = co_study.study(groups)["settings"]
    got = {c["label"]: (c["seeds"][0]["name"], c["stats"]["pgd50_acc"]["mean"]) for c in s["cells"]}
    assert got == {"FGSM": ("early", pytest.approx(0.0)), "N-FGSM": ("late", pytest.approx(0.3))}
    assert seeds.group(found, min_members=1)[0][0].older == ()  # the seeds report keeps one per seed


def test_co_study_settings_and_eps_labels():
    assert [co_study.fmt_eps(e) for e in (0.1, 8 / 255, 16 / 255, 0.2)] == ["0.1", "8/255", "16/255", "0.2"]
    cifar = {**params(0, eps="8/255", runs=STUDY_RUNS), "data": {"dataset": "cifar10"}}
    rows = [study_experiment(0.1, 0, {("fgsm", "base"): (0.8, 0.5, 0.5, False)}),
            exp("cifar", "9" * 40, cifar, {"metrics/train/fgsm.base.json": {"co_at_end": True, "diverged": False}})]
    found, _ = seeds.experiments(show(experiments=rows), head=None)
    st = co_study.study(seeds.group(found, min_members=1)[0])
    assert [(s["label"], s["eps"], s["pgd"], s["rows"]) for s in st["settings"]] == [
        ("data.dataset=null", [0.1], "pgd50_acc", ["FGSM"]), ('data.dataset="cifar10"', [8 / 255], None, ["FGSM"])]
    md = co_study.markdown(st)
    assert '## cifar10\n\nParams that set this setting apart: data.dataset="cifar10".' in md
    assert "| Method | ε = 8/255 |" in md
    assert "| FGSM | CO 1/1 · div 0/1 |" in md


# ------------------------------------------------------------------------------------------------------ CLI

def test_cells_without_evidence_are_kept_marked_unless_re_run():
    def cell(label, eps, pgd):
        acc = {"mean": pgd, "std": 0.0, "n": 3, "lo": pgd, "hi": pgd}
        return {"label": label, "eps": eps, "n": 3, "seeds": [], "co_at_end": 0, "diverged": 0,
                "catastrophic_overfitting": 0, "stats": {"pgd50_acc": acc, "clean_acc": acc}}

    earlier = {"settings": [{"title": "fashion-mnist", "label": "", "pgd": "pgd50_acc", "eps": [0.1, 0.3],
                             "rows": ["FGSM", "RS-FGSM"],
                             "cells": [cell("FGSM", 0.3, 0.0), cell("RS-FGSM", 0.3, 0.2), cell("FGSM", 0.1, 0.4)]}]}
    fresh = {"settings": [{"title": "fashion-mnist", "label": "", "pgd": "pgd50_acc", "eps": [0.3], "rows": ["FGSM"],
                           "cells": [{**cell("FGSM", 0.3, 0.01), "stats": {
                               **cell("FGSM", 0.3, 0.01)["stats"],
                               "worst_acc": {"mean": 0.004, "std": 0.002, "n": 3, "lo": 0.0, "hi": 0.01}}}]}]}
    merged = co_study.with_aggregates_only(fresh, earlier)
    assert [s.get("evidence") for s in merged["settings"]] == [None, co_study.AGGREGATES_ONLY]
    old = merged["settings"][1]
    assert [(c["label"], c["eps"]) for c in old["cells"]] == [("RS-FGSM", 0.3), ("FGSM", 0.1)]  # FGSM 0.3 re-run
    assert old["rows"] == ["FGSM", "RS-FGSM"] and old["eps"] == [0.1, 0.3]
    md = co_study.markdown(merged)
    assert "## fashion-mnist — evidence in `metrics/studies/co/`" in md and "## fashion-mnist — aggregates only" in md
    assert md.count("**Worst-case accuracy (%)**") == 1  # only the re-run setting has a worst case
    assert "| FGSM | 0.4 ± 0.2 |" in md and "| FGSM | 40.0 ± 0.0 | – |" in md
    assert co_study.with_aggregates_only(fresh, {"settings": []}) == fresh
    # an earlier setting that differs in a param its label names (another DER variant, a data file elsewhere) keeps
    # its cells: only the same setting's cells are replaced
    variant = {**earlier["settings"][0], "label": 'der.aae_norm="batch", data.source="/old/place/fm.tar.gz"'}
    same = {**earlier["settings"][0], "label": 'der.aae_norm="aae", data.source="/old/place/fm.tar.gz"'}
    fresh["settings"][0]["params"] = {"der.aae_norm": "aae", "data.source": "/new/place/fm.tar.gz"}
    merged = co_study.with_aggregates_only(fresh, {"settings": [variant, same]})
    assert [len(s["cells"]) for s in merged["settings"]] == [1, 3, 2]


def test_cli_refusal_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.setattr(stage, "_exp_show", lambda: show(experiments=[
        exp("a", "1" * 40, params(0), train_metrics(0.5)), exp("b", "2" * 40, params(1, eps=0.2), train_metrics(0.6))]))
    assert cli.main(["aggregate", "a", "b"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == \
        "energyat aggregate: error: refusing to pool a, b: params other than seed differ (train.eps)"
    assert cli.main(["aggregate", "--co-study", "a"]) == 0
    assert "| FGSM | CO 0/1 · div 0/1 |" in (tmp_path / "metrics/co_study.md").read_text()


def test_export_then_aggregate_from_the_committed_evidence_alone(tmp_path, monkeypatch):
    """`--export` writes what the aggregates need; a clone without the experiment refs regenerates them byte for
    byte from it, McNemar cells (per-example flags) included."""
    monkeypatch.chdir(tmp_path)
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    runs = {"pgd": {"method": "pgd", "eps": 0.2}}
    rows = [exp(f"ro-s{i}", str(i + 1) * 40, params(i, runs=runs),
                {"metrics/eval/pgd.base.json": ro_eval(*b), "metrics/eval/pgd.der.json": ro_eval(*d)})
            for i, (b, d) in enumerate([((0.50, 0.46, 0.80), (0.51, 0.49, 0.79)),
                                        ((0.52, 0.46, 0.81), (0.52, 0.50, 0.80))])]
    kept = {"test_sha256": "abc", "n": 10}
    committed = {("1" * 40, "metrics/eval/pgd.base.flags.json"): {**kept, "best.pgd50": "1111100000",
                                                                  "last.pgd50": "0" * 10},
                 ("1" * 40, "metrics/eval/pgd.der.flags.json"): {**kept, "last.pgd50": "1110000000"},
                 ("1" * 40, "plots/history/pgd.base.tsv"): "epoch\tval_pgd_acc\n1\t0.5\n"}

    def git_show(*args):
        rev, _, path = args[1].partition(":") if args[0] == "show" else ("", "", "")
        found = committed.get((rev, path))
        text = found if isinstance(found, str) else json.dumps(found)
        return subprocess.CompletedProcess(args, 0 if found else 128, text if found else "", "")

    monkeypatch.setattr(stage, "_exp_show", lambda: show(experiments=rows))
    monkeypatch.setattr(stage, "_git", git_show)
    assert cli.main(["aggregate", "--export", "ro-study"]) == 0
    folder = tmp_path / "metrics/studies/ro-study/ro-s0"
    assert json.loads((folder / "experiment.json").read_text())["rev"] == "1" * 40
    assert (folder / "history/pgd.base.tsv").read_text() == "epoch\tval_pgd_acc\n1\t0.5\n"
    assert json.loads((folder / "eval/pgd.der.flags.json").read_text()) == {**kept, "last.pgd50": "1110000000"}
    assert not (tmp_path / "metrics/studies/ro-study/ro-s1/eval").exists()  # its commit had no flags

    # a fresh clone: no experiment refs, no git objects of theirs
    monkeypatch.setattr(stage, "_exp_show", lambda: show())
    monkeypatch.setattr(stage, "_git", lambda *a: subprocess.CompletedProcess(a, 128, "", "gone"))
    outputs = []
    for _ in range(2):
        assert cli.main(["aggregate"]) == 0
        outputs.append([(tmp_path / f"metrics/seeds.{ext}").read_bytes() for ext in ("json", "md")])
    assert outputs[0] == outputs[1]
    (g,) = json.loads(outputs[0][0])["groups"]
    assert [m["name"] for m in g["members"]] == ["ro-s0", "ro-s1"]
    ro = g["robust_overfitting"]["pgd"]
    assert ro["gap"]["base"]["mcnemar_p"] == [0.0625, None]  # from the committed flags of seed 0
    assert ro["der_gain_last"]["pgd50_acc"]["values"] == pytest.approx([0.03, 0.04])
    # and where there is nothing to pool, the committed aggregates stay as they are
    shutil.rmtree(tmp_path / "metrics/studies")
    assert cli.main(["aggregate", "--co-study"]) == 2
    assert (tmp_path / "metrics/seeds.json").read_bytes() == outputs[0][0]


def test_co_study_from_the_committed_evidence_alone_pairs_der_with_base(tmp_path, monkeypatch):
    """The CO study regenerates from exported evidence in a clone without refs: DER − base over the seeds, each
    seed's McNemar p from its committed flags, and the evaluation's attack check."""
    monkeypatch.chdir(tmp_path)
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    rows = []
    for seed, (base, der) in enumerate([(0.00, 0.06), (0.00, 0.09)]):
        row = study_experiment(0.3, seed, {("fgsm", "base"): (0.75, base, 0.0, True),
                                           ("fgsm", "der"): (0.67, der, 0.0, False)})
        evals = row["revs"][0]["data"]["metrics"]
        for variant, missed in (("base", 0), ("der", 5)):
            evals[f"metrics/eval/fgsm.{variant}.json"]["data"].update(
                {"last.check.pgd_missed": missed, "last.check.apgd_missed": 0, "last.check.n": 10,
                 "last.check.p": 0.5 ** missed})
        rows.append(row)
    rev0 = rows[0]["revs"][0]["rev"]
    kept = {"test_sha256": "abc", "eps": 0.3}  # the test split's checksum pairs them; the eps says they are the cell's
    committed = {(rev0, "metrics/eval/fgsm.base.flags.json"): {**kept, "last.pgd50": "0000000000"},
                 (rev0, "metrics/eval/fgsm.der.flags.json"): {**kept, "last.pgd50": "1111000000"}}

    def git_show(*args):
        rev, _, path = args[1].partition(":") if args[0] == "show" else ("", "", "")
        found = committed.get((rev, path))
        return subprocess.CompletedProcess(args, 0 if found else 128, json.dumps(found) if found else "", "")

    monkeypatch.setattr(stage, "_exp_show", lambda: show(experiments=rows))
    monkeypatch.setattr(stage, "_git", git_show)
    assert cli.main(["aggregate", "--export", "co"]) == 0
    monkeypatch.setattr(stage, "_exp_show", lambda: show())  # a fresh clone: no refs, no git objects of theirs
    monkeypatch.setattr(stage, "_git", lambda *a: subprocess.CompletedProcess(a, 128, "", "gone"))
    assert cli.main(["aggregate", "--co-study", "co-*"]) == 0
    (setting,) = json.loads((tmp_path / "metrics/co_study.json").read_text())["settings"]
    (gain,) = setting["der_gain"]
    pgd = gain["metrics"]["pgd50_acc"]
    assert gain["seeds"] == [0, 1] and pgd["values"] == pytest.approx([0.06, 0.09])
    assert pgd["mcnemar_p"] == [0.125, None]  # 4 images one way: 2 x 1/16; seed 1 kept no flags
    md = (tmp_path / "metrics/co_study.md").read_text()
    assert "| FGSM + DER | 0.3 | 5 · 0 of 10 (p 0.031) | 5 · 0 of 10 (p 0.031) |" in md


# ----------------------------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_two_queued_seeds_aggregate(tmp_path):
    """Two seeds of a tiny configuration queued as DVC experiments (the training stage of one run only), run with
    `dvc exp run --run-all`, a commit on top, then `energyat aggregate` in that repository."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT, repo, ignore=COPY_IGNORE)
    synthetic_tarball(tmp_path / "toy.tar.gz")
    raw = tiny_params(tmp_path / "toy.tar.gz")
    raw["threads"] = 1
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], [*git, "commit", "-qm", "tiny"]):
        subprocess.run(cmd, cwd=repo, check=True)
    for seed in (0, 1):
        dvc(repo, "exp", "run", "--queue", "-n", f"tiny-s{seed}", "-S", f"seed={seed}", "train@fgsm")
    dvc(repo, "exp", "run", "--run-all", "-j", "1")  # waits; exits 0 even when an experiment failed
    failed = [line.split()[1] for line in dvc(repo, "queue", "status").stdout.splitlines() if line.endswith("Failed")]
    assert not failed, dvc(repo, "queue", "logs", failed[0]).stdout[-3000:]
    (repo / "NOTES").write_text("results committed block by block\n")  # the experiments' baseline is no longer HEAD
    subprocess.run(["git", "add", "NOTES"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "next block"], cwd=repo, check=True)

    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run([sys.executable, "-m", "energyat", "aggregate"], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "main: skipped (no metrics)" in proc.stderr  # HEAD has the params of seed 0 but nothing ran there
    (g,) = json.loads((repo / "metrics/seeds.json").read_text())["groups"]
    assert [(m["name"], m["seed"]) for m in g["members"]] == [("tiny-s0", 0), ("tiny-s1", 1)]
    f = "metrics/train/fgsm.base.json"
    own = [json.loads(subprocess.run(["git", "show", f"{m['rev']}:{f}"], cwd=repo, capture_output=True, text=True,
                                     check=True).stdout) for m in g["members"]]
    assert list(g["metrics"]) == [f]
    for key in ("final_val_clean_acc", "final_dE_x", "train_seconds"):
        values = [o[key] for o in own]
        s = g["metrics"][f][key]
        assert s["values"] == values
        assert s["mean"] == pytest.approx(np.mean(values), abs=1e-12)
        assert s["std"] == pytest.approx(np.std(values, ddof=1), abs=1e-12)
        assert s["hi"] - s["mean"] == pytest.approx(T975_1 * s["std"] / math.sqrt(2), abs=1e-12)
    assert "## pooled experiments (2 seeds: 0, 1)" in (repo / "metrics/seeds.md").read_text()


def test_a_reevaluation_of_the_last_checkpoints_joins_the_study_flags():
    """AutoAttack run later on the last checkpoints (experiments differing only in `evaluate.*`): its flags join the
    study's where the shared evaluations agree image by image, and the RO table gains AutoAttack and the worst case
    on AutoAttack's images; a re-evaluation that disagrees (another model) is left out with a note."""
    runs = {"pgd": {"method": "pgd", "eps": 0.2}}
    study_eval, again_eval = {"autoattack": False, "checkpoints": ["best", "last"]}, {"autoattack": True,
                                                                                      "checkpoints": ["last"]}
    kept = {"test_sha256": "abc", "eps": 0.2}
    last = {"base": ("1111000000", "1100"), "der": ("1111100000", "1110")}  # last.pgd50 (10 images), last.apgd (4)

    def study_flags(v):
        return {**kept, "n": 10, "apgd_n": 4, "best.clean": "1111111110", "best.pgd50": "1111110000",
                "best.apgd": "1111", "last.clean": "1111111110", "last.pgd50": last[v][0], "last.apgd": last[v][1]}

    aa = {"base": ("10", "10", "10"), "der": ("11", "11", "10")}  # per seed, on the first 2 images
    rows, flags = [], {}
    for i in range(3):
        rev, again = str(i + 1) * 40, str(i + 4) * 40
        rows += [exp(f"ro-s{i}", rev, {**params(i, runs=runs), "evaluate": study_eval},
                     {f"metrics/eval/pgd.{v}.json": {**ro_eval(0.6, 0.4, 0.9), "n_examples": 10} for v in ("base", "der")}),
                 exp(f"roaa-s{i}", again, {**params(i, runs=runs), "evaluate": again_eval},
                     {f"metrics/eval/pgd.{v}.json": {"last.aa_acc": 0.5, "n_examples": 4} for v in ("base", "der")})]
        for v in ("base", "der"):
            flags[rev, "pgd", v] = study_flags(v)
            flags[again, "pgd", v] = {**kept, "n": 4, "apgd_n": 4, "aa_n": 2, "last.clean": "1111",
                                      "last.pgd50": last[v][0][:4], "last.apgd": last[v][1], "last.aa": aa[v][i]}
    flags["6" * 40, "pgd", "der"]["last.clean"] = "0111"  # seed 2's DER re-evaluation is of another model
    found, _ = seeds.experiments(show(experiments=rows), head=None)
    study = seeds.pool([e for e in found if e.name.startswith("ro-")])
    again = [r for m in study.members for r in reevaluation.of(m, found)]
    assert [r.name for r in again] == ["roaa-s0", "roaa-s1", "roaa-s2"]  # not the study's other seeds
    joined_flags, joined, notes = reevaluation.with_reevaluations([study], again, flags)
    assert notes == ["roaa-s2: pgd.der not joined to ro-s2: last.clean differs on 1 of the 4 images both cover "
                     "(not the same model or attack)"]
    assert joined_flags["1" * 40, "pgd", "base"]["last.aa"] == "10" and "last.aa" not in joined_flags["3" * 40,
                                                                                                  "pgd", "der"]
    # only evaluations join: a stored worst case is the other file's, over its own images
    flags["4" * 40, "pgd", "base"]["last.worst"] = "00"
    assert "last.worst" not in reevaluation.with_reevaluations([study], again, flags)[0]["1" * 40, "pgd", "base"]
    ro = seeds.report([study], joined_flags, joined=joined)["groups"][0]["robust_overfitting"]["pgd"]
    # seed 2 lacks the DER model's AutoAttack: no AutoAttack or worst-case row; with it joined they appear
    assert set(ro["der_gain_last"]) == {"clean_acc", "pgd50_acc", "pgd_apgd_acc"}
    flags["6" * 40, "pgd", "der"]["last.clean"] = "1111"
    joined_flags, joined, notes = reevaluation.with_reevaluations([study], again, flags)
    rep = seeds.report([study], joined_flags, joined=joined)
    ro = rep["groups"][0]["robust_overfitting"]["pgd"]
    # AutoAttack: base 1/2, DER 2/2, 2/2, 1/2; the worst case adds PGD-50 and APGD, which keep the first 2 images
    assert ro["der_gain_last"]["aa_acc"]["values"] == pytest.approx([0.5, 0.5, 0.0])
    assert ro["der_gain_last"]["worst_acc"]["values"] == pytest.approx([0.5, 0.5, 0.0])
    # PGD + APGD on the 4 APGD images: base 2/4, DER 3/4; best 4/4 in both
    assert ro["der_gain_last"]["pgd_apgd_acc"]["values"] == pytest.approx([0.25] * 3)
    assert ro["gap_pgd_apgd"]["base"]["values"] == pytest.approx([0.5] * 3)
    assert ro["images"] == {"clean_acc": 10, "pgd50_acc": 10, "pgd_apgd_acc": 4, "aa_acc": 2, "worst_acc": 2}
    # the attack check on the last checkpoint counts AutoAttack's breaks too: of the 4 images PGD-50 left standing,
    # APGD broke 2 and AutoAttack 1 more (one-sided binomial p 0.5^3)
    assert ro["attack_check"]["base.last"][0] == {"pgd_missed": 3, "apgd_missed": 0, "n": 4, "p": 0.125}
    assert [m.get("reevaluated_by") for m in rep["groups"][0]["members"]] == [["roaa-s0"], ["roaa-s1"], ["roaa-s2"]]
    md = seeds.markdown(rep)
    assert "Joined from re-evaluations of the same models" in md and "`roaa-s2`" in md
    assert "| DER gain, last checkpoint, AutoAttack | +33.3 ± 28.9 |" in md
