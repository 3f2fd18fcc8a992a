"""Energy identities; DER (the functions training calls) and the AAE masks on hand-computed cases: value, gradient,
the batch normalisations, data-parallel shards."""
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


def der_of_logits(nat, adv, y, gamma, lam=1.0, mask=None, norm="aae"):
    """DER from logits through the functions training calls (training.Objective), in its order."""
    d_x, d_xy = E.delta_energies(nat, adv, y)
    return E.der_loss(E.der_per_sample(d_x, d_xy, gamma, mask), lam, mask, norm)


def test_der_value_and_gradient_by_hand():
    nat = torch.tensor([[0.0, 0.0], [0.0, 0.0]], requires_grad=True)
    adv = torch.tensor([[3.0, 3.0], [0.0, 0.0]], requires_grad=True)
    y = torch.tensor([0, 0])
    # sample 0: E(x) = -log 2, E(x*) = -(3 + log 2): dE(x) = 3; E(x,y) = 0, E(x*,y) = -3: dE(x,y) = 3.
    # L = max(sqrt(9 + 9) - 0.5, 0) = 3√2 - 0.5. Sample 1: ΔE = 0 -> hinge 0. Batch mean halves it.
    loss = der_of_logits(nat, adv, y, gamma=0.5)
    assert loss.item() == pytest.approx((3 * math.sqrt(2) - 0.5) / 2)
    loss.backward()
    # d/d nat: ∂L/∂dE(x) = 3/(3√2) = 1/√2 each; dE(x)/d nat = -softmax(nat) = [-.5,-.5]; dE(x,y)/d nat = [-1, 0].
    # mean over 2 samples -> factor 1/2.
    r = 1 / math.sqrt(2) / 2
    torch.testing.assert_close(nat.grad[0], torch.tensor([r * (-0.5 - 1.0), r * (-0.5)]))
    torch.testing.assert_close(adv.grad[0], -nat.grad[0])  # softmax(adv) is also uniform: mirrored gradient
    torch.testing.assert_close(nat.grad[1], torch.zeros(2))  # inside the hinge: no gradient, and no NaN at ΔE = 0


# Three samples with (ΔE(x), ΔE(x, y)) = (3, 4), (2, 0), (-6, 8): norms 5, 2, 10; with γ = 1, L_ΔE = 4, 1, 9.
# AAEs (ΔE(x) < ΔE(x, y)): samples 0 and 2.
D_X, D_XY = torch.tensor([3.0, 2.0, -6.0]), torch.tensor([4.0, 0.0, 8.0])


def test_der_per_sample_and_aae_mask_by_hand():
    assert E.der_per_sample(D_X, D_XY, 1.0).tolist() == [4.0, 1.0, 9.0]
    mask = E.aae_mask(D_X, D_XY)
    assert mask.tolist() == [True, False, True]
    assert E.der_per_sample(D_X, D_XY, 1.0, mask).tolist() == [4.0, 0.0, 9.0]  # zero outside the AAEs
    assert E.der_per_sample(D_X, D_XY, 20.0).tolist() == [0.0, 0.0, 0.0]  # all inside the margin


@pytest.mark.parametrize("masked, norm, expected", [
    (False, "aae", (4 + 1 + 9) / 3),  # multi-step: the mean over the batch (norm does not apply)
    (False, "batch", (4 + 1 + 9) / 3),
    (True, "aae", (4 + 9) / 2),  # single-step: the mean over the AAEs
    (True, "batch", (4 + 9) / 3),  # single-step: the AAEs' sum over the batch size
])
def test_der_loss_normalisations_by_hand(masked, norm, expected):
    mask = E.aae_mask(D_X, D_XY) if masked else None
    per_sample = E.der_per_sample(D_X, D_XY, 1.0, mask)
    assert E.der_loss(per_sample, 1.0, mask, norm).item() == pytest.approx(expected)
    assert E.der_loss(per_sample, 2.5, mask, norm).item() == pytest.approx(2.5 * expected)  # λ·DER


