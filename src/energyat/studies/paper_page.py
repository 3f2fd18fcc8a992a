"""The paper-setting results page (docs/paper.md) from the committed block evidence (metrics/paper/).

`evidence` is what stages/paper_report.py reads: {block: {seed: {"block": block.json, "jobs": {"<run>.<variant>":
{"train": ..., "eval": ..., "flags": ..., "history": [row, ...]}}}}}. Everything here is a pure function of it: accuracies carry Wilson
intervals, DER − base differences on the same test images Newcombe's paired interval with the exact McNemar p
(Holm-adjusted over the page's comparisons), several seeds a t-interval of the mean; published anchors stand beside.
"""
from __future__ import annotations

import math
from fractions import Fraction

from matplotlib.figure import Figure  # a bare Figure: no pyplot state, no GUI backend

from ..evaluation import stats
from ..reporting import flags as flagfile
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
    """The final checkpoint's per-example flags of `metric`; the worst case recomputed from the flags of the attacks
    it is taken over (`flags.worst_cases`), wherever they were kept."""
    return flagfile.accuracy_vector(job.get("flags"), "last", metric)


def accuracy_cell(job: dict, metric: str) -> str:
    """`76.4 [74.5, 78.2] (2000)` from the job's per-example flags of the final checkpoint."""
    f = _flags(job, metric)
    if f is None:
        return "–"
    lo, hi = stats.wilson(sum(f), len(f))
    return f"{stats.fmt_pct_interval(Fraction(sum(f), len(f)), lo, hi)} ({len(f)})"  # exact: stats.pct's rule


def at_chance(job: dict) -> bool:
    f = _flags(job, "clean")
    return f is not None and sum(f) / len(f) < 2 * CHANCE


def check_cell(job: dict) -> str:
    """The paired attack check on the AutoAttack images: PGD-missed / AutoAttack-missed counts, exact p; from the
    job's per-example flags (`flags.attack_check`), wherever they allow it."""
    check = flagfile.attack_check(job.get("flags"), "last")
    if check is None:
        return "–"
    return f"{check['pgd_missed']} / {check['apgd_missed']} (p {stats.fmt_p(check['p'])})"


def diverged_story(job: dict) -> str:
    """What a diverged run did (overfitting.summarize: its validation clean accuracy fell below twice chance after
    having been above it): how far it got first, and where it ended."""
    train = job["train"]
    text = (f"diverged in epoch {train['diverged_epoch']} after reaching validation clean "
            f"{100 * train['best_val_clean_acc']:.1f} % and PGD-10 {100 * train['best_val_pgd_acc']:.1f} % "
            f"(epoch {train['best_epoch']})")
    if at_chance(job):
        text += "; at chance at the end"
        last = (job.get("history") or [{}])[-1].get("train_loss")
        if last is not None and abs(last - math.log(1 / CHANCE)) < 0.01:
            text += f" (training loss {last:.3f} = ln {1 / CHANCE:.0f}: a constant output)"
    return text


def co_cell(job: dict) -> str:
    train = job["train"]
    if train.get("diverged"):  # before the at-chance test: a run that learned, then collapsed, did not "learn nothing"
        return f"no CO: {diverged_story(job)}"
    if at_chance(job):
        return "no: the model stays at chance (learned nothing)"
    if not train.get("catastrophic_overfitting"):
        return "no"
    end = "at the end" if train.get("co_at_end") else "recovered by the end"
    return f"epoch {train['co_epoch']}, {end}"


def comparisons(evidence: dict) -> list[dict]:
    """Every DER − base difference on the same images (block, seed, run, metric), Holm-adjusted together; the two
    jobs' flags paired by their test split's checksum (`flags.pair`: refused when they cover different images)."""
    rows = []
    for block, seeds in evidence.items():
        for seed, ev in seeds.items():
            for run in paper_blocks.BLOCKS[block].runs:
                base, der = ev["jobs"].get(f"{run}.base"), ev["jobs"].get(f"{run}.der")
                if not (base and der):
                    continue
                names = tuple(f"metrics/paper/{block}/seed{seed}/{run}.{v}.flags.json" for v in ("base", "der"))
                for metric, _ in METRICS:
                    if ab := flagfile.pair(base.get("flags"), "last", der.get("flags"), "last", metric, names):
                        rows.append({"block": block, "seed": seed, "run": run, "metric": metric,
                                     **stats.paired_difference(*ab)})
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
            cells = [stats.fmt_diff(_exact(keyed[(run, seed, m)])) if (run, seed, m) in keyed else "–"
                     for m, _ in METRICS]
            lines.append(f"| {run} | {seed} | {' | '.join(cells)} |")
    return lines + [""]


