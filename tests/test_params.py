"""params.yaml validation: one line naming key, value and what is allowed; YAML 1.2 floats; run overrides."""
import copy
import dataclasses
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from energyat import params as P

ROOT = Path(__file__).resolve().parents[1]
RAW = yaml.safe_load((ROOT / "params.yaml").read_text())


def with_change(path: str, value):
    raw = copy.deepcopy(RAW)
    *parents, last = path.split(".")
    node = raw
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return raw


def test_repo_params_load_and_resolve_runs():
    p = P.load(ROOT / "params.yaml")
    assert p.run_names() and p.run("standard").train.method == "standard"
    for name in p.run_names():
        rc = p.run(name)
        assert rc.train.method in P.METHODS and rc.train.method != "standard"
        assert rc.train.eps > 0


@pytest.mark.parametrize("path, value, expected", [
    ("train.eps", -0.1, "train.eps: -0.1 is not allowed; must be >= 0.0"),
    ("train.method", "foo", "train.method: 'foo' is not allowed; allowed: standard, fgsm"),
    ("data.dataset", "mnist", "data.dataset: 'mnist' is not allowed"),
    ("train.lr_max", "fast", "train.lr_max: 'fast' is not a number"),
    ("train.epochs", 2.5, "train.epochs: 2.5 is not an integer"),
    ("train.bogus", 1, "train.bogus: unknown key; allowed: method"),
    ("der.start_epoch", 0, "der.start_epoch: 0 is not allowed"),
    ("runs.fgsm.eps", 0, "runs.fgsm.eps: 0.0 is not allowed; adversarial methods need eps > 0"),
    ("runs.fgsm.method", "standard", "runs.fgsm.method: 'standard' is not allowed in runs"),
    ("runs.fgsm.der", {"lambda": -1}, "runs.fgsm.der.lambda: -1.0 is not allowed"),
    ("runs.fgsm.bogus", 1, "runs.fgsm.bogus: unknown key; allowed: method"),
    ("runs.fgsm.model", {"hidden": -1}, "runs.fgsm.model.hidden: -1 is not allowed; must be >= 0"),
    ("runs.fgsm.model", {"arch": "wrn-28-10", "width": 64}, "runs.fgsm.model.width: 64 is not allowed with arch"),
    ("model.hidden", 512, None),
    ("evaluate.checkpoints", ["best", "middle"], "evaluate.checkpoints: 'middle' is not allowed"),
    ("evaluate.apgd_examples", -1, "evaluate.apgd_examples: -1 is not allowed; must be >= 0"),
    ("evaluate.apgd_examples", 2.5, "evaluate.apgd_examples: 2.5 is not an integer"),
    ("evaluate.apgd_examples", 0, None),  # off
    ("evaluate.apgd_examples", 20000, None),  # more than n_examples: all of them (a shrunk n keeps "all")
    ("device", "tpu", "device: 'tpu' is not allowed; allowed: auto, cpu, cuda, cuda:<index>"),
    ("device", "cuda:x", "device: 'cuda:x' is not allowed"),
    ("device", "cuda:1", None),
    ("runs.pgd", {"method": "pgd", "epochs": 100, "der": {"start_epoch": 101}},
     "runs.pgd.der.start_epoch: 101 is not allowed for 100 epochs"),
    ("runs.pgd", {"method": "pgd", "epochs": 100, "der": {"start_epoch": -101}},
     "runs.pgd.der.start_epoch: -101 is not allowed for 100 epochs"),
    ("runs.pgd.der", {"aae": "late"}, "runs.pgd.der.aae: 'late' is not allowed; allowed: clean, start"),
    ("der.aae_norm", "sum", "der.aae_norm: 'sum' is not allowed; allowed: aae, batch"),
    ("train.gradalign_lambda", "lots", "train.gradalign_lambda: 'lots' is not a number"),
    ("runs.fgsm.gradalign_lambda", -1, "runs.fgsm.gradalign_lambda: -1.0 is not allowed; must be >= 0.0"),
    ("runs.fgsm.lr_milestones", [0.75, 0.5], "runs.fgsm.lr_milestones: [0.75, 0.5] is not allowed; increasing"),
    ("data.augment", "mixup", "data.augment: 'mixup' is not allowed; allowed: auto, none, crop, crop-flip"),
    ("distributed.nproc", 0, "distributed.nproc: 0 is not allowed; must be >= 1"),
    ("distributed.eval_nproc", 0, "distributed.eval_nproc: 0 is not allowed; must be >= 1"),
    ("distributed.eval_nproc", 1.5, "distributed.eval_nproc: 1.5 is not an integer"),
    ("distributed.eval_nproc", "many", "distributed.eval_nproc: 'many' is not a number"),
    ("distributed.eval_nproc", 3, None),
    ("train.diag_every", -1, "train.diag_every: -1 is not allowed; must be >= 0"),
])
def test_bad_values_name_key_value_and_allowed(path, value, expected):
    if expected is None:  # a valid value: parses
        P.parse(with_change(path, value))
        return
    with pytest.raises(P.ParamsError) as err:
        P.parse(with_change(path, value))
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_yaml12_float_strings_and_fractions():
    # DVC's -S writes YAML 1.2, where PyYAML reads 1e-3 as a string
    p = P.parse(with_change("der.lambda", "1e-3"))
    assert p.der.lam == pytest.approx(1e-3)
    assert P.parse(with_change("runs.fgsm.eps", "8/255")).run("fgsm").train.eps == pytest.approx(8 / 255)


