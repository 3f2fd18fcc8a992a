"""Crash safety of the train stage: SIGKILL at random moments, inside checkpoint writes too, then resume.

The stage runs in forked processes (`python -m energyat ...` without the interpreter start-up); a fault is armed
in the child only, or the test kills a process from outside. Whatever was killed where, resuming must end with the
bytes (one process) or the weights within 1e-5 (two gloo ranks) and the history of an uninterrupted run.
"""
from __future__ import annotations

import itertools
import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from test_pipeline import ROOT, synthetic_tarball

from energyat import cli
from energyat.science.training import Trainer
from energyat.runstate.resume import state_path

RUN, VARIANT, EPOCHS = "crash", "der", 6
OUT = Path("models") / VARIANT / RUN
STATE = state_path(VARIANT, RUN)  # outside the DVC output, which holds the checkpoints only
TSV = Path("plots/history") / f"{RUN}.{VARIANT}.tsv"
METRICS = Path("metrics/train") / f"{RUN}.{VARIANT}.json"
KILLED = -signal.SIGKILL

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="forks, and reads /proc to find a rank's pid")


def params(tarball: Path) -> dict:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw.update(threads=1)
    raw["data"].update(dataset="image-folder", source=str(tarball), val_size=64)
    raw["model"].update(width=8)
    raw["standard"] = {"epochs": 1, "n_val": 64}
    # PGD-2 with DER from epoch 3 (4 steps per epoch): two epochs without a best checkpoint, then best and last
    raw["runs"] = {RUN: {"method": "pgd", "steps": 2, "eps": 0.1, "epochs": EPOCHS, "batch_size": 64,
                         "n_val": 64, "val_steps": 2, "lr_max": 0.05, "der": {"start_epoch": 3}}}
    raw["sample"]["run"] = RUN
    return raw


def _stage(cwd: Path, argv: list[str], fault) -> None:
    os.chdir(cwd)
    if fault is not None:
        fault()
    sys.exit(cli.main(argv))


def start(cwd: Path, *argv: str, fault=None) -> mp.Process:
    """`python -m energyat <argv>` in `cwd`, in a forked child (`fault` runs in the child first)."""
    proc = mp.get_context("fork").Process(target=_stage, args=(cwd, list(argv), fault))
    proc.start()
    return proc


def finish(proc: mp.Process) -> int:
    proc.join(timeout=300)
    assert not proc.is_alive(), "stage hung"
    return proc.exitcode


def train(cwd: Path, *, nproc: int = 1, fault=None) -> mp.Process:
    return start(cwd, "--nproc", str(nproc), "train", RUN, VARIANT, fault=fault)


def kill_before_rename(name: str, nth: int):
    """SIGKILL the writer just before its nth rename onto a file called `name`: the temporary file is complete,
    the files renamed before it are new, those after it old."""
    def arm():
        real, seen = os.replace, itertools.count(1)

        def replace(src, dst, *args, **kwargs):
            if Path(dst).name == name and next(seen) == nth:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(src, dst, *args, **kwargs)

        os.replace = replace
    return arm


def kill_before_snapshot():
    """SIGKILL a base run just before it renames its fork snapshot (.energyat/fork/<run>/<key>.pt) into place: the
    state of the epoch before DER's start is committed, the snapshot's temporary file complete."""
    def arm():
        real = os.replace

        def replace(src, dst, *args, **kwargs):
            if Path(dst).parent.parent.name == "fork":
                os.kill(os.getpid(), signal.SIGKILL)
            return real(src, dst, *args, **kwargs)

        os.replace = replace
    return arm


def kill_at_step(nth: int):
    """SIGKILL the process at its nth optimiser step: in the middle of an epoch."""
    def arm():
        real, seen = Trainer.step, itertools.count(1)

        def step(self, *args, **kwargs):
            if next(seen) == nth:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(self, *args, **kwargs)

        Trainer.step = step
    return arm


def clone(base: Path, name: str) -> Path:
    """A fresh working folder with the params and the prepared data of `base`."""
    work = base / name
    work.mkdir()
    shutil.copy(base / "params.yaml", work / "params.yaml")
    shutil.copytree(base / "data/prepared", work / "data/prepared")
    return work


