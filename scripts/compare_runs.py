"""Two runs of the default pipeline side by side, image by image: e.g. the same commit on two CPU models, where
floating-point kernels differ in their last bits and training takes another path (docs/results-default-run.md).

Each source is a folder laid out like the repository (metrics/eval/*.flags.json and *.json, metrics/train/*.json,
metrics/headline/run/gen.*.json) or `git:<revision>` for the files committed there. Per model and checkpoint, every
accuracy both runs have flags for is compared on the same test images: b − a with Newcombe's paired 95 % interval
and the exact McNemar p-value (reporting/tables.paired); the training summaries (best and CO epochs) and the generation
metrics (one model each, no interval) are listed beside them. Prints Markdown. Usage:

    python scripts/compare_runs.py A B [--labels "AMD EPYC" "Intel Xeon"]
"""
from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

from energyat.evaluation import stats
from energyat.reporting import flags
from energyat.reporting.tables import paired

METRICS = ("clean", "pgd50", "apgd", "aa", "pgd_apgd", "worst")


class Source:
    """Read-only JSON files of one run: a folder or a git revision."""

    def __init__(self, spec: str):
        self.rev = spec.removeprefix("git:") if spec.startswith("git:") else None
        self.root = None if self.rev else Path(spec)

    def names(self, folder: str, pattern: str) -> list[str]:
        if self.root is not None:
            return sorted(p.name for p in (self.root / folder).glob(pattern))
        out = subprocess.run(["git", "ls-tree", "--name-only", f"{self.rev}:{folder}"], check=True,
                             capture_output=True, text=True).stdout.split()
        return sorted(n for n in out if Path(n).match(pattern))

    def json(self, path: str) -> dict:
        if self.root is not None:
            return json.loads((self.root / path).read_text())
        return json.loads(subprocess.run(["git", "show", f"{self.rev}:{path}"], check=True, capture_output=True,
                                         text=True).stdout)


def pct(flags: list[bool]) -> str:
    k, n = sum(flags), len(flags)
    return stats.fmt_pct_interval(k / n, *stats.wilson(k, n))


def evaluation_rows(a: Source, b: Source) -> list[str]:
    rows = ["| Model | Checkpoint (epoch a / b) | Metric | n | a | b | b − a |", "|---|---|---|---:|---:|---:|---:|"]
    for name in sorted(set(a.names("metrics/eval", "*.flags.json")) & set(b.names("metrics/eval", "*.flags.json"))):
        fa, fb = a.json(f"metrics/eval/{name}"), b.json(f"metrics/eval/{name}")
        model = name.removesuffix(".flags.json")
        for ck in ("best", "last"):
            diffs = paired(fa, ck, fb, ck, list(METRICS))
            for metric, d in diffs.items():
                flags_a = flags.accuracy_vector(fa, ck, metric)
                flags_b = flags.accuracy_vector(fb, ck, metric)
                rows.append(f"| {model} | {ck} ({fa.get(f'{ck}.epoch')} / {fb.get(f'{ck}.epoch')}) | {metric} | "
                            f"{d['n']} | {pct(flags_a)} | {pct(flags_b)} | {stats.fmt_diff(d)} |")
    return rows


def training_rows(a: Source, b: Source) -> list[str]:
    rows = ["| Run | best epoch a / b | best val PGD a / b | CO epoch a / b |", "|---|---:|---:|---:|"]
    for name in sorted(set(a.names("metrics/train", "*.json")) & set(b.names("metrics/train", "*.json"))):
        ta, tb = a.json(f"metrics/train/{name}"), b.json(f"metrics/train/{name}")
        rows.append(f"| {name.removesuffix('.json')} | {ta['best_epoch']} / {tb['best_epoch']} | "
                    f"{ta['best_val_pgd_acc']:.3f} / {tb['best_val_pgd_acc']:.3f} | "
                    f"{ta['co_epoch'] or '–'} / {tb['co_epoch'] or '–'} |")
    return rows


def generation_rows(a: Source, b: Source) -> list[str]:
    rows = ["| Sampler · model | FID a / b | IS a / b | diversity a / b |", "|---|---:|---:|---:|"]
    folder = "metrics/headline/run"
    for name in sorted(set(a.names(folder, "gen.*.json")) & set(b.names(folder, "gen.*.json"))):
        ga, gb = a.json(f"{folder}/{name}"), b.json(f"{folder}/{name}")
        rows.append(f"| {name.removeprefix('gen.').removesuffix('.json')} | {ga['fid']:.4g} / {gb['fid']:.4g} | "
                    f"{ga['is']:.3f} / {gb['is']:.3f} | {ga['diversity']:.4f} / {gb['diversity']:.4f} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--labels", nargs=2, default=("a", "b"), metavar=("A", "B"))
    args = ap.parse_args()
    a, b = Source(args.a), Source(args.b)
    print(f"a = {args.labels[0]} (`{args.a}`), b = {args.labels[1]} (`{args.b}`)\n")
    print("**Evaluation** (accuracy % with Wilson 95 % interval; b − a in points on the same test images: Newcombe's "
          "paired 95 % interval, exact McNemar p)\n")
    print("\n".join(evaluation_rows(a, b)) + "\n")
    print("**Training** (validation split)\n")
    print("\n".join(training_rows(a, b)) + "\n")
    print("**Generation** (classifier-feature FID / IS, one model each: no interval)\n")
    print("\n".join(generation_rows(a, b)))


if __name__ == "__main__":
    main()
