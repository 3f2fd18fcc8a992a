"""Stage `study-figures`: plots/studies/{co_sweep,seeds}.png and the studies' headline rows
(metrics/headline/studies/) from the committed study aggregates."""
from __future__ import annotations

from pathlib import Path

from ..infra.artifacts import read_json, save_figure, write_rows
from ..infra.runtime import log
from ..reporting import headline
from ..studies import figures

OUT = Path("plots/studies")
ROWS = Path("metrics/headline/studies")


def run(_params) -> None:
    study, seeds = read_json("metrics/co_study.json"), read_json("metrics/seeds.json")
    save_figure(OUT / "co_sweep.png", figures.co_sweep_figure(study))
    save_figure(OUT / "seeds.png", figures.seeds_figure(seeds))
    write_rows(ROWS, headline.from_studies(study, seeds))
    log(f"study-figures: {OUT}/co_sweep.png, {OUT}/seeds.png, {ROWS}/")
