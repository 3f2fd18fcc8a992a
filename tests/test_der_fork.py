"""The DER fork: a der run starts from its base run's state at the end of epoch s - 1 (s: DER's first epoch)
and must end with exactly what training it from scratch gives; a stale or damaged snapshot is never used."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_task

from energyat import params as P
from energyat.science.data import Split
from energyat.science.training import Trainer
from energyat.stages import train as train_stage

RUN, EPOCHS, START = "t", 4, 3  # DER from epoch 3: the base run's state after epoch 2 is the fork point
STEPS_PER_EPOCH = 4  # 128 training images, batches of 32
OUT = Path("models/der") / RUN
FORK_LINE = f"train {RUN}/der: starting from the base run's state after epoch {START - 1} (fork)"


def raw_params(**train_over) -> dict:
    run = {"method": "pgd", "steps": 2, "eps": 0.1, "epochs": EPOCHS, "batch_size": 32, "n_val": 64,
           "val_steps": 2, "lr_max": 0.05, "der": {"start_epoch": START}, **train_over}
    return {"threads": 1, "model": {"width": 8}, "runs": {RUN: run}, "sample": {"run": RUN},
            "standard": {"epochs": 1, "n_val": 64}}


@pytest.fixture(scope="module")
def data():
    x, y = make_task(n=192, seed=5)
    x = (x * 255).round().to(torch.uint8)
    meta = {"dataset": "synthetic", "num_classes": 4, "channels": 1, "size": 16, "mean": [0.5], "std": [0.25],
            "files": {"train": "a", "val": "b", "test": "c"}, "counts": {"train": 128, "val": 64, "test": 0}}
    return {"train": Split(x[:128], y[:128]), "val": Split(x[128:], y[128:])}, meta


@pytest.fixture
def stage(data, monkeypatch):
    """train_stage.run(raw params, variant) on the synthetic data in the current folder; returns the optimiser
    steps it took."""
    monkeypatch.setattr(train_stage, "load_prepared", lambda: data)
    real_step, steps = Trainer.step, []

    def counting_step(self, *args, **kwargs):
        steps.append(1)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "step", counting_step)

    def run(raw: dict, variant: str) -> int:
        steps.clear()
        train_stage.run(P.parse(raw), RUN, variant)
        return len(steps)
    return run


def outputs(work: Path) -> dict:
    """What the der run is judged on: its checkpoint files (bytes; sidecars hold the epoch and config hash), every
    weight tensor, the history without wall times and the metrics without train_seconds."""
    rows = [line.split("\t") for line in (work / f"plots/history/{RUN}.der.tsv").read_text().splitlines()]
    seconds = rows[0].index("seconds")
    metrics = json.loads((work / f"metrics/train/{RUN}.der.json").read_text())
    return {
        "files": {p.name: p.read_bytes() for p in sorted((work / OUT).iterdir()) if p.name != "state.pt"},
        "weights": {name: torch.load(work / OUT / name, weights_only=True) for name in ("best.pt", "last.pt")},
        "history": [r[:seconds] + r[seconds + 1:] for r in rows],
        "metrics": {k: v for k, v in metrics.items() if k != "train_seconds"},
    }


def assert_same(got: dict, want: dict) -> None:
    for name, weights in want["weights"].items():
        assert weights.keys() == got["weights"][name].keys()
        for k, v in weights.items():
            assert torch.equal(v, got["weights"][name][k]), f"{name}: {k}"
    assert got["history"] == want["history"]
    assert got["metrics"] == want["metrics"]
    assert got["files"] == want["files"]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory, data):
    """The der run trained from scratch (no base run, no snapshot): the reference."""
    work = tmp_path_factory.mktemp("scratch")
    mp = pytest.MonkeyPatch()
    try:
        mp.chdir(work)
        mp.setattr(train_stage, "load_prepared", lambda: data)
        train_stage.run(P.parse(raw_params()), RUN, "der")
    finally:
        mp.undo()
    assert not (work / train_stage.FORK_DIR).exists()  # a der run never writes the cache
    return outputs(work)


def snapshots(work: Path) -> list[Path]:
    return sorted((work / train_stage.FORK_DIR).glob("*"))


def test_forked_der_run_equals_the_der_run_from_scratch(scratch, stage, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert stage(raw_params(), "base") == EPOCHS * STEPS_PER_EPOCH
    assert len(snapshots(tmp_path)) == 1  # one snapshot, named by the key, beside no temporary file
    capsys.readouterr()
    # the fork is used: only the DER epochs are trained, with one line saying so (and no "resuming" line)
    assert stage(raw_params(), "der") == (EPOCHS - START + 1) * STEPS_PER_EPOCH
    log = capsys.readouterr().err.splitlines()
    assert FORK_LINE in log and not any("resuming" in line for line in log)
    assert_same(outputs(tmp_path), scratch)
    # the der run's own state.pt is its own from here on: a second run resumes it, trains nothing, changes nothing
    assert stage(raw_params(), "der") == 0
    assert_same(outputs(tmp_path), scratch)


def test_only_a_snapshot_of_the_same_prefix_is_used(stage, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    stage(raw_params(), "base")
    [snapshot] = snapshots(tmp_path)
    full = EPOCHS * STEPS_PER_EPOCH
    for what, raw in [("lr", raw_params(lr_max=0.04)), ("seed", {**raw_params(), "seed": 1}),
                      ("DER start", raw_params(der={"start_epoch": START + 1})),
                      ("gamma (the der diagnostic column)", raw_params(der={"start_epoch": START, "gamma": 0.1}))]:
        shutil.rmtree(OUT, ignore_errors=True)
        capsys.readouterr()
        assert stage(raw, "der") == full, what
        assert "(fork)" not in capsys.readouterr().err, what
    assert snapshots(tmp_path) == [snapshot]
    # what acts only once DER is on (its weight) leaves the prefix, and so the snapshot, as it is
    shutil.rmtree(OUT)
    capsys.readouterr()
    assert stage(raw_params(der={"start_epoch": START, "lambda": 3.0}), "der") < full
    assert FORK_LINE in capsys.readouterr().err.splitlines()


def test_single_step_and_der_from_the_first_epoch_never_fork(stage, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stage(raw_params(method="fgsm"), "base")
    stage(raw_params(der={"start_epoch": 1}), "base")
    assert snapshots(tmp_path) == []


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_corrupt_snapshot_is_ignored_with_one_line(scratch, stage, tmp_path, monkeypatch, capsys, damage):
    monkeypatch.chdir(tmp_path)
    stage(raw_params(), "base")
    [snapshot] = snapshots(tmp_path)
    data = bytearray(snapshot.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        del data[len(data) // 2:]
    snapshot.write_bytes(bytes(data))
    capsys.readouterr()
    assert stage(raw_params(), "der") == EPOCHS * STEPS_PER_EPOCH
    notes = [line for line in capsys.readouterr().err.splitlines() if "snapshot" in line or "fork" in line]
    assert len(notes) == 1 and "corrupt" in notes[0]
    assert notes[0].startswith(f"train {RUN}/der: {train_stage.FORK_DIR}/")
    assert notes[0].endswith("; ignoring the fork snapshot, training from scratch")
    assert_same(outputs(tmp_path), scratch)
