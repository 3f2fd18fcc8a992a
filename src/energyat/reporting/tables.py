"""The summary of a pipeline run: flat, stable metric keys and the paper-layout Markdown tables.

Pure functions over what the stages wrote (metrics/eval, its per-example flags, metrics/train, metrics/score.json);
nothing expensive is recomputed. Keys: `standard.<metric>`, `co.<run>.<variant>.<metric>` (final checkpoint),
`ro.<run>.<variant>.<checkpoint>.<metric>`, each accuracy (clean, PGD-k, AutoAttack and `worst_acc`, the per-image
worst case over them and APGD) with its Wilson 95 % interval (`<metric>_lo`, `<metric>_hi`) and `aa_warnings`;
`*.der_gain.*` (DER minus base on the same images) and, for multi-step runs,
`ro.<run>.<variant>.best_minus_last.*`, each difference with Newcombe's paired 95 % interval (`_lo`, `_hi`), exact
McNemar p-value (`_p`) and, for the differences the CO / RO table shows, that p Holm-adjusted over the table's
Δ cells (`_p_holm`); plus score.json's own keys.

The tables format each accuracy and its Wilson interval from the count in the flags file, not from the 4-decimal
values of the evaluate JSON (rounding twice can move the printed digit).
"""
from __future__ import annotations

import re

from ..errors import UserError
from ..evaluation import stats
from ..params import SINGLE_STEP, VARIANTS
from ..science.overfitting import RO_WINDOW

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


# APGD on its own is one component of the worst case, like AutoAttack's per-attack accuracies: in the evaluate JSON,
# not among the summary's headline keys
COMPONENTS = ("apgd_acc",)


def accuracies(eval_metrics: dict, checkpoint: str) -> dict[str, float]:
    """`clean_acc`, `pgd<k>_acc`, `aa_acc`, `worst_acc` of one checkpoint from an evaluate JSON (absent ones left
    out; `COMPONENTS` too)."""
    pattern = re.compile(rf"^{checkpoint}\.([a-z0-9]+_acc)$")
    return {m.group(1): v for k, v in eval_metrics.items() if (m := pattern.match(k)) and m.group(1) not in COMPONENTS}


def with_intervals(eval_metrics: dict, checkpoint: str, flag_file: dict | None = None) -> dict[str, float]:
    """`accuracies` plus each one's Wilson interval (`<metric>_lo`, `<metric>_hi`) and `aa_warnings` when run. With
    the evaluate `flag_file`, an accuracy that has flags and its interval are recomputed from the count, unrounded."""
    out = {}
    for metric, acc in accuracies(eval_metrics, checkpoint).items():
        out[metric] = acc
        out.update({f"{metric}{b}": eval_metrics[f"{checkpoint}.{metric}{b}"] for b in ("_lo", "_hi")
                    if f"{checkpoint}.{metric}{b}" in eval_metrics})
        if flag_file and (f := _flags(flag_file, checkpoint, metric)):
            out[metric] = sum(f) / len(f)
            out[f"{metric}_lo"], out[f"{metric}_hi"] = stats.wilson(sum(f), len(f))
    if f"{checkpoint}.aa.warnings" in eval_metrics:
        out["aa_warnings"] = eval_metrics[f"{checkpoint}.aa.warnings"]
    return out


def strongest_pgd(eval_metrics: dict) -> str | None:
    """The key (e.g. `pgd50_acc`) of the PGD evaluation with the most steps."""
    steps = [int(m.group(1)) for k in eval_metrics if (m := re.match(r"^[a-z]+\.pgd(\d+)_acc$", k))]
    return f"pgd{max(steps)}_acc" if steps else None


# ------------------------------------------------------------------------------------------- paired tests

def _flags(flag_file: dict, checkpoint: str, metric: str) -> list[bool] | None:
    """Per-example correctness behind `<checkpoint>.<metric>` (a flags file key such as `last.pgd50`)."""
    v = flag_file.get(f"{checkpoint}.{metric.removesuffix('_acc')}")
    return None if v is None else [c == "1" for c in v]


def paired(flags_a: dict, ck_a: str, flags_b: dict, ck_b: str, metrics: list[str]) -> dict[str, dict]:
    """Per accuracy metric: b minus a on the same images (`stats.paired_difference`), where both have flags."""
    for key in ("test_sha256", "n", "apgd_n", "aa_n", "worst_n"):  # the same test images behind both files
        if flags_a.get(key) != flags_b.get(key):
            names = [f"metrics/eval/{f.get('run')}.{f.get('variant')}.flags.json" for f in (flags_a, flags_b)]
            raise UserError(f"{names[0]} and {names[1]} cover different test images ({key} {flags_a.get(key)!r} "
                            f"vs {flags_b.get(key)!r}); re-run evaluate for both")
    out = {}
    for metric in metrics:
        a, b = _flags(flags_a, ck_a, metric), _flags(flags_b, ck_b, metric)
        if a is not None and b is not None:
            out[metric] = stats.paired_difference(a, b)
    return out


