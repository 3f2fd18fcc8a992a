"""Model registry: sizes of the small CNN's options, and checkpoints that rebuild the same network."""
import pytest
import torch
import torch.nn.functional as F

from energyat.errors import UserError
from energyat.params import ModelCfg
from energyat.runstate import checkpoint
from energyat.science import energy as E
from energyat.science import models
from energyat.science.models import MODELS, MaxPool2d

GEOMETRY = {"dataset": "synthetic", "num_classes": 10, "channels": 1, "size": 28, "mean": [0.5], "std": [0.25]}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("width, hidden", [(32, 0), (16, 0), (32, 1024)])
def test_small_cnn_parameter_count_follows_width_and_hidden(width, hidden):
    model = checkpoint.new_model(checkpoint.model_meta(ModelCfg(width=width, hidden=hidden), GEOMETRY))
    convs = (9 * 1 + 1) * width + (9 * width + 1) * 2 * width + (9 * 2 * width + 1) * 2 * width
    features = 2 * width * 7 * 7  # two 2x poolings: 28 -> 7
    head = (features + 1) * hidden + (hidden + 1) * 10 if hidden else (features + 1) * 10
    assert n_params(model) == convs + head
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)


def test_small_cnn_pools_before_relu_with_relu_first_values_and_gradients():
    """The features pool before their ReLU (cheaper); checkpoints and every number assume ReLU-then-pool, so both
    orders must agree bit for bit, windows with only negative values (no gradient) and ties included."""
    torch.manual_seed(3)
    model = checkpoint.new_model(checkpoint.model_meta(ModelCfg(width=8), GEOMETRY))
    x = torch.rand(16, 1, 28, 28)
    x[:4] = 0.5  # constant images: every pooling window a tie
    feats = model.net.features
    convs = [m for m in feats if isinstance(m, torch.nn.Conv2d)]

    def relu_first(z):
        z = F.max_pool2d(F.relu(convs[0](z)), 2)
        z = F.max_pool2d(F.relu(convs[1](z)), 2)
        return F.relu(convs[2](z))

    results = []
    for features in (feats, relu_first):
        model.zero_grad()
        xi = x.clone().requires_grad_(True)
        out = features((xi - model.mean) / model.std)
        out.square().sum().backward()
        results.append((out.detach(), xi.grad, [q.grad.clone() for c in convs for q in c.parameters()]))
    (o0, g0, p0), (o1, g1, p1) = results
    assert (o0 == 0).any() and torch.equal(o0, o1) and torch.equal(g0, g1)
    assert all(torch.equal(a, b) for a, b in zip(p0, p1))


def test_cpu_max_pool_matches_torch_values_gradients_ties_and_double_backward():
    """The small CNN's pooling (argmax found channels-last, maxima gathered) against F.max_pool2d: the same values,
    input gradients, tie-breaking (the first maximum in the window gets the gradient) and second derivatives, on
    even and odd sizes."""
    pool = MaxPool2d(2)
    tie = torch.tensor([[[[1.0, 1.0], [0.0, 1.0]]]], requires_grad=True)
    pool(tie).sum().backward()
    assert torch.equal(tie.grad, torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]]))
    torch.manual_seed(0)
    for shape in ((5, 3, 28, 28), (2, 4, 7, 7)):
        x = torch.randn(shape)
        x[0, :, :4, :4] = 0.25  # a constant patch: ties in every window
        results = []
        for f in (pool, lambda z: F.max_pool2d(z, 2)):
            xi = x.clone().requires_grad_(True)
            out = f(xi)
            (g,) = torch.autograd.grad(out.square().sum(), xi, create_graph=True)
            (gg,) = torch.autograd.grad(g.square().sum(), xi)
            results.append((out.detach(), g.detach(), gg))
        assert all(torch.equal(a, b) for a, b in zip(*results))
    cl = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    assert torch.equal(pool(cl), F.max_pool2d(cl, 2))


