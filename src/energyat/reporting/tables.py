"""The summary of a pipeline run: flat, stable metric keys and the paper-layout Markdown tables.

Pure functions over what the stages wrote (metrics/eval, its per-example flags, metrics/train, metrics/score.json);
nothing expensive is recomputed. Keys: `standard.<metric>`, `co.<run>.<variant>.<metric>` (final checkpoint),
`ro.<run>.<variant>.<checkpoint>.<metric>`, each accuracy (clean, PGD-k, AutoAttack, and the per-image worst cases
of `flags.worst_cases`: `worst_acc` over every attack on AutoAttack's images, `pgd_apgd_acc` over PGD and APGD on
APGD's) with its Wilson 95 % interval (`<metric>_lo`, `<metric>_hi`), the images it counts (`<metric>_n`) and
`aa_warnings`; `*.der_gain.*` (DER minus base on the same images) and, for multi-step runs,
`ro.<run>.<variant>.best_minus_last.*`, each difference with Newcombe's paired 95 % interval (`_lo`, `_hi`), exact
McNemar p-value (`_p`), the images paired (`_n`) and, for the differences the CO / RO table shows, that p
Holm-adjusted over the table's Δ cells (`_p_holm`); plus score.json's own keys.

Every accuracy is counted from the per-example flags (the summary rounds it to 4 decimals as the evaluate JSON does;
the tables format it and its Wilson interval from the count, since rounding twice can move the printed digit), and
the worst cases are recomputed from the flags of the attacks they are taken over.
"""
from __future__ import annotations

import re

from ..evaluation import stats
from ..params import SINGLE_STEP, VARIANTS
from ..science.overfitting import RO_WINDOW
from . import flags as flagfile

FINAL = "last"
METHOD_NAMES = {"fgsm": "FGSM", "rs-fgsm": "RS-FGSM", "n-fgsm": "N-FGSM", "gradalign": "GradAlign", "pgd": "PGD-AT",
                "trades": "TRADES"}
TRAIN_KEYS = {"co": ("catastrophic_overfitting", "co_epoch", "co_at_end", "diverged"),
              "ro": ("best_epoch", "best_val_pgd_acc", "robust_overfitting_gap", "robust_overfitting_gap_smoothed",
                     "diverged")}
WARNED = "†"  # marks an AutoAttack number whose run raised a warning


def family(method: str) -> str:
    """`co` for single-step methods (catastrophic overfitting), `ro` for multi-step ones (robust overfitting)."""
    return "co" if method in SINGLE_STEP else "ro"


# APGD on its own is one component of the worst cases, like AutoAttack's per-attack accuracies: in the evaluate JSON,
# not among the summary's headline keys
COMPONENTS = ("apgd_acc",)
WORST_CASES = tuple(f"{name}_acc" for name in flagfile.WORST_CASES)  # from the per-example flags, where kept
# the images each accuracy of an evaluate JSON counts, where no flags say it (`_n`)
EXAMPLES = {"clean_acc": "n_examples", "aa_acc": "aa_examples", "worst_acc": "worst_examples",
            "pgd_apgd_acc": "pgd_apgd_examples"}


def accuracies(eval_metrics: dict, checkpoint: str, flag_file: dict | None = None) -> dict[str, float]:
    """`clean_acc`, `pgd<k>_acc`, `pgd_apgd_acc`, `aa_acc`, `worst_acc` of one checkpoint from an evaluate JSON
    (absent ones left out; `COMPONENTS` too); with its `flag_file`, the worst cases are those of its flags
    (`flags.worst_cases`), whatever the JSON says."""
    pattern = re.compile(rf"^{checkpoint}\.([a-z0-9_]+_acc)$")
    out = {m.group(1): v for k, v in eval_metrics.items() if (m := pattern.match(k)) and m.group(1) not in COMPONENTS}
    if flag_file is not None:
        out = {k: v for k, v in out.items() if k not in WORST_CASES}
        out.update({f"{name}_acc": sum(f) / len(f) for name, f in flagfile.worst_cases(flag_file, checkpoint).items()})
    return out


