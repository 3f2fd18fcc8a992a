"""Energies of natural vs adversarial examples: the numbers, each attack's examples, the figures, the stage."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from multiproc import run_ranks
from test_robustness import prepared, save_run, trained_small_cnn, write_prepared

from energyat.errors import UserError
from energyat.evaluation import analysis
from energyat.params import AnalyzeCfg, parse
from energyat.science.energy import cross_entropy
from energyat.stages import analyze

SMALL = AnalyzeCfg(n_examples=32, batch_size=64, steps=5, aa_iter=10, target_classes=2, square_queries=50, bins=20)


def test_energies_and_summary_on_hand_made_logits():
    nat = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    adv = torch.tensor([[0.0, 2.0], [0.0, 1.0], [1.0, 0.0]])
    y = torch.tensor([0, 1, 0])
    r = analysis.energies(nat, adv, y)
    lse = torch.logsumexp(torch.tensor([2.0, 0.0]), 0).item()
    assert r["E_x_nat"][0].item() == pytest.approx(-lse) and r["E_x"][0].item() == pytest.approx(-lse)
    assert r["E_xy_nat"].tolist() == [-2.0, -1.0, -0.0] and r["E_xy"].tolist() == [-0.0, -1.0, -1.0]
    assert r["dE_xy"].tolist() == [-2.0, 0.0, 1.0]
    assert r["correct"].tolist() == [True, True, False]
    assert r["success"].tolist() == [True, False, False]  # the third was never correct
    s = analysis.attack_summary(r)
    assert s == {"n": 1, "success": 0.5, "E_x.mean": round(-lse, 4), "E_x.std": 0.0, "E_xy.mean": 0.0,
                 "E_xy.std": 0.0, "dE_x.mean": 0.0, "dE_x.std": 0.0, "dE_xy.mean": -2.0, "dE_xy.std": 0.0}
    assert analysis.attack_summary({**r, "success": torch.zeros(3, dtype=torch.bool)}) == {"n": 0, "success": 0.0}
    nat_s = analysis.natural_summary(nat, y)
    assert nat_s["clean_acc"] == pytest.approx(0.6667) and nat_s["nat.E_xy.mean"] == pytest.approx(-1.0)


@pytest.mark.parametrize("attack", analysis.ATTACKS)
def test_each_attack_stays_in_the_ball_and_raises_the_loss_where_it_succeeds(trained, attack):
    model, x, y = trained
    x, y = x[:48], y[:48]
    eps = 0.15
    torch.manual_seed(0)
    x_adv = analysis.adversarial_examples(model, x, y, attack, eps, SMALL, seed=0, num_classes=4)
    assert x_adv.shape == x.shape and (x_adv - x).abs().max() <= eps + 1e-5
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    nat, adv = analysis.logits_of(model, x, 64), analysis.logits_of(model, x_adv, 64)
    r = analysis.energies(nat, adv, y)
    assert r["success"].float().mean() > 0.2  # eps 0.15 breaks a good share of this small model's images
    # CE(x*) - CE(x) = ΔE(x) - ΔE(x, y): the loss went up on every successful adversarial example
    ok = r["success"]
    rise = cross_entropy(adv, y) - cross_entropy(nat, y)
    assert torch.allclose(rise, r["dE_x"] - r["dE_xy"], atol=1e-4)
    assert (rise[ok] > 0).all()


def test_energies_of_low_precision_logits_are_fp32():
    g = torch.Generator().manual_seed(0)
    nat, adv = (torch.randn(64, 10, generator=g) * 8).bfloat16(), (torch.randn(64, 10, generator=g) * 8).bfloat16()
    y = torch.randint(0, 10, (64,), generator=g)
    low, exact = analysis.energies(nat, adv, y), analysis.energies(nat.float(), adv.float(), y)
    for q in ("E_x_nat", "E_x", "dE_x", "dE_xy"):
        assert low[q].dtype == torch.float32 and torch.equal(low[q], exact[q])
    # the same energies computed in bf16 round by up to ~0.1 at these magnitudes
    assert (torch.logsumexp(nat, 1).float() + exact["E_x_nat"]).abs().max() > 1e-3


def attacked(model, x, y, attacks, cfg):
    """Adversarial examples of each attack on this process's ranks (module level: run_ranks pickles it)."""
    torch.set_num_threads(1)
    return {a: analysis.adversarial_examples(model, x, y, a, 0.15, cfg, 0, 4).tolist() for a in attacks}


def test_two_ranks_make_the_same_adversarial_examples_as_one(trained):
    model, x, y = trained
    x, y = x[:40], y[:40]
    cfg = dataclasses.replace(SMALL, batch_size=16)  # blocks 0-15, 16-31 on rank 0, 32-39 on rank 1
    attacks = ("pgd", "apgd-t", "square")  # our PGD (per-block generator) and two of pyautoattack's
    single = attacked(model, x, y, attacks, cfg)
    assert run_ranks(attacked, 2, model, x, y, attacks, cfg) == [single, single]
    for a in attacks:  # every attack moved images, so equal results are not trivially the inputs
        assert not torch.equal(torch.tensor(single[a]), x)


def test_histogram_figure_has_a_panel_per_attack_and_energy():
    g = torch.Generator().manual_seed(0)
    nat, adv = torch.randn(50, 4, generator=g) * 3, torch.randn(50, 4, generator=g)
    rec = analysis.energies(nat, adv, torch.zeros(50).long())
    fig = analysis.histogram_figure({"pgd": rec, "square": rec}, "t", bins=10)
    axes = fig.get_axes()
    assert len(axes) == 4 and axes[0].get_title().startswith("PGD\n") and axes[3].get_xlabel() == "E(x, y)"
    assert rec["success"].any()  # so each panel holds two histograms: natural and adversarial
    assert len(axes[0].patches) == 20 and len(axes[1].patches) == 20


