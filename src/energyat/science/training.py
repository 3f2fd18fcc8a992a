"""The training loop: method objective + optional DER, LR schedule, per-epoch energy diagnostics.

`fit` touches no files: it reports every finished epoch to `on_epoch_end`, which the stage uses to
write checkpoints, and it resumes from a state dict. Each epoch reseeds the RNGs from (seed, epoch),
so a resumed run replays exactly the epochs an uninterrupted one would have. Under torchrun each rank
trains its shard of every global batch through DistributedDataParallel (docs/design.md §7).
"""
from __future__ import annotations

import contextlib
import math
import time
from functools import partial
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ..errors import UserError
from ..infra import distributed
from ..infra.runtime import autocast, log, progress
from ..params import RunCfg, TrainCfg
from . import energy as E
from .attacks import ATTACKS, Threat, default_alpha
from .data import Split, augment, batches, draw_augmentation, to_float
from .methods import METHODS, bn_stats_frozen, gradalign_cosines
from .step_graphs import StepGraphs

HISTORY_COLUMNS = (
    "epoch", "lr", "train_loss", "train_clean_acc", "train_adv_acc", "val_clean_acc", "val_pgd_acc",
    "E_nat", "E_adv", "dE_x", "dE_xy", "der", "aae_frac", "aae_start_frac", "der_on", "seconds",
)
VAL_BLOCK = 500  # validation images per seeded block (fixed, so any number of ranks gives the same numbers)


def learning_rate(cfg: TrainCfg, t: float) -> float:
    """LR at fractional epoch `t` in [0, epochs]."""
    if cfg.lr_schedule == "cyclic":  # fast-AT: linear up to lr_max at mid-training, back to 0
        return float(np.interp(t, [0, cfg.epochs / 2, cfg.epochs], [0, cfg.lr_max, 0]))
    if cfg.lr_schedule == "piecewise":  # robust-overfitting: x0.1 at each milestone
        return cfg.lr_max * 0.1 ** sum(t >= m * cfg.epochs for m in cfg.lr_milestones)
    return cfg.lr_max


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 100_003 + epoch


# Per-epoch sums, kept on the device and read once per epoch. `n`: training images; `n_nat`: images of the diagnosed
# batches (`diagnosed`); `n_start`: images of diagnosed batches with a single-step attack's starting point.
SUMS = ("n", "loss", "adv_correct", "n_nat", "clean_correct", "e_nat", "e_adv", "de_x", "de_xy", "der", "aae",
        "n_start", "aae_start")


def diagnosed(cfg: TrainCfg, i: int) -> bool:
    """Whether batch `i` of an epoch feeds the diagnostic columns (train clean accuracy, E, ΔE, DER, AAE fractions):
    every `diag_every`-th, in every method, variant and epoch, even where the natural logits come free (fgsm,
    gradalign, trades, standard, DER epochs). So a base and a DER run, or a DER run's epochs before and after DER
    starts, average over the same batches, and the columns compare like for like."""
    return cfg.diag_every > 0 and i % cfg.diag_every == 0


def history_row(sums: dict[str, float], adversarial: bool) -> dict:
    """The training-batch columns of one epoch's history row from its SUMS (NaN where nothing was measured)."""
    def mean(key: str, count: str) -> float:
        return sums[key] / sums[count] if sums[count] else float("nan")

    nat_adv = adversarial and sums["n_nat"] > 0
    return {
        "train_loss": mean("loss", "n"),
        "train_clean_acc": mean("clean_correct", "n_nat"),
        "train_adv_acc": mean("adv_correct", "n") if adversarial else float("nan"),
        "E_nat": mean("e_nat", "n_nat"),
        **{col: mean(key, "n_nat") if nat_adv else float("nan")
           for col, key in (("E_adv", "e_adv"), ("dE_x", "de_x"), ("dE_xy", "de_xy"), ("der", "der"),
                            ("aae_frac", "aae"))},
        "aae_start_frac": mean("aae_start", "n_start"),
    }


