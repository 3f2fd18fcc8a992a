"""Headline rows for `dvc metrics show`: one small JSON file per model, comparison, sampler, study cell or paper job,
all drawing on the same few column names, so that DVC prints one readable table (a row per file, a column per name)
and `dvc metrics diff` one changed number per line.

Columns (fractions in [0, 1] for accuracies; a difference row holds differences):
  clean, pgd, aa, worst   clean accuracy, the strongest PGD-k evaluated, standard AutoAttack, and the per-image worst
                          case over every attack run on an image (PGD, APGD-CE + APGD-T, AutoAttack)
  worst_lo, worst_hi      the worst case's 95 % interval: Wilson for one model, Newcombe's paired interval for a
                          difference on the same images, Student-t over seeds for a study row
  p_holm                  a difference row's p-value of the worst case (of PGD where no worst case was run),
                          Holm-adjusted over its table's family
  seeds, co               study rows: seeds pooled; seeds (for one model: 1/0) in catastrophic overfitting at the
                          end
  fid, inception_fid, is, diversity, steps   generation rows (classifier-feature FID and IS, Inception FID where
                          computed, mean pairwise diversity, SGLD steps used)
Row names: `<run>.<variant>.<checkpoint>` (one model), `<run>.der-base.<checkpoint>` (DER minus base),
`<run>.<variant>.best-last` (best minus last checkpoint), `gen.<sampler>.<variant>`; study rows start `co.` / `ro.`.

Pure functions; the stages write the rows (`metrics/headline/{run,studies,paper}/<row>.json`).
"""
from __future__ import annotations

import re

ACCURACIES = {"clean_acc": "clean", "aa_acc": "aa", "worst_acc": "worst"}
COLUMNS = ("clean", "pgd", "aa", "worst", "worst_lo", "worst_hi", "p_holm", "seeds", "co", "fid", "inception_fid", "is",
           "diversity", "steps")
GENERATION = ("fid", "inception_fid", "is", "diversity", "steps")
_PGD = re.compile(r"^pgd(\d+)_acc$")


def _num(v):
    return round(v, 4) if isinstance(v, float) else v


def _column(metric: str, pgd: str | None) -> str | None:
    """The column of a summary metric name (`pgd50_acc` -> `pgd` when it is the strongest PGD), else None."""
    if metric in ACCURACIES:
        return ACCURACIES[metric]
    if metric == pgd:
        return "pgd"
    if metric in ("worst_acc_lo", "worst_acc_hi"):
        return "worst_" + metric[-2:]
    return None


def _strongest_pgd(metrics) -> str | None:
    steps = [int(m.group(1)) for k in metrics if (m := _PGD.match(k))]
    return f"pgd{max(steps)}_acc" if steps else None


def _accuracy_row(values: dict, pgd: str | None = None) -> dict:
    """{metric: value} of one model (summary names, `clean_acc`, `pgd50_acc`, ...) -> its headline columns."""
    pgd = pgd or _strongest_pgd(values)
    return {col: _num(v) for m, v in values.items() if (col := _column(m, pgd))}


def _difference_row(values: dict) -> dict:
    """{metric: value} of one paired difference (`pgd50_acc`, `pgd50_acc_p_holm`, `worst_acc_lo`, ...)."""
    pgd = _strongest_pgd(values)
    row = _accuracy_row(values, pgd)
    source = "worst_acc" if "worst_acc" in values else pgd
    if f"{source}_p_holm" in values:
        row["p_holm"] = values[f"{source}_p_holm"]
    return row


def from_summary(summary: dict) -> dict[str, dict]:
    """Rows of a pipeline run from its flat metrics/summary.json (report.summary's keys)."""
    groups: dict[str, dict] = {}
    kinds: dict[str, str] = {}

    def put(row: str, kind: str, metric: str, value) -> None:
        groups.setdefault(row, {})[metric] = value
        kinds[row] = kind

    for key, value in summary.items():
        parts = key.split(".")
        if parts[0] == "standard" and len(parts) == 2:
            put("standard.base.last", "acc", parts[1], value)
        elif parts[0] == "gen" and len(parts) in (3, 4):
            put(".".join(parts[:-1]), "gen", parts[-1], value)
        elif parts[0] == "co" and len(parts) == 4:  # co.<run>.<variant | der_gain>.<metric>
            kind = "diff" if parts[2] == "der_gain" else "acc"
            put(f"{parts[1]}.{'der-base' if kind == 'diff' else parts[2]}.last", kind, parts[3], value)
        elif parts[0] == "ro" and len(parts) == 5:
            run, middle, ck, metric = parts[1], parts[2], parts[3], parts[4]
            if middle == "der_gain":
                put(f"{run}.der-base.{ck}", "diff", metric, value)
            elif ck == "best_minus_last":
                put(f"{run}.{middle}.best-last", "diff", metric, value)
            elif ck in ("best", "last"):
                put(f"{run}.{middle}.{ck}", "acc", metric, value)
    rows = {}
    for name, values in groups.items():
        if kinds[name] == "gen":
            row = {m: _num(v) for m, v in values.items() if m in GENERATION and isinstance(v, (int, float))}
        elif kinds[name] == "diff":
            row = _difference_row(values)
        else:
            row = {**_accuracy_row(values), **({"co": int(bool(values["co_at_end"]))} if "co_at_end" in values else {})}
        if row:
            rows[name] = row
    return rows