def with_intervals(eval_metrics: dict, checkpoint: str, flag_file: dict | None = None) -> dict[str, float]:
    """`accuracies` plus each one's Wilson interval and image count (`<metric>_lo`, `<metric>_hi`, `<metric>_n`) and
    `aa_warnings` when run. With the evaluate `flag_file`, an accuracy that has flags and its interval are recomputed
    from the count, unrounded."""
    out = {}
    for metric, acc in accuracies(eval_metrics, checkpoint, flag_file).items():
        if flag_file and (f := flagfile.accuracy_vector(flag_file, checkpoint, metric)):
            out[metric], out[f"{metric}_n"] = sum(f) / len(f), len(f)
            out[f"{metric}_lo"], out[f"{metric}_hi"] = stats.wilson(sum(f), len(f))
            continue
        out[metric] = acc
        out.update({f"{metric}{b}": eval_metrics[f"{checkpoint}.{metric}{b}"] for b in ("_lo", "_hi")
                    if f"{checkpoint}.{metric}{b}" in eval_metrics})
        if (n := eval_metrics.get(EXAMPLES.get(metric, "n_examples"))) is not None:
            out[f"{metric}_n"] = n
    if f"{checkpoint}.aa.warnings" in eval_metrics:
        out["aa_warnings"] = eval_metrics[f"{checkpoint}.aa.warnings"]
    return out


def _rounded(acc: dict) -> dict:
    """Accuracies and bounds to 4 decimals, as the evaluate JSON stores them (the summary's keys)."""
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in acc.items()}


# ------------------------------------------------------------------------------------------- paired tests


def _flags_name(flag_file: dict) -> str:
    return flagfile.PATH.format(run=flag_file.get("run"), variant=flag_file.get("variant"))


def paired(flags_a: dict, ck_a: str, flags_b: dict, ck_b: str, metrics: list[str]) -> dict[str, dict]:
    """Per accuracy metric: b minus a on the same images (`stats.paired_difference`), where both have flags; the
    worst cases from the component flags. Refused when the two files cover different test images
    (`flags.pair`)."""
    names = (_flags_name(flags_a), _flags_name(flags_b))
    return {metric: stats.paired_difference(*ab) for metric in metrics
            if (ab := flagfile.pair(flags_a, ck_a, flags_b, ck_b, metric, names))}


def _diff_keys(where: str, diffs: dict[str, dict]) -> dict:
    out = {}
    for metric, d in diffs.items():
        out.update({f"{where}.{metric}": round(d["diff"], 4), f"{where}.{metric}_lo": round(d["lo"], 4),
                    f"{where}.{metric}_hi": round(d["hi"], 4), f"{where}.{metric}_p": float(f"{d['p']:.4g}"),
                    f"{where}.{metric}_n": d["n"]})
        if "p_holm" in d:
            out[f"{where}.{metric}_p_holm"] = float(f"{d['p_holm']:.4g}")
    return out


def _checkpoints(fam: str, eval_metrics: dict) -> tuple[str, ...]:
    return (FINAL,) if fam == "co" else tuple(ck for ck in ("best", "last") if accuracies(eval_metrics, ck))


def comparisons(methods: dict[str, str], evals: dict[tuple[str, str], dict], flags: dict[tuple[str, str], dict],
                fam: str) -> dict[str, dict[str, dict]]:
    """The paired differences of one family's runs, keyed by summary prefix (`co.<run>.der_gain`,
    `ro.<run>.<variant>.best_minus_last`, `ro.<run>.der_gain.<checkpoint>`), per metric `paired`'s dict. Those the
    family's table shows (`table_metrics`: clean, strongest PGD, PGD + APGD, AA, worst case) form one Holm family:
    each carries `p_holm`."""
    runs, pgd = _family_runs(methods, evals, fam)
    shown = table_metrics(pgd)
    out = {}
    for run in runs:
        checkpoints = _checkpoints(fam, evals[run, "base"])
        if checkpoints == ("best", "last"):
            for variant in VARIANTS:
                fl = flags[run, variant]
                metrics = list(dict.fromkeys([*accuracies(evals[run, variant], "last", fl), *shown]))
                out[f"{fam}.{run}.{variant}.best_minus_last"] = paired(fl, "last", fl, "best", metrics)
        for ck in checkpoints:
            metrics = list(dict.fromkeys([*accuracies(evals[run, "base"], ck, flags[run, "base"]), *shown]))
            where = f"{fam}.{run}.der_gain" + ("" if fam == "co" else f".{ck}")
            out[where] = paired(flags[run, "base"], ck, flags[run, "der"], ck, metrics)
    family = [d for diffs in out.values() for metric, d in diffs.items() if metric in shown]
    for d, p in zip(family, stats.holm([d["p"] for d in family])):
        d["p_holm"] = p
    return out


