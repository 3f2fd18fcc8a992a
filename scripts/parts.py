"""Bring a file larger than one GPU-machine command may carry (the 87 MB Inception file) exactly, in parts.

A command of the GPU machine carries at most 64 MiB (the repository, the data and the paths it names); the machine
keeps what a command leaves outside the working tree (under /tmp) while it stays warm. So: split the file here into
parts that fit beside the rest (`split`), carry some parts in each command of a window, keep them on the machine as
they arrive (`stash`, every command), and once all are there join them and check the whole (`join`). Standard library
only: it runs with the machine's own python3, before any venv or wheel.

    python3 scripts/parts.py split FILE --size 30M --out DIR
        DIR/<name>.part1, .part2, ... (each at most --size) and DIR/<name>.manifest.json: the size, SHA-1 and SHA-256
        of every part and of the whole file
    python3 scripts/parts.py stash DIR [--to /tmp/energyat-parts]
        (far side) checks the parts (and manifests) this command carried in DIR against their manifest and keeps
        them in --to; a part that does not match is refused (exit 2), nothing else is touched
    python3 scripts/parts.py join MANIFEST --out DEST [--from DIR] [--sha1 HEX]
        (far side) joins the parts listed in MANIFEST, found in --from (default: the manifest's folder), checks every
        part and the whole against the manifest (and --sha1, where given) and only then moves it to DEST; a missing or
        corrupt part is refused with one line (exit 2) and DEST is left as it was

Exit status: 0 done, 2 refused (one line on stderr, `parts: error: ...`).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

FORMAT = "energyat-parts/1"
CHUNK = 1 << 20


class Refused(Exception):
    """A one-line reason to stop (missing or corrupt part, bad argument)."""


def _hashes(path: Path) -> dict:
    sha1, sha256, size = hashlib.sha1(), hashlib.sha256(), 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            sha1.update(chunk)
            sha256.update(chunk)
            size += len(chunk)
    return {"size": size, "sha1": sha1.hexdigest(), "sha256": sha256.hexdigest()}


def _size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)i?[bB]?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r}: a size such as 30M, 512K or 1000000")
    n = int(m[1]) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m[2].lower()]
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: at least one byte")
    return n


def _atomic_copy(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def split(file: Path, size: int, out: Path) -> dict:
    """Parts of `file` of at most `size` bytes in `out`, and the manifest beside them."""
    if not file.is_file():
        raise Refused(f"{file}: not a file")
    out.mkdir(parents=True, exist_ok=True)
    whole = _hashes(file)
    parts = []
    with open(file, "rb") as f:
        i = 0
        while True:
            data = f.read(size)
            if not data and i > 0:
                break
            i += 1
            part = out / f"{file.name}.part{i}"
            part.write_bytes(data)
            parts.append({"name": part.name, "size": len(data), "sha1": hashlib.sha1(data).hexdigest(),
                          "sha256": hashlib.sha256(data).hexdigest()})
            if len(data) < size:
                break
    manifest = {"format": FORMAT, "file": file.name, **whole, "part_size": size, "parts": parts}
    (out / f"{file.name}.manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise Refused(f"{path}: not a readable manifest ({type(exc).__name__})") from None
    if manifest.get("format") != FORMAT or not isinstance(manifest.get("parts"), list):
        raise Refused(f"{path}: not a {FORMAT} manifest")
    return manifest


def _check_part(path: Path, want: dict) -> None:
    got = _hashes(path)
    if got["size"] != want["size"] or got["sha256"] != want["sha256"] or got["sha1"] != want["sha1"]:
        raise Refused(f"{path}: {got['size']} bytes, SHA-256 {got['sha256'][:16]}…; the manifest says {want['size']} "
                      f"bytes, SHA-256 {want['sha256'][:16]}…: corrupt, carry it again")


def stash(folder: Path, to: Path) -> list[str]:
    """Check the parts carried in `folder` against their manifests and keep them (and the manifests) in `to`."""
    manifests = sorted(folder.glob("*.manifest.json"))
    if not manifests:
        raise Refused(f"{folder}: no *.manifest.json (carry the manifest with the parts)")
    kept = []
    for path in manifests:
        manifest = _manifest(path)
        for want in manifest["parts"]:
            part = folder / want["name"]
            if part.is_file():
                _check_part(part, want)
                _atomic_copy(part, to / want["name"])
                kept.append(want["name"])
        _atomic_copy(path, to / path.name)
        have = sum((to / p["name"]).is_file() for p in manifest["parts"])
        print(f"parts: {manifest['file']}: {have} of {len(manifest['parts'])} parts kept in {to}")
    return kept


def join(manifest_path: Path, dest: Path, source: Path | None = None, sha1: str = "") -> Path:
    """The whole file at `dest`, from the parts of `manifest_path`, every part and the whole checked first."""
    manifest = _manifest(manifest_path)
    source = source or manifest_path.parent
    if sha1 and sha1 != manifest["sha1"]:
        raise Refused(f"{manifest_path}: the manifest's file has SHA-1 {manifest['sha1']}, expected {sha1}")
    if dest.is_file() and _hashes(dest)["sha256"] == manifest["sha256"]:
        print(f"parts: {dest} already in place (SHA-1 {manifest['sha1']})")
        return dest
    missing = [p["name"] for p in manifest["parts"] if not (source / p["name"]).is_file()]
    if missing:
        n = len(manifest["parts"])
        raise Refused(f"{', '.join(missing)} missing under {source} ({n - len(missing)} of {n} parts there): carry "
                      "the rest in this window's next command")
    for want in manifest["parts"]:
        _check_part(source / want["name"], want)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            for want in manifest["parts"]:
                with open(source / want["name"], "rb") as f:
                    shutil.copyfileobj(f, out, CHUNK)
        got = _hashes(Path(tmp))
        if {k: got[k] for k in ("size", "sha1", "sha256")} != {k: manifest[k] for k in ("size", "sha1", "sha256")}:
            raise Refused(f"{dest.name}: the joined file has SHA-256 {got['sha256'][:16]}…, the manifest says "
                          f"{manifest['sha256'][:16]}…; not kept")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    print(f"parts: {dest} joined from {len(manifest['parts'])} parts and checked (SHA-1 {manifest['sha1']})")
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="parts", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("split", help="FILE -> parts of at most --size and a manifest, in --out")
    p.add_argument("file", type=Path)
    p.add_argument("--size", type=_size, required=True, help="largest part, e.g. 30M")
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("stash", help="keep the parts carried in DIR (checked) in --to")
    p.add_argument("folder", type=Path)
    p.add_argument("--to", type=Path, default=Path("/tmp/energyat-parts"))
    p = sub.add_parser("join", help="join and check the parts of MANIFEST into --out")
    p.add_argument("manifest", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--from", dest="source", type=Path, default=None)
    p.add_argument("--sha1", default="", help="the whole file's expected SHA-1 (beside the manifest's)")
    ns = parser.parse_args(argv)
    try:
        if ns.verb == "split":
            m = split(ns.file, ns.size, ns.out)
            print(f"parts: {ns.file} ({m['size']} bytes, SHA-1 {m['sha1']}) -> {len(m['parts'])} parts of at most "
                  f"{ns.size} bytes in {ns.out}")
        elif ns.verb == "stash":
            stash(ns.folder, ns.to)
        else:
            join(ns.manifest, ns.out, ns.source, ns.sha1)
    except Refused as exc:
        print(f"parts: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
