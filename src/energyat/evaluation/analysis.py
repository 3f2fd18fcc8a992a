"""Energies of natural vs adversarial examples, attack by attack, and the figures that show them.

The attacks are our PGD and CW-margin PGD (attacks.py) and AutoAttack's four attacks run one at a time
through pyautoattack's own classes, on a reduced budget (`analyze.*`: fewer target classes, iterations and
Square queries than the standard protocol; the evaluate stage is the one that runs standard AutoAttack).
Statistics describe the *successful* adversarial examples (images the model classified correctly and the
attack made it misclassify), paired with their natural images, so that a robust model's failed attacks
(which return the natural image) do not pile up at ΔE = 0. Images are attacked in fixed-size blocks, each
rank its own (torchrun), with per-block randomness, so the examples do not depend on the number of ranks.
Energies are computed in fp32 from the logits, whatever precision the network ran in.
"""
from __future__ import annotations

import numpy as np
import torch
from matplotlib.figure import Figure  # a bare Figure: no pyplot state, no GUI backend
from matplotlib.patches import Patch
from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted
from pyautoattack.fab_pt import FABAttack_PT
from pyautoattack.square import SquareAttack
from torch import Tensor, nn

from ..infra.distributed import block_seed
from ..science.attacks import Threat, default_alpha, pgd_attack
from ..science.energy import energy, joint_energy
from .robustness import over_blocks

ATTACKS = ("pgd", "apgd-ce", "apgd-t", "fab-t", "square", "cw")
LABELS = {"pgd": "PGD", "apgd-ce": "APGD-CE", "apgd-t": "APGD-T", "fab-t": "FAB-T", "square": "Square",
          "cw": "CW (margin PGD)"}
QUANTITIES = ("E_x", "E_xy", "dE_x", "dE_xy")


def _aa_attack(name: str, model: nn.Module, eps: float, cfg, seed: int, num_classes: int):
    """One of AutoAttack's attacks, with the analysis budget of `cfg` (AnalyzeCfg) instead of the standard one."""
    device = next(model.parameters()).device
    targets = min(cfg.target_classes, num_classes - 1)
    if name == "apgd-ce":
        return APGDAttack(model, n_iter=cfg.aa_iter, norm="Linf", n_restarts=1, eps=eps, seed=seed, loss="ce",
                          device=device)
    if name == "apgd-t":
        return APGDAttack_targeted(model, n_iter=cfg.aa_iter, norm="Linf", n_restarts=1, eps=eps, seed=seed,
                                   n_target_classes=targets, device=device)
    if name == "fab-t":
        return FABAttack_PT(model, norm="Linf", n_restarts=1, n_iter=cfg.aa_iter, eps=eps, seed=seed,
                            targeted=True, n_target_classes=targets, device=device)
    # resc_schedule adapts Square's patch-size schedule to a query budget other than AutoAttack's 5000
    return SquareAttack(model, norm="Linf", n_queries=cfg.square_queries, eps=eps, p_init=0.8, n_restarts=1,
                        seed=seed, resc_schedule=True, device=device)


def adversarial_examples(model: nn.Module, x: Tensor, y: Tensor, attack: str, eps: float, cfg, seed: int,
                         num_classes: int) -> Tensor:
    """Adversarial versions of x under `attack` (one of ATTACKS), in blocks of cfg.batch_size shared among the
    ranks; every rank gets all of them. Our PGD/CW draw each block's random start from a generator seeded by
    (seed, attack, block); pyautoattack's attacks reseed themselves with `seed` on every block."""
    if model.training:
        raise ValueError("attack a model in eval mode: call model.eval() first")
    if attack not in ATTACKS:
        raise KeyError(f"attack {attack!r}; allowed: {', '.join(ATTACKS)}")
    if attack in ("pgd", "cw"):
        threat = Threat(eps=eps, alpha=default_alpha("pgd", eps, cfg.steps), steps=cfg.steps)

        def run(b: int, items: slice) -> Tensor:
            gen = torch.Generator(device=x.device).manual_seed(block_seed(seed, attack, 0, b))
            return pgd_attack(model, x[items], y[items], threat, loss="ce" if attack == "pgd" else "cw", generator=gen)
    else:
        adversary = _aa_attack(attack, model, eps, cfg, seed, num_classes)

        def run(b: int, items: slice) -> Tensor:
            return adversary.perturb(x[items], y[items]).detach()
    return over_blocks(run, len(y), cfg.batch_size, x[:0], desc=LABELS[attack])


