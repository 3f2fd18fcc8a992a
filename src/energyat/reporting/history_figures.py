"""Per-epoch histories of every run, base and DER overlaid per quantity (the runs are the params', not fixed)."""
from __future__ import annotations

import math

from matplotlib.figure import Figure  # a bare Figure: no pyplot state, no GUI backend

from .tables import METHOD_NAMES

QUANTITIES = (("val_clean_acc", "validation clean accuracy"), ("val_pgd_acc", "validation PGD accuracy"),
              ("dE_x", "mean ΔE(x) (natural − adversarial)"), ("dE_xy", "mean ΔE(x, y)"),
              ("aae_frac", "abnormal adversarial examples (fraction)"))


def histories_figure(histories: dict[tuple[str, str], list[dict]], methods: dict[str, str]) -> Figure:
    """One row per run (in `methods`' order), one column per quantity; base solid, DER dashed."""
    runs = list(methods)
    fig = Figure(figsize=(3.2 * len(QUANTITIES), 2.5 * len(runs) + 0.4))
    axes = fig.subplots(len(runs), len(QUANTITIES), squeeze=False)
    for row, run in zip(axes, runs):
        for ax, (key, label) in zip(row, QUANTITIES):
            for variant, style in (("base", "-"), ("der", "--")):
                rows = histories.get((run, variant))
                if not rows:
                    continue
                points = [(r["epoch"], r[key]) for r in rows if not math.isnan(r[key])]
                if points:
                    ax.plot(*zip(*points), style, label=f"{variant}")
            if not ax.lines:  # the standard run has no adversarial quantities
                ax.set_visible(False)
                continue
            ax.set_title(f"{run} ({METHOD_NAMES.get(methods[run], methods[run])}): {label}", fontsize=8)
            ax.set_xlabel("epoch", fontsize=8)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
        row[0].legend(fontsize=7)
    fig.suptitle("Per-epoch histories, without (solid) and with DER (dashed)", fontsize=10)
    fig.tight_layout()
    return fig
