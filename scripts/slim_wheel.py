"""Drop members no import needs from a wheel, so that the GPU machine's 64 MiB a command carries holds the data too.

pyautoattack 0.2.0's wheel is 42 MB, nearly all of it `pyautoattack/examples/` (a test model and TF weights that
the package never imports); without them it is ~0.1 MB. The members matching a pattern are left out and their lines
removed from the wheel's RECORD; the rest is copied byte for byte. Standard library only.

    python3 scripts/slim_wheel.py .cache/gpu-wheels/pyautoattack-*.whl [--drop 'pyautoattack/examples/*']

Rewrites each wheel in place (atomically); a wheel with nothing to drop is left as it is.
"""
from __future__ import annotations

import argparse
import fnmatch
import os
import sys
import tempfile
import zipfile
from pathlib import Path

DEFAULT_DROP = ("*/examples/*",)


def slim(wheel: Path, patterns: tuple[str, ...] = DEFAULT_DROP) -> tuple[int, int]:
    """Members dropped and bytes saved."""
    with zipfile.ZipFile(wheel) as src:
        infos = src.infolist()
        drop = {i.filename for i in infos if any(fnmatch.fnmatch(i.filename, p) for p in patterns)}
        drop = {name for name in drop if not name.endswith(".dist-info/RECORD")}
        if not drop:
            return 0, 0
        fd, tmp = tempfile.mkstemp(prefix=f".{wheel.name}.", dir=wheel.parent)
        os.close(fd)
        try:
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
                for info in infos:
                    if info.filename in drop:
                        continue
                    data = src.read(info)
                    if info.filename.endswith(".dist-info/RECORD"):
                        lines = data.decode().splitlines(keepends=True)
                        data = "".join(ln for ln in lines if ln.split(",", 1)[0] not in drop).encode()
                    out.writestr(info, data)
            before = wheel.stat().st_size
            os.replace(tmp, wheel)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return len(drop), before - wheel.stat().st_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slim_wheel", description=__doc__.split("\n\n")[0])
    parser.add_argument("wheels", nargs="+", type=Path)
    parser.add_argument("--drop", action="append", default=None, help="a member pattern (default */examples/*)")
    ns = parser.parse_args(argv)
    for wheel in ns.wheels:
        if not zipfile.is_zipfile(wheel):
            print(f"slim_wheel: error: {wheel}: not a wheel", file=sys.stderr)
            return 2
        n, saved = slim(wheel, tuple(ns.drop or DEFAULT_DROP))
        print(f"slim_wheel: {wheel.name}: {n} members dropped, {saved / 1e6:.1f} MB saved")
    return 0


if __name__ == "__main__":
    sys.exit(main())
