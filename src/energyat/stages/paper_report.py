"""Stage `paper-report`: docs/paper.md and metrics/paper.json from the block evidence committed under metrics/paper/."""
from __future__ import annotations

from pathlib import Path

from .. import paper_blocks, paper_report
from ..artifacts import read_json, read_tsv, save_figure, write_json, write_text
from ..errors import UserError
from ..runtime import log

EVIDENCE = Path("metrics/paper")
PAGE, SUMMARY, FIGURES = Path("docs/paper.md"), Path("metrics/paper.json"), Path("docs/figures/paper")
PARTS = {"train": "train.json", "eval": "eval.json", "flags": "flags.json"}


def read_evidence(root: Path = EVIDENCE) -> dict:
    """{block: {seed: {"block": block.json, "jobs": {job: {train, eval, flags}}}}} for every finished job."""
    evidence = {}
    for record in sorted(root.glob("*/seed*/block.json")):
        block, seed = record.parent.parent.name, int(record.parent.name.removeprefix("seed"))
        if block not in paper_blocks.BLOCKS:
            raise UserError(f"{record}: unknown block {block!r}; known: {', '.join(paper_blocks.names())}")
        meta = read_json(record)
        jobs = {job: {**{part: read_json(record.parent / f"{job}.{suffix}") for part, suffix in PARTS.items()},
                      "history": read_tsv(record.parent / f"{job}.history.tsv")}
                for job, status in meta.get("jobs", {}).items() if status.get("status") == "done"}
        if jobs:
            evidence.setdefault(block, {})[seed] = {"block": meta, "jobs": jobs}
    return evidence


def summary(evidence: dict) -> dict:
    """Flat headline keys for `dvc metrics show`: final accuracies per block, job and seed, and CO at the end."""
    out = {}
    for block, seeds in evidence.items():
        for seed, ev in seeds.items():
            for job, parts in ev["jobs"].items():
                key = f"{block}.{job}.seed{seed}"
                for metric, _ in paper_report.METRICS:
                    if f"last.{metric}_acc" in parts["eval"]:
                        out[f"{key}.{metric}_acc"] = parts["eval"][f"last.{metric}_acc"]
                out[f"{key}.co_at_end"] = bool(parts["train"].get("co_at_end"))
    return out


def run(_params) -> None:
    evidence = read_evidence()
    write_text(PAGE, paper_report.page(evidence) + "\n")
    for block, seeds in evidence.items():
        save_figure(FIGURES / f"{block}.png", paper_report.history_figure(block, seeds))
    write_json(SUMMARY, summary(evidence))
    log(f"paper-report: {sum(len(s) for s in evidence.values())} block run(s) -> {PAGE}, {SUMMARY}")
