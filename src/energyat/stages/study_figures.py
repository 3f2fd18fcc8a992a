"""Stage `study-figures`: plots/studies/{co_sweep,seeds}.png from the committed study aggregates."""
from __future__ import annotations

from pathlib import Path

from .. import study_figures
from ..artifacts import read_json, save_figure
from ..runtime import log

OUT = Path("plots/studies")


def run(_params) -> None:
    save_figure(OUT / "co_sweep.png", study_figures.co_sweep_figure(read_json("metrics/co_study.json")))
    save_figure(OUT / "seeds.png", study_figures.seeds_figure(read_json("metrics/seeds.json")))
    log(f"study-figures: {OUT}/co_sweep.png, {OUT}/seeds.png")
