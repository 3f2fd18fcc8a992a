"""Stage `study-figures`: plots/studies/{co_sweep,seeds}.png and the studies' headline rows
(metrics/headline/studies/) from the committed study aggregates."""
from __future__ import annotations

from pathlib import Path

from .. import headline, study_figures
from ..artifacts import read_json, save_figure
from ..runtime import log
from . import headline as headline_files

OUT = Path("plots/studies")
ROWS = Path("metrics/headline/studies")


def run(_params) -> None:
    study, seeds = read_json("metrics/co_study.json"), read_json("metrics/seeds.json")
    save_figure(OUT / "co_sweep.png", study_figures.co_sweep_figure(study))
    save_figure(OUT / "seeds.png", study_figures.seeds_figure(seeds))
    headline_files.write(ROWS, headline.from_studies(study, seeds))
    log(f"study-figures: {OUT}/co_sweep.png, {OUT}/seeds.png, {ROWS}/")
