"""Shared fixtures: a tiny synthetic image task and a small CNN trained on it in a second or two."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import energyat  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch loads)
from energyat.science.models import Normalized, SmallCNN, init_lazy


def make_task(n: int = 512, classes: int = 4, size: int = 16, seed: int = 0):
    """Images in [0, 1]: a fixed random template per class plus noise; labels uniform."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.rand(classes, 1, size, size, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    x = (0.6 * templates[y] + 0.4 * torch.rand(n, 1, size, size, generator=g)).clamp(0, 1)
    return x, y


def tiny_model(classes: int = 4, size: int = 16, width: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    return init_lazy(Normalized(SmallCNN(classes, 1, width), (0.5,), (0.25,)), 1, size)


@pytest.fixture(scope="session")
def trained():
    """(model in eval mode, x, y): a small CNN with ~100% clean accuracy on the synthetic task."""
    torch.set_num_threads(2)
    x, y = make_task()
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(15):
        for i in range(0, len(x), 64):
            loss = F.cross_entropy(model(x[i:i + 64]), y[i:i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval(), x, y