def _exact(d: dict) -> dict:
    """A paired difference with its point as the exact fraction of its counts (stats.pct's rounding rule)."""
    return {**d, "diff": Fraction(d["only_b"] - d["only_a"], d["n"])} if {"only_a", "only_b", "n"} <= d.keys() else d


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
    if job["train"].get("diverged"):
        return diverged_story(job)
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
             "Train and Evaluate: the job's seconds summed over the commands that ran it (a generation step's under "
             "Evaluate); Expected: the cost model's on the job's card (`paper_blocks.job_cost`); the note, where a "
             "job took more than one command, is the runner's own record.", "",
             "| Block | Seed | Job | Device | Code | Train (s) | Evaluate (s) | Expected (s) | Note |",
             "|---|---|---|---|---|---:|---:|---:|---|"]
    for block, seeds in evidence.items():
        for seed, ev in sorted(seeds.items()):
            for job, rec in ev["block"].get("jobs", {}).items():
                if rec.get("status") == "done" and job in paper_blocks.BLOCKS[block].job_names():
                    device = rec.get("device", ev["block"].get("device", ""))
                    gpu = paper_blocks.gpu_of(device)
                    expected = paper_blocks.block_seconds(block, jobs=[job], gpu=gpu)
                    lines.append(f"| {block} | {seed} | {job} | {device} | "
                                 f"{rec.get('code', '–')} | {rec['train_seconds']:.0f} | {rec['eval_seconds']:.0f} | "
                                 f"{expected:.0f} | {rec.get('note', '')} |")
    total = {g: sum(paper_blocks.block_seconds(b, gpu=g) for b in paper_blocks.BLOCKS) for g in ("h200", "h100")}
    lines += ["", f"Every block once (one seed), expected: ~{total['h200'] / 60:.0f} min of work on one H200, "
                  f"~{total['h100'] / 60:.0f} on one H100 (`paper_blocks.block_seconds`: measured on the H200, the "
                  "H100's factor assumed), each block within one window (`python -m energyat block --plan`; "
                  "docs/performance.md).", ""]
    return lines


def done_jobs(evidence: dict) -> dict[tuple[str, int], set[str]]:
    """{(block, seed): jobs with evidence}, as `paper_blocks.next_blocks` takes it."""
    done = {}
    for block, seeds in evidence.items():
        for seed, ev in seeds.items():
            jobs = set(ev["jobs"])
            if ev.get("generation"):
                jobs |= set(paper_blocks.BLOCKS[block].job_names())
            done[(block, seed)] = jobs
    return done


def queue_section(evidence: dict) -> list[str]:
    """What `block --next` runs next, in order, with each block's plan on one H100."""
    queue = paper_blocks.next_blocks(done_jobs(evidence))
    if not queue:
        return []
    lines = ["## Not run yet", "",
             "In the order `python -m energyat block --next` runs them (`paper_blocks.QUEUE`), each with its jobs "
             "still without evidence and the plan of a window on one H100 (minutes of work, commands):", ""]
    for name, seed in queue:
        exp = paper_blocks.experiment(name)
        have = done_jobs(evidence).get((exp, seed), set())
        left = [j for j in paper_blocks.window_jobs(name) if j not in have]
        p = paper_blocks.plan(name, "h100", done=tuple(have))
        lines.append(f"- `{name}` seed {seed}: {', '.join(left)} (~{p.seconds / 60:.1f} min, {len(p.commands)} "
                     f"command{'s' if len(p.commands) > 1 else ''}): {paper_blocks.BLOCKS[exp].about}")
    return lines + [""]


