"""Robust accuracy: clean, PGD-k with restarts, and standard AutoAttack through the official code (pyautoattack).

Every function takes a model in eval mode and images in [0, 1] already on the model's device, and
returns per-example "still correct" masks or plain numbers; nothing here reads or writes files.
"""
from __future__ import annotations

import logging
import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from pyautoattack import AutoAttack
from torch import Tensor, nn

from .attacks import Threat, default_alpha, pgd_attack
from .runtime import progress

AA_VERSION = "standard"
AA_LOGGER = "auto-attack"  # the logging.Logger name pyautoattack writes its progress and warnings to


def _check_eval(model: nn.Module) -> None:
    if model.training:
        raise ValueError("robustness is measured in eval mode: call model.eval() first")


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    """Predicted labels, in batches."""
    return torch.cat([model(xb).argmax(1) for xb in x.split(batch_size)])


def clean_correct(model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> Tensor:
    """Boolean mask of the examples the model classifies correctly."""
    _check_eval(model)
    return predict(model, x, batch_size) == y


def pgd_correct(model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int, restarts: int,
                batch_size: int, loss: str = "ce", alpha: float | None = None) -> Tensor:
    """Mask of the examples that stay correct under every one of `restarts` PGD-`steps` runs (L∞, radius eps).

    An example counts as broken as soon as one restart misclassifies it, so each restart only attacks the
    examples still standing: the same accuracy as attacking all of them, at a fraction of the cost.
    The step is 2.5·eps/steps (Madry et al.), so that a straight run can cross the ball 2.5 times.
    """
    alpha = default_alpha("pgd", eps, steps) if alpha is None else alpha
    threat = Threat(eps=eps, alpha=alpha, steps=steps, restarts=1)
    robust = clean_correct(model, x, y, batch_size)
    for _ in progress(range(restarts), desc=f"PGD-{steps} restarts"):
        for idx in robust.nonzero().squeeze(1).split(batch_size):
            x_adv = pgd_attack(model, x[idx], y[idx], threat, loss=loss)
            with torch.no_grad():
                robust[idx] = model(x_adv).argmax(1) == y[idx]
    return robust


# ------------------------------------------------------------------------------------------- AutoAttack

def make_autoattack(model: nn.Module, eps: float, seed: int) -> AutoAttack:
    """The official AutoAttack, standard version, L∞ (no settings touched after construction)."""
    _check_eval(model)
    return AutoAttack(model, norm="Linf", eps=eps, version=AA_VERSION, seed=seed, device=_device(model))


def autoattack_settings(adversary: AutoAttack) -> dict:
    """The settings the adapter's AutoAttack really runs with (read back from the attack objects)."""
    return {
        "version": adversary.version,
        "norm": adversary.norm,
        "eps": adversary.epsilon,
        "attacks": list(adversary.attacks_to_run),
        "apgd-ce.n_iter": adversary.apgd.n_iter,
        "apgd-ce.n_restarts": adversary.apgd.n_restarts,
        "apgd-t.n_iter": adversary.apgd_targeted.n_iter,
        "apgd-t.n_restarts": adversary.apgd_targeted.n_restarts,
        "apgd-t.n_target_classes": adversary.apgd_targeted.n_target_classes,
        "fab-t.n_iter": adversary.fab.n_iter,
        "fab-t.n_restarts": adversary.fab.n_restarts,
        "fab-t.n_target_classes": adversary.fab.n_target_classes,
        "square.n_queries": adversary.square.n_queries,
    }


class _ListHandler(logging.Handler):
    def __init__(self, lines: list[str]):
        super().__init__(logging.DEBUG)
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname.lower()}: {record.getMessage()}")


@contextmanager
def captured_aa_log(lines: list[str]):
    """Route pyautoattack's logger and Python warnings into `lines` instead of the terminal."""
    logger = logging.getLogger(AA_LOGGER)
    handler = _ListHandler(lines)
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
        lines.extend(f"warning: {w.message}" for w in caught)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


@dataclass
class AutoAttackResult:
    robust: Tensor  # bool per example: correct under every attack of the ensemble
    acc_after: dict[str, float] = field(default_factory=dict)  # robust accuracy after each attack (cumulative)
    seconds: dict[str, float] = field(default_factory=dict)  # wall-clock seconds of each attack
    log: list[str] = field(default_factory=list)  # pyautoattack's own log lines and warnings

    @property
    def accuracy(self) -> float:
        return self.robust.float().mean().item()


def run_autoattack(model: nn.Module, x: Tensor, y: Tensor, eps: float, seed: int,
                   batch_size: int) -> AutoAttackResult:
    """Standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square), worst case over the ensemble, per example.

    The cascade runs the official `run_standard_evaluation` once per attack, each time on the examples still
    standing (exactly what it does internally in one call), so that each attack's robust accuracy and time
    are known; the attacks, their settings and seeds are the library's own.
    """
    adversary = make_autoattack(model, eps, seed)
    result = AutoAttackResult(robust=clean_correct(model, x, y, batch_size))
    n = len(y)
    with captured_aa_log(result.log):
        for attack in progress(list(adversary.attacks_to_run), desc="AutoAttack"):
            idx = result.robust.nonzero().squeeze(1)
            start = time.perf_counter()
            if len(idx):
                adversary.attacks_to_run = [attack]
                x_adv, _ = adversary.run_standard_evaluation(x[idx], y[idx], batch_size=batch_size)
                result.robust[idx] = predict(model, x_adv, batch_size) == y[idx]
            result.seconds[attack] = time.perf_counter() - start
            result.acc_after[attack] = result.robust.sum().item() / n
    return result


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
