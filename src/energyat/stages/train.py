"""Stage `train <run> <variant>`: train one run without (base) or with (der) DER, resumable per epoch.

Writes models/<variant>/<run>/{best,last}.pt (+ JSON sidecars), plots/history/<run>.<variant>.tsv and
metrics/train/<run>.<variant>.json: the DVC outputs. The resume point, .energyat/state/<variant>/<run>/state.pt,
lives outside them (git-ignored, not a DVC output), so that no output is `persist` and DVC's run-cache works for
the stage: DVC deletes a stage's outputs before it runs it, and the state survives that.

Crash safety. state.pt is the commit record: after every epoch rank 0 writes it first (atomically, with a checksum
of its own), holding the model, the optimiser, the history, the best epoch, the sha256 of each checkpoint file
the run folder must hold, and the bytes of the best pair when it is an earlier epoch's; only then last.pt/last.json
(and best.pt/best.json when the epoch is the best), then the history. A kill at any moment leaves a whole state.pt
(the new one or the one before) and checkpoint files that match it or are being replaced after it; resume checks
each against the recorded sha256 and rewrites a stale, half-written, changed or missing one from the state (the
last pair from its model; the best pair from its model when the saved epoch is the best, else from the bytes the
state holds): a run folder that DVC removed is rewritten whole. Files the state does not list, stray temporary
files included, are removed, so the DVC output holds exactly what the state says. A corrupt state.pt, or one of
other params or code, restarts the run from scratch with one line saying so, and is deleted first (no rank resumes
from it).

The DER fork. A multi-step base run also saves its state after epoch s - 1 (s: DER's first epoch) under
.energyat/fork/, named by a hash of everything that shapes those epochs; a der run with no usable state of its own
commits that snapshot as its state.pt and trains only the DER epochs (the same bytes as training it from scratch).
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

from ..errors import UserError
from ..infra import distributed, imports
from ..infra.artifacts import (
    digest,
    load_sealed,
    remove_temporaries,
    save_sealed,
    sha256,
    write_bytes,
    write_json,
    write_text,
)
from ..infra.runtime import log, setup
from ..params import MULTI_STEP, Params, RunCfg, as_dict
from ..runstate import checkpoint
from ..science.data import load_prepared
from ..science.overfitting import summarize
from ..science.training import HISTORY_COLUMNS, fit

STATE = "state.pt"
STATE_DIR = Path(".energyat/state")  # git-ignored, outside every DVC output: <variant>/<run>/state.pt
FORK_DIR = Path(".energyat/fork")  # git-ignored cache of pre-DER states (see the module docstring)


def state_path(variant: str, run_name: str) -> Path:
    """The resume state of one run (see the module docstring)."""
    return STATE_DIR / variant / run_name / STATE


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


def _json_safe(d: dict) -> dict:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


def _code_digest() -> str:
    """A saved state is resumed only by the code that wrote it: the same params under changed training code
    restart. The files are this stage's import closure, the same set dvc.yaml lists as its deps."""
    return hashlib.sha256(b"".join(p.read_bytes() for p in imports.stage_closure("stages.train"))).hexdigest()[:16]