def summary(methods: dict[str, str], evals: dict[tuple[str, str], dict], trains: dict[tuple[str, str], dict],
            flags: dict[tuple[str, str], dict], standard_eval: dict, score: dict | None = None,
            standard_flags: dict | None = None) -> dict:
    """Flat summary. `methods`: run -> training method; `evals`/`trains`/`flags`: (run, variant) -> that stage's
    JSON (flags: the evaluate flags file; `standard_flags` the standard run's)."""
    out = {"n_examples": standard_eval.get("n_examples"), "aa_examples": standard_eval.get("aa_examples")}
    diffs = {**comparisons(methods, evals, flags, "co"), **comparisons(methods, evals, flags, "ro")}
    out.update({f"standard.{k}": v for k, v in _rounded(with_intervals(standard_eval, FINAL, standard_flags)).items()})
    for run, method in methods.items():
        fam = family(method)
        checkpoints = _checkpoints(fam, evals[run, "base"])
        out[f"{fam}.{run}.eps"] = evals[run, "base"].get("eps")
        for variant in VARIANTS:
            prefix = f"{fam}.{run}.{variant}"
            for ck in checkpoints:
                where = prefix if fam == "co" else f"{prefix}.{ck}"
                acc = _rounded(with_intervals(evals[run, variant], ck, flags[run, variant]))
                out.update({f"{where}.{k}": v for k, v in acc.items()})
            if f"{prefix}.best_minus_last" in diffs:
                out.update(_diff_keys(f"{prefix}.best_minus_last", diffs[f"{prefix}.best_minus_last"]))
            train = trains.get((run, variant), {})
            out.update({f"{prefix}.{k}": train[k] for k in TRAIN_KEYS[fam] if k in train})
        for ck in checkpoints:
            where = f"{fam}.{run}.der_gain" if fam == "co" else f"{fam}.{run}.der_gain.{ck}"
            out.update(_diff_keys(where, diffs[where]))
    out.update(score or {})
    return out


# ------------------------------------------------------------------------------------------- tables

def _cell(acc: dict, metric: str) -> str:
    """`72.0 [62.5, 79.9]` (%, Wilson 95 %), a dagger on AutoAttack when its run raised warnings, `–` when absent."""
    if metric not in acc:
        return "–"
    text = stats.fmt_pct_interval(acc[metric], acc[f"{metric}_lo"], acc[f"{metric}_hi"])
    return text + (f" {WARNED}" if metric == "aa_acc" and acc.get("aa_warnings") else "")


def _diff_cell(diffs: dict, metric: str) -> str:
    return stats.fmt_diff(diffs[metric]) if metric in diffs else "–"


def _tests(diffs: dict[str, dict[str, dict]]) -> int:
    """How many p-values a table's Holm family holds."""
    return sum("p_holm" in d for ds in diffs.values() for d in ds.values())


def _name(run: str, method: str) -> str:
    name = METHOD_NAMES.get(method, method)
    return name if run == method else f"{name} ({run})"


def _family_runs(methods: dict[str, str], evals: dict[tuple[str, str], dict], fam: str) -> tuple[list[str], str]:
    """The runs of one family and the key of the strongest PGD evaluation they report."""
    runs = [r for r, m in methods.items() if family(m) == fam]
    pgd = next((p for r in runs if (p := flagfile.strongest_pgd(evals[r, "base"]))), "pgd50_acc")
    return runs, pgd


def table_metrics(pgd: str) -> tuple[str, ...]:
    """The accuracy columns the CO / RO tables may show, in order (a column no row of the table has is left out)."""
    return "clean_acc", pgd, "pgd_apgd_acc", "aa_acc", "worst_acc"


TABLE_HEADS = {"clean_acc": "Clean", "pgd_apgd_acc": "{pgd} + APGD", "aa_acc": "AA", "worst_acc": "Worst case"}