def _stat_row(stats: dict, pgd: str | None) -> dict:
    """{metric: {mean, lo, hi, ...}} over seeds -> columns (means; the worst case's t-interval)."""
    row = {col: _num(s["mean"]) for m, s in stats.items() if s and s.get("mean") is not None
           and (col := _column(m, pgd))}
    worst = stats.get("worst_acc") or {}
    row.update({f"worst_{b}": _num(worst[b]) for b in ("lo", "hi") if worst.get(b) is not None})
    return row


def setting_name(setting: dict) -> str:
    """A CO study setting in a row name: its dataset, and the DER variant that sets it apart."""
    data = "cifar10-jpeg" if "cifar" in setting["title"] else setting["title"].split(" ")[0]
    return data + ("-batch-norm-der" if 'der.aae_norm="batch"' in setting["label"].split(", ") else "")


def _eps_name(setting: dict, eps: float) -> str:
    return f"{255 * eps:.0f}-255" if "cifar" in setting["title"] else f"{eps:g}"


def from_studies(study: dict, seeds: dict) -> dict[str, dict]:
    """Rows of the CO study (metrics/co_study.json) and of the seeds report
    (metrics/seeds.json): per CO cell its means over seeds, and DER − base where both ran; per RO run the final
    models, DER − base and the best − last gaps."""
    rows = {}
    for setting in study["settings"]:
        for cell in setting["cells"]:
            eps = _eps_name(setting, cell["eps"])
            row = _stat_row(cell.get("stats") or {}, setting["pgd"])
            row.update(seeds=cell["n"], co=cell["co_at_end"])
            rows[f"co.{setting_name(setting)}.eps{eps}.{cell['run']}.{cell['variant']}"] = row
        for d in setting.get("der_gain") or []:
            eps = _eps_name(setting, d["eps"])
            rows[f"co.{setting_name(setting)}.eps{eps}.{d['run']}.der-base"] = {
                **_seed_difference(d["metrics"], setting["pgd"]), "seeds": len(d["seeds"])}
    for g in seeds["groups"]:
        for run, ro in (g.get("robust_overfitting") or {}).items():
            pgd, n = ro["pgd"], len(g["seeds"])
            for variant in ("base", "der"):
                stats = {k.removeprefix("last."): s for k, s in
                         g["metrics"].get(f"metrics/eval/{run}.{variant}.json", {}).items() if k.startswith("last.")}
                rows[f"ro.{run}.{variant}.last"] = {**_stat_row(stats, pgd), "seeds": n}
                gaps = {pgd: ro["gap"][variant], "worst_acc": (ro.get("gap_worst") or {}).get(variant)}
                rows[f"ro.{run}.{variant}.best-last"] = {**_seed_difference(gaps, pgd), "seeds": n}
            rows[f"ro.{run}.der-base.last"] = {**_seed_difference(ro["der_gain_last"], pgd), "seeds": n}
    return rows


def _seed_difference(stats: dict, pgd: str) -> dict:
    """A difference over seeds: the means, the worst case's t-interval and its Holm-adjusted paired-t p."""
    row = _stat_row({k: s for k, s in stats.items() if s}, pgd)
    source = stats.get("worst_acc") or stats.get(pgd) or {}
    if source.get("paired_t_p_holm") is not None:
        row["p_holm"] = float(f"{source['paired_t_p_holm']:.4g}")
    return row


def from_paper(evidence: dict) -> dict[str, dict]:
    """Rows of the paper's setting: per block, job and seed the final model's accuracies and CO at the end."""
    rows = {}
    for block, by_seed in evidence.items():
        for seed, ev in by_seed.items():
            for job, parts in ev["jobs"].items():
                values = {k.removeprefix("last."): v for k, v in parts["eval"].items() if k.startswith("last.")}
                rows[f"{block}.{job}.seed{seed}"] = {**_accuracy_row(values),
                                                     "co": int(bool(parts["train"].get("co_at_end")))}
    return rows