@torch.no_grad()
def logits_of(model: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    return torch.cat([model(xb) for xb in x.split(batch_size)]).float()


def energies(logits_nat: Tensor, logits_adv: Tensor, y: Tensor) -> dict[str, Tensor]:
    """Per example: natural and adversarial E(x), E(x,y), ΔE = natural - adversarial, and attack success
    (the energy functions compute in fp32 whatever the logits' precision)."""
    e_nat, e_adv = energy(logits_nat), energy(logits_adv)
    j_nat, j_adv = joint_energy(logits_nat, y), joint_energy(logits_adv, y)
    correct = logits_nat.argmax(1) == y
    return {"E_x_nat": e_nat, "E_xy_nat": j_nat, "E_x": e_adv, "E_xy": j_adv,
            "dE_x": e_nat - e_adv, "dE_xy": j_nat - j_adv,
            "correct": correct, "success": correct & (logits_adv.argmax(1) != y)}


def _mean_std(v: Tensor) -> dict[str, float]:
    return {"mean": round(v.mean().item(), 4), "std": round(v.std(unbiased=False).item(), 4)}


def natural_summary(logits_nat: Tensor, y: Tensor) -> dict:
    """Flat statistics of the natural images: accuracy and E(x), E(x,y) over all of them."""
    out = {"clean_acc": round((logits_nat.argmax(1) == y).float().mean().item(), 4)}
    for name, v in (("E_x", energy(logits_nat)), ("E_xy", joint_energy(logits_nat, y))):
        out.update({f"nat.{name}.{k}": s for k, s in _mean_std(v).items()})
    return out


def attack_summary(record: dict[str, Tensor]) -> dict:
    """Flat statistics of one attack: success rate among correctly classified images, then E(x*), E(x*,y),
    ΔE(x), ΔE(x,y) over the successful adversarial examples (absent when there are none)."""
    ok = record["success"]
    out = {"n": int(ok.sum()), "success": round(ok.sum().item() / max(int(record["correct"].sum()), 1), 4)}
    if ok.any():
        for q in QUANTITIES:
            out.update({f"{q}.{k}": s for k, s in _mean_std(record[q][ok]).items()})
    return out


# ------------------------------------------------------------------------------------------- figures

NAT_COLOR, ADV_COLOR = "0.55", "tab:red"


def _shared_bins(values: list[Tensor], bins: int) -> np.ndarray:
    """Common bin edges for a row of panels, over the 0.5-99.5 % range so a few outliers don't squash it."""
    v = torch.cat([t.flatten() for t in values if t.numel()]).double()
    lo, hi = torch.quantile(v, 0.005).item(), torch.quantile(v, 0.995).item()
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, bins + 1)


