"""Training methods as their reference code runs them: exact attack steps and noise scales, the loss values of
TRADES, GradAlign and masked single-step DER inside the real training step (value and gradient against a hand
computation), and BatchNorm's running statistics touched only by the passes each method itself makes."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_task, tiny_model
from torch import nn

from energyat import params as P
from energyat.science import energy as E
from energyat.science.attacks import ATTACKS, Threat, single_step, trades_attack, uniform_noise
from energyat.science.methods import METHODS, bn_stats_frozen, gradalign_cosines
from energyat.science.training import Objective


def run_cfg(method: str, **over) -> P.RunCfg:
    der = over.pop("der", {})
    raw = {"method": method, "epochs": 2, "batch_size": 32, "eps": 0.1, "n_val": 32, "val_steps": 2, **over}
    return P.RunCfg("t", P._build(P.TrainCfg, raw), P._build(P.DerCfg, {"lambda": 1.0, **der}), P.ModelCfg())


def linear_model(seed: int = 0, classes: int = 3, size: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(size * size, classes))


def mid_grey(n: int = 8, size: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images near 0.5, far from the [0, 1] box at the radii used here, so no clipping hides a step."""
    g = torch.Generator().manual_seed(seed)
    return 0.4 + 0.2 * torch.rand(n, 1, size, size, generator=g), torch.randint(0, 3, (n,), generator=g)


def ce_input_grad(model, x, y):
    x = x.clone().requires_grad_(True)
    return torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)[0]


# ------------------------------------------------------------------------------------------- attack steps

def test_fgsm_takes_one_step_of_alpha_along_the_gradient_sign_at_x():
    model, (x, y) = linear_model(), mid_grey()
    step = single_step(model, x, y, 0.05)
    torch.testing.assert_close(step.x_adv - x, 0.05 * ce_input_grad(model, x, y).sign())
    torch.testing.assert_close(step.start_logits, model(x))  # its forward at x is the natural forward


@pytest.mark.parametrize("method, noise_radius, alpha, bound", [
    ("rs-fgsm", 1.0, 1.25, 1.0),  # Wong et al.: start U(-ε, ε), step 1.25ε, projected to the ε-ball
    ("n-fgsm", 2.0, 1.0, 3.0),  # de Jorge et al.: noise U(-2ε, 2ε), step ε, no projection
])
def test_random_start_single_step_scales(method, noise_radius, alpha, bound):
    eps = 0.02
    model, (x, y) = linear_model(), mid_grey(n=64)
    noise = uniform_noise(x, torch.Generator().manual_seed(1))
    adv = METHODS[method].attack(model, x, y, METHODS[method].threat(P.TrainCfg(method=method, eps=eps)), noise, False)
    start = x + noise_radius * eps * noise
    expected = start + alpha * eps * ce_input_grad(model, start, y).sign()
    if method == "rs-fgsm":
        expected = x + (expected - x).clamp(-eps, eps)
    torch.testing.assert_close(adv.x_adv, expected)
    torch.testing.assert_close(adv.logits_start, model(start))
    assert (adv.x_adv - x).abs().max().item() == pytest.approx(bound * eps, rel=0.05)


@pytest.mark.parametrize("method", [m for m in METHODS if METHODS[m].adversarial])
def test_training_examples_stay_in_the_eps_ball_even_with_a_step_of_two_eps(method):
    """Every method but N-FGSM (no projection by design) clamps δ to [-ε, ε], as the reference code does, whatever
    `train.alpha`; x* stays an image. Images from the synthetic task touch 0 and 1, so the [0, 1] clip acts too."""
    eps = 0.05
    model, (x, y) = tiny_model(), make_task(n=64)
    m = METHODS[method]
    noise = {None: None, "uniform": uniform_noise(x, torch.Generator().manual_seed(1)),
             "normal": torch.randn(x.shape, generator=torch.Generator().manual_seed(1))}[m.noise]
    threat = m.threat(P.TrainCfg(method=method, eps=eps, alpha=2 * eps, steps=3))
    x_adv = m.attack(model, x, y, threat, noise, False).x_adv
    assert 0 <= x_adv.min() and x_adv.max() <= 1
    reach = (x_adv - x).abs().max().item()
    if method == "n-fgsm":
        assert reach > eps + 1e-3  # noise of 2ε plus the step: outside the ball
    else:
        assert reach <= eps + 1e-6
    if method == "fgsm":  # the evaluation attack of the same name too
        assert (ATTACKS["fgsm"](model, x, y, threat) - x).abs().max().item() <= eps + 1e-6


def test_uniform_noise_is_uniform_on_minus_one_one():
    u = uniform_noise(torch.empty(200_000), torch.Generator().manual_seed(0))
    assert u.min() >= -1 and u.max() < 1
    assert u.mean().item() == pytest.approx(0.0, abs=0.01)
    assert u.var().item() == pytest.approx(1 / 3, abs=0.01)  # U(-1, 1) has variance 1/3


