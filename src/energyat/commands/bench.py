"""`make bench`: our training step against a plain reference loop of the same method, plus AutoAttack seconds per
100 images. Writes metrics/bench.json (tests never assert time).

Ours is `Trainer.step` as `fit` drives it: natural-image diagnostics on every `train.diag_every`-th batch
(`training.diagnosed`), diagnostic sums kept on the device and read once per round.
The references are the methods' published training loops, written out here and not imported from the library:
zero-init FGSM and RS-FGSM (Wong et al. 2020), N-FGSM (de Jorge et al. 2022), GradAlign (Andriushchenko &
Flammarion 2020), PGD-k with a random start (Rice et al. 2020), TRADES with its attack in eval mode (Zhang et al.
2019), and with DER the paper's loss added in plain tensor code. Their input gradients use `torch.autograd.grad`
(the original code's `loss.backward()` also computes weight gradients, so it is slower than these) and TRADES
computes f(x) once per attack (the original recomputes it every step): the bar is the fastest plain loop.
Both sides run the same model, batch, eps and random draws, in interleaved rounds (alternating which goes
first), so that load from other processes hits both alike; the ratio is the median of the per-round ratios.
"""
from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..evaluation.robustness import autoattack_seconds_per_100
from ..infra.artifacts import write_json
from ..infra.runtime import cpu_name, log, setup
from ..params import DerCfg, Params, RunCfg, TrainCfg
from ..runstate import checkpoint
from ..science.data import load_prepared, to_float
from ..science.methods import METHODS
from ..science.training import SUMS, Trainer, diagnosed

GEOMETRY = {  # dataset -> (channels, size, classes) of its images; timings do not depend on the pixels
    "fashion-mnist": (1, 28, 10), "cifar10": (3, 32, 10), "cifar100": (3, 32, 100), "svhn": (3, 32, 10),
    "image-folder": (3, 32, 10),
}
TARGET = 0.9  # every method with diagnostics on at >= 0.9x its reference loop
LR = 0.01  # a small constant step: random labels must not drive the weights to overflow during the timing

# ------------------------------------------------------------------------------------------ reference loops


def _der(logits_nat: Tensor, logits_adv: Tensor, y: Tensor, gamma: float, aae_only: bool) -> Tensor:
    """The paper's DER: hinge on ‖[ΔE(x), ΔE(x,y)]‖₂, ΔE natural minus adversarial; single-step AT averages it
    over the abnormal adversarial examples (ΔE(x) < ΔE(x,y), i.e. the attack lowered the loss)."""
    nat, adv = logits_nat.float(), logits_adv.float()
    d_x = adv.logsumexp(1) - nat.logsumexp(1)
    d_xy = adv.gather(1, y[:, None])[:, 0] - nat.gather(1, y[:, None])[:, 0]
    per = (torch.stack((d_x, d_xy), 1).norm(dim=1) - gamma).clamp_min(0)
    if not aae_only:
        return per.mean()
    aae = d_x < d_xy
    return (per * aae).sum() / aae.sum().clamp_min(1)


def _uniform(x: Tensor, gen: torch.Generator) -> Tensor:
    return 2 * torch.rand(x.shape, generator=gen, device=x.device) - 1


def _grad(model: nn.Module, x: Tensor, delta: Tensor, y: Tensor, keep: bool = False) -> tuple[Tensor, Tensor]:
    """(logits at x + δ, ∇_δ CE) for a leaf δ; `keep` keeps the logits' graph for the training loss."""
    delta.requires_grad_(True)
    logits = model(x + delta)
    (grad,) = torch.autograd.grad(F.cross_entropy(logits, y), delta, retain_graph=keep)
    return logits, grad


def ref_standard(model, x, y, gen, cfg: TrainCfg, der: DerCfg | None) -> Tensor:
    return F.cross_entropy(model(x), y)