class Objective(nn.Module):
    """One training step's loss as a module, so that DistributedDataParallel wraps exactly one forward per step
    (attack, natural and adversarial forwards, DER and GradAlign's double backprop all happen inside it).
    Returns the loss and this shard's diagnostic SUMS (device tensors; the image counts as ints).

    Losses are sums over this rank's shard scaled by world / global batch: DDP's gradient average then equals
    the gradient of the global-batch mean, whatever the shard sizes.
    """

    def __init__(self, model: nn.Module, run: RunCfg):
        super().__init__()
        self.model = model
        self.cfg, self.der = run.train, run.der
        self.method = METHODS[run.train.method]
        self.threat = self.method.threat(run.train)

    def forward(self, x: Tensor, y: Tensor, noise: Tensor | None, der_on: bool, diagnose: bool,
                global_batch: int) -> tuple[Tensor, dict[str, Tensor]]:
        m, cfg, der, model = self.method, self.cfg, self.der, self.model
        world = distributed.context().world
        scale = world / global_batch
        adv = m.attack(model, x, y, self.threat, noise, der_on and m.natural_from_attack)
        logits_nat = adv.logits_nat
        nat_grad = m.natural_trains or der_on
        if logits_nat is None and (nat_grad or diagnose):
            # a forward the method itself does not make must not move BatchNorm's running statistics
            frozen = contextlib.nullcontext() if m.natural_trains else bn_stats_frozen(model)
            with frozen, torch.set_grad_enabled(nat_grad):
                logits_nat = model(x)
        logits_adv = model(adv.x_adv) if adv.x_adv is not None else None
        loss = m.loss(logits_nat, logits_adv, y, cfg).sum() * scale
        if m.name == "gradalign":
            cos, valid = gradalign_cosines(model, x, y, cfg.eps, adv.grad_nat, noise)
            count = distributed.all_sum(valid.sum().float()).clamp_min(1)
            loss = loss + cfg.gradalign_weight() * (1 - (cos * valid).sum() * world / count)

        sums = {"adv_correct": (logits_adv.argmax(1) == y).sum() if logits_adv is not None else None}
        measured = diagnose and logits_nat is not None
        if measured:
            e_nat = E.energy(logits_nat.detach())
            sums.update(clean_correct=(logits_nat.detach().argmax(1) == y).sum(), e_nat=e_nat.sum())
        if logits_adv is not None and (der_on or measured):
            d_x, d_xy = E.delta_energies(logits_nat, logits_adv, y)  # with their graphs when DER is on
            mask = None
            if m.single_step:  # DER on the AAEs only
                mask = (E.aae_start_mask(adv.logits_start, logits_adv, y) if der.aae == "start"
                        else E.aae_mask(d_x.detach(), d_xy.detach()))
            per_sample = E.der_per_sample(d_x, d_xy, der.gamma, mask)
            if der_on:
                loss = loss + E.der_loss(per_sample, der.lam, mask, der.aae_norm, batch=global_batch, world=world,
                                         total=distributed.all_sum)
            if measured:
                d_x, d_xy = d_x.detach(), d_xy.detach()
                sums.update(e_adv=(e_nat - d_x).sum(), de_x=d_x.sum(), de_xy=d_xy.sum(),
                            der=per_sample.detach().sum(), aae=E.aae_mask(d_x, d_xy).sum())
        if diagnose and adv.logits_start is not None and logits_adv is not None:
            sums["aae_start"] = E.aae_start_mask(adv.logits_start, logits_adv.detach(), y).sum()
        sums["loss"] = loss.detach() * (global_batch / world)  # summed over ranks: the global mean × batch
        n = y.shape[0]
        sums.update(n=n, n_nat=n if measured else 0, n_start=n if "aae_start" in sums else 0)
        return loss, {k: v for k, v in sums.items() if v is not None}


@torch.no_grad()
def _predict(model: nn.Module, x: Tensor) -> Tensor:
    return model(x).argmax(1)


