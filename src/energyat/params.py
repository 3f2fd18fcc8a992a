"""params.yaml -> typed, frozen config. The one place allowed values live; the defaults are params.yaml's values
(a key deleted from it falls back to the same value; tests/test_params.py holds them equal).

Every stage calls :func:`load` once, before any work; a bad value raises :class:`ParamsError`
with one line naming the key, the value and what is allowed.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError

DATASETS = ("fashion-mnist", "cifar10", "cifar100", "svhn", "image-folder")
METHODS = ("standard", "fgsm", "rs-fgsm", "n-fgsm", "gradalign", "pgd", "trades")
SINGLE_STEP = ("fgsm", "rs-fgsm", "n-fgsm", "gradalign")
MULTI_STEP = ("pgd", "trades")
ARCHS = ("small-cnn", "preact-resnet18", "wrn-28-10", "wrn-34-10")
SCHEDULES = ("piecewise", "cyclic", "constant")
INITS = ("uniform", "gaussian", "pca-global", "pca-local")
CHECKPOINTS = ("best", "last")
AUGMENTATIONS = ("auto", "none", "crop", "crop-flip")
AAE_DEFINITIONS = ("clean", "start")
AAE_NORMS = ("aae", "batch")
VARIANTS = ("base", "der")  # trained without / with DER


class ParamsError(UserError, ValueError):
    """A params value that is not allowed; the message is one line for the user."""


def _choice(*allowed: str) -> dict:
    return {"choices": allowed}


def _range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> dict:
    return {"range": (lo, hi, lo_open)}


@dataclass(frozen=True)
class DataCfg:
    dataset: str = field(default="fashion-mnist", metadata=_choice(*DATASETS))
    # "auto": the Debian package's IDX files for Fashion-MNIST if present, else download;
    # "download": torchvision download; anything else: a local path (IDX folder, image folder or .tar.gz).
    source: str = "auto"
    download_root: str = "data/downloads"
    val_size: int = field(default=5000, metadata=_range(1))
    image_size: int = field(default=0, metadata=_range(0))  # image-folder only: resize to this side (0: keep)
    # training-batch augmentation: random 4-pixel-padded crop (+ horizontal flip); auto: crop-flip for
    # cifar10/cifar100, crop for svhn (digits must not be mirrored), none otherwise (fashion-mnist, image-folder)
    augment: str = field(default="auto", metadata=_choice(*AUGMENTATIONS))

    def augmentation(self) -> str:
        """The augmentation `augment` stands for on this dataset."""
        if self.augment != "auto":
            return self.augment
        return {"cifar10": "crop-flip", "cifar100": "crop-flip", "svhn": "crop"}.get(self.dataset, "none")


@dataclass(frozen=True)
class ModelCfg:
    arch: str = field(default="small-cnn", metadata=_choice(*ARCHS))
    width: int = field(default=32, metadata=_range(1))  # small-cnn: channels of the first convolution (then 2x)
    hidden: int = field(default=0, metadata=_range(0))  # small-cnn: units of a hidden linear layer; 0: none

    def options(self) -> dict:
        """Constructor keywords of `arch` beyond the dataset geometry (the others have fixed sizes)."""
        return {"width": self.width, "hidden": self.hidden} if self.arch == "small-cnn" else {}


@dataclass(frozen=True)
class DerCfg:
    lam: float = field(default=1.0, metadata={**_range(0.0), "key": "lambda"})
    gamma: float = field(default=0.0, metadata=_range(0.0))
    # multi-step methods only: k >= 1 -> DER on from epoch k (1-based); k < 0 -> on for the last |k| epochs
    start_epoch: int = -15
    # single-step methods only: which samples are abnormal adversarial examples (AAEs) -- clean: CE(x*) < CE(x);
    # start: CE(x*) < CE(x_start), the loss at the attack's random start (AAER's definition; = clean for FGSM)
    aae: str = field(default="clean", metadata=_choice(*AAE_DEFINITIONS))
    # how the AAE term is normalised -- aae: mean over the AAEs of the batch; batch: sum over AAEs / batch size
    aae_norm: str = field(default="aae", metadata=_choice(*AAE_NORMS))

    def active(self, epoch: int, epochs: int) -> bool:
        """Whether DER is on in (1-based) `epoch` of a multi-step run lasting `epochs`."""
        return epoch >= self.first_epoch(epochs)

    def first_epoch(self, epochs: int) -> int:
        """The first (1-based) epoch with DER on in a multi-step run lasting `epochs`."""
        return self.start_epoch if self.start_epoch > 0 else epochs + self.start_epoch + 1


@dataclass(frozen=True)
class TrainCfg:
    method: str = field(default="pgd", metadata=_choice(*METHODS))
    epochs: int = field(default=10, metadata=_range(1))
    batch_size: int = field(default=128, metadata=_range(1))
    n_train: int = field(default=0, metadata=_range(0))  # 0: every training image left after the validation split
    lr_schedule: str = field(default="cyclic", metadata=_choice(*SCHEDULES))
    lr_max: float = field(default=0.1, metadata=_range(0.0, lo_open=True))
    lr_milestones: tuple[float, ...] = (0.5, 0.75)  # piecewise: fractions of training where lr drops 10x
    momentum: float = field(default=0.9, metadata=_range(0.0, 1.0))
    weight_decay: float = field(default=5e-4, metadata=_range(0.0))
    eps: float = field(default=0.1, metadata=_range(0.0, 1.0))
    alpha: float = field(default=0.0, metadata=_range(0.0, 1.0))  # 0: the method's default step
    steps: int = field(default=10, metadata=_range(1))  # pgd / trades inner steps
    trades_beta: float = field(default=6.0, metadata=_range(0.0))
    # GradAlign weight: "auto" -> Andriushchenko & Flammarion's CIFAR-10 rule, log-linear in eps from 0.2 at
    # 8/255 to 2.0 at 16/255 (eps clamped to that published range), or a number >= 0
    gradalign_lambda: float | str = field(default="auto", metadata={**_range(0.0), "or_auto": True})
    # training-batch diagnostics (E(x), dE, AAE fractions, train clean acc) on every k-th batch of every run and epoch,
    # also where the natural logits come free (fgsm, gradalign, trades, standard, DER epochs), so that base and DER
    # runs average over the same batches (science/training.diagnosed); 0: off
    diag_every: int = field(default=8, metadata=_range(0))
    n_val: int = field(default=1000, metadata=_range(1))  # validation images scored each epoch
    val_steps: int = field(default=10, metadata=_range(1))  # PGD steps of the per-epoch validation attack
    co_drop: float = field(default=0.5, metadata=_range(0.0, 1.0, lo_open=True))

    def gradalign_weight(self) -> float:
        """λ of the GradAlign term for this run's eps."""
        if self.gradalign_lambda != "auto":
            return float(self.gradalign_lambda)
        eps = min(self.eps, 16 / 255)
        return 0.2 * 10 ** ((eps - 8 / 255) / (8 / 255))


