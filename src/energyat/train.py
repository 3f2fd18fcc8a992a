"""The training loop: method objective + optional DER, LR schedule, per-epoch energy diagnostics.

`fit` touches no files: it reports every finished epoch to `on_epoch_end`, which the stage uses to
write checkpoints, and it resumes from a state dict. Each epoch reseeds the RNGs from (seed, epoch),
so a resumed run replays exactly the epochs an uninterrupted one would have.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from . import energy as E
from .attacks import ATTACKS, Threat, default_alpha
from .data import Split, batches, to_float
from .errors import UserError
from .methods import METHODS, Method
from .params import RunCfg, TrainCfg
from .runtime import autocast, progress

HISTORY_COLUMNS = (
    "epoch", "lr", "train_loss", "train_clean_acc", "train_adv_acc", "val_clean_acc", "val_pgd_acc",
    "E_nat", "E_adv", "dE_x", "dE_xy", "der", "aae_frac", "der_on", "seconds",
)


def learning_rate(cfg: TrainCfg, t: float) -> float:
    """LR at fractional epoch `t` in [0, epochs]."""
    if cfg.lr_schedule == "cyclic":  # fast-AT: linear up to lr_max at mid-training, back to 0
        return float(np.interp(t, [0, cfg.epochs / 2, cfg.epochs], [0, cfg.lr_max, 0]))
    if cfg.lr_schedule == "piecewise":  # robust-overfitting: x0.1 at each milestone
        return cfg.lr_max * 0.1 ** sum(t >= m * cfg.epochs for m in cfg.lr_milestones)
    return cfg.lr_max


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 100_003 + epoch


@dataclass
class BatchStats:
    """Running sums of the per-sample diagnostics of one epoch."""

    n: int = 0
    loss: float = 0.0
    clean_correct: int = 0
    adv_correct: int = 0
    e_nat: float = 0.0
    e_adv: float = 0.0
    de_x: float = 0.0
    de_xy: float = 0.0
    der: float = 0.0
    aae: int = 0

    def add(self, loss: Tensor, logits_nat: Tensor, logits_adv: Tensor | None, y: Tensor, der_value: Tensor | None):
        b = y.shape[0]
        self.n += b
        self.loss += loss.item() * b
        self.clean_correct += (logits_nat.argmax(1) == y).sum().item()
        self.e_nat += E.energy(logits_nat).sum().item()
        if logits_adv is not None:
            d_x, d_xy = E.delta_energies(logits_nat, logits_adv, y)
            self.adv_correct += (logits_adv.argmax(1) == y).sum().item()
            self.e_adv += E.energy(logits_adv).sum().item()
            self.de_x += d_x.sum().item()
            self.de_xy += d_xy.sum().item()
            self.aae += (d_x < d_xy).sum().item()
            self.der += der_value.item() * b

    def row(self, adversarial: bool) -> dict:
        n, nan = max(self.n, 1), float("nan")
        return {
            "train_loss": self.loss / n,
            "train_clean_acc": self.clean_correct / n,
            "train_adv_acc": self.adv_correct / n if adversarial else nan,
            "E_nat": self.e_nat / n,
            "E_adv": self.e_adv / n if adversarial else nan,
            "dE_x": self.de_x / n if adversarial else nan,
            "dE_xy": self.de_xy / n if adversarial else nan,
            "der": self.der / n if adversarial else nan,
            "aae_frac": self.aae / n if adversarial else nan,
        }


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, method: Method, threat: Threat,
               cfg: TrainCfg, der_weight: float, gamma: float, device: torch.device, stats: BatchStats) -> None:
    """One optimiser step of `method`, plus λ·DER when `der_weight` > 0."""
    with autocast(device):
        x_adv = ATTACKS[method.attack](model, x, y, threat) if method.attack else None
        grad_nat = method.needs_natural_grad or der_weight > 0
        with torch.set_grad_enabled(grad_nat):
            logits_nat = model(x)
        logits_adv = model(x_adv) if x_adv is not None else None
        loss = method.loss(logits_nat, logits_adv, y, cfg)
        der_value = None
        if logits_adv is not None:
            mask = E.aae_mask(logits_nat, logits_adv, y) if method.single_step else None
            der_value = E.der_loss(logits_nat.float(), logits_adv.float(), y, gamma, mask)
            if der_weight > 0:
                loss = loss + der_weight * der_value
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    stats.add(loss.detach(), logits_nat.detach().float(), None if logits_adv is None else logits_adv.detach().float(),
              y, None if der_value is None else der_value.detach())


@torch.no_grad()
def _predict(model: nn.Module, x: Tensor) -> Tensor:
    return model(x).argmax(1)


def validate(model: nn.Module, val: Split, cfg: TrainCfg, device: torch.device, batch_size: int = 500) -> tuple[float, float]:
    """Clean and PGD-`val_steps` accuracy (one restart) on the first `n_val` validation images, eval mode."""
    was_training = model.training
    model.eval()
    threat = Threat(eps=cfg.eps, alpha=default_alpha("pgd", cfg.eps, cfg.val_steps), steps=cfg.val_steps)
    x_all, y_all = val.x[: cfg.n_val], val.y[: cfg.n_val]
    clean = robust = 0
    for xb, yb in batches(x_all, y_all, batch_size):
        x, y = to_float(xb, device), yb.to(device)
        with autocast(device):
            clean += (_predict(model, x) == y).sum().item()
            if cfg.eps > 0:
                robust += (_predict(model, ATTACKS["pgd"](model, x, y, threat)) == y).sum().item()
    model.train(was_training)
    n = x_all.shape[0]
    return clean / n, (robust / n if cfg.eps > 0 else float("nan"))


def make_optimizer(model: nn.Module, cfg: TrainCfg) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=cfg.lr_max, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


EpochCallback = Callable[[dict], None]


def fit(model: nn.Module, train: Split, val: Split, run: RunCfg, use_der: bool, device: torch.device, seed: int,
        resume: dict | None = None, on_epoch_end: EpochCallback | None = None) -> list[dict]:
    """Train `model` for `run.train.epochs` epochs; returns the per-epoch history (rows of HISTORY_COLUMNS).

    `resume`: {"epoch", "history", "model", "optimizer"} as passed to `on_epoch_end` after an earlier epoch.
    `on_epoch_end` receives that dict plus "row" and "is_best" after every epoch.
    """
    cfg, method = run.train, METHODS[run.train.method]
    threat = method.threat(cfg)
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, cfg)
    history: list[dict] = []
    start = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        history, start = list(resume["history"]), int(resume["epoch"])
    # checkpoint selection: validation PGD accuracy for adversarial training, clean accuracy for `standard`
    select = "val_pgd_acc" if method.attack else "val_clean_acc"
    best = max((r[select] for r in history), default=-1.0)

    x_train, y_train = train.x, train.y
    if cfg.n_train:
        x_train, y_train = x_train[: cfg.n_train], y_train[: cfg.n_train]
    x_train, y_train = x_train.to(device), y_train.to(device)
    steps_per_epoch = math.ceil(x_train.shape[0] / cfg.batch_size)
    bar = progress(total=cfg.epochs, initial=start, desc=f"{run.name} epochs")
    for epoch in range(start + 1, cfg.epochs + 1):
        torch.manual_seed(epoch_seed(seed, epoch))
        gen = torch.Generator(device="cpu").manual_seed(epoch_seed(seed, epoch))
        der_on = use_der and method.attack is not None and (method.single_step or run.der.active(epoch, cfg.epochs))
        der_weight = run.der.lam if der_on else 0.0
        stats, t0 = BatchStats(), time.perf_counter()
        model.train()
        inner = progress(batches(x_train, y_train, cfg.batch_size, shuffle=True, generator=gen),
                         total=steps_per_epoch, desc=f"epoch {epoch}")
        for i, (xb, yb) in enumerate(inner):
            lr = learning_rate(cfg, epoch - 1 + i / steps_per_epoch)
            for group in opt.param_groups:
                group["lr"] = lr
            x = to_float(xb, device)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            train_step(model, opt, x, yb, method, threat, cfg, der_weight, run.der.gamma, device, stats)
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise UserError(f"{run.name}: weights became non-finite in epoch {epoch}; lower lr_max (now {cfg.lr_max})")
        val_clean, val_pgd = validate(model, val, cfg, device)
        # lr at mid-epoch: for piecewise schedules, the LR the whole epoch used
        row = {"epoch": epoch, "lr": learning_rate(cfg, epoch - 0.5), **stats.row(method.attack is not None),
               "val_clean_acc": val_clean, "val_pgd_acc": val_pgd, "der_on": int(der_on),
               "seconds": time.perf_counter() - t0}
        history.append({k: row[k] for k in HISTORY_COLUMNS})
        is_best = row[select] > best
        best = max(best, row[select])
        bar.update(1)
        bar.set_postfix(clean=f"{val_clean:.3f}", pgd=f"{val_pgd:.3f}", aae=f"{row['aae_frac']:.2f}")
        if on_epoch_end is not None:
            on_epoch_end({"epoch": epoch, "history": list(history), "row": history[-1], "is_best": is_best,
                          "model": model.state_dict(), "optimizer": opt.state_dict()})
    bar.close()
    return history


RO_WINDOW = 5  # epochs per mean of the smoothed robust-overfitting gap


def summarize(history: list[dict], num_classes: int, co_drop: float, adversarial: bool = True,
              window: int = RO_WINDOW) -> dict:
    """Run-level metrics from the per-epoch history: final/best validation accuracies, CO, divergence, RO gap.
    A non-adversarial run (`adversarial=False`) is selected by clean accuracy and has no CO / RO verdict.

    Catastrophic overfitting: validation PGD accuracy falls below both `co_drop` × its best so far and chance level,
    while clean accuracy stays above twice chance; a clean accuracy falling back near chance (below twice chance,
    after having been above it) is divergence, not CO. Robust overfitting: best − last validation PGD accuracy, and
    the same on means over `window` consecutive epochs (best window − last window), which epoch-to-epoch noise
    inflates far less than the single-epoch gap.
    """
    chance = 1.0 / num_classes
    co_epoch = diverged_epoch = None
    best_so_far = best_clean_so_far = -1.0
    for r in history:
        collapsed_clean = r["val_clean_acc"] < 2 * chance
        if collapsed_clean and diverged_epoch is None and best_clean_so_far >= 2 * chance:
            diverged_epoch = r["epoch"]
        best_clean_so_far = max(best_clean_so_far, r["val_clean_acc"])
        if (adversarial and co_epoch is None and not collapsed_clean and r["val_pgd_acc"] < chance
                and r["val_pgd_acc"] < co_drop * best_so_far):
            co_epoch = r["epoch"]
        best_so_far = max(best_so_far, r["val_pgd_acc"])
    key = "val_pgd_acc" if adversarial else "val_clean_acc"
    best = max(history, key=lambda r: r[key])
    last = history[-1]
    pgd = [r["val_pgd_acc"] for r in history]
    w = min(window, len(pgd))
    means = [sum(pgd[i:i + w]) / w for i in range(len(pgd) - w + 1)]
    return {
        "epochs": len(history),
        "final_val_clean_acc": last["val_clean_acc"],
        "final_val_pgd_acc": last["val_pgd_acc"],
        "best_epoch": best["epoch"],
        "best_val_clean_acc": best["val_clean_acc"],
        "best_val_pgd_acc": best["val_pgd_acc"],
        "catastrophic_overfitting": co_epoch is not None,
        "co_epoch": co_epoch,
        "co_at_end": co_epoch is not None and last["val_pgd_acc"] < co_drop * best["val_pgd_acc"],
        "diverged": diverged_epoch is not None,
        "diverged_epoch": diverged_epoch,
        "robust_overfitting_gap": best["val_pgd_acc"] - last["val_pgd_acc"] if adversarial else float("nan"),
        "robust_overfitting_gap_smoothed": max(means) - means[-1] if adversarial else float("nan"),
        "final_dE_x": last["dE_x"],
        "final_dE_xy": last["dE_xy"],
        "final_aae_frac": last["aae_frac"],
        "max_aae_frac": max(r["aae_frac"] for r in history),
        "train_seconds": sum(r["seconds"] for r in history),
    }
