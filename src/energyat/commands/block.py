"""`block [NAME...] [--next] [--plan] [--data PATH] [--seed N] [--deadline S] [--out DIR] [--tar F]`: blocks of the
paper's setting (studies/paper_blocks.py), one GPU window each, through the pipeline's own stage functions (prepare,
train, evaluate; a generation block's pca, class-energy, sample, score) in a scratch folder.

For every job of a block (a training run without or with DER, evaluated; a generation step): run it, then copy its
evidence into `<out>/<experiment>/seed<N>/` (committed under metrics/paper/): params.yaml, block.json (what ran,
where, how long, per job and per command; what was skipped and why) and per job
`<run>.<variant>.{train.json,history.tsv,eval.json,flags.json,autoattack.log}` (a generation block: its models'
train.json and history.tsv, pca.json, class_energy.json, sample.<sampler>.json and the sample grids, score.json,
generation.md). `--next` runs the blocks of `paper_blocks.QUEUE` that have no evidence yet, in that order.

The deadline (`--deadline`, seconds from the start) covers the whole job: a job starts when its expected cost (its
training left and its evaluation, from the cost model calibrated by the jobs this command ran) fits the time left,
or, where it fits no whole command, it trains until the deadline and the next command resumes it; its evaluation
starts only if that still fits; a training still running at the deadline (plus `--grace`) is stopped at once, its
last finished epoch kept. So a window ends with whole jobs or resumable ones. `--tar F` re-packs everything written
so far into F after each job (what comes back from a machine that is then taken away). Scratch folders (`--work`,
default .energyat/blocks/) keep checkpoints and resume state: running the same block again resumes its unfinished
job and skips finished ones whose evidence exists. `--plan` prints what each block costs and whether it fits a
window (`--gpu h100|h200`), without running anything.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import signal
import tarfile
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import torch
import yaml

from ..errors import UserError
from ..infra import imports
from ..infra.artifacts import atomic_path, read_json, write_json, write_text
from ..infra.runtime import log
from ..params import MULTI_STEP, parse
from ..studies import paper_blocks
from ..studies.paper_blocks import Cost

EVIDENCE = {  # scratch file -> evidence suffix, per evaluated training job
    "metrics/train/{job}.json": "train.json", "plots/history/{job}.tsv": "history.tsv",
    "metrics/eval/{job}.json": "eval.json", "metrics/eval/{job}.flags.json": "flags.json",
    "metrics/eval/{job}.autoattack.log": "autoattack.log",
}
TRAIN_EVIDENCE = {"metrics/train/{job}.json": "train.json", "plots/history/{job}.tsv": "history.tsv"}
STEP_EVIDENCE = {  # a generation step -> scratch file -> evidence name ({s}: the sampler)
    "pca": {"metrics/pca.json": "pca.json"},
    "class-energy": {"data/class_energy.json": "class_energy.json"},
    "sample": {"metrics/sample/{s}.json": "sample.{s}.json", "plots/samples/{s}.base.png": "{s}.base.png",
               "plots/samples/{s}.der.png": "{s}.der.png", "plots/sampling/{s}.base.tsv": "sampling.{s}.base.tsv",
               "plots/sampling/{s}.der.tsv": "sampling.{s}.der.tsv"},
    "score": {"metrics/score.json": "score.json", "metrics/generation.md": "generation.md",
              "plots/generation/sweep.tsv": "sweep.tsv",
              "plots/generation/quality_diversity.png": "quality_diversity.png"},
}
STEP_OUTPUTS = {  # what a later step reads from the scratch folder: a step is redone where it is missing
    "pca": ["data/pca/global.pt", "data/pca/local.pt"], "class-energy": ["data/class_energy.json"],
    "sample": ["data/samples/{s}/base.pt", "data/samples/{s}/der.pt"], "score": ["metrics/score.json"],
}
TINY_EPOCH, TINY_START, TINY_EVALUATE, TINY_STEP = 1.0, 1.0, 2.0, 1.0  # the CPU dry run's priors (s): 5 s a job
_clock = time.monotonic  # tests put a clock of their own here


def _block_name(value: str) -> str:
    if value not in paper_blocks.WINDOWS:
        raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose from {', '.join(paper_blocks.names())})")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("blocks", nargs="*", metavar="block", type=_block_name,
                   help=f"blocks to run in order: {', '.join(paper_blocks.names())}")
    p.add_argument("--next", action="store_true",
                   help="run the blocks of the queue (docs/paper.md) without evidence yet, in order, as far as the "
                        "deadline allows (after the named blocks, if any)")
    p.add_argument("--plan", action="store_true",
                   help="print each block's expected minutes and whether it fits a GPU window; runs nothing")
    p.add_argument("--gpu", choices=sorted(paper_blocks.GPU_FACTOR), default="h100",
                   help="--plan: the card to plan for (default h100, the slower)")
    p.add_argument("--data", default="data/downloads",
                   help="CIFAR-10: a torchvision root holding cifar-10-batches-py, or a class-folder tree / .tar.gz "
                        "with train/ and test/ (default: data/downloads)")
    p.add_argument("--seed", type=int, default=0, help="seed of every run of the named blocks (default 0)")
    p.add_argument("--device", default="auto", help="auto | cuda | cuda:N | cpu (default auto)")
    p.add_argument("--preset", default="presets/paper.yaml", help="the setting blocks override")
    p.add_argument("--out", default="metrics/paper", help="evidence root (default metrics/paper)")
    p.add_argument("--evidence", default="metrics/paper",
                   help="the committed evidence: what --next counts as done, and what a new --out folder starts from "
                        "(default metrics/paper)")
    p.add_argument("--work", default=".energyat/blocks", help="scratch root: checkpoints, resume state")
    p.add_argument("--deadline", type=float, default=0.0,
                   help="seconds from the start: no job or evaluation starts that would not end in time, a training "
                        "still running then (plus --grace) stops after its last finished epoch (0: no deadline)")
    p.add_argument("--window", type=float, default=paper_blocks.WINDOW.work,
                   help="seconds of work one GPU window holds, over its commands on one machine (counted in --work): "
                        "a job that fits no command starts only if the window's next command can end it "
                        f"(default {paper_blocks.WINDOW.work:.0f}; 0: no window)")
    p.add_argument("--grace", type=float, default=30.0,
                   help="seconds past the deadline a job expected to end in time may train on (default 30)")
    p.add_argument("--tar", default="", help="re-pack the evidence written so far into this .tar.gz after each job")
    p.add_argument("--tiny", action="store_true", help="the CPU dry run: 256 images, 2 epochs, a small CNN")


class _Deadline(BaseException):
    """The command's deadline passed during a training (a BaseException: no stage code catches it)."""


