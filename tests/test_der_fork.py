"""The DER fork: a der run starts from its base run's state at the end of epoch s - 1 (s: DER's first epoch)
and must end with exactly what training it from scratch gives (BatchNorm, TRADES and the default negative
der.start_epoch included); a stale or damaged snapshot is never used, the fork folder keeps only the base run's
current snapshot, and the resume and fork keys name the execution (ranks, threads, ...) besides params and code.

What a forked run's `train_seconds` counts: every epoch of its history, the forked-in epochs with the seconds the
base run measured for them (its history holds the base run's rows as they are), its own epochs as it measured them."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_task

from energyat import params as P
from energyat.infra.artifacts import load_sealed, save_sealed
from energyat.runstate import fork, resume
from energyat.science import models
from energyat.science.data import Split
from energyat.science.training import Trainer
from energyat.stages import train as train_stage

RUN, EPOCHS, START = "t", 4, 3  # DER from epoch 3: the base run's state after epoch 2 is the fork point
NEGATIVE_START = START - EPOCHS - 1  # the same start in params.yaml's default form: DER on for the last 2 epochs
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

    def run(raw: dict, variant: str, name: str = RUN) -> int:
        steps.clear()
        train_stage.run(P.parse(raw), name, variant)
        return len(steps)
    return run


def history_rows(work: Path, variant: str) -> list[list[str]]:
    return [line.split("\t") for line in (work / f"plots/history/{RUN}.{variant}.tsv").read_text().splitlines()]


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
    assert not (work / fork.FORK_DIR).exists()  # a der run never writes the cache
    return outputs(work)


def snapshots(work: Path) -> list[Path]:
    """Every file under the fork folder (temporary files included)."""
    return sorted(p for p in (work / fork.FORK_DIR).rglob("*") if p.is_file())


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
    assert notes[0].startswith(f"train {RUN}/der: {fork.FORK_DIR}/{RUN}/")
    assert notes[0].endswith("; ignoring the fork snapshot, training from scratch")
    assert_same(outputs(tmp_path), scratch)


def tiny_preact_resnet(num_classes: int = 10, channels: int = 3) -> torch.nn.Module:
    """PreActResNet's pre-activation blocks and BatchNorm layers at a CPU test's size (two stages of one block)."""
    return models.PreActResNet((1, 1), num_classes, channels, widths=(8, 16), stem=8)


@pytest.mark.parametrize("case", ["preact-resnet", "trades"])
def test_forked_run_equals_scratch_with_batchnorm_trades_and_a_negative_start(case, stage, tmp_path, monkeypatch,
                                                                               capsys):
    """(a) a PreActResNet: BatchNorm's running statistics travel in the snapshot; (b) TRADES: its natural forward
    trains; both with DER's start in the default, negative form. Then what the forked run's train_seconds counts."""
    if case == "preact-resnet":
        monkeypatch.setitem(models.MODELS, "preact-resnet18", tiny_preact_resnet)
        over = {"model": {"arch": "preact-resnet18", "width": 32}}  # width: small-cnn's option, at its default
    else:
        over = {"method": "trades"}
    raw = raw_params(**over, der={"start_epoch": NEGATIVE_START})
    scratch, forked = tmp_path / "scratch", tmp_path / "forked"
    scratch.mkdir(), forked.mkdir()
    monkeypatch.chdir(scratch)
    assert stage(raw, "der") == EPOCHS * STEPS_PER_EPOCH
    want = outputs(scratch)
    if case == "preact-resnet":
        assert any(k.endswith("running_mean") for k in want["weights"]["last.pt"])
    monkeypatch.chdir(forked)
    assert stage(raw, "base") == EPOCHS * STEPS_PER_EPOCH
    capsys.readouterr()
    assert stage(raw, "der") == (EPOCHS - START + 1) * STEPS_PER_EPOCH
    assert FORK_LINE in capsys.readouterr().err.splitlines()
    assert_same(outputs(forked), want)
    # train_seconds sums the seconds of every epoch of the history: the forked-in ones as the base run measured them
    base, der = history_rows(forked, "base"), history_rows(forked, "der")
    seconds = der[0].index("seconds")
    assert [r[seconds] for r in der[1:START]] == [r[seconds] for r in base[1:START]]
    metrics = json.loads((forked / f"metrics/train/{RUN}.der.json").read_text())
    assert metrics["train_seconds"] == pytest.approx(sum(float(r[seconds]) for r in der[1:]), rel=1e-5)


def test_gamma_keys_the_base_run_and_dvc_yaml_declares_it(stage, tmp_path, monkeypatch, capsys):
    """The base run's `der` column is DER's per-sample term at gamma, logged with DER off: a gamma change restarts
    the base run, and dvc.yaml declares der.gamma for the train stage. A standard run has no such column (no
    adversarial logits) and depends on no DER param."""
    monkeypatch.chdir(tmp_path)
    stage(raw_params(), "base")
    capsys.readouterr()
    assert stage(raw_params(der={"start_epoch": START, "gamma": 0.1}), "base") == EPOCHS * STEPS_PER_EPOCH
    assert (f"train {RUN}/base: params or code changed since the saved state; starting afresh"
            in capsys.readouterr().err.splitlines())
    assert stage(raw_params(), "base", name="standard") == 1  # one epoch of one batch
    assert stage({**raw_params(), "der": {"gamma": 0.1}}, "base", name="standard") == 0  # resumed: nothing to train
    rows = [line.split("\t") for line in (tmp_path / "plots/history/standard.base.tsv").read_text().splitlines()]
    assert [r[rows[0].index("der")] for r in rows[1:]] == [""]  # nan
    stages = yaml.safe_load((Path(__file__).resolve().parents[1] / "dvc.yaml").read_text())["stages"]
    assert "der.gamma" in stages["train"]["do"]["params"]
    assert not [p for p in stages["train-standard"]["params"] if str(p).startswith("der")]


def test_another_execution_restarts_with_one_line_and_keys_the_fork(stage, tmp_path, monkeypatch, capsys):
    """The same params and code under another number of ranks (CPU BatchNorm normalises per rank), threads, CUDA
    graphs setting, torch version or device model: the state restarts the run with one line naming the change, and
    a snapshot serves only a der run of the same execution."""
    monkeypatch.chdir(tmp_path)
    stage(raw_params(), "base")
    [one_thread] = snapshots(tmp_path)
    state_file = resume.state_path("base", RUN)
    state = load_sealed(state_file)
    assert state["execution"] == {"world": 1, "threads": 1, "cuda_graphs": True, "torch": torch.__version__,
                                  "device_model": resume.device_model(torch.device("cpu"))}
    save_sealed(state_file, {**state, "execution": {**state["execution"], "world": 2}})  # as a 2-rank run leaves it
    capsys.readouterr()
    assert stage(raw_params(), "base") == EPOCHS * STEPS_PER_EPOCH
    log = capsys.readouterr().err.splitlines()
    assert f"train {RUN}/base: the execution changed since the saved state (world 2 -> 1); starting afresh" in log
    assert not any("resuming" in line for line in log)
    assert stage({**raw_params(), "threads": 2}, "base") == EPOCHS * STEPS_PER_EPOCH
    assert (f"train {RUN}/base: the execution changed since the saved state (threads 1 -> 2); starting afresh"
            in capsys.readouterr().err.splitlines())
    [two_threads] = snapshots(tmp_path)  # the new key's snapshot; the base run pruned the one-thread one
    assert two_threads != one_thread
    capsys.readouterr()
    assert stage(raw_params(), "der") == EPOCHS * STEPS_PER_EPOCH  # one thread: no snapshot of its execution
    assert "(fork)" not in capsys.readouterr().err


def test_the_fork_folder_is_pruned_and_a_killed_snapshot_write_repaired(scratch, stage, tmp_path, monkeypatch,
                                                                        capsys):
    """A base run's start leaves in its run's fork folder only the snapshot its current key names (not earlier
    params' snapshots, not the layout before per-run folders, not temporary files); a kill inside the snapshot's
    write, after epoch s - 1's state is committed, leaves a temporary file and no snapshot: the resumed base run
    takes the snapshot from its state. A der run forking leaves the snapshot for the next der run (a lambda sweep)."""
    monkeypatch.chdir(tmp_path)
    folder = fork.FORK_DIR / RUN

    def killed(path, obj):  # the process dies inside the write: its temporary file stays
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        (Path(path).parent / f".{Path(path).name}.k1ll3d.tmp").write_bytes(b"half a snapshot")
        raise KeyboardInterrupt

    real_save = fork.save_sealed
    monkeypatch.setattr(fork, "save_sealed", killed)
    with pytest.raises(KeyboardInterrupt):
        stage(raw_params(), "base")
    monkeypatch.setattr(fork, "save_sealed", real_save)
    [stray] = snapshots(tmp_path)
    assert stray.name.endswith(".k1ll3d.tmp")
    (folder / "0123456789abcdef.pt").write_bytes(b"a snapshot of earlier params")
    (fork.FORK_DIR / "fedcba9876543210.pt").write_bytes(b"a snapshot in the layout before per-run folders")
    capsys.readouterr()
    assert stage(raw_params(), "base") == (EPOCHS - START + 1) * STEPS_PER_EPOCH  # resumed after epoch 2
    assert f"train {RUN}/base: resuming after epoch {START - 1}/{EPOCHS}" in capsys.readouterr().err.splitlines()
    [snapshot] = snapshots(tmp_path)
    assert snapshot.parent == tmp_path / folder and not snapshot.name.startswith(".")
    assert stage(raw_params(), "der") == (EPOCHS - START + 1) * STEPS_PER_EPOCH
    assert FORK_LINE in capsys.readouterr().err.splitlines()
    assert_same(outputs(tmp_path), scratch)
    assert snapshots(tmp_path) == [snapshot]
