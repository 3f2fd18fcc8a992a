"""The bench's reference loops train exactly what our step trains, so that its speed ratio compares like with like."""
import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from energyat import params as P
from energyat.commands.bench import Ours, Precision, Reference, batch_for, below_target, compare
from energyat.science.methods import METHODS
from energyat.science.models import Normalized, PreActResNet
from energyat.science.training import SUMS

CPU = torch.device("cpu")
GEOMETRY = (1, 16, 4)  # channels, size, classes


def bn_model():
    """A two-block pre-activation ResNet: BatchNorm, so that statistics handling is part of the comparison."""
    torch.manual_seed(0)
    return Normalized(PreActResNet((1, 1), 4, 1, widths=(8, 16), stem=8), (0.5,), (0.25,))


def run_cfg(method):
    train = P._build(P.TrainCfg, {"method": method, "eps": 0.1, "steps": 3, "batch_size": 16, "diag_every": 2})
    return P.RunCfg("t", train, P._build(P.DerCfg, {"lambda": 2.0, "gamma": 0.05}), P.ModelCfg())


CASES = [(m, der) for m in P.METHODS for der in ((False, True) if METHODS[m].adversarial else (False,))]


@pytest.mark.parametrize("method,use_der", CASES)
def test_reference_loop_makes_the_same_updates_as_our_step(method, use_der):
    run = run_cfg(method)
    xb, yb = batch_for(GEOMETRY, 16, CPU, seed=1)
    model = bn_model()
    ours = Ours(copy.deepcopy(model), run, CPU, use_der)
    ref = Reference(model, run, CPU, Precision(bf16=False, channels_last=False), use_der)
    # without DER: diagnostics on steps 0 and 2 only (diag_every = 2) unless free. With DER (diagnostics always
    # on) one step: its loss terms are summed in another order than ours, and the next attack's sign() can
    # amplify that float rounding (1e-8) into a different step
    steps = 1 if use_der else 3
    for loop in (ours, ref):
        gen = torch.Generator().manual_seed(5)  # the same attack starts for both
        for _ in range(steps):
            loop.step(xb, yb, 0.05, gen)
    assert ours.read()[0] == steps * 16  # SUMS[0]: images trained on
    got, want = ours.trainer.model.state_dict(), ref.model.state_dict()
    # DER's extra natural forward moves BatchNorm's running statistics in the plain reference but not in ours
    # (stats-neutral by design); the weights, trained on batch statistics either way, must agree
    keys = [k for k in want if not use_der or "running" not in k and "num_batches" not in k]
    for k in keys:
        torch.testing.assert_close(got[k], want[k], msg=lambda m, k=k: f"{k}: {m}")
    start = bn_model().state_dict()
    assert any(not torch.equal(want[k], start[k]) for k in keys)


class Sin(nn.Module):
    def forward(self, x):
        return torch.sin(x)


def wiggly_model(seed: int) -> nn.Module:
    """A loss that oscillates in x on the scale of the attack step, so that single-step attacks overshoot and lower
    the loss of some samples (abnormal adversarial examples, where single-step DER acts)."""
    torch.manual_seed(seed)
    size = GEOMETRY[1] ** 2
    model = nn.Sequential(nn.Flatten(), nn.Linear(size, 8), Sin(), nn.Linear(8, GEOMETRY[2]))
    with torch.no_grad():
        model[1].weight.mul_(20)
    return model


@pytest.mark.parametrize("method", P.SINGLE_STEP)
def test_reference_single_step_der_on_abnormal_examples_matches_ours(method):
    run = run_cfg(method)
    xb, yb = batch_for(GEOMETRY, 16, CPU, seed=1)
    for seed in range(20):
        ours = Ours(wiggly_model(seed), run, CPU, True)
        ours.step(xb, yb, 0.05, torch.Generator().manual_seed(seed))
        sums = dict(zip(SUMS, ours.read()))
        if 2 <= sums["aae"] <= 14 and sums["der"] > 0:
            break
    else:
        raise AssertionError("no model with abnormal adversarial examples found")
    ref = Reference(wiggly_model(seed), run, CPU, Precision(False, False), True)
    ref.step(xb, yb, 0.05, torch.Generator().manual_seed(seed))
    for got, want in zip(ours.trainer.model.parameters(), ref.model.parameters()):
        torch.testing.assert_close(got, want)


def test_der_changes_the_reference_update():
    xb, yb = batch_for(GEOMETRY, 16, CPU, seed=1)
    weights = []
    for use_der in (False, True):
        ref = Reference(bn_model(), run_cfg("pgd"), CPU, Precision(False, False), use_der)
        ref.step(xb, yb, 0.05, torch.Generator().manual_seed(5))
        weights.append(torch.cat([p.flatten() for p in ref.model.parameters()]))
    assert not torch.allclose(*weights)


def test_compare_reports_both_loops_and_their_ratio():
    xb, yb = batch_for(GEOMETRY, 16, CPU)
    out = compare(bn_model, run_cfg("fgsm"), xb, yb, False, rounds=2, round_seconds=0.01, warmup=1)
    assert out["round_steps"] % 2 == 0  # whole diag_every cycles
    assert out["img_per_s"] > 0 and out["reference.img_per_s"] > 0 and out["ratio_vs_reference"] > 0
    assert below_target({"train.a.ratio_vs_reference": 0.89, "train.b.ratio_vs_reference": 0.9,
                         "train.a.img_per_s": 1.0}) == ["train.a"]


ROOT = Path(__file__).resolve().parents[1]


def gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("tiny", [False, True])
def test_gpu_check_shortens_the_paper_preset_into_valid_params(tiny, tmp_path):
    gpu_check = gpu_check_module()
    plan = gpu_check.TINY if tiny else gpu_check.FULL
    tarball = tmp_path / "cifar10.tar.gz"
    tarball.touch()
    params = gpu_check.preset_params(ROOT / "presets" / "paper.yaml", plan, tarball, "cpu", 0)
    run = params.run("pgd")
    assert (run.train.epochs, run.train.n_train, run.train.steps) == (1, plan.n_train, plan.steps)
    assert run.der.active(1, 1) and (run.der.lam, run.der.gamma) == (6.0, 0.2)  # the paper's RO setting
    assert run.train.eps == pytest.approx(8 / 255) and run.train.batch_size == plan.batch
    assert (params.data.dataset, params.data.augmentation()) == ("image-folder", "crop-flip")
    (tmp_path / "cifar-10-batches-py").mkdir()  # a torchvision root
    assert gpu_check.preset_params(ROOT / "presets" / "paper.yaml", plan, tmp_path, "cpu", 0).data.dataset == "cifar10"
