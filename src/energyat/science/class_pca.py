"""Class-wise PCA of images (docs/design.md §1): the start points of PCA-initialised SGLD.

A fit is a plain dict of tensors (storable with weights_only loading):
`mean` (D,), `components` U (r, D) with orthonormal rows, `singular_values` s (r,) of the centred
data matrix, `explained_variance_ratio` (r,) — each component's share of the total variance —,
`retained` (scalar), their sum, and `spread` (r,): the scale of each start coefficient (sampling.pca_init).
Images are flattened to D = C·H·W values in [0, 1].

Spread convention: the ECCV 2024 predecessor's public code draws αᵢ = σ_pca·sᵢ·N(0, 1) with sᵢ the raw
singular values of a PCA of the whole class (sklearn's `singular_values_`), i.e. sᵢ = sdᵢ·√(n − 1) for the
component's standard deviation sdᵢ over the n class images. A global fit keeps exactly that. A local fit sees only
its k neighbours, whose raw singular values are √((n − 1)/(k − 1)) times smaller for the same variance; its spread
is sdᵢ·√(n − 1) with n the class's image count too, so that one σ_pca means the same for global and local starts.

The SVD runs in float64: the kept-component count comes from a cumulative sum over all
singular values, and in float32 the tail (near-constant border pixels of Fashion-MNIST) is
rounding noise; at D ≤ 3072 the cost is a fraction of a second per class. Fits are stored in
float32, far finer than the 1/255 pixel quantum.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..infra.runtime import progress


def fit(x: Tensor, variance: float) -> dict[str, Tensor]:
    """PCA of the rows of `x` (n, D), keeping the fewest components whose explained variance reaches `variance`."""
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"PCA needs a matrix of at least 2 rows, got shape {tuple(x.shape)}")
    x = x.to(torch.float64)
    mean = x.mean(0)
    _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
    ratio = s.square() / s.square().sum().clamp_min(torch.finfo(torch.float64).tiny)
    # fewest r with cumsum[r-1] >= variance; the tolerance keeps variance=1 from asking for more than exists
    r = int((ratio.cumsum(0) < variance - 1e-12).sum()) + 1
    r = min(r, s.shape[0])
    return {
        "mean": mean.float(),
        "components": vh[:r].float(),
        "singular_values": s[:r].float(),
        "explained_variance_ratio": ratio[:r].float(),
        "retained": ratio[:r].sum().float(),
        "spread": s[:r].float(),
    }


def encode(pca: dict[str, Tensor], x: Tensor) -> Tensor:
    """Coefficients of `x` (n, D) on the kept components: (n, r)."""
    return (x - pca["mean"]) @ pca["components"].T


def decode(pca: dict[str, Tensor], coefficients: Tensor) -> Tensor:
    """mean + Σᵢ cᵢ·Uᵢ for coefficients (n, r): (n, D)."""
    return pca["mean"] + coefficients @ pca["components"]


def nearest(x: Tensor, anchor: Tensor, k: int) -> Tensor:
    """Indices of the `k` rows of `x` (n, D) closest to `anchor` (D,) in L2, the anchor's own row included."""
    distance = (x - anchor).square().sum(1)
    return distance.topk(min(k, x.shape[0]), largest=False).indices


def classwise(x: Tensor, y: Tensor, num_classes: int, variance: float) -> list[dict[str, Tensor]]:
    """One PCA per class, in class order; `x` is (N, D)."""
    fits = []
    for c in range(num_classes):
        members = x[y == c]
        if members.shape[0] < 2:
            raise ValueError(f"class {c} has {members.shape[0]} image(s); PCA needs at least 2")
        fits.append(fit(members, variance))
    return fits


def local_classwise(x: Tensor, y: Tensor, num_classes: int, variance: float, k: int, n_anchors: int,
                    generator: torch.Generator) -> tuple[list[dict[str, Tensor]], Tensor, Tensor]:
    """Local class-wise PCA: for `n_anchors` random images of each class, a PCA of its `k` nearest class-mates.

    Returns (fits, their classes (F,), their anchors' row indices into `x` (F,)); a class with fewer than
    `n_anchors` images uses each once, one with fewer than `k` is fitted whole.
    """
    fits, classes, anchors = [], [], []
    for c in progress(range(num_classes), desc="local PCA", total=num_classes):
        rows = (y == c).nonzero().squeeze(1)
        if rows.numel() < 2:
            raise ValueError(f"class {c} has {rows.numel()} image(s); PCA needs at least 2")
        members = x[rows]
        for a in torch.randperm(rows.numel(), generator=generator)[:n_anchors].tolist():
            neighbours = members[nearest(members, members[a], k)]
            local = fit(neighbours, variance)
            # the spread at the class's size (module docstring): sd_i * sqrt(n_class - 1)
            local["spread"] = local["spread"] * math.sqrt((rows.numel() - 1) / (neighbours.shape[0] - 1))
            fits.append(local)
            classes.append(c)
            anchors.append(int(rows[a]))
    return fits, torch.tensor(classes, dtype=torch.int64), torch.tensor(anchors, dtype=torch.int64)
