"""Attacks stay in their threat set and in [0, 1], and lower a trained model's accuracy."""
import pytest
import torch

from energyat.science.attacks import ATTACKS, Threat, default_alpha, pgd_attack


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


EPS = 0.15
# largest L-inf distance each attack may reach: N-FGSM is unprojected (noise 2ε + step ε)
BOUND = {"fgsm": EPS, "rs-fgsm": EPS, "n-fgsm": 3 * EPS, "pgd": EPS, "cw": EPS, "trades": EPS}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_respects_threat_and_box(trained, name):
    model, x, y = trained
    torch.manual_seed(0)
    method_alpha = default_alpha(name, EPS, 10)
    x_adv = ATTACKS[name](model, x, y, Threat(EPS, method_alpha, steps=10))
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv - x).abs().max() <= BOUND[name] + 1e-6


@pytest.mark.parametrize("name", ["fgsm", "rs-fgsm", "pgd", "cw"])
def test_attack_lowers_accuracy(trained, name):
    model, x, y = trained
    clean = accuracy(model, x, y)
    assert clean > 0.95
    torch.manual_seed(0)
    adv = accuracy(model, ATTACKS[name](model, x, y, Threat(EPS, default_alpha(name, EPS, 10), steps=10)), y)
    assert adv < clean - 0.3


def test_pgd_is_stronger_than_fgsm_and_restarts_never_hurt(trained):
    model, x, y = trained
    torch.manual_seed(0)
    fgsm = accuracy(model, ATTACKS["fgsm"](model, x, y, Threat(EPS, EPS)), y)
    one = accuracy(model, pgd_attack(model, x, y, Threat(EPS, EPS / 4, steps=10, restarts=1)), y)
    torch.manual_seed(0)
    three = accuracy(model, pgd_attack(model, x, y, Threat(EPS, EPS / 4, steps=10, restarts=3)), y)
    assert one <= fgsm and three <= one


def test_attacks_keep_the_callers_mode_and_leave_no_parameter_grads(trained):
    model, x, y = trained
    model.zero_grad(set_to_none=True)
    model.train()
    ATTACKS["pgd"](model, x[:16], y[:16], Threat(EPS, EPS / 4, steps=2))
    assert model.training
    model.eval()
    ATTACKS["pgd"](model, x[:16], y[:16], Threat(EPS, EPS / 4, steps=2))
    assert not model.training
    assert all(p.grad is None for p in model.parameters())
