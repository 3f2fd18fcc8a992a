"""Robust accuracy: PGD restarts and their per-block seeds, the AutoAttack adapter (one official standard call per
block, its own checks and warnings, the settings it ran with) and APGD-CE + APGD-T through it with the standard
settings, sharding over gloo ranks, the per-image worst case, the paired PGD/APGD attack check, and the evaluate
stage on checkpoints made here (good, gradient-masked and bad ones)."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from multiproc import run_ranks
from torch import nn

from energyat import cli
from energyat.errors import UserError
from energyat.evaluation import robustness, stats
from energyat.infra import distributed
from energyat.infra.artifacts import sha256
from energyat.params import ModelCfg, ParamsError, parse
from energyat.reporting import flags as flagfile
from energyat.runstate import checkpoint
from energyat.science.attacks import Threat, pgd_attack
from energyat.stages import evaluate

EPS = 0.1


def mlp_task(n: int, seed: int):
    """10 classes of 8x8 images: half a fixed class template, half uniform noise."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.rand(10, 1, 8, 8, generator=torch.Generator().manual_seed(123))
    y = torch.randint(0, 10, (n,), generator=g)
    return (0.5 * templates[y] + 0.5 * torch.rand(n, 1, 8, 8, generator=g)).clamp(0, 1), y


