"""The paper's CIFAR-10 setting split into blocks that each fit one GPU window (docs/paper.md).

A block is a named set of training runs (each without and/or with DER) over `presets/paper.yaml`, with the
evaluation the block's claim needs. `params_for` turns a block into an ordinary params mapping, validated like
params.yaml, so that a block runs the pipeline's own stage functions (stages/block.py), not a second
implementation. `tiny` shrinks any block to a few hundred images on a small CNN: the CPU dry run of the same code.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

EPS16, EPS8 = 16 / 255, 8 / 255

# The fast-AT recipe of the single-step references (Wong et al. 2020; de Jorge et al. 2022): 30 epochs, cyclic LR
# to 0.2, SGD momentum 0.9, weight decay 5e-4 (the preset's). Method defaults give RS-FGSM alpha 1.25 eps with
# projection and N-FGSM noise 2 eps, alpha eps, no projection (methods.py).
FAST_AT = {"epochs": 30, "lr_schedule": "cyclic", "lr_max": 0.2}
SINGLE_STEP_DER = {"lambda": 1.0, "gamma": 0.0}  # not published for single-step runs: ours (co16-lambda tunes it)
# Training throughput of our step on one H200 (bf16 + CUDA graphs, batch 128; metrics/gpu_check.json), img/s,
# base and with DER: the prior for a job's cost before a block has measured one of its own.
IMG_PER_S = {"fgsm": (23786, 17762), "rs-fgsm": (23478, 15309), "n-fgsm": (23504, 15307),
             "gradalign": (3638, 3459), "pgd": (5160, 4607), "trades": (4221, 4210)}
EVAL_SECONDS = 100.0  # per evaluated checkpoint of a robust model: PGD-50 x 10 on 2,000, AutoAttack on 500 (measured)
OVERHEAD = 1.3  # measured: per-epoch validation, graph capture and data loading on top of the training steps
CO_EVAL = {"checkpoints": ["last"], "n_examples": 2000, "aa_examples": 500, "pgd_steps": [50], "restarts": 10}


@dataclass(frozen=True)
class Block:
    about: str
    runs: dict[str, dict]  # run name -> its overrides (method, eps, der, ...), as under params `runs`
    variants: tuple[str, ...] = ("base", "der")
    evaluate: dict = field(default_factory=lambda: dict(CO_EVAL))
    train: dict = field(default_factory=dict)  # overrides of the preset's `train` defaults

    def jobs(self) -> list[tuple[str, str]]:
        """(run, variant) in the order they run: a run's base before its DER variant."""
        return [(run, v) for run in self.runs for v in self.variants]


def _co(method: str, eps: float, eps_name: str) -> Block:
    return Block(f"catastrophic overfitting: {method} at {eps_name}, without and with DER (fast-AT recipe)",
                 {method: {"method": method, "eps": eps, **FAST_AT, "der": dict(SINGLE_STEP_DER)}})


BLOCKS: dict[str, Block] = {
    **{f"co16-{m}": _co(m, EPS16, "16/255") for m in ("fgsm", "rs-fgsm", "n-fgsm")},
    **{f"co8-{m}": _co(m, EPS8, "8/255") for m in ("fgsm", "rs-fgsm", "n-fgsm")},
    "co16-gradalign": _co("gradalign", EPS16, "16/255"),
    "co16-lambda": Block(
        "DER's single-step weight: FGSM + DER at 16/255 over lambda in {6, 0.5, 0.1, 1} (gamma 0; the strongest "
        "first, the one most likely to prevent CO; lambda 1 is co16-fgsm's DER run again)",
        {f"fgsm-l{lam:g}": {"method": "fgsm", "eps": EPS16, **FAST_AT, "der": {"lambda": lam, "gamma": 0.0}}
         for lam in (6.0, 0.5, 0.1, 1.0)},
        variants=("der",)),
    "ro": Block(
        "robust overfitting: PGD-10 AT at 8/255 (alpha 2/255), piecewise LR (x0.1 at 50 % and 75 %), 30 epochs "
        "(a job is up to ~10 min on one H200); DER (lambda 6, gamma 0.2, the paper's Table III) from the first LR drop",
        {"pgd": {"method": "pgd", "eps": EPS8, "steps": 10, "epochs": 30, "lr_schedule": "piecewise",
                 "lr_max": 0.1, "der": {"lambda": 6.0, "gamma": 0.2, "start_epoch": -15}}},
        evaluate={**CO_EVAL, "checkpoints": ["best", "last"]}),
}


def job_seconds(method: str, variant: str, epochs: int, der_epochs: int, n_train: int, n_checkpoints: int) -> float:
    """A job's expected seconds on one H200: a late-DER run forks from its base run, so it trains its DER epochs only."""
    base, der = IMG_PER_S.get(method, (1000, 1000))
    steps = epochs * n_train / base if variant == "base" else der_epochs * n_train / der
    return OVERHEAD * steps + EVAL_SECONDS * n_checkpoints


def block_seconds(name: str, n_train: int = 49_000, jobs: list[str] | None = None) -> float:
    """The expected seconds of a block (one seed; only `jobs`, "<run>.<variant>", where given) on one H200."""
    block = BLOCKS[name]
    total = 0.0
    for run, variant in block.jobs():
        if jobs is not None and f"{run}.{variant}" not in jobs:
            continue
        r = block.runs[run]
        epochs = r.get("epochs", 30)
        start = r.get("der", {}).get("start_epoch", 1)
        der_epochs = epochs if r["method"] not in ("pgd", "trades") else (-start if start < 0 else epochs - start + 1)
        total += job_seconds(r["method"], variant, epochs, der_epochs, n_train, len(block.evaluate["checkpoints"]))
    return total


def names() -> list[str]:
    return list(BLOCKS)


def params_for(preset: dict, name: str, data_source: str, seed: int, device: str = "auto",
               tiny: bool = False) -> dict:
    """The params mapping of block `name` over the preset's raw mapping (not modified)."""
    block = BLOCKS[name]
    raw = copy.deepcopy(preset)
    raw.update(seed=seed, device=device)
    raw["data"] = {**raw["data"], "source": data_source,
                   "dataset": "image-folder" if not _is_torchvision_root(data_source) else "cifar10",
                   "augment": "crop-flip"}
    raw["train"] = {**raw["train"], **block.train}
    raw["runs"] = copy.deepcopy(block.runs)
    raw["evaluate"] = {**raw["evaluate"], **block.evaluate}
    raw["sample"] = {**raw["sample"], "run": next(iter(block.runs))}
    if tiny:
        _shrink(raw)
    return raw


def _is_torchvision_root(source: str) -> bool:
    from pathlib import Path

    return (Path(source) / "cifar-10-batches-py").is_dir()


def _shrink(raw: dict) -> None:
    """The CPU dry run: every run for 2 epochs on 256 images with a small CNN, a few dozen test images."""
    raw["threads"] = min(raw.get("threads", 2), 2)
    raw["model"] = {"arch": "small-cnn", "width": 8}
    raw["data"]["val_size"] = 200
    raw["train"].update(n_val=64, val_steps=2, batch_size=64)
    for run in raw["runs"].values():
        run.update(epochs=2, n_train=256)
        if run.get("steps"):
            run["steps"] = 2
        der = run.get("der", {})
        if der.get("start_epoch", 1) != 1:
            der["start_epoch"] = -1
    raw["evaluate"].update(n_examples=64, aa_examples=8, restarts=2, batch_size=32)
