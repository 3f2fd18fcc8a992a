"""End to end: the real `dvc repro` of a tiny configuration in a temporary copy of the repository."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
COPY_IGNORE = shutil.ignore_patterns(".venv", ".git", "data", "models", "metrics", "plots", "__pycache__",
                                     "*.egg-info", ".pytest_cache", "tmp", "cache", "dvc.lock")


def synthetic_tarball(path: Path, classes: int = 10, per_class: int = 16, size: int = 28) -> None:
    """A class-folder tarball (train/ and test/) of grey PNGs: a fixed template per class plus noise."""
    rng = np.random.default_rng(0)
    templates = rng.random((classes, size, size))
    with tarfile.open(path, "w:gz") as tar:
        for split, n in (("train", per_class), ("test", per_class // 2)):
            for c in range(classes):
                for i in range(n):
                    img = (0.6 * templates[c] + 0.4 * rng.random((size, size))) * 255
                    buf = io.BytesIO()
                    Image.fromarray(img.astype(np.uint8), mode="L").save(buf, format="PNG")
                    info = tarfile.TarInfo(f"toy/{split}/class{c}/{i:03d}.png")
                    info.size = buf.tell()
                    buf.seek(0)
                    tar.addfile(info, buf)


def tiny_params(tarball: Path) -> dict:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"].update(dataset="image-folder", source=str(tarball), val_size=32)
    raw["train"].update(batch_size=32, n_val=32, val_steps=2, steps=2)
    raw["standard"] = {"epochs": 1}
    raw["runs"] = {"fgsm": {"method": "fgsm", "eps": 0.2, "epochs": 2},
                   "pgd": {"method": "pgd", "eps": 0.1, "epochs": 2, "der": {"start_epoch": -1},
                           "model": {"hidden": 16}}}  # a per-run network, checked by every later stage
    raw["pca"].update(k=20, n_anchors=2)
    raw["sample"].update(steps=4, step_sweep=[0, 2], samples_per_class=3, n_energy=20)
    raw["score"].update(n_reference=100)
    raw["evaluate"].update(n_examples=20, aa_examples=12, pgd_steps=[3, 5], restarts=2)
    raw["analyze"].update(n_examples=20, steps=3, aa_iter=5, target_classes=1, square_queries=20)
    return raw


def dvc(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run([str(BIN / "dvc"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_dvc_repro_tiny_pipeline(tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(ROOT, repo, ignore=COPY_IGNORE)
    synthetic_tarball(tmp_path / "toy.tar.gz")
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny_params(tmp_path / "toy.tar.gz"), sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    dvc(repo, "repro")

    meta = json.loads((repo / "data/prepared/meta.json").read_text())
    assert meta["counts"] == {"train": 128, "val": 32, "test": 80} and meta["channels"] == 1
    summary = json.loads((repo / "metrics/summary.json").read_text())
    for key in ("co.fgsm.base.aa_acc", "co.fgsm.der.pgd5_acc", "ro.pgd.base.best.aa_acc", "ro.pgd.der.last.clean_acc"):
        assert 0 <= summary[key] <= 1, key
    assert any(k.startswith("gen.pca-local-adaptive.der.") for k in summary)
    assert "| FGSM" in (repo / "metrics/co_table.md").read_text() or "fgsm" in (repo / "metrics/co_table.md").read_text()
    assert (repo / "plots/samples/pca-local.base.png").stat().st_size > 0
    for run, variant in (("standard", "base"), ("fgsm", "base"), ("fgsm", "der"), ("pgd", "base"), ("pgd", "der")):
        m = json.loads((repo / f"metrics/train/{run}.{variant}.json").read_text())
        assert m["epochs"] == (1 if run == "standard" else 2)
        assert 0 <= m["final_val_clean_acc"] <= 1
        assert (repo / f"models/{variant}/{run}/best.pt").is_file()
        sidecar = json.loads((repo / f"models/{variant}/{run}/best.json").read_text())
        assert sidecar["options"] == {"width": 32, "hidden": 16 if run == "pgd" else 0}
    pgd_der = (repo / "plots/history/pgd.der.tsv").read_text().splitlines()
    assert [line.split("\t")[13] for line in pgd_der[1:]] == ["0", "1"]  # der_on: last epoch only

    # a DER-only change invalidates the DER half and what depends on it, never the base runs
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["der"]["lambda"] = 2.5
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = json.loads(dvc(repo, "status", "--json").stdout)
    assert {"train-der@fgsm", "train-der@pgd"} <= set(status)
    assert not {"prepare", "train-standard", "train@fgsm", "train@pgd", "pca", "evaluate@fgsm-base"} & set(status)
