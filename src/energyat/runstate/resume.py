"""The resume state of a training run: `.energyat/state/<variant>/<run>/state.pt`, resumable per epoch.

The train stage's DVC outputs are models/<variant>/<run>/{best,last}.pt (+ JSON sidecars), the history TSV and the
train metrics. The resume point lives outside them (git-ignored, not a DVC output), so that no output is `persist`
and DVC's run-cache works for the stage: DVC deletes a stage's outputs before it runs it, and the state survives that.

Crash safety. state.pt is the commit record: after every epoch rank 0 writes it first (atomically, with a checksum
of its own), holding the model, the optimiser, the history, the best epoch, the sha256 of each checkpoint file
the run folder must hold, and the bytes of the best pair when it is an earlier epoch's; only then last.pt/last.json
(and best.pt/best.json when the epoch is the best), then the stage writes the history. A kill at any moment leaves a
whole state.pt (the new one or the one before) and checkpoint files that match it or are being replaced after it;
resume checks each against the recorded sha256 and rewrites a stale, half-written, changed or missing one from the
state (the last pair from its model; the best pair from its model when the saved epoch is the best, else from the
bytes the state holds): a run folder that DVC removed is rewritten whole. Files the state does not list, stray
temporary files included, are removed, so the DVC output holds exactly what the state says.

The key. A state is resumed only under the same `RunKey`: the config (params, data, code: what shapes the numbers;
its hash is the checkpoint sidecars' `config_hash`) and the execution (ranks, threads, CUDA graphs, torch version,
device model: what the same config's numbers still depend on, e.g. CPU BatchNorm normalises per rank). A corrupt
state.pt, or one of other params or code, or of another execution, restarts the run from scratch with one line
saying so (the execution line names the fields that changed), and is deleted first (no rank resumes from it).
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import UserError
from ..infra import distributed
from ..infra.artifacts import digest, load_sealed, remove_temporaries, save_sealed, sha256, write_bytes
from ..infra.runtime import cpu_name, log
from ..params import Params, RunCfg, as_dict
from . import checkpoint

STATE = "state.pt"
STATE_DIR = Path(".energyat/state")  # git-ignored, outside every DVC output: <variant>/<run>/state.pt
BEST = ("best.pt", "best.json")
EXECUTION = ("world", "threads", "cuda_graphs", "torch", "device_model")


def state_path(variant: str, run_name: str) -> Path:
    """The resume state of one run (see the module docstring)."""
    return STATE_DIR / variant / run_name / STATE


def key_hash(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def json_safe(d: dict) -> dict:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


def device_model(device: torch.device) -> str:
    """This process's accelerator, or on the CPU its model name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


@dataclass(frozen=True)
class RunKey:
    """What a saved state (and a fork snapshot) must match: `common` shapes every epoch of both variants (seed,
    model, train, data, device type, augmentation, code), `der` the DER params this variant's numbers depend on,
    `execution` where and how it runs (the same on every rank: rank 0's view is every rank's)."""
    common: dict
    der: dict | None
    execution: dict

    @property
    def config_hash(self) -> str:
        return key_hash({**self.common, "der": self.der})


def run_key(params: Params, rc: RunCfg, variant: str, data_meta: dict, device: torch.device, augmentation: str,
            code: str) -> RunKey:
    """The key of run `rc` as `variant` (every rank calls it: it gathers the ranks' device models)."""
    common = {"seed": params.seed, "model": as_dict(rc.model), "train": as_dict(rc.train), "data": data_meta["files"],
              "device": device.type, "augmentation": augmentation, "code": code}
    if variant == "der":
        der = as_dict(rc.der)
    elif rc.train.method != "standard":
        # the base run's `der` diagnostic column is DER's per-sample term at gamma, logged every epoch with DER off:
        # gamma shapes its history (and dvc.yaml declares der.gamma for the train stage); a standard run has no
        # adversarial logits, so no such column, and depends on no DER param
        der = {"gamma": rc.der.gamma}
    else:
        der = None
    models = distributed.gather_objects(device_model(device))  # in rank order, the same list on every rank
    execution = {"world": distributed.context().world, "threads": params.threads, "cuda_graphs": params.cuda_graphs,
                 "torch": str(torch.__version__), "device_model": " | ".join(dict.fromkeys(models))}
    return RunKey(common, der, execution)


def epoch_files(model_state: dict, tag: dict, is_best: bool) -> dict[str, bytes]:
    """The checkpoint files one epoch writes: the last pair, and the best pair (the same bytes) when it is the best."""
    weights, sidecar = checkpoint.encode(model_state, json_safe(tag))
    return {f"{name}{ext}": data for name in (("last", "best") if is_best else ("last",))
            for ext, data in ((".pt", weights), (".json", sidecar))}


