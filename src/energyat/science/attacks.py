"""L∞ attacks: `(model, x, y, threat, generator=None) -> x_adv`, images in [0, 1].

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


Attack = Callable[..., Tensor]  # (model, x, y, threat, generator=None) -> x_adv
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


def uniform_noise(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """U(-1, 1) noise shaped like `x`, from `generator` (on x's device) or the global RNG."""
    return torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype).mul_(2).sub_(1)


@dataclass
class Step:
    """A single-step attack and what it saw at its starting point (reused by the training step)."""

    x_adv: Tensor
    start_logits: Tensor  # f(x_start); keeps its graph when asked (zero-init FGSM: the natural logits)
    start_grad: Tensor  # ∇ₓ CE(f(x_start), y) summed over the batch, detached


def single_step(model: nn.Module, x: Tensor, y: Tensor, alpha: float, *, start: Tensor | None = None,
                project: float | None = None, keep_graph: bool = False) -> Step:
    """One signed-gradient step of size `alpha` from `x + start` (clamped to [0, 1]; zero start: plain FGSM),
    projected onto the L∞ ball of radius `project` around x when given. `keep_graph` keeps f(x_start)'s graph
    so that a training loss may differentiate through it (DER at the natural point of zero-init FGSM)."""
    x_start = x if start is None else (x + start).clamp(0, 1)
    x_start = x_start.detach().requires_grad_(True)
    logits = model(x_start)
    (grad,) = torch.autograd.grad(ce_loss(logits, y).sum(), x_start, retain_graph=keep_graph)
    x_adv = x_start.detach() + alpha * grad.sign()
    # a zero-start step no longer than the radius stays in the ball: projecting it would only re-round x*
    if project is not None and (start is not None or alpha > project):
        x_adv = x + (x_adv - x).clamp(-project, project)
    return Step(x_adv.clamp(0, 1).detach(), logits if keep_graph else logits.detach(), grad)


@register("fgsm")
def fgsm(model: nn.Module, x: Tensor, y: Tensor, threat: Threat, generator: torch.Generator | None = None) -> Tensor:
    """One signed-gradient step of size α from the natural image (Goodfellow et al.), in the ε-ball."""
    return single_step(model, x, y, threat.alpha, project=threat.eps).x_adv


@register("rs-fgsm")
def rs_fgsm(model: nn.Module, x: Tensor, y: Tensor, threat: Threat, generator: torch.Generator | None = None) -> Tensor:
    """FGSM from a uniform start in the ε-ball, step α (default 1.25ε), projected back (Wong et al. 2020)."""
    start = threat.eps * uniform_noise(x, generator)
    return single_step(model, x, y, threat.alpha, start=start, project=threat.eps).x_adv


@register("n-fgsm")
def n_fgsm(model: nn.Module, x: Tensor, y: Tensor, threat: Threat, generator: torch.Generator | None = None) -> Tensor:
    """Noise U(-2ε, 2ε) then a step α (default ε), no projection to the ε-ball (de Jorge et al. 2022)."""
    return single_step(model, x, y, threat.alpha, start=2 * threat.eps * uniform_noise(x, generator)).x_adv


def pgd_attack(model: nn.Module, x: Tensor, y: Tensor, threat: Threat, loss: str = "ce",
               random_start: bool = True, generator: torch.Generator | None = None,
               start: Tensor | None = None) -> Tensor:
    """PGD-k with random start; across restarts keeps, per sample, a misclassifying point if one was found,
    otherwise the highest-loss one. Random starts come from `generator` (global RNG when None); `start`, a
    perturbation in the ε-ball, replaces the first restart's draw (training draws it for the global batch)."""
    loss_fn = LOSSES[loss]
    best, best_score = x.detach().clone(), torch.full((x.shape[0],), -float("inf"), device=x.device)
    for restart in range(threat.restarts):
        if restart == 0 and start is not None:
            delta = start
        else:
            delta = threat.eps * uniform_noise(x, generator) if random_start else torch.zeros_like(x)
        delta = ((x + delta).clamp(0, 1) - x).detach()
        for _ in range(threat.steps):
            grad = input_grad(model, x + delta, y, loss_fn)
            delta = (delta + threat.alpha * grad.sign()).clamp(-threat.eps, threat.eps)
            delta = ((x + delta).clamp(0, 1) - x).detach()
        if threat.restarts == 1:  # nothing to choose between
            return (x + delta).detach()
        with torch.no_grad():
            logits = model(x + delta)
            score = loss_fn(logits, y) + 1e6 * (logits.argmax(1) != y)
            better = score > best_score
            best[better] = (x + delta)[better]
            best_score = torch.where(better, score, best_score)
    return best


@register("pgd")
def pgd(model: nn.Module, x: Tensor, y: Tensor, threat: Threat, generator: torch.Generator | None = None) -> Tensor:
    return pgd_attack(model, x, y, threat, loss="ce", generator=generator)


@register("cw")
def cw(model: nn.Module, x: Tensor, y: Tensor, threat: Threat, generator: torch.Generator | None = None) -> Tensor:
    """PGD on the CW margin loss (the 'CW∞' attack of the robustness literature)."""
    return pgd_attack(model, x, y, threat, loss="cw", generator=generator)


def trades_attack(model: nn.Module, x: Tensor, threat: Threat, noise: Tensor | None = None) -> Tensor:
    """TRADES inner maximisation: PGD on KL(f(x) ‖ f(x*)) from x + 0.001·`noise` (N(0, I); drawn here when None),
    as Zhang et al. 2019 run it. Their reference generates it with the model in eval mode: the caller sets it."""
    with torch.no_grad():
        p_nat = F.softmax(model(x), dim=1)
    noise = torch.randn_like(x) if noise is None else noise
    x_adv = (x + 0.001 * noise).clamp(0, 1).detach()
    for _ in range(threat.steps):
        x_adv.requires_grad_(True)
        kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), p_nat, reduction="sum")
        (grad,) = torch.autograd.grad(kl, x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + threat.alpha * grad.sign(), x - threat.eps), x + threat.eps)
        x_adv = x_adv.clamp(0, 1)
    return x_adv.detach()


@register("trades")
def trades_kl(model: nn.Module, x: Tensor, y: Tensor, threat: Threat, generator: torch.Generator | None = None) -> Tensor:
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return trades_attack(model, x, threat, noise)


def default_alpha(method: str, eps: float, steps: int) -> float:
    """The step size each method's paper uses when `train.alpha` is 0."""
    if method == "rs-fgsm":
        return 1.25 * eps
    if method in ("fgsm", "n-fgsm", "gradalign"):
        return eps
    return 2.5 * eps / steps  # PGD / TRADES: ε/4 for 10 steps (2/255 at 8/255, as Rice et al.)
