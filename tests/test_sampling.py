"""SGLD on E(x, y): lowering the energy, adaptive stopping, inits; and the pca / sample / score stages end to end."""
from __future__ import annotations

import json

import pytest
import torch

from energyat import checkpoint, params, pca, sampling
from energyat.artifacts import load_torch, save_torch, sha256, write_json
from energyat.energy import joint_energy
from energyat.errors import UserError
from energyat.stages import pca as pca_stage
from energyat.stages import sample as sample_stage
from energyat.stages import score as score_stage

from conftest import make_task

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def targets(trained):
    model, x, y = trained
    x8 = (x * 255).round().to(torch.uint8)
    return sampling.class_mean_energy(model, x8, y, 4, 100, CPU)


def test_class_mean_energy_is_the_per_class_mean(trained, targets):
    model, x, y = trained
    with torch.no_grad():
        e = joint_energy(model((x * 255).round() / 255), y)
    torch.testing.assert_close(targets, torch.stack([e[y == c].mean() for c in range(4)]), atol=1e-4, rtol=0)


def test_sgld_lowers_the_joint_energy(trained):
    model, _, _ = trained
    y = torch.arange(4).repeat_interleave(8)
    x0 = sampling.uniform_init(y, None, (1, 16, 16), 0.0, torch.Generator().manual_seed(0))
    chains = sampling.sgld(model, x0, y, steps=10, step_size=0.01, momentum=0.9, noise=0.001,
                           generator=torch.Generator().manual_seed(1), snapshots=(0, 5))
    with torch.no_grad():
        e0, e_end = joint_energy(model(x0), y), joint_energy(model(chains.x), y)
    torch.testing.assert_close(chains.energy[0], e0, atol=1e-4, rtol=0)
    torch.testing.assert_close(chains.energy[-1], e_end, atol=1e-4, rtol=0)
    assert (e_end < e0 - 10).all()  # from about -2 to below -60 for this model
    assert float(chains.energy.mean(1)[5]) < float(chains.energy.mean(1)[0])
    assert chains.steps_used.tolist() == [10] * 32 and not chains.stopped.any()
    assert torch.equal(chains.snapshots[0], x0) and chains.x.min() >= 0 and chains.x.max() <= 1
    # the update rule itself, one step, no noise: x1 = clip(x0 - ½·η·∇E)
    one = sampling.sgld(model, x0, y, steps=1, step_size=0.01, momentum=0.9, noise=0.0, generator=torch.Generator())
    x = x0.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(joint_energy(model(x), y).sum(), x)
    torch.testing.assert_close(one.x, (x0 - 0.005 * grad).clamp(0, 1), atol=1e-6, rtol=0)


def test_adaptive_stop_freezes_chains_at_their_class_energy(trained, targets):
    model, _, _ = trained
    y = torch.arange(4).repeat_interleave(8)
    x0 = sampling.uniform_init(y, None, (1, 16, 16), 0.0, torch.Generator().manual_seed(0))
    steps, tau = 20, 4.0
    chains = sampling.sgld(model, x0, y, steps=steps, step_size=0.002, momentum=0.5, noise=0.001,
                           generator=torch.Generator().manual_seed(1), target=targets[y], tau=tau,
                           snapshots=tuple(range(steps + 1)))
    used = chains.steps_used
    frozen = chains.stopped[-1]
    assert 0.5 < frozen.float().mean() and (used[frozen] < steps).sum() >= 16  # most chains stop, at varied steps
    assert len(set(used[frozen].tolist())) >= 5
    gap = (chains.energy - targets[y]).square()
    for i in range(y.numel()):
        s = int(used[i])
        assert (gap[:s, i] >= tau).all()  # it moved only while away from its class energy
        if frozen[i] and s < steps:
            assert gap[s, i] < tau and chains.stopped[s:, i].all() and not chains.stopped[:s, i].any()
            for t in range(s, steps + 1):  # frozen: image and energy unchanged from the stop on
                assert torch.equal(chains.snapshots[t][i], chains.x[i])
                assert chains.energy[t, i] == chains.energy[s, i]
            if s > 0:
                assert not torch.equal(chains.snapshots[s - 1][i], chains.x[i])
    with torch.no_grad():
        torch.testing.assert_close(chains.energy[-1], joint_energy(model(chains.x), y), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="target"):
        sampling.sgld(model, x0, y, steps=2, step_size=0.1, momentum=0.0, noise=0.0, generator=torch.Generator(), tau=1.0)
    with pytest.raises(ValueError, match="0..2"):
        sampling.sgld(model, x0, y, steps=2, step_size=0.1, momentum=0.0, noise=0.0, generator=torch.Generator(),
                      snapshots=(3,))


