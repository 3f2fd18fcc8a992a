"""Robust accuracy: PGD restarts and their per-block seeds, the AutoAttack adapter (one official standard call per
block, its own checks and warnings, the settings it ran with), sharding over gloo ranks, the PGD/AutoAttack
cross-check, and the evaluate stage on checkpoints made here (good, gradient-masked and bad ones)."""
from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F
from multiproc import run_ranks
from torch import nn

from energyat import checkpoint, cli, distributed, robustness, stats
from energyat.artifacts import sha256
from energyat.attacks import Threat, pgd_attack
from energyat.errors import UserError
from energyat.params import ModelCfg, ParamsError, parse
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


@pytest.fixture(scope="module")
def aa_result(robust_mlp):
    """Standard AutoAttack on the 200 test images in one block (one official call)."""
    model, x, y = robust_mlp
    return robustness.run_autoattack(model, x, y, EPS, seed=0, block=250)


def test_pgd_restarts_draw_their_starts_from_per_block_seeds(robust_mlp):
    model, x, y = robust_mlp
    one = robustness.pgd_correct(model, x, y, EPS, steps=10, restarts=1, block=64, seed=3)
    # one restart == one plain PGD run per block, its random start drawn from the block's own generator
    plain = []
    for b, (xb, yb) in enumerate(zip(x.split(64), y.split(64))):
        correct = robustness.clean_correct(model, xb, yb, 64)
        gen = torch.Generator().manual_seed(distributed.block_seed(3, "pgd10-ce", 0, b))
        x_adv = pgd_attack(model, xb[correct], yb[correct], Threat(EPS, 2.5 * EPS / 10, steps=10), generator=gen)
        flags = correct.clone()
        flags[correct] = robustness.predict(model, x_adv, 64) == yb[correct]
        plain.append(flags)
    assert torch.equal(one, torch.cat(plain))
    # a block's flags do not depend on the other blocks: the third block alone gives the same
    alone = robustness.pgd_block(model, x[128:192], y[128:192], EPS, 10, 1, seed=3, block=2)
    assert torch.equal(alone, one[128:192])
    assert not torch.equal(robustness.pgd_correct(model, x, y, EPS, 10, 1, block=64, seed=4), one)
    ten = robustness.pgd_correct(model, x, y, EPS, steps=10, restarts=10, block=64, seed=3)
    assert not (ten & ~one).any()  # restart 0 is the same run, later ones only break more
    assert ten.sum() < one.sum()  # more random starts find adversarial examples one start missed


def test_block_seeds_are_stable_and_distinct():
    # a fixed value: a changed derivation would silently change every published PGD number
    assert distributed.block_seed(0, "pgd50-ce", 0, 0) == 4088669072803246847
    seeds = {distributed.block_seed(s, a, r, b) for s in (0, 1) for a in ("pgd20-ce", "pgd50-ce")
             for r in range(3) for b in range(3)}
    assert len(seeds) == 36 and max(seeds) < 2**63


