"""`class-energy` stage: Ē_y, the mean joint energy E(x, y) of the training images of each class, for the base and
DER models of `sample.run` — the target that energy-guided (adaptive) stopping compares each chain with.

Every `sample@*` stage reads it, instead of each measuring the same thing again (first `sample.n_energy` training
images per class). Writes data/class_energy.json.
"""
from __future__ import annotations

from ..infra.artifacts import write_json
from ..infra.runtime import log, setup
from ..params import VARIANTS, Params
from ..runstate.checkpoint import sampling_models
from ..runstate.outputs import CLASS_ENERGY
from ..science import data, sampling


def run(params: Params) -> None:
    cfg = params.sample
    device = setup(params)
    splits, meta = data.load_prepared()
    train, k = splits["train"], meta["num_classes"]
    models = sampling_models(params, meta, device)
    ref = data.first_per_class(train.y, k, cfg.n_energy)
    energies = {}
    for variant in VARIANTS:
        target = sampling.class_mean_energy(models[variant], train.x[ref], train.y[ref], k, cfg.batch_size, device)
        energies[variant] = [float(e) for e in target.cpu()]  # float32 values, exact as JSON floats
        log(f"class-energy: {cfg.run}/{variant}: mean E(x,y) per class "
            + " ".join(f"{e:.2f}" for e in energies[variant]))
    write_json(CLASS_ENERGY, {"run": cfg.run, "n_energy": cfg.n_energy, "num_classes": k, "images": len(ref),
                              "class_energy": energies})
