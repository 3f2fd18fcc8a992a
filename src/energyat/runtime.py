"""Device, threads, seeding and progress bars: the process-level settings every stage shares."""
from __future__ import annotations

import os
import random
import sys

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import UserError


def select_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("device: 'cuda' is not allowed here; no CUDA device is visible (use auto or cpu)")
        return torch.device("cuda")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup(params) -> torch.device:
    """Threads, seed and device for a stage; CPU runs are deterministic for the same params."""
    torch.set_num_threads(params.threads)
    seed_everything(params.seed)
    device = select_device(params.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def autocast(device: torch.device):
    """bf16 autocast on CUDA only: on the 2-core CPUs we measured it is slower than fp32."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def progress(iterable=None, **kwargs):
    """A tqdm bar with ETA, silent when stderr is not a terminal (DVC logs, CI) unless ENERGYAT_PROGRESS=1."""
    enabled = sys.stderr.isatty() or os.environ.get("ENERGYAT_PROGRESS") == "1"
    return tqdm(iterable, disable=not enabled, dynamic_ncols=True, leave=False, **kwargs)


def log(msg: str) -> None:
    """One line of stage progress on stderr (kept in DVC's output even without a TTY)."""
    print(msg, file=sys.stderr, flush=True)