@contextmanager
def _stop_at(seconds: float | None):
    """Raise _Deadline in this (main) thread after `seconds`; None: never. The train stage's state is written before
    an epoch's files (runstate), so an interrupted training resumes after its last finished epoch."""
    if seconds is None or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return
    armed = [True]

    def fire(_signum, _frame):
        if armed[0]:
            armed[0] = False
            raise _Deadline()

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        armed[0] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


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


def _link_prepared(work: Path, prepared: Path, data: Path, seed: int) -> None:
    """work/data/prepared -> the splits prepared from --data; a link to other data is refused, not reused."""
    link = work / "data/prepared"
    if link.is_symlink():
        if link.resolve() != prepared:
            raise UserError(f"{link} points to {os.readlink(link)}, not to the data prepared from --data {data} "
                            f"(seed {seed}, {prepared}); its checkpoints were trained on other data: remove {work} "
                            "or give another --work")
        return
    if link.exists():
        raise UserError(f"{link}: not a link to prepared data; remove {work} or give another --work")
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(prepared, target_is_directory=True)


def _code_digest() -> str:
    """The package's sources (imports.code_digest), so that evidence names the code that produced it."""
    return imports.code_digest(imports.package_files())


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _write_params(out: Path, text: str, jobs: dict) -> str:
    """params.yaml of this command; a different params.yaml that finished jobs ran with is kept as params-<sha>.yaml
    (each job names its params by sha). Returns this command's sha."""
    current, sha = out / "params.yaml", _sha(text)
    if current.is_file() and (old := current.read_text()) != text:
        old_sha = _sha(old)
        users = [j for j, r in jobs.items() if r.get("status") != "skipped" and r.get("params", old_sha) == old_sha]
        if users:
            write_text(out / f"params-{old_sha}.yaml", old)
            for j in users:
                jobs[j]["params"] = old_sha
    write_text(current, text)
    return sha