def epochs_done(work: Path) -> int:
    try:
        return len((work / TSV).read_text().splitlines()) - 1
    except FileNotFoundError:
        return 0


def outputs(work: Path) -> dict:
    """What an uninterrupted run is compared on: the run folder's files (no state.pt among them: it lives in
    .energyat/state/), the history and the metrics."""
    rows = [line.split("\t") for line in (work / TSV).read_text().splitlines()]
    seconds = rows[0].index("seconds")
    metrics = json.loads((work / METRICS).read_text())
    return {
        "files": {p.name: p.read_bytes() for p in sorted((work / OUT).iterdir())},
        "history": [r[:seconds] + r[seconds + 1:] for r in rows],
        "metrics": {k: v for k, v in metrics.items() if k != "train_seconds"},
    }


def strays(work: Path) -> list[str]:
    folders = (work / OUT, work / STATE.parent, work / TSV.parent, work / METRICS.parent)
    return sorted(p.name for d in folders for p in d.glob("*.tmp"))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """(folder with params.yaml and prepared data, outputs of an uninterrupted run)."""
    # SGD's first use imports torch._dynamo (seconds): once here, not again in every forked run
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1).step()
    base = tmp_path_factory.mktemp("crash")
    synthetic_tarball(base / "toy.tar.gz", classes=4, per_class=80, size=16)
    (base / "params.yaml").write_text(yaml.safe_dump(params(base / "toy.tar.gz"), sort_keys=False))
    assert finish(start(base, "prepare")) == 0
    reference = clone(base, "reference")
    assert finish(train(reference)) == 0
    return base, outputs(reference)


def test_killed_runs_resume_to_the_bytes_of_an_uninterrupted_run(workspace, capfd):
    base, reference = workspace
    assert {"best.pt", "best.json", "last.pt", "last.json"} == set(reference["files"])
    work = clone(base, "single")
    rng = random.Random(8)
    capfd.readouterr()
    # each run resumes what the one before left; in this order every fault is reached (no best pair before
    # epoch 3, DER's first epoch and so the first best)
    faults = [
        ("mid-epoch", kill_at_step(rng.randint(1, 8))),  # epoch 1 or 2
        ("state.pt renamed", kill_before_rename("state.pt", 1)),  # a whole temporary state; the previous one holds
        ("best pair half", kill_before_rename("best.json", 1)),  # epoch 3: new best.pt, no best.json yet
        ("last pair half", kill_before_rename("last.json", 1)),  # epoch 4: new last.pt beside the old last.json
        ("last pair stale", kill_before_rename("last.pt", 1)),  # epoch 5: state committed, last pair of epoch 4
    ]
    for what, fault in faults:
        assert finish(train(work, fault=fault)) == KILLED, what
        assert strays(work) or what == "mid-epoch", what  # a killed write leaves its temporary file
    # then at a random moment from outside: in the repair, epoch 6 or the final writes
    proc = train(work)
    time.sleep(rng.uniform(0.2, 1.0))
    proc.kill()
    assert finish(proc) in (KILLED, 0)
    assert finish(train(work)) == 0
    log = capfd.readouterr().err
    assert "corrupt" not in log and "afresh" not in log, log  # an interrupted write is repaired, not reported
    assert strays(work) == []
    assert outputs(work) == reference