def _heads(metrics: list[str], pgd: str) -> str:
    name = f"PGD-{pgd[3:-4]}"
    return " | ".join(TABLE_HEADS.get(m, "{pgd}").format(pgd=name) for m in metrics)


def _columns(pgd: str, rows: list[dict]) -> list[str]:
    """`table_metrics` that some row of the table has."""
    return ([m for m in table_metrics(pgd) if any(m in acc for acc in rows)]
            or [m for m in table_metrics(pgd) if m != "pgd_apgd_acc"])


def _label(run: str, method: str, variant: str) -> str:
    return _name(run, method) + (" + DER" if variant == "der" else "")


def _first(evals: dict, runs: list[str], key: str):
    return next((evals[r, "base"].get(key) for r in runs), "?")


def _images(evals: dict, runs: list[str], pgd: str) -> str:
    """Which images each column counts, from the first run's evaluation."""
    n, n_apgd, n_aa = (_first(evals, runs, k) for k in ("n_examples", "apgd_examples", "aa_examples"))
    name = f"PGD-{pgd[3:-4]}"
    text = f"clean and PGD on the first {n} test images"
    if n_apgd and n_aa:
        text += (f"; {name} + APGD on the first {n_apgd} of them (an image counts when it is classified correctly "
                 f"clean and under every PGD and APGD-CE + APGD-T); AA (standard AutoAttack) on the first {n_aa}; "
                 f"worst case on those {n_aa}, AutoAttack's images: correct clean and under every PGD, APGD-CE + "
                 "APGD-T and AA")
    elif n_apgd:
        text += (f"; AA not run; worst case on the first {n_apgd}, APGD's images: correct clean and under every PGD "
                 "and APGD-CE + APGD-T")
    elif n_aa:
        text += (f"; AA (standard AutoAttack) on the first {n_aa} of them; worst case on those {n_aa}: correct clean "
                 "and under every PGD and AA")
    else:
        text += "; AA not run; worst case not run (no APGD, no AA)"
    return text


def _footnote(evals: dict, runs: list[str], pgd: str, checkpoints: str, warned: bool, tests: int) -> str:
    """What the numbers are: sample sizes, intervals, the paired tests (`tests` p-values in the Holm family), the
    AutoAttack warning mark."""
    starts = _first(evals, runs, "restarts")
    text = (f"\n\nAccuracy (%) with its Wilson 95 % interval: {_images(evals, runs, pgd)}; {checkpoints}; PGD with "
            f"{starts} random start{'' if starts == 1 else 's'}. Differences (Δ rows) in percentage points on the "
            "same images: Newcombe's paired score 95 % interval and exact McNemar p-value, Holm-adjusted over the "
            f"table's {tests} Δ cells in brackets.")
    if warned:
        text += (f" {WARNED}: AutoAttack's own checks raised warnings for this checkpoint (e.g. Square broke points "
                 "the gradient attacks missed: the number may overstate robustness); see "
                 "metrics/eval/<run>.<variant>.autoattack.log.")
    return text + "\n"


def co_table(methods: dict[str, str], evals: dict[tuple[str, str], dict], flags: dict[tuple[str, str], dict]) -> str:
    """Catastrophic overfitting: single-step runs, base vs + DER, final checkpoint, and DER − base."""
    runs, pgd = _family_runs(methods, evals, "co")
    accs = {(r, v): with_intervals(evals[r, v], FINAL, flags[r, v]) for r in runs for v in VARIANTS}
    metrics = _columns(pgd, list(accs.values()))
    lines = [f"| Method | ε | {_heads(metrics, pgd)} |", "|---|---:|" + "---:|" * len(metrics)]
    warned, diffs = False, comparisons(methods, evals, flags, "co")
    for run in runs:
        for variant in VARIANTS:
            acc = accs[run, variant]
            warned = warned or bool(acc.get("aa_warnings"))
            lines.append(f"| {_label(run, methods[run], variant)} | {evals[run, variant].get('eps', 0):g} | "
                         + " | ".join(_cell(acc, m) for m in metrics) + " |")
        lines.append("| Δ DER − base | | " + " | ".join(_diff_cell(diffs[f"co.{run}.der_gain"], m) for m in metrics)
                     + " |")
    if not runs:
        lines.append("| (no single-step runs in params.yaml) |" + " |" * (1 + len(metrics)))
    return "\n".join(lines) + _footnote(evals, runs, pgd, "final checkpoint", warned, _tests(diffs))


