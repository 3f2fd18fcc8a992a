"""The training loop: LR schedules, DER switching, CO/divergence detection, and exact resume."""
import copy
import json
import math
import shutil

import pytest
import torch
from conftest import make_task, tiny_model

from energyat import params as P
from energyat.runstate.resume import state_path
from energyat.science.data import Split
from energyat.science.overfitting import summarize
from energyat.science.training import HISTORY_COLUMNS, fit, learning_rate
from energyat.stages import train as train_stage


def as_split(x, y):
    return Split((x * 255).round().to(torch.uint8), y)


@pytest.fixture(scope="module")
def splits():
    x, y = make_task(n=384, seed=3)
    return as_split(x[:256], y[:256]), as_split(x[256:], y[256:])


def run_cfg(**over):
    der = over.pop("der", {})
    base = {"method": "fgsm", "epochs": 3, "batch_size": 64, "eps": 0.1, "n_val": 64, "val_steps": 3,
            "lr_max": 0.05, **over}
    return P.RunCfg("t", P._build(P.TrainCfg, base), P._build(P.DerCfg, {"lambda": 1.0, **der}), P.ModelCfg())


def test_learning_rate_schedules():
    cyc = P.TrainCfg(epochs=10, lr_schedule="cyclic", lr_max=0.2)
    assert [learning_rate(cyc, t) for t in (0, 2.5, 5, 7.5, 10)] == pytest.approx([0, 0.1, 0.2, 0.1, 0])
    pw = P.TrainCfg(epochs=100, lr_schedule="piecewise", lr_max=0.1, lr_milestones=(0.5, 0.75))
    assert [learning_rate(pw, t) for t in (0, 49.9, 50, 75, 99)] == pytest.approx([0.1, 0.1, 0.01, 0.001, 0.001])


def test_history_has_every_column_and_der_switches_on_late_for_multistep(splits):
    train, val = splits
    torch.manual_seed(0)
    hist = fit(tiny_model(), train, val, run_cfg(method="pgd", steps=2, der={"start_epoch": -1}),
               True, torch.device("cpu"), seed=0)
    assert [tuple(r) for r in hist] == [HISTORY_COLUMNS] * 3
    assert [r["der_on"] for r in hist] == [0, 0, 1]
    for r in hist:  # the energy columns are means over the same training images: ΔE(x) = E(x) − E(x*) on average
        assert r["E_nat"] - r["E_adv"] == pytest.approx(r["dE_x"], abs=1e-5)
        assert math.isnan(r["aae_start_frac"])  # PGD has no single-step start point


def final_weights(splits, cfg, use_der):
    model = tiny_model()
    hist = fit(model, *splits, cfg, use_der, torch.device("cpu"), seed=0)
    return torch.cat([p.detach().flatten() for p in model.parameters()]), hist


def test_der_changes_training_only_when_on(splits):
    base, _ = final_weights(splits, run_cfg(method="pgd", steps=2), False)
    der0, _ = final_weights(splits, run_cfg(method="pgd", steps=2, der={"lambda": 0.0}), True)
    der, _ = final_weights(splits, run_cfg(method="pgd", steps=2, der={"lambda": 5.0}), True)
    torch.testing.assert_close(base, der0)  # λ = 0 is exactly the base objective
    assert not torch.allclose(base, der)


@pytest.mark.parametrize("method", ["pgd", "fgsm"])
def test_base_and_der_runs_take_diagnostics_on_the_same_batches(splits, method):
    """With λ = 0 a DER run trains the base run's model (bit-identically), so every diagnostic column must agree in
    every epoch, DER on or off: both average over the same batches (every diag_every-th), although DER epochs
    have the natural logits of every batch at hand."""
    cfg = dict(method=method, steps=2, diag_every=2, der={"lambda": 0.0, "start_epoch": 2})
    base_w, base = final_weights(splits, run_cfg(**cfg), False)
    der_w, der = final_weights(splits, run_cfg(**cfg), True)
    assert torch.equal(base_w, der_w)
    assert [r["der_on"] for r in der] == ([0, 1, 1] if method == "pgd" else [1, 1, 1])
    columns = [c for c in HISTORY_COLUMNS if c not in ("der_on", "seconds")]
    as_text = lambda h: json.dumps([[r[c] for c in columns] for r in h])  # noqa: E731  (NaN cells compare equal)
    assert as_text(base) == as_text(der)
    assert all(not math.isnan(r["dE_x"]) for r in base)


def test_single_step_der_acts_on_abnormal_examples_only(splits):
    # On this easy task FGSM never lowers the loss: no AAEs, so DER must leave single-step training untouched.
    base, hist = final_weights(splits, run_cfg(method="fgsm"), False)
    der, hist_der = final_weights(splits, run_cfg(method="fgsm", der={"lambda": 5.0}), True)
    assert [r["aae_frac"] for r in hist_der] == [0.0, 0.0, 0.0]
    assert all(r["der"] == 0.0 for r in hist_der)
    torch.testing.assert_close(base, der)