def test_resume_rewrites_a_half_written_pair_and_removes_strays(workspace, capfd):
    base, reference = workspace
    work = clone(base, "half-pair")
    assert finish(train(work, fault=kill_before_rename("last.json", 2))) == KILLED  # epoch 2's last.json
    assert json.loads((work / OUT / "last.json").read_text())["epoch"] == 1
    assert [name.split(".")[1] for name in strays(work)] == ["last"]  # .last.json.<random>.tmp
    capfd.readouterr()
    assert finish(train(work)) == 0
    log = capfd.readouterr().err.splitlines()
    assert f"train {RUN}/{VARIANT}: rewrote last.json from the saved state (an epoch's writes were cut short)" in log
    assert f"train {RUN}/{VARIANT}: resuming after epoch 2/{EPOCHS}" in log
    assert strays(work) == [] and outputs(work) == reference


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_state_restarts_the_run_with_one_line(workspace, capfd, damage):
    base, reference = workspace
    work = clone(base, f"corrupt-{damage}")
    assert finish(train(work, fault=kill_at_step(9))) == KILLED  # first step of epoch 3: state of epoch 2
    state = work / STATE
    data = bytearray(state.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        del data[len(data) // 2:]
    state.write_bytes(bytes(data))
    capfd.readouterr()
    assert finish(train(work)) == 0
    log = capfd.readouterr().err.splitlines()
    notes = [line for line in log if "state.pt" in line]
    assert len(notes) == 1 and notes[0].startswith(f"train {RUN}/{VARIANT}: {STATE}: ")
    assert notes[0].endswith("; starting the run afresh") and "corrupt" in notes[0]
    assert not any("resuming" in line for line in log)
    assert outputs(work) == reference


@pytest.mark.parametrize("damage", ["folder removed", "best.pt replaced"])
def test_a_removed_or_changed_run_folder_is_rewritten_from_the_state(workspace, capfd, damage):
    """DVC removes a stage's outputs before it runs the stage (no output is `persist`): the state, kept outside
    them, rewrites every checkpoint file, an earlier epoch's best pair included, and the run resumes."""
    base, reference = workspace
    head, *rows = reference["history"]
    epoch, der_on, pgd = (head.index(c) for c in ("epoch", "der_on", "val_pgd_acc"))
    # a saved epoch that is not a new best, with a best pair from an earlier epoch
    best, saved = -1.0, None
    for r in rows:
        if r[der_on] == "1" and float(r[pgd]) > best:
            best = float(r[pgd])
        elif best >= 0:
            saved = int(r[epoch])
            break
    assert saved is not None, "the reference run improves every epoch; change its params"
    work = clone(base, damage.replace(" ", "-"))
    assert finish(train(work, fault=kill_at_step(4 * saved + 1))) == KILLED
    assert json.loads((work / OUT / "best.json").read_text())["epoch"] < saved
    if damage == "folder removed":
        shutil.rmtree(work / OUT)
        rewritten = "best.json, best.pt, last.json, last.pt"
        why = "the run folder held none of them: DVC removes a stage's outputs before it runs the stage"
    else:
        (work / OUT / "best.pt").write_bytes(b"replaced")
        rewritten, why = "best.pt", "changed outside this stage"
    capfd.readouterr()
    assert finish(train(work)) == 0
    log = capfd.readouterr().err.splitlines()
    assert f"train {RUN}/{VARIANT}: rewrote {rewritten} from the saved state ({why})" in log, log
    assert f"train {RUN}/{VARIANT}: resuming after epoch {saved}/{EPOCHS}" in log
    assert not any("afresh" in line for line in log)
    assert outputs(work) == reference


def rank_pid(launcher: int, rank: int, timeout: float = 120) -> int:
    """The pid of the rank process that the launcher started (found by its parent and its RANK variable)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
                env = (stat.parent / "environ").read_bytes().split(b"\0")
            except (OSError, IndexError, ValueError):
                continue  # exited meanwhile
            if ppid == launcher and f"RANK={rank}".encode() in env:
                return int(stat.parent.name)
        time.sleep(0.05)
    raise AssertionError(f"no rank {rank} under launcher {launcher}")


def kill_rank_after(work: Path, launcher: mp.Process, rank: int, epochs: int, delay: float) -> int:
    """SIGKILL `rank` of a two-process run `delay` seconds after `epochs` epochs are written; the stage's exit."""
    pid = rank_pid(launcher.pid, rank)
    deadline = time.monotonic() + 300
    while epochs_done(work) < epochs and launcher.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    return finish(launcher)


def test_killed_two_process_run_resumes_to_the_uninterrupted_result(workspace, capfd):
    base, reference = workspace
    work = clone(base, "two")
    rng = random.Random(10)
    capfd.readouterr()
    # a rank that only computes, then the rank that writes (possibly inside a write); each run resumes the last
    assert kill_rank_after(work, train(work, nproc=2), 1, 1, rng.uniform(0, 0.1)) != 0
    last_line = capfd.readouterr().err.splitlines()[-1]
    assert last_line.startswith("energyat train: error: rank 1: ") and "SIGKILL" in last_line
    done = epochs_done(work)
    assert 1 <= done < EPOCHS
    assert kill_rank_after(work, train(work, nproc=2), 0, done + 1, rng.uniform(0, 0.1)) != 0
    assert epochs_done(work) < EPOCHS
    assert finish(train(work, nproc=2)) == 0  # and the rest on two ranks again
    log = capfd.readouterr().err
    assert "corrupt" not in log and "afresh" not in log, log
    assert strays(work) == []
    assert_close_to_reference(work, base, reference)

    # the same params and code on one rank: a 2-rank state (CPU BatchNorm normalises per rank) is not resumed
    assert finish(train(work, nproc=1)) == 0
    log = capfd.readouterr().err.splitlines()
    assert f"train {RUN}/{VARIANT}: the execution changed since the saved state (world 2 -> 1); starting afresh" in log
    assert not any("resuming" in line for line in log)
    assert outputs(work) == reference


def assert_close_to_reference(work: Path, base: Path, reference: dict) -> None:
    """Two gloo ranks sum gradients in another order than one process: the history and weights within 1e-5."""
    got, want = outputs(work), reference
    assert got["history"][0] == want["history"][0] and len(got["history"]) == len(want["history"])
    for row, ref in zip(got["history"][1:], want["history"][1:]):  # printed to 6 digits: 1e-5 is one last digit
        assert [float(v or "nan") for v in row] == pytest.approx([float(v or "nan") for v in ref], rel=2e-5,
                                                                 abs=1e-6, nan_ok=True)
    for name in ("last.pt", "best.pt"):
        a = torch.load(work / OUT / name, weights_only=True)
        b = torch.load(base / "reference" / OUT / name, weights_only=True)
        for k in b:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)


def test_der_run_forked_from_the_base_run_on_two_ranks_or_killed_after_the_fork(workspace, capfd):
    """The der run starts from the base run's state after epoch 2 (DER from epoch 3): every rank of a two-process
    run resumes from it (the snapshot of a two-process base run: the fork key names the ranks), a kill inside the
    snapshot's write is repaired by the resumed base run, and a kill just after the fork resumes to the bytes of the
    run from scratch."""
    base, reference = workspace
    fork_line = f"train {RUN}/{VARIANT}: starting from the base run's state after epoch 2 (fork)"
    work = clone(base, "fork-two")
    assert finish(start(work, "--nproc", "2", "train", RUN, "base")) == 0
    capfd.readouterr()
    assert finish(train(work, nproc=2)) == 0
    log = capfd.readouterr().err.splitlines()
    assert log.count(fork_line) == 1, log
    assert [line for line in log if line.startswith(f"train {RUN}/{VARIANT} epoch ")][0].startswith(
        f"train {RUN}/{VARIANT} epoch 3/{EPOCHS}:")  # epochs 1-2 came from the snapshot
    assert_close_to_reference(work, base, reference)

    work = clone(base, "fork-killed")
    snapshots = work / ".energyat/fork" / RUN
    assert finish(start(work, "train", RUN, "base", fault=kill_before_snapshot())) == KILLED
    assert [p.name.endswith(".tmp") for p in snapshots.iterdir()] == [True]  # a whole temporary file, no snapshot
    capfd.readouterr()
    assert finish(start(work, "train", RUN, "base")) == 0
    assert f"train {RUN}/base: resuming after epoch 2/{EPOCHS}" in capfd.readouterr().err.splitlines()
    assert [p.suffix for p in snapshots.iterdir()] == [".pt"]  # taken from the resumed state; the stray removed
    assert finish(train(work, fault=kill_at_step(1))) == KILLED  # the fork's state.pt is committed, then killed
    assert fork_line in capfd.readouterr().err.splitlines()
    assert finish(train(work)) == 0
    log = capfd.readouterr().err.splitlines()
    assert f"train {RUN}/{VARIANT}: resuming after epoch 2/{EPOCHS}" in log and fork_line not in log
    assert outputs(work) == reference