def histogram_figure(records: dict[str, dict[str, Tensor]], title: str, bins: int):
    """Rows E(x) and E(x,y), one column per attack: all natural images (grey) vs the successful
    adversarial examples (red), as densities on shared bins per row."""
    fig = Figure(figsize=(2.7 * len(records), 5.0))
    axes = fig.subplots(2, len(records), squeeze=False)
    for row, (q, label) in enumerate((("E_x", "E(x)"), ("E_xy", "E(x, y)"))):
        edges = _shared_bins([r[f"{q}_nat"] for r in records.values()]
                             + [r[q][r["success"]] for r in records.values()], bins)
        for col, (attack, r) in enumerate(records.items()):
            ax = axes[row, col]
            nat, adv = r[f"{q}_nat"].cpu().numpy(), r[q][r["success"]].cpu().numpy()
            ax.hist(np.clip(nat, edges[0], edges[-1]), edges, density=True, color=NAT_COLOR, alpha=0.6,
                    label=f"natural ({len(nat)})")
            if len(adv):
                ax.hist(np.clip(adv, edges[0], edges[-1]), edges, density=True, color=ADV_COLOR, alpha=0.55,
                        label="adversarial")
            if row == 0:
                n_adv = int(r["success"].sum())
                rate = n_adv / max(int(r["correct"].sum()), 1)
                ax.set_title(f"{LABELS[attack]}\n{rate:.0%} success ({n_adv} adversarial)", fontsize=9)
            ax.set_xlabel(label, fontsize=8)
            ax.tick_params(labelsize=7)
            ax.set_yticks([])
    axes[0, 0].legend(fontsize=7, frameon=False, loc="upper left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def _onset(family: str, summary: dict) -> tuple[int | None, str]:
    """The epoch to mark: CO onset for single-step runs, the best epoch (after which RO sets in) otherwise."""
    if family == "co":
        epoch = summary.get("co_epoch")
        return epoch, f"CO onset (epoch {epoch})"
    epoch = summary.get("best_epoch")
    return epoch, f"best epoch {epoch} (RO after)"


def delta_energy_history_figure(run: str, family: str, histories: dict, summaries: dict):
    """Per variant (base, +DER): ΔE(x) and ΔE(x,y) of the training attack over epochs (left axis) against the
    validation PGD error (right axis), DER-active epochs shaded, CO/RO onset marked.

    `histories[variant]` maps the history TSV's columns to sequences; `summaries[variant]` is the run's
    metrics/train JSON."""
    variants = list(histories)
    fig = Figure(figsize=(5.6 * len(variants), 3.9))
    axes = fig.subplots(1, len(variants), squeeze=False, sharey=True)
    any_der = False
    for i, (ax, variant) in enumerate(zip(axes[0], variants)):
        h, s = histories[variant], summaries.get(variant, {})
        epoch = np.asarray(h["epoch"], dtype=float)
        for col, label, color in (("dE_x", "ΔE(x)", "tab:blue"), ("dE_xy", "ΔE(x, y)", "tab:orange")):
            ax.plot(epoch, np.asarray(h[col], dtype=float), marker=".", color=color, label=label)
        ax.axhline(0, color="0.7", lw=0.6)
        der_on = [e for e, on in zip(epoch, np.asarray(h["der_on"], dtype=float)) if on > 0]
        for e in der_on:
            ax.axvspan(e - 0.5, e + 0.5, color="tab:green", alpha=0.1, lw=0)
        ax.set_xlabel("epoch")
        ax2 = ax.twinx()
        ax2.plot(epoch, 1 - np.asarray(h["val_pgd_acc"], dtype=float), color="black", ls="--", lw=1.2,
                 label="val PGD error (right)")
        ax2.set_ylim(0, 1.02)
        if i == len(variants) - 1:
            ax2.set_ylabel("validation PGD error")
        onset, text = _onset(family, s)
        if onset is not None:
            ax.axvline(onset, color="tab:red", lw=1.2, ls=":")
            late = onset > (epoch.min() + epoch.max()) / 2  # write the label on the side with room
            ax.annotate(text, (onset, 1), xycoords=("data", "axes fraction"), xytext=(-3 if late else 3, -12),
                        textcoords="offset points", color="tab:red", fontsize=8, ha="right" if late else "left")
        name = "base" if variant == "base" else "+DER"
        ax.set_title(f"{run} ({s.get('method', '?')}, eps {s.get('eps', '?')}): {name}", fontsize=10)
        any_der = any_der or bool(der_on)
    handles = axes[0, 0].get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    if any_der:
        handles.append(Patch(color="tab:green", alpha=0.2, label="DER on"))
    # one legend below the panels, where it cannot hide a curve
    fig.legend(handles, [hd.get_label() for hd in handles], fontsize=8, frameon=False, loc="lower center",
               ncol=len(handles))
    axes[0, 0].set_ylabel("ΔE = E(nat) − E(adv)")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig
