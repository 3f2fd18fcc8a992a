"""Stage `evaluate <run> <variant>`: clean, PGD-k (restarts) and standard AutoAttack accuracy of a run's checkpoints.

Reads models/<variant>/<run>/{best,last}.pt and the test split. Clean and PGD run on the first
`evaluate.n_examples` test images, AutoAttack on the first `evaluate.aa_examples` of them. Writes
- metrics/eval/<run>.<variant>.json: flat keys such as `best.pgd50_acc` with its Wilson 95 % interval
  (`best.pgd50_acc_lo`, `best.pgd50_acc_hi`), `last.aa_acc`, `last.aa.square_acc`, `last.aa.warnings`,
  `last.seconds.square`, and the AutoAttack settings read back after the run (`aa.*`);
- metrics/eval/<run>.<variant>.flags.json: per-example correctness, one '0'/'1' string per checkpoint and
  evaluation (`best.clean`, `best.pgd50`, `best.aa`, ...), character i = test image i, so that any two
  models can be compared pairwise later (report);
- metrics/eval/<run>.<variant>.autoattack.log: pyautoattack's own log, block by block.
Every checkpoint is loaded and checked before any attack runs. Under torchrun the blocks of
`evaluate.batch_size` images are shared among the ranks; rank 0 gathers and writes.

The `standard` run has no threat model of its own; it is attacked at its resolved `eps`, i.e. the
`train.eps` default (the radius of the multi-step runs unless they override it).
"""
from __future__ import annotations

import time
from pathlib import Path

from torch import Tensor

from .. import checkpoint, distributed, robustness, stats
from ..artifacts import write_json, write_text
from ..data import load_prepared, to_float
from ..params import Params, check_test_subset
from ..runtime import log, setup

OUT = Path("metrics/eval")
FLAGS_FORMAT = "energyat-flags/1"


def checkpoint_paths(params: Params, run_name: str, variant: str) -> dict[str, Path]:
    return {ck: Path("models") / variant / run_name / f"{ck}.pt" for ck in params.evaluate.checkpoints}


def accuracy_metrics(name: str, correct: int, n: int) -> dict:
    """`<name>` (accuracy) with its Wilson 95 % interval `<name>_lo`, `<name>_hi`, rounded to 4 decimals."""
    lo, hi = stats.wilson(correct, n)
    return {name: round(correct / n, 4), f"{name}_lo": round(lo, 4), f"{name}_hi": round(hi, 4)}


def flag_string(flags: Tensor) -> str:
    return "".join("1" if f else "0" for f in flags.tolist())


def evaluate_model(model, x, y, eps: float, params: Params) -> dict:
    """Flags, flat metrics and AutoAttack log of one model on (x, y); AutoAttack on the first aa_examples."""
    cfg = params.evaluate
    flags, out, seconds = {}, {}, {}
    start = time.perf_counter()
    flags["clean"] = robustness.clean_correct(model, x, y, cfg.batch_size)
    seconds["clean"] = time.perf_counter() - start
    for steps in cfg.pgd_steps:
        start = time.perf_counter()
        flags[f"pgd{steps}"] = robustness.pgd_correct(model, x, y, eps, steps, cfg.restarts, cfg.batch_size,
                                                      params.seed)
        seconds[f"pgd{steps}"] = time.perf_counter() - start
    aa = None
    if cfg.autoattack:
        n_aa = cfg.aa_examples
        start = time.perf_counter()
        aa = robustness.run_autoattack(model, x[:n_aa], y[:n_aa], eps, params.seed, cfg.batch_size)
        seconds["aa"] = time.perf_counter() - start  # wall clock; the per-attack seconds are summed over blocks
        seconds.update(aa.seconds)
        flags["aa"] = aa.robust
        out.update(accuracy_metrics("aa.clean_acc", aa.clean, n_aa))
        for attack, count in aa.robust_after.items():
            out.update(accuracy_metrics(f"aa.{attack}_acc", count, n_aa))
        out["aa.warnings"] = aa.warnings
        strongest = flags[f"pgd{max(cfg.pgd_steps)}"][:n_aa].float().mean().item()  # on the same images as AA
        check = robustness.crosscheck(strongest, aa.acc_after["apgd-ce"], aa.accuracy, n_aa)
        out.update({f"check.{k}": round(v, 4) if isinstance(v, float) else v for k, v in check.items()})
    for name, f in flags.items():
        out.update(accuracy_metrics(f"{name}_acc", int(f.sum()), len(f)))
    out.update({f"seconds.{k}": round(v, 1) for k, v in seconds.items()})
    return {"flags": flags, "metrics": out, "aa": aa}


