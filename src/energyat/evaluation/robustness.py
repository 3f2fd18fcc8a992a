"""Robust accuracy example by example: clean, PGD-k with restarts, APGD-CE + APGD-T and standard AutoAttack through
the official code (pyautoattack), and the per-image worst case over all of them.

Every function takes a model in eval mode and images in [0, 1] already on the model's device, and returns
per-example "still correct" flags or plain numbers; nothing here reads or writes files. The images are cut
into fixed-size blocks of the global index (`distributed.owned_blocks`); each rank attacks its own blocks,
every random draw is a function of the block, and the flags are gathered in index order, so the result is
the same on 1 or N ranks (torchrun) and one process is simply world = 1.
"""
from __future__ import annotations

import logging
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

from ..infra import distributed
from ..infra.distributed import block_seed
from ..infra.runtime import progress
from ..science.attacks import Threat, default_alpha, pgd_attack

AA_PACKAGE = "pyautoattack"
AA_VERSION = "standard"
AA_LOGGER = "auto-attack"  # the logging.Logger name pyautoattack writes its progress and warnings to


def _check_eval(model: nn.Module) -> None:
    if model.training:
        raise ValueError("robustness is measured in eval mode: call model.eval() first")


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def over_blocks(fn: Callable[[int, slice], Tensor], n: int, block: int, empty: Tensor, desc: str = "",
                boundary: int = 0) -> Tensor:
    """`fn(block_index, items)` on this rank's fixed-size blocks of n items (cut again at `boundary`:
    `distributed.block_slices`), concatenated over blocks and ranks in index order (every rank gets the whole
    result). `empty` (zero rows) stands in for a rank without blocks."""
    parts = [fn(b, items) for b, items in progress(distributed.owned_blocks(n, block, boundary=boundary), desc=desc)]
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

APGD_ATTACKS = ("apgd-ce", "apgd-t")  # standard AutoAttack's gradient half, run on its own (evaluate.apgd_examples)
AFTER_APGD = ("fab-t", "square")  # the rest of standard AutoAttack, in its order


def make_autoattack(model: nn.Module, eps: float, seed: int, attacks: tuple[str, ...] | None = None) -> AutoAttack:
    """The official AutoAttack, L∞. `attacks` None: the standard version (no settings touched after construction).
    A list of attacks: version 'custom' running just those, with every attack's settings set as the standard version
    sets them (`standard_settings`)."""
    _check_eval(model)
    if attacks is None:
        return AutoAttack(model, norm="Linf", eps=eps, version=AA_VERSION, seed=seed, device=_device(model))
    adversary = AutoAttack(model, norm="Linf", eps=eps, version="custom", attacks=list(attacks), seed=seed,
                           device=_device(model))
    standard_settings(adversary)
    return adversary


def standard_settings(adversary: AutoAttack) -> None:
    """What pyautoattack 0.2.0's `AutoAttack._set_version('standard')` sets for the L∞ / L2 norms, but the list of
    attacks to run (on top of the constructor's n_iter 100, rho 0.75, eot_iter 1, Square p_init 0.8)."""
    adversary.apgd.n_restarts = 1
    adversary.apgd_targeted.n_target_classes = 9
    adversary.fab.n_restarts = 1
    adversary.apgd_targeted.n_restarts = 1
    adversary.fab.n_target_classes = 9
    adversary.square.n_queries = 5000


