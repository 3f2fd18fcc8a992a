"""Data-parallel training on CPU with gloo (what CI can run): N ranks train what one process trains, the launcher
runs a stage on two ranks, and a rank's error ends the stage with one line naming the rank."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from energyat import distributed
from energyat import params as P
from energyat.data import Split
from energyat.train import fit

from conftest import make_task, tiny_model
from multiproc import run_ranks
from test_pipeline import synthetic_tarball

ROOT = Path(__file__).resolve().parents[1]
CASES = {  # method, DER settings: the paths with collectives inside the step (AAE counts) and double backprop
    "rs-fgsm+der": ("rs-fgsm", {"lambda": 1.0, "aae": "start", "aae_norm": "aae"}),
    "gradalign": ("gradalign", None),
    "pgd+der": ("pgd", {"lambda": 2.0, "start_epoch": -1}),
}


def train_case(case: str) -> tuple[dict, list[dict]]:
    """Train the tiny CNN on 96 synthetic images (global batch 32, odd shard sizes included: 96 = 3 x 32) on
    whatever ranks this process belongs to; returns the final weights and the history."""
    torch.set_num_threads(1)
    method, der = CASES[case]
    x, y = make_task(n=160, classes=4, size=16, seed=11)
    x8 = (x * 255).round().to(torch.uint8)
    train, val = Split(x8[:96], y[:96]), Split(x8[96:], y[96:])
    raw = {"method": method, "epochs": 2, "batch_size": 32, "eps": 0.1, "n_val": 64, "val_steps": 2, "steps": 2,
           "lr_max": 0.05, "gradalign_lambda": 0.5}
    run = P.RunCfg("t", P._build(P.TrainCfg, raw), P._build(P.DerCfg, der or {}), P.ModelCfg())
    model = tiny_model()
    hist = fit(model, train, val, run, der is not None, torch.device("cpu"), seed=5, augmentation="crop-flip")
    return {k: v.clone() for k, v in model.state_dict().items()}, hist


def history_without_seconds(h: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in h]


@pytest.mark.parametrize("case", list(CASES))
def test_two_gloo_ranks_train_what_one_process_trains(case):
    one_weights, one_hist = train_case(case)
    (w0, h0), (w1, h1) = run_ranks(train_case, 2, case)
    for k, v in one_weights.items():
        torch.testing.assert_close(w0[k], v, rtol=0, atol=1e-5)
        assert torch.equal(w0[k], w1[k]), k  # DDP keeps the ranks identical
    for a, b in zip(history_without_seconds(one_hist), history_without_seconds(h0)):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], abs=1e-5, nan_ok=True), (case, k)


def test_shards_and_blocks_cover_the_items_in_order():
    for world in (1, 2, 3, 4):
        for n in (0, 1, 7, 32, 33):
            slices = [distributed.shard(n, distributed.Context(rank=r, world=world)) for r in range(world)]
            assert [i for s in slices for i in range(s.start, s.stop)] == list(range(n))
            assert max(s.stop - s.start for s in slices) - min(s.stop - s.start for s in slices) <= 1
            blocks = [distributed.owned_blocks(n, 5, distributed.Context(rank=r, world=world)) for r in range(world)]
            flat = [b for bs in blocks for b in bs]
            assert [b for b, _ in flat] == list(range((n + 4) // 5))  # whole blocks, contiguous per rank
            assert [i for _, s in flat for i in range(s.start, s.stop)] == list(range(n))


# ------------------------------------------------------------------------------------------- the launcher

@pytest.fixture(scope="module")
def stage_dir(tmp_path_factory):
    """A scratch project with tiny prepared data (a synthetic image folder) and a params.yaml with one run."""
    d = tmp_path_factory.mktemp("launch")
    synthetic_tarball(d / "toy.tar.gz", per_class=12, size=16)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["threads"] = 2
    raw["data"].update(dataset="image-folder", source=str(d / "toy.tar.gz"), val_size=40)
    raw["train"].update(batch_size=16, n_val=40, val_steps=2, steps=2)
    raw["standard"] = {"epochs": 1}
    raw["runs"] = {"fgsm": {"method": "fgsm", "eps": 0.1, "epochs": 2, "model": {"width": 4}}}
    raw["sample"]["run"] = "fgsm"
    raw["evaluate"].update(n_examples=20, aa_examples=20)
    raw["analyze"].update(n_examples=20)
    (d / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    assert energyat_cli(d, "prepare").returncode == 0
    return d


def energyat_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, "-m", "energyat", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_launcher_trains_on_two_ranks_like_one_process(stage_dir):
    results = {}
    for nproc in ("1", "2"):
        proc = energyat_cli(stage_dir, "--nproc", nproc, "train", "fgsm", "base")
        assert proc.returncode == 0, proc.stderr[-2000:]
        weights = torch.load(stage_dir / "models/base/fgsm/last.pt", weights_only=True)
        results[nproc] = weights, json.loads((stage_dir / "metrics/train/fgsm.base.json").read_text())
    (w1, m1), (w2, m2) = results["1"], results["2"]
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=0, atol=1e-5)
    for k in m1:
        if k != "train_seconds":
            assert m1[k] == pytest.approx(m2[k], abs=1e-5), k


def test_a_failing_rank_ends_the_stage_with_one_line_naming_it(stage_dir):
    # only the prepared data can judge n_val, so the ranks find this; whichever fails first is named
    raw = yaml.safe_load((stage_dir / "params.yaml").read_text())
    raw["runs"]["fgsm"]["n_val"] = 41
    (stage_dir / "too_many_val.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    proc = energyat_cli(stage_dir, "--params", "too_many_val.yaml", "--nproc", "2", "train", "fgsm", "base")
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and re.fullmatch(r"energyat train: error: rank [01]: runs\.fgsm\.n_val: 41 is not allowed; "
                                            r"the validation split has 40 images \(data\.val_size\)", lines[0]), lines


def test_a_bad_stage_argument_is_refused_before_any_rank_starts(stage_dir):
    proc = energyat_cli(stage_dir, "--nproc", "2", "train", "nope", "base")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "energyat train: error: runs.nope: no such run; allowed: standard, fgsm"
    proc = energyat_cli(stage_dir, "--nproc", "2", "sample", "nope")
    assert proc.returncode == 2 and proc.stderr.strip().startswith("energyat sample: error: sample: 'nope' is not in")


def test_nproc_below_one_is_a_params_error_before_any_work(stage_dir):
    proc = energyat_cli(stage_dir, "--nproc", "0", "train", "fgsm", "base")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "energyat train: error: distributed.nproc: 0 is not allowed; must be >= 1"


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc to find the rank processes")
def test_a_killed_rank_ends_the_others_with_one_line_and_a_killed_launcher_takes_its_ranks(stage_dir):
    import signal
    import time

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "energyat", "--nproc", "2", "train", "fgsm", "der"]
    for victim in ("rank", "launcher"):
        launcher = subprocess.Popen(cmd, cwd=stage_dir, env=env, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while len(ranks := _children(launcher.pid)) < 2 and time.time() < deadline:
            time.sleep(0.2)
        assert len(ranks) == 2, "the launcher did not start two ranks"
        time.sleep(2)  # let them join the process group and start training
        os.kill(ranks[1] if victim == "rank" else launcher.pid, signal.SIGKILL)
        _, err = launcher.communicate(timeout=120)
        if victim == "rank":
            assert launcher.returncode == 1
            assert [line for line in err.splitlines() if line.strip()] == \
                ["energyat train: error: rank 1: killed by SIGKILL"]
        for pid in ranks:  # no rank trains on: neither after a peer died nor after its launcher did
            for _ in range(50):
                if not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text():
                    break
                time.sleep(0.2)
            else:
                raise AssertionError(f"rank process {pid} still running after the {victim} was killed")