def test_autoattack_settings_are_read_back_after_the_run(aa_result):
    s = aa_result.settings
    assert s["package"] == "pyautoattack 0.2.0"
    assert (s["version"], s["norm"], s["seed"]) == ("standard", "Linf", 0)
    assert s["eps"] == s["apgd-ce.eps"] == s["apgd-t.eps"] == s["fab-t.eps"] == s["square.eps"] == EPS
    assert s["attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert s["apgd-ce.loss"] == "ce"
    assert s["apgd-ce.n_iter"] == s["apgd-t.n_iter"] == s["fab-t.n_iter"] == 100
    assert s["apgd-ce.n_restarts"] == s["apgd-t.n_restarts"] == s["fab-t.n_restarts"] == 1
    assert s["apgd-t.n_target_classes"] == s["fab-t.n_target_classes"] == 9
    assert (s["square.n_queries"], s["square.p_init"]) == (5000, 0.8)
    assert s["fab-t.targeted"] is True  # FAB is built untargeted and only switched to FAB-T while running


def test_autoattack_counts_come_from_its_own_run(robust_mlp, aa_result, capsys):
    model, x, y = robust_mlp
    r = aa_result
    assert capsys.readouterr().err == ""  # pyautoattack's log goes to result.log, not the terminal
    clean = robustness.clean_correct(model, x, y, 250)
    assert r.clean == int(clean.sum()) and not (r.robust & ~clean).any()
    assert list(r.robust_after) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert r.robust_after["square"] == int(r.robust.sum())
    # APGD-CE, run by hand with the same settings and seed on the same (clean-correct) images, leaves exactly
    # the count read from the official run's log
    apgd = robustness.make_autoattack(model, EPS, seed=0).apgd
    x_adv = apgd.perturb(x[clean], y[clean])
    assert int((robustness.predict(model, x_adv, 250) == y[clean]).sum()) == r.robust_after["apgd-ce"]
    after = list(r.robust_after.values())
    assert after == sorted(after, reverse=True) and after[0] < r.clean
    assert r.warnings == sum(line.startswith("warning:") for line in r.log) == 0
    assert r.log[0] == "-- block 0: images 0-199"
    assert any(line.startswith("debug: robust accuracy after SQUARE:") for line in r.log)
    assert set(r.seconds) == set(r.robust_after)


def test_pgd_and_autoattack_crosscheck_on_a_robust_model(robust_mlp, aa_result):
    model, x, y = robust_mlp
    pgd = robustness.pgd_correct(model, x, y, EPS, steps=50, restarts=10, block=250, seed=0).float().mean().item()
    check = robustness.crosscheck(pgd, aa_result.acc_after["apgd-ce"], aa_result.accuracy, len(y))
    assert check["tolerance"] == pytest.approx(max(0.02, 2 * (pgd * (1 - pgd) / 200) ** 0.5))
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
        for fn in (lambda: robustness.clean_correct(model, x, y, 64),
                   lambda: robustness.pgd_correct(model, x, y, EPS, 2, 1, 64, 0),
                   lambda: robustness.run_autoattack(model, x, y, EPS, 0, 64)):
            with pytest.raises(ValueError, match="eval mode"):
                fn()
    finally:
        model.eval()


def test_autoattack_seconds_per_100_keeps_the_mode(robust_mlp):
    model, x, y = robust_mlp
    model.train()
    robustness.autoattack_seconds_per_100(model, x[:20], y[:20], eps=0.3)  # eps 0.3 breaks all in APGD-CE
    assert model.training
    model.eval()


# ------------------------------------------------------------------------- sharding over ranks (gloo)

def attack_flags(model, x, y, block):
    """PGD and AutoAttack flags, counts and log as plain values (a module-level function: run_ranks pickles it)."""
    torch.set_num_threads(1)
    pgd = robustness.pgd_correct(model, x, y, EPS, steps=5, restarts=3, block=block, seed=0)
    aa = robustness.run_autoattack(model, x, y, EPS, seed=0, block=block)
    log = [re.sub(r"time [0-9.]+ s", "time", line) for line in aa.log]  # all but the timings must agree
    return pgd.tolist(), aa.robust.tolist(), aa.clean, aa.robust_after, aa.warnings, log


def test_two_ranks_give_the_same_flags_as_one(robust_mlp):
    model, x, y = robust_mlp
    x, y = x[:20], y[:20]  # blocks of 12: images 0-11 on rank 0, 12-19 on rank 1
    single = attack_flags(model, x, y, 12)
    assert run_ranks(attack_flags, 2, model, x, y, 12) == [single, single]
    pgd, aa, clean, after, _, log = single
    assert [line for line in log if line.startswith("--")] == ["-- block 0: images 0-11", "-- block 1: images 12-19"]
    # both attacks broke some of the clean-correct images, and the whole ensemble ran on the survivors
    assert sum(pgd) < clean and after["apgd-ce"] < clean and after["square"] == sum(aa) > 0


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
            "mean": [0.4], "std": [0.3], "files": files, "counts": dict.fromkeys(files, n)}
    (folder / "meta.json").write_text(json.dumps(meta))
    return meta


