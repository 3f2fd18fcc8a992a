"""`make bench`: training images/s per method, with and without DER, against a bare forward/backward loop
of the same model, plus AutoAttack seconds per 100 images. Writes metrics/bench.json (tests never assert time).

Inputs are random images of the configured dataset's geometry, so the numbers measure compute only.
"""
from __future__ import annotations

import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import checkpoint
from ..artifacts import write_json
from ..data import load_prepared, to_float
from ..methods import METHODS
from ..params import Params
from ..robustness import autoattack_seconds_per_100
from ..runtime import log, setup
from ..train import BatchStats, make_optimizer, train_step

GEOMETRY = {  # dataset -> (channels, size, classes) of its images; timings do not depend on the pixels
    "fashion-mnist": (1, 28, 10), "cifar10": (3, 32, 10), "cifar100": (3, 32, 100), "svhn": (3, 32, 10),
    "image-folder": (3, 32, 10),
}
WARMUP, BATCHES = 3, 15


def _model(params: Params, device: torch.device) -> tuple[torch.nn.Module, tuple[int, int, int]]:
    channels, size, classes = GEOMETRY[params.data.dataset]
    meta = {**checkpoint.model_id(params.model), "num_classes": classes, "channels": channels, "size": size,
            "mean": [0.5] * channels, "std": [0.25] * channels}
    return checkpoint.new_model(meta).to(device), (channels, size, classes)


def _throughput(step, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> float:
    for _ in range(WARMUP):
        step(x, y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(BATCHES):
        step(x, y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return BATCHES * x.shape[0] / (time.perf_counter() - t0)


def run(params: Params) -> None:
    device = setup(params)
    batch = params.train.batch_size
    results: dict[str, float] = {}
    model, (channels, size, classes) = _model(params, device)
    x = torch.rand(batch, channels, size, size, device=device)
    y = torch.randint(0, classes, (batch,), device=device)

    opt = make_optimizer(model, params.train)

    def bare(xb, yb):
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    results["train.bare_fwd_bwd.img_per_s"] = _throughput(bare, x, y, device)
    for name, method in METHODS.items():
        cfg = params.train
        threat = method.threat(cfg)
        for der in ((False, True) if method.attack else (False,)):
            model, _ = _model(params, device)
            opt = make_optimizer(model, cfg)

            def step(xb, yb, method=method, threat=threat, der=der, model=model, opt=opt):
                train_step(model, opt, xb, yb, method, threat, cfg, params.der.lam if der else 0.0,
                           params.der.gamma, device, BatchStats())

            key = f"train.{name}{'.der' if der else ''}.img_per_s"
            results[key] = _throughput(step, x, y, device)
            log(f"bench {key}: {results[key]:.0f}")
    # AutoAttack only attacks points still classified correctly: time it on a trained robust model when one exists.
    ckpt = Path("models/base") / params.sample.run / "best.pt"
    if ckpt.is_file() and Path("data/prepared/meta.json").is_file():
        model, meta = checkpoint.load(ckpt)
        test = load_prepared()[0]["test"]
        xa, ya, eps, aa_model = to_float(test.x[:100], device), test.y[:100].to(device), meta["eps"], str(ckpt)
    else:
        model, _ = _model(params, device)
        xa, ya, eps, aa_model = x[:100], y[:100], params.train.eps, "untrained (no checkpoint yet: run make repro)"
    results["autoattack.seconds_per_100"] = autoattack_seconds_per_100(model.to(device).eval(), xa, ya, eps)
    log(f"bench autoattack seconds/100 images: {results['autoattack.seconds_per_100']:.1f} ({aa_model})")
    write_json("metrics/bench.json", {
        **{k: round(v, 1) for k, v in results.items()},
        "config": {**checkpoint.model_id(params.model), "dataset": params.data.dataset, "batch_size": batch,
                   "train_steps": params.train.steps, "device": device.type, "threads": torch.get_num_threads(),
                   "torch": torch.__version__, "autoattack_model": aa_model, "cpu": platform.processor() or platform.machine()},
    })
