"""Figures of the studies, from their committed aggregates (metrics/co_study.json,
metrics/seeds.json)."""
from __future__ import annotations

from matplotlib.figure import Figure  # a bare Figure: no pyplot state, no GUI backend

from ..reporting.tables import METHOD_NAMES
from .co_study import AGGREGATES_ONLY, same_setting


def _panels(settings: list[dict]) -> list[tuple[dict, list[tuple[dict, bool]]]]:
    """One panel per setting, (setting, [(cell, evidence kept)]): a setting kept as aggregates only joins the panel
    of the re-run setting it is (`co_study.same_setting`), so a re-run cell and the ε it was not re-run at share
    one curve."""
    fresh = [s for s in settings if s.get("evidence") != AGGREGATES_ONLY]
    kept = [s for s in settings if s.get("evidence") == AGGREGATES_ONLY]
    panels, joined = [], set()
    for f in fresh:
        cells = [(c, True) for c in f["cells"]]
        for i, s in enumerate(kept):
            if i not in joined and same_setting(s, f):
                joined.add(i)
                cells += [(c, False) for c in s["cells"]]
        panels.append((f, cells))
    return panels + [(s, [(c, False) for c in s["cells"]]) for i, s in enumerate(kept) if i not in joined]


def co_sweep_figure(study: dict) -> Figure:
    """Final PGD accuracy against ε per method, without (solid) and with DER (dashed): mean over seeds with its
    95 % t-interval, one panel per setting (dataset and schedule); hollow markers: cells kept as aggregates only."""
    panels = _panels(study["settings"])
    fig = Figure(figsize=(5.2 * len(panels), 3.8))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (setting, cells) in zip(axes, panels):
        metric = setting["pgd"]
        lines: dict[tuple[str, str, str], list] = {}  # (run, variant, label) -> [(eps, stats, evidence kept)]
        for cell, has_evidence in cells:
            s = (cell.get("stats") or {}).get(metric)
            if s and s.get("mean") is not None:
                key = (cell["run"], cell["variant"], cell["label"])
                lines.setdefault(key, []).append((cell["eps"], s, has_evidence))
        colour = {run: f"C{i}" for i, run in enumerate(sorted({run for run, _, _ in lines}))}
        cifar = "cifar" in setting["title"]  # ε in /255 for colour images, as the literature quotes it
        for (run, variant, label), points in sorted(lines.items()):
            points.sort(key=lambda p: p[0])
            eps = [255 * e if cifar else e for e, _, _ in points]
            mean = [100 * s["mean"] for _, s, _ in points]
            err = [[100 * (s["mean"] - s["lo"]) if s.get("lo") is not None else 0 for _, s, _ in points],
                   [100 * (s["hi"] - s["mean"]) if s.get("hi") is not None else 0 for _, s, _ in points]]
            marker = "o" if variant == "base" else "s"
            ax.errorbar(eps, mean, yerr=err, fmt=f"{marker}-" if variant == "base" else f"{marker}--", capsize=3,
                        label=label, color=colour[run])
            hollow = [(x, y) for x, y, (_, _, ok) in zip(eps, mean, points) if not ok]
            if hollow:
                ax.plot(*zip(*hollow), marker, color="white", markersize=3.5, linestyle="none")
        ax.set_xlabel("ε (/255)" if cifar else "ε")
        ax.set_ylabel(f"final {metric.removesuffix('_acc').upper()} accuracy (%)")
        parts = setting["label"].split(", ")
        epochs = next((f", {p.split('=')[1]} epochs" for p in parts if p.startswith("train.epochs=")), "")
        norm = " (DER normalised by the batch)" if 'der.aae_norm="batch"' in parts else ""
        data = "CIFAR-10 (JPEG copy)" if cifar else setting["title"].split(" ")[0]
        if all(ok for _, ok in cells):
            kept = ""
        elif any(ok for _, ok in cells):
            kept = "\n(hollow: aggregates only, evidence not kept)"
        else:
            kept = "\n(aggregates only: evidence not kept)"
        ax.set_title(f"{data}{epochs}{norm}{kept}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Catastrophic overfitting study: robustness against ε (mean over seeds, 95 % t-interval)",
                 fontsize=9)
    fig.subplots_adjust(top=0.8, wspace=0.3)  # room for the two-line panel titles under the figure title
    return fig