@dataclass(frozen=True)
class RunCfg:
    """One entry of `runs`: training settings after per-run overrides, and the DER settings it uses."""

    name: str
    train: TrainCfg
    der: DerCfg
    model: ModelCfg


@dataclass(frozen=True)
class EvaluateCfg:
    n_examples: int = field(default=1000, metadata=_range(1))  # clean + PGD: the first n test images (10000: all)
    aa_examples: int = field(default=50, metadata=_range(1))  # AutoAttack: the first aa_examples of those n
    # APGD-CE + APGD-T: the first apgd_examples of those n (more than n: all n, so that a preset's "all of them" holds
    # when a block or a test shrinks n_examples); 0: off
    apgd_examples: int = field(default=100, metadata=_range(0))
    batch_size: int = field(default=250, metadata=_range(1))  # also the block of images a rank owns (torchrun)
    pgd_steps: tuple[int, ...] = (50,)  # one PGD-k evaluation per entry, each with `restarts` random starts
    restarts: int = field(default=1, metadata=_range(1))
    autoattack: bool = True
    checkpoints: tuple[str, ...] = field(default=CHECKPOINTS, metadata=_choice(*CHECKPOINTS))

    def __post_init__(self):
        if not self.pgd_steps or min(self.pgd_steps) < 1 or len(set(self.pgd_steps)) < len(self.pgd_steps):
            raise ParamsError(f"evaluate.pgd_steps: {list(self.pgd_steps)!r} is not allowed; "
                              "one or more distinct step counts >= 1")
        if not self.checkpoints or len(set(self.checkpoints)) < len(self.checkpoints):
            raise ParamsError(f"evaluate.checkpoints: {list(self.checkpoints)!r} is not allowed; "
                              f"one or more distinct of {', '.join(CHECKPOINTS)}")
        if self.aa_examples > self.n_examples:
            raise ParamsError(f"evaluate.aa_examples: {self.aa_examples} is not allowed; AutoAttack runs on a prefix "
                              f"of the evaluated images, at most evaluate.n_examples ({self.n_examples})")


