"""Figures and headline numbers of the studies, from their committed aggregates (metrics/co_study.json,
metrics/seeds.json)."""
from __future__ import annotations

from matplotlib.figure import Figure  # a bare Figure: no pyplot state, no GUI backend

from .report import METHOD_NAMES


def co_sweep_figure(study: dict) -> Figure:
    """Final PGD accuracy against ε per method, without (solid) and with DER (dashed): mean over seeds with its
    95 % t-interval, one panel per setting (dataset and schedule)."""
    settings = study["settings"]
    fig = Figure(figsize=(5.2 * len(settings), 3.8))
    axes = fig.subplots(1, len(settings), squeeze=False)[0]
    for ax, setting in zip(axes, settings):
        metric = setting["pgd"]
        lines: dict[tuple[str, str, str], list] = {}  # (run, variant, label) -> [(eps, stats)]
        for cell in setting["cells"]:
            s = (cell.get("stats") or {}).get(metric)
            if s and s.get("mean") is not None:
                lines.setdefault((cell["run"], cell["variant"], cell["label"]), []).append((cell["eps"], s))
        colour = {run: f"C{i}" for i, run in enumerate(sorted({run for run, _, _ in lines}))}
        cifar = "cifar" in setting["title"]  # ε in /255 for colour images, as the literature quotes it
        for (run, variant, label), points in sorted(lines.items()):
            points.sort(key=lambda p: p[0])
            eps = [255 * e if cifar else e for e, _ in points]
            mean = [100 * s["mean"] for _, s in points]
            err = [[100 * (s["mean"] - s["lo"]) if s.get("lo") is not None else 0 for _, s in points],
                   [100 * (s["hi"] - s["mean"]) if s.get("hi") is not None else 0 for _, s in points]]
            ax.errorbar(eps, mean, yerr=err, fmt="o-" if variant == "base" else "s--", capsize=3, label=label,
                        color=colour[run])
        ax.set_xlabel("ε (/255)" if cifar else "ε")
        ax.set_ylabel(f"final {metric.removesuffix('_acc').upper()} accuracy (%)")
        parts = setting["label"].split(", ")
        epochs = next((p.split("=")[1] for p in parts if p.startswith("train.epochs=")), "?")
        norm = " (DER normalised by the batch)" if 'der.aae_norm="batch"' in parts else ""
        data = "CIFAR-10 (JPEG copy)" if cifar else setting["title"].split(" ")[0]
        ax.set_title(f"{data}, {epochs} epochs{norm}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Catastrophic overfitting study: robustness against ε (mean over seeds, 95 % t-interval)",
                 fontsize=9)
    return fig


def seeds_figure(report: dict) -> Figure:
    """Robust-overfitting study: per seed and as mean with its 95 % t-interval, the best − last gap without and with
    DER and DER's gain on the last checkpoint (percentage points)."""
    rows = [(g["label"], run, ro) for g in report["groups"] for run, ro in (g.get("robust_overfitting") or {}).items()]
    fig = Figure(figsize=(6.5, 1.0 + 1.6 * max(1, len(rows))))
    axes = fig.subplots(max(1, len(rows)), 1, squeeze=False)[:, 0]
    for ax, (label, run, ro) in zip(axes, rows):
        quantities = [(f"best − last, {METHOD_NAMES.get(ro['method'], run)}", ro["gap"]["base"]),
                      ("best − last, + DER", ro["gap"]["der"]),
                      (f"DER gain, last {ro['pgd'].removesuffix('_acc').upper()}", ro["der_gain_last"][ro["pgd"]]),
                      ("DER gain, last clean", ro["der_gain_last"].get("clean_acc"))]
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
    return fig


def _short(setting: dict) -> str:
    parts = setting["label"].split(", ")
    data = "cifar10-jpeg" if "cifar" in setting["title"] else setting["title"].split(" ")[0]
    return data + ("-batch-norm-der" if 'der.aae_norm="batch"' in parts else "")


def headline(study: dict, report: dict) -> dict:
    """Flat keys for `dvc metrics show`: the CO study's mean final PGD accuracy per setting, ε, run and variant,
    and the RO study's best − last gaps and DER gain (mean and 95 % t-interval over seeds)."""
    out = {}
    for setting in study["settings"]:
        metric = setting["pgd"]
        for cell in setting["cells"]:
            s = (cell.get("stats") or {}).get(metric)
            if s and s.get("mean") is not None:
                eps = f"{255 * cell['eps']:.0f}/255" if "cifar" in setting["title"] else f"{cell['eps']:g}"
                out[f"co.{_short(setting)}.eps{eps}.{cell['run']}.{cell['variant']}.{metric}"] = round(s["mean"], 4)
    for g in report["groups"]:
        for run, ro in (g.get("robust_overfitting") or {}).items():
            for name, s in (("gap_base", ro["gap"]["base"]), ("gap_der", ro["gap"]["der"]),
                            ("der_gain_last", ro["der_gain_last"][ro["pgd"]])):
                for k in ("mean", "lo", "hi"):
                    if s.get(k) is not None:
                        out[f"ro.{run}.{name}.{k}"] = round(s[k], 4)
    return out