def job_done(exp: str, job: str, rec: dict, folder: Path) -> bool:
    """Whether `job` of experiment `exp` has its evidence in `folder` (a block.json record `rec`)."""
    if rec.get("status") != "done":
        return False
    spec = paper_blocks.BLOCKS[exp]
    if job in spec.steps():
        return True
    return (folder / f"{job}.{'eval.json' if spec.kind == 'robustness' else 'train.json'}").is_file()


def done_jobs(roots: list[Path]) -> dict[tuple[str, int], set[str]]:
    """{(experiment, seed): jobs with evidence} over evidence roots (a job done in any of them is done)."""
    done: dict[tuple[str, int], set[str]] = {}
    for root in roots:
        for record in sorted(root.glob("*/seed*/block.json")):
            exp, seed = record.parent.parent.name, int(record.parent.name.removeprefix("seed"))
            if exp not in paper_blocks.BLOCKS:
                continue
            jobs = read_json(record).get("jobs", {})
            done.setdefault((exp, seed), set()).update(
                j for j, rec in jobs.items() if job_done(exp, j, rec, record.parent))
    return done


def _history_epochs(work: Path, job: str) -> int:
    """Epochs a job's resumable training has finished in the scratch folder (0: none, or no resume state)."""
    from ..runstate import resume

    run, variant = job.rsplit(".", 1)
    if not (work / resume.state_path(variant, run)).is_file():
        return 0
    history = work / "plots/history" / f"{job}.tsv"
    return max(0, len(history.read_text().splitlines()) - 1) if history.is_file() else 0


def _note(rec: dict) -> str:
    """The job's story over its commands, when it took more than one or was stopped."""
    cmds = rec.get("commands", [])
    if len(cmds) <= 1 and not any(c.get("stopped") for c in cmds):
        return ""
    parts = []
    for i, c in enumerate(cmds, 1):
        did = []
        if c.get("epochs"):
            a, b = c["epochs"]
            span = f"epoch {a}" if a == b else f"epochs {a}–{b}"
            did.append(f"trained {span} in {c['train_seconds']:.0f} s" if b >= a else
                       f"resumed its finished training ({c['train_seconds']:.0f} s)")
        elif "train_seconds" in c:
            did.append(f"resumed its finished training ({c['train_seconds']:.0f} s)")
        if c.get("stopped"):
            did.append(c["stopped"])
        if "eval_seconds" in c:
            did.append(f"evaluated in {c['eval_seconds']:.0f} s")
        if c.get("deferred"):
            did.append(c["deferred"])
        parts.append(f"command {i} ({c.get('at', '?')}, {c.get('device', '?')}): " + ", ".join(did or ["nothing"]))
    devices = sorted({c.get("device") for c in cmds})
    mixed = f"; devices differ: {', '.join(map(str, devices))}" if len(devices) > 1 else ""
    return f"ran over {len(cmds)} commands: " + "; ".join(parts) + mixed


class Runner:
    """One command's run of blocks against one deadline, with the cost model's priors calibrated by what it ran."""

    def __init__(self, ns: argparse.Namespace, data: Path, gpu: str, device: str):
        self.ns, self.data, self.gpu, self.device = ns, data, gpu, device
        self.start = _clock()
        self.out_root, self.work_root = Path(ns.out).resolve(), Path(ns.work).resolve()
        self.evidence_root = Path(ns.evidence).resolve()
        self.tar = Path(ns.tar).resolve() if ns.tar else None
        self.code = _code_digest()  # per job: a resumed block can hold jobs of earlier code
        self.measured: dict[str, list[tuple[float, float]]] = {"train": [], "evaluate": [], "step": []}
        self.stopped = False
        # the window: this machine's earlier commands (their record lives in --work, which the machine keeps while
        # it stays warm; a fresh machine starts a new window)
        self.window_file = self.work_root / "window.json"
        window = read_json(self.window_file) if self.window_file.is_file() else {"commands": []}
        self.window_before = sum(c["seconds"] for c in window["commands"])
        self.window_index = len(window["commands"]) + 1
        window["commands"].append({"at": _now(), "seconds": paper_blocks.COMMAND_START})
        self.window = window
        write_json(self.window_file, window)

    def close(self) -> None:
        """This command's seconds in the window's record (its start as the cost model has it, and its run)."""
        self.window["commands"][-1]["seconds"] = round(paper_blocks.COMMAND_START + _clock() - self.start, 1)
        write_json(self.window_file, self.window)

    def next_whole(self) -> float:
        """What the window's next command offers (0: this is the last, or no deadline / window to reckon with)."""
        if not (self.ns.deadline and self.ns.window):
            return math.inf
        w = paper_blocks.Window(command=self.ns.deadline + paper_blocks.COMMAND_START, work=self.ns.window)
        if self.window_index >= w.commands:
            return 0.0
        return paper_blocks.next_command(w, self.window_before, w.command)

    # -- time

    def left(self) -> float:
        return self.ns.deadline - (_clock() - self.start) if self.ns.deadline else math.inf

    def scale(self, kind: str) -> float:
        """Measured / expected seconds of the parts of this kind run so far (at least 0.5), else 1."""
        m = self.measured[kind]
        return max(0.5, sum(a for _, a in m) / sum(p for p, _ in m)) if m and sum(p for p, _ in m) > 0 else 1.0

    def cost(self, name: str, job: str, n_train: int, epochs: int = 0, kind: str = "robustness") -> Cost:
        """The job's prior: the cost model's, or for the CPU dry run 1 s an epoch (`epochs` it trains), 1 s to start,
        2 s to evaluate, 1 s a generation step."""
        if not self.ns.tiny:
            return paper_blocks.job_cost(name, job, n_train)
        if not epochs:
            return Cost(gpu=TINY_STEP)
        return Cost(epochs=(TINY_EPOCH,) * epochs, start=TINY_START,
                    evaluate=TINY_EVALUATE if kind == "robustness" else 0.0)

    # -- blocks

    def block(self, name: str, seed: int, raw: dict, params) -> None:
        exp = paper_blocks.experiment(name)
        spec = paper_blocks.BLOCKS[exp]
        out = self.out_root / exp / f"seed{seed}"
        committed = self.evidence_root / exp / f"seed{seed}"
        if out != committed and not out.exists() and (committed / "block.json").is_file():
            shutil.copytree(committed, out)  # --out elsewhere: start from the committed evidence, keep its records
        work = self.work_root / f"{exp}-seed{seed}"
        prepared = _prepare(params, raw, self.work_root)
        _link_prepared(work, prepared, self.data, seed)
        record = read_json(out / "block.json") if (out / "block.json").is_file() else {}
        jobs = record.setdefault("jobs", {})
        out.mkdir(parents=True, exist_ok=True)
        params_sha = _write_params(out, yaml.safe_dump(raw, sort_keys=False), jobs)
        meta = read_json(prepared / "meta.json")
        data = {"dataset": meta["dataset"], "source": Path(meta["source"]).name, "files": meta["files"],
                "counts": meta["counts"]}
        record.update({"block": exp, "about": spec.about, "seed": seed, "tiny": self.ns.tiny, "data": data,
                       "device": self.device, "torch": torch.__version__, "python": platform.python_version()})
        self.env = {"device": self.device, "gpu": self.gpu if self.device != "cpu" else None, "code": self.code,
                    "torch": torch.__version__,
                    "python": platform.python_version(), "params": params_sha, "data": meta["files"]}
        n_train = meta["counts"]["train"]
        final = spec.steps()[-1] if spec.steps() else None
        block_done = final is not None and job_done(exp, final, jobs.get(final, {}), out)
        for job in paper_blocks.window_jobs(name):
            if self.stopped:
                break
            rec = jobs.setdefault(job, {})
            if spec.kind == "generation":
                if block_done or self._generation_output(work, job, spec):
                    log(f"block {name}: {job} done earlier; kept")
                    continue
            elif job_done(exp, job, rec, out):
                log(f"block {name}: {job} done earlier; evidence kept")
                continue
            if job in spec.steps():
                self._step(name, job, rec, work, out, params, n_train)
            else:
                self._job(name, spec, job, rec, work, out, params, n_train)
            write_json(out / "block.json", record)
            if self.tar:
                _pack(self.out_root, self.tar)
        write_json(out / "block.json", record)

    def _generation_output(self, work: Path, job: str, spec) -> bool:
        """A generation block's job is done when what later steps read is in the scratch folder (a fresh machine
        lost it: the block is redone up to where it stopped)."""
        if job in spec.steps():
            kind, _, sampler = job.partition(".")
            return all((work / f.format(s=sampler)).is_file() for f in STEP_OUTPUTS[kind])
        run, variant = job.rsplit(".", 1)
        return all((work / f).is_file() for f in (f"metrics/train/{job}.json", f"models/{variant}/{run}/best.pt"))

    def _skip(self, name: str, job: str, rec: dict, why: str) -> None:
        if rec.get("status") not in ("training", "trained"):
            rec["status"] = "skipped"
        rec["why"] = why
        log(f"block {name}: skipping {job}: {why}")

    def _budget(self, name, spec, job, rc, variant, work, n_train) -> dict:
        """The job's expected seconds (training left, evaluation) and whether it starts: `paper_blocks.starts`."""
        run_name = job.rsplit(".", 1)[0]
        # a late-DER run forks from its base run's state when that ran in this block (train.py): it trains its DER
        # epochs only
        first = rc.der.first_epoch(rc.train.epochs) if variant == "der" and rc.train.method in MULTI_STEP else 1
        jobs = paper_blocks.window_jobs(name)
        forked = first > 1 and f"{run_name}.base" in jobs[:jobs.index(job)]
        offset = first - 1 if forked else 0
        cost = self.cost(name, job, rc.train.n_train or n_train, rc.train.epochs - offset, spec.kind)
        done = max(0, _history_epochs(work, job) - offset)
        train_prior = cost.train(self.gpu, min(done, len(cost.epochs)))
        after_prior = cost.after(self.gpu)
        need = self.scale("train") * train_prior + self.scale("evaluate") * after_prior
        left = self.left()
        whole = self.ns.deadline - paper_blocks.COMMAND_RESUME if self.ns.deadline else math.inf
        epoch = max(cost.epochs, default=0.0) * paper_blocks.GPU_FACTOR[self.gpu] * self.scale("train")
        can = done < len(cost.epochs) and left >= cost.start * paper_blocks.GPU_FACTOR[self.gpu] + 2 * epoch
        return {"decision": paper_blocks.starts(need, left, whole, can, self.next_whole()), "need": need,
                "left": left, "offset": offset, "done": done, "train_prior": train_prior, "after_prior": after_prior}

    def _job(self, name, spec, job, rec, work, out, params, n_train) -> None:
        from ..stages import train

        run_name, variant = job.rsplit(".", 1)
        rc = params.variant_run(run_name, variant)
        b = self._budget(name, spec, job, rc, variant, work, n_train)
        decision, left, done, offset, train_prior = b["decision"], b["left"], b["done"], b["offset"], b["train_prior"]
        if decision == "skip":
            self._skip(name, job, rec, f"estimated {b['need']:.0f} s, {max(left, 0):.0f} s left")
            return
        cmd = {"at": _now(), **self.env}
        rec.setdefault("commands", []).append(cmd)
        rec.pop("why", None)
        stop = None if not self.ns.deadline else max(left, 0) + (self.ns.grace if decision == "run" else 0.0)
        t0 = _clock()
        try:
            with _inside(work), _stop_at(stop):
                train.run(params, run_name, variant)
        except _Deadline:
            self.stopped = True
        t1 = _clock()
        after = _history_epochs(work, job) if self.stopped else rc.train.epochs
        before = done + offset
        cmd["train_seconds"] = round(t1 - t0, 1)
        cmd["epochs"] = [before + 1, after]
        self.measured["train"].append((train_prior, t1 - t0))
        if self.stopped:
            cmd["stopped"] = f"stopped at the deadline after epoch {after}/{rc.train.epochs}"
            rec.update(status="training", why=f"{cmd['stopped']}; the next command resumes it")
            log(f"block {name}: {job}: {rec['why']}")
            self._finish(rec)
            return
        if spec.kind == "generation":
            with _inside(work):
                for src, suffix in TRAIN_EVIDENCE.items():
                    shutil.copyfile(src.format(job=job), out / f"{job}.{suffix}")
            rec.update(status="done")
            self._finish(rec, work, job)
            log(f"block {name}: {job} trained in {t1 - t0:.0f} s; {_clock() - self.start:.0f} s since the start")
            return
        self._evaluate(name, job, rec, cmd, work, out, params, b["after_prior"], t0, t1)

    def _evaluate(self, name, job, rec, cmd, work, out, params, after_prior, t0, t1) -> None:
        """A trained job's evaluation, deferred to the next command when it no longer fits the time left."""
        from ..stages import evaluate

        run_name, variant = job.rsplit(".", 1)
        eval_need = self.scale("evaluate") * after_prior
        if eval_need > self.left():
            cmd["deferred"] = f"evaluation deferred: estimated {eval_need:.0f} s, {max(self.left(), 0):.0f} s left"
            rec.update(status="trained", why=f"{cmd['deferred']}; the next command evaluates it")
            log(f"block {name}: {job}: {rec['why']}")
            self._finish(rec, work, job)
            return
        with _inside(work):
            evaluate.run(params, run_name, variant)
            for src, suffix in EVIDENCE.items():
                shutil.copyfile(src.format(job=job), out / f"{job}.{suffix}")
        t2 = _clock()
        cmd["eval_seconds"] = round(t2 - t1, 1)
        self.measured["evaluate"].append((after_prior, t2 - t1))
        rec.update(status="done")
        self._finish(rec, work, job)
        log(f"block {name}: {job} done in {t2 - t0:.0f} s (train {t1 - t0:.0f}, evaluate {t2 - t1:.0f}); "
            f"{_clock() - self.start:.0f} s since the start")

    def _finish(self, rec: dict, work: Path | None = None, job: str | None = None) -> None:
        """The job's record from its commands: seconds summed over them, where and with what it ran, its note."""
        cmds = rec["commands"]
        rec["train_seconds"] = round(sum(c.get("train_seconds", 0.0) for c in cmds), 1)
        rec["eval_seconds"] = round(sum(c.get("eval_seconds", 0.0) for c in cmds), 1)
        if work is not None and (work / "metrics/train" / f"{job}.json").is_file():
            history = read_json(work / "metrics/train" / f"{job}.json").get("train_seconds")
            if history is not None:  # the epochs' own seconds, whichever command ran them
                rec["epoch_seconds"] = round(history, 1)
        last = cmds[-1]
        rec.update({k: last[k] for k in ("code", "device", "gpu", "torch", "python", "params", "data")})
        if len({c["device"] for c in cmds}) > 1:
            rec["devices"] = [c["device"] for c in cmds]
        note = _note(rec)
        if note:
            rec["note"] = note
        else:
            rec.pop("note", None)

    def _step(self, name, job, rec, work, out, params, n_train) -> None:
        """A generation step: pca, class-energy, sample.<sampler>, score."""
        from ..stages import class_energy, pca, sample, score

        cost = self.cost(name, job, n_train)
        need = self.scale("step") * cost.seconds(self.gpu)
        left = self.left()
        if need > left:
            self._skip(name, job, rec, f"estimated {need:.0f} s, {max(left, 0):.0f} s left")
            return
        kind, _, sampler = job.partition(".")
        if kind == "score" and params.score.inception_fid is True:
            from ..evaluation import fidelity

            try:
                fidelity.choose_inception(params.score, "cuda")
            except UserError as exc:
                self._skip(name, job, rec, f"waiting for the Inception file ({exc}); scripts/parts.py join brings "
                                           "it (docs/performance.md)")
                return
        cmd = {"at": _now(), **self.env}
        rec.setdefault("commands", []).append(cmd)
        rec.pop("why", None)
        t0 = _clock()
        with _inside(work):
            {"pca": lambda: pca.run(params), "class-energy": lambda: class_energy.run(params),
             "sample": lambda: sample.run(params, sampler), "score": lambda: score.run(params)}[kind]()
            for src, dst in STEP_EVIDENCE[kind].items():
                shutil.copyfile(src.format(s=sampler), out / dst.format(s=sampler))
        seconds = _clock() - t0
        cmd["eval_seconds"] = round(seconds, 1)  # a step's seconds are its work after the models' training
        self.measured["step"].append((cost.seconds(self.gpu), seconds))
        rec.update(status="done")
        self._finish(rec)
        log(f"block {name}: {job} done in {seconds:.0f} s; {_clock() - self.start:.0f} s since the start")


def _print_plan(ns: argparse.Namespace) -> None:
    names = ns.blocks or paper_blocks.names()
    print(paper_blocks.plan_table(ns.gpu, names))
    if ns.next:
        done = done_jobs([Path(ns.evidence), Path(ns.out)])
        queue = paper_blocks.next_blocks(done)
        print("\n--next, in this order: " + (", ".join(f"{b} seed {s}" for b, s in queue) or "nothing left"))
    if ns.blocks:
        for name in ns.blocks:
            print()
            print(paper_blocks.plan_detail(name, ns.gpu))


def run(_params: None, ns: argparse.Namespace) -> None:
    if ns.plan:
        _print_plan(ns)
        return
    if not ns.blocks and not ns.next:
        raise UserError("name one or more blocks, or --next (the queue of docs/paper.md), or --plan")
    preset = Path(ns.preset)
    if not preset.is_file():
        raise UserError(f"--preset: {preset} not found")
    data = Path(ns.data).resolve()
    if not data.exists():
        raise UserError(f"--data: {data} not found; give a CIFAR-10 torchvision root or a class-folder .tar.gz")
    units = [(name, ns.seed) for name in ns.blocks]
    if ns.next:
        done = done_jobs([Path(ns.evidence), Path(ns.out)])
        units += [u for u in paper_blocks.next_blocks(done) if u not in units]
    raw_preset = yaml.safe_load(preset.read_text())
    plans = []  # validate every block before any work
    for name, seed in units:
        raw = paper_blocks.params_for(raw_preset, name, str(data), seed, ns.device, ns.tiny)
        plans.append((name, seed, raw, parse(raw)))
    cuda = bool(plans) and plans[0][3].device != "cpu" and torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else "cpu"
    gpu = paper_blocks.gpu_of(device) if cuda else ("h200" if ns.tiny else "h100")  # the dry run: priors as given
    runner = Runner(ns, data, gpu, device)
    log(f"block: {len(units)} block(s) on {device} (planned as {gpu.upper()}): "
        + ", ".join(f"{b} seed {s}" for b, s, *_ in plans))
    try:
        for name, seed, raw, params in plans:
            if runner.stopped:
                break
            runner.block(name, seed, raw, params)
    finally:
        runner.close()
    if runner.tar:
        runner.out_root.mkdir(parents=True, exist_ok=True)
        _pack(runner.out_root, runner.tar)