@dataclass(frozen=True)
class AnalyzeCfg:
    n_examples: int = field(default=50, metadata=_range(1))  # first-n test images attacked per model
    batch_size: int = field(default=250, metadata=_range(1))
    steps: int = field(default=20, metadata=_range(1))  # our PGD (CE) and CW-margin PGD: steps, one start
    # AutoAttack's attacks, one at a time, on a smaller budget than the standard protocol (100 / 9 / 5000)
    aa_iter: int = field(default=100, metadata=_range(1))  # APGD-CE, APGD-T, FAB-T iterations
    target_classes: int = field(default=3, metadata=_range(1))  # APGD-T / FAB-T target classes
    square_queries: int = field(default=1000, metadata=_range(1))
    bins: int = field(default=30, metadata=_range(2))


@dataclass(frozen=True)
class PcaCfg:
    variance: float = field(default=0.95, metadata=_range(0.0, 1.0, lo_open=True))
    k: int = field(default=500, metadata=_range(2))  # neighbours of an anchor for local PCA
    n_anchors: int = field(default=10, metadata=_range(1))  # local PCA fits per class


@dataclass(frozen=True)
class SamplerCfg:
    init: str = field(default="pca-local", metadata=_choice(*INITS))
    adaptive: bool = True


@dataclass(frozen=True)
class SampleCfg:
    run: str = "pgd"  # which entry of `runs` generates (its DER and non-DER twins both do)
    steps: int = field(default=50, metadata=_range(1))
    step_size: float = field(default=0.8, metadata=_range(0.0, lo_open=True))
    momentum: float = field(default=0.9, metadata=_range(0.0, 1.0))
    noise: float = field(default=0.001, metadata=_range(0.0))
    sigma_pca: float = field(default=0.005, metadata=_range(0.0))
    tau: float = field(default=0.1, metadata=_range(0.0))
    samples_per_class: int = field(default=50, metadata=_range(1))
    batch_size: int = field(default=250, metadata=_range(1))
    n_energy: int = field(default=1000, metadata=_range(0))  # training images per class measuring E_y; 0: all
    step_sweep: tuple[int, ...] = (0, 10, 25)  # step counts (0: the starts) also kept, for the quality-diversity figure
    samplers: dict[str, SamplerCfg] = field(default_factory=dict)

    def __post_init__(self):
        bad = [t for t in self.step_sweep if not 0 <= t <= self.steps]
        if bad:
            raise ParamsError(f"sample.step_sweep: {bad[0]!r} is not allowed; step counts in 0..sample.steps ({self.steps})")

    def sampler(self, name: str) -> SamplerCfg:
        if name not in self.samplers:
            raise ParamsError(f"sample: {name!r} is not in sample.samplers; allowed: {', '.join(self.samplers) or '(none)'}")
        return self.samplers[name]


@dataclass(frozen=True)
class ScoreCfg:
    inception_weights: str = ""  # local Inception-v3 FID weights file; empty: the torch hub cache, else not computed
    batch_size: int = field(default=200, metadata=_range(1))
    n_reference: int = field(default=0, metadata=_range(0))  # training images FID compares against; 0: all
    # the Inception pass (Inception FID, and Inception IS with torch-fidelity's weights): auto -> on under CUDA only
    # (on 2 CPU threads it costs ~3 min per 1,000 images); true / false
    inception_fid: bool | str = "auto"
    # TF inception-2015-12-05 pool3 as TorchScript (`make inception`); empty: its copy in the torch hub cache
    inception_fid_file: str = ""
    # training images (the first n) Inception FID compares against; 0: all
    inception_reference: int = field(default=2000, metadata=_range(0))

    def __post_init__(self):
        value = self.inception_fid
        if isinstance(value, str) and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        if value != "auto" and not isinstance(value, bool):
            raise ParamsError(f"score.inception_fid: {value!r} is not allowed; allowed: auto, true, false")
        object.__setattr__(self, "inception_fid", value)

    def inception_on(self, device_type: str) -> bool:
        """Whether the Inception pass runs on a `device_type` ("cuda" / "cpu") device."""
        return self.inception_fid is True or (self.inception_fid == "auto" and device_type == "cuda")


EVAL_STAGES = ("evaluate", "analyze")  # their ranks: distributed.eval_nproc


