"""Stage `train <run> <variant>`: train one run without (base) or with (der) DER, resumable per epoch.

Writes models/<variant>/<run>/{best,last}.pt (+ JSON sidecars) and state.pt (resume point),
plots/history/<run>.<variant>.tsv and metrics/train/<run>.<variant>.json.

Crash safety. state.pt is the commit record: after every epoch rank 0 writes it first (atomically, with a checksum
of its own), holding the model, the optimiser, the history, the best epoch and the sha256 of each checkpoint file
the folder must hold; only then last.pt/last.json (and best.pt/best.json when the epoch is the best), then the
history. A kill at any moment leaves a whole state.pt (the new one or the one before) and checkpoint files that
match it or are being replaced after it; resume checks each against the recorded sha256 and rewrites a stale or
half-written one from the state (the last pair, and the best pair when the saved epoch is the best; an earlier best
pair was complete before a later state was committed). Files the state does not list, stray temporary files
included, are removed, so the DVC output holds exactly what the state says. A corrupt state.pt restarts the run
from scratch with one line saying so.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

from .. import checkpoint, distributed, imports
from ..artifacts import digest, load_sealed, remove_temporaries, save_sealed, sha256, write_bytes, write_json, write_text
from ..data import load_prepared
from ..errors import UserError
from ..params import Params, as_dict
from ..runtime import log, setup
from ..train import HISTORY_COLUMNS, fit, summarize

STATE = "state.pt"


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


def _epoch_files(model_state: dict, tag: dict, is_best: bool) -> dict[str, bytes]:
    """The checkpoint files one epoch writes: the last pair, and the best pair (the same bytes) when it is the best."""
    weights, sidecar = checkpoint.encode(model_state, _json_safe(tag))
    return {f"{name}{ext}": data for name in (("last", "best") if is_best else ("last",))
            for ext, data in ((".pt", weights), (".json", sidecar))}


def _restore(out: Path, config_hash: str, tag_of, label: str) -> dict | None:
    """Rank 0, before training: the saved state, with the run folder made to hold exactly the files it lists
    (rewriting those an interrupted epoch left stale or half-written); None if there is nothing to resume."""
    if not (out / STATE).is_file():
        return None
    try:
        state = load_sealed(out / STATE)
    except UserError as exc:
        log(f"train {label}: {exc}; starting the run afresh")
        return None
    if state["config_hash"] != config_hash:
        log(f"train {label}: params or code changed since the saved state; starting afresh")
        return None
    rewritable = _epoch_files(state["model"], tag_of(state["history"][-1]), state["best_epoch"] == state["epoch"])
    rewritten = []
    for name, want in state["files"].items():
        path = out / name
        if path.is_file() and sha256(path) == want:
            continue
        if name not in rewritable:  # an earlier epoch's best pair, complete before this state was committed
            log(f"train {label}: {path} differs from the saved state (changed outside this stage); starting afresh")
            return None
        write_bytes(path, rewritable[name])
        state["files"][name] = digest(rewritable[name])
        rewritten.append(name)
    for extra in out.iterdir():  # stray temporary files of killed writes (or anything else put there)
        if extra.name not in state["files"] and extra.name != STATE:
            if extra.is_dir():
                shutil.rmtree(extra)
            else:
                extra.unlink()
    if rewritten:
        log(f"train {label}: rewrote {', '.join(rewritten)} from the saved state (an epoch's writes were cut short)")
    return state


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

    meta = {
        **checkpoint.model_meta(rc.model, data_meta), "run": run_name, "variant": variant,
        "method": rc.train.method, "eps": rc.train.eps, "config_hash": config_hash,
        "der": as_dict(rc.der) if use_der else None, "augmentation": augmentation,
    }

    def tag_of(row: dict) -> dict:
        return {**meta, "epoch": row["epoch"], "val_clean_acc": row["val_clean_acc"],
                "val_pgd_acc": row["val_pgd_acc"], "der_on": bool(row["der_on"])}

    label = f"{run_name}/{variant}"
    resume = None
    if main:
        for path in (history_path, metrics_path):
            remove_temporaries(path)
        resume = _restore(out, config_hash, tag_of, label)
        if resume is None and out.exists():
            shutil.rmtree(out)
    distributed.barrier()  # the other ranks read the state only once rank 0 has checked (or cleared) the folder
    if not main and (out / STATE).is_file():
        resume = load_sealed(out / STATE)
    if resume is not None:
        log(f"train {label}: resuming after epoch {resume['epoch']}/{rc.train.epochs}")
    # what the next state.pt records beside the weights: the checkpoint files' sha256 and the best epoch so far
    saved = {"files": dict(resume["files"]) if resume else {}, "best_epoch": resume["best_epoch"] if resume else None}
    model = checkpoint.new_model(meta)

    def on_epoch_end(s: dict) -> None:
        if not main:
            return
        row = s["row"]
        files = _epoch_files(s["model"], tag_of(row), s["is_best"])
        saved["files"].update({name: digest(data) for name, data in files.items()})
        if s["is_best"]:
            saved["best_epoch"] = row["epoch"]
        # the commit point: everything below is rewritten from this state if a kill cuts it short
        state = {k: s[k] for k in ("epoch", "history", "model", "optimizer")}
        save_sealed(out / STATE, {"config_hash": config_hash, **state, **saved})
        for name, data in files.items():
            write_bytes(out / name, data)
        write_text(history_path, history_tsv(s["history"]))
        log(f"train {label} epoch {row['epoch']}/{rc.train.epochs}: "
            f"val clean {row['val_clean_acc']:.3f} pgd {row['val_pgd_acc']:.3f} "
            f"aae {row['aae_frac']:.3f} dE(x) {row['dE_x']:.3f} ({row['seconds']:.0f}s)")

    history = fit(model, splits["train"], splits["val"], rc, use_der, device, params.seed, resume, on_epoch_end,
                  augmentation=augmentation, cuda_graphs=params.cuda_graphs)
    if not main:
        return
    summary = summarize(history, data_meta["num_classes"], rc.train.co_drop, adversarial=rc.train.method != "standard",
                        der=use_der)
    write_text(history_path, history_tsv(history))
    write_json(metrics_path, _json_safe({"run": run_name, "variant": variant, "method": rc.train.method,
                                         "eps": rc.train.eps, **summary}))
    log(f"train {label}: done; best epoch {summary['best_epoch']} "
        f"(val pgd {summary['best_val_pgd_acc']}), CO {summary['catastrophic_overfitting']}")
