"""`score` stage: IS, FID and diversity of every sampler's samples, base and DER.

Classifier-feature metrics (the `standard` model's features, against the training set) always; Inception
FID when `score.inception_fid` turns the Inception pass on (auto: under CUDA) and a weights file is at hand
(the TorchScript pool3 file of `make inception`, or torch-fidelity's own weights, which add Inception IS),
against the first `score.inception_reference` training images; else "not computed". Writes metrics/score.json
(flat keys gen.<sampler>.<variant>.<metric>), metrics/generation.md (the table),
plots/generation/sweep.tsv and plots/generation/quality_diversity.png (FID vs diversity across
SGLD step counts).
"""
from __future__ import annotations

import matplotlib
import torch

from ..errors import UserError
from ..evaluation import fidelity
from ..infra.artifacts import load_torch, save_figure, write_json, write_text
from ..infra.runtime import log, progress, setup
from ..params import VARIANTS, Params
from ..runstate import checkpoint
from ..runstate.outputs import samples_path
from ..science import data

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

STANDARD = "models/base/standard/best.pt"
NOT_COMPUTED = "not computed"


def load_samples(path: str, meta: dict) -> dict:
    obj = load_torch(path)
    shape = (meta["channels"], meta["size"], meta["size"])
    ok = (isinstance(obj, dict) and {"x", "y", "steps_used", "snapshots"} <= obj.keys()
          and obj["x"].dtype == torch.uint8 and tuple(obj["x"].shape[1:]) == shape)
    if not ok:
        raise UserError(f"{path}: not a samples file of {shape} uint8 images; rerun its `dvc repro sample@...` stage")
    return obj


