"""`prepare`: the dataset named in params -> data/prepared/{train,val,test}.pt + meta.json (with checksums)."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from ..infra import runtime
from ..infra.artifacts import sha256, write_json
from ..science import data


def run(params, out: str | Path = data.PREPARED) -> None:
    runtime.setup(params)
    start = time.perf_counter()
    splits, meta = data.prepare(params.data, params.seed)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # the whole folder is built beside its destination and renamed into place: all files or none
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the output is an ordinary folder
        meta["files"] = {}
        for name, split in splits.items():
            # same file name as the final one: torch.save embeds it, and the checksums must match
            torch.save({"x": split.x, "y": split.y}, tmp / f"{name}.pt")
            meta["files"][name] = sha256(tmp / f"{name}.pt")
        write_json(tmp / "meta.json", meta)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    counts = ", ".join(f"{k} {v}" for k, v in meta["counts"].items())
    runtime.log(f"prepare: {meta['dataset']} from {meta['source']}: {counts} "
                f"({meta['channels']}x{meta['size']}x{meta['size']}, {meta['num_classes']} classes) "
                f"-> {out} in {time.perf_counter() - start:.1f} s")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _replace_dir(new: Path, dest: Path) -> None:
    if not dest.exists():
        os.replace(new, dest)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old.", dir=dest.parent))
    os.replace(dest, old / dest.name)
    os.replace(new, dest)
    shutil.rmtree(old)
