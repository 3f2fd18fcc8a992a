"""dvc.yaml knows everything a stage runs: each stage's deps list exactly the project modules its entry point
imports, transitively (read from the source with ast), so a code change re-runs exactly the stages it affects."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from energyat.cli import STAGES
from energyat.infra import imports

ROOT = Path(__file__).resolve().parents[1]
CMD = re.compile(r"^python -m energyat (?:--nproc \S+ )?([\w-]+)")


def dvc_stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def stage_body(stage: dict) -> dict:
    return stage.get("do", stage)  # foreach stages keep cmd/deps under `do`


@pytest.mark.parametrize("name", list(dvc_stages()))
def test_stage_deps_are_the_import_closure_of_its_entry_point(name):
    body = stage_body(dvc_stages()[name])
    match = CMD.match(body["cmd"])
    assert match, f"{name}: cmd {body['cmd']!r} is not `python -m energyat [--nproc N] <stage>`"
    module = STAGES[match.group(1)][0]
    want = set(imports.relative(imports.stage_closure(module), ROOT))
    listed = {d for d in body["deps"] if d.startswith("src/")}
    assert not want - listed, f"dvc.yaml stage {name} lacks deps: {sorted(want - listed)}"
    assert not listed - want, f"dvc.yaml stage {name} lists modules its entry point never imports: {sorted(listed - want)}"


def test_closure_follows_relative_and_package_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "energyat"
    (pkg / "stages").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "stages" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b as bee\n")
    (pkg / "b.py").write_text("def f():\n    from .c import thing\n")  # an import inside a function counts
    (pkg / "c.py").write_text("import os\nthing = 1\n")
    (pkg / "d.py").write_text("")  # never imported
    (pkg / "stages" / "s.py").write_text("from .. import a\nfrom ..e import nothing_here\n")
    (pkg / "e.py").write_text("")
    monkeypatch.setattr(imports, "ROOT", pkg)
    got = {p.relative_to(pkg).as_posix() for p in imports.closure("energyat.stages.s")}
    assert got == {"__init__.py", "stages/__init__.py", "stages/s.py", "a.py", "b.py", "c.py", "e.py"}


def test_a_der_run_trains_after_its_base_run():
    """A late-DER run forks from the base run's state (stages/train.py), so DVC must order base before DER: the
    train-der stage depends on an output of the train stage, and otherwise on exactly what training depends on."""
    stages = dvc_stages()
    der, base = stage_body(stages["train-der"]), stage_body(stages["train"])
    base_outs = {next(iter(p)) if isinstance(p, dict) else p for p in base["plots"]} | set(base["outs"])
    extra = set(der["deps"]) - set(base["deps"])
    assert extra == {"metrics/train/${key}.base.json"} and extra <= base_outs
    assert set(base["deps"]) <= set(der["deps"])
