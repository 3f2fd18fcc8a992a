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
from conftest import make_task, tiny_model
from multiproc import run_ranks
from test_pipeline import synthetic_tarball

from energyat import params as P
from energyat.infra import distributed
from energyat.science.data import Split
from energyat.science.training import fit

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


def blockwise_units(units: list[str]) -> tuple[dict, list]:
    """map_units over `units`: each unit's result sums its 7 items in blocks of 3 that the ranks share (the
    evaluate pattern), so a unit computed on its own and one computed by all ranks must agree; also returns
    (unit, rank in the group, world seen) for every call of fn on this rank."""
    calls = []

    def fn(unit: str) -> torch.Tensor:
        ctx = distributed.context()
        calls.append((unit, ctx.outer_rank if ctx.world == 1 else ctx.rank, ctx.world))
        items = torch.arange(7, dtype=torch.float64) * (ord(unit) - 96)
        part = torch.zeros(())
        for _, s in distributed.owned_blocks(7, 3):
            part = part + items[s].sum()
        return distributed.all_sum(part.double())

    return distributed.map_units(fn, units), calls


def test_map_units_gives_one_process_results_whole_units_per_rank_or_shared_blocks():
    one, _ = blockwise_units(["a", "b", "c"])
    assert {u: float(v) for u, v in one.items()} == {"a": 21.0, "b": 42.0, "c": 63.0}
    (r0, c0), (r1, c1) = run_ranks(blockwise_units, 2, ["a", "b", "c"])
    assert list(r0) == list(r1) == ["a", "b", "c"]  # units order, on every rank
    assert {u: float(v) for u, v in r0.items()} == {u: float(v) for u, v in r1.items()} == {"a": 21, "b": 42, "c": 63}
    assert c0 == [("a", 0, 1), ("c", 0, 1)] and c1 == [("b", 1, 1)]  # round robin, each alone
    (s0, d0), (s1, d1) = run_ranks(blockwise_units, 2, ["c"])  # fewer units than ranks: blocks shared
    assert float(s0["c"]) == float(s1["c"]) == 63.0
    assert d0 == [("c", 0, 2)] and d1 == [("c", 1, 2)]


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


def test_launcher_evaluates_on_two_ranks_like_one_process(stage_dir):
    """Two checkpoints of different weights (one rank each) and one with best == last (blocks shared): every
    number and per-image flag as in one process."""
    raw = yaml.safe_load((stage_dir / "params.yaml").read_text())
    raw["runs"]["fgsm"].update(epochs=3, lr_max=0.5)  # best is epoch 1 here
    raw["evaluate"].update(autoattack=False, apgd_examples=20)  # APGD's flags: AutoAttack's FAB-T costs ~25 s here
    (stage_dir / "best_and_last.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    assert energyat_cli(stage_dir, "--params", "best_and_last.yaml", "train", "fgsm", "base").returncode == 0
    meta = {ck: json.loads((stage_dir / f"models/base/fgsm/{ck}.json").read_text()) for ck in ("best", "last")}
    assert meta["best"]["sha256"] != meta["last"]["sha256"]
    out = {}
    for params in ("best_and_last.yaml", "last_only.yaml"):
        raw["evaluate"]["checkpoints"] = ["best", "last"] if params == "best_and_last.yaml" else ["last"]
        (stage_dir / params).write_text(yaml.safe_dump(raw, sort_keys=False))
        for nproc in ("1", "2"):
            proc = energyat_cli(stage_dir, "--params", params, "--nproc", nproc, "evaluate", "fgsm", "base")
            assert proc.returncode == 0, proc.stderr[-2000:]
            metrics = json.loads((stage_dir / "metrics/eval/fgsm.base.json").read_text())
            out[params, nproc] = ({k: v for k, v in metrics.items() if not k.startswith(("best.seconds", "last.seconds"))},
                                  (stage_dir / "metrics/eval/fgsm.base.flags.json").read_text())
        assert out[params, "1"] == out[params, "2"], params


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