def seeds_figure(report: dict) -> Figure:
    """Robust-overfitting study, one row per multi-step run. Left: per seed and as mean with its 95 % t-interval,
    the best − last gap without and with DER and DER's gain on the last checkpoint (percentage points), for the
    strongest PGD, PGD + APGD and, where measured, AutoAttack and the per-image worst case. Right (where the
    histories were kept): validation PGD accuracy per epoch, mean over seeds with its 95 % t-interval, without and
    with DER."""
    rows = [(g["label"], run, ro) for g in report["groups"] for run, ro in (g.get("robust_overfitting") or {}).items()]
    fig = Figure(figsize=(13, 1.4 + 2.2 * max(1, len(rows))))
    axes = fig.subplots(max(1, len(rows)), 2, squeeze=False, gridspec_kw={"width_ratios": [1.2, 1]})
    for (ax, curve), (label, run, ro) in zip(axes, rows):
        pgd = ro["pgd"].removesuffix("_acc").upper()
        both = ro.get("gap_pgd_apgd", {})
        gain = ro["der_gain_last"]
        quantities = [(f"best − last {pgd}, {METHOD_NAMES.get(ro['method'], run)}", ro["gap"]["base"]),
                      (f"best − last {pgd}, + DER", ro["gap"]["der"]),
                      (f"best − last {pgd} + APGD, base", both.get("base")),
                      (f"best − last {pgd} + APGD, + DER", both.get("der")),
                      (f"DER gain, last {pgd}", gain[ro["pgd"]]),
                      (f"DER gain, last {pgd} + APGD", gain.get("pgd_apgd_acc")),
                      ("DER gain, last AutoAttack", gain.get("aa_acc")),
                      ("DER gain, last worst case", gain.get("worst_acc")),
                      ("DER gain, last clean", gain.get("clean_acc"))]
        quantities = [(name, s) for name, s in quantities if s]
        for y, (name, s) in enumerate(quantities):
            ax.plot([100 * v for v in s["values"]], [y] * len(s["values"]), "o", color="C0", alpha=0.6)
            if s.get("lo") is not None:
                ax.errorbar([100 * s["mean"]], [y], xerr=[[100 * (s["mean"] - s["lo"])], [100 * (s["hi"] - s["mean"])]],
                            fmt="D", color="C3", capsize=4)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_yticks(range(len(quantities)), [name for name, _ in quantities], fontsize=8)
        ax.set_xlabel("percentage points (dots: seeds; diamond: mean, 95 % t-interval)")
        ax.set_title(f"{run} ({len(ro['gap']['base']['values'])} seeds)", fontsize=9)
        ax.grid(alpha=0.3, axis="x")
        if "epochs" not in ro:
            curve.axis("off")
            curve.text(0.5, 0.5, "per-epoch histories not kept", ha="center", va="center", fontsize=8)
            continue
        for i, (variant, name) in enumerate((("base", METHOD_NAMES.get(ro["method"], run)), ("der", "+ DER"))):
            band = ro["epochs"][variant]["val_pgd_acc"]
            lo = [100 * v if v is not None else 100 * m for v, m in zip(band["lo"], band["mean"])]
            hi = [100 * v if v is not None else 100 * m for v, m in zip(band["hi"], band["mean"])]
            curve.plot(band["epoch"], [100 * m for m in band["mean"]], color=f"C{i}", label=name)
            curve.fill_between(band["epoch"], lo, hi, color=f"C{i}", alpha=0.25, lw=0)
        curve.set_xlabel("epoch")
        curve.set_ylabel("validation PGD accuracy (%)")
        curve.set_title("per epoch: mean over seeds, 95 % t-interval", fontsize=9)
        curve.grid(alpha=0.3)
        curve.legend(fontsize=8)
    return fig