def test_eval_mode_cpu_batches_run_in_equal_chunks_with_whole_batch_numbers(monkeypatch):
    """Eval mode on the CPU: a batch over CPU_CHUNK runs in equal chunks (300 -> 3 x 100 at 128), with the outputs
    and input gradients of one whole pass; training mode stays whole (batch statistics)."""
    model = checkpoint.new_model(checkpoint.model_meta(ModelCfg(width=8, hidden=32), GEOMETRY))
    seen = []
    model.net.register_forward_pre_hook(lambda _, args: seen.append(len(args[0])))
    torch.manual_seed(1)
    x, y = torch.rand(300, 1, 28, 28), torch.randint(0, 10, (300,))

    def out_and_grad():
        xi = x.clone().requires_grad_(True)
        out = model(xi)
        (g,) = torch.autograd.grad(F.cross_entropy(out, y, reduction="sum"), xi)
        return out.detach(), g

    model.eval()
    monkeypatch.setattr(models, "CPU_CHUNK", 10**9)
    whole = out_and_grad()
    monkeypatch.setattr(models, "CPU_CHUNK", 128)
    seen.clear()
    chunked = out_and_grad()
    assert seen == [100, 100, 100]
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])
    model.train()
    seen.clear()
    model(x)
    assert seen == [300]


def test_checkpoint_rebuilds_the_options_it_was_saved_with(tmp_path):
    cfg = ModelCfg(width=8, hidden=64)
    model = checkpoint.new_model(checkpoint.model_meta(cfg, GEOMETRY)).eval()
    checkpoint.save(tmp_path / "m.pt", model, checkpoint.model_meta(cfg, GEOMETRY))
    loaded, meta = checkpoint.load(tmp_path / "m.pt", checkpoint.model_id(cfg))
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(loaded(x), model(x)) and meta["options"] == {"width": 8, "hidden": 64}
    with pytest.raises(UserError, match="options="):
        checkpoint.load(tmp_path / "m.pt", checkpoint.model_id(ModelCfg(width=8)))


# parameters of the CIFAR-10 networks (10 classes, 3 channels): WRN-28-10 and WRN-34-10 as published by Zagoruyko &
# Komodakis (36.5M / 46.2M), PreActResNet-18 as in Rice et al.'s robust-overfitting code
PARAMETERS = {"preact-resnet18": 11_172_170, "wrn-28-10": 36_479_194, "wrn-34-10": 46_160_474}


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_every_registered_architecture_builds_with_its_size_and_normalises_inside(arch):
    colour = arch != "small-cnn"
    meta = {**GEOMETRY, "arch": arch, "channels": 3 if colour else 1, "size": 32 if colour else 28,
            "mean": [0.4, 0.5, 0.6] if colour else [0.5], "std": [0.2, 0.25, 0.3] if colour else [0.25]}
    model = checkpoint.new_model(meta).eval()
    if arch in PARAMETERS:
        assert n_params(model) == PARAMETERS[arch]
    # a tiny input: the networks are fully convolutional up to global pooling (the small CNN's head is lazy, so
    # it is built for its dataset's size and checked there)
    side = 8 if colour else 28
    x = torch.rand(2, meta["channels"], side, side)
    with torch.no_grad():
        out = model(x)
        mean, std = torch.tensor(meta["mean"]).view(1, -1, 1, 1), torch.tensor(meta["std"]).view(1, -1, 1, 1)
        torch.testing.assert_close(out, model.net((x - mean) / std))  # [0, 1] input, normalised by the model
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(x)
    assert out.shape == (2, 10) and out.dtype == mixed.dtype == torch.float32
    assert_fp32_classifier(model)


def assert_fp32_classifier(model: torch.nn.Module) -> None:
    """The layer making the logits computes in fp32 under bf16 autocast: at the logits of trained models (10-20)
    bf16 output would move E(x) by > 1e-2, as much as DER's margin; fp32 keeps it within 1e-4. Without autocast it
    is exactly nn.Linear."""
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        head.weight.copy_(3 * torch.randn(head.weight.shape, generator=g) / head.in_features ** 0.5)
        head.bias.copy_(torch.linspace(10, 20, head.out_features))
        features = torch.rand(64, head.in_features, generator=g).bfloat16()  # as a bf16 network hands them over
        exact = F.linear(features.float(), head.weight, head.bias)
        assert exact.abs().min() > 5 and exact.abs().max() < 25
        assert torch.equal(head(features.float()), exact)
        reference = E.energy(exact)
        assert (E.energy(exact.bfloat16()) - reference).abs().max() > 1e-2  # what bf16 logits would give
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = head(features)
    assert logits.dtype == torch.float32
    assert (E.energy(logits) - reference).abs().max() < 1e-4


def test_preact_blocks_put_batchnorm_before_every_convolution():
    net = MODELS["preact-resnet18"](num_classes=10, channels=3)
    block = net.layers[2]  # first block of the second stage: strided, with a 1x1 shortcut on the activation
    assert block.shortcut is not None and block.shortcut.stride == (2, 2)
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    assert n_bn == 2 * 8 + 1  # two per block (8 blocks) plus the final one