def train_mlp(epochs: int, threat: Threat | None = None):
    """An MLP on the synthetic task, trained on PGD examples of `threat` (or on clean images); with its test set."""
    torch.set_num_threads(1)  # tiny tensors: a second thread only adds synchronisation on a busy machine
    torch.manual_seed(0)
    x, y = mlp_task(2000, seed=0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(epochs):
        for i in range(0, len(x), 100):
            xb = x[i:i + 100] if threat is None else pgd_attack(model, x[i:i + 100], y[i:i + 100], threat)
            loss = F.cross_entropy(model(xb), y[i:i + 100])
            opt.zero_grad()
            loss.backward()
            opt.step()
    x_test, y_test = mlp_task(200, seed=1)
    return model.eval(), x_test, y_test


@pytest.fixture(scope="module")
def robust_mlp():
    """An MLP adversarially trained (PGD-5, eps 0.1) in half a second: clean ~100 %, robust ~60 % on 200 test images."""
    return train_mlp(20, Threat(EPS, EPS / 2, steps=5))


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


def test_apgd_runs_autoattacks_first_two_attacks_with_the_standard_settings(robust_mlp, aa_result):
    model, x, y = robust_mlp
    apgd = robustness.run_apgd(model, x, y, EPS, seed=0, block=250)
    s = apgd.settings
    assert (s["version"], s["attacks"]) == ("custom", ["apgd-ce", "apgd-t"])
    assert (s["apgd-ce.n_iter"], s["apgd-ce.n_restarts"], s["apgd-ce.loss"]) == (100, 1, "ce")
    assert (s["apgd-t.n_iter"], s["apgd-t.n_restarts"], s["apgd-t.n_target_classes"]) == (100, 1, 9)
    assert s["apgd-ce.rho"] == s["apgd-t.rho"] == 0.75 and s["apgd-ce.eot_iter"] == s["apgd-t.eot_iter"] == 1
    # every APGD setting equals the one the standard version holds: read back from a standard object, as built
    standard = robustness.autoattack_settings(robustness.make_autoattack(model, EPS, seed=0))
    assert {k: v for k, v in s.items() if k.startswith("apgd-")} == \
        {k: v for k, v in standard.items() if k.startswith("apgd-")}
    common = ("package", "norm", "eps", "seed")
    assert {k: s[k] for k in common} == {k: standard[k] for k in common}
    assert not any(k.startswith(("fab-t.", "square.")) for k in s)  # settings of attacks that did not run: not recorded
    # and it runs as the standard version runs them: same seed, same block -> the same counts after each attack
    assert apgd.robust_after == {a: aa_result.robust_after[a] for a in ("apgd-ce", "apgd-t")}
    assert apgd.clean == aa_result.clean and not (aa_result.robust & ~apgd.robust).any()
    assert apgd.warnings == 0 and apgd.log[0] == "-- block 0: images 0-199"
    assert set(apgd.seconds) == {"apgd-ce", "apgd-t"}


def test_worst_case_is_correct_under_every_evaluation_that_covers_the_image():
    b = lambda text: torch.tensor([c == "1" for c in text])  # noqa: E731
    # image 0: correct under all; 1: APGD broke it; 2: AutoAttack; 3: PGD-20; 4: PGD-50; 5: misclassified clean;
    # 6: beyond APGD's 6 and AutoAttack's 4 images, correct under what covers it; 7: PGD-50 broke it
    flags = {"clean": b("11111011"), "pgd20": b("11101011"), "pgd50": b("11110010"),
             "apgd": b("101110"),  # the first 6 images
             "aa": b("1101")}  # the first 4
    assert robustness.worst_case(flags, 6).tolist() == [True] + [False] * 5
    assert robustness.worst_case(flags, 8).tolist() == [c == "1" for c in "10000010"]
    assert robustness.worst_case({"clean": b("1101")}, 4).tolist() == [True, True, False, True]


def test_attack_check_counts_discordant_images_and_tests_one_sided():
    b = lambda text: torch.tensor([c == "1" for c in text])  # noqa: E731
    check = evaluate.attack_check(b("1111110000" + "1" * 12), b("1100111100" + "0" * 12))
    # PGD left images 2, 3 and the last 12 standing that APGD broke; APGD left 6 and 7 that PGD broke
    assert (check["n"], check["pgd_missed"], check["apgd_missed"]) == (22, 14, 2)
    # P(X >= 14) for X ~ Binomial(16, 1/2)
    assert check["p"] == pytest.approx(sum(math.comb(16, k) for k in range(14, 17)) / 2 ** 16)
    assert evaluate.attack_check(b("1" * 12), b("0" * 12))["p"] == pytest.approx(0.5 ** 12)
    assert evaluate.attack_check(b("0" * 12), b("1" * 12))["p"] == 1.0  # APGD the weaker: no evidence against PGD
    assert evaluate.attack_check(b("1100"), b("1100")) == {"n": 4, "pgd_missed": 0, "apgd_missed": 0, "p": 1.0}
    assert stats.binomial_excess_p(0, 0) == 1.0 and stats.binomial_excess_p(3, 3) > 0.5


class SaturatedLogits(nn.Module):
    """A model's logits times 1000: the same predictions, but the softmax saturates in float32, so that the
    cross-entropy gradient w.r.t. the input is exactly 0 on every image with a logit margin above ~0.1. PGD-CE's
    signed steps (sign 0) and APGD-CE then stand still from their start; APGD-T's targeted DLR loss, a ratio of logit
    differences that no scale changes, still has its gradient (the failure DLR was designed for, Croce & Hein 2020)."""

    def __init__(self, model: nn.Module, scale: float = 1000.0):
        super().__init__()
        self.model, self.scale = model, scale

    def forward(self, x):
        return self.scale * self.model(x)


def test_the_check_trips_on_saturated_logits(robust_mlp):
    model, x, y = robust_mlp
    masked = SaturatedLogits(model).eval()
    clean = robustness.clean_correct(masked, x, y, 250)
    pgd = robustness.pgd_correct(masked, x, y, EPS, steps=50, restarts=10, block=250, seed=0)
    apgd = robustness.run_apgd(masked, x, y, EPS, seed=0, block=250)
    assert pgd.sum() >= clean.sum() - 5  # 10 PGD runs break (next to) nothing: the gradient is masked
    assert apgd.robust_after["apgd-ce"] >= apgd.clean - 5  # nor does APGD-CE (the same CE loss)
    assert apgd.robust_after["apgd-t"] < 0.8 * apgd.clean  # APGD-T breaks what an unmasked attack would
    check = evaluate.attack_check(pgd, apgd.robust)
    assert check["pgd_missed"] > 30 and check["apgd_missed"] == 0 and check["p"] < 1e-9
    # the same PGD on the unmasked model is as strong as APGD: the check passes there
    pgd = robustness.pgd_correct(model, x, y, EPS, steps=50, restarts=10, block=250, seed=0)
    assert evaluate.attack_check(pgd, robustness.run_apgd(model, x, y, EPS, seed=0, block=250).robust)["p"] >= 0.01


def test_the_check_passes_a_plainly_trained_model_under_pgd_with_restarts():
    """A plain MLP (no adversarial training) at an eps that leaves ~60 % standing: PGD-50 with 10 random starts and
    APGD break the same images, bar a couple. With a single start PGD-50 misses a dozen that APGD-T's 9 targeted runs
    break: the check tests attack strength, whatever its cause, so a one-restart PGD trips it given enough images."""
    model, x, y = train_mlp(10)
    eps = 0.08
    apgd = robustness.run_apgd(model, x, y, eps, seed=0, block=250)
    assert robustness.clean_correct(model, x, y, 250).all() and 0.4 < apgd.accuracy < 0.8
    check = evaluate.attack_check(robustness.pgd_correct(model, x, y, eps, 50, 10, block=250, seed=0), apgd.robust)
    assert check["pgd_missed"] <= 3 and check["p"] >= 0.1
    one = evaluate.attack_check(robustness.pgd_correct(model, x, y, eps, 50, 1, block=250, seed=0), apgd.robust)
    assert one["pgd_missed"] >= 10 and one["apgd_missed"] == 0 and one["p"] < 0.01


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


class Quantized(nn.Module):
    """A model that rounds its input to quarters first: no input gradient at all, so APGD (and FAB-T) stand still
    and the black-box Square attack breaks what they leave."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(torch.round(x * 4) / 4)


def test_autoattack_continuing_from_apgd_is_the_standard_call(robust_mlp):
    """AutoAttack on the first 60 images in blocks of 25, once as standard calls and once continuing from an APGD
    run over 100 cut at 60: the same flags, counts and settings, and APGD-CE + APGD-T ran once."""
    model, x, y = robust_mlp
    model = Quantized(model).eval()
    x, y, n = x[:100], y[:100], 60
    standard = robustness.run_autoattack(model, x[:n], y[:n], EPS, seed=0, block=25)
    apgd = robustness.run_apgd(model, x, y, EPS, seed=0, block=25, boundary=n)
    assert [s["items"] for s in apgd.blocks] == [(0, 25), (25, 50), (50, 60), (60, 85), (85, 100)]
    after = robustness.autoattack_after_apgd(model, x[:n], y[:n], EPS, seed=0, block=25, apgd=apgd)
    assert torch.equal(after.robust, standard.robust)
    assert (after.clean, after.robust_after) == (standard.clean, standard.robust_after)
    assert after.settings == standard.settings
    # FAB-T and Square had work to do (else the test would only compare APGD with itself)
    assert standard.robust_after["apgd-t"] > standard.robust_after["square"] > 0
    assert sum(line == "debug: running apgd-ce" for line in after.log) == 3  # once per block, not twice
    assert sum(line.startswith("info: FAB-T and Square on the") for line in after.log) == 3
    # APGD's blocks must be AutoAttack's: one block over all 100 images is not
    whole = robustness.run_apgd(model, x, y, EPS, seed=0, block=250)
    with pytest.raises(ValueError, match="boundary=60"):
        robustness.autoattack_after_apgd(model, x[:n], y[:n], EPS, seed=0, block=25, apgd=whole)


def test_blocks_are_cut_again_at_a_boundary():
    def spans(*args):
        return [(s.start, s.stop) for s in distributed.block_slices(*args)]

    assert spans(200, 50, 120) == [(0, 50), (50, 100), (100, 120), (120, 170), (170, 200)]
    assert spans(200, 250, 50) == [(0, 50), (50, 200)]
    assert spans(7, 3) == spans(7, 3, 7) == spans(7, 3, 0) == [(0, 3), (3, 6), (6, 7)]


# ------------------------------------------------------------------------- sharding over ranks (gloo)

def attack_flags(model, x, y, block):
    """PGD and AutoAttack flags, counts and log as plain values (a module-level function: run_ranks pickles it)."""
    torch.set_num_threads(1)
    pgd = robustness.pgd_correct(model, x, y, EPS, steps=5, restarts=3, block=block, seed=0)
    aa = robustness.run_autoattack(model, x, y, EPS, seed=0, block=block)
    log = [re.sub(r"time [0-9.]+ s", "time", line) for line in aa.log]  # all but the timings must agree
    # AutoAttack on the first 16 continuing from APGD's blocks (0-11 on rank 0, 12-15 on rank 1, 16-19 alone)
    after = robustness.autoattack_after_apgd(model, x[:16], y[:16], EPS, 0, block,
                                             robustness.run_apgd(model, x, y, EPS, 0, block, boundary=16))
    return pgd.tolist(), aa.robust.tolist(), aa.clean, aa.robust_after, aa.warnings, log, after.robust.tolist()


def test_two_ranks_give_the_same_flags_as_one(robust_mlp):
    model, x, y = robust_mlp
    x, y = x[:20], y[:20]  # blocks of 12: images 0-11 on rank 0, 12-19 on rank 1
    single = attack_flags(model, x, y, 12)
    assert run_ranks(attack_flags, 2, model, x, y, 12) == [single, single]
    pgd, aa, clean, after, _, log, _ = single
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
    "evaluate": {"n_examples": 24, "aa_examples": 12, "apgd_examples": 16, "batch_size": 8, "pgd_steps": [2, 5],
                 "restarts": 2},
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
    keys = ("format", "split", "n", "apgd_n", "aa_n", "worst_n", "pgd_apgd_n", "test_sha256")
    assert {k: flags[k] for k in keys} == {"format": "energyat-flags/1", "split": "test", "n": 24, "apgd_n": 16,
                                           "aa_n": 12, "worst_n": 12, "pgd_apgd_n": 16,
                                           "test_sha256": meta["files"]["test"]}
    x, y = prepared(root, "test")
    x, y = x[:24], y[:24]
    for ck, model in (("best", best), ("last", last)):
        assert flags[f"{ck}.clean"] == "".join("1" if c else "0" for c in (model(x).argmax(1) == y).tolist())
        # the PGD flags are the library's, block by block with the params seed
        pgd5 = robustness.pgd_correct(model, x, y, 0.3, 5, 2, block=8, seed=0)
        assert flags[f"{ck}.pgd5"] == "".join("1" if c else "0" for c in pgd5.tolist())
        assert (len(flags[f"{ck}.aa"]), len(flags[f"{ck}.apgd"]), len(flags[f"{ck}.worst"]),
                len(flags[f"{ck}.pgd_apgd"])) == (12, 16, 12, 16)
        for name, n in (("clean", 24), ("pgd2", 24), ("pgd5", 24), ("aa", 12), ("apgd", 16), ("worst", 12),
                        ("pgd_apgd", 16)):
            correct = flags[f"{ck}.{name}"].count("1")
            lo, hi = stats.wilson(correct, n)
            assert out[f"{ck}.{name}_acc"] == round(correct / n, 4)
            assert (out[f"{ck}.{name}_acc_lo"], out[f"{ck}.{name}_acc_hi"]) == (round(lo, 4), round(hi, 4))
        aa = [c == "1" for c in flags[f"{ck}.aa"]]
        assert not any(a and c == "0" for a, c in zip(aa, flags[f"{ck}.clean"]))  # robust implies correct
        assert out[f"{ck}.aa.square_acc"] == out[f"{ck}.aa_acc"] and out[f"{ck}.aa.warnings"] == 0
        assert out[f"{ck}.aa.clean_acc"] == round(flags[f"{ck}.clean"][:12].count("1") / 12, 4)
        assert out[f"{ck}.apgd.apgd-t_acc"] == out[f"{ck}.apgd_acc"] and out[f"{ck}.apgd.warnings"] == 0
        # the worst case, image by image on AutoAttack's 12: clean, PGD-2, PGD-5, APGD and AutoAttack; PGD + APGD on
        # APGD's 16: clean, PGD-2, PGD-5 and APGD; as reporting/flags.py recomputes them from the flags
        f = {name: [c == "1" for c in flags[f"{ck}.{name}"]]
             for name in ("clean", "pgd2", "pgd5", "apgd", "aa", "worst", "pgd_apgd")}
        assert f["worst"] == [all(f[name][i] for name in ("clean", "pgd2", "pgd5", "apgd", "aa")) for i in range(12)]
        assert f["pgd_apgd"] == [all(f[name][i] for name in ("clean", "pgd2", "pgd5", "apgd")) for i in range(16)]
        assert flagfile.worst_cases(flags, ck) == {"worst": f["worst"], "pgd_apgd": f["pgd_apgd"]}
        # the attack check pairs PGD-5 with APGD + AutoAttack on those 16 images
        strong = [f["apgd"][i] and (i >= 12 or f["aa"][i]) for i in range(16)]
        missed = (sum(p and not s for p, s in zip(f["pgd5"], strong)),
                  sum(s and not p for p, s in zip(f["pgd5"], strong)))
        assert (out[f"{ck}.check.n"], out[f"{ck}.check.pgd_missed"], out[f"{ck}.check.apgd_missed"]) == (16, *missed)
        assert out[f"{ck}.check.p"] == float(f"{stats.binomial_excess_p(*missed):.4g}")
        assert not any(k.startswith(f"{ck}.check.") and k[len(ck) + 7:] not in ("n", "pgd_missed", "apgd_missed", "p")
                       for k in out)
    assert (out["n_examples"], out["apgd_examples"], out["aa_examples"], out["worst_examples"],
            out["pgd_apgd_examples"], out["eps"], out["best.epoch"], out["last.epoch"]) == (24, 16, 12, 12, 16, 0.3, 2, 3)
    assert (out["aa.package"], out["aa.version"], out["aa.attacks"], out["aa.square.n_queries"]) == \
        ("pyautoattack 0.2.0", "standard", "apgd-ce,apgd-t,fab-t,square", 5000)
    assert (out["apgd.version"], out["apgd.attacks"], out["apgd.apgd-t.n_target_classes"], out["apgd.apgd-ce.n_iter"],
            out["apgd.apgd-ce.n_restarts"]) == ("custom", "apgd-ce,apgd-t", 9, 100, 1)
    text = (root / "metrics/eval/fgsm.base.autoattack.log").read_text()
    assert text.startswith("== best: APGD-CE + APGD-T, first 16 images\n-- block 0: images 0-7\n")
    assert "== best: standard AutoAttack, first 12 images\n-- block 0: images 0-7\n" in text
    # APGD's blocks are cut at aa_examples (12), so that AutoAttack continues from its first two: APGD's and
    # AutoAttack's block 1 at both checkpoints, APGD's block 2 at both
    assert text.count("-- block 1: images 8-11\n") == 4 and text.count("-- block 2: images 12-15\n") == 2


class Quantise(nn.Module):
    """Rounds pixels to {0, 0.5, 1}: a zero gradient everywhere, the textbook gradient-masking defence."""

    def forward(self, x):
        return torch.round(x * 2) / 2


def fitted_linear(root) -> nn.Module:
    """A linear classifier fitted to the fake training split (clean accuracy ~100 %, no robustness at eps 0.3)."""
    torch.manual_seed(0)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    x, y = prepared(root, "train")
    opt = torch.optim.SGD(linear.parameters(), lr=0.1)
    for _ in range(30):
        loss = F.cross_entropy(linear(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return linear


def evaluate_as_checkpoint(monkeypatch, model: nn.Module, evaluate_params: dict) -> dict:
    """Run the stage on `model` for checkpoint `last` (the architecture registry has no masked network: the stage's
    loader is replaced); returns the metrics JSON."""
    monkeypatch.setattr(checkpoint, "load", lambda path, expect: (model.eval(), {"sha256": "masked", "epoch": 3}))
    evaluate.run(parse({**PARAMS, "evaluate": {"checkpoints": ["last"], **evaluate_params}}), "fgsm", "base")
    return json.loads(Path("metrics/eval/fgsm.base.json").read_text())


def test_a_gradient_masked_model_gets_autoattacks_warning_into_the_metrics(workdir, monkeypatch, capsys):
    root, meta = workdir
    masked = nn.Sequential(Quantise(), fitted_linear(root))
    out = evaluate_as_checkpoint(monkeypatch, masked, {"n_examples": 16, "aa_examples": 16, "batch_size": 16,
                                                       "pgd_steps": [5], "restarts": 1})
    log = (root / "metrics/eval/fgsm.base.autoattack.log").read_text().splitlines()
    # the gradient attacks (ours, APGD and AutoAttack's) break nothing; the black-box Square breaks it all
    assert out["last.clean_acc"] == out["last.pgd5_acc"] == out["last.aa.apgd-ce_acc"] == out["last.aa.fab-t_acc"] == 1
    assert out["apgd_examples"] == 16  # the default 200, capped at the 16 images evaluated
    assert out["last.apgd_acc"] == out["last.apgd.apgd-ce_acc"] == 1
    assert out["last.aa.square_acc"] == out["last.aa_acc"] == out["last.worst_acc"] == 0
    aa_log = log[log.index("== last: standard AutoAttack, first 16 images"):]
    squares = [line for line in aa_log if line.startswith("warning: Square Attack has decreased the robust accuracy")]
    assert len(squares) == 1
    assert out["last.aa.warnings"] == sum(line.startswith("warning:") for line in aa_log) > 1  # + zero-gradient ones
    assert out["last.apgd.warnings"] == sum(line.startswith("warning:") for line in log) - out["last.aa.warnings"] > 0
    # the attack check: all 16 images stood up to PGD and fell to AutoAttack, p = 2^-16
    assert (out["last.check.pgd_missed"], out["last.check.apgd_missed"], out["last.check.p"]) == (16, 0, 1.526e-05)
    err = capsys.readouterr().err.splitlines()
    assert "evaluate fgsm/base: warning: last: PGD missed 16 images that APGD/AutoAttack broke (p = 1.5e-05): " \
           "report worst_acc" in err


def test_evaluate_warns_when_pgd_misses_what_apgd_breaks(workdir, monkeypatch, capsys):
    """Saturated logits: our PGD (and APGD-CE) get a zero gradient, APGD-T breaks the model; no AutoAttack."""
    root, meta = workdir
    out = evaluate_as_checkpoint(monkeypatch, SaturatedLogits(fitted_linear(root)),
                                 {"n_examples": 24, "apgd_examples": 24, "aa_examples": 12, "autoattack": False,
                                  "batch_size": 24, "pgd_steps": [5], "restarts": 1})
    assert (out["apgd_examples"], out["aa_examples"], out["worst_examples"]) == (24, 0, 24)
    assert out["last.pgd5_acc"] > 0.8 and out["last.apgd.apgd-ce_acc"] > 0.8 and out["last.apgd_acc"] == 0
    assert out["last.worst_acc"] == 0 and "last.aa_acc" not in out and "last.pgd_apgd_acc" not in out
    missed, p = out["last.check.pgd_missed"], out["last.check.p"]
    assert missed > 18 and out["last.check.apgd_missed"] == 0 and p == float(f"{0.5 ** missed:.4g}") < 0.01
    assert f"evaluate fgsm/base: warning: last: PGD missed {missed} images that APGD broke (p = {p:.2g}): report " \
           "worst_acc" in capsys.readouterr().err.splitlines()


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
