"""Headline rows for `dvc metrics show`: one small JSON file per model, comparison, sampler, study cell or paper job,
all drawing on the same few column names, so that DVC prints one readable table (a row per file, a column per name)
and `dvc metrics diff` one changed number per line.

Columns (fractions in [0, 1] for accuracies; a difference row holds differences):
  clean, pgd, pgd_apgd, aa, worst   clean accuracy, the strongest PGD-k evaluated, PGD + APGD (per image: correct
                          clean and under every PGD-k and APGD-CE + APGD-T, on APGD's images; where AutoAttack ran as
                          well), standard AutoAttack, and the worst case (per image: correct under every attack that
                          ran on it, on the images every attack ran on: AutoAttack's, else APGD's); see
                          energyat/reporting/flags.py
  n_clean, n_pgd, n_pgd_apgd, n_aa, n_worst   the test images each of those columns counts (a difference row: the
                          images paired; a study row: per seed)
  worst_lo, worst_hi      the worst case's 95 % interval: Wilson for one model, Newcombe's paired interval for a
                          difference on the same images, Student-t over seeds for a study row
  p_clean, p_pgd, p_pgd_apgd, p_aa, p_worst   a difference row's p-value per column (exact McNemar on the same
                          images for one run, paired t over seeds for a study row), Holm-adjusted over its table's
                          family
  seeds, co               study rows: seeds pooled; seeds (for one model: 1/0) in catastrophic overfitting at the
                          end
  fid, inception_fid, is, diversity, steps   generation rows (classifier-feature FID and IS, Inception FID where
                          computed, mean pairwise diversity, SGLD steps used)
Row names: `<run>.<variant>.<checkpoint>` (one model), `<run>.der-base.<checkpoint>` (DER minus base),
`<run>.<variant>.best-last` (best minus last checkpoint), `gen.<sampler>.<variant>`; study rows start `co.` / `ro.`
(`co.<setting>.eps<ε>.<run>.<variant>`: `setting_names`, unique by construction); a name given twice is refused.

Pure functions; the stages write the rows (`metrics/headline/{run,studies,paper}/<row>.json`).
"""
from __future__ import annotations

import json
import posixpath
import re

from ..errors import UserError
from ..evaluation import stats
from . import flags as flagfile

ACCURACIES = {"clean_acc": "clean", "pgd_apgd_acc": "pgd_apgd", "aa_acc": "aa", "worst_acc": "worst"}
SHOWN = ("clean", "pgd", "pgd_apgd", "aa", "worst")  # the accuracy columns, in order
COLUMNS = (*SHOWN, "worst_lo", "worst_hi", *(f"n_{c}" for c in SHOWN), *(f"p_{c}" for c in SHOWN), "seeds", "co",
           "fid", "inception_fid", "is", "diversity", "steps")
GENERATION = ("fid", "inception_fid", "is", "diversity", "steps")


def _num(v):
    return round(v, 4) if isinstance(v, float) else v


def _p(v):
    """A p-value to 4 significant digits (a tiny one stays readable, not 0.0)."""
    return float(f"{v:.4g}") if isinstance(v, float) else v


def _accuracy_column(metric: str, pgd: str | None) -> str | None:
    """The column of an accuracy name (`pgd50_acc` -> `pgd` when it is the strongest PGD), else None."""
    return "pgd" if metric == pgd else ACCURACIES.get(metric)


def _column(metric: str, pgd: str | None) -> str | None:
    """The column of a summary metric name: an accuracy (`clean_acc`), its image count (`clean_acc_n` -> `n_clean`),
    its Holm-adjusted p (`clean_acc_p_holm` -> `p_clean`) or the worst case's interval; else None."""
    if metric in ("worst_acc_lo", "worst_acc_hi"):
        return "worst_" + metric[-2:]
    for suffix, prefix in (("_n", "n_"), ("_p_holm", "p_")):
        if metric.endswith(suffix) and (col := _accuracy_column(metric.removesuffix(suffix), pgd)):
            return prefix + col
    return _accuracy_column(metric, pgd)