def _hash(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def fork_epoch(rc: RunCfg) -> int | None:
    """The epoch after which the base run's state is where the der run's DER epochs begin: s - 1 for a multi-step
    run with DER starting at s > 1; None when the two variants share no epoch (single-step DER acts from epoch 1)."""
    if rc.train.method not in MULTI_STEP:
        return None
    s = rc.der.first_epoch(rc.train.epochs)
    return s - 1 if s > 1 else None


def _fork_path(rc: RunCfg, common: dict) -> Path | None:
    """The snapshot file of this run's pre-DER prefix. Of the DER params the key holds only the start and gamma:
    gamma sets the `der` diagnostic column that every epoch logs, DER on or not; the others act from epoch s on."""
    at = fork_epoch(rc)
    if at is None:
        return None
    return FORK_DIR / f"{_hash({**common, 'der': {'first_epoch': at + 1, 'gamma': rc.der.gamma}})}.pt"


def _fork(state_file: Path, path: Path, epoch: int, config_hash: str, label: str) -> dict | None:
    """Rank 0, a der run with no state of its own: the base run's snapshot committed as this run's state.pt (so
    that every rank resumes from the same file, as from its own state); None when there is no usable snapshot."""
    if not path.is_file():
        return None
    try:  # the key names the code and the epoch too: a sealed file under it is a snapshot of this prefix
        snap = load_sealed(path)
    except UserError as exc:
        log(f"train {label}: {exc}; ignoring the fork snapshot, training from scratch")
        return None
    # no checkpoint files yet: before DER's start a der run has no best pair, and epoch s writes the last pair
    state = {"config_hash": config_hash, **{k: snap[k] for k in ("epoch", "history", "model", "optimizer")},
             "files": {}, "best_epoch": None, "best_files": {}}
    save_sealed(state_file, state)
    log(f"train {label}: starting from the base run's state after epoch {epoch} (fork)")
    return state


def _epoch_files(model_state: dict, tag: dict, is_best: bool) -> dict[str, bytes]:
    """The checkpoint files one epoch writes: the last pair, and the best pair (the same bytes) when it is the best."""
    weights, sidecar = checkpoint.encode(model_state, _json_safe(tag))
    return {f"{name}{ext}": data for name in (("last", "best") if is_best else ("last",))
            for ext, data in ((".pt", weights), (".json", sidecar))}


BEST = ("best.pt", "best.json")


def _restore(out: Path, state_file: Path, config_hash: str, tag_of, label: str) -> dict | None:
    """Rank 0, before training: the saved state, with the run folder made to hold exactly the files it lists
    (rewriting those an interrupted epoch left stale or half-written, or all of them when DVC removed the folder);
    None if there is nothing to resume. The returned state's "best_files" holds the best pair's bytes."""
    if not state_file.is_file():
        return None
    try:
        state = load_sealed(state_file)
    except UserError as exc:
        log(f"train {label}: {exc}; starting the run afresh")
        return None
    if state["config_hash"] != config_hash:
        log(f"train {label}: params or code changed since the saved state; starting afresh")
        return None
    rewritable = _epoch_files(state["model"], tag_of(state["history"][-1]), state["best_epoch"] == state["epoch"])
    own = set(rewritable)  # the files the saved epoch wrote
    rewritable.update(state.get("best_files") or {})  # an earlier epoch's best pair, kept in the state
    present = [name for name in state["files"] if (out / name).is_file()]
    rewritten = []
    for name, want in state["files"].items():
        path = out / name
        if name in present and sha256(path) == want:
            continue
        if name not in rewritable:  # (a state without the bytes of its earlier best pair)
            log(f"train {label}: {path} differs from the saved state (changed outside this stage); starting afresh")
            return None
        write_bytes(path, rewritable[name])
        state["files"][name] = digest(rewritable[name])
        rewritten.append(name)
    if out.is_dir():
        for extra in out.iterdir():  # stray temporary files of killed writes (or anything else put there)
            if extra.name not in state["files"]:
                if extra.is_dir():
                    shutil.rmtree(extra)
                else:
                    extra.unlink()
    if not present:
        notes = {"the run folder held none of them: DVC removes a stage's outputs before it runs the stage": rewritten}
    else:
        notes = {"an epoch's writes were cut short": [name for name in rewritten if name in own],
                 "changed outside this stage": [name for name in rewritten if name not in own]}
    for why, names in notes.items():
        if names:
            log(f"train {label}: rewrote {', '.join(sorted(names))} from the saved state ({why})")
    state["best_files"] = {name: rewritable[name] for name in BEST if name in state["files"]}
    return state


def run(params: Params, run_name: str, variant: str) -> None:
    rc = params.variant_run(run_name, variant)
    device = setup(params)
    main = distributed.context().main
    splits, data_meta = load_prepared()
    params.check_data(data_meta["counts"])
    augmentation = params.data.augmentation()

    use_der = variant == "der"
    common = {
        "seed": params.seed, "model": as_dict(rc.model), "train": as_dict(rc.train), "data": data_meta["files"],
        "device": device.type, "augmentation": augmentation, "code": _code_digest(),
    }
    config_hash = _hash({**common, "der": as_dict(rc.der) if use_der else None})
    fork_at, fork_path = fork_epoch(rc), _fork_path(rc, common)
    out = Path("models") / variant / run_name
    state_file = state_path(variant, run_name)
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
    resume = forked = None
    if main:
        for path in (history_path, metrics_path, state_file):
            remove_temporaries(path)
        resume = _restore(out, state_file, config_hash, tag_of, label)
        if resume is None:  # a stale or corrupt state goes first: no rank may resume from it
            state_file.unlink(missing_ok=True)
            if out.exists():
                shutil.rmtree(out)
        if resume is None and use_der and fork_path is not None:
            resume = forked = _fork(state_file, fork_path, fork_at, config_hash, label)
    distributed.barrier()  # the other ranks read the state only once rank 0 has checked (or cleared) it
    if not main and state_file.is_file():
        resume = load_sealed(state_file)
    if resume is not None and forked is None:
        log(f"train {label}: resuming after epoch {resume['epoch']}/{rc.train.epochs}")
    # what the next state.pt records beside the weights: the checkpoint files' sha256 and the best epoch so far
    saved = {"files": dict(resume["files"]) if resume else {}, "best_epoch": resume["best_epoch"] if resume else None}
    best_files = dict(resume.get("best_files") or {}) if resume else {}  # the best pair's bytes (rank 0)
    model = checkpoint.new_model(meta)

    def on_epoch_end(s: dict) -> None:
        if not main:
            return
        row = s["row"]
        files = _epoch_files(s["model"], tag_of(row), s["is_best"])
        saved["files"].update({name: digest(data) for name, data in files.items()})
        if s["is_best"]:
            saved["best_epoch"] = row["epoch"]
            best_files.clear()
            best_files.update({name: files[name] for name in BEST})
        # the commit point: everything below is rewritten from this state if a kill cuts it short (or DVC removes
        # the run folder); it holds the best pair's bytes only when they are not this epoch's model
        state = {k: s[k] for k in ("epoch", "history", "model", "optimizer")}
        save_sealed(state_file, {"config_hash": config_hash, **state, **saved,
                                 "best_files": {} if s["is_best"] else best_files})
        for name, data in files.items():
            write_bytes(out / name, data)
        write_text(history_path, history_tsv(s["history"]))
        if not use_der and row["epoch"] == fork_at:
            try:  # a cache: failing to fill it must not fail the run
                save_sealed(fork_path, {"epoch": row["epoch"], **{k: s[k] for k in ("history", "model", "optimizer")}})
            except UserError as exc:
                log(f"train {label}: no fork snapshot for the der run ({exc})")
        log(f"train {label} epoch {row['epoch']}/{rc.train.epochs}: "
            f"val clean {row['val_clean_acc']:.3f} pgd {row['val_pgd_acc']:.3f} "
            f"aae {_fmt(row['aae_frac'])} dE(x) {_fmt(row['dE_x'])} ({row['seconds']:.0f}s, eta {_eta(s['history'], rc)})")

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
        f"(val pgd {summary['best_val_pgd_acc']:.3f}), CO {summary['catastrophic_overfitting']}")