def generation_section(block: str, seeds: dict) -> list[str]:
    """The generation block: IS / FID / Inception FID per model and sampler, the sample grids."""
    spec = paper_blocks.BLOCKS[block]
    lines = [f"### `{block}`: {spec.about}", "",
             "Classifier-feature IS / FID: a `standard` PreActResNet-18's features (not comparable with published "
             "numbers); Inception FID: TF inception-2015-12-05 pool3, comparable with them; both against the 49,000 "
             "training images, one model each (no interval).", "",
             "| Model | Seed | Sampler | IS | FID | Inception FID | Diversity | Mean SGLD steps |",
             "|---|---|---|---:|---:|---:|---:|---:|"]

    def fmt(v) -> str:
        return v if isinstance(v, str) else f"{v:.4g}"

    for seed, ev in sorted(seeds.items()):
        score = ev["generation"]["score"]
        for variant in ("base", "der"):
            for sampler in spec.samplers:
                k = f"gen.{sampler}.{variant}"
                if f"{k}.fid" in score:
                    cells = [fmt(score[f"{k}.{m}"]) for m in ("is", "fid", "inception_fid", "diversity", "steps")]
                    lines.append(f"| {variant} | {seed} | {sampler} | {' | '.join(cells)} |")
        lines.append(f"| real (validation) | {seed} | – | {fmt(score['gen.real.is'])} | {fmt(score['gen.real.fid'])} | "
                     f"{fmt(score['gen.real.inception_fid'])} | {fmt(score['gen.real.diversity'])} | – |")
    for seed in sorted(seeds):
        lines += [""] + [f"![{s} {v} seed {seed}](../metrics/paper/{block}/seed{seed}/{s}.{v}.png)"
                         for s in spec.samplers for v in ("base", "der")]
    return lines + [""]


def generation_verdict(evidence: dict) -> str:
    """Does local class-wise PCA + energy-guided stopping give the best samples? Inception FID where computed."""
    anchors = "published anchors: JEM IS 8.76 / FID 38.4; WEAT IS 8.97 / FID 30.7, 10,000 samples"
    runs = [(b, seed, ev) for b, seeds in evidence.items() if paper_blocks.BLOCKS[b].kind == "generation"
            for seed, ev in sorted(seeds.items()) if ev.get("generation")]
    if not runs:
        return f"unresolved: no generation from a PreActResNet-18 yet ({anchors})"
    parts, wins, total = [], 0, 0
    for block, seed, ev in runs:
        score, samplers = ev["generation"]["score"], paper_blocks.BLOCKS[block].samplers
        for variant in ("base", "der"):
            metric = "inception_fid" if all(isinstance(score.get(f"gen.{s}.{variant}.inception_fid"), float)
                                            for s in samplers) else "fid"
            fids = {s: score[f"gen.{s}.{variant}.{metric}"] for s in samplers}
            best = min(fids, key=fids.get)
            total += 1
            wins += best == "pca-local-adaptive"
            parts.append(f"{variant} model: {'Inception ' if metric == 'inception_fid' else 'classifier-feature '}"
                         f"FID " + ", ".join(f"{s} {fids[s]:.2f}" for s in samplers) + f" (lowest: {best})")
    verdict = "supported" if wins == total else "not supported" if wins == 0 else "mixed"
    return (f"{verdict}: local PCA + energy-guided stopping has the lowest FID for {wins} of {total} models "
            f"(one seed, one model each, no interval): {'; '.join(parts)} ({anchors})")


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
        "block must fit a short GPU window); the `ro` block's best and last checkpoints alike. Accuracies in %, "
        "Wilson 95 % intervals, the sample size in brackets; a percentage of a count is rounded half away from zero "
        "on the exact fraction (471 of 2,000 = 23.55 % prints 23.6; `stats.pct`), the interval bounds as computed. "
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
        "| Class-wise (local) PCA starts + energy-guided stopping improve generation | "
        f"{generation_verdict(evidence)} |",
        "",
        "## Blocks",
        "",
    ]
    for block in run_blocks:
        if paper_blocks.BLOCKS[block].kind == "generation":
            lines += generation_section(block, evidence[block])
        else:
            lines += block_section(block, evidence[block], diffs)
    lines += gpu_time(evidence)
    lines += queue_section(evidence)
    return "\n".join(lines)
