"""Run a function on N CPU ranks (gloo) the way torchrun would: each rank sees RANK, WORLD_SIZE, LOCAL_RANK, ...

`run_ranks(fn, world, *args)` spawns `world` processes that call `fn(*args)` after setting torchrun's environment
variables (so `energyat.distributed.init` joins a gloo group), and returns every rank's return value in rank
order. `fn` must be importable (a module-level function). An exception in a rank fails the call with its text.
"""
from __future__ import annotations

import io
import os
import socket
import traceback

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args, queue) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    try:
        import energyat.infra.distributed as D

        D.init("cpu", timeout_s=120)
        out = fn(*args)
        # as bytes: tensors sent through the queue itself would live in this process's shared memory, gone
        # once it exits
        buf = io.BytesIO()
        torch.save(out, buf)
        queue.put((rank, True, buf.getvalue()))
    except BaseException:  # noqa: BLE001 - the parent reports it
        queue.put((rank, False, traceback.format_exc()))
    finally:
        import energyat.infra.distributed as D

        D.shutdown()


def run_ranks(fn, world: int, *args, timeout: float = 600):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in range(world):
            rank, ok, out = queue.get(timeout=timeout)
            if not ok:
                raise AssertionError(f"rank {rank} failed:\n{out}")
            results[rank] = torch.load(io.BytesIO(out), weights_only=True)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]
