"""Stage `train <run> <variant>`: train one run without (base) or with (der) DER, resumable per epoch.

Writes models/<variant>/<run>/{best,last}.pt (+ JSON sidecars), plots/history/<run>.<variant>.tsv and
metrics/train/<run>.<variant>.json: the DVC outputs. The run state lives outside them, in the git-ignored
.energyat/: the crash-safe resume state of each run (runstate/resume.py says what a kill leaves and how resume
repairs it) and the base run's snapshot that a late-DER run starts from (runstate/fork.py).
"""
from __future__ import annotations

import math
from pathlib import Path

from ..infra import distributed, imports
from ..infra.artifacts import write_json, write_text
from ..infra.runtime import log, setup
from ..params import Params, as_dict
from ..runstate import checkpoint, fork, resume
from ..runstate.resume import json_safe
from ..science.data import load_prepared
from ..science.overfitting import summarize
from ..science.training import HISTORY_COLUMNS, fit


def history_tsv(history: list[dict]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return "" if math.isnan(v) else f"{v:.6g}"
        return str(v)

    lines = ["\t".join(HISTORY_COLUMNS)]
    lines += ["\t".join(fmt(r[c]) for c in HISTORY_COLUMNS) for r in history]
    return "\n".join(lines) + "\n"


def _fmt(v: float) -> str:
    return "–" if math.isnan(v) else f"{v:.3f}"


def _eta(history: list[dict], rc) -> str:
    """Time left at the pace of the last five epochs."""
    timed = [r["seconds"] for r in history if r["seconds"] > 0][-5:]
    left = (rc.train.epochs - history[-1]["epoch"]) * (sum(timed) / len(timed) if timed else 0.0)
    return f"{int(left // 60)}m{int(left % 60):02d}s"


def _epoch_line(label: str, s: dict, rc) -> str:
    row = s["row"]
    return (f"train {label} epoch {row['epoch']}/{rc.train.epochs}: "
            f"val clean {row['val_clean_acc']:.3f} pgd {row['val_pgd_acc']:.3f} "
            f"aae {_fmt(row['aae_frac'])} dE(x) {_fmt(row['dE_x'])} "
            f"({row['seconds']:.0f}s, eta {_eta(s['history'], rc)})")


def run(params: Params, run_name: str, variant: str) -> None:
    rc, use_der, label = params.variant_run(run_name, variant), variant == "der", f"{run_name}/{variant}"
    device = setup(params)
    main = distributed.context().main
    splits, data_meta = load_prepared()
    params.check_data(data_meta["counts"])
    augmentation = params.data.augmentation()
    # a saved state is resumed only by the code that wrote it: the stage's import closure, its dvc.yaml deps
    key = resume.run_key(params, rc, variant, data_meta, device, augmentation,
                         code=imports.code_digest(imports.stage_closure("stages.train")))
    meta = {**checkpoint.model_meta(rc.model, data_meta), "run": run_name, "variant": variant,
            "method": rc.train.method, "eps": rc.train.eps, "config_hash": key.config_hash,
            "der": as_dict(rc.der) if use_der else None, "augmentation": augmentation}
    history_path = Path("plots/history") / f"{run_name}.{variant}.tsv"
    metrics_path = Path("metrics/train") / f"{run_name}.{variant}.json"
    state, snapshot = resume.RunState(variant, run_name, key, meta, label), fork.Snapshot(rc, run_name, key, label)
    start = state.open(rc.train.epochs, (history_path, metrics_path), snapshot.start if use_der else None)
    if main and not use_der:
        snapshot.prepare(start)

    def on_epoch_end(s: dict) -> None:
        if not main:
            return
        state.commit(s)
        write_text(history_path, history_tsv(s["history"]))
        if not use_der:
            snapshot.take(s)
        log(_epoch_line(label, s, rc))

    history = fit(checkpoint.new_model(meta), splits["train"], splits["val"], rc, use_der, device, params.seed, start,
                  on_epoch_end, augmentation=augmentation, cuda_graphs=params.cuda_graphs)
    if not main:
        return
    summary = summarize(history, data_meta["num_classes"], rc.train.co_drop, adversarial=rc.train.method != "standard",
                        der=use_der)
    write_text(history_path, history_tsv(history))
    write_json(metrics_path, json_safe({"run": run_name, "variant": variant, "method": rc.train.method,
                                        "eps": rc.train.eps, **summary}))
    log(f"train {label}: done; best epoch {summary['best_epoch']} "
        f"(val pgd {summary['best_val_pgd_acc']:.3f}), CO {summary['catastrophic_overfitting']}")
