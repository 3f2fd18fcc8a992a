"""Energy identities, DER value and gradient on hand-computed cases, the AAE mask."""
import math

import pytest
import torch
import torch.nn.functional as F

from energyat.science import energy as E


def test_marginal_and_joint_energy_by_hand():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    assert E.energy(logits).item() == pytest.approx(-math.log(math.e + math.e**2 + math.e**3))
    assert E.joint_energy(logits, torch.tensor([1])).item() == pytest.approx(-2.0)


def test_cross_entropy_is_energy_difference():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(64, 10, generator=g) * 3, torch.randint(0, 10, (64,), generator=g)
    torch.testing.assert_close(E.cross_entropy(logits, y), F.cross_entropy(logits, y, reduction="none"))


def test_ce_change_equals_delta_energy_difference():
    g = torch.Generator().manual_seed(1)
    nat, adv, y = torch.randn(32, 10, generator=g), torch.randn(32, 10, generator=g), torch.randint(0, 10, (32,), generator=g)
    d_x, d_xy = E.delta_energies(nat, adv, y)
    lhs = F.cross_entropy(adv, y, reduction="none") - F.cross_entropy(nat, y, reduction="none")
    torch.testing.assert_close(lhs, d_x - d_xy)


def test_delta_energy_sign_is_natural_minus_adversarial():
    nat = torch.tensor([[0.0, 0.0]])
    adv = torch.tensor([[1.0, 1.0]])  # higher logits -> lower energy for x*
    d_x, d_xy = E.delta_energies(nat, adv, torch.tensor([0]))
    assert d_x.item() == pytest.approx(1.0) and d_xy.item() == pytest.approx(1.0)


def test_der_value_and_gradient_by_hand():
    # sample 0: dE(x) = E(x) - E(x*) with E = -logsumexp; chosen logits give dE(x)=3 ... computed below by hand.
    nat = torch.tensor([[0.0, 0.0], [0.0, 0.0]], requires_grad=True)
    adv = torch.tensor([[3.0, 3.0], [0.0, 0.0]], requires_grad=True)
    y = torch.tensor([0, 0])
    # sample 0: E(x) = -log 2, E(x*) = -(3 + log 2): dE(x) = 3; E(x,y) = 0, E(x*,y) = -3: dE(x,y) = 3.
    # L = max(sqrt(9 + 9) - 0.5, 0) = 3√2 - 0.5. Sample 1: ΔE = 0 -> hinge 0. Batch mean halves it.
    loss = E.der_loss(nat, adv, y, gamma=0.5)
    assert loss.item() == pytest.approx((3 * math.sqrt(2) - 0.5) / 2)
    loss.backward()
    # d/d nat: ∂L/∂dE(x) = 3/(3√2) = 1/√2 each; dE(x)/d nat = -softmax(nat) = [-.5,-.5]; dE(x,y)/d nat = [-1, 0].
    # mean over 2 samples -> factor 1/2.
    r = 1 / math.sqrt(2) / 2
    torch.testing.assert_close(nat.grad[0], torch.tensor([r * (-0.5 - 1.0), r * (-0.5)]))
    torch.testing.assert_close(adv.grad[0], -nat.grad[0])  # softmax(adv) is also uniform: mirrored gradient
    torch.testing.assert_close(nat.grad[1], torch.zeros(2))  # inside the hinge: no gradient, and no NaN at ΔE = 0


def test_der_mask_averages_over_selected_only_and_empty_mask_is_zero():
    g = torch.Generator().manual_seed(2)
    nat, adv, y = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g), torch.randint(0, 5, (8,), generator=g)
    per = E.der_per_sample(nat, adv, y, 0.0)
    mask = torch.tensor([1, 0, 1, 0, 0, 0, 0, 1], dtype=torch.bool)
    assert E.der_loss(nat, adv, y, 0.0, mask).item() == pytest.approx(per[mask].mean().item())
    nat.requires_grad_(True)
    empty = E.der_loss(nat, adv, y, 0.0, torch.zeros(8, dtype=torch.bool))
    empty.backward()
    assert empty.item() == 0.0 and torch.count_nonzero(nat.grad) == 0


def test_aae_mask_marks_examples_whose_loss_went_down():
    y = torch.tensor([0, 0])
    nat = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    adv = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # first: more confident (loss down, AAE); second: flipped
    assert E.aae_mask(nat, adv, y).tolist() == [True, False]
    ce_down = F.cross_entropy(adv, y, reduction="none") < F.cross_entropy(nat, y, reduction="none")
    assert ce_down.tolist() == [True, False]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_energy_functions_compute_in_fp32_from_half_logits(dtype):
    g = torch.Generator().manual_seed(3)
    nat, adv = (torch.randn(64, 10, generator=g) * 4).to(dtype), (torch.randn(64, 10, generator=g) * 4).to(dtype)
    y = torch.randint(0, 10, (64,), generator=g)
    for value in (E.energy(nat), E.joint_energy(nat, y), *E.delta_energies(nat, adv, y),
                  E.der_per_sample(nat, adv, y, 0.2), E.der_loss(nat, adv, y, 0.2)):
        assert value.dtype == torch.float32
    # the same numbers as from the fp32 copy of those logits: nothing is rounded after the network
    torch.testing.assert_close(E.energy(nat), E.energy(nat.float()), rtol=0, atol=0)
    torch.testing.assert_close(E.der_loss(nat, adv, y, 0.2), E.der_loss(nat.float(), adv.float(), y, 0.2),
                               rtol=0, atol=0)
    # computing in the half type itself would be off by far more than the margins DER and stopping use
    half = -torch.logsumexp(nat, dim=1)
    assert (half.float() - E.energy(nat)).abs().max() > 1e-3


def test_der_under_cpu_autocast_matches_fp32_within_1e_3():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 5))
    x, x_adv = torch.rand(32, 8), torch.rand(32, 8)
    y = torch.randint(0, 5, (32,))
    reference = E.der_loss(model(x), model(x_adv), y, 0.2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        nat, adv = model(x), model(x_adv)
        mixed = E.der_loss(nat, adv, y, 0.2)
    assert nat.dtype == torch.bfloat16 and mixed.dtype == torch.float32
    assert abs(mixed.item() - reference.item()) < 1e-3 * max(1.0, reference.item())


def test_aae_start_and_batch_normalisation_by_hand():
    y = torch.tensor([0, 0, 0, 0])
    start = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    adv = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.5, 0.0], [0.0, 0.5]])
    assert E.aae_start_mask(start, adv, y).tolist() == [True, False, False, True]
    nat = torch.zeros(4, 2)
    per = E.der_per_sample(nat, adv, y, 0.0)
    mask = torch.tensor([True, False, False, True])
    assert E.der_loss(nat, adv, y, 0.0, mask, norm="aae").item() == pytest.approx(per[mask].sum().item() / 2)
    assert E.der_loss(nat, adv, y, 0.0, mask, norm="batch").item() == pytest.approx(per[mask].sum().item() / 4)
