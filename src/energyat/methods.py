"""Training methods (registry): which attack makes x*, and the loss on (f(x), f(x*)) before DER.

Single-step methods apply DER to abnormal adversarial examples only; multi-step methods to the
whole batch once `der.start_epoch` is reached (DESIGN.md §1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn.functional as F
from torch import Tensor

from .attacks import Threat, default_alpha
from .params import MULTI_STEP, SINGLE_STEP, TrainCfg

LossFn = Callable[[Tensor, Tensor | None, Tensor, TrainCfg], Tensor]


@dataclass(frozen=True)
class Method:
    name: str
    attack: str | None  # key of attacks.ATTACKS; None: no adversarial example
    loss: LossFn
    needs_natural_grad: bool  # whether the loss itself differentiates through f(x)

    @property
    def single_step(self) -> bool:
        return self.name in SINGLE_STEP

    @property
    def multi_step(self) -> bool:
        return self.name in MULTI_STEP

    def threat(self, cfg: TrainCfg) -> Threat:
        steps = cfg.steps if self.multi_step else 1
        return Threat(eps=cfg.eps, alpha=cfg.alpha or default_alpha(self.name, cfg.eps, steps), steps=steps)


def _natural_ce(logits_nat: Tensor, logits_adv: Tensor | None, y: Tensor, cfg: TrainCfg) -> Tensor:
    return F.cross_entropy(logits_nat, y)


def _adversarial_ce(logits_nat: Tensor, logits_adv: Tensor | None, y: Tensor, cfg: TrainCfg) -> Tensor:
    return F.cross_entropy(logits_adv, y)


def _trades(logits_nat: Tensor, logits_adv: Tensor | None, y: Tensor, cfg: TrainCfg) -> Tensor:
    kl = F.kl_div(F.log_softmax(logits_adv, 1), F.softmax(logits_nat, 1), reduction="batchmean")
    return F.cross_entropy(logits_nat, y) + cfg.trades_beta * kl


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("standard", None, _natural_ce, needs_natural_grad=True),
        Method("fgsm", "fgsm", _adversarial_ce, needs_natural_grad=False),
        Method("rs-fgsm", "rs-fgsm", _adversarial_ce, needs_natural_grad=False),
        Method("n-fgsm", "n-fgsm", _adversarial_ce, needs_natural_grad=False),
        Method("pgd", "pgd", _adversarial_ce, needs_natural_grad=False),
        Method("trades", "trades", _trades, needs_natural_grad=True),
    )
}
