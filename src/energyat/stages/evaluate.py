"""Stage `evaluate <run> <variant>`: clean, PGD-k (restarts), APGD-CE + APGD-T and standard AutoAttack accuracy of a
run's checkpoints, and the worst case over all of them, image by image.

Reads models/<variant>/<run>/{best,last}.pt and the test split. Clean and PGD run on the first
`evaluate.n_examples` test images, APGD (APGD-CE then APGD-T, standard AutoAttack's settings, through the official
code) on the first `evaluate.apgd_examples` of them (all of them when it is larger), standard AutoAttack on the
first `evaluate.aa_examples`. Where APGD covers AutoAttack's images, its blocks are cut at aa_examples and
AutoAttack continues from them (`robustness.autoattack_after_apgd`: its APGD-CE and APGD-T are the APGD run's calls
on the same blocks, FAB-T and Square run on what they leave standing; the flags of a standard call, tested).
The worst cases are taken over the attacks that ran on the same images (`reporting/flags.py` recomputes them from
the flags): `worst` on the images every attack ran on, AutoAttack's when it ran (it contains APGD-CE and APGD-T with
the same settings), else APGD's: an image counts as robust when the model classifies it correctly clean and under
every PGD-k (each restart), APGD (where it ran) and AutoAttack; `pgd_apgd`, where AutoAttack and APGD both ran, on
APGD's images: correct clean and under every PGD-k and APGD. Writes
- metrics/eval/<run>.<variant>.json: flat keys such as `best.pgd50_acc` with its Wilson 95 % interval
  (`best.pgd50_acc_lo`, `best.pgd50_acc_hi`), `best.apgd_acc`, `best.worst_acc`, `best.pgd_apgd_acc`, `last.aa_acc`,
  `last.aa.square_acc`, `last.apgd.apgd-t_acc`, `last.aa.warnings`, `last.seconds.square`, the attack check
  (`last.check.*`, below) and the settings read back after the runs (`apgd.*`, `aa.*`);
- metrics/eval/<run>.<variant>.flags.json: per-example correctness, one '0'/'1' string per checkpoint and
  evaluation (`best.clean`, `best.pgd50`, `best.apgd`, `best.aa`, `best.worst`, `best.pgd_apgd`, ...), character i
  = test image i,
  so that any two models can be compared pairwise later (report);
- metrics/eval/<run>.<variant>.autoattack.log: pyautoattack's own log (APGD, then AutoAttack), block by block.

The attack check pairs the strongest PGD (most steps) with APGD / AutoAttack on the images either ran on:
`check.pgd_missed` images PGD leaves standing that they break, `check.apgd_missed` the reverse, and `check.p`, the
exact one-sided binomial test of "PGD is as strong as APGD" on those discordant images; below 0.01 the stage warns
that the PGD number overstates robustness (report `worst_acc`).

Every checkpoint is loaded and checked before any attack runs. Under torchrun each rank evaluates whole
checkpoints when there are at least as many distinct ones as ranks (on a 2-core CPU, `distributed.eval_nproc:
auto` runs best and last side by side, one thread each), else the blocks of `evaluate.batch_size` images are
shared among the ranks; either way the numbers are those of one process, and rank 0 gathers and writes.

The `standard` run has no threat model of its own; it is attacked at its resolved `eps`, i.e. the
`train.eps` default (the radius of the multi-step runs unless they override it).
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from torch import Tensor

from ..evaluation import robustness, stats
from ..infra import distributed
from ..infra.artifacts import write_json, write_text
from ..infra.runtime import log, setup
from ..params import Params, RunCfg, check_test_subset
from ..runstate import checkpoint
from ..science.data import load_prepared, to_float

OUT = Path("metrics/eval")
FLAGS_FORMAT = "energyat-flags/1"
CHECK_ALPHA = 0.01  # the attack check warns below this p-value


def checkpoint_paths(params: Params, run_name: str, variant: str) -> dict[str, Path]:
    return {ck: Path("models") / variant / run_name / f"{ck}.pt" for ck in params.evaluate.checkpoints}


def accuracy_metrics(name: str, correct: int, n: int) -> dict:
    """`<name>` (accuracy) with its Wilson 95 % interval `<name>_lo`, `<name>_hi`, rounded to 4 decimals."""
    lo, hi = stats.wilson(correct, n)
    return {name: round(correct / n, 4), f"{name}_lo": round(lo, 4), f"{name}_hi": round(hi, 4)}


def flag_string(flags: Tensor) -> str:
    return "".join("1" if f else "0" for f in flags.tolist())


def attack_check(pgd: Tensor, strong: Tensor) -> dict:
    """Paired check of our strongest PGD against APGD / AutoAttack on the same images (`strong`: correct under
    them). `pgd_missed`: images PGD leaves standing that the stronger attacks break; `apgd_missed`: the reverse;
    `p`: exact one-sided binomial test of H0 "PGD is as strong as APGD" on those discordant images, 1 when there
    are none (`stats.binomial_excess_p`)."""
    pgd_missed, apgd_missed = stats.discordant(pgd.cpu().numpy(), strong.cpu().numpy())
    return {"n": len(pgd), "pgd_missed": pgd_missed, "apgd_missed": apgd_missed,
            "p": stats.binomial_excess_p(pgd_missed, apgd_missed)}


def attacked_examples(cfg) -> dict[str, int]:
    """Images each evaluation covers (a prefix of the n_examples; 0: not run): `apgd` (apgd_examples, at most
    n_examples), `aa`, `check` (the attack check: the images APGD or AutoAttack ran on), `worst` (the images every
    attack ran on: AutoAttack's, else APGD's) and `pgd_apgd` (APGD's, where AutoAttack ran as well)."""
    n_apgd, n_aa = min(cfg.apgd_examples, cfg.n_examples), cfg.aa_examples if cfg.autoattack else 0
    return {"apgd": n_apgd, "aa": n_aa, "check": max(n_apgd, n_aa), "worst": n_aa or n_apgd,
            "pgd_apgd": n_apgd if n_aa else 0}


def strong_attacks(cfg) -> str:
    """Who the attack check pits PGD against, in words."""
    n = attacked_examples(cfg)
    return "/".join(name for key, name in (("apgd", "APGD"), ("aa", "AutoAttack")) if n[key])


def clean_and_pgd(model, x, y, eps: float, params: Params) -> tuple[dict, dict]:
    """Flags of the clean images and of each PGD-k, and the seconds each took."""
    cfg = params.evaluate
    flags, seconds = {}, {}
    start = time.perf_counter()
    flags["clean"] = robustness.clean_correct(model, x, y, cfg.batch_size)
    seconds["clean"] = time.perf_counter() - start
    for steps in cfg.pgd_steps:
        start = time.perf_counter()
        flags[f"pgd{steps}"] = robustness.pgd_correct(model, x, y, eps, steps, cfg.restarts, cfg.batch_size,
                                                      params.seed)
        seconds[f"pgd{steps}"] = time.perf_counter() - start
    return flags, seconds


def apgd_and_autoattack(model, x, y, eps: float, params: Params, n_att: dict[str, int], flags: dict, out: dict,
                        seconds: dict) -> dict:
    """Run APGD, then AutoAttack, each on its first images (none: skipped); add their flags, metrics and seconds to
    `flags`, `out` and `seconds`; return their pyautoattack results."""
    cfg, results = params.evaluate, {}
    # AutoAttack continues from APGD's blocks over its images when APGD covers them (the same calls, not run twice)
    after_apgd = 0 < n_att["aa"] <= n_att["apgd"]
    attack_runs = {
        "apgd": lambda n: robustness.run_apgd(model, x[:n], y[:n], eps, params.seed, cfg.batch_size,
                                              boundary=n_att["aa"] if after_apgd else 0),
        "aa": lambda n: (robustness.autoattack_after_apgd(model, x[:n], y[:n], eps, params.seed, cfg.batch_size,
                                                          results["apgd"]) if after_apgd else
                         robustness.run_autoattack(model, x[:n], y[:n], eps, params.seed, cfg.batch_size)),
    }
    for name, attack_run in attack_runs.items():
        n = n_att[name]
        if not n:
            continue
        start = time.perf_counter()
        result = attack_run(n)
        seconds[name] = time.perf_counter() - start  # wall clock; the per-attack seconds are summed over blocks
        # AutoAttack's per-attack seconds keep their plain names (seconds.square); APGD's are seconds.apgd.<attack>
        seconds.update({(a if name == "aa" else f"{name}.{a}"): v for a, v in result.seconds.items()})
        flags[name] = result.robust
        out.update(accuracy_metrics(f"{name}.clean_acc", result.clean, n))
        for attack, count in result.robust_after.items():
            out.update(accuracy_metrics(f"{name}.{attack}_acc", count, n))
        out[f"{name}.warnings"] = result.warnings
        results[name] = result
    return results


def check_and_worst_cases(flags: dict, out: dict, results: dict, n_att: dict[str, int], pgd_steps) -> None:
    """Where APGD or AutoAttack ran: the attack check's metrics into `out`, the `worst` and `pgd_apgd` flags into
    `flags` (`attacked_examples`)."""
    if n := n_att["check"]:
        strong = robustness.worst_case({name: flags[name] for name in results}, n)
        check = attack_check(flags[f"pgd{max(pgd_steps)}"][:n], strong)
        out.update({"check.n": check["n"], "check.pgd_missed": check["pgd_missed"],
                    "check.apgd_missed": check["apgd_missed"], "check.p": float(f"{check['p']:.4g}")})
        every = dict(flags)  # clean, each PGD-k, APGD, AutoAttack
        flags["worst"] = robustness.worst_case(every, n_att["worst"])
        if n := n_att["pgd_apgd"]:
            flags["pgd_apgd"] = robustness.worst_case({k: f for k, f in every.items() if k != "aa"}, n)


def evaluate_model(model, x, y, eps: float, params: Params) -> dict:
    """Flags, flat metrics and pyautoattack results of one model on (x, y): APGD on the first apgd_examples,
    AutoAttack on the first aa_examples, the attack check on the first max of the two, the worst cases
    (`attacked_examples`)."""
    n_att = attacked_examples(params.evaluate)
    flags, seconds = clean_and_pgd(model, x, y, eps, params)
    out: dict = {}
    results = apgd_and_autoattack(model, x, y, eps, params, n_att, flags, out, seconds)
    check_and_worst_cases(flags, out, results, n_att, params.evaluate.pgd_steps)
    for name, f in flags.items():
        out.update(accuracy_metrics(f"{name}_acc", int(f.sum()), len(f)))
    out.update({f"seconds.{k}": round(v, 1) for k, v in seconds.items()})
    return {"flags": flags, "metrics": out, "results": results}


def load_checkpoints(params: Params, rc: RunCfg, run_name: str, variant: str, data_meta: dict) -> dict[str, tuple]:
    """{checkpoint: (model, meta)} of the run `rc`, every one checked against its model and the prepared data before
    any attack runs."""
    expect = {**checkpoint.model_id(rc.model), "run": run_name, "variant": variant,
              **{k: data_meta[k] for k in ("dataset", "num_classes", "channels", "size")}}
    return {ck: checkpoint.load(path, expect) for ck, path in checkpoint_paths(params, run_name, variant).items()}


def file_heads(params: Params, rc: RunCfg, run_name: str, variant: str, data_meta: dict) -> tuple[dict, dict]:
    """The leading keys of the metrics and of the flag file: what is evaluated, on which images, at which eps."""
    cfg, n_att = params.evaluate, attacked_examples(params.evaluate)
    n, eps = cfg.n_examples, rc.train.eps
    metrics = {"run": run_name, "variant": variant, "method": rc.train.method, "eps": eps, "n_examples": n,
               "apgd_examples": n_att["apgd"], "aa_examples": n_att["aa"], "worst_examples": n_att["worst"],
               "pgd_apgd_examples": n_att["pgd_apgd"], "restarts": cfg.restarts}
    flag_file = {"format": FLAGS_FORMAT, "run": run_name, "variant": variant, "split": "test",
                 "test_sha256": data_meta["files"]["test"], "n": n, "apgd_n": n_att["apgd"], "aa_n": n_att["aa"],
                 "worst_n": n_att["worst"], "pgd_apgd_n": n_att["pgd_apgd"], "eps": eps}
    return metrics, flag_file


def first_with_weights(loaded: dict[str, tuple]) -> dict[str, str]:
    """{sha256: the first checkpoint with those weights}: best is often the last epoch, with the same numbers."""
    first: dict[str, str] = {}
    for ck, (_, meta) in loaded.items():
        first.setdefault(meta["sha256"], ck)
    return first


def evaluate_checkpoint(where: str, ck: str, model, meta: dict, x: Tensor, y: Tensor, eps: float,
                        params: Params, device) -> dict:
    """`evaluate_model` of one checkpoint, its tensors moved to the CPU (`distributed.map_units` gathers them)."""
    n_att = attacked_examples(params.evaluate)
    log(f"{where}: {ck} (epoch {meta.get('epoch')}), {params.evaluate.n_examples} test images "
        f"({n_att['apgd']} with APGD, {n_att['aa']} with AutoAttack), eps {eps:g}")
    result = evaluate_model(model.to(device).eval(), x, y, eps, params)
    return {**result, "flags": {name: f.cpu() for name, f in result["flags"].items()},
            "results": {name: replace(r, robust=r.robust.cpu()) for name, r in result["results"].items()}}


def attack_logs(evaluated: dict[str, dict], cfg) -> tuple[list[str], dict]:
    """pyautoattack's log lines of every evaluated checkpoint under a title each, and the attacks' settings read
    back after the runs (`apgd.*`, `aa.*`)."""
    n_att = attacked_examples(cfg)
    titles = {"apgd": f"APGD-CE + APGD-T, first {n_att['apgd']} images",
              "aa": f"standard AutoAttack, first {n_att['aa']} images"}
    logs, settings = [], {}
    for ck, result in evaluated.items():
        for name, attacked in result["results"].items():
            logs += [f"== {ck}: {titles[name]}", *attacked.log]
            settings.update({f"{name}.{k}": ",".join(v) if isinstance(v, list) else v
                             for k, v in attacked.settings.items()})
    return logs, settings


def report_checkpoint(where: str, ck: str, m: dict, cfg, attack_log: Path) -> None:
    """Log one checkpoint's accuracies, pyautoattack's warnings and a failed attack check."""
    log(f"{where}: {ck} clean {m['clean_acc']:.4f} "
        + " ".join(f"pgd{s} {m[f'pgd{s}_acc']:.4f}" for s in cfg.pgd_steps)
        + "".join(f" {name} {m[f'{name}_acc']:.4f} ({m[f'seconds.{name}']:.0f}s)" for name in ("apgd", "aa")
                  if f"{name}_acc" in m)
        + (f" worst {m['worst_acc']:.4f}" if "worst_acc" in m else ""))
    for name, title in (("apgd", "APGD"), ("aa", "AutoAttack")):
        if m.get(f"{name}.warnings"):
            log(f"{where}: warning: {ck}: {title} raised {m[f'{name}.warnings']} warning(s), see {attack_log}")
    if m.get("check.p", 1.0) < CHECK_ALPHA:
        log(f"{where}: warning: {ck}: PGD missed {m['check.pgd_missed']} images that "
            f"{strong_attacks(cfg)} broke (p = {m['check.p']:.2g}): report worst_acc")


def run(params: Params, run_name: str, variant: str) -> None:
    cfg, where = params.evaluate, f"evaluate {run_name}/{variant}"
    rc = params.variant_run(run_name, variant)
    device = setup(params)
    splits, data_meta = load_prepared()
    check_test_subset("evaluate.n_examples", cfg.n_examples, data_meta["counts"])
    test = splits["test"]
    loaded = load_checkpoints(params, rc, run_name, variant, data_meta)
    x, y = to_float(test.x[:cfg.n_examples], device), test.y[:cfg.n_examples].to(device)
    metrics, flag_file = file_heads(params, rc, run_name, variant, data_meta)
    first = first_with_weights(loaded)
    # one checkpoint per rank when there are enough of them (distributed.map_units); the same numbers on 1 or N
    evaluated = distributed.map_units(
        lambda ck: evaluate_checkpoint(where, ck, *loaded[ck], x, y, rc.train.eps, params, device),
        list(first.values()))
    logs, settings = attack_logs(evaluated, cfg)
    metrics.update(settings)
    for ck, (_, meta) in loaded.items():
        if first[meta["sha256"]] != ck:
            log(f"{where}: {ck} has the same weights as {first[meta['sha256']]}; reusing")
        result = evaluated[first[meta["sha256"]]]
        metrics.update({f"{ck}.{k}": v for k, v in result["metrics"].items()})
        metrics[f"{ck}.epoch"] = meta.get("epoch")
        flag_file.update({f"{ck}.{name}": flag_string(f) for name, f in result["flags"].items()})
        flag_file[f"{ck}.epoch"] = meta.get("epoch")
        report_checkpoint(where, ck, result["metrics"], cfg, OUT / f"{run_name}.{variant}.autoattack.log")
    if distributed.context().main:
        write_text(OUT / f"{run_name}.{variant}.autoattack.log", "\n".join(logs) + "\n")
        write_json(OUT / f"{run_name}.{variant}.flags.json", flag_file)
        write_json(OUT / f"{run_name}.{variant}.json", metrics)