@dataclass(frozen=True)
class DistributedCfg:
    # ranks of the train / sample stages (torchrun), and of evaluate / analyze on CUDA; 1: one process, no group
    nproc: int = field(default=1, metadata=_range(1))
    # ranks of evaluate / analyze; auto: `nproc` on CUDA, on the CPU one rank per thread up to one per checkpoint /
    # model (each rank attacks whole ones: pyautoattack's small batches keep one core busier than two)
    eval_nproc: int | str = field(default="auto", metadata={**_range(1), "or_auto": True})


@dataclass(frozen=True)
class Params:
    seed: int = 0
    # auto (CUDA when present) | cpu | cuda (under torchrun: each rank its own GPU) | cuda:N (one process on GPU N,
    # e.g. one queued experiment per GPU)
    device: str = "auto"
    threads: int = field(default=2, metadata=_range(1))
    # CUDA, one process: replay each training step from CUDA graphs (step_graphs.py); no effect on the CPU
    cuda_graphs: bool = True
    distributed: DistributedCfg = field(default_factory=DistributedCfg)
    data: DataCfg = field(default_factory=DataCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    der: DerCfg = field(default_factory=DerCfg)
    standard: dict[str, Any] = field(default_factory=lambda: {"epochs": 3})
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    evaluate: EvaluateCfg = field(default_factory=EvaluateCfg)
    analyze: AnalyzeCfg = field(default_factory=AnalyzeCfg)
    pca: PcaCfg = field(default_factory=PcaCfg)
    sample: SampleCfg = field(default_factory=SampleCfg)
    score: ScoreCfg = field(default_factory=ScoreCfg)

    def run(self, name: str) -> RunCfg:
        """The resolved settings of run `name` (`standard` is the non-adversarial reference)."""
        if name == "standard":
            overrides = {"method": "standard", **self.standard}
        elif name in self.runs:
            overrides = self.runs[name]
        else:
            raise ParamsError(f"runs.{name}: no such run; allowed: standard, {', '.join(self.runs) or '(none)'}")
        return _resolve_run(name, overrides, self.train, self.der, self.model,
                            "standard" if name == "standard" else f"runs.{name}")

    def variant_run(self, name: str, variant: str) -> RunCfg:
        """`run(name)` after checking that `variant` exists for it (`standard` has no DER twin)."""
        if variant not in VARIANTS:
            raise ParamsError(f"variant: {variant!r} is not allowed; allowed: {', '.join(VARIANTS)}")
        if name == "standard" and variant == "der":
            raise ParamsError("standard: variant 'der' is not allowed; DER needs adversarial examples (use base)")
        return self.run(name)

    def run_names(self) -> list[str]:
        return list(self.runs)

    def analyzed_models(self) -> list[tuple[str, str]]:
        """(run, variant) pairs the analyze stage attacks: the standard reference, then base and DER of every run."""
        return [("standard", "base")] + [(r, v) for r in self.run_names() for v in ("base", "der")]

    @staticmethod
    def nproc_key(stage: str) -> str:
        """The param that sets a stage's ranks."""
        return "distributed.eval_nproc" if stage in EVAL_STAGES else "distributed.nproc"

    def stage_nproc(self, stage: str, device_type: str) -> int:
        """Ranks of a stage: `distributed.nproc`, but for evaluate / analyze `distributed.eval_nproc`, whose auto is
        `nproc` on CUDA and on the CPU min(threads, checkpoints or models to attack), one thread per rank at 2."""
        if stage not in EVAL_STAGES:
            return self.distributed.nproc
        if self.distributed.eval_nproc != "auto":
            return self.distributed.eval_nproc
        if device_type == "cuda":
            return self.distributed.nproc
        units = len(self.evaluate.checkpoints) if stage == "evaluate" else len(self.analyzed_models())
        return min(self.threads, units)

    def check_data(self, counts: dict[str, int]) -> None:
        """Values that only the prepared data can judge (`counts`: images per split, from data/prepared/meta.json).
        A size beyond its split would otherwise be clipped silently and change what a number means."""
        for name in ["standard", *self.runs]:
            cfg, prefix = self.run(name).train, "standard" if name == "standard" else f"runs.{name}"
            if cfg.n_val > counts["val"]:
                raise ParamsError(f"{prefix}.n_val: {cfg.n_val} is not allowed; the validation split has "
                                  f"{counts['val']} images (data.val_size)")
            if cfg.n_train > counts["train"]:
                raise ParamsError(f"{prefix}.n_train: {cfg.n_train} is not allowed; the training split has "
                                  f"{counts['train']} images (0: all)")


# ---------------------------------------------------------------------------------------------- parsing

_FRACTION = re.compile(r"^\s*([-+]?\d+(?:\.\d*)?)\s*/\s*(\d+(?:\.\d*)?)\s*$")


def _as_float(key: str, value: Any) -> float:
    # DVC writes YAML 1.2 (`1e-3`), which PyYAML (YAML 1.1) reads as a string; "8/255" is accepted too.
    if isinstance(value, bool):
        raise ParamsError(f"{key}: {value!r} is not a number")
    if isinstance(value, (int, float)):
        out = float(value)
    elif isinstance(value, str):
        m = _FRACTION.match(value)
        try:
            out = float(m.group(1)) / float(m.group(2)) if m else float(value)
        except (ValueError, ZeroDivisionError):
            raise ParamsError(f"{key}: {value!r} is not a number") from None
    else:
        raise ParamsError(f"{key}: {value!r} is not a number")
    if not math.isfinite(out):
        raise ParamsError(f"{key}: {value!r} is not a finite number")
    return out


def _as_int(key: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ParamsError(f"{key}: {value!r} is not an integer")
    if isinstance(value, int):
        return value
    f = _as_float(key, value) if isinstance(value, (str, float)) else None
    if f is None or f != int(f):
        raise ParamsError(f"{key}: {value!r} is not an integer")
    return int(f)


def _as_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ParamsError(f"{key}: {value!r} is not true/false")


def _check(key: str, value: Any, meta: typing.Mapping) -> None:
    if "choices" in meta:
        values = value if isinstance(value, tuple) else (value,)
        for v in values:
            if v not in meta["choices"]:
                raise ParamsError(f"{key}: {v!r} is not allowed; allowed: {', '.join(meta['choices'])}")
    if "range" in meta:
        lo, hi, lo_open = meta["range"]
        if lo is not None and (value < lo or (lo_open and value == lo)):
            raise ParamsError(f"{key}: {value!r} is not allowed; must be {'>' if lo_open else '>='} {lo}")
        if hi is not None and value > hi:
            raise ParamsError(f"{key}: {value!r} is not allowed; must be <= {hi}")


def _convert(key: str, tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is float:
        return _as_float(key, value)
    if tp is int:
        return _as_int(key, value)
    if tp is bool:
        return _as_bool(key, value)
    if tp is str:
        if not isinstance(value, str):
            raise ParamsError(f"{key}: {value!r} is not a string")
        return value
    if origin is tuple:
        (item_tp, _) = typing.get_args(tp)
        items = value if isinstance(value, (list, tuple)) else [value]
        return tuple(_convert(f"{key}[{i}]", item_tp, v) for i, v in enumerate(items))
    if origin is dict:
        _, val_tp = typing.get_args(tp)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ParamsError(f"{key}: {value!r} is not a mapping")
        if val_tp is Any or typing.get_origin(val_tp) is dict:
            return {str(k): (v if v is not None else {}) for k, v in value.items()}
        return {str(k): _convert(f"{key}.{k}", val_tp, v) for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        return value
    return value


def _build(cls: type, raw: Any, prefix: str = "") -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{prefix or 'params'}: {raw!r} is not a mapping")
    hints = typing.get_type_hints(cls)
    by_key = {f.metadata.get("key", f.name): f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in raw if k not in by_key]
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        raise ParamsError(f"{where}: unknown key; allowed: {', '.join(by_key)}")
    kwargs = {}
    for k, f in by_key.items():
        if k not in raw:
            continue
        key = f"{prefix}.{k}" if prefix else k
        value = raw[k]
        if f.metadata.get("or_auto"):  # "auto" or a number
            if value != "auto":
                value = (_as_int if int in typing.get_args(hints[f.name]) else _as_float)(key, value)
                _check(key, value, f.metadata)
        else:
            value = _convert(key, hints[f.name], value)
            _check(key, value, f.metadata)
        kwargs[f.name] = value
    return cls(**kwargs)


def _check_model(model: ModelCfg, prefix: str) -> ModelCfg:
    for key in ("width", "hidden"):
        if model.arch != "small-cnn" and getattr(model, key) != getattr(ModelCfg, key):
            raise ParamsError(f"{prefix}.{key}: {getattr(model, key)!r} is not allowed with arch {model.arch!r}; "
                              "only small-cnn takes it (leave it at its default)")
    return model


def _resolve_run(name: str, overrides: dict, base: TrainCfg, der: DerCfg, model: ModelCfg, prefix: str) -> RunCfg:
    if not isinstance(overrides, dict):
        raise ParamsError(f"{prefix}: {overrides!r} is not a mapping")
    overrides = dict(overrides)
    allowed = [*_as_raw(base), "der", "model"]
    unknown = [k for k in overrides if k not in allowed]
    if unknown:
        raise ParamsError(f"{prefix}.{unknown[0]}: unknown key; allowed: {', '.join(allowed)}")
    der_over = overrides.pop("der", None) or {}
    model_over = overrides.pop("model", None) or {}
    model_cfg = _check_model(_build(ModelCfg, {**_as_raw(model), **model_over}, f"{prefix}.model"), f"{prefix}.model")
    train = _build(TrainCfg, {**_as_raw(base), **overrides}, prefix)
    der_cfg = _build(DerCfg, {**_as_raw(der), **der_over}, f"{prefix}.der")
    k, epochs = der_cfg.start_epoch, train.epochs
    if k == 0 or (train.method in MULTI_STEP and abs(k) > epochs):
        # a start outside the run would silently mean "DER never on" or "DER on from the first epoch"
        raise ParamsError(f"{prefix}.der.start_epoch: {k} is not allowed for {epochs} epochs; "
                          f"1..{epochs} (from epoch k) or -{epochs}..-1 (the last |k| epochs)")
    if prefix == "standard" and train.method != "standard":
        raise ParamsError(f"standard.method: {train.method!r} is not allowed; allowed: standard")
    if prefix != "standard" and train.method == "standard":
        raise ParamsError(f"{prefix}.method: 'standard' is not allowed in runs (DER needs an attack); "
                          f"allowed: {', '.join(m for m in METHODS if m != 'standard')}")
    if train.method != "standard" and train.eps <= 0:
        raise ParamsError(f"{prefix}.eps: {train.eps!r} is not allowed; adversarial methods need eps > 0")
    if train.lr_schedule == "piecewise" and not all(0 < m < 1 for m in train.lr_milestones):
        raise ParamsError(f"{prefix}.lr_milestones: {train.lr_milestones!r} is not allowed; fractions in (0, 1)")
    if list(train.lr_milestones) != sorted(train.lr_milestones):
        raise ParamsError(f"{prefix}.lr_milestones: {list(train.lr_milestones)!r} is not allowed; increasing fractions")
    return RunCfg(name=name, train=train, der=der_cfg, model=model_cfg)


def _as_raw(cfg: Any) -> dict:
    return {f.metadata.get("key", f.name): getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def parse(raw: dict) -> Params:
    """Validate a params mapping (as read from params.yaml) completely, runs included."""
    params = _build(Params, raw)
    if not DEVICE.fullmatch(params.device):
        raise ParamsError(f"device: {params.device!r} is not allowed; allowed: auto, cpu, cuda, cuda:<index>")
    for key in ("nproc", "eval_nproc"):
        value = getattr(params.distributed, key)
        if ":" in params.device and value != "auto" and value > 1:
            raise ParamsError(f"device: {params.device!r} names one GPU, but distributed.{key} is {value}; use cuda "
                              "(each rank takes its own GPU)")
    _check_model(params.model, "model")
    for name in ["standard", *params.runs]:
        params.run(name)
    if not params.runs:
        raise ParamsError("runs: empty; name at least one adversarial training run")
    if "standard" in params.runs:
        raise ParamsError("runs.standard: the name is reserved for the `standard` section")
    if params.sample.run not in params.runs:
        raise ParamsError(f"sample.run: {params.sample.run!r} is not a run; allowed: {', '.join(params.runs)}")
    for name in params.sample.samplers:
        if not re.fullmatch(r"[a-z0-9_-]+", name):
            raise ParamsError(f"sample.samplers.{name}: names use a-z, 0-9, '-' and '_' only")
    return params


def load(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return parse(raw)


def check_test_subset(key: str, n: int, counts: dict[str, int]) -> None:
    """A first-n test subset must exist in full: asking for more images than the test split holds is an error
    (checked once the prepared data is known), never a silent clip."""
    if n > counts["test"]:
        raise ParamsError(f"{key}: {n} is not allowed; the test split has {counts['test']} images")


def as_dict(cfg: Any) -> dict:
    """A JSON-friendly view of a config (for sidecars and config hashes)."""
    return dataclasses.asdict(cfg)
