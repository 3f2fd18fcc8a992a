"""The paper-setting results page (docs/paper.md) from the committed block evidence (metrics/paper/).

`evidence` is what stages/paper_report.py reads: {block: {seed: {"block": block.json, "jobs": {"<run>.<variant>":
{"train": ..., "eval": ..., "flags": ..., "history": [row, ...]}}}}}. Everything here is a pure function of it: accuracies carry Wilson
intervals, DER − base differences on the same test images Newcombe's paired interval with the exact McNemar p
(Holm-adjusted over the page's comparisons), several seeds a t-interval of the mean; published anchors stand beside.
"""
from __future__ import annotations

from matplotlib.figure import Figure  # a bare Figure: no pyplot state, no GUI backend

from ..evaluation import stats
from ..reporting.tables import METHOD_NAMES
from . import paper_blocks

METRICS = (("clean", "Clean"), ("pgd50", "PGD-50-10"), ("aa", "AutoAttack"), ("worst", "Worst case"))
CHANCE = 0.1  # CIFAR-10: a model whose clean accuracy stays below twice this learned nothing (no CO to speak of)
PAPER = "Mirza et al., arXiv 2505.22486"
# Published numbers for the same setting (PreActResNet-18, CIFAR-10), by block and run; "" where none is known.
PUBLISHED = {
    ("co16-fgsm", "fgsm"): "collapses (Wong et al. 2020)",
    ("co16-rs-fgsm", "rs-fgsm"): "0.0 PGD-50-10: collapses (de Jorge et al. 2022)",
    ("co16-n-fgsm", "n-fgsm"): "~25.1 PGD-50-10 (de Jorge et al. 2022)",
    ("co16-gradalign", "gradalign"): "~26.2–28.9 PGD-50-10 (Andriushchenko & Flammarion 2020; de Jorge et al. 2022)",
    ("co8-fgsm", "fgsm"): "collapses (Wong et al. 2020)",
    ("co8-n-fgsm", "n-fgsm"): "~47.4–49.5 PGD-50-10, AA ~45.2 (de Jorge et al. 2022)",
    ("ro", "pgd"): "PGD-10 best 53.5 / last 45.6 (Rice et al. 2020, 200 epochs); AA best ~48.0 / last ~42.7",
}


def _flags(job: dict, metric: str) -> list[bool] | None:
    text = job.get("flags", {}).get(f"last.{metric}")
    return [c == "1" for c in text] if text else None


def accuracy_cell(job: dict, metric: str) -> str:
    """`76.4 [74.5, 78.2] (2000)` from the job's per-example flags of the final checkpoint."""
    f = _flags(job, metric)
    if f is None:
        return "–"
    lo, hi = stats.wilson(sum(f), len(f))
    return f"{stats.fmt_pct_interval(sum(f) / len(f), lo, hi)} ({len(f)})"


def at_chance(job: dict) -> bool:
    f = _flags(job, "clean")
    return f is not None and sum(f) / len(f) < 2 * CHANCE


def check_cell(job: dict) -> str:
    """The paired attack check on the AutoAttack images: PGD-missed / AutoAttack-missed counts, exact p."""
    ev = job.get("eval", {})
    if "last.check.pgd_missed" not in ev:
        return "–"
    return f"{ev['last.check.pgd_missed']} / {ev['last.check.apgd_missed']} (p {stats.fmt_p(ev['last.check.p'])})"


def co_cell(job: dict) -> str:
    train = job["train"]
    if at_chance(job):
        return "no: the model stays at chance (learned nothing)"
    if train.get("diverged"):
        return f"diverged (epoch {train['diverged_epoch']})"
    if not train.get("catastrophic_overfitting"):
        return "no"
    end = "at the end" if train.get("co_at_end") else "recovered by the end"
    return f"epoch {train['co_epoch']}, {end}"