def run(params: Params, run_name: str, variant: str) -> None:
    cfg = params.evaluate
    rc = params.variant_run(run_name, variant)
    device = setup(params)
    splits, data_meta = load_prepared()
    check_test_subset("evaluate.n_examples", cfg.n_examples, data_meta["counts"])
    test = splits["test"]
    expect = {**checkpoint.model_id(rc.model), "run": run_name, "variant": variant,
              **{k: data_meta[k] for k in ("dataset", "num_classes", "channels", "size")}}
    loaded = {ck: checkpoint.load(path, expect) for ck, path in checkpoint_paths(params, run_name, variant).items()}

    n, n_aa = cfg.n_examples, cfg.aa_examples if cfg.autoattack else 0
    x, y = to_float(test.x[:n], device), test.y[:n].to(device)
    eps = rc.train.eps
    metrics = {"run": run_name, "variant": variant, "method": rc.train.method, "eps": eps, "n_examples": n,
               "aa_examples": n_aa, "restarts": cfg.restarts}
    flag_file = {"format": FLAGS_FORMAT, "run": run_name, "variant": variant, "split": "test",
                 "test_sha256": data_meta["files"]["test"], "n": n, "aa_n": n_aa, "eps": eps}
    logs, results = [], {}
    for ck, (model, meta) in loaded.items():
        if meta["sha256"] in results:  # best is often the last epoch: same weights, same numbers
            log(f"evaluate {run_name}/{variant}: {ck} has the same weights as {results[meta['sha256']][0]}; reusing")
        else:
            log(f"evaluate {run_name}/{variant}: {ck} (epoch {meta.get('epoch')}), {n} test images "
                f"({n_aa} with AutoAttack), eps {eps:g}")
            result = evaluate_model(model.to(device).eval(), x, y, eps, params)
            results[meta["sha256"]] = ck, result
            if result["aa"] is not None:
                logs += [f"== {ck}", *result["aa"].log]
                metrics.update({f"aa.{k}": ",".join(v) if isinstance(v, list) else v
                                for k, v in result["aa"].settings.items()})
        result = results[meta["sha256"]][1]
        metrics.update({f"{ck}.{k}": v for k, v in result["metrics"].items()})
        metrics[f"{ck}.epoch"] = meta.get("epoch")
        flag_file.update({f"{ck}.{name}": flag_string(f) for name, f in result["flags"].items()})
        flag_file[f"{ck}.epoch"] = meta.get("epoch")
        m = result["metrics"]
        log(f"evaluate {run_name}/{variant}: {ck} clean {m['clean_acc']:.4f} "
            + " ".join(f"pgd{s} {m[f'pgd{s}_acc']:.4f}" for s in cfg.pgd_steps)
            + (f" aa {m['aa_acc']:.4f} ({m['seconds.aa']:.0f}s)" if "aa_acc" in m else ""))
        if m.get("aa.warnings"):
            log(f"evaluate {run_name}/{variant}: warning: {ck}: AutoAttack raised {m['aa.warnings']} warning(s), "
                f"see {OUT}/{run_name}.{variant}.autoattack.log")
        if m.get("check.passed") is False:
            log(f"evaluate {run_name}/{variant}: warning: {ck}: PGD and AutoAttack disagree beyond "
                f"{m['check.tolerance']:.3f} (APGD-CE gap {m['check.apgdce_gap']:+.4f}, "
                f"AA over PGD {m['check.aa_over_pgd']:+.4f})")
    if distributed.context().main:
        write_text(OUT / f"{run_name}.{variant}.autoattack.log", "\n".join(logs) + "\n")
        write_json(OUT / f"{run_name}.{variant}.flags.json", flag_file)
        write_json(OUT / f"{run_name}.{variant}.json", metrics)
