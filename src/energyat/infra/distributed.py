"""Data parallelism through PyTorch's own engine (docs/design.md §7): `torch.distributed`, launched by torchrun.

One process is the special case world = 1: no process group, every helper below degenerates to the identity.
Under torchrun (or `python -m energyat --nproc N`, which starts torchrun's launcher itself) every rank runs the
same stage function; NCCL on CUDA, gloo on CPU. Work is split so that results do not depend on the number of
ranks: training shards each global batch, evaluation owns whole fixed-size blocks of the test set (so
per-example randomness is a function of the block, not of the rank), and rank 0 gathers and writes.
"""
from __future__ import annotations

import datetime
import hashlib
import os
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable, Hashable, TypeVar

import torch
import torch.distributed as dist

from ..errors import UserError


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1  # ranks on this machine (they share its CPU cores)
    outer_rank: int = 0  # inside `alone()`: the rank this process has in the process group

    @property
    def main(self) -> bool:
        """Rank 0: the only rank that writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


SINGLE = Context()
_context = SINGLE


def launched() -> bool:
    """Whether this process is a rank started by torchrun (its environment names the world)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(device_type: str, timeout_s: int = 1800) -> Context:
    """Join the process group torchrun set up (no-op for a single process) and return this rank's context.

    `device_type` picks the backend: NCCL for "cuda", gloo otherwise. A rank that dies makes torchrun end the
    others; the timeout bounds how long a collective waits for a peer that hangs instead of dying."""
    global _context
    if not launched() or int(os.environ["WORLD_SIZE"]) == 1:
        _context = SINGLE
        return _context
    world = int(os.environ["WORLD_SIZE"])
    ctx = Context(rank=int(os.environ["RANK"]), world=world, local_rank=int(os.environ["LOCAL_RANK"]),
                  local_world=int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(ctx.local_rank)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    _context = ctx
    return ctx


def context() -> Context:
    return _context


def shutdown() -> None:
    global _context
    if dist.is_initialized():
        dist.destroy_process_group()
    _context = SINGLE


def check_nproc(nproc: int, device_type: str, key: str = "distributed.nproc") -> None:
    """A params error before any work when `nproc` ranks (from `key`) cannot run on this machine."""
    if nproc < 1:
        raise UserError(f"{key}: {nproc!r} is not allowed; must be >= 1")
    if device_type == "cuda" and nproc > torch.cuda.device_count():
        raise UserError(f"{key}: {nproc} is not allowed; only {torch.cuda.device_count()} CUDA "
                        "device(s) are visible (one rank per GPU)")


def shard(n: int, ctx: Context | None = None) -> slice:
    """This rank's contiguous part of `n` items (balanced like `torch.tensor_split`; rank order = item order)."""
    ctx = ctx or _context
    base, extra = divmod(n, ctx.world)
    start = ctx.rank * base + min(ctx.rank, extra)
    return slice(start, start + base + (ctx.rank < extra))


def block_slices(n: int, block: int, boundary: int = 0) -> list[slice]:
    """The fixed-size blocks of `n` items in index order; with 0 < boundary < n, those of [0, boundary) and then
    those of [boundary, n), so that the blocks over the first `boundary` items are the ones a run on them alone
    cuts (AutoAttack continuing from APGD's blocks, robustness.autoattack_after_apgd)."""
    cuts = [0, boundary, n] if 0 < boundary < n else [0, n]
    return [slice(s, min(stop, s + block)) for start, stop in zip(cuts, cuts[1:]) for s in range(start, stop, block)]


def owned_blocks(n: int, block: int, ctx: Context | None = None, boundary: int = 0) -> list[tuple[int, slice]]:
    """(block index, item slice) of the blocks of `n` items (`block_slices`) that this rank processes.

    Blocks are cut from the global index the same way for any world size and handed out contiguously,
    so per-block randomness (seeded by the block index) gives the same result on 1 or N ranks, and
    concatenating the ranks' results in rank order restores the item order."""
    slices = block_slices(n, block, boundary)
    mine = shard(len(slices), ctx or _context)
    return [(b, slices[b]) for b in range(mine.start, mine.stop)]


def block_seed(seed: int, *parts) -> int:
    """A 63-bit seed for (seed, attack, restart, block, ...): the same in every process, rank and platform."""
    digest = hashlib.sha256("/".join(str(p) for p in (seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Elementwise sum over ranks (in place; the identity for one process)."""
    if _context.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `t` along dim 0 in rank order, on every rank (sizes may differ by rank)."""
    if not _context.distributed:
        return t
    if t.dtype == torch.bool:  # not every backend reduces bool tensors
        return gather_cat(t.to(torch.uint8)).bool()
    size = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(size) for _ in range(_context.world)]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.zeros_like(padded) for _ in range(_context.world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


def gather_objects(obj) -> list:
    """Every rank's picklable `obj`, in rank order, on every rank."""
    if not _context.distributed:
        return [obj]
    out = [None] * _context.world
    dist.all_gather_object(out, obj)
    return out


@contextmanager
def alone():
    """Run the body as a process of its own (world 1: every helper here is the identity), keeping this rank's
    share of the machine's threads; `log` speaks for it, progress bars stay with rank 0 (`outer_rank`)."""
    global _context
    saved = _context
    _context = replace(SINGLE, local_world=saved.local_world, outer_rank=saved.rank)
    try:
        yield
    finally:
        _context = saved


K = TypeVar("K", bound=Hashable)
R = TypeVar("R")


def map_units(fn: Callable[[K], R], units: list[K]) -> dict[K, R]:
    """{unit: fn(unit)} on every rank, in `units` order. With at least as many units (checkpoints, models) as
    ranks, each rank computes units rank, rank + world, ... alone (`alone()`: fn's blocks stay on its rank) and the
    results are gathered: whole attacks on small batches keep a core busier than blocks shared among ranks. With
    fewer units than ranks, every rank runs every unit and fn shares its blocks among them. A unit's result must
    not depend on who computes it (fn seeds by unit and block) and must be picklable with its tensors on the CPU."""
    if not _context.distributed or len(units) < _context.world:
        return {u: fn(u) for u in units}
    rank, world = _context.rank, _context.world
    with alone():
        mine = {i: fn(units[i]) for i in range(rank, len(units), world)}
    done = {i: r for part in gather_objects(mine) for i, r in part.items()}
    return {u: done[i] for i, u in enumerate(units)}


def barrier() -> None:
    if _context.distributed:
        dist.barrier()
