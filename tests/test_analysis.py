"""Energies of natural vs adversarial examples: the numbers, each attack's examples, the figures, the stage."""
from __future__ import annotations

import json

import pytest
import torch
from test_robustness import save_run, trained_small_cnn, write_prepared

from energyat import analysis
from energyat.energy import cross_entropy
from energyat.params import AnalyzeCfg, parse
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
    params = parse({"threads": 1, "runs": {"fgsm": {"method": "fgsm", "eps": 0.3}}, "sample": {"run": "fgsm"},
                    "analyze": {"n_examples": 24, "steps": 3, "aa_iter": 5, "target_classes": 2,
                                "square_queries": 20, "bins": 10}})
    analyze.run(params)

    out = json.loads((tmp_path / "metrics/analysis.json").read_text())
    assert out["n_examples"] == 24
    for key in ("standard.base", "fgsm.base", "fgsm.der"):
        assert 0 <= out[f"{key}.clean_acc"] <= 1
        for attack in analysis.ATTACKS:
            assert 0 <= out[f"{key}.{attack}.success"] <= 1
            if out[f"{key}.{attack}.n"]:
                assert out[f"{key}.{attack}.dE_x.std"] >= 0
    assert out["fgsm.base.pgd.success"] > 0.5  # eps 0.3 on a barely trained model
    # same weights, same images, same seed: base and der rows agree exactly
    assert {k[10:]: v for k, v in out.items() if k.startswith("fgsm.base.")} == \
        {k[9:]: v for k, v in out.items() if k.startswith("fgsm.der.")}
    pngs = sorted(p.name for p in (tmp_path / "plots/energy").iterdir())
    assert pngs == ["delta_energy_fgsm.png", "hist_fgsm_base.png", "hist_fgsm_der.png", "hist_standard_base.png"]
    assert all((tmp_path / "plots/energy" / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)
