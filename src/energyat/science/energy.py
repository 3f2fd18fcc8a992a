"""A classifier read as an energy-based model: energies, delta energies, DER, AAE mask.

Pure tensor functions over logits `f(x)` of shape (N, K), or over the delta energies `delta_energies` gives;
every result is per sample (N,) unless named a loss. Sign conventions follow docs/design.md §1: ΔE is natural
minus adversarial. DER is three steps, the ones training takes: `delta_energies`, `der_per_sample` (with the AAE
mask of single-step AT, `aae_mask` or `aae_start_mask`), `der_loss` (λ and the batch normalisation).

Every function computes in fp32 whatever the logits' dtype: under bf16 autocast a logsumexp of values near 10
rounds to ~0.06, the size of DER's margin γ and of the adaptive-stopping band. Casting cannot undo logits already
rounded to bf16, so the models' classifier layers run in fp32 under autocast (models.Fp32Linear): the logits
arrive here in fp32.
"""
from __future__ import annotations

from typing import Callable

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


def aae_mask(d_marginal: Tensor, d_joint: Tensor) -> Tensor:
    """Abnormal adversarial examples from (ΔE(x), ΔE(x, y)): the attack lowered the loss, CE(x*) < CE(x) ⇔
    ΔE(x) < ΔE(x, y)."""
    return d_marginal < d_joint


def aae_start_mask(logits_start: Tensor, logits_adv: Tensor, y: Tensor) -> Tensor:
    """AAEs as AAER defines them for random-start single-step attacks: the loss after the step is below the loss
    at the (random) starting point, CE(x*) < CE(x_start). For zero-init FGSM x_start = x: the same as `aae_mask`."""
    return cross_entropy(logits_adv, y) < cross_entropy(logits_start, y)


def der_per_sample(d_marginal: Tensor, d_joint: Tensor, gamma: float, mask: Tensor | None = None) -> Tensor:
    """L_ΔE = max(‖[ΔE(x), ΔE(x, y)]‖₂ - γ, 0) per sample from (ΔE(x), ΔE(x, y)) (`delta_energies`, with their
    graphs: differentiable through both energies); with `mask` (the AAEs of single-step AT), 0 outside it."""
    # vector_norm's backward is 0 at the origin; hypot's and sqrt's are NaN there (and NaN·0 = NaN).
    norm = torch.linalg.vector_norm(torch.stack((d_marginal, d_joint), dim=1), dim=1)
    per_sample = (norm - gamma).clamp_min(0.0)
    return per_sample if mask is None else per_sample * mask


def _one_process(count: Tensor) -> Tensor:
    return count


def der_loss(per_sample: Tensor, lam: float, mask: Tensor | None = None, norm: str = "aae", *,
             batch: int | None = None, world: int = 1, total: Callable[[Tensor], Tensor] = _one_process) -> Tensor:
    """The DER term of the loss, λ · the batch's DER, from `der_per_sample` (zero outside `mask`): λ · the mean of
    L_ΔE over the batch; with `mask` (the AAEs of single-step AT) either over the AAEs (`norm="aae"`) or their sum
    over the batch size (`norm="batch"`, each AAE weighted like one sample of multi-step DER). 0 (with a zero
    gradient) when no sample is selected.

    One shard of a data-parallel batch (docs/design.md §7): `batch` is the global batch size (default: this
    batch's), `world` the number of ranks and `total` sums a count over them (`distributed.all_sum`). Each rank
    returns λ · its shard's sum over (the global count / world), so that DDP's average of the ranks' gradients is
    the gradient of the global batch's term."""
    if norm not in ("aae", "batch"):
        raise ValueError(f"der_loss: norm {norm!r}; allowed: aae, batch")
    if mask is not None and norm == "aae":
        denominator = total(mask.sum().float()).clamp_min(1) / world
    else:
        denominator = (per_sample.shape[0] if batch is None else batch) / world
    return lam * per_sample.sum() / denominator
