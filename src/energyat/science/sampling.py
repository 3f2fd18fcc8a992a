"""Generation from a classifier read as an EBM (docs/design.md §1): SGLD with momentum on the joint energy.

    v ← ζ·v − ½·η·∇ₓE(x,y),   x ← clip(x + v + σ·N(0, I), 0, 1)

from start points drawn by an init of the `INITS` registry, with optional energy-guided adaptive
stopping: a chain freezes once (E(x,y) − Ē_y)² < τ, Ē_y the mean joint energy of real training
images of class y under the same model. Pure tensor code: priors (class Gaussians, PCA fits) come in
as tensors, samples go out as tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..infra import distributed
from ..infra.distributed import block_seed
from ..infra.runtime import autocast, progress
from . import class_pca
from .data import batches, to_float
from .energy import joint_energy

# ---------------------------------------------------------------------------------------------- priors


@dataclass(frozen=True)
class ClassGaussian:
    """N(mean_c, scale_c·scale_cᵀ) per class: mean (K, D), scale (K, D, D)."""

    mean: Tensor
    scale: Tensor


def class_gaussians(x: Tensor, y: Tensor, num_classes: int) -> ClassGaussian:
    """Full-covariance Gaussian of each class of flattened images `x` (N, D) (Santurkar et al. 2019).

    The covariance is singular (constant border pixels), so the scale comes from an eigendecomposition
    (Q·diag(√λ)) rather than a Cholesky factor: exact for a PSD matrix, no jitter. D² floats per class
    is small at D ≤ 3072.
    """
    means, scales = [], []
    for c in range(num_classes):
        members = x[y == c].to(torch.float64)
        if members.shape[0] < 2:
            raise ValueError(f"class {c} has {members.shape[0]} image(s); a Gaussian needs at least 2")
        lam, q = torch.linalg.eigh(torch.cov(members.T))
        means.append(members.mean(0))
        scales.append(q * lam.clamp_min(0).sqrt())
    return ClassGaussian(torch.stack(means).float(), torch.stack(scales).float())


@dataclass(frozen=True)
class PcaBank:
    """PCA fits and the class of each: one per class (global) or many per class (local)."""

    fits: list[dict[str, Tensor]]
    classes: Tensor  # (F,) int64


# ---------------------------------------------------------------------------------------------- inits

Draw = Callable[..., Tensor]  # (y, prior, shape, sigma_pca, generator) -> x0 (N, *shape) in [0, 1]


@dataclass(frozen=True)
class InitSpec:
    needs: str | None  # the prior the caller supplies: None, "gaussian", "pca-global" or "pca-local"
    draw: Draw


INITS: dict[str, InitSpec] = {}


def register(name: str, needs: str | None):
    def wrap(fn: Draw) -> Draw:
        INITS[name] = InitSpec(needs, fn)
        return fn

    return wrap


@register("uniform", needs=None)
def uniform_init(y: Tensor, prior: Any, shape: tuple[int, ...], sigma_pca: float, generator: torch.Generator) -> Tensor:
    """U[0, 1] pixels (JEM's start)."""
    return torch.rand((y.shape[0], *shape), generator=generator, device=generator.device)


@register("gaussian", needs="gaussian")
def gaussian_init(y: Tensor, prior: ClassGaussian, shape: tuple[int, ...], sigma_pca: float,
                  generator: torch.Generator) -> Tensor:
    """A draw from the class-conditional Gaussian of the label, clipped to [0, 1]."""
    x = torch.empty((y.shape[0], prior.mean.shape[1]), device=generator.device)
    for c in y.unique().tolist():
        rows = (y == c).nonzero().squeeze(1)
        z = torch.randn((rows.numel(), prior.mean.shape[1]), generator=generator, device=generator.device)
        x[rows] = prior.mean[c].to(z.device) + z @ prior.scale[c].to(z.device).T
    return x.clamp(0, 1).view(-1, *shape)


def pca_init(y: Tensor, prior: PcaBank, shape: tuple[int, ...], sigma_pca: float, generator: torch.Generator) -> Tensor:
    """x₀ = μ + Σᵢ sᵢ·αᵢ·Uᵢ, αᵢ ~ N(0, σ_pca²), from a random fit of the label's class, clipped to [0, 1]; sᵢ is
    the fit's `spread` (class_pca.py: the class-size convention of the ECCV 2024 code, for global and local fits)."""
    device = generator.device
    choice = torch.empty_like(y)
    for c in y.unique().tolist():
        rows = (y == c).nonzero().squeeze(1)
        candidates = (prior.classes == c).nonzero().squeeze(1).to(device)
        if candidates.numel() == 0:
            raise ValueError(f"no PCA fit for class {c}")
        choice[rows] = candidates[torch.randint(candidates.numel(), (rows.numel(),), generator=generator, device=device)]
    x = torch.empty((y.shape[0], prior.fits[0]["mean"].shape[0]), device=device)
    for f in choice.unique().tolist():
        rows = (choice == f).nonzero().squeeze(1)
        fit = {k: v.to(device) for k, v in prior.fits[f].items()}
        alpha = sigma_pca * torch.randn((rows.numel(), fit["spread"].shape[0]), generator=generator, device=device)
        x[rows] = class_pca.decode(fit, alpha * fit["spread"])
    return x.clamp(0, 1).view(-1, *shape)


register("pca-global", needs="pca-global")(pca_init)
register("pca-local", needs="pca-local")(pca_init)


# ---------------------------------------------------------------------------------------------- SGLD


@dataclass
class Chains:
    """SGLD results for N chains run for `steps` steps."""

    x: Tensor  # (N, C, H, W) final samples in [0, 1]
    energy: Tensor  # (steps + 1, N) E(x_t, y) after t updates; a frozen chain keeps its value
    stopped: Tensor  # (steps + 1, N) bool: had reached (E − Ē_y)² < τ by step t (all False without the stop)
    steps_used: Tensor  # (N,) int64 updates applied
    snapshots: dict[int, Tensor]  # step count -> (N, C, H, W) samples after that many steps (0: the starts)

    @staticmethod
    def cat(parts: list[Chains]) -> Chains:
        return Chains(
            torch.cat([p.x for p in parts]),
            torch.cat([p.energy for p in parts], 1),
            torch.cat([p.stopped for p in parts], 1),
            torch.cat([p.steps_used for p in parts]),
            {t: torch.cat([p.snapshots[t] for p in parts]) for t in parts[0].snapshots},
        )

    @staticmethod
    def empty(shape: tuple[int, ...], steps: int, snapshots: tuple[int, ...], device: torch.device) -> Chains:
        """No chains: what a rank without blocks contributes."""
        return Chains(torch.empty((0, *shape), device=device), torch.empty((steps + 1, 0), device=device),
                      torch.empty((steps + 1, 0), dtype=torch.bool, device=device),
                      torch.empty(0, dtype=torch.int64, device=device),
                      {t: torch.empty((0, *shape), device=device) for t in sorted(set(snapshots))})

    def gather(self) -> Chains:
        """Every rank's chains, concatenated in rank order, on every rank (itself for one process); every rank
        issues the same collectives in the same order, blocks or none."""
        return Chains(distributed.gather_cat(self.x), distributed.gather_cat(self.energy.T.contiguous()).T,
                      distributed.gather_cat(self.stopped.T.contiguous()).T, distributed.gather_cat(self.steps_used),
                      {t: distributed.gather_cat(self.snapshots[t]) for t in sorted(self.snapshots)})


def _energy_and_grad(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    x = x.detach().requires_grad_(True)
    with autocast(x.device):
        logits = model(x)
    e = joint_energy(logits.float(), y)
    (grad,) = torch.autograd.grad(e.sum(), x)
    return e.detach(), grad


@dataclass
class _Trace:
    """What `sgld` records of N chains step by step: energies, stop flags, and which chains still move."""

    energies: Tensor  # (steps + 1, N), filled row by row
    stopped: Tensor  # (steps + 1, N) bool
    active: Tensor  # (N,) bool: not frozen yet
    last: Tensor  # (N,) latest energy of every chain (frozen ones: at their stop)
    target: Tensor | None
    tau: float | None

    @staticmethod
    def start(n: int, steps: int, device: torch.device, target: Tensor | None, tau: float | None) -> _Trace:
        return _Trace(torch.empty(steps + 1, n, device=device),
                      torch.zeros(steps + 1, n, dtype=torch.bool, device=device),
                      torch.ones(n, dtype=torch.bool, device=device), torch.zeros(n, device=device), target, tau)

    def running(self) -> Tensor:
        """Indices of the chains that still move."""
        return self.active.nonzero().squeeze(1)

    def record(self, t: int, idx: Tensor, e: Tensor) -> Tensor:
        """Store step t's energies; freeze the chains that reached their target; return who moves on."""
        self.last[idx] = e
        self.energies[t] = self.last
        if self.tau is None:
            return torch.ones_like(idx, dtype=torch.bool)
        moving = (e - self.target[idx]).square() >= self.tau
        self.active[idx[~moving]] = False
        self.stopped[t] = ~self.active
        return moving


def _langevin_update(x: Tensor, v: Tensor, idx: Tensor, grad: Tensor, *, momentum: float, step_size: float,
                     noise: float, generator: torch.Generator) -> None:
    """One SGLD step of chains `idx`, in place: v ← ζ·v − ½·η·∇ₓE, x ← clip(x + v + σ·N(0, I), 0, 1)."""
    v[idx] = momentum * v[idx] - 0.5 * step_size * grad
    z = torch.randn((idx.numel(), *x.shape[1:]), generator=generator, device=x.device)
    x[idx] = (x[idx] + v[idx] + noise * z).clamp(0, 1)


def _final_energy(model: nn.Module, x: Tensor, y: Tensor, idx: Tensor, last: Tensor) -> Tensor:
    """E(x, y) of the chains `idx` after the last step (no gradient needed); `last[idx]` when none moves."""
    with torch.no_grad(), autocast(x.device):
        return joint_energy(model(x[idx]).float(), y[idx]) if idx.numel() else last[idx]


def sgld(model: nn.Module, x0: Tensor, y: Tensor, *, steps: int, step_size: float, momentum: float, noise: float,
         generator: torch.Generator, target: Tensor | None = None, tau: float | None = None,
         snapshots: tuple[int, ...] = ()) -> Chains:
    """Run SGLD with momentum on E(x, y) from `x0`; with `tau`, chain i freezes once (E − target_i)² < τ.

    The stop test reads the energy each step computes anyway for its gradient, before the update, and
    once more after the last step. A frozen chain keeps its image and energy and costs no more
    forward/backward passes. `snapshots` lists step counts (0: the start) whose samples are returned too.
    """
    if tau is not None and target is None:
        raise ValueError("adaptive stopping needs the per-sample target energies")
    if any(not 0 <= t <= steps for t in snapshots):
        raise ValueError(f"snapshot step counts {snapshots} must lie in 0..{steps}")
    n, device = x0.shape[0], x0.device
    x, v = x0.clone(), torch.zeros_like(x0)
    trace = _Trace.start(n, steps, device, target, tau)
    steps_used = torch.zeros(n, dtype=torch.int64, device=device)
    kept: dict[int, Tensor] = {0: x0.clone()} if 0 in snapshots else {}
    for t in range(steps):
        idx = trace.running()
        if idx.numel():
            e, grad = _energy_and_grad(model, x[idx], y[idx])
            moving = trace.record(t, idx, e)
            idx, grad = idx[moving], grad[moving]
            _langevin_update(x, v, idx, grad, momentum=momentum, step_size=step_size, noise=noise,
                             generator=generator)
            steps_used[idx] += 1
        else:
            trace.record(t, idx, trace.last[idx])
        if t + 1 in snapshots:
            kept[t + 1] = x.clone()
    idx = trace.running()
    trace.record(steps, idx, _final_energy(model, x, y, idx, trace.last))
    return Chains(x, trace.energies, trace.stopped, steps_used, kept)


def generate(model: nn.Module, draw: Draw, prior: Any, y: Tensor, shape: tuple[int, ...], *, sigma_pca: float,
             block_size: int, seed: int, **sgld_kwargs) -> Chains:
    """Start points from `draw` for labels `y`, then `sgld` on them: all chains, in the order of `y`, on every rank.

    The chains are cut into fixed-size blocks of their global index, run `block_size` at a time; block b draws
    its starts and noise from its own generator, seeded by (seed, b), and this rank runs only its own blocks
    (`distributed.owned_blocks`) before the blocks are gathered. So the samples depend on `seed` and
    `block_size`, never on the number of ranks. `target` in `sgld_kwargs`, if any, is per class (K,) here.
    """
    target = sgld_kwargs.pop("target", None)
    device = y.device
    parts = []
    for b, rows in progress(distributed.owned_blocks(y.shape[0], block_size), desc="SGLD"):
        generator = torch.Generator(device).manual_seed(block_seed(seed, "sgld", b))
        yb = y[rows]
        x0 = draw(yb, prior, shape, sigma_pca, generator)
        parts.append(sgld(model, x0, yb, generator=generator,
                          target=None if target is None else target[yb], **sgld_kwargs))
    mine = Chains.cat(parts) if parts else Chains.empty(shape, sgld_kwargs["steps"],
                                                       tuple(sgld_kwargs.get("snapshots", ())), device)
    return mine.gather()


@torch.no_grad()
def class_mean_energy(model: nn.Module, x: Tensor, y: Tensor, num_classes: int, batch_size: int,
                      device: torch.device) -> Tensor:
    """Ē_y: mean joint energy E(x, y) of the uint8 images `x` of each class y, (K,) float."""
    total = torch.zeros(num_classes, dtype=torch.float64)
    count = torch.zeros(num_classes, dtype=torch.float64)
    for xb, yb in progress(batches(x, y, batch_size), desc="class energies", total=-(-y.shape[0] // batch_size)):
        yb = yb.to(device)
        with autocast(device):
            logits = model(to_float(xb, device))
        e = joint_energy(logits.float(), yb).double().cpu()
        total.index_add_(0, yb.cpu(), e)
        count.index_add_(0, yb.cpu(), torch.ones_like(e))
    if (count == 0).any():
        raise ValueError(f"no images of class(es) {(count == 0).nonzero().squeeze(1).tolist()} to measure Ē_y on")
    return (total / count).float()
