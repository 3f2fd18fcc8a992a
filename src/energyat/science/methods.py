"""Training methods (registry): how each makes x*, its loss on (f(x), f(x*)) before DER, and what it does to
BatchNorm — each as its reference code does it.

| method    | attack generated in | running statistics updated by                         | reference              |
|-----------|---------------------|-------------------------------------------------------|------------------------|
| standard  | –                   | the natural batch                                     |                        |
| fgsm      | train mode          | the attack's forward at x (= the natural batch), x*   | Wong et al. 2020       |
| rs-fgsm   | train mode          | the attack's forward at the random start, x*          | Wong et al. 2020       |
| n-fgsm    | train mode          | the attack's forward at the noisy start, x*           | de Jorge et al. 2022   |
| gradalign | train mode          | x (FGSM), x + η (the alignment gradient), x*          | Andriushchenko & Flammarion 2020 |
| pgd       | train mode          | every PGD iterate, x*                                 | Rice et al. 2020       |
| trades    | eval mode           | the natural batch, x*                                 | Zhang et al. 2019      |

Forward passes the method itself does not make never touch the running statistics: the natural-image forward
of the energy diagnostics and of DER runs under `bn_stats_frozen`, so a base run with diagnostics trains exactly
the reference algorithm and DER changes the loss only. (TRADES' reference forwards the natural batch twice in
train mode, updating the statistics twice with it; we forward it once.)

Single-step methods apply DER to abnormal adversarial examples only; multi-step methods to the whole batch once
`der.start_epoch` is reached (docs/design.md §1).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..params import MULTI_STEP, SINGLE_STEP, TrainCfg
from .attacks import Threat, default_alpha, pgd_attack, single_step, trades_attack


@contextmanager
def bn_stats_frozen(model: nn.Module):
    """Forward passes inside leave every BatchNorm's running statistics exactly as they were (a momentum of 0
    keeps running mean/var bit-identical; the batch counter is restored), while still normalising with the batch
    statistics of train mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(bns, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


@dataclass
class Adversarial:
    """What a method's attack produced: x*, and the logits it saw on the way (None where it saw none)."""

    x_adv: Tensor | None
    logits_nat: Tensor | None = None  # f(x) in train mode, with its graph when asked (zero-init FGSM)
    logits_start: Tensor | None = None  # f(x_start) of a single-step attack, detached
    grad_nat: Tensor | None = None  # ∇ₓ CE at x (zero-init FGSM), detached


AttackFn = Callable[[nn.Module, Tensor, Tensor, Threat, Tensor | None, bool], Adversarial]


def _none(model, x, y, threat, noise, keep_graph) -> Adversarial:
    return Adversarial(None)


def _fgsm(model, x, y, threat, noise, keep_graph) -> Adversarial:
    # zero init: the attack's own forward at x is the natural forward, so diagnostics and DER reuse it. x* in the
    # ε-ball whatever alpha, as the reference clamps δ to [-ε, ε]
    step = single_step(model, x, y, threat.alpha, project=threat.eps, keep_graph=keep_graph)
    return Adversarial(step.x_adv, step.start_logits, step.start_logits.detach(), step.start_grad)


def _rs_fgsm(model, x, y, threat, noise, keep_graph) -> Adversarial:
    step = single_step(model, x, y, threat.alpha, start=threat.eps * noise, project=threat.eps)
    return Adversarial(step.x_adv, logits_start=step.start_logits)


def _n_fgsm(model, x, y, threat, noise, keep_graph) -> Adversarial:
    step = single_step(model, x, y, threat.alpha, start=2 * threat.eps * noise)
    return Adversarial(step.x_adv, logits_start=step.start_logits)


def _pgd(model, x, y, threat, noise, keep_graph) -> Adversarial:
    return Adversarial(pgd_attack(model, x, y, threat, start=threat.eps * noise))


def _trades(model, x, y, threat, noise, keep_graph) -> Adversarial:
    model.eval()
    try:
        return Adversarial(trades_attack(model, x, threat, noise))
    finally:
        model.train()


def _natural_ce(logits_nat: Tensor, logits_adv: Tensor | None, y: Tensor, cfg: TrainCfg) -> Tensor:
    return F.cross_entropy(logits_nat.float(), y, reduction="none")


def _adversarial_ce(logits_nat: Tensor | None, logits_adv: Tensor, y: Tensor, cfg: TrainCfg) -> Tensor:
    return F.cross_entropy(logits_adv.float(), y, reduction="none")


def _trades_loss(logits_nat: Tensor, logits_adv: Tensor, y: Tensor, cfg: TrainCfg) -> Tensor:
    logits_nat, logits_adv = logits_nat.float(), logits_adv.float()
    kl = F.kl_div(F.log_softmax(logits_adv, 1), F.softmax(logits_nat, 1), reduction="none").sum(1)
    return F.cross_entropy(logits_nat, y, reduction="none") + cfg.trades_beta * kl


def gradalign_cosines(model: nn.Module, x: Tensor, y: Tensor, eps: float, grad_nat: Tensor, noise: Tensor
                      ) -> tuple[Tensor, Tensor]:
    """Per sample cos(∇ₓℓ(x), ∇ₓℓ(x + η)), η = eps·noise (noise ~ U(-1, 1)), differentiable in the weights
    (double backprop through the second gradient; the first is detached, as in the reference code), and the
    mask of samples where both gradients are non-zero (the reference averages over those only)."""
    delta = (eps * noise).requires_grad_(True)
    loss = F.cross_entropy(model(x + delta).float(), y)
    (grad_noisy,) = torch.autograd.grad(loss, delta, create_graph=True)
    g1, g2 = grad_nat.flatten(1), grad_noisy.flatten(1)
    n1, n2 = g1.norm(dim=1), g2.norm(dim=1)
    valid = (n1 > 0) & (n2 > 0)
    cos = (g1 * g2).sum(1) / (n1 * n2).clamp_min(torch.finfo(g2.dtype).tiny)
    return cos, valid


LossFn = Callable[[Tensor | None, Tensor | None, Tensor, TrainCfg], Tensor]


@dataclass(frozen=True)
class Method:
    name: str
    attack: AttackFn
    loss: LossFn  # per-sample loss before DER and regularisers
    noise: str | None  # per-image start noise the attack needs: "uniform" (U(-1, 1)), "normal" or None
    natural_trains: bool  # its loss differentiates through f(x): the natural forward is part of the method

    @property
    def adversarial(self) -> bool:
        return self.name != "standard"

    @property
    def single_step(self) -> bool:
        return self.name in SINGLE_STEP

    @property
    def multi_step(self) -> bool:
        return self.name in MULTI_STEP

    @property
    def natural_from_attack(self) -> bool:
        """Whether the attack's own forward gives the natural logits (zero-init FGSM and GradAlign)."""
        return self.name in ("fgsm", "gradalign")

    def threat(self, cfg: TrainCfg) -> Threat:
        steps = cfg.steps if self.multi_step else 1
        return Threat(eps=cfg.eps, alpha=cfg.alpha or default_alpha(self.name, cfg.eps, steps), steps=steps)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("standard", _none, _natural_ce, None, natural_trains=True),
        Method("fgsm", _fgsm, _adversarial_ce, None, natural_trains=False),
        Method("rs-fgsm", _rs_fgsm, _adversarial_ce, "uniform", natural_trains=False),
        Method("n-fgsm", _n_fgsm, _adversarial_ce, "uniform", natural_trains=False),
        Method("gradalign", _fgsm, _adversarial_ce, "uniform", natural_trains=False),
        Method("pgd", _pgd, _adversarial_ce, "uniform", natural_trains=False),
        Method("trades", _trades, _trades_loss, "normal", natural_trains=True),
    )
}
