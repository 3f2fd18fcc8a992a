"""The summary of a pipeline run: flat, stable metric keys and the paper-layout Markdown tables.

Pure functions over the metrics dicts the stages wrote (metrics/eval, metrics/train, metrics/score.json);
nothing is recomputed. Keys: `standard.<metric>`, `co.<run>.<variant>.<metric>` (final checkpoint),
`ro.<run>.<variant>.<checkpoint>.<metric>`, `*.der_gain.*` (DER minus base), plus score.json's own keys.
"""
from __future__ import annotations

import re

from .params import SINGLE_STEP, VARIANTS
from .train import RO_WINDOW

FINAL = "last"
METHOD_NAMES = {"fgsm": "FGSM", "rs-fgsm": "RS-FGSM", "n-fgsm": "N-FGSM", "pgd": "PGD-AT", "trades": "TRADES"}
TRAIN_KEYS = {"co": ("catastrophic_overfitting", "co_epoch", "co_at_end", "diverged"),
              "ro": ("best_epoch", "best_val_pgd_acc", "robust_overfitting_gap", "robust_overfitting_gap_smoothed",
                     "diverged")}


def family(method: str) -> str:
    """`co` for single-step methods (catastrophic overfitting), `ro` for multi-step ones (robust overfitting)."""
    return "co" if method in SINGLE_STEP else "ro"


def accuracies(eval_metrics: dict, checkpoint: str) -> dict[str, float]:
    """`clean_acc`, `pgd<k>_acc`, `aa_acc` of one checkpoint from an evaluate JSON (absent ones left out)."""
    pattern = re.compile(rf"^{checkpoint}\.([a-z0-9]+_acc)$")
    return {m.group(1): v for k, v in eval_metrics.items() if (m := pattern.match(k))}


def strongest_pgd(eval_metrics: dict) -> str | None:
    """The key (e.g. `pgd50_acc`) of the PGD evaluation with the most steps."""
    steps = [int(m.group(1)) for k in eval_metrics if (m := re.match(r"^[a-z]+\.pgd(\d+)_acc$", k))]
    return f"pgd{max(steps)}_acc" if steps else None


def summary(methods: dict[str, str], evals: dict[tuple[str, str], dict], trains: dict[tuple[str, str], dict],
            standard_eval: dict, score: dict | None = None) -> dict:
    """Flat summary. `methods`: run -> training method; `evals`/`trains`: (run, variant) -> that stage's JSON."""
    out = {"n_examples": standard_eval.get("n_examples")}
    out.update({f"standard.{k}": v for k, v in accuracies(standard_eval, FINAL).items()})
    for run, method in methods.items():
        fam = family(method)
        checkpoints = (FINAL,) if fam == "co" else tuple(
            ck for ck in ("best", "last") if accuracies(evals[run, "base"], ck))
        out[f"{fam}.{run}.eps"] = evals[run, "base"].get("eps")
        for variant in VARIANTS:
            prefix = f"{fam}.{run}.{variant}"
            for ck in checkpoints:
                where = prefix if fam == "co" else f"{prefix}.{ck}"
                out.update({f"{where}.{k}": v for k, v in accuracies(evals[run, variant], ck).items()})
            train = trains.get((run, variant), {})
            out.update({f"{prefix}.{k}": train[k] for k in TRAIN_KEYS[fam] if k in train})
        for ck in checkpoints:
            base, der = accuracies(evals[run, "base"], ck), accuracies(evals[run, "der"], ck)
            where = f"{fam}.{run}.der_gain" if fam == "co" else f"{fam}.{run}.der_gain.{ck}"
            out.update({f"{where}.{k}": round(der[k] - base[k], 4) for k in base if k in der})
    out.update(score or {})
    return out


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def _name(run: str, method: str) -> str:
    name = METHOD_NAMES.get(method, method)
    return name if run == method else f"{name} ({run})"


def _family_runs(methods: dict[str, str], evals: dict[tuple[str, str], dict], fam: str) -> tuple[list[str], str]:
    """The runs of one family and the key of the strongest PGD evaluation they report."""
    runs = [r for r, m in methods.items() if family(m) == fam]
    pgd = next((strongest_pgd(evals[r, "base"]) for r in runs if strongest_pgd(evals[r, "base"])), "pgd50_acc")
    return runs, pgd


def _label(run: str, method: str, variant: str) -> str:
    return _name(run, method) + (" + DER" if variant == "der" else "")


def _acc_cells(acc: dict[str, float], pgd: str) -> str:
    """The `clean | PGD | AA |` cells of a table row, in %."""
    return f"{_pct(acc.get('clean_acc'))} | {_pct(acc.get(pgd))} | {_pct(acc.get('aa_acc'))} |"


def co_table(methods: dict[str, str], evals: dict[tuple[str, str], dict]) -> str:
    """Catastrophic overfitting: single-step runs, base vs + DER, final checkpoint."""
    runs, pgd = _family_runs(methods, evals, "co")
    lines = [f"| Method | ε | Clean | PGD-{pgd[3:-4]} | AA |", "|---|---:|---:|---:|---:|"]
    for run in runs:
        for variant in VARIANTS:
            e = evals[run, variant]
            lines.append(f"| {_label(run, methods[run], variant)} | {e.get('eps', 0):g} | "
                         + _acc_cells(accuracies(e, FINAL), pgd))
    if not runs:
        lines.append("| (no single-step runs in params.yaml) | | | | |")
    n = _first(evals, runs, "n_examples")
    return "\n".join(lines) + (f"\n\nAccuracy (%) on the first {n} test images, final checkpoint; PGD with "
                               f"{_first(evals, runs, 'restarts')} restarts; AA: standard AutoAttack.\n")


def ro_table(methods: dict[str, str], evals: dict[tuple[str, str], dict]) -> str:
    """Robust overfitting: multi-step runs, base vs + DER, best (by validation PGD) and last checkpoints."""
    runs, pgd = _family_runs(methods, evals, "ro")
    lines = [f"| Method | ε | Checkpoint | Clean | PGD-{pgd[3:-4]} | AA |", "|---|---:|---|---:|---:|---:|"]
    for run in runs:
        for variant in VARIANTS:
            e = evals[run, variant]
            for ck in ("best", "last"):
                if acc := accuracies(e, ck):
                    lines.append(f"| {_label(run, methods[run], variant)} | {e.get('eps', 0):g} | {ck} | "
                                 + _acc_cells(acc, pgd))
    if not runs:
        lines.append("| (no multi-step runs in params.yaml) | | | | | |")
    n = _first(evals, runs, "n_examples")
    return "\n".join(lines) + (f"\n\nAccuracy (%) on the first {n} test images; best = epoch of highest validation "
                               f"PGD accuracy, last = final epoch; PGD with {_first(evals, runs, 'restarts')} "
                               "restarts; AA: standard AutoAttack.\n")


def _first(evals: dict, runs: list[str], key: str):
    return next((evals[r, "base"].get(key) for r in runs), "?")


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
