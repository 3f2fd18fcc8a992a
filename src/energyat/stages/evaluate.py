"""Stage `evaluate <run> <variant>`: clean, PGD-k (restarts) and standard AutoAttack accuracy of a run's checkpoints.

Reads models/<variant>/<run>/{best,last}.pt and the test split; writes metrics/eval/<run>.<variant>.json
(flat keys such as `best.pgd50_acc`, `last.aa_acc`, `last.seconds.square`) and pyautoattack's own log to
metrics/eval/<run>.<variant>.autoattack.log. Every checkpoint is loaded and checked before any attack runs.

The `standard` run has no threat model of its own; it is attacked at its resolved `eps`, i.e. the
`train.eps` default (the radius of the multi-step runs unless they override it).
"""
from __future__ import annotations

import time
from pathlib import Path


from .. import checkpoint, robustness
from ..artifacts import write_json, write_text
from ..data import load_prepared, to_float
from ..params import Params
from ..runtime import log, seed_everything, setup



def checkpoint_paths(params: Params, run_name: str, variant: str) -> dict[str, Path]:
    return {ck: Path("models") / variant / run_name / f"{ck}.pt" for ck in params.evaluate.checkpoints}


def evaluate_model(model, x, y, eps: float, params: Params) -> dict:
    """Flat metrics of one model on (x, y): accuracies rounded to 4 decimals, seconds to 0.1 s."""
    cfg = params.evaluate
    out, seconds = {}, {}
    start = time.perf_counter()
    out["clean_acc"] = robustness.clean_correct(model, x, y, cfg.batch_size).float().mean().item()
    seconds["clean"] = time.perf_counter() - start
    for steps in cfg.pgd_steps:
        seed_everything(params.seed)  # each attack draws the same random starts whatever ran before it
        start = time.perf_counter()
        robust = robustness.pgd_correct(model, x, y, eps, steps, cfg.restarts, cfg.batch_size)
        out[f"pgd{steps}_acc"] = robust.float().mean().item()
        seconds[f"pgd{steps}"] = time.perf_counter() - start
    aa_log: list[str] = []
    if cfg.autoattack:
        seed_everything(params.seed)
        aa = robustness.run_autoattack(model, x, y, eps, params.seed, cfg.batch_size)
        out["aa_acc"] = aa.accuracy
        out.update({f"aa.{attack}_acc": acc for attack, acc in aa.acc_after.items()})
        seconds.update(aa.seconds)
        seconds["aa"] = sum(aa.seconds.values())
        aa_log = aa.log
        strongest = f"pgd{max(cfg.pgd_steps)}_acc"
        check = robustness.crosscheck(out[strongest], aa.acc_after["apgd-ce"], aa.accuracy, len(y))
        out.update({f"check.{k}": v for k, v in check.items()})
    out = {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}
    out.update({f"seconds.{k}": round(v, 1) for k, v in seconds.items()})
    return {"metrics": out, "log": aa_log}


def run(params: Params, run_name: str, variant: str) -> None:
    rc = params.variant_run(run_name, variant)
    device = setup(params)
    splits, data_meta = load_prepared()
    expect = {**checkpoint.model_id(rc.model), "run": run_name, "variant": variant,
              **{k: data_meta[k] for k in ("dataset", "num_classes", "channels", "size")}}
    loaded = {ck: checkpoint.load(path, expect) for ck, path in checkpoint_paths(params, run_name, variant).items()}

    test = splits["test"]
    n = min(params.evaluate.n_examples, len(test.y))
    x, y = to_float(test.x[:n], device), test.y[:n].to(device)
    eps = rc.train.eps
    metrics = {"run": run_name, "variant": variant, "method": rc.train.method, "eps": eps, "n_examples": n,
               "restarts": params.evaluate.restarts}
    logs, results = [], {}
    for ck, (model, meta) in loaded.items():
        if meta["sha256"] in results:  # best is often the last epoch: same weights, same numbers
            log(f"evaluate {run_name}/{variant}: {ck} has the same weights as {results[meta['sha256']][0]}; reusing")
        else:
            log(f"evaluate {run_name}/{variant}: {ck} (epoch {meta.get('epoch')}), {n} test images, eps {eps:g}")
            results[meta["sha256"]] = ck, evaluate_model(model.to(device).eval(), x, y, eps, params)
            logs += [f"== {ck}", *results[meta["sha256"]][1]["log"]]
        result = results[meta["sha256"]][1]
        metrics.update({f"{ck}.{k}": v for k, v in result["metrics"].items()})
        metrics[f"{ck}.epoch"] = meta.get("epoch")
        m = result["metrics"]
        log(f"evaluate {run_name}/{variant}: {ck} clean {m['clean_acc']:.4f} "
            + " ".join(f"pgd{s} {m[f'pgd{s}_acc']:.4f}" for s in params.evaluate.pgd_steps)
            + (f" aa {m['aa_acc']:.4f} ({m['seconds.aa']:.0f}s)" if "aa_acc" in m else ""))
        if m.get("check.passed") is False:
            log(f"evaluate {run_name}/{variant}: warning: {ck}: PGD and AutoAttack disagree beyond "
                f"{m['check.tolerance']:.3f} (APGD-CE gap {m['check.apgdce_gap']:+.4f}, "
                f"AA over PGD {m['check.aa_over_pgd']:+.4f})")
    out = Path("metrics/eval")
    n_warnings = sum(line.startswith("warning:") for line in logs)
    if n_warnings:
        log(f"evaluate {run_name}/{variant}: {n_warnings} AutoAttack warning(s), "
            f"see {out}/{run_name}.{variant}.autoattack.log")
    write_text(out / f"{run_name}.{variant}.autoattack.log", "\n".join(logs) + "\n")
    write_json(out / f"{run_name}.{variant}.json", metrics)
