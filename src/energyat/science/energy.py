"""A classifier read as an energy-based model: energies, delta energies, DER, AAE mask.

Pure tensor functions over logits `f(x)` of shape (N, K); every result is per sample (N,) unless
named a loss. Sign conventions follow docs/design.md §1: ΔE is natural minus adversarial.

Every function computes in fp32 whatever the logits' dtype: under bf16 autocast a logsumexp of values near 10
rounds to ~0.06, the size of DER's margin γ and of the adaptive-stopping band. Casting cannot undo logits already
rounded to bf16, so the models' classifier layers run in fp32 under autocast (models.Fp32Linear): the logits
arrive here in fp32.
"""
from __future__ import annotations

import torch
from torch import Tensor


def energy(logits: Tensor) -> Tensor:
    """Marginal energy E(x) = -logsumexp_k f(x)[k]."""
    return -torch.logsumexp(logits.float(), dim=1)


def joint_energy(logits: Tensor, y: Tensor) -> Tensor:
    """Joint energy E(x, y) = -f(x)[y]."""
    return -logits.float().gather(1, y[:, None]).squeeze(1)


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Per-sample cross-entropy written as an energy difference, CE(x, y) = E(x, y) - E(x)."""
    return joint_energy(logits, y) - energy(logits)


def delta_energies(logits_nat: Tensor, logits_adv: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """(ΔE(x), ΔE(x, y)) = (E(x) - E(x*), E(x, y) - E(x*, y))."""
    d_marginal = energy(logits_nat) - energy(logits_adv)
    d_joint = joint_energy(logits_nat, y) - joint_energy(logits_adv, y)
    return d_marginal, d_joint


def aae_mask(logits_nat: Tensor, logits_adv: Tensor, y: Tensor) -> Tensor:
    """Abnormal adversarial examples: the attack lowered the loss, CE(x*) < CE(x) ⇔ ΔE(x) < ΔE(x, y)."""
    d_marginal, d_joint = delta_energies(logits_nat, logits_adv, y)
    return d_marginal < d_joint


def der_per_sample(logits_nat: Tensor, logits_adv: Tensor, y: Tensor, gamma: float) -> Tensor:
    """L_ΔE = max(‖[ΔE(x), ΔE(x, y)]‖₂ - γ, 0) per sample; differentiable through both energies."""
    return der_from_deltas(*delta_energies(logits_nat, logits_adv, y), gamma)


def der_from_deltas(d_marginal: Tensor, d_joint: Tensor, gamma: float) -> Tensor:
    """L_ΔE from ΔE(x) and ΔE(x, y) already computed."""
    # vector_norm's backward is 0 at the origin; hypot's and sqrt's are NaN there (and NaN·0 = NaN).
    norm = torch.linalg.vector_norm(torch.stack((d_marginal, d_joint), dim=1), dim=1)
    return (norm - gamma).clamp_min(0.0)


def aae_start_mask(logits_start: Tensor, logits_adv: Tensor, y: Tensor) -> Tensor:
    """AAEs as AAER defines them for random-start single-step attacks: the loss after the step is below the loss
    at the (random) starting point, CE(x*) < CE(x_start). For zero-init FGSM x_start = x: the same as `aae_mask`."""
    return cross_entropy(logits_adv, y) < cross_entropy(logits_start, y)


def der_loss(logits_nat: Tensor, logits_adv: Tensor, y: Tensor, gamma: float, mask: Tensor | None = None,
             norm: str = "aae") -> Tensor:
    """Batch DER: mean of L_ΔE over the batch; with `mask` (the AAEs of single-step AT) either the mean over the
    AAEs (`norm="aae"`) or their sum over the batch size (`norm="batch"`, each AAE weighted like one sample of
    multi-step DER). 0 (with a zero gradient) when no sample is selected."""
    per_sample = der_per_sample(logits_nat, logits_adv, y, gamma)
    if mask is None:
        return per_sample.mean()
    if norm not in ("aae", "batch"):
        raise ValueError(f"der_loss: norm {norm!r}; allowed: aae, batch")
    denominator = mask.sum().clamp_min(1) if norm == "aae" else mask.numel()
    return (per_sample * mask).sum() / denominator
