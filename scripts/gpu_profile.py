"""Where a training step's time goes on one CUDA GPU: a diagnostic beside the GPU check, which measured PGD-10 of
PreActResNet-18 at the paper's batch of 128 barely faster in bf16 than in fp32, and DER costing 1.38x.

    PYTHONPATH=src python3 scripts/gpu_profile.py --out FILE                      on a CUDA GPU, ~4 min
    PYTHONPATH=src python3 scripts/gpu_profile.py --device cpu --tiny --out FILE  CPU dry run (numbers say nothing)

What it measures, on a synthetic CIFAR-sized batch (speed does not depend on the pixels):
- img/s of our PGD-10 step without and with DER, in bf16 + channels_last + CUDA graphs (ours on CUDA), the same
  without graphs (`bf16_eager`) and in fp32, at each batch size, and of the plain fp32 loop (PyTorch's default
  backend flags) beside them: a bf16 gain that grows with the batch says the small batch is bound by issuing
  kernels, not by arithmetic;
- three profiled steps of each (with and without graphs) at the first batch size: wall time per step vs the GPU
  kernels' time in it, the kernel count, and the kernels that took longest;
- the same steps with the network under `torch.compile`, while time is left (--compile-deadline).
After each measurement the JSON holds everything so far, so a run cut short keeps its figures.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import yaml
from torch.profiler import ProfilerActivity, profile

import energyat  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch loads)
from energyat import params as P
from energyat.commands import bench
from energyat.infra.artifacts import write_json
from energyat.infra.runtime import log, setup
from energyat.runstate import checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from gpu_check import fp32_training, torch_default_backends  # noqa: E402  (the same switches as the check)

GEOMETRY = {"dataset": "cifar10", "num_classes": 10, "channels": 3, "size": 32,
            "mean": [0.4914, 0.4822, 0.4465], "std": [0.2471, 0.2435, 0.2616]}


def pgd_run(preset: Path, device: str, tiny: bool) -> tuple[P.Params, P.RunCfg]:
    raw = yaml.safe_load(preset.read_text())
    raw.update(device=device, threads=8 if device == "cuda" else 2)
    if tiny:
        raw["model"] = {"arch": "small-cnn", "width": 8}
    params = P.parse(raw)
    run = params.run("pgd")
    return params, replace(run, der=replace(run.der, start_epoch=1))


def profiled(loop, xb, yb, steps: int) -> dict:
    """Host (issuing) and device (kernel) time of `steps` steps, and the five longest kernels."""
    gen = torch.Generator(device=xb.device).manual_seed(0)
    bench.timed_steps(loop, xb, yb, gen, 2)
    cuda = xb.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        bench.timed_steps(loop, xb, yb, gen, steps)
    wall = time.perf_counter() - start
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type.name == "CUDA"]  # the ops' own rows would count each kernel again
    top = sorted(kernels or events, key=lambda e: e.self_device_time_total if cuda else e.self_cpu_time_total,
                 reverse=True)[:5]
    return {"wall_ms_per_step": 1e3 * wall / steps,
            "gpu_kernel_ms_per_step": sum(e.self_device_time_total for e in kernels) / 1e3 / steps,
            "kernels_per_step": sum(e.count for e in kernels) / steps,
            "top": [f"{e.key[:60]}: {(e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e3 / steps:.2f} ms"
                    for e in top]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gpu-profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="dry-run sizes (a small CNN, small batches)")
    parser.add_argument("--preset", type=Path, default=Path("presets/paper.yaml"))
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="default: 128 512 (--tiny: 16 32)")
    parser.add_argument("--seconds", type=float, default=2.0, help="timed seconds per throughput figure")
    parser.add_argument("--compile-deadline", type=float, default=150.0,
                        help="start no torch.compile measurement after this many seconds of the run")
    return parser.parse_args(argv)


def throughputs(record, new_model, run: P.RunCfg, device: torch.device, batches: list[int], seconds: float) -> None:
    """img/s of our step (bf16 with and without CUDA graphs, fp32) without and with DER, and of the plain fp32
    loop, at each batch size."""
    for batch in batches:
        xb, yb = bench.batch_for((3, 32, 10), batch, device)
        for der in (False, True):
            name = f"pgd{'.der' if der else ''}.b{batch}"
            record(f"{name}.bf16", bench.throughput(bench.Ours(new_model(), run, device, der), xb, yb, seconds))
            record(f"{name}.bf16_eager", bench.throughput(bench.Ours(new_model(), run, device, der, cuda_graphs=False),
                                                          xb, yb, seconds))
            with fp32_training():
                record(f"{name}.fp32", bench.throughput(bench.Ours(new_model(), run, device, der), xb, yb, seconds))
        with torch_default_backends(device):
            plain = bench.Reference(new_model(), run, device, bench.Precision(False, False), False)
            record(f"pgd.plain_fp32.b{batch}", bench.throughput(plain, xb, yb, seconds))


def compiled(record, new_model, run: P.RunCfg, device: torch.device, xb, yb, seconds: float, begin: float,
             deadline: float) -> None:
    """Warm-up seconds and img/s of our step with the network under torch.compile, without and with DER, each
    started only before `deadline` seconds of the run."""
    for der in (False, True):
        if time.perf_counter() - begin > deadline:
            record("compile", f"not measured: past --compile-deadline {deadline:.0f} s")
            break
        loop = bench.Ours(new_model(), run, device, der)
        loop.trainer.model.compile()  # in place: the step's own references to the network stay valid
        start = time.perf_counter()
        bench.timed_steps(loop, xb, yb, torch.Generator(device=device).manual_seed(0), 3)
        record(f"compile.pgd{'.der' if der else ''}.b{len(xb)}.warmup_seconds", time.perf_counter() - start)
        record(f"compile.pgd{'.der' if der else ''}.b{len(xb)}.bf16", bench.throughput(loop, xb, yb, seconds))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    begin = time.perf_counter()
    params, run = pgd_run(args.preset, args.device, args.tiny)
    device = setup(params)
    batches = args.batches or ([16, 32] if args.tiny else [128, 512])
    seconds = 0.2 if args.tiny else args.seconds
    out: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 "torch": torch.__version__, "model": params.model.arch if not args.tiny else "small-cnn"}

    def new_model() -> torch.nn.Module:
        torch.manual_seed(0)
        return checkpoint.new_model(checkpoint.model_meta(run.model, GEOMETRY))

    def record(key: str, value) -> None:
        out[key] = value
        out["seconds"] = round(time.perf_counter() - begin, 1)
        write_json(args.out, out)
        log(f"gpu-profile {key}: {json.dumps(value) if not isinstance(value, float) else f'{value:.1f}'}")

    throughputs(record, new_model, run, device, batches, seconds)
    xb, yb = bench.batch_for((3, 32, 10), batches[0], device)
    for der in (False, True):
        for graphs in (True, False):
            record(f"profile.pgd{'.der' if der else ''}.b{batches[0]}.bf16{'' if graphs else '_eager'}",
                   profiled(bench.Ours(new_model(), run, device, der, cuda_graphs=graphs), xb, yb, 3))
    compiled(record, new_model, run, device, xb, yb, seconds, begin, args.compile_deadline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
