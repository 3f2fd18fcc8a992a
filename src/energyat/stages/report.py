"""Stage `report`: metrics/summary.json and its headline rows (metrics/headline/run/), the CO / RO tables
(metrics/co_table.md, metrics/ro_table.md) and the training table (metrics/train_table.md), and
plots/report/histories.png (every run's per-epoch history, base and DER overlaid).

Reads metrics/eval/*.json (accuracies with Wilson intervals, and the per-example flags from which the paired
DER − base and best − last tests are computed), metrics/train/*.json and, when present, metrics/score.json
(generation metrics, merged as they are).
"""
from __future__ import annotations

from pathlib import Path

from ..infra.artifacts import read_json, read_tsv, save_figure, write_json, write_rows, write_text
from ..infra.runtime import log
from ..params import VARIANTS, Params
from ..reporting import headline, history_figures, tables

SCORE = Path("metrics/score.json")
ROWS = Path("metrics/headline/run")
EVAL = Path("metrics/eval")


def run(params: Params) -> None:
    methods = {r: params.run(r).train.method for r in params.run_names()}
    pairs = [(r, v) for r in methods for v in VARIANTS]
    evals = {(r, v): read_json(EVAL / f"{r}.{v}.json") for r, v in pairs}
    flags = {(r, v): read_json(EVAL / f"{r}.{v}.flags.json") for r, v in pairs}
    trains = {(r, v): read_json(Path("metrics/train") / f"{r}.{v}.json") for r, v in pairs}
    standard, standard_flags = read_json(EVAL / "standard.base.json"), read_json(EVAL / "standard.base.flags.json")
    score = read_json(SCORE) if SCORE.is_file() else None
    summary = tables.summary(methods, evals, trains, flags, standard, score, standard_flags)
    co, ro = tables.co_table(methods, evals, flags), tables.ro_table(methods, evals, flags)
    trains_all = {("standard", "base"): read_json("metrics/train/standard.base.json"), **trains}
    write_text("metrics/train_table.md", tables.training_table(methods, trains_all))
    write_text("metrics/co_table.md", co)
    write_text("metrics/ro_table.md", ro)
    write_json("metrics/summary.json", summary)
    write_rows(ROWS, headline.from_summary(summary))
    histories = {(r, v): read_tsv(f"plots/history/{r}.{v}.tsv") for r, v in [("standard", "base"), *pairs]}
    save_figure("plots/report/histories.png",
                history_figures.histories_figure(histories, {"standard": "standard", **methods}))
    log(f"report: {len(summary)} summary keys{' (with score.json)' if score else ''}\n\n{co}\n{ro}")