def ref_fgsm(model, x, y, gen, cfg: TrainCfg, der: DerCfg | None, grad_out: list | None = None) -> Tensor:
    eps, alpha = cfg.eps, cfg.alpha or cfg.eps
    delta = torch.zeros_like(x)
    logits_nat, grad = _grad(model, x, delta, y, keep=der is not None)
    delta = (delta.detach() + alpha * grad.sign()).clamp(-eps, eps)
    logits_adv = model((x + delta).clamp(0, 1))
    loss = F.cross_entropy(logits_adv, y)
    if der is not None:
        loss = loss + der.lam * _der(logits_nat, logits_adv, y, der.gamma, aae_only=True)
    if grad_out is not None:
        grad_out.append(grad)
    return loss


def ref_rs_fgsm(model, x, y, gen, cfg: TrainCfg, der: DerCfg | None) -> Tensor:
    eps, alpha = cfg.eps, cfg.alpha or 1.25 * cfg.eps
    delta = (x + eps * _uniform(x, gen)).clamp(0, 1) - x
    _, grad = _grad(model, x, delta, y)
    delta = (delta.detach() + alpha * grad.sign()).clamp(-eps, eps)
    logits_adv = model((x + delta).clamp(0, 1))
    loss = F.cross_entropy(logits_adv, y)
    if der is not None:
        loss = loss + der.lam * _der(model(x), logits_adv, y, der.gamma, aae_only=True)
    return loss


def ref_n_fgsm(model, x, y, gen, cfg: TrainCfg, der: DerCfg | None) -> Tensor:
    eps, alpha = cfg.eps, cfg.alpha or cfg.eps
    delta = (x + 2 * eps * _uniform(x, gen)).clamp(0, 1) - x  # noise U(-2ε, 2ε), no projection afterwards
    _, grad = _grad(model, x, delta, y)
    logits_adv = model((x + delta.detach() + alpha * grad.sign()).clamp(0, 1))
    loss = F.cross_entropy(logits_adv, y)
    if der is not None:
        loss = loss + der.lam * _der(model(x), logits_adv, y, der.gamma, aae_only=True)
    return loss


def ref_gradalign(model, x, y, gen, cfg: TrainCfg, der: DerCfg | None) -> Tensor:
    grads: list[Tensor] = []
    loss = ref_fgsm(model, x, y, gen, cfg, der, grads)
    eta = cfg.eps * _uniform(x, gen)
    eta.requires_grad_(True)
    (grad2,) = torch.autograd.grad(F.cross_entropy(model(x + eta), y), eta, create_graph=True)
    g1, g2 = grads[0].flatten(1), grad2.flatten(1)
    n1, n2 = g1.norm(dim=1), g2.norm(dim=1)
    nonzero = (n1 != 0) & (n2 != 0)
    cos = ((g1 / n1[:, None]) * (g2 / n2[:, None])).sum(1)[nonzero]
    return loss + cfg.gradalign_weight() * (1 - cos.mean())


def ref_pgd(model, x, y, gen, cfg: TrainCfg, der: DerCfg | None) -> Tensor:
    eps, alpha = cfg.eps, cfg.alpha or 2.5 * cfg.eps / cfg.steps
    delta = (x + eps * _uniform(x, gen)).clamp(0, 1) - x
    for _ in range(cfg.steps):
        _, grad = _grad(model, x, delta, y)
        delta = (delta.detach() + alpha * grad.sign()).clamp(-eps, eps)
        delta = (x + delta).clamp(0, 1) - x
    logits_adv = model(x + delta)
    loss = F.cross_entropy(logits_adv, y)
    if der is not None:
        loss = loss + der.lam * _der(model(x), logits_adv, y, der.gamma, aae_only=False)
    return loss


