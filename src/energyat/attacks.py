"""L∞ attacks: `(model, x, y, threat) -> x_adv`, images in [0, 1].

Attacks use the model in whatever train/eval mode the caller set, and never touch parameter
gradients (they differentiate with respect to the input only).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class Threat:
    eps: float
    alpha: float  # step size; single-step attacks take one step of this size
    steps: int = 1
    restarts: int = 1


Attack = Callable[[nn.Module, Tensor, Tensor, Threat], Tensor]
ATTACKS: dict[str, Attack] = {}


def register(name: str):
    def wrap(fn):
        ATTACKS[name] = fn
        return fn

    return wrap


def ce_loss(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def cw_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Carlini-Wagner margin: best other logit minus the true one (positive = misclassified)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return other - true


LOSSES = {"ce": ce_loss, "cw": cw_loss}


def input_grad(model: nn.Module, x: Tensor, y: Tensor, loss_fn=ce_loss) -> Tensor:
    """∇ₓ Σ loss(model(x), y), without leaving gradients on the parameters."""
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_fn(model(x), y).sum(), x)
    return grad


def _uniform(x: Tensor, radius: float) -> Tensor:
    return torch.empty_like(x).uniform_(-radius, radius)


@register("fgsm")
def fgsm(model: nn.Module, x: Tensor, y: Tensor, threat: Threat) -> Tensor:
    """One signed-gradient step of size α from the natural image (Goodfellow et al.)."""
    return (x + threat.alpha * input_grad(model, x, y).sign()).clamp(0, 1).detach()


@register("rs-fgsm")
def rs_fgsm(model: nn.Module, x: Tensor, y: Tensor, threat: Threat) -> Tensor:
    """FGSM from a uniform start in the ε-ball, step α (default 1.25ε), projected back (Wong et al. 2020)."""
    delta = _uniform(x, threat.eps)
    start = (x + delta).clamp(0, 1)
    step = threat.alpha * input_grad(model, start, y).sign()
    delta = (start - x + step).clamp(-threat.eps, threat.eps)
    return (x + delta).clamp(0, 1).detach()


@register("n-fgsm")
def n_fgsm(model: nn.Module, x: Tensor, y: Tensor, threat: Threat) -> Tensor:
    """Noise U(-2ε, 2ε) then a step α (default ε), no projection to the ε-ball (de Jorge et al. 2022)."""
    start = (x + _uniform(x, 2 * threat.eps)).clamp(0, 1)
    return (start + threat.alpha * input_grad(model, start, y).sign()).clamp(0, 1).detach()


def pgd_attack(model: nn.Module, x: Tensor, y: Tensor, threat: Threat, loss: str = "ce",
               random_start: bool = True) -> Tensor:
    """PGD-k with random start; across restarts keeps, per sample, a misclassifying point if one was found,
    otherwise the highest-loss one."""
    loss_fn = LOSSES[loss]
    best, best_score = x.detach().clone(), torch.full((x.shape[0],), -float("inf"), device=x.device)
    for _ in range(threat.restarts):
        delta = _uniform(x, threat.eps) if random_start else torch.zeros_like(x)
        delta = ((x + delta).clamp(0, 1) - x).detach()
        for _ in range(threat.steps):
            grad = input_grad(model, x + delta, y, loss_fn)
            delta = (delta + threat.alpha * grad.sign()).clamp(-threat.eps, threat.eps)
            delta = ((x + delta).clamp(0, 1) - x).detach()
        with torch.no_grad():
            logits = model(x + delta)
            score = loss_fn(logits, y) + 1e6 * (logits.argmax(1) != y)
            better = score > best_score
            best[better] = (x + delta)[better]
            best_score = torch.where(better, score, best_score)
    return best


@register("pgd")
def pgd(model: nn.Module, x: Tensor, y: Tensor, threat: Threat) -> Tensor:
    return pgd_attack(model, x, y, threat, loss="ce")


@register("cw")
def cw(model: nn.Module, x: Tensor, y: Tensor, threat: Threat) -> Tensor:
    """PGD on the CW margin loss (the 'CW∞' attack of the robustness literature)."""
    return pgd_attack(model, x, y, threat, loss="cw")


@register("trades")
def trades_kl(model: nn.Module, x: Tensor, y: Tensor, threat: Threat) -> Tensor:
    """TRADES inner maximisation: PGD on KL(f(x) ‖ f(x*)) from x + 0.001·N(0, I) (Zhang et al. 2019)."""
    with torch.no_grad():
        p_nat = F.softmax(model(x), dim=1)
    x_adv = (x + 0.001 * torch.randn_like(x)).clamp(0, 1).detach()
    for _ in range(threat.steps):
        x_adv.requires_grad_(True)
        kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), p_nat, reduction="sum")
        (grad,) = torch.autograd.grad(kl, x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + threat.alpha * grad.sign(), x - threat.eps), x + threat.eps)
        x_adv = x_adv.clamp(0, 1)
    return x_adv.detach()


def default_alpha(method: str, eps: float, steps: int) -> float:
    """The step size each method's paper uses when `train.alpha` is 0."""
    if method == "rs-fgsm":
        return 1.25 * eps
    if method in ("fgsm", "n-fgsm"):
        return eps
    return 2.5 * eps / steps  # PGD / TRADES: ε/4 for 10 steps (2/255 at 8/255, as Rice et al.)
