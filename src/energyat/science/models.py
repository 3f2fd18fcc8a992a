"""Model registry. Every model takes images in [0, 1] and normalises them itself."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    def wrap(fn):
        MODELS[name] = fn
        return fn

    return wrap


def build_model(arch: str, num_classes: int, channels: int, mean: tuple[float, ...], std: tuple[float, ...],
                options: dict | None = None) -> nn.Module:
    """`arch` from the registry (built with the keywords `options`), wrapped so that it normalises its [0, 1]
    input with `mean`/`std`."""
    if arch not in MODELS:
        raise KeyError(f"model.arch: {arch!r} is not registered; allowed: {', '.join(MODELS)}")
    return Normalized(MODELS[arch](num_classes=num_classes, channels=channels, **(options or {})), mean, std)


class _Fp32Forward:
    """The classifier layer in fp32 under autocast: energies, ΔE, the AAE mask, DER and SGLD read its logits, and
    bf16 logits of 10-20 are rounded to ~0.06 (DER's margin, the adaptive-stopping band), which no later cast
    undoes. One matrix product of the network: its cost is negligible. Without autocast it is nn.Linear's forward."""

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), self.weight, self.bias)


class Fp32Linear(_Fp32Forward, nn.Linear):
    """nn.Linear computing in fp32 under autocast (same parameters and state-dict keys)."""


class LazyFp32Linear(_Fp32Forward, nn.LazyLinear):
    """nn.LazyLinear computing in fp32 under autocast; becomes an Fp32Linear once built."""

    cls_to_become = Fp32Linear


CPU_CHUNK = 128  # images per pass of an eval-mode model on the CPU (see Normalized)


class Normalized(nn.Module):
    """The network on (x - mean) / std. In eval mode on the CPU a batch larger than CPU_CHUNK runs in equal chunks of
    at most that many images, concatenated (backward splits the gradient the same way). In eval mode no image's
    output depends on the others, and a chunk's activations stay in cache: the 500-image validation and 250-image
    evaluation batches run ~1.3-1.6x faster (docs/performance.md). Equal chunks (no remainder of a few images, which
    the CPU kernels may round differently) give the whole batch's numbers bit for bit (tested). Training mode stays
    whole: batch statistics (BatchNorm) depend on the batch."""

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        if not self.training and x.device.type == "cpu" and len(x) > CPU_CHUNK:
            size = -(-len(x) // -(-len(x) // CPU_CHUNK))  # equal chunks: no small remainder
            return torch.cat([self.net((c - self.mean) / self.std) for c in x.split(size)])
        return self.net((x - self.mean) / self.std)


class MaxPool2d(nn.MaxPool2d):
    """nn.MaxPool2d with the same values, gradients and argmax ties, faster on the CPU: PyTorch's CPU kernel for
    contiguous NCHW tensors runs ~10x slower than its channels-last one (~20 % of a small CNN's training step at batch
    32, measured in docs/performance.md). So the argmax is found channels-last and the maxima gathered from the NCHW
    input. Gather's backward sends each window's gradient to its argmax as pooling's backward does (bit for bit
    where windows do not overlap, stride >= kernel as here) and stays differentiable (GradAlign's double backprop)."""

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu" or x.dim() != 4 or not x.is_contiguous():
            return super().forward(x)
        with torch.no_grad():
            _, idx = F.max_pool2d(x.contiguous(memory_format=torch.channels_last), self.kernel_size, self.stride,
                                  self.padding, self.dilation, self.ceil_mode, return_indices=True)
        idx = idx.contiguous()
        return x.flatten(2).gather(2, idx.flatten(2)).view(idx.shape)


@register("small-cnn")
class SmallCNN(nn.Module):
    """Three 3×3 convolutions (`width`, 2×, 2× channels), two poolings, a linear classifier (fp32 under autocast,
    as in every model here): ~0.09M parameters for 28×28 inputs at width 32. `hidden` > 0 puts a ReLU layer of that
    many units before the classifier: cheap capacity (one matrix product) for runs that must be able to memorise,
    such as robust overfitting on a subset."""

    def __init__(self, num_classes: int = 10, channels: int = 1, width: int = 32, hidden: int = 0):
        super().__init__()
        # pooling before ReLU: the same values and gradients as ReLU then pooling (max and ReLU commute; a window
        # whose maximum is <= 0 passes no gradient either way), with ReLU on a quarter of the elements
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), MaxPool2d(2), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), MaxPool2d(2), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(),
        )
        self.head = (nn.Sequential(nn.LazyLinear(hidden), nn.ReLU(), Fp32Linear(hidden, num_classes)) if hidden
                     else LazyFp32Linear(num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).flatten(1))


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, drop: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.drop = drop
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = F.relu(self.bn2(out))
        if self.drop:
            out = F.dropout(out, self.drop, self.training)
        return self.conv2(out) + shortcut


class PreActResNet(nn.Module):
    def __init__(self, blocks: tuple[int, ...], num_classes: int, channels: int, widths=(64, 128, 256, 512),
                 stem: int = 64, drop: float = 0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, stem, 3, 1, 1, bias=False)
        layers, in_planes = [], stem
        for i, (n, planes) in enumerate(zip(blocks, widths)):
            for j in range(n):
                layers.append(PreActBlock(in_planes, planes, stride=2 if (i > 0 and j == 0) else 1, drop=drop))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(in_planes)
        self.linear = Fp32Linear(in_planes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn(self.layers(self.conv1(x))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


@register("preact-resnet18")
def preact_resnet18(num_classes: int = 10, channels: int = 3) -> nn.Module:
    return PreActResNet((2, 2, 2, 2), num_classes, channels)


def _wide_resnet(depth: int, widen: int, num_classes: int, channels: int) -> nn.Module:
    # WRN-d-k (Zagoruyko & Komodakis) in the pre-activation layout used by the robust-overfitting code.
    n = (depth - 4) // 6
    return PreActResNet((n, n, n), num_classes, channels, widths=(16 * widen, 32 * widen, 64 * widen), stem=16)


@register("wrn-28-10")
def wrn_28_10(num_classes: int = 10, channels: int = 3) -> nn.Module:
    return _wide_resnet(28, 10, num_classes, channels)


@register("wrn-34-10")
def wrn_34_10(num_classes: int = 10, channels: int = 3) -> nn.Module:
    return _wide_resnet(34, 10, num_classes, channels)


def init_lazy(model: nn.Module, channels: int, size: int) -> nn.Module:
    """Materialise lazy layers with one dummy forward, so parameters exist before the optimiser sees them."""
    with torch.no_grad():
        was_training = model.training
        model.eval()
        model(torch.zeros(1, channels, size, size))
        model.train(was_training)
    return model