def ref_trades(model, x, y, gen, cfg: TrainCfg, der: DerCfg | None) -> Tensor:
    eps, alpha = cfg.eps, cfg.alpha or 2.5 * cfg.eps / cfg.steps
    model.eval()
    with torch.no_grad():
        p_nat = F.softmax(model(x), dim=1)
    x_adv = (x + 0.001 * torch.randn(x.shape, generator=gen, device=x.device)).clamp(0, 1)
    for _ in range(cfg.steps):
        x_adv.requires_grad_(True)
        kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), p_nat, reduction="sum")
        (grad,) = torch.autograd.grad(kl, x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + alpha * grad.sign(), x - eps), x + eps).clamp(0, 1)
    model.train()
    logits_nat, logits_adv = model(x), model(x_adv)
    loss = F.cross_entropy(logits_nat, y) + cfg.trades_beta * F.kl_div(
        F.log_softmax(logits_adv, dim=1), F.softmax(logits_nat, dim=1), reduction="batchmean")
    if der is not None:
        loss = loss + der.lam * _der(logits_nat, logits_adv, y, der.gamma, aae_only=False)
    return loss


REFERENCES = {"standard": ref_standard, "fgsm": ref_fgsm, "rs-fgsm": ref_rs_fgsm, "n-fgsm": ref_n_fgsm,
              "gradalign": ref_gradalign, "pgd": ref_pgd, "trades": ref_trades}


@dataclass(frozen=True)
class Precision:
    """How a loop runs on its device: bf16 autocast and channels_last (ours on CUDA), or neither."""

    bf16: bool
    channels_last: bool

    @staticmethod
    def ours(device: torch.device) -> "Precision":
        on = device.type == "cuda"
        return Precision(on, on)


class Reference:
    """The reference loop of `run`'s method on `model` (moved to `device`, laid out as `precision` says)."""

    def __init__(self, model: nn.Module, run: RunCfg, device: torch.device, precision: Precision, use_der: bool):
        self.model, self.cfg, self.device, self.precision = model.to(device), run.train, device, precision
        if precision.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.der = run.der if use_der else None
        self.loss = REFERENCES[run.train.method]
        self.cycle = 1  # steps that repeat the same work
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=run.train.lr_max, momentum=run.train.momentum,
                                         weight_decay=run.train.weight_decay)

    def warmup_steps(self, requested: int) -> int:
        return requested

    def step(self, xb: Tensor, yb: Tensor, lr: float, gen: torch.Generator) -> None:
        x = xb.float().div(255)
        if self.precision.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision.bf16):
            loss = self.loss(self.model, x, yb, gen, self.cfg, self.der)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

# ------------------------------------------------------------------------------------------ measurement


class Ours:
    """`Trainer.step` driven as `fit` drives it: diagnostics on every `diag_every`-th batch (`training.diagnosed`); the
    diagnostic sums accumulate on the device and are read once per round (fit: once per epoch); on CUDA
    the step replays from CUDA graphs unless `cuda_graphs` is False (the `cuda_graphs` param's default: on)."""

    def __init__(self, model: nn.Module, run: RunCfg, device: torch.device, use_der: bool, cuda_graphs: bool = True):
        self.trainer = Trainer(model, run, device, cuda_graphs=cuda_graphs)
        m = self.trainer.method
        self.der_on = use_der and m.adversarial
        self.cfg, self.device = run.train, device
        self.cycle = max(1, run.train.diag_every)  # steps that repeat the same work: one diagnosed, the others not
        self.i = 0
        self.acc: dict[str, Tensor | int] = {}

    def warmup_steps(self, requested: int) -> int:
        """Untimed steps before a measurement: with CUDA graphs, whole cycles until every kind of step is captured."""
        graphs = self.trainer.graphs
        return requested if graphs is None else max(requested, self.cycle * (graphs.warmup + 1))

    def step(self, xb: Tensor, yb: Tensor, lr: float, gen: torch.Generator) -> None:
        for k, v in self.trainer.step(xb, yb, lr, self.der_on, diagnosed(self.cfg, self.i), gen).items():
            self.acc[k] = self.acc.get(k, 0) + v
        self.i += 1

    def read(self) -> list[float]:
        sums = torch.stack([torch.as_tensor(self.acc.get(k, 0), device=self.device, dtype=torch.float64)
                            for k in SUMS])
        self.acc = {}
        return sums.tolist()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(loop, xb: Tensor, yb: Tensor, gen: torch.Generator, steps: int) -> float:
    """Seconds for `steps` steps of `loop` (Ours or Reference), up to the device being idle again."""
    device = xb.device
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        loop.step(xb, yb, LR, gen)
    if isinstance(loop, Ours):
        loop.read()
    _sync(device)
    return time.perf_counter() - start


