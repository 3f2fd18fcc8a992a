"""Class-wise PCA: exact reconstruction, the retained-variance rule, nearest neighbours, local fits."""
from __future__ import annotations

import pytest
import torch

from energyat.science import class_pca


def known_spectrum(n: int = 40, d: int = 12, s=(4.0, 3.0, 2.0, 1.0), seed: int = 0):
    """Rows mean + U·diag(s)·Vᵀ with centred orthonormal U: singular values exactly `s`."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, len(s), generator=g, dtype=torch.float64)
    u, _ = torch.linalg.qr(a - a.mean(0))
    v, _ = torch.linalg.qr(torch.randn(d, len(s), generator=g, dtype=torch.float64))
    mean = torch.rand(d, generator=g, dtype=torch.float64)
    return (mean + u @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ v.T).float(), v.T.float(), mean.float()


def test_all_components_reconstruct_exactly():
    x = torch.rand(30, 20, generator=torch.Generator().manual_seed(1))
    fit = class_pca.fit(x, 1.0)
    assert fit["components"].shape == (20, 20)
    torch.testing.assert_close(class_pca.decode(fit, class_pca.encode(fit, x)), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(fit["components"] @ fit["components"].T, torch.eye(20), atol=1e-5, rtol=0)
    assert float(fit["explained_variance_ratio"].sum()) == pytest.approx(1.0, abs=1e-6)
    centred = (x - x.mean(0)).double()
    torch.testing.assert_close(fit["singular_values"].double(), torch.linalg.svdvals(centred), atol=1e-5, rtol=0)


def test_retained_variance_keeps_the_fewest_components():
    x, v, mean = known_spectrum()  # variance ratios 16/30, 9/30, 4/30, 1/30
    two = class_pca.fit(x, 0.8)  # 25/30 = 0.833 >= 0.8 > 16/30
    assert two["components"].shape == (2, 12)
    torch.testing.assert_close(two["singular_values"], torch.tensor([4.0, 3.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(two["explained_variance_ratio"], torch.tensor([16 / 30, 9 / 30]), atol=1e-6, rtol=0)
    assert float(two["retained"]) == pytest.approx(25 / 30, abs=1e-6)
    torch.testing.assert_close(two["mean"], mean, atol=1e-6, rtol=0)
    # the kept directions are the true ones, up to sign
    torch.testing.assert_close((two["components"] @ v[:2].T).abs(), torch.eye(2), atol=1e-5, rtol=0)
    assert class_pca.fit(x, 0.84)["components"].shape[0] == 3  # 0.833 < 0.84 <= 29/30
    assert class_pca.fit(x, 16 / 30 - 1e-4)["components"].shape[0] == 1
    # four non-zero directions carry everything: asking for all of it keeps exactly those
    full = class_pca.fit(x, 1.0)
    torch.testing.assert_close(class_pca.decode(full, class_pca.encode(full, x)), x, atol=1e-5, rtol=0)


def test_nearest_includes_the_anchor_and_orders_by_distance():
    x = torch.tensor([[0.0], [5.0], [1.0], [-2.5], [3.0]])
    assert class_pca.nearest(x, x[0], 3).tolist() == [0, 2, 3]
    assert sorted(class_pca.nearest(x, torch.tensor([4.2]), 2).tolist()) == [1, 4]
    assert class_pca.nearest(x, x[0], 99).numel() == 5  # k larger than the set: all of it


def test_local_fits_use_neighbours_of_anchors_within_the_class():
    g = torch.Generator().manual_seed(0)
    # class 0: two far-apart clusters, class 1 one cluster; k = cluster size => each local fit sees one cluster
    c0 = torch.cat([torch.randn(10, 6, generator=g) * 0.1, 10 + torch.randn(10, 6, generator=g) * 0.1])
    c1 = -10 + torch.randn(10, 6, generator=g) * 0.1
    x, y = torch.cat([c0, c1]), torch.tensor([0] * 20 + [1] * 10)
    fits, classes, anchors = class_pca.local_classwise(x, y, 2, 0.9, k=10, n_anchors=4, generator=torch.Generator().manual_seed(3))
    assert classes.tolist() == [0] * 4 + [1] * 4
    assert (y[anchors] == classes).all() and anchors[:4].unique().numel() == 4
    for fit, a in zip(fits, anchors):
        # the mean of the anchor's own cluster, not of its class
        cluster = x[(x - x[a]).norm(dim=1) < 3]
        assert cluster.shape[0] == 10
        torch.testing.assert_close(fit["mean"], cluster.mean(0), atol=1e-5, rtol=0)
        # the fit of exactly those k images: the same subspace (up to component signs) and retained variance
        whole = class_pca.fit(cluster, 0.9)
        assert fit["components"].shape == whole["components"].shape
        torch.testing.assert_close(fit["components"].T @ fit["components"], whole["components"].T @ whole["components"],
                                   atol=1e-5, rtol=0)
        assert float(fit["retained"]) == pytest.approx(float(whole["retained"]), abs=1e-6)
    # fewer images than anchors or neighbours: each image anchors once, the whole class is fitted
    fits, classes, anchors = class_pca.local_classwise(x, y, 2, 0.9, k=50, n_anchors=50, generator=torch.Generator())
    assert classes.tolist() == [0] * 20 + [1] * 10 and sorted(anchors.tolist()) == list(range(30))
    torch.testing.assert_close(fits[0]["mean"], c0.mean(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(fits[-1]["mean"], c1.mean(0), atol=1e-5, rtol=0)


def test_classwise_fits_each_class_and_rejects_a_single_image():
    x, y = torch.rand(9, 5), torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2])
    fits = class_pca.classwise(x, y, 3, 0.95)
    for c, fit in enumerate(fits):
        torch.testing.assert_close(fit["mean"], x[y == c].mean(0))
    with pytest.raises(ValueError, match="class 2 has 1 image"):
        class_pca.classwise(x[:8], y[:8], 3, 0.95)
    with pytest.raises(ValueError, match="at least 2 rows"):
        class_pca.fit(torch.rand(1, 5), 0.9)


def test_start_spread_follows_the_class_size_for_global_and_local_fits():
    """The ECCV code scales start coefficients by the raw singular values of the class fit (s = sd·√(n − 1)); a
    local fit of k neighbours reports its spread at the class's size too, so one σ_pca means the same for both."""
    x, _, _ = known_spectrum(n=40, s=(4.0, 3.0, 2.0, 1.0))
    whole = class_pca.fit(x, 1.0)
    torch.testing.assert_close(whole["spread"], torch.tensor([4.0, 3.0, 2.0, 1.0]), atol=1e-5, rtol=0)
    # a class of 2,000 images from one Gaussian (sd 0.05 and 0.02 along two axes): the raw singular values of a
    # 200-image local fit are ~√(1999/199) ≈ 3.2 times smaller than the global ones, the spreads are not
    g = torch.Generator().manual_seed(0)
    data = torch.randn(2000, 2, generator=g, dtype=torch.float64) * torch.tensor([0.05, 0.02], dtype=torch.float64)
    y = torch.zeros(2000, dtype=torch.int64)
    (global_fit,) = class_pca.classwise(data.float(), y, 1, 1.0)
    local, _, anchors = class_pca.local_classwise(data.float(), y, 1, 1.0, k=200, n_anchors=1, generator=torch.Generator())
    torch.testing.assert_close(global_fit["spread"], torch.tensor([0.05, 0.02]) * 1999 ** 0.5, rtol=0.05, atol=0)
    ratio = global_fit["singular_values"][0] / local[0]["singular_values"][0]
    assert ratio > 2.5  # the neighbours of one anchor are also closer together than the class
    # the local spread is its neighbours' sd at the class's size: sd_local * sqrt(1999)
    neighbours = data.float()[class_pca.nearest(data.float(), data.float()[anchors[0]], 200)]
    sd_local = class_pca.encode(local[0], neighbours).std(0)
    torch.testing.assert_close(local[0]["spread"], sd_local * 1999 ** 0.5, rtol=1e-4, atol=0)