def test_inits_registry_and_their_distributions():
    assert set(sampling.INITS) == set(params.INITS)
    g = torch.Generator().manual_seed(0)
    # class Gaussian: a 2-pixel, 2-class task with known mean and covariance, far from the clip
    cov = torch.tensor([[0.004, 0.002], [0.002, 0.003]])
    data = [torch.distributions.MultivariateNormal(torch.tensor(m), cov).sample((4000,)) for m in ([0.3, 0.6], [0.7, 0.4])]
    x, labels = torch.cat(data), torch.tensor([0] * 4000 + [1] * 4000)
    prior = sampling.class_gaussians(x, labels, 2)
    torch.testing.assert_close(prior.scale[0] @ prior.scale[0].T, torch.cov(data[0].T), atol=1e-6, rtol=0)
    y = torch.tensor([1] * 3000 + [0] * 3000)
    draws = sampling.INITS["gaussian"].draw(y, prior, (1, 1, 2), 0.0, g).flatten(1)
    torch.testing.assert_close(draws[y == 1].mean(0), torch.tensor([0.7, 0.4]), atol=0.01, rtol=0)
    torch.testing.assert_close(torch.cov(draws[y == 0].T), cov, atol=4e-4, rtol=0)
    # PCA: each label draws from a fit of its own class; alpha ~ N(0, σ²) scales the singular values
    fits = [pca.fit(torch.rand(50, 6, generator=g) * 0.2 + 0.4 + 0.1 * c, 1.0) for c in (0, 0, 1)]
    bank = sampling.PcaBank(fits, torch.tensor([0, 0, 1]))
    y = torch.tensor([0] * 400 + [1] * 400)
    starts = sampling.INITS["pca-local"].draw(y, bank, (1, 2, 3), 0.0, g).flatten(1)
    means = torch.stack([f["mean"] for f in fits])
    dist = (starts[:, None] - means[None]).norm(dim=2)
    assert (dist[y == 1, 2] < 1e-6).all() and (dist[y == 0].min(1).values < 1e-6).all()
    assert (dist[y == 0, 0] < 1e-6).any() and (dist[y == 0, 1] < 1e-6).any()  # both fits of class 0 in use
    sigma = 0.5
    starts = sampling.INITS["pca-global"].draw(y[400:], sampling.PcaBank([fits[2]], torch.tensor([1])), (6,), sigma, g)
    alpha = pca.encode(fits[2], starts) / fits[2]["singular_values"]
    torch.testing.assert_close(alpha.std(0), torch.full((6,), sigma), atol=0.06, rtol=0)
    x0 = sampling.INITS["uniform"].draw(y, None, (1, 2, 3), 0.0, g)
    assert x0.shape == (800, 1, 2, 3) and 0 <= x0.min() and x0.max() <= 1 and abs(float(x0.mean()) - 0.5) < 0.02
    with pytest.raises(ValueError, match="no PCA fit for class 1"):
        sampling.INITS["pca-local"].draw(y, sampling.PcaBank(fits[:2], torch.tensor([0, 0])), (6,), 0.1, g)


def test_sample_params_are_checked():
    base = {"runs": {"pgd": {"method": "pgd"}}}
    with pytest.raises(params.ParamsError, match=r"^sample.tau: -0.1 is not allowed; must be >= 0"):
        params.parse({**base, "sample": {"tau": -0.1}})
    with pytest.raises(params.ParamsError, match=r"^sample.step_sweep: 60 is not allowed"):
        params.parse({**base, "sample": {"steps": 50, "step_sweep": [10, 60]}})
    with pytest.raises(params.ParamsError, match=r"^sample.samplers.x.init: 'ddpm' is not allowed"):
        params.parse({**base, "sample": {"samplers": {"x": {"init": "ddpm"}}}})


# ------------------------------------------------------------------------------------------------ stages


def workspace(root, model, samplers: dict) -> params.Params:
    """data/prepared (the synthetic task, 16×16 grey, 4 classes) and the three models the stages read."""
    x, y = make_task(n=400, seed=1)
    x8 = (x * 255).round().to(torch.uint8)
    meta = {"dataset": "synthetic", "classes": ["a", "b", "c", "d"], "num_classes": 4, "channels": 1, "size": 16,
            "mean": [0.5], "std": [0.25], "files": {}}
    for name, sl in (("train", slice(0, 300)), ("val", slice(300, 360)), ("test", slice(360, 400))):
        save_torch(root / f"data/prepared/{name}.pt", {"x": x8[sl], "y": y[sl]})
        meta["files"][name] = sha256(root / f"data/prepared/{name}.pt")
    write_json(root / "data/prepared/meta.json", meta)
    state = model.state_dict()
    for variant, run, method, eps in (("base", "standard", "standard", 0.0), ("base", "pgd", "pgd", 0.1),
                                      ("der", "pgd", "pgd", 0.1)):
        twin = checkpoint.new_model(checkpoint.model_meta(params.ModelCfg(), meta))
        twin.load_state_dict(state)
        checkpoint.save(root / f"models/{variant}/{run}/best.pt", twin,
                        {**checkpoint.model_meta(params.ModelCfg(), meta), "run": run, "variant": variant, "method": method,
                         "eps": eps, "epoch": 1, "val_clean_acc": 1.0, "val_pgd_acc": 0.5})
    return params.parse({
        "threads": 1, "runs": {"pgd": {"method": "pgd"}},
        "pca": {"variance": 0.9, "k": 20, "n_anchors": 2},
        "sample": {"steps": 6, "step_size": 0.002, "momentum": 0.5, "tau": 4.0, "samples_per_class": 3,
                   "batch_size": 5, "n_energy": 50, "step_sweep": [0, 3], "samplers": samplers},
        "score": {"batch_size": 64},
    })


