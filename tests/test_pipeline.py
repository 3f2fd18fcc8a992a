"""End to end: the real `dvc repro` of a tiny configuration in a temporary copy of the repository, then the
`dvc exp run -S der.lambda=...` round trip that DVC's run-cache answers without running a stage, then the team's
round trip through a DVC remote: `make remote`, `make push`, a fresh clone's `dvc pull`, and its run-cache."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
COPY_IGNORE = shutil.ignore_patterns(".venv", ".git", "data", "models", "metrics", "plots", "__pycache__",
                                     "*.egg-info", ".pytest_cache", "tmp", "cache", "dvc.lock",
                                     ".energyat", ".gpu", ".cache",  # resume states, fork and block scratch
                                     "config.local")  # a developer's own DVC remote: the test pushes to its own


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
                   "pgd": {"method": "pgd", "eps": 0.3, "epochs": 2, "der": {"start_epoch": -1},
                           "model": {"hidden": 16}}}  # a per-run network, checked by every later stage
    raw["pca"].update(k=20, n_anchors=2)
    raw["sample"].update(steps=4, step_sweep=[0, 2], samples_per_class=3, n_energy=20)
    # two samplers (a fixed-step one, the adaptive one): each sample@ stage is a process launch, run twice below
    raw["sample"]["samplers"] = {k: raw["sample"]["samplers"][k] for k in ("pca-local", "pca-local-adaptive")}
    raw["score"].update(n_reference=100)
    raw["evaluate"].update(n_examples=20, aa_examples=4, pgd_steps=[3, 5], restarts=2)
    raw["analyze"].update(n_examples=20, steps=3, aa_iter=5, target_classes=1, square_queries=20)
    return raw


GIT_ENV = {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com", "GIT_COMMITTER_NAME": "test",
           "GIT_COMMITTER_EMAIL": "test@example.com"}


def dvc(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1", **GIT_ENV}
    proc = subprocess.run([str(BIN / "dvc"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, env={**os.environ, **GIT_ENV}, check=True, capture_output=True)


def make(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """A Makefile target as a user runs it, in a copy without a venv: this interpreter's dvc is the one on PATH.
    The make variables of an enclosing `make test` are not passed on (they would override the target's)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    env.update(PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", DVC_NO_ANALYTICS="1")
    return subprocess.run(["make", "-s", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def fingerprint(repo: Path) -> dict[str, bytes]:
    """Every pipeline output file, git-tracked or DVC-cached, by path: what a restore must give back."""
    roots = ["metrics", "plots", "models", "data/pca", "data/samples", "docs/paper.md", "docs/figures/paper"]
    files = [q for root in roots for q in ([repo / root] if (repo / root).is_file() else (repo / root).rglob("*"))]
    return {str(f.relative_to(repo)): f.read_bytes() for f in files if f.is_file()}


def test_every_stage_can_be_restored_from_the_run_cache(tmp_path):
    """DVC saves a stage's run to its run-cache only if no output is `persist` (dvc/stage/cache.py, _can_hash) and
    every `cache: false` output is a metric or a plot (dvc/stage/__init__.py, Stage.run). Metrics are JSON of
    numbers: a per-example flags file is a plot, or `dvc metrics show` would print its strings of 0/1; a metrics
    folder holds headline rows (energyat/headline.py)."""
    from dvc.repo import Repo

    shutil.copyfile(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copyfile(ROOT / "params.yaml", tmp_path / "params.yaml")
    Repo.init(tmp_path, no_scm=True).close()
    with Repo(tmp_path) as repo:
        stages = list(repo.index.stages)
        assert len(stages) > 10
        for stage in stages:
            assert not [o.def_path for o in stage.outs if o.persist], stage.addressing
            in_git = [o for o in stage.outs if not o.use_cache]
            assert not [o.def_path for o in in_git if not (o.is_metric or o.is_plot)], stage.addressing
            for out in stage.outs:
                if out.is_metric:
                    assert out.def_path.startswith("metrics/headline/") and "." not in out.def_path, out.def_path


def test_make_remote_refuses_a_bad_url_in_one_line(tmp_path):
    """`make remote` checks the URL before it writes .dvc/config, so a typo never replaces a working remote."""
    from dvc.repo import Repo

    shutil.copyfile(ROOT / "Makefile", tmp_path / "Makefile")
    Repo.init(tmp_path, no_scm=True).close()
    assert make(tmp_path, "remote", "URL=store").returncode == 0
    config = (tmp_path / ".dvc/config").read_text()
    assert "remote = storage" in config and "url = ../store" in config  # relative to .dvc/: resolved per clone
    bad = {"foo://bucket/x": "Unsupported URL type foo://", str(tmp_path / "no/such/dir"): "does not exist",
           "": "URL is empty"}
    try:
        import dvc_s3  # noqa: F401
    except ImportError:  # the plugin a cloud remote needs, named with the command that installs it
        bad["s3://bucket/x"] = "pip install 'dvc[s3]=="
    for url, reason in bad.items():
        proc = make(tmp_path, "remote", f"URL={url}")
        assert proc.returncode != 0 and proc.stderr.startswith(f"energyat remote: error: {url}"), proc.stderr
        assert reason in proc.stderr.splitlines()[0], proc.stderr
        assert (tmp_path / ".dvc/config").read_text() == config


@pytest.mark.slow
def test_dvc_repro_tiny_pipeline(tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(ROOT, repo, ignore=COPY_IGNORE)
    shutil.copytree(ROOT / "metrics/paper", repo / "metrics/paper")  # the paper-report stage's committed input
    for aggregate in ("co_study.json", "seeds.json"):  # the study-figures stage's committed inputs
        shutil.copyfile(ROOT / "metrics" / aggregate, repo / "metrics" / aggregate)
    synthetic_tarball(tmp_path / "toy.tar.gz")
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny_params(tmp_path / "toy.tar.gz"), sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    dvc(repo, "repro")

    meta = json.loads((repo / "data/prepared/meta.json").read_text())
    assert meta["counts"] == {"train": 128, "val": 32, "test": 80} and meta["channels"] == 1
    assert json.loads(dvc(repo, "status", "--json").stdout) == {}  # everything it ran is recorded in dvc.lock
    summary = json.loads((repo / "metrics/summary.json").read_text())
    for key, (run, variant, checkpoint, metric) in {
            "co.fgsm.base.aa_acc": ("fgsm", "base", "last", "aa"), "co.fgsm.der.pgd5_acc": ("fgsm", "der", "last", "pgd5"),
            "ro.pgd.base.best.aa_acc": ("pgd", "base", "best", "aa"),
            "ro.pgd.der.last.clean_acc": ("pgd", "der", "last", "clean")}.items():
        # the summary is the evaluate stage's number, which is the mean of its per-example flags, within its interval
        ev = json.loads((repo / f"metrics/eval/{run}.{variant}.json").read_text())
        flags = json.loads((repo / f"metrics/eval/{run}.{variant}.flags.json").read_text())[f"{checkpoint}.{metric}"]
        assert len(flags) == (4 if metric == "aa" else 20)
        assert summary[key] == ev[f"{checkpoint}.{metric}_acc"] == pytest.approx(flags.count("1") / len(flags), abs=1e-4)
        assert summary[f"{key}_lo"] <= summary[key] <= summary[f"{key}_hi"]
    assert any(k.startswith("gen.pca-local-adaptive.der.") for k in summary)
    # `dvc metrics show` reads the headline rows: one per model, difference and sampler, the summary's numbers
    shown = json.loads(dvc(repo, "metrics", "show", "--json").stdout)
    rows = {Path(f).name: v["data"] for rev in shown.values() for f, v in rev["data"].items()}
    assert rows["fgsm.der.last.json"]["pgd"] == round(summary["co.fgsm.der.pgd5_acc"], 4)
    assert rows["pgd.der-base.best.json"]["pgd"] == round(summary["ro.pgd.der_gain.best.pgd5_acc"], 4)
    assert "fid" in rows["gen.pca-local-adaptive.der.json"]
    assert "| FGSM + DER | 0.2 |" in (repo / "metrics/co_table.md").read_text()
    assert (repo / "plots/samples/pca-local.base.png").stat().st_size > 0
    for run, variant in (("standard", "base"), ("fgsm", "base"), ("fgsm", "der"), ("pgd", "base"), ("pgd", "der")):
        m = json.loads((repo / f"metrics/train/{run}.{variant}.json").read_text())
        history = (repo / f"plots/history/{run}.{variant}.tsv").read_text().splitlines()
        rows = [dict(zip(history[0].split("\t"), line.split("\t"))) for line in history[1:]]
        assert m["epochs"] == len(rows) == (1 if run == "standard" else 2)
        assert m["final_val_clean_acc"] == pytest.approx(float(rows[-1]["val_clean_acc"]), abs=1e-5)
        sidecar = json.loads((repo / f"models/{variant}/{run}/best.json").read_text())
        assert sidecar["options"] == {"width": 32, "hidden": 16 if run == "pgd" else 0}
        assert sidecar["epoch"] == m["best_epoch"]
    pgd_der = (repo / "plots/history/pgd.der.tsv").read_text().splitlines()
    der_on = [dict(zip(pgd_der[0].split("\t"), line.split("\t")))["der_on"] for line in pgd_der[1:]]
    assert der_on == ["0", "1"]  # DER on in the last epoch only
    # so the DER run's best checkpoint is that epoch, whatever epoch 1 scored
    assert json.loads((repo / "models/der/pgd/best.json").read_text())["epoch"] == 2

    # a DER-only change invalidates the DER half and what depends on it, never the base runs
    tiny = (repo / "params.yaml").read_text()
    params = yaml.safe_load(tiny)
    original, params["der"]["lambda"] = params["der"]["lambda"], 2.5
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = json.loads(dvc(repo, "status", "--json").stdout)
    assert {"train-der@fgsm", "train-der@pgd"} <= set(status)
    assert not {"prepare", "train-standard", "train@fgsm", "train@pgd", "pca", "evaluate@fgsm-base"} & set(status)

    # the run-cache: DER weight 2, then back to the original, restores every stage without running one
    (repo / "params.yaml").write_text(tiny)
    assert json.loads(dvc(repo, "status", "--json").stdout) == {}
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "tiny pipeline")
    before = fingerprint(repo)
    assert not any(name.endswith("state.pt") for name in before)  # the resume state is in .energyat/state/
    der = dvc(repo, "exp", "run", "-S", "der.lambda=2")
    ran = {line.split("'")[1] for line in der.stdout.splitlines() if line.startswith("Running stage '")}
    assert {"train-der@fgsm", "train-der@pgd", "evaluate@pgd-der", "report"} <= ran
    assert not {"prepare", "train-standard", "train@fgsm", "train@pgd", "pca", "evaluate@fgsm-base"} & ran
    lambda_2 = fingerprint(repo)
    assert lambda_2["metrics/train/fgsm.der.json"] != before["metrics/train/fgsm.der.json"]
    states = {f: f.stat().st_mtime_ns for f in (repo / ".energyat/state").rglob("state.pt")}
    assert len(states) == 5  # every train stage's resume state, outside its output
    time.sleep(0.01)  # (an mtime any later write would change)
    # the value as params.yaml writes it (1.0): DVC's run-cache key tells 1 from 1.0
    back = dvc(repo, "exp", "run", "-S", f"der.lambda={original!r}")
    assert "Running stage" not in back.stdout, back.stdout
    cached = {line.split("'")[1] for line in back.stdout.splitlines() if "is cached - skipping run" in line}
    assert ran <= cached, back.stdout
    assert "/der epoch" not in back.stderr  # no train stage ran ...
    assert {f: f.stat().st_mtime_ns for f in states} == states  # ... nor touched its state
    assert fingerprint(repo) == before  # every output back, to the byte: checkpoints, metrics, flags, tables, plots
    assert json.loads(dvc(repo, "status", "--json").stdout) == {}

    # sharing (docs/sharing.md): the default remote, a folder beside the repository (tmp_path/energyat-dvc-store),
    # configured and pushed by the commands users type, committed with the outputs that live in git
    for target in ("remote", "push"):
        proc = make(repo, target)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        if target == "remote":
            git(repo, "add", "-A")
            git(repo, "commit", "-qm", "DVC remote")
    assert (tmp_path / "energyat-dvc-store/files/md5").is_dir()
    # a fresh clone has the git half only; `dvc pull` brings the rest, from the URL it resolves against itself
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(repo), str(clone))
    assert not (clone / "models").exists() and not (clone / "data").exists()
    dvc(clone, "pull")
    assert (clone / "models/der/pgd/best.pt").read_bytes() == (repo / "models/der/pgd/best.pt").read_bytes()
    assert fingerprint(clone) == before
    assert json.loads(dvc(clone, "status", "--json").stdout) == {}
    nothing = dvc(clone, "repro")
    assert "Running stage" not in nothing.stdout and "checking out" not in nothing.stdout, nothing.stdout
    assert fingerprint(clone) == before
    # the run-cache: a run pushed from the other repository (DER weight 2) restores from the remote, untrained
    dvc(clone, "pull", "--run-cache")
    teammate = dvc(clone, "exp", "run", "--pull", "-S", "der.lambda=2", "train-der@pgd")
    assert "Running stage" not in teammate.stdout, teammate.stdout
    assert "Stage 'train-der@pgd' is cached" in teammate.stdout, teammate.stdout
    assert (clone / "models/der/pgd/best.pt").read_bytes() == lambda_2["models/der/pgd/best.pt"]
    assert (clone / "metrics/train/pgd.der.json").read_bytes() == lambda_2["metrics/train/pgd.der.json"]
