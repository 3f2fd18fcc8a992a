"""Robust accuracy: PGD restarts, the AutoAttack adapter (standard protocol, faithful to one official run),
the PGD/AutoAttack cross-check, and the evaluate stage on checkpoints made here (good and bad ones)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from energyat import checkpoint, cli, robustness
from energyat.artifacts import sha256
from energyat.attacks import Threat, pgd_attack
from energyat.errors import UserError
from energyat.params import ModelCfg
from energyat.params import parse
from energyat.stages import evaluate

EPS = 0.1


def mlp_task(n: int, seed: int):
    """10 classes of 8x8 images: half a fixed class template, half uniform noise."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.rand(10, 1, 8, 8, generator=torch.Generator().manual_seed(123))
    y = torch.randint(0, 10, (n,), generator=g)
    return (0.5 * templates[y] + 0.5 * torch.rand(n, 1, 8, 8, generator=g)).clamp(0, 1), y


@pytest.fixture(scope="module")
def robust_mlp():
    """An MLP adversarially trained (PGD-5, eps 0.1) in half a second: clean ~100 %, robust ~60 % on 200 test images."""
    torch.set_num_threads(1)  # tiny tensors: a second thread only adds synchronisation on a busy machine
    torch.manual_seed(0)
    x, y = mlp_task(2000, seed=0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(20):
        for i in range(0, len(x), 100):
            x_adv = pgd_attack(model, x[i:i + 100], y[i:i + 100], Threat(EPS, EPS / 2, steps=5))
            loss = F.cross_entropy(model(x_adv), y[i:i + 100])
            opt.zero_grad()
            loss.backward()
            opt.step()
    x_test, y_test = mlp_task(200, seed=1)
    return model.eval(), x_test, y_test


def test_adapter_runs_the_standard_protocol(robust_mlp):
    model, _, _ = robust_mlp
    settings = robustness.autoattack_settings(robustness.make_autoattack(model, 8 / 255, seed=0))
    assert settings["version"] == "standard" and settings["norm"] == "Linf"
    assert settings["eps"] == pytest.approx(8 / 255)
    assert settings["attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert settings["apgd-ce.n_iter"] == settings["apgd-t.n_iter"] == settings["fab-t.n_iter"] == 100
    assert settings["apgd-ce.n_restarts"] == settings["apgd-t.n_restarts"] == settings["fab-t.n_restarts"] == 1
    assert settings["apgd-t.n_target_classes"] == settings["fab-t.n_target_classes"] == 9
    assert settings["square.n_queries"] == 5000


def test_pgd_restarts_only_break_more_and_match_a_plain_attack(robust_mlp):
    model, x, y = robust_mlp
    torch.manual_seed(0)
    one = robustness.pgd_correct(model, x, y, EPS, steps=10, restarts=1, batch_size=64)
    torch.manual_seed(0)
    # one restart on all correct images == one plain PGD run, batch by batch, on the same random starts
    x_adv = torch.cat([pgd_attack(model, xb, yb, Threat(EPS, 2.5 * EPS / 10, steps=10))
                       for xb, yb in zip(x.split(64), y.split(64))])
    plain = robustness.predict(model, x_adv, 64) == y
    assert torch.equal(one, plain & robustness.clean_correct(model, x, y, 64))
    ten = robustness.pgd_correct(model, x, y, EPS, steps=10, restarts=10, batch_size=64)
    assert not (ten & ~one).any() and 0.3 < ten.float().mean() < 0.9
    assert ten.sum() < one.sum()  # more random starts find adversarial examples one start missed


def test_autoattack_cascade_equals_one_official_run_and_crosschecks_with_pgd(robust_mlp, capsys):
    model, x, y = robust_mlp
    result = robustness.run_autoattack(model, x, y, EPS, seed=0, batch_size=250)
    assert capsys.readouterr().err == ""  # pyautoattack's log goes to result.log, not the terminal
    assert any("robust accuracy after APGD-CE" in line for line in result.log)

    official = robustness.make_autoattack(model, EPS, seed=0)
    official.logger.disabled = True
    x_adv, _ = official.run_standard_evaluation(x, y, batch_size=250)
    official.logger.disabled = False
    official_acc = (robustness.predict(model, x_adv, 250) == y).float().mean().item()
    assert result.accuracy == pytest.approx(official_acc, abs=1e-9)

    after = list(result.acc_after.values())
    assert list(result.acc_after) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert after == sorted(after, reverse=True) and after[-1] == pytest.approx(result.accuracy)
    assert set(result.seconds) == set(result.acc_after) and all(s >= 0 for s in result.seconds.values())

    torch.manual_seed(0)
    pgd = robustness.pgd_correct(model, x, y, EPS, steps=50, restarts=10, batch_size=250).float().mean().item()
    assert 0.4 < pgd < 0.85  # a model neither trivially robust nor broken
    check = robustness.crosscheck(pgd, result.acc_after["apgd-ce"], result.accuracy, len(y))
    assert check["tolerance"] == pytest.approx(2 * (pgd * (1 - pgd) / 200) ** 0.5)
    assert abs(check["apgdce_gap"]) <= check["tolerance"] and check["aa_over_pgd"] <= check["tolerance"]
    assert check["passed"]


def test_crosscheck_tolerance_and_failures():
    assert robustness.crosscheck_tolerance(0.5, 100) == pytest.approx(0.1)
    assert robustness.crosscheck_tolerance(0.99, 10000) == pytest.approx(0.02)  # the 2-point floor
    assert robustness.crosscheck_tolerance(0.0, 500) == pytest.approx(0.02)
    assert not robustness.crosscheck(0.50, 0.40, 0.40, 1000)["passed"]  # APGD-CE far weaker... or stronger
    assert not robustness.crosscheck(0.40, 0.41, 0.50, 1000)["passed"]  # AA above PGD
    assert robustness.crosscheck(0.40, 0.41, 0.39, 1000)["passed"]


def test_robustness_refuses_a_model_in_train_mode(robust_mlp):
    model, x, y = robust_mlp
    model.train()
    try:
        with pytest.raises(ValueError, match="eval mode"):
            robustness.clean_correct(model, x, y, 64)
    finally:
        model.eval()


def test_autoattack_seconds_per_100_scales_to_100_images_and_keeps_the_mode(robust_mlp):
    model, x, y = robust_mlp
    model.train()
    seconds = robustness.autoattack_seconds_per_100(model, x[:20], y[:20], eps=0.3)  # eps 0.3 breaks all in APGD-CE
    assert model.training
    model.eval()
    assert 0 < seconds < 60


# ------------------------------------------------------------------------- the evaluate stage, on disk

CLASSES = [f"c{i}" for i in range(10)]


def write_prepared(root, n: int = 64, seed: int = 0) -> dict:
    """A fake prepare-stage output (28x28 grey, 10 classes) in the on-disk format; returns its meta."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.rand(10, 1, 28, 28, generator=torch.Generator().manual_seed(7))
    folder = root / "data" / "prepared"
    folder.mkdir(parents=True)
    files = {}
    for split in ("train", "val", "test"):
        y = torch.randint(0, 10, (n,), generator=g)
        x = ((0.7 * templates[y] + 0.3 * torch.rand(n, 1, 28, 28, generator=g)) * 255).to(torch.uint8)
        torch.save({"x": x, "y": y}, folder / f"{split}.pt")
        files[split] = sha256(folder / f"{split}.pt")
    meta = {"dataset": "fashion-mnist", "classes": CLASSES, "num_classes": 10, "channels": 1, "size": 28,
            "mean": [0.4], "std": [0.3], "files": files}
    (folder / "meta.json").write_text(json.dumps(meta))
    return meta


def trained_small_cnn(meta: dict, root, steps: int = 8, seed: int = 0) -> nn.Module:
    """The default small CNN, fitted for a few full-batch SGD steps on the fake training split."""
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    model = checkpoint.new_model(checkpoint.model_meta(ModelCfg(), meta))
    data = torch.load(root / "data" / "prepared" / "train.pt", weights_only=True)
    x, y = data["x"].float() / 255, data["y"]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def save_run(root, meta: dict, run: str, variant: str, models: dict, method: str = "fgsm", eps: float = 0.3):
    for ck, model in models.items():
        tag = {**checkpoint.model_meta(ModelCfg(), meta), "run": run, "variant": variant, "method": method,
               "eps": eps, "epoch": {"best": 2, "last": 3}[ck], "val_clean_acc": 0.5, "val_pgd_acc": 0.1}
        checkpoint.save(root / "models" / variant / run / f"{ck}.pt", model, tag)


PARAMS = {
    "runs": {"fgsm": {"method": "fgsm", "eps": 0.3}},
    "sample": {"run": "fgsm"},
    "threads": 1,
    "evaluate": {"n_examples": 24, "batch_size": 16, "pgd_steps": [2, 5], "restarts": 2},
}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    meta = write_prepared(tmp_path)
    return tmp_path, meta


def test_evaluate_stage_writes_flat_metrics(workdir):
    root, meta = workdir
    best = trained_small_cnn(meta, root)
    last = trained_small_cnn(meta, root, steps=9)
    save_run(root, meta, "fgsm", "base", {"best": best, "last": last})
    params = parse(PARAMS)
    evaluate.run(params, "fgsm", "base")

    out = json.loads((root / "metrics/eval/fgsm.base.json").read_text())
    test = torch.load(root / "data/prepared/test.pt", weights_only=True)
    x, y = test["x"][:24].float() / 255, test["y"][:24]
    for ck, model in (("best", best), ("last", last)):
        clean = (model(x).argmax(1) == y).float().mean().item()
        assert out[f"{ck}.clean_acc"] == pytest.approx(round(clean, 4))
        assert 0 < out[f"{ck}.clean_acc"] <= 1
        assert out[f"{ck}.pgd5_acc"] <= out[f"{ck}.pgd2_acc"] <= out[f"{ck}.clean_acc"]
        assert out[f"{ck}.aa_acc"] <= out[f"{ck}.aa.apgd-ce_acc"] <= out[f"{ck}.clean_acc"]
        assert out[f"{ck}.aa_acc"] <= out[f"{ck}.pgd5_acc"] + out[f"{ck}.check.tolerance"]
        assert out[f"{ck}.seconds.aa"] >= 0 and set(out) >= {f"{ck}.seconds.{a}" for a in ("square", "pgd2", "clean")}
        assert all(v == round(v, 4) for k, v in out.items() if k.endswith("_acc"))
    assert (out["n_examples"], out["eps"], out["best.epoch"], out["last.epoch"]) == (24, 0.3, 2, 3)
    assert (root / "metrics/eval/fgsm.base.autoattack.log").read_text().startswith("== best")


def test_evaluate_reuses_identical_checkpoints_and_evaluates_standard_at_train_eps(workdir):
    root, meta = workdir
    model = trained_small_cnn(meta, root)
    save_run(root, meta, "standard", "base", {"best": model, "last": model}, method="standard", eps=0.1)
    params = parse({**PARAMS, "train": {"eps": 0.05}, "evaluate": {**PARAMS["evaluate"], "autoattack": False}})
    evaluate.run(params, "standard", "base")
    out = json.loads((root / "metrics/eval/standard.base.json").read_text())
    assert out["eps"] == 0.05 and out["method"] == "standard"
    assert {k[5:]: v for k, v in out.items() if k.startswith("best.") and "seconds" not in k and "epoch" not in k} \
        == {k[5:]: v for k, v in out.items() if k.startswith("last.") and "seconds" not in k and "epoch" not in k}
    assert "best.aa_acc" not in out


def _one_line_error(params, run="fgsm", variant="base"):
    with pytest.raises(UserError) as err:
        evaluate.run(params, run, variant)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_evaluate_stops_on_a_missing_truncated_or_mismatched_checkpoint(workdir):
    root, meta = workdir
    params = parse(PARAMS)
    model = trained_small_cnn(meta, root, steps=1)

    save_run(root, meta, "fgsm", "base", {"best": model})  # last.pt missing
    assert "models/base/fgsm/last" in _one_line_error(params)

    save_run(root, meta, "fgsm", "base", {"best": model, "last": model})
    blob = (root / "models/base/fgsm/last.pt").read_bytes()
    (root / "models/base/fgsm/last.pt").write_bytes(blob[: len(blob) // 2])
    assert "truncated" in _one_line_error(params)

    save_run(root, meta, "fgsm", "base", {"best": model, "last": model})
    sidecar = root / "models/base/fgsm/best.json"
    good = json.loads(sidecar.read_text())
    for key, value in (("arch", "preact-resnet18"), ("options", {"width": 64, "hidden": 0}), ("dataset", "cifar10"),
                       ("run", "pgd")):
        sidecar.write_text(json.dumps({**good, key: value}))
        assert f"{key}={value!r}" in _one_line_error(params)
    assert "variant" in _one_line_error(params, "standard", "der")
    assert "variant" in _one_line_error(params, "fgsm", "both")
    assert not (root / "metrics/eval/fgsm.base.json").exists()


def test_cli_prints_one_line_and_exits_2_on_a_missing_checkpoint(workdir, capsys):
    root, _ = workdir
    (root / "params.yaml").write_text(json.dumps(PARAMS))
    assert cli.main(["evaluate", "fgsm", "der"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("energyat evaluate: error: models/der/fgsm/best")
