"""Stage `train <run> <variant>`: train one run without (base) or with (der) DER, resumable per epoch.

Writes models/<variant>/<run>/{best,last}.pt (+ JSON sidecars) and state.pt (resume point),
plots/history/<run>.<variant>.tsv and metrics/train/<run>.<variant>.json.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

from .. import checkpoint, distributed, imports
from ..artifacts import load_torch, save_torch, write_json, write_text
from ..data import load_prepared
from ..params import Params, as_dict
from ..runtime import log, setup
from ..train import HISTORY_COLUMNS, fit, summarize


def history_tsv(history: list[dict]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return "" if math.isnan(v) else f"{v:.6g}"
        return str(v)

    lines = ["\t".join(HISTORY_COLUMNS)]
    lines += ["\t".join(fmt(r[c]) for c in HISTORY_COLUMNS) for r in history]
    return "\n".join(lines) + "\n"


def _json_safe(d: dict) -> dict:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


def _code_digest() -> str:
    """A saved state is resumed only by the code that wrote it: the same params under changed training code
    restart. The files are this stage's import closure, the same set dvc.yaml lists as its deps."""
    return hashlib.sha256(b"".join(p.read_bytes() for p in imports.stage_closure("train"))).hexdigest()[:16]


def run(params: Params, run_name: str, variant: str) -> None:
    rc = params.variant_run(run_name, variant)
    device = setup(params)
    main = distributed.context().main
    splits, data_meta = load_prepared()
    params.check_data(data_meta["counts"])
    augmentation = params.data.augmentation()

    use_der = variant == "der"
    config = {
        "seed": params.seed, "model": as_dict(rc.model), "train": as_dict(rc.train),
        "der": as_dict(rc.der) if use_der else None, "data": data_meta["files"], "device": device.type,
        "augmentation": augmentation, "code": _code_digest(),
    }
    config_hash = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    out = Path("models") / variant / run_name
    history_path = Path("plots/history") / f"{run_name}.{variant}.tsv"
    metrics_path = Path("metrics/train") / f"{run_name}.{variant}.json"

    resume = None
    state_path = out / "state.pt"
    if state_path.is_file():
        state = load_torch(state_path)
        if state.get("config_hash") == config_hash:
            resume = state
            log(f"train {run_name}/{variant}: resuming after epoch {state['epoch']}/{rc.train.epochs}")
        else:
            log(f"train {run_name}/{variant}: params changed since the saved state; starting afresh")
    if resume is None and out.exists() and main:
        shutil.rmtree(out)
    distributed.barrier()  # no rank reads or writes the run's folder before rank 0 has cleared it

    meta = {
        **checkpoint.model_meta(rc.model, data_meta), "run": run_name, "variant": variant,
        "method": rc.train.method, "eps": rc.train.eps, "config_hash": config_hash,
        "der": as_dict(rc.der) if use_der else None, "augmentation": augmentation,
    }
    model = checkpoint.new_model(meta)

    def on_epoch_end(s: dict) -> None:
        if not main:
            return
        row = s["row"]
        tag = {**meta, "epoch": row["epoch"], "val_clean_acc": row["val_clean_acc"], "val_pgd_acc": row["val_pgd_acc"],
               "der_on": bool(row["der_on"])}
        checkpoint.save(out / "last.pt", s["model"], _json_safe(tag))
        if s["is_best"]:
            checkpoint.save(out / "best.pt", s["model"], _json_safe(tag))
        save_torch(state_path, {"config_hash": config_hash, **{k: s[k] for k in ("epoch", "history", "model", "optimizer")}})
        write_text(history_path, history_tsv(s["history"]))
        log(f"train {run_name}/{variant} epoch {row['epoch']}/{rc.train.epochs}: "
            f"val clean {row['val_clean_acc']:.3f} pgd {row['val_pgd_acc']:.3f} "
            f"aae {row['aae_frac']:.3f} dE(x) {row['dE_x']:.3f} ({row['seconds']:.0f}s)")

    history = fit(model, splits["train"], splits["val"], rc, use_der, device, params.seed, resume, on_epoch_end,
                  augmentation=augmentation)
    if not main:
        return
    summary = summarize(history, data_meta["num_classes"], rc.train.co_drop, adversarial=rc.train.method != "standard",
                        der=use_der)
    write_text(history_path, history_tsv(history))
    write_json(metrics_path, _json_safe({"run": run_name, "variant": variant, "method": rc.train.method,
                                         "eps": rc.train.eps, **summary}))
    log(f"train {run_name}/{variant}: done; best epoch {summary['best_epoch']} "
        f"(val pgd {summary['best_val_pgd_acc']}), CO {summary['catastrophic_overfitting']}")