def test_trades_attack_runs_in_eval_mode_and_maximises_kl():
    model = tiny_model(classes=4, size=16, width=4)
    x, y = make_task(n=16, classes=4, size=16)
    modes = []
    model.register_forward_pre_hook(lambda m, _: modes.append(m.training))
    model.train()
    METHODS["trades"].attack(model, x, y, Threat(0.1, 0.025, steps=3), torch.zeros_like(x), False)
    assert modes and not any(modes)  # Zhang et al. generate x* in eval mode
    assert model.training  # and hand the model back in train mode
    model.eval()
    x_adv = trades_attack(model, x, Threat(0.1, 0.025, steps=3), torch.randn(x.shape, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        p = F.softmax(model(x), 1)
        kl = F.kl_div(F.log_softmax(model(x_adv), 1), p, reduction="sum").item()
    assert 0.075 - 0.005 < (x_adv - x).abs().max().item() <= 0.1 + 1e-6  # 3 steps of 0.025 from x + 0.001·N(0, I)
    assert kl > 1e-3


# ------------------------------------------------------------------------------------------- losses

def test_trades_loss_by_hand():
    nat = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    adv = torch.tensor([[1.0, 1.0], [0.0, 3.0]])
    y = torch.tensor([0, 1])
    cfg = P.TrainCfg(method="trades", trades_beta=6.0)
    got = METHODS["trades"].loss(nat, adv, y, cfg)
    p = F.softmax(nat, 1)
    kl = (p * (p.log() - F.log_softmax(adv, 1))).sum(1)
    torch.testing.assert_close(got, F.cross_entropy(nat, y, reduction="none") + 6.0 * kl)
    assert kl[0].item() == pytest.approx(p[0, 0].item() * math.log(2 * p[0, 0].item())
                                         + p[0, 1].item() * math.log(2 * p[0, 1].item()))


def test_gradalign_cosines_by_hand_and_differentiable():
    model, (x, y) = linear_model(), mid_grey()
    grad_nat = ce_input_grad(model, x, y)
    noise = uniform_noise(x, torch.Generator().manual_seed(2))
    cos, valid = gradalign_cosines(model, x, y, 0.05, grad_nat, noise)
    g2 = ce_input_grad(model, x + 0.05 * noise, y)
    expected = F.cosine_similarity(grad_nat.flatten(1), g2.flatten(1), dim=1)
    torch.testing.assert_close(cos, expected)
    assert valid.all()
    (1 - cos.mean()).backward()  # double backprop reaches the weights
    assert model[1].weight.grad is not None and model[1].weight.grad.abs().sum() > 0


def test_gradalign_default_weight_follows_the_published_rule():
    lam = lambda eps: P.TrainCfg(eps=eps).gradalign_weight()  # noqa: E731
    assert lam(8 / 255) == pytest.approx(0.2) and lam(16 / 255) == pytest.approx(2.0)
    assert lam(12 / 255) == pytest.approx(0.2 * 10 ** 0.5)  # log-linear in eps
    assert lam(0.3) == pytest.approx(2.0)  # beyond the published range: its end
    assert P.TrainCfg(eps=0.3, gradalign_lambda=0.5).gradalign_weight() == 0.5


class Sin(nn.Module):
    def forward(self, x):
        return torch.sin(x)


def wiggly_net(seed: int) -> nn.Module:
    """A net whose loss oscillates in x on the scale of the attack step (sin of 20x-scaled projections), so that
    single-step attacks overshoot and lower the loss of some samples: abnormal adversarial examples. (For a
    linear model the CE is convex in x and a gradient-sign step never lowers it.)"""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), Sin(), nn.Linear(8, 3))
    with torch.no_grad():
        model[1].weight.mul_(20)
    return model


def aae_rich_batch(method: str, run: P.RunCfg):
    """A model, batch and noise where the attack makes AAEs under both definitions, but not only AAEs."""
    for seed in range(20):
        model, (x, y) = wiggly_net(seed), mid_grey(n=16, seed=seed)
        noise = uniform_noise(x, torch.Generator().manual_seed(seed))
        adv = METHODS[method].attack(model, x, y, METHODS[method].threat(run.train), noise, False)
        with torch.no_grad():
            out = model(adv.x_adv)
            clean = E.aae_mask(*E.delta_energies(model(x), out, y))
            start = E.aae_start_mask(adv.logits_start, out, y)
        if all(2 <= m.sum() <= len(y) - 2 for m in (clean, start)):
            return model, x, y, noise
    raise AssertionError("no batch with AAEs found")


@pytest.mark.parametrize("method, aae, norm", [("fgsm", "clean", "aae"), ("fgsm", "clean", "batch"),
                                                ("rs-fgsm", "clean", "aae"), ("rs-fgsm", "start", "batch")])
