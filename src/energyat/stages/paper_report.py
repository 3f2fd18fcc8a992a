"""Stage `paper-report`: docs/paper.md and its headline rows (metrics/headline/paper/) from the block evidence
committed under metrics/paper/."""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..infra.artifacts import read_json, read_tsv, save_figure, write_rows, write_text
from ..infra.runtime import log
from ..reporting import headline
from ..studies import paper_blocks, paper_page

EVIDENCE = Path("metrics/paper")
PAGE, ROWS, FIGURES = Path("docs/paper.md"), Path("metrics/headline/paper"), Path("docs/figures/paper")
PARTS = {"train": "train.json", "eval": "eval.json", "flags": "flags.json"}


def read_evidence(root: Path = EVIDENCE) -> dict:
    """{block: {seed: {"block": block.json, "jobs": {job: {train, eval, flags, history}}}}} for every finished job; a
    generation block's evidence, once scored, under "generation" instead (its jobs have no evaluation)."""
    evidence = {}
    for record in sorted(root.glob("*/seed*/block.json")):
        block, seed = record.parent.parent.name, int(record.parent.name.removeprefix("seed"))
        if block not in paper_blocks.BLOCKS:
            raise UserError(f"{record}: unknown block {block!r}; known: {', '.join(paper_blocks.names())}")
        meta = read_json(record)
        if paper_blocks.BLOCKS[block].kind == "generation":
            generation = _generation(record.parent, block, meta)
            if generation:
                evidence.setdefault(block, {})[seed] = {"block": meta, "jobs": {}, "generation": generation}
            continue
        jobs = {job: {**{part: read_json(record.parent / f"{job}.{suffix}") for part, suffix in PARTS.items()},
                      "history": read_tsv(record.parent / f"{job}.history.tsv")}
                for job, status in meta.get("jobs", {}).items() if status.get("status") == "done"}
        if jobs:
            evidence.setdefault(block, {})[seed] = {"block": meta, "jobs": jobs}
    return evidence


def _generation(folder: Path, block: str, meta: dict) -> dict:
    """A generation block's scores, samplers' metrics and models' training summaries, once its `score` step is done."""
    spec = paper_blocks.BLOCKS[block]
    if meta.get("jobs", {}).get("score", {}).get("status") != "done":
        return {}
    return {"score": read_json(folder / "score.json"),
            "samples": {s: read_json(folder / f"sample.{s}.json") for s in spec.samplers},
            "train": {f"{r}.{v}": read_json(folder / f"{r}.{v}.train.json") for r, v in spec.jobs()}}


def run(_params) -> None:
    evidence = read_evidence()
    write_text(PAGE, paper_page.page(evidence) + "\n")
    for block, seeds in evidence.items():
        if paper_blocks.BLOCKS[block].kind != "robustness":
            continue
        save_figure(FIGURES / f"{block}.png", paper_page.history_figure(block, seeds))
    write_rows(ROWS, headline.from_paper(evidence))
    log(f"paper-report: {sum(len(s) for s in evidence.values())} block run(s) -> {PAGE}, {ROWS}/")
