"""Stage `study-figures`: plots/studies/{co_sweep,seeds}.png and the headline metrics/studies.json from the
committed study aggregates."""
from __future__ import annotations

from pathlib import Path

from .. import study_figures
from ..artifacts import read_json, save_figure, write_json
from ..runtime import log

OUT = Path("plots/studies")


def run(_params) -> None:
    study, seeds = read_json("metrics/co_study.json"), read_json("metrics/seeds.json")
    save_figure(OUT / "co_sweep.png", study_figures.co_sweep_figure(study))
    save_figure(OUT / "seeds.png", study_figures.seeds_figure(seeds))
    write_json("metrics/studies.json", study_figures.headline(study, seeds))
    log(f"study-figures: {OUT}/co_sweep.png, {OUT}/seeds.png")