class RunState:
    """One run's resume state and checkpoint files (rank 0 reads and writes them; see the module docstring).
    `meta`: the checkpoint sidecars' fields besides the epoch's own."""

    def __init__(self, variant: str, run_name: str, key: RunKey, meta: dict, label: str):
        self.file, self.out = state_path(variant, run_name), Path("models") / variant / run_name
        self.key, self.meta, self.label = key, meta, label
        self.files: dict[str, str] = {}  # what the next state.pt records: the checkpoint files' sha256,
        self.best_epoch: int | None = None  # the best epoch so far,
        self.best_files: dict[str, bytes] = {}  # and the best pair's bytes (rank 0)

    def tag(self, row: dict) -> dict:
        return {**self.meta, "epoch": row["epoch"], "val_clean_acc": row["val_clean_acc"],
                "val_pgd_acc": row["val_pgd_acc"], "der_on": bool(row["der_on"])}

    def open(self, epochs: int, temporaries: tuple[Path, ...] = (),
             fallback: Callable[[RunState], dict | None] | None = None) -> dict | None:
        """Every rank, before training: the state to resume from, or None to train from scratch. Rank 0 first
        removes the temporary files of killed writes of `temporaries` and of the state, then restores the run folder
        from the state, or clears both when the state is missing, stale or corrupt and asks `fallback(self)` (a der
        run's fork: it commits a state via `adopt`); the other ranks then read what rank 0 left."""
        main, state, adopted = distributed.context().main, None, False
        if main:
            for path in (*temporaries, self.file):
                remove_temporaries(path)
            state = self._restore()
            if state is None:  # a stale or corrupt state goes first: no rank may resume from it
                self.file.unlink(missing_ok=True)
                if self.out.exists():
                    shutil.rmtree(self.out)
                if fallback is not None:
                    state = fallback(self)
                    adopted = state is not None
        distributed.barrier()  # the other ranks read the state only once rank 0 has checked (or cleared) it
        if not main and self.file.is_file():
            state = load_sealed(self.file)
        if state is not None and not adopted:
            log(f"train {self.label}: resuming after epoch {state['epoch']}/{epochs}")
        if state is not None:
            self.files, self.best_epoch = dict(state["files"]), state["best_epoch"]
            self.best_files = dict(state.get("best_files") or {})
        return state

    def _save(self, record: dict, best_files: dict[str, bytes]) -> dict:
        state = {"config_hash": self.key.config_hash, "execution": self.key.execution, **record,
                 "files": self.files, "best_epoch": self.best_epoch, "best_files": best_files}
        save_sealed(self.file, state)
        return state

    def adopt(self, record: dict) -> dict:
        """Rank 0, no state of its own: commit `record` ({"epoch", "history", "model", "optimizer"}, e.g. the base
        run's fork snapshot) as this run's state, with no checkpoint files yet (before DER's start a der run has no
        best pair, and the next epoch writes the last pair), so that every rank resumes from it as from its own."""
        self.files, self.best_epoch, self.best_files = {}, None, {}
        return self._save({k: record[k] for k in ("epoch", "history", "model", "optimizer")}, {})

    def commit(self, s: dict) -> None:
        """Rank 0, after an epoch (`s`: what `fit` passes to its callback): state.pt, the commit point, then the
        checkpoint files. Everything after the state is rewritten from it if a kill cuts it short (or DVC removes
        the run folder); it holds the best pair's bytes only when they are not this epoch's model."""
        row = s["row"]
        files = epoch_files(s["model"], self.tag(row), s["is_best"])
        self.files.update({name: digest(data) for name, data in files.items()})
        if s["is_best"]:
            self.best_epoch = row["epoch"]
            self.best_files = {name: files[name] for name in BEST}
        self._save({k: s[k] for k in ("epoch", "history", "model", "optimizer")},
                   {} if s["is_best"] else self.best_files)
        for name, data in files.items():
            write_bytes(self.out / name, data)

    def _mismatch(self, state: dict) -> str | None:
        """Why `state` is not this run's to resume (one line's reason), or None."""
        if state.get("config_hash") != self.key.config_hash:
            return "params or code changed since the saved state"
        saved = state.get("execution") or {}
        changed = [f"{field} {saved.get(field)!r} -> {self.key.execution[field]!r}" for field in EXECUTION
                   if saved.get(field) != self.key.execution[field]]
        return f"the execution changed since the saved state ({'; '.join(changed)})" if changed else None

    def _restore(self) -> dict | None:
        """Rank 0, before training: the saved state, with the run folder made to hold exactly the files it lists
        (rewriting those an interrupted epoch left stale or half-written, or all of them when DVC removed the
        folder); None if there is nothing to resume. The returned state's "best_files" holds the best pair's bytes."""
        out, label = self.out, self.label
        if not self.file.is_file():
            return None
        try:
            state = load_sealed(self.file)
        except UserError as exc:
            log(f"train {label}: {exc}; starting the run afresh")
            return None
        why = self._mismatch(state)
        if why is not None:
            log(f"train {label}: {why}; starting afresh")
            return None
        rewritable = epoch_files(state["model"], self.tag(state["history"][-1]), state["best_epoch"] == state["epoch"])
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
            notes = {"the run folder held none of them: DVC removes a stage's outputs before it runs the stage":
                     rewritten}
        else:
            notes = {"an epoch's writes were cut short": [name for name in rewritten if name in own],
                     "changed outside this stage": [name for name in rewritten if name not in own]}
        for why, names in notes.items():
            if names:
                log(f"train {label}: rewrote {', '.join(sorted(names))} from the saved state ({why})")
        state["best_files"] = {name: rewritable[name] for name in BEST if name in state["files"]}
        return state