@pytest.mark.parametrize("masked, norm", [(False, "aae"), (True, "aae"), (True, "batch")])
def test_der_loss_of_shards_averages_to_the_global_batch_term(masked, norm):
    """Data-parallel shards: each rank's term over (the count summed over ranks / world) averages, as DDP averages
    the gradients, to the term of the whole batch. Two ranks: samples [0] and [1, 2]."""
    mask = E.aae_mask(D_X, D_XY) if masked else None
    per_sample = E.der_per_sample(D_X, D_XY, 1.0, mask)
    shards = [slice(0, 1), slice(1, 3)]
    counts = [mask[s].sum().float() for s in shards] if masked else None
    terms = [E.der_loss(per_sample[s], 2.0, None if mask is None else mask[s], norm, batch=3, world=2,
                        total=lambda c: counts[0] + counts[1]) for s in shards]
    assert ((terms[0] + terms[1]) / 2).item() == pytest.approx(E.der_loss(per_sample, 2.0, mask, norm).item())


def test_der_loss_with_no_aae_is_zero_with_a_zero_gradient():
    d_x, d_xy = D_X.clone().requires_grad_(True), D_XY.clone().requires_grad_(True)
    mask = torch.zeros(3, dtype=torch.bool)
    empty = E.der_loss(E.der_per_sample(d_x, d_xy, 1.0, mask), 2.0, mask, "aae")
    empty.backward()
    assert empty.item() == 0.0 and torch.count_nonzero(d_x.grad) == 0 and torch.count_nonzero(d_xy.grad) == 0
    with pytest.raises(ValueError, match="norm"):
        E.der_loss(D_X, 1.0, mask, "mean")


def test_aae_mask_marks_examples_whose_loss_went_down():
    y = torch.tensor([0, 0])
    nat = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    adv = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # first: more confident (loss down, AAE); second: flipped
    assert E.aae_mask(*E.delta_energies(nat, adv, y)).tolist() == [True, False]
    ce_down = F.cross_entropy(adv, y, reduction="none") < F.cross_entropy(nat, y, reduction="none")
    assert ce_down.tolist() == [True, False]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_energy_functions_compute_in_fp32_from_half_logits(dtype):
    g = torch.Generator().manual_seed(3)
    nat, adv = (torch.randn(64, 10, generator=g) * 4).to(dtype), (torch.randn(64, 10, generator=g) * 4).to(dtype)
    y = torch.randint(0, 10, (64,), generator=g)
    for value in (E.energy(nat), E.joint_energy(nat, y), *E.delta_energies(nat, adv, y),
                  E.der_per_sample(*E.delta_energies(nat, adv, y), 0.2), der_of_logits(nat, adv, y, 0.2)):
        assert value.dtype == torch.float32
    # the same numbers as from the fp32 copy of those logits: nothing is rounded after the network
    torch.testing.assert_close(E.energy(nat), E.energy(nat.float()), rtol=0, atol=0)
    torch.testing.assert_close(der_of_logits(nat, adv, y, 0.2), der_of_logits(nat.float(), adv.float(), y, 0.2),
                               rtol=0, atol=0)
    # computing in the half type itself would be off by far more than the margins DER and stopping use
    half = -torch.logsumexp(nat, dim=1)
    assert (half.float() - E.energy(nat)).abs().max() > 1e-3


def test_der_under_cpu_autocast_matches_fp32_within_1e_3():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 5))
    x, x_adv = torch.rand(32, 8), torch.rand(32, 8)
    y = torch.randint(0, 5, (32,))
    reference = der_of_logits(model(x), model(x_adv), y, 0.2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        nat, adv = model(x), model(x_adv)
        mixed = der_of_logits(nat, adv, y, 0.2)
    assert nat.dtype == torch.bfloat16 and mixed.dtype == torch.float32
    assert abs(mixed.item() - reference.item()) < 1e-3 * max(1.0, reference.item())


def test_aae_start_mask_by_hand():
    y = torch.tensor([0, 0, 0, 0])
    start = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    adv = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.5, 0.0], [0.0, 0.5]])
    assert E.aae_start_mask(start, adv, y).tolist() == [True, False, False, True]
    assert E.aae_start_mask(start, adv, y).tolist() == E.aae_mask(*E.delta_energies(start, adv, y)).tolist()