def prepared(root, split: str):
    data = torch.load(root / "data" / "prepared" / f"{split}.pt", weights_only=True)
    return data["x"].float() / 255, data["y"]


def trained_small_cnn(meta: dict, root, steps: int = 8, seed: int = 0) -> nn.Module:
    """The default small CNN, fitted for a few full-batch SGD steps on the fake training split."""
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    model = checkpoint.new_model(checkpoint.model_meta(ModelCfg(), meta))
    x, y = prepared(root, "train")
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
    "evaluate": {"n_examples": 24, "aa_examples": 12, "batch_size": 8, "pgd_steps": [2, 5], "restarts": 2},
}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    meta = write_prepared(tmp_path)
    return tmp_path, meta


def test_evaluate_stage_writes_metrics_intervals_and_flags(workdir):
    root, meta = workdir
    best = trained_small_cnn(meta, root)
    last = trained_small_cnn(meta, root, steps=9)
    save_run(root, meta, "fgsm", "base", {"best": best, "last": last})
    params = parse(PARAMS)
    evaluate.run(params, "fgsm", "base")

    out = json.loads((root / "metrics/eval/fgsm.base.json").read_text())
    flags = json.loads((root / "metrics/eval/fgsm.base.flags.json").read_text())
    assert {k: flags[k] for k in ("format", "split", "n", "aa_n", "test_sha256")} == \
        {"format": "energyat-flags/1", "split": "test", "n": 24, "aa_n": 12, "test_sha256": meta["files"]["test"]}
    x, y = prepared(root, "test")
    x, y = x[:24], y[:24]
    for ck, model in (("best", best), ("last", last)):
        assert flags[f"{ck}.clean"] == "".join("1" if c else "0" for c in (model(x).argmax(1) == y).tolist())
        # the PGD flags are the library's, block by block with the params seed
        pgd5 = robustness.pgd_correct(model, x, y, 0.3, 5, 2, block=8, seed=0)
        assert flags[f"{ck}.pgd5"] == "".join("1" if c else "0" for c in pgd5.tolist())
        assert len(flags[f"{ck}.aa"]) == 12
        for name, n in (("clean", 24), ("pgd2", 24), ("pgd5", 24), ("aa", 12)):
            correct = flags[f"{ck}.{name}"].count("1")
            lo, hi = stats.wilson(correct, n)
            assert out[f"{ck}.{name}_acc"] == round(correct / n, 4)
            assert (out[f"{ck}.{name}_acc_lo"], out[f"{ck}.{name}_acc_hi"]) == (round(lo, 4), round(hi, 4))
        aa = [c == "1" for c in flags[f"{ck}.aa"]]
        assert not any(a and c == "0" for a, c in zip(aa, flags[f"{ck}.clean"]))  # robust implies correct
        assert out[f"{ck}.aa.square_acc"] == out[f"{ck}.aa_acc"] and out[f"{ck}.aa.warnings"] == 0
        assert out[f"{ck}.aa.clean_acc"] == round(flags[f"{ck}.clean"][:12].count("1") / 12, 4)
        # the cross-check compares PGD with AutoAttack on AutoAttack's 12 images
        assert out[f"{ck}.check.aa_over_pgd"] == round(out[f"{ck}.aa_acc"] - flags[f"{ck}.pgd5"][:12].count("1") / 12, 4)
    assert (out["n_examples"], out["aa_examples"], out["eps"], out["best.epoch"], out["last.epoch"]) == (24, 12, 0.3, 2, 3)
    assert (out["aa.package"], out["aa.version"], out["aa.attacks"], out["aa.square.n_queries"]) == \
        ("pyautoattack 0.2.0", "standard", "apgd-ce,apgd-t,fab-t,square", 5000)
    text = (root / "metrics/eval/fgsm.base.autoattack.log").read_text()
    assert text.startswith("== best\n-- block 0: images 0-7\n") and "-- block 1: images 8-11" in text


class Quantise(nn.Module):
    """Rounds pixels to {0, 0.5, 1}: a zero gradient everywhere, the textbook gradient-masking defence."""

    def forward(self, x):
        return torch.round(x * 2) / 2