def test_run_overrides_and_der_start_from_end():
    raw = with_change("runs.fgsm.der", {"start_epoch": -3})
    rc = P.parse(raw).run("fgsm")
    assert rc.der.start_epoch == -3 and rc.der.lam == RAW["der"]["lambda"]
    assert [rc.der.active(e, 10) for e in range(1, 11)] == [False] * 7 + [True] * 3
    assert P.DerCfg(start_epoch=4).active(3, 10) is False and P.DerCfg(start_epoch=4).active(4, 10) is True


def test_run_model_override_keeps_the_rest_of_the_global_model():
    raw = with_change("model.width", 16)
    raw["runs"]["fgsm"]["model"] = {"hidden": 256}
    p = P.parse(raw)
    assert p.run("fgsm").model == P.ModelCfg(arch="small-cnn", width=16, hidden=256)
    assert p.run("standard").model == P.ModelCfg(width=16)
    assert p.run("fgsm").model.options() == {"width": 16, "hidden": 256}
    assert P.ModelCfg(arch="preact-resnet18").options() == {}
    with pytest.raises(P.ParamsError, match=r"^model\.hidden: 8 is not allowed with arch 'preact-resnet18'"):
        P.parse({**with_change("model.arch", "preact-resnet18"), "model": {"arch": "preact-resnet18", "hidden": 8}})