def _diff_keys(where: str, diffs: dict[str, dict]) -> dict:
    out = {}
    for metric, d in diffs.items():
        out.update({f"{where}.{metric}": round(d["diff"], 4), f"{where}.{metric}_lo": round(d["lo"], 4),
                    f"{where}.{metric}_hi": round(d["hi"], 4), f"{where}.{metric}_p": float(f"{d['p']:.4g}")})
        if "p_holm" in d:
            out[f"{where}.{metric}_p_holm"] = float(f"{d['p_holm']:.4g}")
    return out


def _checkpoints(fam: str, eval_metrics: dict) -> tuple[str, ...]:
    return (FINAL,) if fam == "co" else tuple(ck for ck in ("best", "last") if accuracies(eval_metrics, ck))


def comparisons(methods: dict[str, str], evals: dict[tuple[str, str], dict], flags: dict[tuple[str, str], dict],
                fam: str) -> dict[str, dict[str, dict]]:
    """The paired differences of one family's runs, keyed by summary prefix (`co.<run>.der_gain`,
    `ro.<run>.<variant>.best_minus_last`, `ro.<run>.der_gain.<checkpoint>`), per metric `paired`'s dict. Those the
    family's table shows (`table_metrics`: clean, strongest PGD, AA, worst case) form one Holm family: each carries
    `p_holm`."""
    runs, pgd = _family_runs(methods, evals, fam)
    shown = table_metrics(pgd)
    out = {}
    for run in runs:
        checkpoints = _checkpoints(fam, evals[run, "base"])
        if checkpoints == ("best", "last"):
            for variant in VARIANTS:
                metrics = list(dict.fromkeys([*accuracies(evals[run, variant], "last"), *shown]))
                out[f"{fam}.{run}.{variant}.best_minus_last"] = paired(flags[run, variant], "last",
                                                                       flags[run, variant], "best", metrics)
        for ck in checkpoints:
            metrics = list(dict.fromkeys([*accuracies(evals[run, "base"], ck), *shown]))
            where = f"{fam}.{run}.der_gain" + ("" if fam == "co" else f".{ck}")
            out[where] = paired(flags[run, "base"], ck, flags[run, "der"], ck, metrics)
    family = [d for diffs in out.values() for metric, d in diffs.items() if metric in shown]
    for d, p in zip(family, stats.holm([d["p"] for d in family])):
        d["p_holm"] = p
    return out


def summary(methods: dict[str, str], evals: dict[tuple[str, str], dict], trains: dict[tuple[str, str], dict],
            flags: dict[tuple[str, str], dict], standard_eval: dict, score: dict | None = None) -> dict:
    """Flat summary. `methods`: run -> training method; `evals`/`trains`/`flags`: (run, variant) -> that stage's
    JSON (flags: the evaluate flags file)."""
    out = {"n_examples": standard_eval.get("n_examples"), "aa_examples": standard_eval.get("aa_examples")}
    diffs = {**comparisons(methods, evals, flags, "co"), **comparisons(methods, evals, flags, "ro")}
    out.update({f"standard.{k}": v for k, v in with_intervals(standard_eval, FINAL).items()})
    for run, method in methods.items():
        fam = family(method)
        checkpoints = _checkpoints(fam, evals[run, "base"])
        out[f"{fam}.{run}.eps"] = evals[run, "base"].get("eps")
        for variant in VARIANTS:
            prefix = f"{fam}.{run}.{variant}"
            for ck in checkpoints:
                where = prefix if fam == "co" else f"{prefix}.{ck}"
                out.update({f"{where}.{k}": v for k, v in with_intervals(evals[run, variant], ck).items()})
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
    pgd = next((strongest_pgd(evals[r, "base"]) for r in runs if strongest_pgd(evals[r, "base"])), "pgd50_acc")
    return runs, pgd


def table_metrics(pgd: str) -> tuple[str, ...]:
    """The accuracy columns of the CO / RO tables, in order."""
    return "clean_acc", pgd, "aa_acc", "worst_acc"


TABLE_HEADS = ("Clean", "PGD-{steps}", "AA", "Worst case")


def _heads(pgd: str) -> str:
    return " | ".join(h.format(steps=pgd[3:-4]) for h in TABLE_HEADS)


def _label(run: str, method: str, variant: str) -> str:
    return _name(run, method) + (" + DER" if variant == "der" else "")


def _first(evals: dict, runs: list[str], key: str):
    return next((evals[r, "base"].get(key) for r in runs), "?")


