"""Atomic writes (synced before and after the rename), one-line write errors, sealed files, checkpoint bytes."""
from __future__ import annotations

import errno
import os
import stat
import tempfile

import pytest
import torch
import yaml
from conftest import make_task, tiny_model
from test_train import as_split

from energyat import cli
from energyat import params as P
from energyat.errors import UserError
from energyat.infra import artifacts
from energyat.infra.artifacts import (
    digest,
    load_sealed,
    remove_temporaries,
    save_sealed,
    save_torch,
    write_bytes,
    write_text,
)
from energyat.runstate import checkpoint
from energyat.stages import train as train_stage


def test_a_write_is_synced_to_disk_before_its_rename_and_the_directory_after(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        calls.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else f"fsync {os.fstat(fd).st_size} bytes")
        real_fsync(fd)

    def replace(src, dst):
        calls.append(f"rename to {os.path.basename(dst)}")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_bytes(tmp_path / "a.bin", b"12345")
    assert calls == ["fsync 5 bytes", "rename to a.bin", "fsync dir"]
    assert (tmp_path / "a.bin").read_bytes() == b"12345"
    assert os.listdir(tmp_path) == ["a.bin"]
    assert stat.S_IMODE((tmp_path / "a.bin").stat().st_mode) == 0o666 & ~artifacts._UMASK


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
    write_text(tmp_path / "t.txt", "old\n")
    with pytest.raises(ZeroDivisionError), artifacts.atomic_path(tmp_path / "t.txt") as tmp:
        tmp.write_text("half")
        1 / 0
    assert (tmp_path / "t.txt").read_text() == "old\n" and os.listdir(tmp_path) == ["t.txt"]


def test_disk_full_is_one_line_naming_the_path(tmp_path, monkeypatch):
    save_torch(tmp_path / "x.pt", {"a": torch.ones(3)})
    before = (tmp_path / "x.pt").read_bytes()

    def full(fd):  # delayed allocation reports ENOSPC when the data is flushed
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(UserError) as info:
        save_torch(tmp_path / "x.pt", {"a": torch.zeros(3)})
    assert str(info.value) == f"{tmp_path / 'x.pt'}: cannot write (No space left on device)"
    assert (tmp_path / "x.pt").read_bytes() == before and os.listdir(tmp_path) == ["x.pt"]


def test_permission_errors_name_the_path(tmp_path, monkeypatch):
    real_mkstemp = tempfile.mkstemp

    def denied(*args, dir=None, **kwargs):
        if str(dir).startswith(str(tmp_path / "ro")):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), dir)
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    with pytest.raises(UserError, match=r"^.*/ro/m\.json: cannot write \(Permission denied\)$"):
        artifacts.write_json(tmp_path / "ro" / "m.json", {"a": 1})
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=r"^.*/file/sub/m\.json: cannot write \(Not a directory\)$"):
        artifacts.write_json(tmp_path / "file" / "sub" / "m.json", {"a": 1})  # the parent cannot be made


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_directory_is_one_line(tmp_path):
    (tmp_path / "ro").mkdir(mode=0o500)
    with pytest.raises(UserError, match=r"/ro/m\.json: cannot write \(Permission denied\)$"):
        artifacts.write_json(tmp_path / "ro" / "m.json", {"a": 1})


def test_remove_temporaries_removes_only_the_files_own_strays(tmp_path):
    names = [".last.pt.ab12.tmp", ".last.pt.cd34.tmp", ".last.json.ef56.tmp", "last.pt", "x.tmp"]
    for name in names:
        (tmp_path / name).write_text("")
    remove_temporaries(tmp_path / "last.pt")
    assert sorted(os.listdir(tmp_path)) == [".last.json.ef56.tmp", "last.pt", "x.tmp"]


def test_a_sealed_file_detects_any_damage(tmp_path):
    obj = {"epoch": 3, "history": [{"loss": 0.5}], "model": {"w": torch.arange(1000.0)}}
    path = tmp_path / "state.pt"
    save_sealed(path, obj)
    back = load_sealed(path)
    assert back["epoch"] == 3 and back["history"] == [{"loss": 0.5}]
    assert torch.equal(back["model"]["w"], torch.arange(1000.0))

    good = path.read_bytes()
    at = good.index(torch.arange(1000.0).numpy().tobytes()[400:404])  # a byte inside the stored weights
    flipped = bytearray(good)
    flipped[at] ^= 0x01
    path.write_bytes(bytes(flipped))
    with pytest.raises(UserError, match=r"state\.pt: corrupt \(checksum differs from its contents\)$"):
        load_sealed(path)
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(UserError, match=r"state\.pt: unreadable or corrupt \("):
        load_sealed(path)
    torch.save(obj, path)
    with pytest.raises(UserError, match=r"state\.pt: corrupt \(no checksum\)$"):
        load_sealed(path)


def test_checkpoint_bytes_depend_only_on_weights_and_meta(tmp_path):
    meta = {"arch": "small-cnn", "options": {"width": 8, "hidden": 0}, "dataset": "synthetic", "num_classes": 4,
            "channels": 1, "size": 16, "mean": [0.5], "std": [0.25], "epoch": 2}
    model = tiny_model()
    weights, sidecar = checkpoint.encode(model, meta)
    assert (weights, sidecar) == checkpoint.encode(tiny_model(), meta)  # same init, same bytes
    write_bytes(tmp_path / "w.pt", weights)  # weights read back encode to the same bytes
    assert (weights, sidecar) == checkpoint.encode(torch.load(tmp_path / "w.pt", weights_only=True), meta)
    assert f'"sha256": "{digest(weights)}"'.encode() in sidecar
    checkpoint.save(tmp_path / "best.pt", model, meta)
    assert (tmp_path / "best.pt").read_bytes() == weights and (tmp_path / "best.json").read_bytes() == sidecar
    loaded, loaded_meta = checkpoint.load(tmp_path / "best.pt", expect={"epoch": 2})
    assert loaded_meta["sha256"] == digest(weights)
    for a, b in zip(loaded.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


def test_disk_full_in_the_train_stage_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    x, y = make_task(n=192, seed=3)
    meta = {"dataset": "synthetic", "num_classes": 4, "channels": 1, "size": 16, "mean": [0.5], "std": [0.25],
            "files": {"train": "a", "val": "b", "test": "c"}, "counts": {"train": 128, "val": 64, "test": 0}}
    splits = {"train": as_split(x[:128], y[:128]), "val": as_split(x[128:], y[128:])}
    monkeypatch.setattr(train_stage, "load_prepared", lambda: (splits, meta))
    raw = {"threads": 1, "runs": {"co": {"method": "fgsm", "epochs": 2, "batch_size": 64, "eps": 0.1, "n_val": 64,
                                         "val_steps": 2}}, "sample": {"run": "co"}, "standard": {"n_val": 64}}
    P.parse(raw)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    real_fsync = os.fsync

    def full(fd):
        if stat.S_ISREG(os.fstat(fd).st_mode):  # the stage's first file: epoch 1's state.pt
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full)
    assert cli.main(["--nproc", "1", "train", "co", "base"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == "energyat train: error: .energyat/state/base/co/state.pt: cannot write (No space left on device)"
    assert not any("Traceback" in line for line in err)
    assert os.listdir(tmp_path / ".energyat/state/base/co") == []  # nothing half-written, no temporary file
    assert not (tmp_path / "models/base/co").exists()