def test_cli_reports_bad_params_in_one_line_without_traceback(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(with_change("train.eps", "lots")))
    proc = subprocess.run([sys.executable, "-m", "energyat", "--params", str(bad), "train", "fgsm", "base"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "energyat train: error: train.eps: 'lots' is not a number"


def test_presets_are_valid_params_files():
    presets = sorted((ROOT / "presets").glob("*.yaml"))
    assert presets
    for path in presets:
        p = P.load(path)
        assert p.run_names() and p.sample.run in p.run_names()


def _dvc_param_paths() -> set[str]:
    """Every fixed dotted path a stage of dvc.yaml lists under `params` (templated `${...}` entries aside)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    found = set()
    for stage in stages.values():
        for entry in stage.get("do", stage).get("params", []):
            if isinstance(entry, str) and "${" not in entry:
                found.add(entry)
    return found


@pytest.mark.parametrize("preset", sorted(p.name for p in (ROOT / "presets").glob("*.yaml")))
def test_presets_name_every_param_dvc_tracks(preset):
    """`cp presets/X.yaml params.yaml; dvc exp run` fails on a param a stage lists but the preset omits, even where
    the typed loader would fill in its default."""
    raw = yaml.safe_load((ROOT / "presets" / preset).read_text())
    paths = _dvc_param_paths()
    assert {"seed", "cuda_graphs", "data.augment"} <= paths
    for path in sorted(paths):
        node = raw
        for key in path.split("."):
            assert isinstance(node, dict) and key in node, f"{preset} lacks {path}, which dvc.yaml tracks"
            node = node[key]


def _dvc_interpolations() -> set[str]:
    """Every `${...}` dvc.yaml reads from params (cmd, foreach, matrix, deps, outs), loop variables aside."""
    refs = set(re.findall(r"\$\{\s*([^}\s]+)\s*\}", (ROOT / "dvc.yaml").read_text()))
    return {r for r in refs if r.split(".")[0] not in ("key", "item")}


@pytest.mark.parametrize("preset", ["params.yaml", *sorted(f"presets/{p.name}" for p in (ROOT / "presets").glob("*.yaml"))])
def test_every_dvc_interpolation_resolves_against_every_preset(preset):
    """DVC resolves `${distributed.nproc}` & co. before it runs anything: a preset lacking one fails `dvc repro`
    at parse time ("Could not find 'distributed.nproc'"), although the typed loader would fill in its default."""
    raw = yaml.safe_load((ROOT / preset).read_text())
    refs = _dvc_interpolations()
    assert {"distributed.nproc", "runs", "sample.samplers", "sample.run"} <= refs
    for ref in sorted(refs):
        node = raw
        for key in ref.split("."):
            assert isinstance(node, dict) and key in node, f"{preset} lacks {ref}, which dvc.yaml interpolates"
            node = node[key]
        if ref in ("runs", "sample.samplers"):  # foreach / matrix over them
            assert isinstance(node, dict) and node, f"{preset}: {ref} must be a non-empty mapping"


def test_paper_preset_resolves_to_the_published_recipe():
    """What the code makes of the preset: PGD-10 with Rice et al.'s 2/255 step, DER switched on exactly at the
    first LR decay, CIFAR's crop + flip, every test image attacked."""
    from energyat.science.methods import METHODS
    from energyat.science.training import learning_rate

    p = P.load(ROOT / "presets/paper.yaml")
    ro = p.run("pgd")
    threat = METHODS["pgd"].threat(ro.train)
    assert threat.steps == 10 and threat.alpha == pytest.approx(2 / 255) and threat.eps == pytest.approx(8 / 255)
    first_decay = next(e for e in range(1, ro.train.epochs + 1)
                       if learning_rate(ro.train, e - 0.5) < ro.train.lr_max)
    assert ro.der.first_epoch(ro.train.epochs) == first_decay
    assert p.data.augmentation() == "crop-flip"
    for name in p.run_names():
        single = METHODS[p.run(name).train.method].single_step
        assert single == (p.run(name).train.method in ("rs-fgsm", "n-fgsm"))
    assert p.evaluate.n_examples == p.evaluate.aa_examples == 10_000 and p.evaluate.apgd_examples == 0  # AA has APGD


@pytest.mark.parametrize("preset", ["co-cifar10.yaml", "co-fashion-mnist.yaml"])
def test_co_presets_run_apgd_on_every_evaluated_image(preset):
    p = P.load(ROOT / "presets" / preset)
    assert p.evaluate.apgd_examples == p.evaluate.n_examples == 500


def test_one_named_gpu_cannot_hold_several_ranks():
    raw = with_change("device", "cuda:1")
    raw["distributed"] = {"nproc": 2}
    with pytest.raises(P.ParamsError, match=r"^device: 'cuda:1' names one GPU, but distributed.nproc is 2"):
        P.parse(raw)


def test_one_named_gpu_cannot_hold_several_evaluation_ranks():
    raw = with_change("device", "cuda:0")
    raw["distributed"] = {"eval_nproc": 2}
    with pytest.raises(P.ParamsError, match=r"^device: 'cuda:0' names one GPU, but distributed.eval_nproc is 2"):
        P.parse(raw)
    raw["distributed"] = {"eval_nproc": "auto"}
    assert P.parse(raw).stage_nproc("evaluate", "cuda") == 1


def test_stage_nproc_auto_gives_evaluation_one_rank_per_thread_up_to_the_checkpoints_or_models():
    raw = with_change("threads", 2)
    raw["distributed"] = {"nproc": 3, "eval_nproc": "auto"}
    p = P.parse(raw)
    assert p.analyzed_models() == [("standard", "base"), ("fgsm", "base"), ("fgsm", "der"), ("pgd", "base"),
                                   ("pgd", "der")]
    assert [p.stage_nproc(s, "cpu") for s in ("train", "evaluate", "analyze", "sample")] == [3, 2, 2, 3]
    assert [p.stage_nproc(s, "cuda") for s in ("evaluate", "analyze")] == [3, 3]  # one rank per GPU
    raw["threads"] = 8
    raw["evaluate"]["checkpoints"] = ["last"]
    assert [P.parse(raw).stage_nproc(s, "cpu") for s in ("evaluate", "analyze")] == [1, 5]
    raw["distributed"]["eval_nproc"] = 4
    assert [P.parse(raw).stage_nproc(s, d) for s in ("evaluate", "analyze") for d in ("cpu", "cuda")] == [4] * 4


def test_check_data_rejects_sizes_beyond_their_split():
    raw = with_change("runs.pgd.n_val", 1200)
    raw["runs"]["fgsm"]["n_train"] = 20000
    p = P.parse(raw)
    p.check_data({"train": 50_000, "val": 1200, "test": 10_000})
    with pytest.raises(P.ParamsError, match=r"^runs.pgd.n_val: 1200 is not allowed; the validation split has 1100"):
        p.check_data({"train": 50_000, "val": 1100, "test": 10_000})
    with pytest.raises(P.ParamsError, match=r"^runs.fgsm.n_train: 20000 is not allowed; the training split has 400"):
        p.check_data({"train": 400, "val": 5000, "test": 10_000})



NAMED_ENTRIES = ("runs", "sample.samplers")  # mappings of named entries: no default to agree with


def _defaults_against(cls: type, raw: dict, prefix: str = "") -> list[str]:
    """`key: default != value` for every field of `cls` whose dataclass default differs from its value in `raw` (a
    params.yaml section, read as the loader reads it), and `key: not in params.yaml` for a field it lacks."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        key = f.metadata.get("key", f.name)
        where = prefix + key
        if where in NAMED_ENTRIES:
            continue
        if key not in raw:
            out.append(f"{where}: not in params.yaml")
        elif dataclasses.is_dataclass(hints[f.name]):
            out += _defaults_against(hints[f.name], raw[key], where + ".")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            loaded = getattr(P._build(cls, {key: raw[key]}, prefix.rstrip(".")), f.name)
            if loaded != default:
                out.append(f"{where}: {default!r} != {loaded!r}")
    return out


def test_dataclass_defaults_are_the_values_of_params_yaml():
    """params.yaml is the documented source of every default: a key deleted from it must fall back to the same
    value, not to another one written in params.py."""
    assert _defaults_against(P.Params, RAW) == []