def figure(rows: list[dict], real: dict):
    """FID (lower: closer to real images) against diversity, one line per sampler across step counts."""
    fig, axes = plt.subplots(1, len(VARIANTS), figsize=(5.2 * len(VARIANTS), 4.2), sharex=True, sharey=True)
    samplers = list(dict.fromkeys(r["sampler"] for r in rows))
    for ax, variant in zip(axes, VARIANTS):
        for i, sampler in enumerate(samplers):
            pts = sorted((r for r in rows if r["sampler"] == sampler and r["variant"] == variant), key=lambda r: r["steps"])
            ax.plot([p["diversity"] for p in pts], [p["fid"] for p in pts], "o-", color=f"C{i}", label=sampler)
            for p in pts:
                ax.annotate(str(p["steps"]), (p["diversity"], p["fid"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        ax.plot([real["diversity"]], [real["fid"]], "k*", markersize=11, label="real (val)")
        ax.set_title(f"{variant} model")
        ax.set_xlabel("diversity (mean within-class feature distance)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("FID, classifier features (lower is better)")
    axes[-1].legend(fontsize=8)
    fig.suptitle("quality vs diversity across SGLD step counts (numbers: steps)", fontsize=10)
    return fig


def inception_note(inception: tuple[str, object] | None, n_reference: int) -> str:
    """What the table's Inception columns are, in one sentence."""
    if inception is None:
        return ("Inception IS/FID: not computed (`score.inception_fid` is off, or no Inception file; "
                "`make inception`, then `-S score.inception_fid=true`).")
    if inception[0] == fidelity.INCEPTION:
        return f"Inception IS/FID: torch-fidelity's Inception-v3 weights, FID against {n_reference} training images."
    return (f"Inception FID: TF inception-2015-12-05 pool3 (TorchScript from {fidelity.INCEPTION_POOL3_WHEEL}), "
            f"against {n_reference} training images; Inception IS: not computed (that file has no logits).")


def table(metrics: dict, samplers: list[str], inception_text: str, standard_arch: str) -> str:
    cols = ["IS", "FID", "diversity", "mean steps", "Inception IS", "Inception FID"]
    lines = [
        "# Generation: IS, FID and diversity per model and sampler",
        "",
        f"IS/FID/diversity on the features of the `standard` {standard_arch} classifier (classifier-feature "
        "metrics, not comparable with Inception numbers in the literature), FID against the training set. "
        + inception_text,
        "",
        "| model | sampler | " + " | ".join(cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    def fmt(v) -> str:
        return v if isinstance(v, str) else f"{v:.4g}"

    for variant in VARIANTS:
        for sampler in samplers:
            k = f"gen.{sampler}.{variant}"
            vals = [metrics[f"{k}.{m}"] for m in ("is", "fid", "diversity", "steps", "inception_is", "inception_fid")]
            lines.append(f"| {variant} | {sampler} | " + " | ".join(fmt(v) for v in vals) + " |")
    real = [fmt(metrics[f"gen.real.{m}"]) for m in ("is", "fid", "diversity", "inception_is", "inception_fid")]
    lines.append("| real (val) | — | " + " | ".join(real[:3]) + " | — | " + " | ".join(real[3:]) + " |")
    return "\n".join(lines) + "\n"


def score_sets(sets: dict, measure, measure_inception, steps: int, metrics: dict) -> list[dict]:
    """Scores every sample set into `metrics` (`gen.<sampler>.<variant>.*`); returns the step sweep's rows (the
    final samples and every stored snapshot)."""
    rows = []
    for (sampler, variant), obj in progress(sets.items(), desc="score", total=len(sets)):
        k = f"gen.{sampler}.{variant}"
        final = measure(obj["x"], obj["y"])
        metrics.update({f"{k}.is": final["is"], f"{k}.fid": final["fid"], f"{k}.diversity": final["diversity"],
                        f"{k}.steps": float(obj["steps_used"].float().mean())})
        inception = measure_inception(obj["x"])
        metrics.update({f"{k}.{m}": v for m, v in inception.items()})
        rows.append({"sampler": sampler, "variant": variant, "steps": steps, **final})
        for t, snap in obj["snapshots"].items():
            if int(t) == steps:  # the final samples, already scored
                continue
            rows.append({"sampler": sampler, "variant": variant, "steps": int(t), **measure(snap, obj["y"])})
        log(f"score {sampler} {variant}: IS {final['is']:.3f} FID {final['fid']:.3f} "
            f"diversity {final['diversity']:.3f} steps {metrics[f'{k}.steps']:.1f}"
            + ("" if inception["inception_fid"] == NOT_COMPUTED else f" Inception FID {inception['inception_fid']:.2f}"))
    return rows


def write_outputs(metrics: dict, rows: list[dict], real: dict, table_text) -> None:
    """metrics/score.json, metrics/generation.md (`table_text` of the rounded metrics), the step sweep's TSV and its
    quality-diversity figure."""
    metrics = {k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()}
    write_json("metrics/score.json", metrics)
    write_text("metrics/generation.md", table_text(metrics))
    rows.sort(key=lambda r: (r["sampler"], r["variant"], r["steps"]))
    write_text("plots/generation/sweep.tsv", "sampler\tvariant\tsteps\tis\tfid\tdiversity\n" + "".join(
        f"{r['sampler']}\t{r['variant']}\t{r['steps']}\t{r['is']:.5g}\t{r['fid']:.5g}\t{r['diversity']:.5g}\n"
        for r in rows))
    fig = figure(rows, real)
    save_figure("plots/generation/quality_diversity.png", fig)
    plt.close(fig)


def run(params: Params) -> None:
    cfg = params.score
    samplers = list(params.sample.samplers)
    if not samplers:
        raise UserError("sample.samplers: empty; nothing to score")
    device = setup(params)
    splits, meta = data.load_prepared()
    standard = params.run("standard").model
    checkpoint.load(STANDARD, expect={**checkpoint.model_id(standard), "dataset": meta["dataset"], "method": "standard"})
    sets = {(s, v): load_samples(samples_path(s, v), meta) for s in samplers for v in VARIANTS}
    inception = fidelity.choose_inception(cfg, device.type)
    reference = splits["train"].x[:cfg.n_reference or None]
    inc_reference = splits["train"].x[:cfg.inception_reference or None]
    n = next(iter(sets.values()))["x"].shape[0]
    real = splits["val"]
    real_x, real_y = real.x[:n], real.y[:n]  # held-out real images, as many as a sample set: the floor at this n
    log(f"score: {len(sets)} sample sets of {n} images against {reference.shape[0]} training images; Inception: "
        + (f"{inception[0]} from {inception[1]}, against {inc_reference.shape[0]} training images" if inception else
           f"{NOT_COMPUTED} (score.inception_fid={str(cfg.inception_fid).lower()} on {device.type})"))

    opts = dict(device=device, batch_size=cfg.batch_size, seed=params.seed)
    scorer = fidelity.Scorer(fidelity.CLASSIFIER, STANDARD, reference, **opts)
    inc_scorer = fidelity.Scorer(*inception, inc_reference, **opts) if inception else None
    pooled = fidelity.pooled_features(STANDARD, device)
    try:
        def measure(x: torch.Tensor, y: torch.Tensor) -> dict:
            feats = fidelity.features(pooled, x, batch_size=cfg.batch_size)
            return {**scorer.score(x), "diversity": fidelity.diversity(feats, y)}

        def measure_inception(x: torch.Tensor) -> dict:
            inc = inc_scorer.score(x) if inc_scorer else {}
            return {"inception_is": inc.get("is", NOT_COMPUTED), "inception_fid": inc.get("fid", NOT_COMPUTED)}

        real_m = measure(real_x, real_y)
        metrics = {f"gen.real.{m}": v for m, v in {**real_m, **measure_inception(real_x)}.items() if m != "is_std"}
        rows = score_sets(sets, measure, measure_inception, params.sample.steps, metrics)
    finally:
        scorer.close()
        if inc_scorer:
            inc_scorer.close()

    write_outputs(metrics, rows, real_m, table_text=lambda m: table(
        m, samplers, inception_note(inception, inc_reference.shape[0]), standard.arch))