def autoattack_settings(adversary: AutoAttack) -> dict:
    """The settings an AutoAttack object holds for the attacks it runs, read from its attack objects (after a run:
    what ran)."""
    out = {
        "package": f"{AA_PACKAGE} {version(AA_PACKAGE)}",
        "version": adversary.version,
        "norm": adversary.norm,
        "eps": adversary.epsilon,
        "seed": adversary.seed,
        "attacks": list(adversary.attacks_to_run),
    }
    per_attack = {
        "apgd-ce": lambda: {"apgd-ce.loss": adversary.apgd.loss,
                            "apgd-ce.eps": adversary.apgd.eps,
                            "apgd-ce.n_iter": adversary.apgd.n_iter,
                            "apgd-ce.n_restarts": adversary.apgd.n_restarts,
                            "apgd-ce.rho": adversary.apgd.thr_decr,
                            "apgd-ce.eot_iter": adversary.apgd.eot_iter},
        "apgd-t": lambda: {"apgd-t.eps": adversary.apgd_targeted.eps,
                           "apgd-t.n_iter": adversary.apgd_targeted.n_iter,
                           "apgd-t.n_restarts": adversary.apgd_targeted.n_restarts,
                           "apgd-t.n_target_classes": adversary.apgd_targeted.n_target_classes,
                           "apgd-t.rho": adversary.apgd_targeted.thr_decr,
                           "apgd-t.eot_iter": adversary.apgd_targeted.eot_iter},
        "fab-t": lambda: {"fab-t.targeted": adversary.fab.targeted,
                          "fab-t.eps": adversary.fab.eps,
                          "fab-t.n_iter": adversary.fab.n_iter,
                          "fab-t.n_restarts": adversary.fab.n_restarts,
                          "fab-t.n_target_classes": adversary.fab.n_target_classes},
        "square": lambda: {"square.eps": adversary.square.eps,
                           "square.n_queries": adversary.square.n_queries,
                           "square.p_init": adversary.square.p_init},
    }
    for attack in adversary.attacks_to_run:
        out.update(per_attack[attack]())
    return out


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
    """AutoAttack (standard, or a custom list of its attacks) on n examples (one official call per block)."""

    robust: Tensor  # bool per example: correct under every attack that ran
    clean: int  # examples classified correctly before any attack
    robust_after: dict[str, int] = field(default_factory=dict)  # still correct after each attack (cumulative)
    seconds: dict[str, float] = field(default_factory=dict)  # seconds in each attack, summed over blocks
    warnings: int = 0  # warnings raised by AutoAttack's checks (logger level WARNING, Python warnings)
    log: list[str] = field(default_factory=list)  # its own log lines, block by block
    settings: dict = field(default_factory=dict)  # what it ran with, read back from its attack objects after the run
    blocks: list[dict] = field(default_factory=list)  # each official call's summary, in index order (items: (start, stop))

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


def autoattack_block(model: nn.Module, x: Tensor, y: Tensor, eps: float, seed: int,
                     attacks: tuple[str, ...] | None = None) -> tuple[Tensor, dict]:
    """One official `run_standard_evaluation` call on one block (its batch size = the block, so one batch):
    per-example flags and the call's summary (counts after each attack, seconds, warnings, log, settings).
    `attacks`: as `make_autoattack` (None: the standard version)."""
    adversary = make_autoattack(model, eps, seed, attacks)
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


def _gathered(summaries: list[dict]) -> list[dict]:
    """This rank's block summaries and every other rank's, in index order."""
    return sorted((s for rank in distributed.gather_objects(summaries) for s in rank), key=lambda s: s["items"])


def _result(robust: Tensor, blocks: list[dict], settings: dict | None = None) -> AutoAttackResult:
    """Every rank's block summaries (`_gathered`) as one result."""
    settings = settings or blocks[0]["settings"]
    ran = settings["attacks"]
    return AutoAttackResult(
        robust=robust, clean=sum(s["clean"] for s in blocks),
        robust_after={a: sum(s["robust_after"][a] for s in blocks) for a in ran},
        seconds={a: sum(s["seconds"][a] for s in blocks) for a in ran},
        warnings=sum(s["warnings"] for s in blocks),
        log=[line for s in blocks for line in
             (f"-- block {s['block']}: images {s['items'][0]}-{s['items'][1] - 1}", *s["log"])],
        settings=settings, blocks=blocks)


def run_autoattack(model: nn.Module, x: Tensor, y: Tensor, eps: float, seed: int, block: int,
                   attacks: tuple[str, ...] | None = None, boundary: int = 0) -> AutoAttackResult:
    """Standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square) as its authors run it: one `run_standard_evaluation`
    call per block of `block` examples, with its own checks, warnings and seed; worst case over the ensemble,
    per example. Each rank runs its own blocks; flags, counts and log lines are gathered in index order.
    `attacks`: only these of AutoAttack's attacks, with the standard version's settings (`make_autoattack`).
    `boundary`: the blocks are cut again there (`distributed.block_slices`), so that those over the first
    `boundary` examples are the ones a run on them alone makes (`autoattack_after_apgd` continues from them)."""
    _check_eval(model)
    summaries: list[dict] = []

    def one(b: int, items: slice) -> Tensor:
        robust, summary = autoattack_block(model, x[items], y[items], eps, seed, attacks)
        summaries.append({**summary, "block": b, "items": (items.start, items.stop)})
        return robust

    desc = "AutoAttack blocks" if attacks is None else f"{'+'.join(attacks).upper()} blocks"
    robust = over_blocks(one, len(y), block, y[:0].bool(), desc=desc, boundary=boundary)
    return _result(robust, _gathered(summaries))


