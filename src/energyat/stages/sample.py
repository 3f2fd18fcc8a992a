"""`sample` stage: SGLD samples of one sampler from the `sample.run` model, without (base) and with DER.

Reads the two models, the PCA fits of data/pca (PCA samplers) and, for adaptive stopping, the mean class energies
Ē_y that the class-energy stage wrote to data/class_energy.json. Writes data/samples/<sampler>/{base,der}.pt (uint8
images, labels, steps used, step-sweep snapshots), plots/samples/<sampler>.{base,der}.png (classes × examples),
plots/sampling/<sampler>.{base,der}.tsv (per-step mean energy and fraction stopped) and
metrics/sample/<sampler>.json. Under torchrun every rank runs its own blocks of chains (`sampling.generate`), the
chains are gathered, and only rank 0 writes.
"""
from __future__ import annotations

import time

import torch
from matplotlib.figure import Figure  # a bare Figure: no pyplot state, no GUI backend

from ..errors import UserError
from ..infra import distributed
from ..infra.artifacts import load_torch, read_json, save_figure, save_torch, write_json, write_text
from ..infra.runtime import log, setup
from ..params import VARIANTS, Params
from ..runstate import checkpoint
from ..runstate.outputs import CLASS_ENERGY, samples_path
from ..science import data, sampling

GRID_COLUMNS = 10  # examples per class shown in the grid


def load_prior(needs: str | None, train: data.Split, meta: dict):
    """What the init draws from: nothing, the class Gaussians of the training images, or stored PCA fits."""
    if needs is None:
        return None
    if needs == "gaussian":
        return sampling.class_gaussians(data.to_float(train.x).flatten(1), train.y, meta["num_classes"])
    path = f"data/pca/{needs.removeprefix('pca-')}.pt"
    stored = load_torch(path)
    try:
        bank = sampling.PcaBank(list(stored["fits"]), stored["classes"])
        width = bank.fits[0]["mean"].numel()
    except (TypeError, KeyError, IndexError) as exc:
        raise UserError(f"{path}: not a PCA artifact ({type(exc).__name__}: {exc}); rerun `dvc repro pca`") from None
    pixels = meta["channels"] * meta["size"] ** 2
    if width != pixels or set(bank.classes.tolist()) != set(range(meta["num_classes"])):
        raise UserError(f"{path}: fitted on {width}-pixel images of classes {sorted(set(bank.classes.tolist()))}, "
                        f"the prepared data has {pixels} pixels and {meta['num_classes']} classes; rerun `dvc repro pca`")
    return bank


def load_class_energy(params: Params, num_classes: int) -> dict[str, list[float]]:
    """Ē_y per variant from the class-energy stage, checked to be of this run, `n_energy` and class count."""
    stored = read_json(CLASS_ENERGY)
    have = {key: stored.get(key) for key in ("run", "n_energy", "num_classes")} if isinstance(stored, dict) else {}
    want = {"run": params.sample.run, "n_energy": params.sample.n_energy, "num_classes": num_classes}
    energies = stored.get("class_energy") if have == want else None
    if not isinstance(energies, dict) or any(len(energies.get(v) or ()) != num_classes for v in VARIANTS):
        raise UserError(f"{CLASS_ENERGY}: made for {have or 'something else'}, not {want}; "
                        f"rerun `dvc repro class-energy`")
    return energies


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return (x * 255).round().clamp(0, 255).to(torch.uint8).cpu()


