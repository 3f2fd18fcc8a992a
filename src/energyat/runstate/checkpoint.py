"""Model checkpoints: a plain state dict (`<name>.pt`) plus a JSON sidecar (`<name>.json`).

The sidecar records what is needed to rebuild the model (arch, dataset geometry, normalisation)
and how it was trained; loading checks it against what the caller expects, so a checkpoint of
another architecture or dataset stops a stage with one line instead of a shape error.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..infra.artifacts import digest, json_text, load_torch, missing, read_json, sha256, torch_bytes, write_bytes
from ..infra.runtime import log
from ..params import VARIANTS, ModelCfg, Params
from ..science.models import build_model, init_lazy
from .outputs import model_path


def model_id(model: ModelCfg) -> dict:
    """The sidecar fields naming the network itself: arch and its size options (what `load` callers expect)."""
    return {"arch": model.arch, "options": model.options()}


def model_meta(model: ModelCfg, data_meta: dict) -> dict:
    """The sidecar fields that define the network: arch and options plus the dataset's geometry and normalisation."""
    keys = ("dataset", "num_classes", "channels", "size", "mean", "std")
    return {**model_id(model), **{k: data_meta[k] for k in keys}}


def new_model(meta: dict) -> nn.Module:
    model = build_model(meta["arch"], meta["num_classes"], meta["channels"], tuple(meta["mean"]), tuple(meta["std"]),
                        meta.get("options"))
    return init_lazy(model, meta["channels"], meta["size"])


def encode(model: nn.Module | dict, meta: dict) -> tuple[bytes, bytes]:
    """The bytes of a checkpoint: the state dict (of a model, or the state dict itself) and its JSON sidecar
    (meta + the state file's sha256). The same weights and meta always give the same bytes."""
    state = model.state_dict() if isinstance(model, nn.Module) else model
    weights = torch_bytes({k: v.detach().cpu() for k, v in state.items()})
    return weights, json_text({**meta, "sha256": digest(weights)}).encode()


def save(path: str | Path, model: nn.Module | dict, meta: dict) -> None:
    """Write `<path>` then its sidecar `<path minus .pt>.json` (see `encode`)."""
    path = Path(path)
    weights, sidecar = encode(model, meta)
    write_bytes(path, weights)
    write_bytes(path.with_suffix(".json"), sidecar)


def load(path: str | Path, expect: dict[str, Any] | None = None) -> tuple[nn.Module, dict]:
    """Rebuild and load the model at `path` (CPU, eval mode); `expect` lists sidecar values that must match."""
    path = Path(path)
    meta = read_json(path.with_suffix(".json"))
    for key, want in (expect or {}).items():
        got = meta.get(key)
        if isinstance(want, (list, tuple)):
            want, got = list(want), list(got) if isinstance(got, (list, tuple)) else got
        if got != want:
            raise UserError(f"{path}: checkpoint has {key}={got!r}, expected {want!r} (retrain, or fix params)")
    if not path.is_file():
        raise missing(path)
    if meta.get("sha256") and sha256(path) != meta["sha256"]:
        raise UserError(f"{path}: checksum differs from its sidecar {path.with_suffix('.json').name} (truncated or replaced)")
    state = load_torch(path)
    model = new_model(meta)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(f"{path}: does not fit arch {meta['arch']!r} ({str(exc).splitlines()[0][:120]})") from None
    return model.eval(), meta


def warn_if_not_robust(path: str, meta: dict) -> None:
    """Samples of a non-robust classifier are adversarial noise, not images: say so, then sample anyway."""
    chance = 1 / meta["num_classes"]
    if meta.get("method") == "standard" or not meta.get("eps"):
        log(f"sample: warning: {path} was trained without adversarial examples (method {meta.get('method')!r}); "
            f"its samples will look like noise")
    elif meta.get("val_pgd_acc") is not None and meta["val_pgd_acc"] <= chance:
        log(f"sample: warning: {path} has validation PGD accuracy {meta['val_pgd_acc']:.3f} (chance {chance:.3f}): "
            f"not robust, its samples will look like noise")


def sampling_models(params: Params, meta: dict, device: torch.device) -> dict:
    """The best checkpoints of `sample.run`, base and DER, checked against the prepared data, without gradients."""
    run = params.sample.run
    expect = {**model_id(params.run(run).model), "num_classes": meta["num_classes"],
              **{key: meta[key] for key in ("dataset", "channels", "size")}}
    models = {}
    for variant in VARIANTS:
        path = model_path(variant, run)
        model, mmeta = load(path, expect=expect)
        warn_if_not_robust(path, mmeta)
        models[variant] = model.to(device).requires_grad_(False)
    return models
