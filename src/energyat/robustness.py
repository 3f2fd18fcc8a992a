"""Robust accuracy example by example: clean, PGD-k with restarts, and standard AutoAttack through the official
code (pyautoattack), plus the PGD/AutoAttack cross-check.

Every function takes a model in eval mode and images in [0, 1] already on the model's device, and returns
per-example "still correct" flags or plain numbers; nothing here reads or writes files. The images are cut
into fixed-size blocks of the global index (`distributed.owned_blocks`); each rank attacks its own blocks,
every random draw is a function of the block, and the flags are gathered in index order, so the result is
the same on 1 or N ranks (torchrun) and one process is simply world = 1.
"""
from __future__ import annotations

import logging
import math
import re
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Callable

import torch
from pyautoattack import AutoAttack
from torch import Tensor, nn

from . import distributed
from .distributed import block_seed
from .attacks import Threat, default_alpha, pgd_attack
from .runtime import progress

AA_PACKAGE = "pyautoattack"
AA_VERSION = "standard"
AA_LOGGER = "auto-attack"  # the logging.Logger name pyautoattack writes its progress and warnings to


def _check_eval(model: nn.Module) -> None:
    if model.training:
        raise ValueError("robustness is measured in eval mode: call model.eval() first")


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def over_blocks(fn: Callable[[int, slice], Tensor], n: int, block: int, empty: Tensor, desc: str = "") -> Tensor:
    """`fn(block_index, items)` on this rank's fixed-size blocks of n items, concatenated over blocks and ranks
    in index order (every rank gets the whole result). `empty` (zero rows) stands in for a rank without blocks."""
    parts = [fn(b, items) for b, items in progress(distributed.owned_blocks(n, block), desc=desc)]
    return distributed.gather_cat(torch.cat(parts) if parts else empty)


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    """Predicted labels, in batches."""
    return torch.cat([model(xb).argmax(1) for xb in x.split(batch_size)])


def clean_correct(model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> Tensor:
    """Boolean mask of the examples the model classifies correctly."""
    _check_eval(model)
    return predict(model, x, batch_size) == y


def pgd_block(model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int, restarts: int, seed: int,
              block: int, loss: str = "ce", alpha: float | None = None) -> Tensor:
    """Flags of one block: correct under every one of `restarts` PGD-`steps` runs (L∞, radius eps).

    An example counts as broken as soon as one restart misclassifies it, so each restart only attacks the
    examples still standing: the same accuracy as attacking all of them, at a fraction of the cost. Restart r
    draws its random starts from a generator seeded by (seed, attack, r, block). The step is 2.5·eps/steps
    (Madry et al.), so that a straight run can cross the ball 2.5 times."""
    alpha = default_alpha("pgd", eps, steps) if alpha is None else alpha
    threat = Threat(eps=eps, alpha=alpha, steps=steps, restarts=1)
    robust = clean_correct(model, x, y, len(y))
    for restart in range(restarts):
        idx = robust.nonzero().squeeze(1)
        if not len(idx):
            break
        gen = torch.Generator(device=x.device).manual_seed(block_seed(seed, f"pgd{steps}-{loss}", restart, block))
        x_adv = pgd_attack(model, x[idx], y[idx], threat, loss=loss, generator=gen)
        robust[idx] = predict(model, x_adv, len(idx)) == y[idx]
    return robust


def pgd_correct(model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int, restarts: int, block: int,
                seed: int, loss: str = "ce", alpha: float | None = None) -> Tensor:
    """Per-example flags under PGD-`steps` with `restarts` random starts, over blocks of `block` examples."""
    _check_eval(model)
    return over_blocks(lambda b, s: pgd_block(model, x[s], y[s], eps, steps, restarts, seed, b, loss, alpha),
                       len(y), block, y[:0].bool(), desc=f"PGD-{steps} blocks")


# ------------------------------------------------------------------------------------------- AutoAttack

def make_autoattack(model: nn.Module, eps: float, seed: int) -> AutoAttack:
    """The official AutoAttack, standard version, L∞ (no settings touched after construction)."""
    _check_eval(model)
    return AutoAttack(model, norm="Linf", eps=eps, version=AA_VERSION, seed=seed, device=_device(model))


def autoattack_settings(adversary: AutoAttack) -> dict:
    """The settings an AutoAttack object holds, read from its attack objects (after a run: what ran)."""
    return {
        "package": f"{AA_PACKAGE} {version(AA_PACKAGE)}",
        "version": adversary.version,
        "norm": adversary.norm,
        "eps": adversary.epsilon,
        "seed": adversary.seed,
        "attacks": list(adversary.attacks_to_run),
        "apgd-ce.loss": adversary.apgd.loss,
        "apgd-ce.eps": adversary.apgd.eps,
        "apgd-ce.n_iter": adversary.apgd.n_iter,
        "apgd-ce.n_restarts": adversary.apgd.n_restarts,
        "apgd-t.eps": adversary.apgd_targeted.eps,
        "apgd-t.n_iter": adversary.apgd_targeted.n_iter,
        "apgd-t.n_restarts": adversary.apgd_targeted.n_restarts,
        "apgd-t.n_target_classes": adversary.apgd_targeted.n_target_classes,
        "fab-t.targeted": adversary.fab.targeted,
        "fab-t.eps": adversary.fab.eps,
        "fab-t.n_iter": adversary.fab.n_iter,
        "fab-t.n_restarts": adversary.fab.n_restarts,
        "fab-t.n_target_classes": adversary.fab.n_target_classes,
        "square.eps": adversary.square.eps,
        "square.n_queries": adversary.square.n_queries,
        "square.p_init": adversary.square.p_init,
    }


class _RecordHandler(logging.Handler):
    def __init__(self, records: list[tuple[float, int, str]]):
        super().__init__(logging.DEBUG)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.created, record.levelno, record.getMessage()))