def tile_grid(tiles: torch.Tensor, cols: int, padding: int = 2, pad_value: float = 1.0) -> torch.Tensor:
    """(N, C, H, W) images in [0, 1] as one RGB (3, H', W') image, `cols` per row, `padding` pixels around each:
    the layout of torchvision's make_grid, without importing torchvision (~1.7 s per sample stage)."""
    n, c, h, w = tiles.shape
    rows = -(-n // cols)
    grid = torch.full((3, rows * (h + padding) + padding, cols * (w + padding) + padding), pad_value)
    for k, tile in enumerate(tiles.expand(n, 3, h, w) if c == 1 else tiles):
        top, left = (k // cols) * (h + padding) + padding, (k % cols) * (w + padding) + padding
        grid[:, top:top + h, left:left + w] = tile
    return grid


def grid_figure(x: torch.Tensor, y: torch.Tensor, class_names: list[str], title: str):
    """Rows = classes, columns = the first GRID_COLUMNS samples of each class."""
    rows = [x[y == c][:GRID_COLUMNS] for c in range(len(class_names))]
    cols = max(r.shape[0] for r in rows)
    blank = torch.zeros((cols, *x.shape[1:]), dtype=x.dtype)
    tiles = torch.cat([torch.cat([r, blank[:cols - r.shape[0]]]) for r in rows])
    grid = tile_grid(tiles.float() / 255, cols)
    fig = Figure(figsize=(1.0 + 0.6 * cols, 0.6 * len(rows) + 0.5))
    ax = fig.add_subplot()
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    side = x.shape[-1] + 2
    ax.set_yticks([2 + side * (i + 0.5) - 1 for i in range(len(rows))], class_names, fontsize=8)
    ax.set_xticks([])
    ax.set_title(title, fontsize=9)
    return fig


def run(params: Params, sampler: str) -> None:
    cfg = params.sample
    scfg = cfg.sampler(sampler)
    spec = sampling.INITS[scfg.init]
    device = setup(params)
    splits, meta = data.load_prepared()
    train, k = splits["train"], meta["num_classes"]
    shape = (meta["channels"], meta["size"], meta["size"])
    prior = load_prior(spec.needs, train, meta)
    models = checkpoint.sampling_models(params, meta, device)
    targets = load_class_energy(params, k)
    y = torch.arange(k, device=device).repeat_interleave(cfg.samples_per_class)
    metrics, key = {}, f"sample.{sampler}"
    for variant, model in models.items():
        start = time.perf_counter()
        target = torch.tensor(targets[variant], dtype=torch.float32, device=device)
        chains = sampling.generate(
            model, spec.draw, prior, y, shape, sigma_pca=cfg.sigma_pca, block_size=cfg.batch_size,
            seed=params.seed,  # the same for base and DER: the same starts and noise
            steps=cfg.steps, step_size=cfg.step_size, momentum=cfg.momentum, noise=cfg.noise,
            target=target, tau=cfg.tau if scfg.adaptive else None, snapshots=cfg.step_sweep)
        seconds = time.perf_counter() - start
        if not distributed.context().main:
            continue
        x8, y_cpu = to_uint8(chains.x), y.cpu()
        save_torch(samples_path(sampler, variant), {
            "x": x8, "y": y_cpu, "steps_used": chains.steps_used.cpu(), "class_energy": target.cpu(),
            "snapshots": {str(t): to_uint8(s) for t, s in chains.snapshots.items()},
        })
        energy, stopped = chains.energy.mean(1).cpu(), chains.stopped.float().mean(1).cpu()
        e_train = float(target[y].mean())
        write_text(f"plots/sampling/{sampler}.{variant}.tsv", "step\tenergy\tstopped\tenergy_train\n" + "".join(
            f"{t}\t{float(e):.5f}\t{float(s):.4f}\t{e_train:.5f}\n" for t, (e, s) in enumerate(zip(energy, stopped))))
        title = (f"{sampler} · {variant} {cfg.run} · {float(chains.steps_used.float().mean()):.1f} steps · "
                 f"E(x,y) {float(energy[-1]):.2f} (train {e_train:.2f})")
        fig = grid_figure(x8, y_cpu, meta["classes"], title)
        save_figure(f"plots/samples/{sampler}.{variant}.png", fig)
        metrics.update({
            f"{key}.{variant}.steps_used": round(float(chains.steps_used.float().mean()), 3),
            f"{key}.{variant}.stopped": round(float(stopped[-1]), 4),
            f"{key}.{variant}.energy": round(float(energy[-1]), 4),
            f"{key}.{variant}.energy_train": round(e_train, 4),
            f"{key}.{variant}.energy_gap": round(float(energy[-1]) - e_train, 4),
            f"{key}.{variant}.seconds": round(seconds, 2),
        })
        log(f"sample {sampler} {variant}: {y.numel()} samples, {metrics[f'{key}.{variant}.steps_used']} steps, "
            f"E {float(energy[0]):.2f} -> {float(energy[-1]):.2f} (train {e_train:.2f}), "
            f"{float(stopped[-1]):.0%} stopped, {seconds:.1f}s")
    if distributed.context().main:
        write_json(f"metrics/sample/{sampler}.json", metrics)