def validate(model: nn.Module, val: Split, cfg: TrainCfg, device: torch.device, seed: int,
             block: int = VAL_BLOCK) -> tuple[float, float]:
    """Clean and PGD-`val_steps` accuracy (one restart) on the first `n_val` validation images, eval mode.
    Each block of images draws its random starts from its own generator seeded by (seed, block), and the ranks
    split the blocks: the numbers do not depend on how many ranks there are."""
    was_training = model.training
    model.eval()
    threat = Threat(eps=cfg.eps, alpha=default_alpha("pgd", cfg.eps, cfg.val_steps), steps=cfg.val_steps)
    counts = torch.zeros(2, device=device)
    for b, rows in distributed.owned_blocks(cfg.n_val, block):
        x, y = to_float(val.x[rows], device), val.y[rows].to(device)
        gen = torch.Generator(device=device).manual_seed(distributed.block_seed(seed, "val-pgd", b))
        with autocast(device):
            counts[0] += (_predict(model, x) == y).sum()
            if cfg.eps > 0:
                counts[1] += (_predict(model, ATTACKS["pgd"](model, x, y, threat, generator=gen)) == y).sum()
    clean, robust = (distributed.all_sum(counts) / cfg.n_val).tolist()
    model.train(was_training)
    return clean, (robust if cfg.eps > 0 else float("nan"))


def make_optimizer(model: nn.Module, cfg: TrainCfg) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=cfg.lr_max, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def loss_backward(step_module: nn.Module, device: torch.device, x: Tensor, y: Tensor, noise: Tensor | None,
                  der_on: bool, diagnose: bool, global_batch: int) -> dict[str, Tensor]:
    """One step's loss and its gradients (accumulated into .grad); returns the diagnostic SUMS.

    Without autocast's cast cache, eagerly as in a CUDA graph (which cannot keep it): with the cache, a weight
    that two differentiable forwards use (DER's natural forward, GradAlign, TRADES) has its two gradients summed
    in bf16 before the cast back to fp32, without it in fp32, so replays and eager steps would differ (measured
    on an H200: up to 1.6e-2 in the weights after 13 steps; bit-identical without the cache)."""
    with autocast(device, cache=False):
        loss, sums = step_module(x, y, noise, der_on, diagnose, global_batch)
    loss.backward()
    return sums


class Trainer:
    """The model, its optimiser and the step of `run`'s method on this rank (DDP-wrapped under torchrun).

    Randomness of a step (attack starts, augmentation) is drawn for the whole global batch from a generator that
    every rank seeds alike, then sliced to the rank's shard: N ranks train exactly what one process would.
    """

    def __init__(self, model: nn.Module, run: RunCfg, device: torch.device, augmentation: str = "none",
                 cuda_graphs: bool = True):
        self.run, self.cfg, self.device, self.augmentation = run, run.train, device, augmentation
        self.method = METHODS[run.train.method]
        ctx = distributed.context()
        model.to(device)
        if device.type == "cuda":
            model.to(memory_format=torch.channels_last)
        if ctx.distributed and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            if device.type == "cuda":
                # the global batch's statistics, as on one GPU (the paper's recipe), instead of each shard's
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            else:
                log(f"{run.name}: BatchNorm with {ctx.world} CPU ranks normalises per rank (SyncBatchNorm needs "
                    "CUDA); results differ from one process")
        self.model = model
        self.objective = Objective(model, run)
        self.step_module: nn.Module = self.objective
        if ctx.distributed:
            self.step_module = DistributedDataParallel(
                self.objective, device_ids=[device.index] if device.type == "cuda" else None)
        self.optimizer = make_optimizer(model, run.train)
        self.graphs = None  # the step's forward and backward replayed from CUDA graphs (step_graphs.py)
        if cuda_graphs and device.type == "cuda":
            if ctx.distributed:
                log(f"{run.name}: CUDA graphs off under torchrun (DDP's gradient all-reduce is not captured)")
            else:
                # a partial, not a bound method: no Trainer <-> graphs cycle keeping the graphs' memory alive
                self.graphs = StepGraphs(partial(loss_backward, self.step_module, device), list(model.parameters()),
                                         device, run.train.batch_size)

    def step(self, xb: Tensor, yb: Tensor, lr: float, der_on: bool, diagnose: bool,
             gen: torch.Generator) -> dict[str, Tensor]:
        """One optimiser step on the global batch (uint8 images `xb`, labels `yb`, on the device); returns this
        rank's diagnostic SUMS."""
        b = yb.shape[0]
        part = distributed.shard(b)
        aug = draw_augmentation(b, self.augmentation, gen, self.device)
        xb = xb[part] if aug is None else augment(xb[part], aug[part])
        noise = None
        if self.method.noise is not None:
            shape = (b, *xb.shape[1:])
            noise = (torch.randn(shape, generator=gen, device=self.device) if self.method.noise == "normal" else
                     torch.rand(shape, generator=gen, device=self.device).mul_(2).sub_(1))[part]
        x, y = to_float(xb, self.device), yb[part]
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.graphs is not None:
            sums = self.graphs((x, y, noise), (der_on, diagnose, b))
        else:
            self.optimizer.zero_grad(set_to_none=True)
            sums = loss_backward(self.step_module, self.device, x, y, noise, der_on, diagnose, b)
        self.optimizer.step()
        return sums