def comparisons(evidence: dict) -> list[dict]:
    """Every DER − base difference on the same images (block, seed, run, metric), Holm-adjusted together."""
    rows = []
    for block, seeds in evidence.items():
        for seed, ev in seeds.items():
            for run in paper_blocks.BLOCKS[block].runs:
                base, der = ev["jobs"].get(f"{run}.base"), ev["jobs"].get(f"{run}.der")
                if not (base and der):
                    continue
                for metric, _ in METRICS:
                    a, b = _flags(base, metric), _flags(der, metric)
                    if a and b and len(a) == len(b):
                        rows.append({"block": block, "seed": seed, "run": run, "metric": metric,
                                     **stats.paired_difference(a, b)})
    for row, adjusted in zip(rows, stats.holm([r["p"] for r in rows])):
        row["p_holm"] = adjusted
    return rows


def _seed_mean(values: list[float]) -> str:
    t = stats.t_interval(values)
    if t["n"] < 2:
        return f"{100 * t['mean']:.1f}"
    return f"{100 * t['mean']:.1f} ± {100 * t['std']:.1f} [{100 * t['lo']:.1f}, {100 * t['hi']:.1f}]"


def block_section(block: str, seeds: dict, diffs: list[dict]) -> list[str]:
    spec = paper_blocks.BLOCKS[block]
    lines = [f"### `{block}`: {spec.about}", ""]
    lines += [f"![validation accuracy and AAEs per epoch](figures/paper/{block}.png)", "",
              "| Method | Seed | CO (validation PGD-10) | Best val PGD-10 (epoch) | Clean | PGD-50-10 | AutoAttack "
              "| Worst case | PGD / AA missed (p) | Published (%) |", "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for run, variant in spec.jobs():
        method = METHOD_NAMES.get(spec.runs[run]["method"], run)
        der = spec.runs[run].get("der", {})
        label = f"{method} + DER (λ {der.get('lambda', 1):g}, γ {der.get('gamma', 0):g})" if variant == "der" else method
        for seed, ev in sorted(seeds.items()):
            job = ev["jobs"].get(f"{run}.{variant}")
            if job is None:
                why = ev["block"].get("jobs", {}).get(f"{run}.{variant}", {}).get("why", "not run")
                lines.append(f"| {label} | {seed} | not run ({why}) | | | | | | | |")
                continue
            cells = [accuracy_cell(job, m) for m, _ in METRICS]
            best = f"{100 * job['train']['best_val_pgd_acc']:.1f} ({job['train']['best_epoch']})"
            lines.append(f"| {label} | {seed} | {co_cell(job)} | {best} | {' | '.join(cells)} | {check_cell(job)} | "
                         f"{PUBLISHED.get((block, run), '') if variant == 'base' else ''} |")
        if len(seeds) > 1:
            means = []
            for metric, _ in METRICS:
                vals = [sum(f) / len(f) for ev in seeds.values()
                        if (job := ev["jobs"].get(f"{run}.{variant}")) and (f := _flags(job, metric))]
                means.append(_seed_mean(vals) if vals else "–")
            lines.append(f"| {label} | mean ± sd [95 % t] | | | {' | '.join(means)} | | |")
    mine = [d for d in diffs if d["block"] == block]
    if mine:
        lines += ["", "DER − base on the same test images (percentage points, Newcombe's paired 95 % interval, "
                      "exact McNemar p, Holm-adjusted over every comparison on this page):", ""]
        lines += ["| Run | Seed | " + " | ".join(name for _, name in METRICS) + " |",
                  "|---|---|" + "---:|" * len(METRICS)]
        keyed = {(d["run"], d["seed"], d["metric"]): d for d in mine}
        for run, seed in sorted({(d["run"], d["seed"]) for d in mine}):
            cells = [stats.fmt_diff(keyed[(run, seed, m)]) if (run, seed, m) in keyed else "–" for m, _ in METRICS]
            lines.append(f"| {run} | {seed} | {' | '.join(cells)} |")
    return lines + [""]


def history_figure(block: str, seeds: dict) -> Figure:
    """Validation PGD-10 accuracy and the AAE fraction per epoch, base and DER overlaid, one line per job and seed."""
    fig = Figure(figsize=(10, 3.4))
    axes = fig.subplots(1, 2)
    spec = paper_blocks.BLOCKS[block]
    for seed, ev in sorted(seeds.items()):
        for run, variant in spec.jobs():
            job = ev["jobs"].get(f"{run}.{variant}")
            if job is None:
                continue
            epochs = [r["epoch"] for r in job["history"]]
            label = f"{METHOD_NAMES.get(spec.runs[run]['method'], run)}{' + DER' if variant == 'der' else ''} s{seed}"
            style = "-" if variant == "base" else "--"
            axes[0].plot(epochs, [100 * r["val_pgd_acc"] for r in job["history"]], style, label=label)
            axes[1].plot(epochs, [100 * r["aae_frac"] for r in job["history"]], style, label=label)
    for ax, what in zip(axes, ("validation PGD-10 accuracy (%)", "abnormal adversarial examples (% of batch)")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{block}: {spec.about}", fontsize=9)
    return fig


def co_verdict(evidence: dict) -> str:
    """Does DER prevent CO? Counted over every (block, seed) where a collapsing base run has its DER twin."""
    pairs = []
    for block, seeds in evidence.items():
        for seed, ev in seeds.items():
            for run in paper_blocks.BLOCKS[block].runs:
                base, der = ev["jobs"].get(f"{run}.base"), ev["jobs"].get(f"{run}.der")
                if base and der and block.startswith("co") and base["train"].get("co_at_end"):
                    pairs.append((block, seed, run, base["train"], der))
    if not pairs:
        return "unresolved: no collapsing base run has a DER twin yet"
    kept = [p for p in pairs if not p[4]["train"].get("co_at_end") and not at_chance(p[4])]
    detail = "; ".join(f"{b} {r} seed {s}: base CO epoch {t['co_epoch']}, DER " + _der_outcome(d)
                       for b, s, r, t, d in pairs)
    if not kept:
        verdict = "not supported"
    elif len(kept) == len(pairs):
        verdict = "supported"
    else:
        verdict = "mixed"
    return (f"{verdict}: DER's model is free of CO at the end of training in {len(kept)} of {len(pairs)} "
            f"collapsing base runs ({detail})")


def _der_outcome(job: dict) -> str:
    if at_chance(job):
        return "at chance (no CO, nothing learned)"
    if job["train"].get("catastrophic_overfitting"):
        return f"CO epoch {job['train']['co_epoch']}"
    return "no CO"


def lambda_verdict(evidence: dict) -> str:
    """FGSM + DER at 16/255 per weight λ, from the co16-lambda block and co16-fgsm's DER run (λ 1)."""
    found = {}
    for block in ("co16-lambda", "co16-fgsm"):
        for seed, ev in sorted(evidence.get(block, {}).items()):
            for run, spec in paper_blocks.BLOCKS[block].runs.items():
                if (job := ev["jobs"].get(f"{run}.der")) is not None:
                    found.setdefault(spec["der"]["lambda"], []).append((block, seed, job))
    if not found:
        return "unresolved: no FGSM + DER run yet"
    parts = []
    for lam, runs in sorted(found.items()):
        outcomes = ", ".join(f"{_der_outcome(job)}, PGD-50-10 {accuracy_cell(job, 'pgd50')} ({block} seed {seed})"
                             for block, seed, job in runs)
        parts.append(f"λ {lam:g}: {outcomes}")
    missing = sorted({spec["der"]["lambda"] for spec in paper_blocks.BLOCKS["co16-lambda"].runs.values()} - set(found))
    tail = f"; not run yet: λ {', '.join(f'{m:g}' for m in missing)}" if missing else ""
    return "; ".join(parts) + tail


def gpu_time(evidence: dict) -> list[str]:
    """Measured seconds of every job beside the cost model's expectation, and the cost of every block once."""
    lines = ["## GPU time", "",
             "Jobs without a code digest ran before the classifier's logits were computed in fp32 under bf16 autocast "
             "and before the per-image worst case and the paired attack check were added.", "",
             "| Block | Seed | Job | Device | Code | Train (s) | Evaluate (s) | Expected (s) | Note |",
             "|---|---|---|---|---|---:|---:|---:|---|"]
    for block, seeds in evidence.items():
        for seed, ev in sorted(seeds.items()):
            for job, rec in ev["block"].get("jobs", {}).items():
                if rec.get("status") == "done":
                    expected = paper_blocks.block_seconds(block, jobs=[job])
                    lines.append(f"| {block} | {seed} | {job} | {rec.get('device', ev['block'].get('device', ''))} | "
                                 f"{rec.get('code', '–')} | {rec['train_seconds']:.0f} | {rec['eval_seconds']:.0f} | "
                                 f"{expected:.0f} | {rec.get('note', '')} |")
    total = sum(paper_blocks.block_seconds(b) for b in paper_blocks.BLOCKS)
    lines += ["", f"Every block once (one seed), expected: ~{total / 60:.0f} min on one H200 "
                  "(`paper_blocks.block_seconds`, from the measured training throughput).", ""]
    return lines


def page(evidence: dict) -> str:
    diffs = comparisons(evidence)
    run_blocks = [b for b in paper_blocks.BLOCKS if b in evidence]
    lines = [
        "# The paper's setting: CIFAR-10, PreActResNet-18",
        "",
        f"Our measurements in the setting of {PAPER}, block by block (`python -m energyat block --help`), next to "
        "published numbers for the same setting. Generated by `python -m energyat paper-report` from the evidence "
        "under `metrics/paper/<block>/seed<N>/` (params, per-epoch histories, per-example flags, eval metrics); "
        "every number below can be recomputed from those files.",
        "",
        "**Data.** The runs read a JPEG copy of CIFAR-10 (quality ≈ 75, the original 50k/10k split, 1,000 training "
        "images held out for validation): its accuracies are close to, but not, CIFAR-10's. Published numbers are "
        "on the original images; compare them as anchors, not as equals.",
        "",
        "**Recipe.** PreActResNet-18, batch 128, random crop + flip, SGD (momentum 0.9, weight decay 5e-4); "
        "single-step runs: 30 epochs, cyclic LR to 0.2 (RS-FGSM α = 1.25ε with projection, N-FGSM noise 2ε, α = ε, "
        "no projection). bf16 autocast + CUDA graphs on one GPU. Final checkpoint: PGD-50 with 10 restarts on the "
        "first 2,000 test images, standard AutoAttack on the first 500 of them (fewer than the whole test set: one "
        "block must fit a short GPU window). Accuracies in %, Wilson 95 % intervals, the sample size in brackets. "
        "Worst case: an image counts as robust only if it survives both PGD-50-10 and AutoAttack (on the AutoAttack "
        "images). PGD / AA missed: the images PGD left standing that AutoAttack broke, and the reverse, with the "
        "exact one-sided binomial p of the first count; a small p says PGD alone overstates the model's robustness.",
        "",
        "## Claims",
        "",
        "| Claim of the paper | Verdict here |",
        "|---|---|",
        f"| DER prevents catastrophic overfitting of single-step AT | {co_verdict(evidence)} |",
        f"| (not published) DER's weight for single-step AT, FGSM at 16/255 | {lambda_verdict(evidence)} |",
        "| DER reduces robust overfitting of PGD-AT | " + ("see the `ro` block below" if "ro" in evidence
                                                        else "unresolved: the `ro` block has not run yet") + " |",
        "| Class-wise (local) PCA starts + energy-guided stopping improve generation | unresolved: no generation "
        "from a PreActResNet-18 yet (published anchors: JEM IS 8.76 / FID 38.4; WEAT IS 8.97 / FID 30.7, 10,000 "
        "samples) |",
        "",
        "## Blocks",
        "",
    ]
    for block in run_blocks:
        lines += block_section(block, evidence[block], diffs)
    lines += gpu_time(evidence)
    missing = [b for b in paper_blocks.BLOCKS if b not in evidence]
    if missing:
        lines += ["## Not run yet", ""]
        lines += [f"- `{b}` (~{paper_blocks.block_seconds(b) / 60:.0f} min on one H200): {paper_blocks.BLOCKS[b].about}"
                  for b in missing]
        lines += [""]
    return "\n".join(lines)
