"""`block NAME... [--data PATH] [--seed N] [--out DIR]`: blocks of the paper's setting (paper_blocks.py), one GPU
window each, through the pipeline's own stage functions (prepare, train, evaluate) in a scratch folder.

For every (run, variant) of a block: train it, evaluate it, then copy its evidence into `<out>/<block>/seed<N>/`
(committed under metrics/paper/): params.yaml, block.json (what ran, where, how long; what was skipped and why),
and per job `<run>.<variant>.{train.json,history.tsv,eval.json,flags.json,autoattack.log}`. A job starts only if
its estimated cost fits before `--deadline` (seconds from the start), so a window ends with whole jobs; `--tar F`
re-packs everything written so far into F after each job (what comes back from a machine that is then taken
away). Scratch folders (`--work`, default .energyat/blocks/) keep checkpoints and resume state: running the same
block again resumes its unfinished job and skips finished ones whose evidence exists.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import tarfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml

from ..errors import UserError
from ..infra.artifacts import atomic_path, read_json, write_json, write_text
from ..infra.runtime import log
from ..params import MULTI_STEP, parse
from ..studies import paper_blocks

EVIDENCE = {  # scratch file -> evidence suffix
    "metrics/train/{job}.json": "train.json", "plots/history/{job}.tsv": "history.tsv",
    "metrics/eval/{job}.json": "eval.json", "metrics/eval/{job}.flags.json": "flags.json",
    "metrics/eval/{job}.autoattack.log": "autoattack.log",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("blocks", nargs="+", metavar="block", choices=paper_blocks.names(),
                   help=f"blocks to run in order: {', '.join(paper_blocks.names())}")
    p.add_argument("--data", default="data/downloads",
                   help="CIFAR-10: a torchvision root holding cifar-10-batches-py, or a class-folder tree / .tar.gz "
                        "with train/ and test/ (default: data/downloads)")
    p.add_argument("--seed", type=int, default=0, help="seed of every run (default 0)")
    p.add_argument("--device", default="auto", help="auto | cuda | cuda:N | cpu (default auto)")
    p.add_argument("--preset", default="presets/paper.yaml", help="the setting blocks override")
    p.add_argument("--out", default="metrics/paper", help="evidence root (default metrics/paper)")
    p.add_argument("--work", default=".energyat/blocks", help="scratch root: checkpoints, resume state")
    p.add_argument("--deadline", type=float, default=0.0,
                   help="seconds from the start after which no job starts that would not end in time (0: none)")
    p.add_argument("--tar", default="", help="re-pack the evidence written so far into this .tar.gz after each job")
    p.add_argument("--tiny", action="store_true", help="the CPU dry run: 256 images, 2 epochs, a small CNN")


def _prior_seconds(rc, variant: str, n_train: int, n_checkpoints: int, tiny: bool) -> float:
    if tiny:
        return 5.0
    late = rc.train.method in MULTI_STEP  # single-step DER acts from the first epoch
    der_epochs = rc.train.epochs - rc.der.first_epoch(rc.train.epochs) + 1 if late else rc.train.epochs
    return paper_blocks.job_seconds(rc.train.method, variant, rc.train.epochs, der_epochs, n_train, n_checkpoints)


@contextmanager
def _inside(folder: Path):
    """Stage functions read and write paths relative to the working folder."""
    here = Path.cwd()
    folder.mkdir(parents=True, exist_ok=True)
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(here)


def _pack(root: Path, tar: Path) -> None:
    with atomic_path(tar) as tmp, tarfile.open(tmp, "w:gz") as archive:
        archive.add(root, arcname=root.name)


def _prepare(params, raw: dict, work_root: Path) -> Path:
    """The prepared splits, shared by every block of a seed and data source (decoding 60k JPEGs is not free)."""
    from ..stages import prepare

    key = hashlib.sha256(json.dumps({"seed": raw["seed"], "data": raw["data"]}, sort_keys=True).encode())
    folder = work_root / f"data-{key.hexdigest()[:12]}"
    if not (folder / "data/prepared/meta.json").is_file():
        with _inside(folder):
            prepare.run(params)
    return (folder / "data/prepared").resolve()


def _code_digest() -> str:
    """sha256 of the package's sources, so that evidence names the code that produced it."""
    package = Path(paper_blocks.__file__).parent
    files = sorted(package.rglob("*.py"))
    return hashlib.sha256(b"".join(f.relative_to(package).as_posix().encode() + f.read_bytes() for f in files)).hexdigest()[:16]