def ro_table(methods: dict[str, str], evals: dict[tuple[str, str], dict], flags: dict[tuple[str, str], dict]) -> str:
    """Robust overfitting: multi-step runs, base vs + DER, best (by validation PGD) and last checkpoints, with
    best − last per variant and DER − base per checkpoint."""
    runs, pgd = _family_runs(methods, evals, "ro")
    accs = {(r, v, ck): with_intervals(evals[r, v], ck, flags[r, v]) for r in runs for v in VARIANTS
            for ck in _checkpoints("ro", evals[r, "base"])}
    metrics = _columns(pgd, list(accs.values()))
    lines = [f"| Method | ε | Checkpoint | {_heads(metrics, pgd)} |", "|---|---:|---|" + "---:|" * len(metrics)]
    warned, diffs = False, comparisons(methods, evals, flags, "ro")
    for run in runs:
        checkpoints = _checkpoints("ro", evals[run, "base"])
        for variant in VARIANTS:
            e, label = evals[run, variant], _label(run, methods[run], variant)
            for ck in checkpoints:
                acc = accs[run, variant, ck]
                warned = warned or bool(acc.get("aa_warnings"))
                lines.append(f"| {label} | {e.get('eps', 0):g} | {ck} | "
                             + " | ".join(_cell(acc, m) for m in metrics) + " |")
            if checkpoints == ("best", "last"):
                d = diffs[f"ro.{run}.{variant}.best_minus_last"]
                lines.append(f"| {label} | | Δ best − last | " + " | ".join(_diff_cell(d, m) for m in metrics)
                             + " |")
        for ck in checkpoints:
            d = diffs[f"ro.{run}.der_gain.{ck}"]
            lines.append(f"| Δ DER − base | | {ck} | " + " | ".join(_diff_cell(d, m) for m in metrics) + " |")
    if not runs:
        lines.append("| (no multi-step runs in params.yaml) |" + " |" * (2 + len(metrics)))
    return "\n".join(lines) + _footnote(
        evals, runs, pgd, "best = epoch of highest validation PGD accuracy, last = final epoch", warned, _tests(diffs))


def _num(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def training_table(methods: dict[str, str], trains: dict[tuple[str, str], dict]) -> str:
    """Per training run (validation split, from metrics/train): final and best PGD accuracy, CO / divergence,
    the robust-overfitting gap and the final training-batch energies."""
    lines = ["| Run | Variant | Method | ε | Val clean | Val PGD | Best val PGD (epoch) | CO epoch | Diverged "
             f"| Best − last ({RO_WINDOW}-epoch means) | ΔE(x) | ΔE(x,y) | AAE frac (max) |",
             "|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for (run, variant), t in trains.items():
        lines.append(
            f"| {run} | {variant} | {METHOD_NAMES.get(methods.get(run, ''), methods.get(run, 'standard'))} "
            f"| {t.get('eps', 0):g} | {_num(t.get('final_val_clean_acc'))} | {_num(t.get('final_val_pgd_acc'))} "
            f"| {_num(t.get('best_val_pgd_acc'))} ({t.get('best_epoch')}) "
            f"| {t.get('co_epoch') if t.get('catastrophic_overfitting') else 'no'} "
            f"| {'epoch ' + str(t['diverged_epoch']) if t.get('diverged') else 'no'} "
            f"| {_num(t.get('robust_overfitting_gap'))} ({_num(t.get('robust_overfitting_gap_smoothed'))}) "
            f"| {_num(t.get('final_dE_x'))} | {_num(t.get('final_dE_xy'))} "
            f"| {_num(t.get('final_aae_frac'))} ({_num(t.get('max_aae_frac'))}) |")
    return "\n".join(lines) + (
        "\n\nValidation images (`train.n_val`), PGD-`val_steps` with one restart at each run's ε; energies are means "
        "over the last epoch's training batches (ΔE = natural − adversarial). Best − last in brackets: the best "
        f"{RO_WINDOW}-epoch mean of val PGD minus the last {RO_WINDOW}-epoch mean.\n")
