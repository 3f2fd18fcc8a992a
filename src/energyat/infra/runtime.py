"""Device, threads, seeding and progress bars: the process-level settings every stage shares."""
from __future__ import annotations

import os
import platform
import random
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import UserError
from . import distributed


def device_type(name: str) -> str:
    """"cuda" or "cpu" for the `device` param (auto: CUDA when present)."""
    if name.startswith("cuda") or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError(f"device: {name!r} is not allowed here; no CUDA device is visible (use auto or cpu)")
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise UserError(f"device: {name!r} is not allowed; {torch.cuda.device_count()} CUDA device(s) visible")
        return "cuda"
    return "cpu"


def select_device(name: str) -> torch.device:
    """This rank's device: its own GPU (LOCAL_RANK) under torchrun on CUDA, the GPU `cuda:N` names, else the CPU."""
    if device_type(name) == "cpu":
        return torch.device("cpu")
    index = name.partition(":")[2]
    return torch.device("cuda", int(index) if index else distributed.context().local_rank)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup(params) -> torch.device:
    """Process group (under torchrun), threads, seed and device for a stage; CPU runs are deterministic for the
    same params. `threads` is the stage's total: ranks sharing a CPU split it."""
    ctx = distributed.init(device_type(params.device))
    torch.set_num_threads(max(1, params.threads // ctx.local_world))
    seed_everything(params.seed)
    device = select_device(params.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def autocast(device: torch.device, cache: bool = True):
    """bf16 autocast on CUDA only: on the 2-core CPUs we measured it is slower than fp32. `cache=False`: no cache
    of cast weights (training steps, eager or in a CUDA graph: train.loss_backward says why)."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda", cache_enabled=cache)


def progress(iterable=None, **kwargs):
    """A tqdm bar with ETA, silent when stderr is not a terminal (DVC logs, CI) unless ENERGYAT_PROGRESS=1."""
    ctx = distributed.context()
    enabled = ctx.main and ctx.outer_rank == 0 and (sys.stderr.isatty() or os.environ.get("ENERGYAT_PROGRESS") == "1")
    return tqdm(iterable, disable=not enabled, dynamic_ncols=True, leave=False, **kwargs)


def log(msg: str) -> None:
    """One line of stage progress on stderr (kept in DVC's output even without a TTY); rank 0 only."""
    if distributed.context().main:
        print(msg, file=sys.stderr, flush=True)


def cpu_name() -> str:
    """The CPU's model name (floating-point results are bit-identical only on the same model)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