@contextmanager
def captured_aa_log(records: list[tuple[float, int, str]]):
    """Route pyautoattack's logger and Python warnings into `records` ((time, level, message) tuples) instead
    of the terminal."""
    logger = logging.getLogger(AA_LOGGER)
    handler = _RecordHandler(records)
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
        records.extend((time.time(), logging.WARNING, str(w.message)) for w in caught)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


# pyautoattack 0.2.0's progress lines (autoattack.py), one per attack and internal batch
_PERTURBED = re.compile(r"^(\S+) - \d+/\d+ - (\d+) out of \d+ successfully perturbed$")


@dataclass
class AutoAttackResult:
    """Standard AutoAttack on n examples (one official call per block)."""

    robust: Tensor  # bool per example: correct under every attack of the ensemble
    clean: int  # examples classified correctly before any attack
    robust_after: dict[str, int] = field(default_factory=dict)  # still correct after each attack (cumulative)
    seconds: dict[str, float] = field(default_factory=dict)  # seconds in each attack, summed over blocks
    warnings: int = 0  # warnings raised by AutoAttack's checks (logger level WARNING, Python warnings)
    log: list[str] = field(default_factory=list)  # its own log lines, block by block
    settings: dict = field(default_factory=dict)  # what it ran with, read back from its attack objects after the run

    @property
    def n(self) -> int:
        return len(self.robust)

    @property
    def accuracy(self) -> float:
        return self.robust.float().mean().item()

    @property
    def acc_after(self) -> dict[str, float]:
        return {attack: count / self.n for attack, count in self.robust_after.items()}


def _block_summary(records: list[tuple[float, int, str]], attacks: list[str], clean: int) -> dict:
    """Counts, seconds and warnings of one official call, from its own log records."""
    broken = dict.fromkeys(attacks, 0)
    started, seconds = {}, dict.fromkeys(attacks, 0.0)
    for created, _, msg in records:
        if m := _PERTURBED.match(msg):
            broken[m.group(1)] += int(m.group(2))
        elif msg.startswith("running "):
            started[msg[len("running "):]] = created
        for attack in started:
            if msg.startswith(f"robust accuracy after {attack.upper()}:"):
                seconds[attack] = created - started[attack]
    robust_after, left = {}, clean
    for attack in attacks:
        left -= broken[attack]
        robust_after[attack] = left
    return {"robust_after": robust_after, "seconds": seconds,
            "warnings": sum(level >= logging.WARNING for _, level, _ in records),
            "log": [f"{logging.getLevelName(level).lower()}: {msg}" for _, level, msg in records]}


