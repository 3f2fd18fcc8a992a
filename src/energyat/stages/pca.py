"""`pca` stage: class-wise PCA of the training images, global (one fit per class) and local (k-NN of anchors).

Writes data/pca/{global,local}.pt (dicts of plain tensors) and metrics/pca.json.
"""
from __future__ import annotations

import torch

from ..infra.artifacts import save_torch, write_json
from ..infra.runtime import log, setup
from ..params import Params
from ..science import class_pca, data

OUT = "data/pca"
METRICS = "metrics/pca.json"


def bank(fits: list[dict], classes: torch.Tensor, **extra) -> dict:
    """The stored form of a set of fits: what sampling.PcaBank is rebuilt from."""
    return {"fits": fits, "classes": classes, **extra}


def run(params: Params) -> None:
    cfg = params.pca
    setup(params)
    splits, meta = data.load_prepared()
    train, val = splits["train"], splits["val"]
    k = meta["num_classes"]
    x = data.to_float(train.x).flatten(1)
    log(f"pca: {x.shape[0]} training images, {x.shape[1]} pixels, {k} classes, keep {cfg.variance:.0%} of the variance")
    global_fits = class_pca.classwise(x, train.y, k, cfg.variance)
    local_fits, local_classes, anchors = class_pca.local_classwise(
        x, train.y, k, cfg.variance, cfg.k, cfg.n_anchors, torch.Generator().manual_seed(params.seed))

    # held-out check: how much of each class's validation variance the global components keep
    x_val = data.to_float(val.x).flatten(1)
    metrics = {"pca.variance": cfg.variance, "pca.k": cfg.k, "pca.n_anchors": cfg.n_anchors}
    for c, fit in enumerate(global_fits):
        members = x_val[val.y == c]
        centred = members - fit["mean"]
        residual = centred - class_pca.encode(fit, members) @ fit["components"]
        metrics[f"pca.global.{c}.components"] = int(fit["components"].shape[0])
        metrics[f"pca.global.{c}.retained"] = round(float(fit["retained"]), 4)
        metrics[f"pca.global.{c}.val_retained"] = (
            round(1 - float(residual.square().sum() / centred.square().sum()), 4) if members.shape[0] > 1 else None)
    local_kept = torch.tensor([f["components"].shape[0] for f in local_fits], dtype=torch.float64)
    metrics["pca.local.components_mean"] = round(float(local_kept.mean()), 2)
    metrics["pca.local.retained_mean"] = round(float(torch.stack([f["retained"] for f in local_fits]).mean()), 4)
    metrics["pca.local.fits"] = len(local_fits)

    save_torch(f"{OUT}/global.pt", bank(global_fits, torch.arange(k)))
    save_torch(f"{OUT}/local.pt", bank(local_fits, local_classes, anchors=anchors))
    write_json(METRICS, metrics)
    log(f"pca: global components per class {[metrics[f'pca.global.{c}.components'] for c in range(k)]}, "
        f"local mean {metrics['pca.local.components_mean']} over {len(local_fits)} fits -> {OUT}/")