def test_a_gradient_masked_model_gets_autoattacks_warning_into_the_metrics(workdir, monkeypatch):
    root, meta = workdir
    torch.manual_seed(0)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    x, y = prepared(root, "train")
    opt = torch.optim.SGD(linear.parameters(), lr=0.1)
    for _ in range(30):
        loss = F.cross_entropy(linear(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    masked = nn.Sequential(Quantise(), linear).eval()
    # the stage loads this model for every checkpoint (the architecture registry has no masked network)
    monkeypatch.setattr(checkpoint, "load", lambda path, expect: (masked, {"sha256": "masked", "epoch": 3}))
    params = parse({**PARAMS, "evaluate": {"n_examples": 16, "aa_examples": 16, "batch_size": 16,
                                           "pgd_steps": [5], "restarts": 1, "checkpoints": ["last"]}})
    evaluate.run(params, "fgsm", "base")

    out = json.loads((root / "metrics/eval/fgsm.base.json").read_text())
    log = (root / "metrics/eval/fgsm.base.autoattack.log").read_text().splitlines()
    # the gradient attacks (ours and AutoAttack's) break nothing; the black-box Square breaks it all
    assert out["last.clean_acc"] == out["last.pgd5_acc"] == out["last.aa.apgd-ce_acc"] == out["last.aa.fab-t_acc"] == 1
    assert out["last.aa.square_acc"] == out["last.aa_acc"] == 0
    squares = [line for line in log if line.startswith("warning: Square Attack has decreased the robust accuracy")]
    assert len(squares) == 1
    assert out["last.aa.warnings"] == sum(line.startswith("warning:") for line in log) > 1  # + zero-gradient ones


def test_evaluate_reuses_identical_checkpoints_and_evaluates_standard_at_train_eps(workdir):
    root, meta = workdir
    model = trained_small_cnn(meta, root)
    save_run(root, meta, "standard", "base", {"best": model, "last": model}, method="standard", eps=0.1)
    params = parse({**PARAMS, "train": {"eps": 0.05}, "evaluate": {**PARAMS["evaluate"], "autoattack": False}})
    evaluate.run(params, "standard", "base")
    out = json.loads((root / "metrics/eval/standard.base.json").read_text())
    flags = json.loads((root / "metrics/eval/standard.base.flags.json").read_text())
    assert out["eps"] == 0.05 and out["method"] == "standard" and out["aa_examples"] == flags["aa_n"] == 0
    x, y = prepared(root, "test")
    pgd5 = robustness.pgd_correct(model, x[:24], y[:24], 0.05, 5, 2, block=8, seed=0)
    assert out["best.pgd5_acc"] == round(pgd5.float().mean().item(), 4)
    assert {k[5:]: v for k, v in out.items() if k.startswith("best.") and "seconds" not in k and "epoch" not in k} \
        == {k[5:]: v for k, v in out.items() if k.startswith("last.") and "seconds" not in k and "epoch" not in k}
    assert flags["best.pgd5"] == flags["last.pgd5"] and "best.aa" not in flags and "best.aa_acc" not in out


def _one_line_error(params, run="fgsm", variant="base"):
    with pytest.raises(UserError) as err:
        evaluate.run(params, run, variant)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_evaluate_refuses_more_images_than_the_test_split(workdir):
    root, meta = workdir
    save_run(root, meta, "fgsm", "base", {"best": trained_small_cnn(meta, root, steps=1)})
    params = parse({**PARAMS, "evaluate": {**PARAMS["evaluate"], "n_examples": 65, "checkpoints": ["best"]}})
    assert _one_line_error(params) == "evaluate.n_examples: 65 is not allowed; the test split has 64 images"
    with pytest.raises(ParamsError, match=r"^evaluate.aa_examples: 25 is not allowed; .* at most evaluate.n_examples \(24\)$"):
        parse({**PARAMS, "evaluate": {**PARAMS["evaluate"], "aa_examples": 25}})
    assert not (root / "metrics/eval").exists()


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