@pytest.fixture
def stage_model():
    torch.manual_seed(0)
    meta = {"arch": "small-cnn", "num_classes": 4, "channels": 1, "size": 16, "mean": [0.5], "std": [0.25]}
    return checkpoint.new_model(meta).eval()


def test_stages_pca_sample_score_end_to_end(tmp_path, monkeypatch, stage_model):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no Inception weights anywhere
    p = workspace(tmp_path, stage_model, {"uniform": {"init": "uniform", "adaptive": False},
                                          "local-adaptive": {"init": "pca-local", "adaptive": True}})
    pca_stage.run(p)
    local = load_torch("data/pca/local.pt")
    assert local["classes"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3] and len(local["fits"]) == 8
    pm = json.loads((tmp_path / "metrics/pca.json").read_text())
    assert all(pm[f"pca.global.{c}.retained"] >= 0.9 for c in range(4))
    assert pm["pca.global.0.components"] == load_torch("data/pca/global.pt")["fits"][0]["components"].shape[0]

    for sampler in p.sample.samplers:
        sample_stage.run(p, sampler)
    for variant in ("base", "der"):
        s = load_torch(f"data/samples/local-adaptive/{variant}.pt")
        assert s["x"].dtype == torch.uint8 and s["x"].shape == (12, 1, 16, 16)
        assert s["y"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3] and set(s["snapshots"]) == {"0", "3"}
        assert (s["steps_used"] <= 6).all()
        rows = (tmp_path / f"plots/sampling/local-adaptive.{variant}.tsv").read_text().splitlines()
        assert rows[0] == "step\tenergy\tstopped\tenergy_train" and len(rows) == 1 + 7
        assert (tmp_path / f"plots/samples/local-adaptive.{variant}.png").stat().st_size > 1000
    sm = json.loads((tmp_path / "metrics/sample/uniform.json").read_text())
    assert sm["sample.uniform.base.steps_used"] == 6.0 and sm["sample.uniform.base.stopped"] == 0.0

    score_stage.run(p)
    m = json.loads((tmp_path / "metrics/score.json").read_text())
    for sampler in p.sample.samplers:
        for variant in ("base", "der"):
            k = f"gen.{sampler}.{variant}"
            assert 1.0 <= m[f"{k}.is"] <= 4.0 and m[f"{k}.fid"] >= 0 and m[f"{k}.diversity"] > 0
            assert m[f"{k}.inception_fid"] == "not computed"
            steps = load_torch(f"data/samples/{sampler}/{variant}.pt")["steps_used"].float().mean()
            assert m[f"{k}.steps"] == pytest.approx(float(steps), abs=1e-4)
    assert m["gen.uniform.base.steps"] == 6.0
    assert m["gen.real.fid"] < m["gen.uniform.base.fid"]  # held-out real images beat noise-started chains
    table = (tmp_path / "metrics/generation.md").read_text()
    assert "| der | local-adaptive |" in table and "not computed" in table
    sweep = (tmp_path / "plots/generation/sweep.tsv").read_text().splitlines()
    assert len(sweep) == 1 + 2 * 2 * 3  # samplers × variants × (0, 3, 6 steps)
    assert (tmp_path / "plots/generation/quality_diversity.png").stat().st_size > 1000


def test_sample_stage_bad_inputs(tmp_path, monkeypatch, capsys, stage_model):
    monkeypatch.chdir(tmp_path)
    p = workspace(tmp_path, stage_model, {"global": {"init": "pca-global", "adaptive": False}})
    with pytest.raises(UserError, match=r"^sample: 'nope' is not in sample.samplers; allowed: global$"):
        sample_stage.run(p, "nope")
    with pytest.raises(UserError, match=r"^data/pca/global.pt: file not found"):
        sample_stage.run(p, "global")
    assert not (tmp_path / "data/samples").exists()
    # a non-robust generating model: one warning line, then the samples all the same
    meta_path = tmp_path / "models/der/pgd/best.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "val_pgd_acc": 0.0}))
    pca_stage.run(p)
    sample_stage.run(p, "global")
    err = capsys.readouterr().err
    assert "models/der/pgd/best.pt has validation PGD accuracy 0.000 (chance 0.250): not robust" in err
    assert "models/base/pgd/best.pt has" not in err
    assert load_torch("data/samples/global/der.pt")["x"].shape == (12, 1, 16, 16)
    with pytest.raises(UserError, match=r"^data/samples/global/base.pt: not a samples file"):
        save_torch(tmp_path / "data/samples/global/base.pt", {"x": torch.zeros(3)})
        score_stage.run(p)