def calibrated_steps(loop, xb: Tensor, yb: Tensor, gen: torch.Generator, seconds: float, warmup: int) -> int:
    """After `warmup` untimed steps (allocations, cuDNN's algorithm search), how many whole cycles of `loop`'s
    steps last about `seconds`, judged from one timed cycle."""
    timed_steps(loop, xb, yb, gen, loop.warmup_steps(warmup))
    per_step = timed_steps(loop, xb, yb, gen, loop.cycle) / loop.cycle
    return loop.cycle * max(1, round(seconds / (per_step * loop.cycle)))


def throughput(loop, xb: Tensor, yb: Tensor, seconds: float, warmup: int = 3, seed: int = 0) -> float:
    """Images per second of one loop alone, timed for about `seconds` after `warmup` steps."""
    gen = torch.Generator(device=xb.device).manual_seed(seed)
    steps = calibrated_steps(loop, xb, yb, gen, seconds, warmup)
    return steps * xb.shape[0] / timed_steps(loop, xb, yb, gen, steps)


def compare(make_model, run: RunCfg, xb: Tensor, yb: Tensor, use_der: bool, *, rounds: int, round_seconds: float,
            warmup: int = 3, seed: int = 0) -> dict[str, float]:
    """Ours vs the reference loop of `run`'s method, each on its own copy of the same initial model, in
    interleaved rounds of whole `diag_every` cycles lasting about `round_seconds` per side.

    Returns img/s of both (total images / total seconds), the median of the per-round speed ratios (ours / the
    reference's), and the ratio of the two sides' fastest rounds: the one least disturbed by other processes."""
    device = xb.device
    model = make_model()
    ours = Ours(copy.deepcopy(model), run, device, use_der)
    ref = Reference(model, run, device, Precision.ours(device), use_der)
    gens = [torch.Generator(device=device).manual_seed(seed) for _ in range(2)]
    timed_steps(ref, xb, yb, gens[1], warmup)
    steps = calibrated_steps(ours, xb, yb, gens[0], round_seconds, warmup)
    times: list[list[float]] = [[], []]  # seconds per round: ours, reference
    for r in range(rounds):
        for side in (0, 1) if r % 2 == 0 else (1, 0):
            times[side].append(timed_steps((ours, ref)[side], xb, yb, gens[side], steps))
    images = rounds * steps * xb.shape[0]
    return {"img_per_s": images / sum(times[0]), "reference.img_per_s": images / sum(times[1]),
            "ratio_vs_reference": statistics.median(r / o for o, r in zip(*times)),
            "ratio_fastest_rounds": min(times[1]) / min(times[0]), "round_steps": steps}