def autoattack_block(model: nn.Module, x: Tensor, y: Tensor, eps: float, seed: int) -> tuple[Tensor, dict]:
    """One official `run_standard_evaluation` call on one block (its batch size = the block, so one batch):
    per-example flags and the call's summary (counts after each attack, seconds, warnings, log, settings)."""
    adversary = make_autoattack(model, eps, seed)
    records: list[tuple[float, int, str]] = []
    with captured_aa_log(records):
        _, y_adv = adversary.run_standard_evaluation(x, y, batch_size=len(y))
    robust = (y_adv == y).to(torch.bool)  # y_adv: the clean prediction, or the adversarial one where it broke
    clean = int(clean_correct(model, x, y, len(y)).sum())
    summary = _block_summary(records, list(adversary.attacks_to_run), clean)
    last = list(summary["robust_after"].values())[-1]
    if last != int(robust.sum()):
        raise RuntimeError(f"{AA_PACKAGE}'s log counts {last} robust examples but its result {int(robust.sum())}: "
                           f"is {AA_PACKAGE} {version(AA_PACKAGE)} the version this adapter reads?")
    return robust, {**summary, "clean": clean, "settings": autoattack_settings(adversary)}


def run_autoattack(model: nn.Module, x: Tensor, y: Tensor, eps: float, seed: int, block: int) -> AutoAttackResult:
    """Standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square) as its authors run it: one `run_standard_evaluation`
    call per block of `block` examples, with its own checks, warnings and seed; worst case over the ensemble,
    per example. Each rank runs its own blocks; flags, counts and log lines are gathered in index order."""
    _check_eval(model)
    summaries: list[dict] = []

    def one(b: int, items: slice) -> Tensor:
        robust, summary = autoattack_block(model, x[items], y[items], eps, seed)
        summaries.append({**summary, "block": b, "items": (items.start, items.stop)})
        return robust

    robust = over_blocks(one, len(y), block, y[:0].bool(), desc="AutoAttack blocks")
    blocks = [s for rank in distributed.gather_objects(summaries) for s in rank]
    attacks = blocks[0]["settings"]["attacks"]
    return AutoAttackResult(
        robust=robust, clean=sum(s["clean"] for s in blocks),
        robust_after={a: sum(s["robust_after"][a] for s in blocks) for a in attacks},
        seconds={a: sum(s["seconds"][a] for s in blocks) for a in attacks},
        warnings=sum(s["warnings"] for s in blocks),
        log=[line for s in blocks for line in
             (f"-- block {s['block']}: images {s['items'][0]}-{s['items'][1] - 1}", *s["log"])],
        settings=blocks[0]["settings"])


def autoattack_seconds_per_100(model: nn.Module, x: Tensor, y: Tensor, eps: float, seed: int = 0,
                               batch_size: int = 250) -> float:
    """Wall-clock seconds standard AutoAttack takes per 100 of these images (for `make bench`).

    The cost depends on the model: attacks after APGD-CE only run on the examples still standing,
    so a robust model costs several times more than a non-robust one.
    """
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    run_autoattack(model, x, y, eps, seed, batch_size)
    model.train(was_training)
    return (time.perf_counter() - start) * 100 / len(y)


# ------------------------------------------------------------------------------------------- cross-check

def crosscheck_tolerance(acc: float, n: int) -> float:
    """How far two attacks' robust accuracies on the same n examples may differ: two binomial standard errors
    of an accuracy near `acc`, at least 2 points (differences between attacks of equal strength are
    sampling noise of which examples each one happens to break)."""
    return max(0.02, 2 * math.sqrt(max(acc * (1 - acc), 0.0) / n))


def crosscheck(pgd_acc: float, apgd_ce_acc: float, aa_acc: float, n: int) -> dict:
    """Our PGD vs AutoAttack on the same model and examples.

    Passes when PGD and APGD-CE (both untargeted CE attacks) agree within the tolerance, and the AutoAttack
    ensemble is not above PGD by more than the tolerance (it contains APGD-CE and three more attacks).
    """
    tol = crosscheck_tolerance(pgd_acc, n)
    gap, excess = pgd_acc - apgd_ce_acc, aa_acc - pgd_acc
    return {"apgdce_gap": gap, "aa_over_pgd": excess, "tolerance": tol,
            "passed": abs(gap) <= tol and excess <= tol}