EpochCallback = Callable[[dict], None]


class BestEpoch:
    """Checkpoint selection: validation PGD accuracy for adversarial training, clean accuracy for `standard`. A DER
    run's best epoch is chosen among its epochs with DER on, so that its `best` checkpoint is always a DER model."""

    def __init__(self, adversarial: bool, use_der: bool, history: list[dict]):
        self.key = "val_pgd_acc" if adversarial else "val_clean_acc"
        self.der_only = use_der
        self.value = max((r[self.key] for r in history if self.eligible(r)), default=-1.0)

    def eligible(self, row: dict) -> bool:
        return bool(row["der_on"]) if self.der_only else True

    def update(self, row: dict) -> bool:
        """Whether `row`, the next epoch's, is the best so far (then remembered as such)."""
        is_best = self.eligible(row) and row[self.key] > self.value
        if is_best:
            self.value = row[self.key]
        return is_best


def restore(model: nn.Module, optimizer: torch.optim.Optimizer, resume: dict | None) -> tuple[list[dict], int]:
    """The history and the last finished epoch of `resume` (as `fit` reports it), its weights and optimiser state
    loaded; ([], 0) for a fresh run."""
    if resume is None:
        return [], 0
    model.load_state_dict(resume["model"])
    optimizer.load_state_dict(resume["optimizer"])
    return list(resume["history"]), int(resume["epoch"])


def training_images(train: Split, cfg: TrainCfg, device: torch.device) -> tuple[Tensor, Tensor]:
    """The first `n_train` training images and labels (all of them when 0), on the device."""
    x, y = train.x, train.y
    if cfg.n_train:
        x, y = x[: cfg.n_train], y[: cfg.n_train]
    return x.to(device), y.to(device)


def der_active(run: RunCfg, use_der: bool, epoch: int) -> bool:
    """Whether DER is on in `epoch`: every epoch of single-step AT, the late epochs of multi-step AT."""
    method = METHODS[run.train.method]
    return use_der and method.adversarial and (method.single_step or run.der.active(epoch, run.train.epochs))


