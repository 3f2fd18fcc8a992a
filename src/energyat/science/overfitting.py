"""Catastrophic and robust overfitting, and divergence, read from a run's per-epoch history (plain numbers, no
tensors: the reporting layer uses the same window)."""
from __future__ import annotations

RO_WINDOW = 5  # epochs per mean of the smoothed robust-overfitting gap


def summarize(history: list[dict], num_classes: int, co_drop: float, adversarial: bool = True,
              window: int = RO_WINDOW, der: bool = False) -> dict:
    """Run-level metrics from the per-epoch history: final/best validation accuracies, CO, divergence, RO gap.
    A non-adversarial run (`adversarial=False`) is selected by clean accuracy and has no CO / RO verdict; a DER
    run's best epoch is chosen among its epochs with DER on (as its `best` checkpoint is).

    Catastrophic overfitting: validation PGD accuracy falls below both `co_drop` × its best so far and chance level,
    while clean accuracy stays above twice chance; a clean accuracy falling back near chance (below twice chance,
    after having been above it) is divergence, not CO. Robust overfitting: best − last validation PGD accuracy, and
    the same on means over `window` consecutive epochs (best window − last window), which epoch-to-epoch noise
    inflates far less than the single-epoch gap.
    """
    chance = 1.0 / num_classes
    co_epoch = diverged_epoch = None
    best_so_far = best_clean_so_far = -1.0
    for r in history:
        collapsed_clean = r["val_clean_acc"] < 2 * chance
        if collapsed_clean and diverged_epoch is None and best_clean_so_far >= 2 * chance:
            diverged_epoch = r["epoch"]
        best_clean_so_far = max(best_clean_so_far, r["val_clean_acc"])
        if (adversarial and co_epoch is None and not collapsed_clean and r["val_pgd_acc"] < chance
                and r["val_pgd_acc"] < co_drop * best_so_far):
            co_epoch = r["epoch"]
        best_so_far = max(best_so_far, r["val_pgd_acc"])
    key = "val_pgd_acc" if adversarial else "val_clean_acc"
    best = max((r for r in history if not der or r["der_on"]), key=lambda r: r[key])
    last = history[-1]
    pgd = [r["val_pgd_acc"] for r in history]
    w = min(window, len(pgd))
    means = [sum(pgd[i:i + w]) / w for i in range(len(pgd) - w + 1)]
    return {
        "epochs": len(history),
        "final_val_clean_acc": last["val_clean_acc"],
        "final_val_pgd_acc": last["val_pgd_acc"],
        "best_epoch": best["epoch"],
        "best_val_clean_acc": best["val_clean_acc"],
        "best_val_pgd_acc": best["val_pgd_acc"],
        "catastrophic_overfitting": co_epoch is not None,
        "co_epoch": co_epoch,
        "co_at_end": co_epoch is not None and last["val_pgd_acc"] < co_drop * best["val_pgd_acc"],
        "diverged": diverged_epoch is not None,
        "diverged_epoch": diverged_epoch,
        "robust_overfitting_gap": best["val_pgd_acc"] - last["val_pgd_acc"] if adversarial else float("nan"),
        "robust_overfitting_gap_smoothed": max(means) - means[-1] if adversarial else float("nan"),
        "final_dE_x": last["dE_x"],
        "final_dE_xy": last["dE_xy"],
        "final_aae_frac": last["aae_frac"],
        "max_aae_frac": max(r["aae_frac"] for r in history),
        "train_seconds": sum(r["seconds"] for r in history),
    }
