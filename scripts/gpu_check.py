"""GPU check: the paper's CIFAR-10 recipe (presets/paper.yaml), shortened to minutes, through the library.

    scripts/gpu-check [--data PATH] [--out FILE]        one CUDA GPU; the issue's budget: <= 8 min on one H100
    scripts/gpu-check --device cpu --tiny [--data PATH]  CPU dry run of every code path on a few hundred images

Requirements (nothing is installed, created or downloaded here):
- python3 >= 3.11 with torch (a CUDA build for the real check) and torchvision, numpy, scipy, PyYAML, tqdm and
  Pillow, at whatever versions the machine has (GPU machines usually have them preinstalled; no venv, no dvc);
- torch-fidelity and pyautoattack (pure Python): importable, or as wheels in .cache/gpu-wheels, which
  `make gpu-wheels` fills on a machine with PyPI and scripts/gpu-check installs offline into a temporary folder;
- PYTHONPATH=src (scripts/gpu-check sets it);
- CIFAR-10 (--data): a torchvision root holding cifar-10-batches-py (default data/downloads, where the cifar10
  pipeline downloads it), or an image-folder tree or .tar.gz of train/<class>/ and test/<class>/ images, such as
  a JPEG copy of CIFAR-10 (a development stand-in: its accuracies are not CIFAR-10's);
- Inception FID only where the Inception file is in the torch hub cache (`make inception`); otherwise FID is
  computed on the features of the check's own `standard` model and labelled so.

What runs (each stage timed, with peak GPU memory): our step replayed from CUDA graphs against the eager step
(13 steps from one initial model, weights compared); the bench of `make bench` (our training step vs the plain
reference loop of every method, with and without DER, bf16 + channels_last + CUDA graphs as our step runs on CUDA);
our step in fp32 for standard / FGSM / PGD-10 ± DER, PGD-10 ± DER without graphs, and a plain fp32,
non-channels-last PGD-10 loop; one epoch on 10k training
images of `standard` (the FID feature extractor) and of PGD-10 without and with DER (λ 6, γ 0.2); clean, PGD-20
and standard AutoAttack accuracy of both PGD models on the first 500 test images; local class-wise PCA; SGLD from
PCA starts with energy-guided stopping, 100 samples per class from each model; FID of the samples. Writes
metrics/gpu_check.json (flat keys, the figures the issue names, the targets and whether they were met).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable
from unittest import mock

import torch
import yaml

import energyat  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch loads)
from energyat import params as P
from energyat.commands import bench
from energyat.errors import UserError
from energyat.evaluation import fidelity, robustness
from energyat.infra.artifacts import write_json
from energyat.infra.runtime import log, setup
from energyat.runstate import checkpoint
from energyat.science import class_pca, data, sampling
from energyat.science import training as training
from energyat.science.methods import METHODS

TARGETS = {  # the targets of the GPU path, for one H100
    "pgd_img_per_s_min": 1300, "pgd_speedup_vs_plain_min": 2.0, "der_cost_max": 1.15,
    "ratio_vs_reference_min": bench.TARGET, "total_seconds_max": 480,
}
THROUGHPUT = ("standard", "fgsm", "pgd")  # methods whose img/s is reported in bf16 and fp32


@dataclass(frozen=True)
class Plan:
    """Sizes of one check: the real one, or the CPU dry run."""

    arch: dict  # the `model` section
    n_train: int  # training images per run (one epoch)
    n_val: int  # validation images (held out; scored after the epoch)
    val_steps: int
    steps: int  # PGD-k of training and of the bench's multi-step methods
    n_test: int  # clean and PGD-20 test images
    n_aa: int  # AutoAttack test images (a prefix of those)
    pgd_eval_steps: int
    bench_rounds: int
    bench_round_seconds: float
    fp32_seconds: float  # timing per fp32 throughput figure
    per_class: int  # SGLD samples per class and model
    sgld_steps: int
    pca_k: int
    pca_anchors: int
    n_energy: int  # training images per class measuring the stopping energy
    fid_reference: int  # training images FID compares against
    threads: int
    batch: int  # training batch (the paper's: 128)
    warmup: int  # untimed steps of each loop before the bench times it


FULL = Plan({"arch": "preact-resnet18"}, 10_000, 1000, 10, 10, 500, 500, 20, 5, 0.3, 1.5, 100, 50, 500, 10, 1000,
            10_000, 8, 128, 3)
TINY = Plan({"arch": "small-cnn", "width": 8}, 256, 64, 2, 2, 64, 16, 3, 2, 0.02, 0.05, 2, 5, 40, 2, 20, 40, 2,
            32, 1)


def preset_params(path: Path, plan: Plan, data_path: Path, device: str, seed: int) -> P.Params:
    """presets/paper.yaml shortened to one epoch of each run, on `plan`'s sizes, validated like params.yaml."""
    raw = yaml.safe_load(path.read_text())
    torchvision_root = (data_path / "cifar-10-batches-py").is_dir()
    raw.update(seed=seed, device=device, threads=plan.threads, model=plan.arch)
    raw["data"] = {**raw["data"], "dataset": "cifar10" if torchvision_root else "image-folder",
                   "source": str(data_path), "val_size": plan.n_val, "augment": "crop-flip"}
    raw["train"] = {**raw["train"], "epochs": 1, "batch_size": plan.batch, "n_train": plan.n_train,
                    "steps": plan.steps, "n_val": plan.n_val, "val_steps": plan.val_steps}
    raw["der"] = {**raw["der"], "start_epoch": 1}
    raw["standard"] = {**raw["standard"], "epochs": 1}
    raw["runs"] = {"pgd": {"method": "pgd"}, "fgsm": {"method": "fgsm"}}
    raw["sample"] = {**raw["sample"], "run": "pgd", "steps": plan.sgld_steps, "samples_per_class": plan.per_class,
                     "n_energy": plan.n_energy, "step_sweep": [], "batch_size": 10 * plan.per_class}
    raw["pca"] = {**raw["pca"], "k": plan.pca_k, "n_anchors": plan.pca_anchors}
    raw["evaluate"] = {**raw["evaluate"], "n_examples": plan.n_test, "aa_examples": plan.n_aa,
                       "batch_size": plan.n_aa, "pgd_steps": [plan.pgd_eval_steps], "restarts": 1}
    return P.parse(raw)


class Clock:
    """Seconds and peak GPU memory of each named stage."""

    def __init__(self, device: torch.device):
        self.device, self.seconds, self.peak_gib = device, {}, {}

    @contextmanager
    def __call__(self, name: str):
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        yield
        if cuda:
            torch.cuda.synchronize(self.device)
            self.peak_gib[name] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)
        self.seconds[name] = round(time.perf_counter() - start, 2)
        log(f"gpu-check {name}: {self.seconds[name]:.1f} s"
            + (f", peak {self.peak_gib[name]} GiB" if cuda else ""))


@contextmanager
def fp32_training():
    """Our step without bf16 autocast. runtime.autocast has no precision switch, so the training module's
    reference to it is replaced by a disabled autocast for the duration of this measurement only."""
    with mock.patch.object(training, "autocast", lambda device, cache=True: torch.autocast(device.type, enabled=False)):
        yield


@contextmanager
def torch_default_backends(device: torch.device):
    """PyTorch's default cuDNN/matmul flags (no autotuning, no TF32 matmul; cuDNN TF32 is on by default) instead of
    the ones runtime.setup chose: what a plain loop gets."""
    flags = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32 = False, False
    try:
        yield {"cudnn.benchmark": torch.backends.cudnn.benchmark, "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
               "matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32}
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32 = flags


def inception_choice(device: torch.device, wanted: str):
    """(extractor, file) of the Inception pass from the torch hub cache, or None with the reason logged. `wanted`:
    on, off, or auto (on under CUDA; on 2 CPU threads it costs ~0.2 s per image)."""
    if wanted == "off" or (wanted == "auto" and device.type != "cuda"):
        log(f"gpu-check: Inception FID not computed (--inception {wanted} on {device.type})")
        return None
    try:
        return fidelity.choose_inception(replace(P.ScoreCfg(), inception_fid=True), device.type)
    except UserError as exc:
        log(f"gpu-check: Inception FID not computed ({exc})")
        return None


def accuracy(flags: torch.Tensor) -> float:
    return round(flags.float().mean().item(), 4)


class Check:
    """One run of the check: params, data and model factory shared by its stages, which add flat keys to `out`."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.plan = args, TINY if args.tiny else FULL
        self.params = preset_params(args.preset, self.plan, args.data, args.device, args.seed)
        self.device = setup(self.params)
        self.clock = Clock(self.device)
        self.out: dict = {}
        with self.clock("data"):
            self.splits, self.meta = data.prepare(self.params.data, self.params.seed)
        self.run_pgd, self.run_std = self.params.run("pgd"), self.params.run("standard")

    def model_meta(self, run: P.RunCfg) -> dict:
        return {**checkpoint.model_meta(run.model, self.meta), "method": run.train.method, "eps": run.train.eps}

    def make_model(self) -> torch.nn.Module:
        torch.manual_seed(self.params.seed)
        return checkpoint.new_model(self.model_meta(self.run_pgd))

    def run_for(self, method: str) -> P.RunCfg:
        return replace(self.run_pgd, name=method, train=replace(self.run_pgd.train, method=method))

    def graphs(self) -> None:
        """CUDA graphs against the eager step, first (a capture that fails ends the check at once): from one
        initial model, the same 13 steps of PGD-10 as fit can order them (diagnostics on alternate steps, then
        DER on: three kinds of step, each captured after its warm-up; then a short batch, eager), with and without
        graphs, and the largest weight difference beside that of two eager runs (non-deterministic cuDNN kernels
        set that floor)."""
        geometry = (self.meta["channels"], self.meta["size"], self.meta["num_classes"])
        b = self.run_pgd.train.batch_size
        full = bench.batch_for(geometry, b, self.device, self.params.seed)
        short = tuple(t[: b // 2] for t in full)
        plan = [(*full, False, i % 2 == 0) for i in range(8)] + [(*full, True, True)] * 4 + [(*short, True, True)]

        def trained(cuda_graphs: bool) -> tuple[list[torch.Tensor], dict[str, float], int]:
            model = self.make_model()
            trainer = training.Trainer(model, self.run_pgd, self.device, cuda_graphs=cuda_graphs)
            gen, sums = torch.Generator(device=self.device).manual_seed(self.params.seed), {}
            for xb, yb, der_on, diagnose in plan:
                for k, v in trainer.step(xb, yb, bench.LR, der_on, diagnose, gen).items():
                    sums[k] = sums.get(k, 0) + v
            kinds = len(trainer.graphs.graphs) if trainer.graphs is not None else 0
            return [p.detach().float() for p in model.parameters()], {k: float(v) for k, v in sums.items()}, kinds

        with self.clock("graphs"):
            eager, eager_sums, _ = trained(False)
            again, _, _ = trained(False)
            graphed, graphed_sums, kinds = trained(True)

        def largest(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
            return max(float((x - y).abs().max()) for x, y in zip(a, b))

        scale = max(float(p.abs().max()) for p in eager)
        diff, floor = largest(graphed, eager) / scale, largest(again, eager) / scale
        sums_diff = max(abs(graphed_sums[k] - v) / max(abs(v), 1.0) for k, v in eager_sums.items())
        self.out.update({"graphs.kinds_captured": kinds, "graphs.weight_diff_vs_eager": diff,
                         "graphs.weight_diff_eager_vs_eager": floor, "graphs.sums_diff_vs_eager": sums_diff,
                         "graphs.match": kinds == (3 if self.device.type == "cuda" else 0)
                         and diff <= 10 * floor + 1e-5 and sums_diff <= 1e-3})
        log(f"gpu-check graphs: {kinds} kinds captured; weights vs eager {diff:.2e} (eager vs eager {floor:.2e}); "
            f"diagnostic sums {sums_diff:.2e}")

    def speed(self) -> None:
        """The bench (ours vs reference, every method ± DER, as our step runs here), then fp32 and plain figures."""
        plan, out = self.plan, self.out
        geometry = (self.meta["channels"], self.meta["size"], self.meta["num_classes"])
        xb, yb = bench.batch_for(geometry, self.run_pgd.train.batch_size, self.device, self.params.seed)
        with self.clock("bench"):
            ratios = bench.compare_all(self.make_model, self.run_for, xb, yb, list(METHODS), rounds=plan.bench_rounds,
                                       round_seconds=plan.bench_round_seconds, warmup=plan.warmup,
                                       prefix="bench.train")
        out.update(ratios)
        out["bench.below_target"] = bench.below_target(ratios)
        with self.clock("throughput"):
            for method in THROUGHPUT:
                for use_der in (False, True) if METHODS[method].adversarial else (False,):
                    name = f"{method}{'.der' if use_der else ''}"
                    out[f"throughput.{name}.bf16.img_per_s"] = ratios[f"bench.train.{name}.img_per_s"]
                    with fp32_training():
                        loop = bench.Ours(self.make_model(), self.run_for(method), self.device, use_der)
                        out[f"throughput.{name}.fp32.img_per_s"] = bench.throughput(loop, xb, yb, plan.fp32_seconds,
                                                                                   plan.warmup)
            for use_der in (False, True):  # what the graphs bring: our step issued kernel by kernel
                loop = bench.Ours(self.make_model(), self.run_pgd, self.device, use_der, cuda_graphs=False)
                out[f"throughput.pgd{'.der' if use_der else ''}.bf16_eager.img_per_s"] = bench.throughput(
                    loop, xb, yb, plan.fp32_seconds, plan.warmup)
            with torch_default_backends(self.device) as flags:
                plain = bench.Reference(self.make_model(), self.run_pgd, self.device, bench.Precision(False, False),
                                        False)
                out["throughput.pgd.plain_fp32.img_per_s"] = bench.throughput(plain, xb, yb, plan.fp32_seconds,
                                                                              plan.warmup)
            out["throughput.pgd.plain_fp32.backends"] = flags
        pgd = out["throughput.pgd.bf16.img_per_s"]
        out["throughput.pgd.speedup_vs_plain"] = pgd / out["throughput.pgd.plain_fp32.img_per_s"]
        out["throughput.pgd.der_cost"] = pgd / out["throughput.pgd.der.bf16.img_per_s"]

    def train(self) -> dict[str, torch.nn.Module]:
        """One epoch of `standard`, PGD and PGD + DER through `fit` (augmentation and validation included)."""
        models = {}
        for name, run, use_der in (("standard", self.run_std, False), ("pgd.base", self.run_pgd, False),
                                   ("pgd.der", self.run_pgd, True)):
            model = self.make_model()
            with self.clock(f"train.{name}"):
                history = training.fit(model, self.splits["train"], self.splits["val"], run, use_der, self.device,
                                       self.params.seed, augmentation=self.params.data.augmentation())
            row = history[-1]
            self.out.update({f"train.{name}.epoch_seconds": round(row["seconds"], 2),
                             f"train.{name}.val_clean_acc": round(row["val_clean_acc"], 4),
                             f"train.{name}.val_pgd_acc": round(row["val_pgd_acc"], 4)})
            models[name] = model.eval()
        out = self.out
        out["train.pgd.der_cost"] = out["train.pgd.der.epoch_seconds"] / out["train.pgd.base.epoch_seconds"]
        return models

    def evaluate(self, models: dict[str, torch.nn.Module]) -> None:
        """Clean, PGD-k and standard AutoAttack accuracy of both PGD models."""
        plan, test, seed = self.plan, self.splits["test"], self.params.seed
        eps, block, steps = self.run_pgd.train.eps, self.params.evaluate.batch_size, plan.pgd_eval_steps
        # a seeded random subset: an image folder lists its test images class by class
        rows = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))[:plan.n_test]
        x, y = data.to_float(test.x[rows], self.device), test.y[rows].to(self.device)
        for variant in ("base", "der"):
            model, key = models[f"pgd.{variant}"], f"eval.pgd.{variant}"
            with self.clock(f"evaluate.{variant}"):
                self.out[f"{key}.clean_acc"] = accuracy(robustness.clean_correct(model, x, y, block))
                self.out[f"{key}.pgd{steps}_acc"] = accuracy(
                    robustness.pgd_correct(model, x, y, eps, steps, 1, block, seed))
                aa_start = time.perf_counter()
                aa = robustness.run_autoattack(model, x[:plan.n_aa], y[:plan.n_aa], eps, seed, block)
                aa_seconds = time.perf_counter() - aa_start
            self.out.update({f"{key}.aa_acc": round(aa.accuracy, 4), f"{key}.aa.warnings": aa.warnings,
                             f"{key}.aa.seconds_per_100": round(aa_seconds * 100 / plan.n_aa, 2),
                             **{f"{key}.aa.{a}.seconds": round(s, 2) for a, s in aa.seconds.items()}})

    def sample(self, models: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
        """Local class-wise PCA, then SGLD from its starts with energy-guided stopping: uint8 samples per model."""
        train, k, seed, scfg = self.splits["train"], self.meta["num_classes"], self.params.seed, self.params.sample
        with self.clock("pca"):
            x_flat = data.to_float(train.x[:self.plan.n_train]).flatten(1)
            fits, classes, _ = class_pca.local_classwise(x_flat, train.y[:self.plan.n_train], k, self.params.pca.variance,
                                                   self.params.pca.k, self.params.pca.n_anchors,
                                                   torch.Generator().manual_seed(seed))
        self.out["pca.local.components_mean"] = round(sum(f["components"].shape[0] for f in fits) / len(fits), 1)
        bank = sampling.PcaBank(fits, classes)
        shape = (self.meta["channels"], self.meta["size"], self.meta["size"])
        labels = torch.arange(k, device=self.device).repeat_interleave(scfg.samples_per_class)
        ref_rows = torch.cat([(train.y == c).nonzero().squeeze(1)[:scfg.n_energy] for c in range(k)])
        samples = {}
        for variant in ("base", "der"):
            model = models[f"pgd.{variant}"].requires_grad_(False)
            with self.clock(f"sample.{variant}"):
                target = sampling.class_mean_energy(model, train.x[ref_rows], train.y[ref_rows], k, scfg.batch_size,
                                                    self.device).to(self.device)
                chains = sampling.generate(
                    model, sampling.INITS["pca-local"].draw, bank, labels, shape, sigma_pca=scfg.sigma_pca,
                    block_size=scfg.batch_size, seed=seed, steps=scfg.steps, step_size=scfg.step_size,
                    momentum=scfg.momentum, noise=scfg.noise, target=target, tau=scfg.tau)
            samples[variant] = (chains.x * 255).round().clamp(0, 255).to(torch.uint8).cpu()
            self.out[f"sample.{variant}.steps_used"] = round(chains.steps_used.float().mean().item(), 2)
        return samples

    def fid(self, standard: torch.nn.Module, samples: dict[str, torch.Tensor]) -> None:
        """FID of each sample set and of as many real validation images, against training images: on the
        `standard` model's features, and with Inception where its file is at hand."""
        reference = self.splits["train"].x[:self.plan.fid_reference]
        opts = dict(device=self.device, batch_size=self.params.score.batch_size, seed=self.params.seed)
        sets = {**samples, "real": self.splits["val"].x[:next(iter(samples.values())).shape[0]]}
        with self.clock("fid"), tempfile.TemporaryDirectory(prefix="energyat-gpu-check-") as tmp:
            extractor = Path(tmp) / "standard.pt"
            checkpoint.save(extractor, standard, self.model_meta(self.run_std))
            scorers = {"classifier": fidelity.Scorer(fidelity.CLASSIFIER, extractor, reference, **opts)}
            inception = inception_choice(self.device, self.args.inception)
            if inception:
                scorers["inception"] = fidelity.Scorer(*inception, reference, **opts)
            try:
                for kind, scorer in scorers.items():
                    for name, x in sets.items():
                        self.out[f"fid.{kind}.{name}"] = round(scorer.score(x)["fid"], 3)
            finally:
                for scorer in scorers.values():
                    scorer.close()
        self.out["fid.inception.extractor"] = inception[0] if inception else "not computed"

    def summary(self, seconds: float) -> None:
        """Stage times, peak memory, the issue's targets (met or not, for a real run on CUDA) and the setting."""
        out, cuda = self.out, self.device.type == "cuda"
        out.update({f"seconds.{name}": s for name, s in self.clock.seconds.items()})
        out.update({f"peak_gib.{name}": g for name, g in self.clock.peak_gib.items()})
        if self.clock.peak_gib:
            out["peak_gib.max"] = max(self.clock.peak_gib.values())
        out["seconds.total"] = round(seconds, 1)
        out["targets"] = {**TARGETS, "met": None if not cuda or self.args.tiny else {
            "pgd_img_per_s": out["throughput.pgd.bf16.img_per_s"] >= TARGETS["pgd_img_per_s_min"],
            "pgd_speedup_vs_plain": out["throughput.pgd.speedup_vs_plain"] >= TARGETS["pgd_speedup_vs_plain_min"],
            "der_cost": out["throughput.pgd.der_cost"] <= TARGETS["der_cost_max"],
            "ratios_vs_reference": not out["bench.below_target"],
            "graphs_match_eager": out["graphs.match"],
            "total_seconds": seconds <= TARGETS["total_seconds_max"],
        }}
        plan, run = self.plan, self.run_pgd
        out["config"] = {
            "plan": "tiny (CPU dry run: its numbers say nothing)" if self.args.tiny else "full",
            "device": torch.cuda.get_device_name(self.device) if cuda else f"cpu: {bench.cpu_name()}",
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "data": self.meta["source"], "dataset": self.meta["dataset"],
            "model": plan.arch, "batch_size": run.train.batch_size, "eps": run.train.eps, "train_steps": plan.steps,
            "n_train": plan.n_train, "n_test": plan.n_test, "n_aa": plan.n_aa, "samples_per_class": plan.per_class,
            "der": {"lambda": run.der.lam, "gamma": run.der.gamma}, "preset": str(self.args.preset),
            "precision": "bf16 autocast + channels_last + CUDA graphs (ours on CUDA); fp32 keys: ours without "
                         "autocast; bf16_eager keys: ours without CUDA graphs",
        }


def check(args: argparse.Namespace, save: Callable[[dict], None]) -> dict:
    """Every stage in turn; after each, `save` gets what has been measured so far (marked `partial`), so a check
    cut short by a time limit or a failing stage still leaves its figures."""
    start = time.perf_counter()
    run = Check(args)

    def done(stage: str) -> None:
        save({**run.out, **{f"seconds.{n}": s for n, s in run.clock.seconds.items()},
              **{f"peak_gib.{n}": g for n, g in run.clock.peak_gib.items()},
              "partial": f"stopped after {stage} ({time.perf_counter() - start:.0f} s)"})

    run.graphs()
    done("graphs")
    run.speed()
    done("speed")
    models = run.train()
    done("train")
    run.evaluate(models)
    done("evaluate")
    samples = run.sample(models)
    done("sample")
    run.fid(models["standard"], samples)
    run.summary(time.perf_counter() - start)
    return run.out


def rounded(value):
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu-check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("data/downloads"),
                        help="CIFAR-10: torchvision root (cifar-10-batches-py) or image-folder tree/.tar.gz")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="dry-run sizes (a few hundred images, a small CNN)")
    parser.add_argument("--out", type=Path, help="default: metrics/gpu_check.json (--tiny: data/gpu_check/tiny.json)")
    parser.add_argument("--preset", type=Path, default=Path("presets/paper.yaml"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--inception", choices=("auto", "on", "off"), default="auto",
                        help="Inception FID from the torch hub cache's file (auto: under CUDA only)")
    args = parser.parse_args(argv)
    out_path = args.out or Path("data/gpu_check/tiny.json" if args.tiny else "metrics/gpu_check.json")
    try:
        if not args.data.exists():
            raise UserError(f"--data: {args.data}: not found; give a CIFAR-10 torchvision root or an image-folder "
                            "tree/.tar.gz (e.g. a JPEG copy of CIFAR-10)")
        result = check(args, lambda partial: write_json(out_path, rounded(partial)))
    except UserError as exc:
        print(f"gpu-check: error: {exc}", file=sys.stderr)
        return 2
    write_json(out_path, rounded(result))
    log(f"gpu-check: wrote {out_path} ({result['seconds.total']:.0f} s); targets met: "
        f"{json.dumps(result['targets']['met'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