def _accuracy_row(values: dict, pgd: str | None = None) -> dict:
    """{metric: value} of one model or difference (summary names: `clean_acc`, `pgd50_acc_n`, `worst_acc_lo`,
    `aa_acc_p_holm`, ...) -> its headline columns."""
    pgd = pgd or flagfile.strongest_pgd(values)
    return {col: _p(v) if col.startswith("p_") else _num(v) for m, v in values.items() if (col := _column(m, pgd))}


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
            row = _accuracy_row(values)
        else:
            row = {**_accuracy_row(values), **({"co": int(bool(values["co_at_end"]))} if "co_at_end" in values else {})}
        if row:
            rows[name] = row
    return rows


def _stat_row(stats: dict, pgd: str | None, images: dict | None = None) -> dict:
    """{metric: {mean, lo, hi, ...}} over seeds -> columns (means; the worst case's t-interval; with `images`,
    {metric: test images per seed}, each column's n)."""
    row = {col: _num(s["mean"]) for m, s in stats.items() if s and s.get("mean") is not None
           and (col := _column(m, pgd))}
    worst = stats.get("worst_acc") or {}
    row.update({f"worst_{b}": _num(worst[b]) for b in ("lo", "hi") if worst.get(b) is not None})
    row.update({f"n_{col}": n for m, n in (images or {}).items()
                if n is not None and (col := _accuracy_column(m, pgd)) and col in row})
    return row


PATH_PARAMS = ("data.source",)
# the DER variant a setting's name has always spelt out; every other param that sets a setting apart from another one
# of the same dataset is spelt `-<param>-<value>`
NAMED = {"der.aae_norm": {"batch": "-batch-norm-der"}}


def _setting_params(setting: dict) -> dict:
    """A setting's params: those it records (fresh settings), overridden by its label's (a data file by its name)."""
    parts = (part.partition("=") for part in setting["label"].split(", ") if "=" in part)
    label = {k: json.loads(v) for k, _, v in parts}
    params = {**(setting.get("params") or {}), **label}
    return {k: posixpath.basename(v) if k in PATH_PARAMS and isinstance(v, str) else v for k, v in params.items()}


def _slug(text) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", str(text)).strip("-")


def _data_name(title: str) -> str:
    """A setting's dataset: `fashion-mnist`; an image folder by its file (`image-folder (cifar10-jpeg.tar.gz)` ->
    `cifar10-jpeg`)."""
    if m := re.fullmatch(r"[^(]*\((.+?)(?:\.tar\.gz|\.tgz|\.tar)?\)", title):
        return _slug(m.group(1))
    return _slug(title.split(" ")[0])


def setting_names(settings: list[dict]) -> list[str]:
    """CO study settings in row names, unique by construction: the dataset, the DER variant (`NAMED`), and every other
    param whose value differs from that of another setting of the same dataset (`-<param>-<value>`; params a setting
    does not record are not compared). Settings that differ in no param they both record (a re-run setting and the
    cells of it kept as aggregates only) share a name."""
    params = [_setting_params(s) for s in settings]
    data = [_data_name(s["title"]) for s in settings]
    names = []
    for i, (mine, d) in enumerate(zip(params, data)):
        keys = sorted({k for j, other in enumerate(params) if data[j] == d and j != i
                       for k in mine.keys() & other.keys() if mine[k] != other[k]} - NAMED.keys())
        name = d + "".join(v for k, by_value in NAMED.items() if (v := by_value.get(mine.get(k))))
        names.append(name + "".join(f"-{_slug(k.rsplit('.', 1)[-1])}-{_slug(mine[k])}" for k in keys))
    return names


def eps_name(setting: dict, eps: float) -> str:
    return f"{255 * eps:.0f}-255" if "cifar" in setting["title"] else f"{eps:g}"


def _put(rows: dict, name: str, row: dict) -> None:
    if name in rows:
        raise UserError(f"headline rows: two rows named {name}; the settings they come from need a param that sets "
                        "them apart in their names")
    rows[name] = row