def train_epoch(trainer: Trainer, x: Tensor, y: Tensor, epoch: int, der_on: bool, es: int) -> dict[str, Tensor | int]:
    """One epoch of optimiser steps on the images (x, y) shuffled, its randomness seeded by `es`; returns this
    rank's SUMS, device tensors (no sync per step)."""
    cfg = trainer.cfg
    torch.manual_seed(es)
    order_gen = torch.Generator(device="cpu").manual_seed(es)
    step_gen = torch.Generator(device=trainer.device).manual_seed(es)
    steps_per_epoch = math.ceil(x.shape[0] / cfg.batch_size)
    acc: dict[str, Tensor | int] = {}
    trainer.model.train()
    inner = progress(batches(x, y, cfg.batch_size, shuffle=True, generator=order_gen),
                     total=steps_per_epoch, desc=f"epoch {epoch}")
    for i, (xb, yb) in enumerate(inner):
        lr = learning_rate(cfg, epoch - 1 + i / steps_per_epoch)
        for k, v in trainer.step(xb, yb, lr, der_on, diagnosed(cfg, i), step_gen).items():
            acc[k] = acc.get(k, 0) + v
    return acc


def epoch_row(trainer: Trainer, acc: dict[str, Tensor | int], val: Split, epoch: int, der_on: bool, es: int,
              t0: float) -> dict:
    """The history row (HISTORY_COLUMNS) of a finished epoch begun at `t0`: the SUMS of every rank, validation."""
    cfg, device = trainer.cfg, trainer.device
    sums = torch.stack([torch.as_tensor(acc.get(k, 0), device=device, dtype=torch.float64) for k in SUMS])
    totals = dict(zip(SUMS, distributed.all_sum(sums).tolist()))
    val_clean, val_pgd = validate(trainer.model, val, cfg, device, es)
    # lr at mid-epoch: for piecewise schedules, the LR the whole epoch used
    row = {"epoch": epoch, "lr": learning_rate(cfg, epoch - 0.5), **history_row(totals, trainer.method.adversarial),
           "val_clean_acc": val_clean, "val_pgd_acc": val_pgd, "der_on": int(der_on),
           "seconds": time.perf_counter() - t0}
    return {k: row[k] for k in HISTORY_COLUMNS}


def fit(model: nn.Module, train: Split, val: Split, run: RunCfg, use_der: bool, device: torch.device, seed: int,
        resume: dict | None = None, on_epoch_end: EpochCallback | None = None, augmentation: str = "none",
        cuda_graphs: bool = True) -> list[dict]:
    """Train `model` for `run.train.epochs` epochs; returns the per-epoch history (rows of HISTORY_COLUMNS).

    `resume`: {"epoch", "history", "model", "optimizer"} as passed to `on_epoch_end` after an earlier epoch.
    `on_epoch_end` receives that dict plus "row" and "is_best" (`BestEpoch`) after every epoch, on every rank (the
    caller writes on rank 0). `cuda_graphs`: on a CUDA device in one process, replay each step's forward and
    backward from CUDA graphs (step_graphs.py; the same kernels, without issuing them one by one).
    """
    cfg = run.train
    trainer = Trainer(model, run, device, augmentation, cuda_graphs)
    history, start = restore(model, trainer.optimizer, resume)
    best = BestEpoch(trainer.method.adversarial, use_der, history)
    x_train, y_train = training_images(train, cfg, device)
    bar = progress(total=cfg.epochs, initial=start, desc=f"{run.name} epochs")
    for epoch in range(start + 1, cfg.epochs + 1):
        es, der_on, t0 = epoch_seed(seed, epoch), der_active(run, use_der, epoch), time.perf_counter()
        acc = train_epoch(trainer, x_train, y_train, epoch, der_on, es)
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise UserError(f"{run.name}: weights became non-finite in epoch {epoch}; lower lr_max (now {cfg.lr_max})")
        history.append(row := epoch_row(trainer, acc, val, epoch, der_on, es, t0))
        is_best = best.update(row)
        bar.update(1)
        bar.set_postfix(clean=f"{row['val_clean_acc']:.3f}", pgd=f"{row['val_pgd_acc']:.3f}",
                        aae=f"{row['aae_frac']:.2f}")
        if on_epoch_end is not None:
            on_epoch_end({"epoch": epoch, "history": list(history), "row": row, "is_best": is_best,
                          "model": model.state_dict(), "optimizer": trainer.optimizer.state_dict()})
    bar.close()
    return history