def test_masked_single_step_der_inside_the_training_step_by_hand(method, aae, norm):
    run = run_cfg(method, eps=0.1, der={"lambda": 2.0, "gamma": 0.01, "aae": aae, "aae_norm": norm})
    model, x, y, noise = aae_rich_batch(method, run)
    loss, sums = Objective(model, run)(x, y, noise, True, True, len(y))
    grads = torch.autograd.grad(loss, list(model.parameters()))

    # by hand: x* from the same attack, CE(x*) + λ · DER over the AAEs, normalised as asked
    adv = METHODS[method].attack(model, x, y, METHODS[method].threat(run.train), noise, False)
    nat, out = model(x), model(adv.x_adv)
    start = adv.logits_start
    ce = lambda logits: F.cross_entropy(logits, y, reduction="none")  # noqa: E731
    mask = (ce(out) < ce(start)) if aae == "start" else (ce(out) < ce(nat))
    d_x, d_xy = by_hand_deltas(nat, out, y)
    hinge = (torch.sqrt(d_x ** 2 + d_xy ** 2) - 0.01).clamp_min(0) * mask
    der = hinge.sum() / (mask.sum() if norm == "aae" else len(y))
    expected = ce(out).mean() + 2.0 * der
    torch.testing.assert_close(loss, expected)
    for got, want in zip(grads, torch.autograd.grad(expected, list(model.parameters()))):
        torch.testing.assert_close(got, want)
    assert 0 < mask.sum() < len(y) and der.item() > 0
    assert sums["aae"].item() == int((d_x < d_xy).sum())  # diagnostics: the clean AAE definition


def by_hand_deltas(nat, out, y):
    """(ΔE(x), ΔE(x, y)) written out: E = -logsumexp f, E(·, y) = -f[y], natural minus adversarial."""
    return (-torch.logsumexp(nat, 1) + torch.logsumexp(out, 1),
            -nat.gather(1, y[:, None]).squeeze(1) + out.gather(1, y[:, None]).squeeze(1))


@pytest.mark.parametrize("method", ["pgd", "trades"])
def test_multi_step_der_inside_the_training_step_by_hand(method):
    """Multi-step AT with DER on, docs/design.md §1: L = (the method's loss) + λ · mean over the batch of
    L_ΔE = max(‖[ΔE(x), ΔE(x, y)]‖₂ - γ, 0), value and gradient, with x* detached."""
    run = run_cfg(method, eps=0.1, steps=2, der={"lambda": 2.0, "gamma": 0.05})
    model, (x, y) = wiggly_net(0), mid_grey(n=16)
    gen = torch.Generator().manual_seed(0)
    noise = uniform_noise(x, gen) if method == "pgd" else torch.randn(x.shape, generator=gen)
    loss, _ = Objective(model, run)(x, y, noise, True, True, len(y))
    grads = torch.autograd.grad(loss, list(model.parameters()))

    x_adv = METHODS[method].attack(model, x, y, METHODS[method].threat(run.train), noise, False).x_adv
    nat, out = model(x), model(x_adv)
    d_x, d_xy = by_hand_deltas(nat, out, y)
    hinge = (torch.sqrt(d_x ** 2 + d_xy ** 2) - 0.05).clamp_min(0)
    if method == "pgd":
        base = F.cross_entropy(out, y)
    else:
        p = F.softmax(nat, 1)
        kl = (p * (p.log() - F.log_softmax(out, 1))).sum(1)
        base = (F.cross_entropy(nat, y, reduction="none") + run.train.trades_beta * kl).mean()
    expected = base + 2.0 * hinge.mean()
    torch.testing.assert_close(loss, expected)
    for got, want in zip(grads, torch.autograd.grad(expected, list(model.parameters()))):
        torch.testing.assert_close(got, want)
    assert hinge.sum().item() > 0


# ------------------------------------------------------------------------------------------- BatchNorm

class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(4 * 16 * 16, 4))

    def forward(self, x):
        return self.net(x)


def test_bn_stats_frozen_keeps_running_statistics_bit_identical():
    model = BNNet().train()
    x = torch.rand(8, 1, 16, 16)
    model(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with bn_stats_frozen(model):
        out = model(x + 1)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.net[1].momentum == 0.1
    bn = model.net[1]
    batch_mean = (x + 1).mean((0, 2, 3))
    assert not torch.allclose(bn.running_mean, batch_mean)  # train-mode output used the batch's own statistics
    expected = F.batch_norm(model.net[0](x + 1), None, None, bn.weight, bn.bias, training=True)
    torch.testing.assert_close(out, model.net[4](model.net[3](F.relu(expected))))


@pytest.mark.parametrize("method", ["pgd", "rs-fgsm", "n-fgsm", "fgsm", "trades", "gradalign"])
def test_diagnostics_do_not_change_training_of_a_batchnorm_model(method):
    """A base run with the energy diagnostics on every batch trains bit-identical weights and running statistics
    to the same run without them."""
    from energyat.science.data import Split
    from energyat.science.training import fit

    x, y = make_task(n=96, classes=4, size=16, seed=5)
    split = Split((x * 255).round().to(torch.uint8), y)
    states = []
    for diag_every in (1, 0):
        torch.manual_seed(0)
        model = BNNet()
        run = run_cfg(method, steps=2, diag_every=diag_every, epochs=2)
        hist = fit(model, split, split, run, False, torch.device("cpu"), seed=3)
        states.append((model.state_dict(), hist))
    (with_diag, h1), (without, h0) = states
    for k in with_diag:
        assert torch.equal(with_diag[k], without[k]), k
    assert not math.isnan(h1[-1]["E_nat"]) and math.isnan(h0[-1]["E_nat"])