def from_studies(study: dict, seeds: dict) -> dict[str, dict]:
    """Rows of the CO study (metrics/co_study.json) and of the seeds report
    (metrics/seeds.json): per CO cell its means over seeds, and DER − base where both ran; per RO run the final
    models, DER − base and the best − last gaps."""
    rows = {}
    for setting, name in zip(study["settings"], setting_names(study["settings"])):
        for cell in setting["cells"]:
            eps = eps_name(setting, cell["eps"])
            row = _stat_row(cell.get("stats") or {}, setting["pgd"], cell.get("images"))
            _put(rows, f"co.{name}.eps{eps}.{cell['run']}.{cell['variant']}",
                 {**row, "seeds": cell["n"], "co": cell["co_at_end"]})
        for d in setting.get("der_gain") or []:
            eps = eps_name(setting, d["eps"])
            _put(rows, f"co.{name}.eps{eps}.{d['run']}.der-base",
                 {**_seed_difference(d["metrics"], setting["pgd"], d.get("images")), "seeds": len(d["seeds"])})
    for g in seeds["groups"]:
        for run, ro in (g.get("robust_overfitting") or {}).items():
            pgd, n, images = ro["pgd"], len(g["seeds"]), ro.get("images")
            for variant in ("base", "der"):
                stats = (ro.get("levels") or {}).get(variant) or {
                    k.removeprefix("last."): s for k, s in g["metrics"].get(f"metrics/eval/{run}.{variant}.json",
                                                                            {}).items() if k.startswith("last.")}
                _put(rows, f"ro.{run}.{variant}.last", {**_stat_row(stats, pgd, images), "seeds": n})
                gaps = {pgd: ro["gap"][variant], "pgd_apgd_acc": (ro.get("gap_pgd_apgd") or {}).get(variant)}
                _put(rows, f"ro.{run}.{variant}.best-last", {**_seed_difference(gaps, pgd, images), "seeds": n})
            _put(rows, f"ro.{run}.der-base.last", {**_seed_difference(ro["der_gain_last"], pgd, images), "seeds": n})
    return rows


def _seed_difference(stats: dict, pgd: str, images: dict | None = None) -> dict:
    """A difference over seeds: the means, the worst case's t-interval, each column's Holm-adjusted paired-t p and,
    with `images`, its n."""
    stats = {k: s for k, s in stats.items() if s}
    row = _stat_row(stats, pgd, images)
    row.update({f"p_{col}": _p(s["paired_t_p_holm"]) for m, s in stats.items()
                if s.get("paired_t_p_holm") is not None and (col := _accuracy_column(m, pgd))})
    return row


def flag_accuracies(flag_file: dict, checkpoint: str) -> dict:
    """{`<metric>_acc`: accuracy, `<metric>_acc_lo`, `_hi`: its Wilson interval, `<metric>_acc_n`: images} of one
    checkpoint from its per-example flags: every evaluation it stores and the worst cases (`flags.worst_cases`)."""
    names = [k.partition(".")[2] for k in flag_file if k.startswith(f"{checkpoint}.")]
    out = {}
    for name in dict.fromkeys([*(n for n in names if n not in flagfile.WORST_CASES), *flagfile.WORST_CASES]):
        if f := flagfile.accuracy_vector(flag_file, checkpoint, name):
            lo, hi = stats.wilson(sum(f), len(f))
            out.update({f"{name}_acc": sum(f) / len(f), f"{name}_acc_lo": lo, f"{name}_acc_hi": hi,
                        f"{name}_acc_n": len(f)})
    return out


def from_paper(evidence: dict) -> dict[str, dict]:
    """Rows of the paper's setting: per block, job and seed the final model's accuracies (from its per-example
    flags), their image counts and CO at the end."""
    rows = {}
    for block, by_seed in evidence.items():
        for seed, ev in by_seed.items():
            for job, parts in ev["jobs"].items():
                rows[f"{block}.{job}.seed{seed}"] = {**_accuracy_row(flag_accuracies(parts["flags"], "last")),
                                                     "co": int(bool(parts["train"].get("co_at_end")))}
    return rows
