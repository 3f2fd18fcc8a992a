"""scripts/compare_runs.py on two hand-made runs: the paired difference per model and checkpoint, the training and
generation rows, and the same run read from a git revision."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "compare_runs.py"


def write_run(root: Path, clean: str, pgd50: str, best_epoch: int, co_epoch, fid: float) -> None:
    flags = {"format": "energyat-flags/1", "run": "fgsm", "variant": "der", "test_sha256": "abc", "n": 10,
             "apgd_n": 10, "aa_n": 10, "worst_n": 10, "best.epoch": best_epoch, "last.epoch": 5,
             "best.clean": clean, "best.pgd50": pgd50, "last.clean": clean, "last.pgd50": pgd50}
    files = {"metrics/eval/fgsm.der.flags.json": flags,
             "metrics/train/fgsm.der.json": {"best_epoch": best_epoch, "best_val_pgd_acc": 0.15, "co_epoch": co_epoch},
             "metrics/headline/run/gen.pca-local.json": {"fid": fid, "is": 2.5, "diversity": 0.125}}
    for path, content in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(json.dumps(content))


def compare(cwd: Path, a: str, b: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, str(SCRIPT), a, b, "--labels", "EPYC", "Xeon"], cwd=cwd, env=env,
                          check=True, capture_output=True, text=True).stdout


def test_paired_rows_training_and_generation(tmp_path):
    # b gets images 8 and 9 right that a gets wrong (clean) and loses image 0 under PGD-50 (a 4/10, b 3/10)
    write_run(tmp_path / "a", "1111111100", "1111000000", best_epoch=1, co_epoch=2, fid=0.05)
    write_run(tmp_path / "b", "1111111111", "0111000000", best_epoch=5, co_epoch=None, fid=0.0625)
    out = compare(tmp_path, "a", "b")
    assert "a = EPYC (`a`), b = Xeon (`b`)" in out
    # Wilson intervals of 8/10 and 10/10; exact McNemar on 0 vs 2 discordant images: 2 * 0.5**2
    assert ("| fgsm.der | best (1 / 5) | clean | 10 | 80.0 [49.0, 94.3] | 100.0 [72.2, 100.0] | "
            "+20.0 [-11.2, +51.0], p = 0.500 |") in out
    pgd = next(r for r in out.splitlines() if r.startswith("| fgsm.der | last (5 / 5) | pgd50 |"))
    assert "-10.0 [" in pgd and "p = 1.000" in pgd
    assert "| fgsm.der | 1 / 5 | 0.150 / 0.150 | 2 / – |" in out
    assert "| pca-local | 0.05 / 0.0625 | 2.500 / 2.500 | 0.1250 / 0.1250 |" in out
    assert "apgd" not in out  # no flags for it on either side: no row


def test_git_revision_reads_the_committed_files(tmp_path):
    repo = tmp_path / "repo"
    write_run(repo, "1111111100", "1111000000", best_epoch=1, co_epoch=2, fid=0.05)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["git", "add", "."], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "run"], cwd=repo, check=True)
    write_run(repo, "1111111111", "1111000000", best_epoch=5, co_epoch=None, fid=0.0625)  # the working tree moves on
    out = compare(repo, "git:HEAD", ".")
    assert "| fgsm.der | best (1 / 5) | clean | 10 | 80.0 [" in out
    assert "| pca-local | 0.05 / 0.0625 |" in out