def batch_for(geometry: tuple[int, int, int], batch: int, device: torch.device, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A random uint8 batch and labels of the given (channels, size, classes) geometry, on `device`."""
    channels, size, classes = geometry
    g = torch.Generator().manual_seed(seed)
    xb = torch.randint(0, 256, (batch, channels, size, size), generator=g, dtype=torch.uint8)
    return xb.to(device), torch.randint(0, classes, (batch,), generator=g).to(device)


def compare_all(make_model, run_for, xb: Tensor, yb: Tensor, methods, *, rounds: int, round_seconds: float,
                warmup: int = 3, prefix: str = "train") -> dict[str, float]:
    """`compare` for each method in `methods` (`run_for(method)` gives its RunCfg), without and with DER, as flat
    keys `<prefix>.<method>[.der].{img_per_s, reference.img_per_s, ratio_vs_reference, ratio_fastest_rounds}`."""
    out = {}
    for name in methods:
        for use_der in (False, True) if METHODS[name].adversarial else (False,):
            key = f"{prefix}.{name}{'.der' if use_der else ''}"
            result = compare(make_model, run_for(name), xb, yb, use_der, rounds=rounds, round_seconds=round_seconds,
                             warmup=warmup)
            out.update({f"{key}.{k}": v for k, v in result.items() if k != "round_steps"})
            log(f"bench {key}: {result['img_per_s']:.0f} img/s, reference {result['reference.img_per_s']:.0f}, "
                f"ratio {result['ratio_vs_reference']:.3f} (fastest rounds {result['ratio_fastest_rounds']:.3f}; "
                f"{rounds} rounds of {result['round_steps']} steps)")
    return out


def below_target(results: dict[str, float]) -> list[str]:
    return sorted(k.removesuffix(".ratio_vs_reference") for k, v in results.items()
                  if k.endswith(".ratio_vs_reference") and v < TARGET)


# ------------------------------------------------------------------------------------------ stage

ROUNDS, ROUND_SECONDS = 11, 0.5


def run(params: Params) -> None:
    device = setup(params)
    batch = params.train.batch_size
    channels, size, classes = GEOMETRY[params.data.dataset]
    meta = {**checkpoint.model_id(params.model), "num_classes": classes, "channels": channels, "size": size,
            "mean": [0.5] * channels, "std": [0.25] * channels}

    def make_model() -> nn.Module:
        torch.manual_seed(params.seed)
        return checkpoint.new_model(meta)

    def run_for(method: str) -> RunCfg:
        return RunCfg(f"bench-{method}", replace(params.train, method=method), params.der, params.model)

    xb, yb = batch_for((channels, size, classes), batch, device, params.seed)
    results = compare_all(make_model, run_for, xb, yb, list(METHODS), rounds=ROUNDS, round_seconds=ROUND_SECONDS)
    # AutoAttack only attacks points still classified correctly: time it on a trained robust model when one exists.
    ckpt = Path("models/base") / params.sample.run / "best.pt"
    if ckpt.is_file() and Path("data/prepared/meta.json").is_file():
        model, ck_meta = checkpoint.load(ckpt)
        test = load_prepared()[0]["test"]
        xa, ya, eps, aa_model = to_float(test.x[:100], device), test.y[:100].to(device), ck_meta["eps"], str(ckpt)
    else:
        model = make_model()
        xa, ya, eps = to_float(xb[:100], device), yb[:100], params.train.eps
        aa_model = "untrained (no checkpoint yet: run make repro)"
    results["autoattack.seconds_per_100"] = autoattack_seconds_per_100(model.to(device).eval(), xa, ya, eps)
    log(f"bench autoattack seconds/100 images: {results['autoattack.seconds_per_100']:.1f} ({aa_model})")
    missed = below_target(results)
    log(f"bench: below {TARGET}x the reference: {', '.join(missed) or 'none'}")
    write_json("metrics/bench.json", {
        **{k: round(v, 3 if "ratio" in k else 1) for k, v in results.items()},
        "below_target": missed,
        "config": {**checkpoint.model_id(params.model), "dataset": params.data.dataset, "batch_size": batch,
                   "eps": params.train.eps, "train_steps": params.train.steps, "diag_every": params.train.diag_every,
                   "der": {"lambda": params.der.lam, "gamma": params.der.gamma}, "rounds": ROUNDS,
                   "round_seconds": ROUND_SECONDS, "target_ratio": TARGET, "device": device.type,
                   "threads": torch.get_num_threads(), "torch": torch.__version__, "autoattack_model": aa_model,
                   "cpu": cpu_name()},
    })