def run(_params: None, ns: argparse.Namespace) -> None:
    from ..stages import evaluate, train

    start = time.monotonic()
    preset = Path(ns.preset)
    if not preset.is_file():
        raise UserError(f"--preset: {preset} not found")
    data = Path(ns.data).resolve()
    if not data.exists():
        raise UserError(f"--data: {data} not found; give a CIFAR-10 torchvision root or a class-folder .tar.gz")
    out_root, work_root = Path(ns.out).resolve(), Path(ns.work).resolve()
    tar = Path(ns.tar).resolve() if ns.tar else None
    raw_preset = yaml.safe_load(preset.read_text())
    plans = []  # validate every block before any work
    for name in ns.blocks:
        raw = paper_blocks.params_for(raw_preset, name, str(data), ns.seed, ns.device, ns.tiny)
        plans.append((name, raw, parse(raw)))
    code = _code_digest()  # per job: a resumed block can hold jobs of earlier code
    measured = []  # (prior, actual) seconds of the jobs run here: calibrates the priors of the next ones
    for name, raw, params in plans:
        block = paper_blocks.BLOCKS[name]
        out = out_root / name / f"seed{ns.seed}"
        work = work_root / f"{name}-seed{ns.seed}"
        prepared = _prepare(params, raw, work_root)
        (work / "data").mkdir(parents=True, exist_ok=True)
        link = work / "data/prepared"
        if not link.is_symlink():
            link.symlink_to(prepared, target_is_directory=True)
        write_text(out / "params.yaml", yaml.safe_dump(raw, sort_keys=False))
        record = read_json(out / "block.json") if (out / "block.json").is_file() else {}
        meta = read_json(prepared / "meta.json")
        record.update({
            "block": name, "about": block.about, "seed": ns.seed, "tiny": ns.tiny,
            "data": {"dataset": meta["dataset"], "source": Path(meta["source"]).name, "files": meta["files"],
                     "counts": meta["counts"]},
            "device": torch.cuda.get_device_name() if params.device != "cpu" and torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "python": platform.python_version(),
        })
        jobs = record.setdefault("jobs", {})
        for run_name, variant in block.jobs():
            job = f"{run_name}.{variant}"
            if jobs.get(job, {}).get("status") == "done" and (out / f"{job}.eval.json").is_file():
                log(f"block {name}: {job} done earlier; evidence kept")
                continue
            rc = params.variant_run(run_name, variant)
            n_train = rc.train.n_train or meta["counts"]["train"]
            prior = _prior_seconds(rc, variant, n_train, len(params.evaluate.checkpoints), ns.tiny)
            scale = max(0.5, sum(a for _, a in measured) / sum(p for p, _ in measured)) if measured else 1.0
            left = ns.deadline - (time.monotonic() - start) if ns.deadline else float("inf")
            if prior * scale > left:
                jobs[job] = {"status": "skipped", "why": f"estimated {prior * scale:.0f} s, {max(left, 0):.0f} s left"}
                log(f"block {name}: skipping {job}: {jobs[job]['why']}")
                write_json(out / "block.json", record)
                continue
            t0 = time.monotonic()
            with _inside(work):
                train.run(params, run_name, variant)
                t1 = time.monotonic()
                evaluate.run(params, run_name, variant)
                for src, suffix in EVIDENCE.items():
                    shutil.copyfile(src.format(job=job), out / f"{job}.{suffix}")
            t2 = time.monotonic()
            measured.append((prior, t2 - t0))
            jobs[job] = {"status": "done", "train_seconds": round(t1 - t0, 1), "eval_seconds": round(t2 - t1, 1),
                         "code": code, "device": record["device"], "torch": torch.__version__}
            write_json(out / "block.json", record)
            log(f"block {name}: {job} done in {t2 - t0:.0f} s (train {t1 - t0:.0f}, evaluate {t2 - t1:.0f}); "
                f"{time.monotonic() - start:.0f} s since the start")
            if tar:
                _pack(out_root, tar)
        write_json(out / "block.json", record)
    if tar:
        _pack(out_root, tar)