def test_resume_after_interruption_equals_uninterrupted(splits, tmp_path):
    train, val = splits
    cfg = run_cfg(method="rs-fgsm")
    full_model = tiny_model()
    full = fit(full_model, train, val, cfg, True, torch.device("cpu"), seed=7)

    saved = {}

    def interrupt_after_two(state):
        saved.update(copy.deepcopy({k: state[k] for k in ("epoch", "history", "model", "optimizer")}))
        if state["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(tiny_model(), train, val, cfg, True, torch.device("cpu"), seed=7, on_epoch_end=interrupt_after_two)
    resumed_model = tiny_model(seed=123)  # different init: everything must come from the saved state
    resumed = fit(resumed_model, train, val, cfg, True, torch.device("cpu"), seed=7, resume=saved)
    for a, b in zip(full_model.state_dict().values(), resumed_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert without_seconds(full) == without_seconds(resumed)


def test_der_run_selects_its_best_checkpoint_among_der_epochs(splits):
    train, val = splits
    cfg = run_cfg(method="pgd", steps=2, epochs=3, der={"start_epoch": -1, "lambda": 0.0})
    picked = []
    hist = fit(tiny_model(), train, val, cfg, True, torch.device("cpu"), seed=0,
               on_epoch_end=lambda s: picked.append(s["is_best"]))
    assert picked == [False, False, True]  # epochs 1-2 ran without DER: never the DER run's best
    assert summarize(hist, 4, 0.5, der=True)["best_epoch"] == 3
    base = summarize(hist, 4, 0.5)
    assert base["best_epoch"] == max(hist, key=lambda r: r["val_pgd_acc"])["epoch"]


def test_resume_with_augmentation_equals_uninterrupted(splits):
    train, val = splits
    cfg = run_cfg(method="pgd", steps=2)
    full_model = tiny_model()
    full = fit(full_model, train, val, cfg, False, torch.device("cpu"), seed=4, augmentation="crop-flip")
    plain = tiny_model()
    fit(plain, train, val, cfg, False, torch.device("cpu"), seed=4)
    assert not torch.equal(plain.state_dict()["net.head.weight"], full_model.state_dict()["net.head.weight"])

    saved = {}

    def stop_after_one(state):
        saved.update(copy.deepcopy({k: state[k] for k in ("epoch", "history", "model", "optimizer")}))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(tiny_model(), train, val, cfg, False, torch.device("cpu"), seed=4, augmentation="crop-flip",
            on_epoch_end=stop_after_one)
    resumed_model = tiny_model(seed=9)
    resumed = fit(resumed_model, train, val, cfg, False, torch.device("cpu"), seed=4, resume=saved,
                  augmentation="crop-flip")
    for k, v in full_model.state_dict().items():
        torch.testing.assert_close(v, resumed_model.state_dict()[k], rtol=0, atol=0)
    assert without_seconds(full) == without_seconds(resumed)


def without_seconds(history: list[dict]) -> str:
    """The history minus wall times, as text so that NaN cells compare equal."""
    return json.dumps([{k: v for k, v in r.items() if k != "seconds"} for r in history])


def test_training_step_under_cpu_bf16_autocast(splits, monkeypatch):
    """The mixed-precision path (CUDA uses bf16 autocast) exercised on the CPU: losses and energies in fp32."""
    import energyat.science.training as T

    train, val = splits
    cfg = run_cfg(method="rs-fgsm", der={"lambda": 1.0})
    ref_model = tiny_model()
    ref = fit(ref_model, train, val, cfg, True, torch.device("cpu"), seed=2)
    monkeypatch.setattr(T, "autocast", lambda device, cache=True: torch.autocast("cpu", dtype=torch.bfloat16))
    model = tiny_model()
    trainer = T.Trainer(model, cfg, torch.device("cpu"))
    x, y = train.x[:64], train.y[:64]
    sums = trainer.step(x, y, 0.05, True, True, torch.Generator().manual_seed(0))
    assert sums["loss"].dtype == torch.float32 and sums["e_nat"].dtype == torch.float32
    mixed = fit(tiny_model(), train, val, cfg, True, torch.device("cpu"), seed=2)
    for a, b in zip(ref, mixed):  # bf16 rounding moves the numbers a little, not the run
        assert abs(a["train_loss"] - b["train_loss"]) < 0.05 * a["train_loss"]
        assert abs(a["val_clean_acc"] - b["val_clean_acc"]) <= 0.1


def row(epoch, clean, pgd, **kw):
    return {"epoch": epoch, "val_clean_acc": clean, "val_pgd_acc": pgd, "dE_x": 0.0, "dE_xy": 0.0,
            "aae_frac": 0.1, "seconds": 1.0, "der_on": 0, **kw}


def test_summary_tells_catastrophic_overfitting_from_divergence():
    co = [row(1, 0.70, 0.30), row(2, 0.75, 0.35), row(3, 0.80, 0.02), row(4, 0.82, 0.01)]
    s = summarize(co, num_classes=10, co_drop=0.5)
    assert s["catastrophic_overfitting"] and s["co_epoch"] == 3 and s["co_at_end"] and not s["diverged"]
    assert s["best_epoch"] == 2 and s["robust_overfitting_gap"] == pytest.approx(0.34)

    diverged = [row(1, 0.70, 0.30), row(2, 0.10, 0.10), row(3, 0.10, 0.10)]
    s = summarize(diverged, num_classes=10, co_drop=0.5)
    assert not s["catastrophic_overfitting"] and s["diverged"] and s["diverged_epoch"] == 2

    standard = [row(1, 0.85, 0.30), row(2, 0.90, 0.02)]  # a standard model's PGD accuracy falling is not CO
    s = summarize(standard, num_classes=10, co_drop=0.5, adversarial=False)
    assert not s["catastrophic_overfitting"] and s["best_epoch"] == 2 and math.isnan(s["robust_overfitting_gap"])

    robust_overfit = [row(1, 0.70, 0.40), row(2, 0.80, 0.50), row(3, 0.90, 0.42)]
    s = summarize(robust_overfit, num_classes=10, co_drop=0.5, window=2)
    assert not s["catastrophic_overfitting"] and s["robust_overfitting_gap"] == pytest.approx(0.08)
    assert s["robust_overfitting_gap_smoothed"] == pytest.approx(0.0)  # window means 0.45, 0.46: last is best

    # one lucky epoch makes a single-epoch gap; the smoothed gap sees the flat trend
    noisy = [row(e, 0.8, acc) for e, acc in enumerate([0.50, 0.51, 0.58, 0.50, 0.51, 0.50, 0.51, 0.50], 1)]
    s = summarize(noisy, num_classes=10, co_drop=0.5, window=3)
    assert s["robust_overfitting_gap"] == pytest.approx(0.08)
    assert s["robust_overfitting_gap_smoothed"] == pytest.approx((0.51 + 0.58 + 0.50 - 1.51) / 3)

    late_start = [row(1, 0.15, 0.05), row(2, 0.60, 0.30)]  # near chance before learning anything is not divergence
    assert not summarize(late_start, num_classes=10, co_drop=0.5)["diverged"]


def test_train_stage_resumes_from_its_state_file(splits, tmp_path, monkeypatch):
    train, val = splits
    monkeypatch.chdir(tmp_path)
    meta = {"dataset": "synthetic", "num_classes": 4, "channels": 1, "size": 16, "mean": [0.5], "std": [0.25],
            "files": {"train": "a", "val": "b", "test": "c"}, "counts": {"train": 256, "val": 128, "test": 0}}
    monkeypatch.setattr(train_stage, "load_prepared", lambda: ({"train": train, "val": val}, meta))
    raw = {"runs": {"co": {"method": "fgsm", "epochs": 3, "batch_size": 64, "eps": 0.1, "n_val": 64,
                           "val_steps": 2}}, "sample": {"run": "co"}, "standard": {"epochs": 1, "n_val": 64}}
    params = P.parse(raw)

    train_stage.run(params, "co", "der")
    full_metrics = json.loads((tmp_path / "metrics/train/co.der.json").read_text())
    full_weights = torch.load(tmp_path / "models/der/co/last.pt", weights_only=True)

    real_fit = train_stage.fit

    def fit_interrupted(*args, **kwargs):
        callback = args[-1]

        def stop_after_one(state):
            callback(state)
            if state["epoch"] == 1:
                raise KeyboardInterrupt

        return real_fit(*args[:-1], stop_after_one, **kwargs)

    # the resume state lives outside the DVC output (models/der/co holds the checkpoints only)
    assert sorted(p.name for p in (tmp_path / "models/der/co").iterdir()) == ["best.json", "best.pt", "last.json",
                                                                             "last.pt"]
    state_path("der", "co").unlink()  # start the second run from scratch
    monkeypatch.setattr(train_stage, "fit", fit_interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_stage.run(params, "co", "der")
    assert json.loads((tmp_path / "models/der/co/last.json").read_text())["epoch"] == 1
    shutil.rmtree(tmp_path / "models/der/co")  # as DVC removes a stage's outputs before running it
    monkeypatch.setattr(train_stage, "fit", real_fit)
    train_stage.run(params, "co", "der")
    resumed_metrics = json.loads((tmp_path / "metrics/train/co.der.json").read_text())
    resumed_weights = torch.load(tmp_path / "models/der/co/last.pt", weights_only=True)
    for k in full_weights:
        torch.testing.assert_close(full_weights[k], resumed_weights[k], rtol=0, atol=0)
    drop = lambda m: {k: v for k, v in m.items() if k != "train_seconds"}  # noqa: E731
    assert drop(full_metrics) == drop(resumed_metrics)
    tsv = (tmp_path / "plots/history/co.der.tsv").read_text().splitlines()
    assert tsv[0].split("\t") == list(HISTORY_COLUMNS) and len(tsv) == 4
    assert not math.isnan(resumed_metrics["final_val_pgd_acc"])