def _footnote(evals: dict, runs: list[str], checkpoints: str, warned: bool, tests: int) -> str:
    """What the numbers are: sample sizes, intervals, the paired tests (`tests` p-values in the Holm family), the
    AutoAttack warning mark."""
    n_aa, starts = _first(evals, runs, "aa_examples"), _first(evals, runs, "restarts")
    n_apgd, n_worst = _first(evals, runs, "apgd_examples"), _first(evals, runs, "worst_examples")
    text = (f"\n\nAccuracy (%) with its Wilson 95 % interval: clean and PGD on the first {_first(evals, runs, 'n_examples')}"
            f" test images, " + (f"AA (standard AutoAttack) on the first {n_aa} of them" if n_aa else "AA not run")
            + "; " + (f"worst case on the first {n_worst}: an image counts when it is classified correctly clean and "
                      f"under every PGD, APGD-CE + APGD-T (first {n_apgd or 0}) and AA" if n_worst else
                      "worst case not run (no APGD, no AA)")
            + f"; {checkpoints}; PGD with {starts} random start{'' if starts == 1 else 's'}. Differences (Δ rows) in "
            "percentage points on the same images: Newcombe's paired score 95 % interval and exact McNemar p-value, "
            f"Holm-adjusted over the table's {tests} Δ cells in brackets.")
    if warned:
        text += (f" {WARNED}: AutoAttack's own checks raised warnings for this checkpoint (e.g. Square broke points "
                 "the gradient attacks missed: the number may overstate robustness); see "
                 "metrics/eval/<run>.<variant>.autoattack.log.")
    return text + "\n"


def co_table(methods: dict[str, str], evals: dict[tuple[str, str], dict], flags: dict[tuple[str, str], dict]) -> str:
    """Catastrophic overfitting: single-step runs, base vs + DER, final checkpoint, and DER − base."""
    runs, pgd = _family_runs(methods, evals, "co")
    metrics = table_metrics(pgd)
    lines = [f"| Method | ε | {_heads(pgd)} |", "|---|---:|" + "---:|" * len(metrics)]
    warned, diffs = False, comparisons(methods, evals, flags, "co")
    for run in runs:
        for variant in VARIANTS:
            e, acc = evals[run, variant], with_intervals(evals[run, variant], FINAL, flags[run, variant])
            warned = warned or bool(acc.get("aa_warnings"))
            lines.append(f"| {_label(run, methods[run], variant)} | {e.get('eps', 0):g} | "
                         + " | ".join(_cell(acc, m) for m in metrics) + " |")
        lines.append("| Δ DER − base | | " + " | ".join(_diff_cell(diffs[f"co.{run}.der_gain"], m) for m in metrics)
                     + " |")
    if not runs:
        lines.append("| (no single-step runs in params.yaml) |" + " |" * (1 + len(metrics)))
    return "\n".join(lines) + _footnote(evals, runs, "final checkpoint", warned, _tests(diffs))


def ro_table(methods: dict[str, str], evals: dict[tuple[str, str], dict], flags: dict[tuple[str, str], dict]) -> str:
    """Robust overfitting: multi-step runs, base vs + DER, best (by validation PGD) and last checkpoints, with
    best − last per variant and DER − base per checkpoint."""
    runs, pgd = _family_runs(methods, evals, "ro")
    metrics = table_metrics(pgd)
    lines = [f"| Method | ε | Checkpoint | {_heads(pgd)} |", "|---|---:|---|" + "---:|" * len(metrics)]
    warned, diffs = False, comparisons(methods, evals, flags, "ro")
    for run in runs:
        checkpoints = _checkpoints("ro", evals[run, "base"])
        for variant in VARIANTS:
            e, label = evals[run, variant], _label(run, methods[run], variant)
            for ck in checkpoints:
                acc = with_intervals(e, ck, flags[run, variant])
                warned = warned or bool(acc.get("aa_warnings"))
                lines.append(f"| {label} | {e.get('eps', 0):g} | {ck} | " + " | ".join(_cell(acc, m) for m in metrics)
                             + " |")
            if checkpoints == ("best", "last"):
                d = diffs[f"ro.{run}.{variant}.best_minus_last"]
                lines.append(f"| {label} | | Δ best − last | " + " | ".join(_diff_cell(d, m) for m in metrics) + " |")
        for ck in checkpoints:
            d = diffs[f"ro.{run}.der_gain.{ck}"]
            lines.append(f"| Δ DER − base | | {ck} | " + " | ".join(_diff_cell(d, m) for m in metrics) + " |")
    if not runs:
        lines.append("| (no multi-step runs in params.yaml) |" + " |" * (2 + len(metrics)))
    return "\n".join(lines) + _footnote(
        evals, runs, "best = epoch of highest validation PGD accuracy, last = final epoch", warned, _tests(diffs))


def _num(v, fmt: str = "{:.3f}") -> str:
    return "–" if v is None else fmt.format(v)


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
            f"| {_num(t.get('final_aae_frac'), '{:.3f}')} ({_num(t.get('max_aae_frac'), '{:.3f}')}) |")
    return "\n".join(lines) + ("\n\nValidation images (`train.n_val`), PGD-`val_steps` with one restart at each run's ε;"
                               " energies are means over the last epoch's training batches (ΔE = natural − adversarial). Best − last in"
                               f" brackets: the best {RO_WINDOW}-epoch mean of val PGD minus the last {RO_WINDOW}-epoch mean."
                               "\n")