def autoattack_after_apgd(model: nn.Module, x: Tensor, y: Tensor, eps: float, seed: int, block: int,
                          apgd: AutoAttackResult) -> AutoAttackResult:
    """Standard AutoAttack on these n examples, continuing from `apgd` (`run_apgd` on them and possibly more,
    with `boundary=n`): each block's APGD-CE and APGD-T are the APGD run's call on the same block, and the
    examples it leaves standing go through FAB-T and Square in one official call with the same seed, as the
    standard call goes on after its APGD-T. Every attack reseeds itself and sees the same images in the same
    order, so flags and counts are those of `run_autoattack` on the same blocks (tested), without running
    APGD-CE and APGD-T twice."""
    _check_eval(model)
    n = len(y)
    by_items = {s["items"]: s for s in apgd.blocks}
    summaries: list[dict] = []

    def one(b: int, items: slice) -> Tensor:
        first = by_items.get((items.start, items.stop))
        if first is None or list(first["robust_after"]) != list(APGD_ATTACKS):
            raise ValueError(f"the APGD run has no APGD-CE + APGD-T block over images {items.start}-{items.stop - 1}:"
                             f" run it with boundary={n}")
        robust = apgd.robust[items].to(y.device).clone()
        idx = robust.nonzero().squeeze(1)
        summary = {**first, "block": b, "log": list(first["log"]), "rest": None}
        after = first["robust_after"]["apgd-t"]
        summary["robust_after"] = {**first["robust_after"], **dict.fromkeys(AFTER_APGD, after)}
        summary["seconds"] = {**first["seconds"], **dict.fromkeys(AFTER_APGD, 0.0)}
        if len(idx):
            robust[idx], rest = autoattack_block(model, x[items][idx], y[items][idx], eps, seed, AFTER_APGD)
            summary["robust_after"].update(rest["robust_after"])
            summary["seconds"].update(rest["seconds"])
            summary["warnings"] += rest["warnings"]
            summary["log"] += [f"info: FAB-T and Square on the {len(idx)} images APGD-T left standing", *rest["log"]]
            summary["rest"] = rest["settings"]
        summaries.append(summary)
        return robust

    robust = over_blocks(one, n, block, y[:0].bool(), desc="FAB-T+SQUARE blocks")
    gathered = _gathered(summaries)
    # FAB-T and Square as they ran (their settings read back after a run), else as built: a standard call whose
    # APGD left nothing standing never runs them either
    rest = next((s["rest"] for s in gathered if s["rest"] is not None), None) or \
        autoattack_settings(make_autoattack(model, eps, seed, AFTER_APGD))
    settings = {**apgd.settings, **{k: v for k, v in rest.items() if k.split(".")[0] in AFTER_APGD},
                "version": AA_VERSION, "attacks": [*APGD_ATTACKS, *AFTER_APGD]}
    return _result(robust, gathered, settings)


def run_apgd(model: nn.Module, x: Tensor, y: Tensor, eps: float, seed: int, block: int,
             boundary: int = 0) -> AutoAttackResult:
    """APGD-CE then APGD-T (9 target classes) on the images APGD-CE leaves standing, as standard AutoAttack runs
    them (its settings, seed and checks; the official code, version 'custom'), without FAB-T and Square."""
    return run_autoattack(model, x, y, eps, seed, block, attacks=APGD_ATTACKS, boundary=boundary)


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


# ------------------------------------------------------------------------------------------- worst case

def worst_case(flags: dict[str, Tensor], n: int) -> Tensor:
    """Per image of the first n: correct under every evaluation in `flags` that covers it. Each flag vector covers a
    prefix of the images (clean and PGD all n_examples, APGD the first apgd_examples, AutoAttack the first
    aa_examples); one shorter than n constrains only its own prefix."""
    out = torch.ones(n, dtype=torch.bool, device=next(iter(flags.values())).device if flags else None)
    for f in flags.values():
        m = min(n, len(f))
        out[:m] &= f[:m].to(torch.bool)
    return out
