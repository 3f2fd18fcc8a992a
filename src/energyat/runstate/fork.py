"""The DER fork: a late-DER run starts from its base run's state at the end of epoch s - 1 (s: DER's first epoch).

A multi-step base run also saves its state after epoch s - 1 as a snapshot, `.energyat/fork/<run>/<key>.pt`, the
key a hash of everything that shapes those epochs: the run's config but DER's (of the DER params only the start and
gamma: gamma sets the `der` diagnostic column that every epoch logs, DER on or not; the others act from epoch s on)
and the execution (ranks, threads, CUDA graphs, torch version, device model; resume.RunKey). A der run with no
usable state of its own commits that snapshot as its state.pt and trains only the DER epochs: the same bytes as
training it from scratch. Its history holds the base run's first s - 1 rows as they are, wall seconds included, so
its `train_seconds` (the sum over its history) counts the forked-in epochs as the base run measured them.

Pruning. A run's folder keeps at most one snapshot, the one its base run's current key names: a base run's start
deletes every other file there (snapshots of earlier params, code or execution, which only a der run of those would
use, and the temporary files of killed snapshot writes). The kept one serves every der run of the same prefix
(`dvc exp run -S der.lambda=...` re-runs only the der runs, each forking from it), so it is not deleted when a der
run has forked. A kill between a base run's commit of epoch s - 1 and its snapshot leaves a state that resumes after
that very epoch: the snapshot is then taken from that state.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import UserError
from ..infra.artifacts import load_sealed, save_sealed
from ..infra.runtime import log
from ..params import MULTI_STEP, RunCfg
from .resume import RunKey, RunState, key_hash

FORK_DIR = Path(".energyat/fork")  # git-ignored cache of pre-DER states: <run>/<key>.pt
RECORD = ("epoch", "history", "model", "optimizer")


def fork_epoch(rc: RunCfg) -> int | None:
    """The epoch after which the base run's state is where the der run's DER epochs begin: s - 1 for a multi-step
    run with DER starting at s > 1; None when the two variants share no epoch (single-step DER acts from epoch 1)."""
    if rc.train.method not in MULTI_STEP:
        return None
    s = rc.der.first_epoch(rc.train.epochs)
    return s - 1 if s > 1 else None


def snapshot_path(rc: RunCfg, run_name: str, key: RunKey) -> Path | None:
    """The snapshot file of this run's pre-DER prefix (None: no fork point); the same for its base and der run."""
    at = fork_epoch(rc)
    if at is None:
        return None
    prefix = {**key.common, "der": {"first_epoch": at + 1, "gamma": rc.der.gamma}, "execution": key.execution}
    return FORK_DIR / run_name / f"{key_hash(prefix)}.pt"


class Snapshot:
    """The fork point of one run: `take` on the base run's side, `start` on the der run's (rank 0 only)."""

    def __init__(self, rc: RunCfg, run_name: str, key: RunKey, label: str):
        self.epoch, self.path, self.label = fork_epoch(rc), snapshot_path(rc, run_name, key), label
        self.folder = FORK_DIR / run_name

    def prepare(self, resumed: dict | None) -> None:
        """A base run, before training: its folder pruned to this key's snapshot (see the module docstring), which
        a resumed state stopping right at the fork epoch supplies if it is missing."""
        if FORK_DIR.is_dir():  # the layout before per-run folders (snapshots, temporaries): keys no run computes
            for stale in FORK_DIR.iterdir():
                if stale.is_file():
                    stale.unlink(missing_ok=True)
        if self.folder.is_dir():
            for other in self.folder.iterdir():
                if self.path is None or other.name != self.path.name:
                    if other.is_dir():
                        shutil.rmtree(other)
                    else:
                        other.unlink(missing_ok=True)
        if resumed is not None and self.path is not None and not self.path.is_file():
            self.take(resumed)

    def take(self, state: dict) -> None:
        """A base run, after an epoch (`state`: at least RECORD): the snapshot, when the epoch is the fork's."""
        if self.path is None or state["epoch"] != self.epoch:
            return
        try:  # a cache: failing to fill it must not fail the run
            save_sealed(self.path, {k: state[k] for k in RECORD})
        except UserError as exc:
            log(f"train {self.label}: no fork snapshot for the der run ({exc})")

    def start(self, run_state: RunState) -> dict | None:
        """A der run with no state of its own: the snapshot committed as its state (so that every rank resumes from
        the same file, as from its own state); None when there is no usable snapshot."""
        if self.path is None or not self.path.is_file():
            return None
        try:  # the key names the code and the epoch too: a sealed file under it is a snapshot of this prefix
            snap = load_sealed(self.path)
        except UserError as exc:
            log(f"train {self.label}: {exc}; ignoring the fork snapshot, training from scratch")
            return None
        state = run_state.adopt(snap)
        log(f"train {self.label}: starting from the base run's state after epoch {self.epoch} (fork)")
        return state
