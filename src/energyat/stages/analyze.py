"""Stage `analyze`: energies of natural vs adversarial test images per attack, and ΔE over training.

For the standard model and the best checkpoint of every run's base and DER models: the first
analyze.n_examples test images are attacked with PGD, APGD-CE, APGD-T, FAB-T, Square and CW-margin PGD at
the run's eps (the standard model at its resolved eps, the train.eps default); AutoAttack's attacks run on
the reduced `analyze.*` budget, not as standard AutoAttack. Writes metrics/analysis.json (flat keys
`<run>.<variant>.<attack>.dE_x.mean`, ...), plots/energy/hist_<run>_<variant>.png and, per adversarial run,
plots/energy/delta_energy_<run>.png from plots/history and metrics/train. Under torchrun each rank attacks whole
models when there are at least as many models as ranks, else the blocks of `analyze.batch_size` images are shared
among the ranks (the same numbers either way); rank 0 gathers, draws and writes.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from ..errors import UserError
from ..evaluation import analysis
from ..infra import distributed
from ..infra.artifacts import read_json, save_figure, write_json
from ..infra.runtime import log, setup
from ..params import Params, check_test_subset
from ..reporting.tables import family
from ..runstate import checkpoint
from ..science.data import load_prepared, to_float

PLOTS = Path("plots/energy")


def read_history(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise UserError(f"{path}: file not found (run the train stages first)")
    history = pd.read_csv(path, sep="\t")
    missing = {"epoch", "val_pgd_acc", "dE_x", "dE_xy", "der_on"} - set(history.columns)
    if missing:
        raise UserError(f"{path}: no column(s) {', '.join(sorted(missing))} (rerun the train stage that wrote it)")
    return history


def load_models(params: Params, data_meta: dict) -> dict[tuple[str, str], torch.nn.Module]:
    """The best checkpoint of every analysed (run, variant), each checked before any attack runs."""
    geometry = {k: data_meta[k] for k in ("dataset", "num_classes", "channels", "size")}
    models = {}
    for run_name, variant in params.analyzed_models():
        path = Path("models") / variant / run_name / "best.pt"
        expect = {**checkpoint.model_id(params.run(run_name).model), "run": run_name, "variant": variant, **geometry}
        models[run_name, variant] = checkpoint.load(path, expect)[0]
    return models


def analyze_model(model: torch.nn.Module, key: str, eps: float, x: torch.Tensor, y: torch.Tensor, params: Params,
                  num_classes: int) -> tuple[dict, dict]:
    """One model's energy summaries (`<key>.*` metrics) and per-image energies of every attack."""
    cfg = params.analyze
    log(f"analyze {key}: {x.shape[0]} test images, eps {eps:g}")
    logits_nat = analysis.logits_of(model, x, cfg.batch_size)
    out = {f"{key}.{k}": v for k, v in analysis.natural_summary(logits_nat, y).items()}
    records = {}
    for attack in analysis.ATTACKS:
        x_adv = analysis.adversarial_examples(model, x, y, attack, eps, cfg, params.seed, num_classes)
        logits_adv = analysis.logits_of(model, x_adv, cfg.batch_size)
        records[attack] = {k: v.cpu() for k, v in analysis.energies(logits_nat, logits_adv, y).items()}
        summary = analysis.attack_summary(records[attack])
        out.update({f"{key}.{attack}.{k}": v for k, v in summary.items()})
        log(f"analyze {key}: {attack} success {summary['success']:.3f}"
            + (f", mean dE(x) {summary['dE_x.mean']:+.3f} dE(x,y) {summary['dE_xy.mean']:+.3f}"
               if summary["n"] else ""))
    return out, records


def training_records(params: Params) -> dict[str, tuple[dict, dict]]:
    """Per run: the per-epoch histories and the train summaries of base and DER (read before any attack runs)."""
    variants = ("base", "der")
    return {r: ({v: read_history(Path("plots/history") / f"{r}.{v}.tsv") for v in variants},
                {v: read_json(Path("metrics/train") / f"{r}.{v}.json") for v in variants}) for r in params.run_names()}


def save_figures(params: Params, analyzed: dict, trained: dict[str, tuple[dict, dict]], n: int) -> None:
    """Energy histograms per analysed model, and ΔE over the epochs of every run (base and DER)."""
    for (run_name, variant), (_, records) in analyzed.items():
        eps = params.run(run_name).train.eps
        title = (f"{run_name} ({'+DER' if variant == 'der' else 'base'}, best checkpoint): energies of "
                 f"{n} natural test images vs successful adversarial examples, eps {eps:g}")
        fig = analysis.histogram_figure(records, title, params.analyze.bins)
        save_figure(PLOTS / f"hist_{run_name}_{variant}.png", fig)
    for run_name, (histories, summaries) in trained.items():
        fig = analysis.delta_energy_history_figure(run_name, family(params.run(run_name).train.method), histories,
                                                   summaries)
        save_figure(PLOTS / f"delta_energy_{run_name}.png", fig)


def run(params: Params) -> None:
    cfg = params.analyze
    device = setup(params)
    splits, data_meta = load_prepared()
    check_test_subset("analyze.n_examples", cfg.n_examples, data_meta["counts"])
    models, trained = load_models(params, data_meta), training_records(params)
    n = cfg.n_examples
    x, y = to_float(splits["test"].x[:n], device), splits["test"].y[:n].to(device)
    metrics = {"n_examples": n, "steps": cfg.steps, "aa_iter": cfg.aa_iter, "target_classes": cfg.target_classes,
               "square_queries": cfg.square_queries}
    # one model per rank when there are enough of them (distributed.map_units); the same numbers on 1 or N
    analyzed = distributed.map_units(
        lambda pair: analyze_model(models[pair].to(device).eval(), f"{pair[0]}.{pair[1]}",
                                   params.run(pair[0]).train.eps, x, y, params, data_meta["num_classes"]),
        list(models))
    if not distributed.context().main:  # every rank attacks; rank 0 alone draws and writes
        return
    for out, _ in analyzed.values():
        metrics.update(out)
    save_figures(params, analyzed, trained, n)
    write_json("metrics/analysis.json", metrics)