def test_history_figure_marks_the_co_onset_and_the_best_epoch():
    history = {"epoch": [1, 2, 3], "dE_x": [0.1, 0.5, 2.0], "dE_xy": [0.2, 0.4, 1.0], "val_pgd_acc": [0.5, 0.6, 0.0],
               "der_on": [0, 1, 1]}
    fig = analysis.delta_energy_history_figure(
        "fgsm", "co", {"base": history, "der": history},
        {"base": {"co_epoch": 3, "method": "fgsm", "eps": 0.3}, "der": {"co_epoch": None}})
    left = [a for a in fig.get_axes() if a.get_xlabel() == "epoch"]
    assert len(left) == 2
    marks = [ln.get_xdata()[0] for ln in left[0].get_lines() if ln.get_linestyle() == ":"]
    assert marks == [3] and not [ln for ln in left[1].get_lines() if ln.get_linestyle() == ":"]
    assert "CO onset (epoch 3)" in [t.get_text() for t in left[0].texts]
    assert len(left[1].patches) == 2  # the two DER-active epochs are shaded
    fig = analysis.delta_energy_history_figure("pgd", "ro", {"base": history}, {"base": {"best_epoch": 2}})
    assert [ln.get_xdata()[0] for ln in fig.get_axes()[0].get_lines() if ln.get_linestyle() == ":"] == [2]


HISTORY_HEADER = ("epoch\tlr\ttrain_loss\ttrain_clean_acc\ttrain_adv_acc\tval_clean_acc\tval_pgd_acc\tE_nat\tE_adv\t"
                  "dE_x\tdE_xy\tder\taae_frac\tder_on\tseconds")


def test_analyze_stage_writes_metrics_and_figures(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    meta = write_prepared(tmp_path)
    model = trained_small_cnn(meta, tmp_path)
    save_run(tmp_path, meta, "standard", "base", {"best": model}, method="standard", eps=0.1)
    for variant in ("base", "der"):
        save_run(tmp_path, meta, "fgsm", variant, {"best": model})
        der_on = int(variant == "der")
        rows = [f"{e}\t0.1\t1\t0.5\t0.4\t0.6\t{0.5 - 0.1 * e}\t-3\t-2\t{0.1 * e}\t{0.05 * e}\t0\t0.1\t{der_on}\t1"
                for e in (1, 2, 3)]
        (tmp_path / "plots/history").mkdir(parents=True, exist_ok=True)
        (tmp_path / f"plots/history/fgsm.{variant}.tsv").write_text("\n".join([HISTORY_HEADER, *rows]) + "\n")
        (tmp_path / "metrics/train").mkdir(parents=True, exist_ok=True)
        (tmp_path / f"metrics/train/fgsm.{variant}.json").write_text(json.dumps(
            {"method": "fgsm", "eps": 0.3, "co_epoch": 2 if variant == "base" else None, "best_epoch": 1}))
    raw = {"threads": 1, "runs": {"fgsm": {"method": "fgsm", "eps": 0.3}}, "sample": {"run": "fgsm"},
           "analyze": {"n_examples": 65, "batch_size": 16, "steps": 3, "aa_iter": 5, "target_classes": 2,
                       "square_queries": 20, "bins": 10}}
    with pytest.raises(UserError, match=r"^analyze.n_examples: 65 is not allowed; the test split has 64 images$"):
        analyze.run(parse(raw))
    assert not (tmp_path / "metrics/analysis.json").exists()
    raw["analyze"]["n_examples"] = 24
    params = parse(raw)
    analyze.run(params)

    out = json.loads((tmp_path / "metrics/analysis.json").read_text())
    assert out["n_examples"] == 24
    x, y = prepared(tmp_path, "test")
    x, y = x[:24], y[:24]
    logits = analysis.logits_of(model, x, 16)
    assert out["standard.base.clean_acc"] == round((logits.argmax(1) == y).float().mean().item(), 4)
    # each row is the library's numbers on the same blocks and seed: the standard model at the train.eps
    # default (0.1), the fgsm run at its own eps (0.3)
    for key, eps in (("standard.base", 0.1), ("fgsm.base", 0.3)):
        for attack in ("pgd", "square"):
            x_adv = analysis.adversarial_examples(model, x, y, attack, eps, params.analyze, 0, 10)
            expected = analysis.attack_summary(analysis.energies(logits, analysis.logits_of(model, x_adv, 16), y))
            assert {k[len(f"{key}.{attack}."):]: v for k, v in out.items() if k.startswith(f"{key}.{attack}.")} \
                == expected
    assert out["fgsm.base.square.success"] > out["standard.base.square.success"]  # a larger ball breaks more
    # same weights, same images, same seed: base and der rows agree exactly
    assert {k[10:]: v for k, v in out.items() if k.startswith("fgsm.base.")} == \
        {k[9:]: v for k, v in out.items() if k.startswith("fgsm.der.")}
    pngs = sorted(p.name for p in (tmp_path / "plots/energy").iterdir())
    assert pngs == ["delta_energy_fgsm.png", "hist_fgsm_base.png", "hist_fgsm_der.png", "hist_standard_base.png"]
    assert all((tmp_path / "plots/energy" / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)
