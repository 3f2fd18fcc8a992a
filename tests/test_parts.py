"""scripts/parts.py: a file larger than one GPU-machine command carries goes in parts and comes back together exactly,
or not at all (a missing or corrupt part is refused with one line); scripts/slim_wheel.py drops what no import needs
from a wheel."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parts(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts/parts.py"), *args], capture_output=True, text=True)


def test_split_stash_join_and_refusals(tmp_path):
    original = tmp_path / "weights.pt"
    original.write_bytes(bytes(range(256)) * 4096 + b"tail")  # 1 MiB + 4 bytes
    here, machine, stash = tmp_path / "here", tmp_path / "machine", tmp_path / "stash"
    r = parts("split", str(original), "--size", "400K", "--out", str(here))
    assert r.returncode == 0, r.stderr
    manifest = json.loads((here / "weights.pt.manifest.json").read_text())
    names = [p["name"] for p in manifest["parts"]]
    assert names == ["weights.pt.part1", "weights.pt.part2", "weights.pt.part3"]
    assert [p["size"] for p in manifest["parts"]] == [409600, 409600, 1048580 - 2 * 409600]
    assert manifest["sha1"] == hashlib.sha1(original.read_bytes()).hexdigest()
    assert manifest["sha256"] == hashlib.sha256(original.read_bytes()).hexdigest()
    # the first command carries the manifest and part 1: kept; the join waits for the rest, with one line
    machine.mkdir()
    for name in ("weights.pt.manifest.json", "weights.pt.part1"):
        (machine / name).write_bytes((here / name).read_bytes())
    assert parts("stash", str(machine), "--to", str(stash)).returncode == 0
    dest = tmp_path / "hub" / "weights.pt"
    r = parts("join", str(stash / "weights.pt.manifest.json"), "--out", str(dest))
    assert r.returncode == 2 and not dest.exists()
    assert r.stderr.strip().splitlines() == [f"parts: error: weights.pt.part2, weights.pt.part3 missing under {stash} "
                                             "(1 of 3 parts there): carry the rest in this window's next command"]
    # the second command carries parts 2 and 3, one of them damaged on the way: refused at the stash, not kept
    (machine / "weights.pt.part1").unlink()
    bad = bytearray((here / "weights.pt.part2").read_bytes())
    bad[1000] ^= 1
    (machine / "weights.pt.part2").write_bytes(bytes(bad))
    (machine / "weights.pt.part3").write_bytes((here / "weights.pt.part3").read_bytes())
    r = parts("stash", str(machine), "--to", str(stash))
    assert r.returncode == 2 and "weights.pt.part2" in r.stderr and "corrupt, carry it again" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (stash / "weights.pt.part2").exists()
    # a part damaged where it is kept is refused at the join, and nothing is written
    (stash / "weights.pt.part2").write_bytes(bytes(bad))
    (stash / "weights.pt.part3").write_bytes((here / "weights.pt.part3").read_bytes())
    r = parts("join", str(stash / "weights.pt.manifest.json"), "--out", str(dest))
    assert r.returncode == 2 and "corrupt" in r.stderr and not dest.exists()
    assert not list(dest.parent.glob(".weights.pt.*"))  # no temporary file left either
    # carried again, whole: joined, checked, in place; and a join again finds it in place
    (machine / "weights.pt.part2").write_bytes((here / "weights.pt.part2").read_bytes())
    assert parts("stash", str(machine), "--to", str(stash)).returncode == 0
    r = parts("join", str(stash / "weights.pt.manifest.json"), "--out", str(dest),
              "--sha1", manifest["sha1"])
    assert r.returncode == 0, r.stderr
    assert dest.read_bytes() == original.read_bytes()
    assert "already in place" in parts("join", str(stash / "weights.pt.manifest.json"), "--out", str(dest)).stdout
    # an expected SHA-1 other than the manifest's is refused before anything is read
    other = tmp_path / "other.pt"
    r = parts("join", str(stash / "weights.pt.manifest.json"), "--out", str(other), "--sha1", "0" * 40)
    assert r.returncode == 2 and "expected " + "0" * 40 in r.stderr and not other.exists()


def test_split_sizes_edge_cases(tmp_path):
    exact = tmp_path / "exact.bin"
    exact.write_bytes(b"x" * 2048)
    assert parts("split", str(exact), "--size", "1K", "--out", str(tmp_path / "p")).returncode == 0
    manifest = json.loads((tmp_path / "p/exact.bin.manifest.json").read_text())
    assert [p["size"] for p in manifest["parts"]] == [1024, 1024]  # no empty third part
    r = parts("split", str(exact), "--size", "lots", "--out", str(tmp_path / "q"))
    assert r.returncode == 2 and "a size such as 30M" in r.stderr


def test_slim_wheel_drops_the_examples_and_their_record_lines(tmp_path):
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    record = "pkg/__init__.py,sha256=x,1\npkg/examples/model.pt,sha256=y,9\npkg-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("pkg/__init__.py", "VALUE = 1\n")
        z.writestr("pkg/examples/model.pt", b"\0" * 100_000)
        z.writestr("pkg-1.0.dist-info/RECORD", record)
    r = subprocess.run([sys.executable, str(ROOT / "scripts/slim_wheel.py"), str(wheel)], capture_output=True,
                       text=True)
    assert r.returncode == 0 and "1 members dropped" in r.stdout
    with zipfile.ZipFile(wheel) as z:
        assert sorted(z.namelist()) == ["pkg-1.0.dist-info/RECORD", "pkg/__init__.py"]
        assert z.read("pkg/__init__.py") == b"VALUE = 1\n"
        assert "examples" not in z.read("pkg-1.0.dist-info/RECORD").decode()
