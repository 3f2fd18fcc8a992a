"""Presets applied the DVC way: the overrides `python -m energyat preset` hands to `dvc exp run -S`, applied by DVC's
own Hydra code to params.yaml, give exactly the preset."""
import shlex
import shutil
from pathlib import Path

import pytest
import yaml

from energyat import cli
from energyat.studies.presets import overrides

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.name for p in (ROOT / "presets").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS)
def test_dvc_applies_the_overrides_to_params_yaml_and_gets_the_preset(preset, tmp_path):
    from dvc.utils.hydra import apply_overrides

    target = yaml.safe_load((ROOT / "presets" / preset).read_text())
    work = tmp_path / "params.yaml"
    shutil.copyfile(ROOT / "params.yaml", work)
    ops = overrides(yaml.safe_load(work.read_text()), target)
    assert ops, f"{preset} equals params.yaml"
    apply_overrides(work, ops)
    assert yaml.safe_load(work.read_text()) == target


def test_values_hydra_would_misread_are_quoted():
    ops = overrides({"a": {"eps": 0.1, "s": "x", "keep": 1, "gone": 2}},
                    {"a": {"eps": "8/255", "s": "", "keep": 1, "new": {"m": "rs-fgsm", "l": [20, 50]}, "b": "true"}})
    assert ops == ["~a.gone", 'a.eps="8/255"', 'a.s=""', "+a.new={m:rs-fgsm,l:[20,50]}", '+a.b="true"']


def test_preset_command_names_the_experiment_and_passes_options(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert cli.main(["preset", "presets/paper.yaml", "--dry", "--exp-args=--queue"]) == 0
    args = shlex.split(capsys.readouterr().out)
    assert args[:5] == ["dvc", "exp", "run", "-n", "paper"] and args[-1] == "--queue"
    assert "~runs.fgsm" in args and "model.arch=preact-resnet18" in args


@pytest.mark.parametrize("preset", PRESETS)
def test_dvc_parses_the_pipeline_with_every_preset(preset, tmp_path):
    """DVC itself resolves dvc.yaml against the preset (the paper preset once failed here, at parse time)."""
    import subprocess
    import sys

    shutil.copyfile(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copyfile(ROOT / "presets" / preset, tmp_path / "params.yaml")
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    proc = subprocess.run([*dvc, "dag", "--md"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    runs = yaml.safe_load((tmp_path / "params.yaml").read_text())["runs"]
    for run in runs:
        assert f"train@{run}" in proc.stdout and f"train-der@{run}" in proc.stdout
