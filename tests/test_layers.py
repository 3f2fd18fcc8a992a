"""The package's folders are layers (docs/design.md §2): a module imports only from its own folder and the folders
listed before it, and no module name lives in two folders."""
from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

from energyat.infra import imports

LAYERS = ("core", "infra", "science", "runstate", "evaluation", "reporting", "studies", "stages", "commands", "entry")
TOP = {"errors": "core", "params": "core", "cli": "entry", "__main__": "entry", "__init__": "core"}


def layer(module: str) -> str:
    """`energyat.science.energy` (or the package `energyat.science`) -> science; the package's own files by TOP."""
    parts = module.split(".")[1:] or ["__init__"]
    return parts[0] if parts[0] in LAYERS else TOP[parts[0]]


def project_imports(path: Path) -> set[str]:
    return imports._imported(path)


def modules() -> list[Path]:
    return sorted(p for p in imports.ROOT.rglob("*.py"))


def test_every_folder_is_a_known_layer():
    folders = {p.parent.name for p in modules() if p.parent != imports.ROOT}
    assert folders <= set(LAYERS), sorted(folders - set(LAYERS))


def test_a_module_imports_only_its_own_layer_and_the_layers_below():
    wrong = []
    for path in modules():
        name = imports._module_name(path)
        rank = LAYERS.index(layer(name))
        wrong += [f"{name} imports {dep}" for dep in project_imports(path) if LAYERS.index(layer(dep)) > rank]
    assert not wrong, "\n".join(wrong)


def test_no_module_name_in_two_folders():
    stems = Counter(p.stem for p in modules() if p.stem != "__init__")
    assert [s for s, n in stems.items() if n > 1] == []


def test_the_layer_rule_catches_an_upward_import(tmp_path, monkeypatch):
    pkg = tmp_path / "energyat"
    for folder in ("science", "reporting"):
        (pkg / folder).mkdir(parents=True)
        (pkg / folder / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "reporting" / "tables.py").write_text("")
    (pkg / "science" / "energy.py").write_text("from ..reporting import tables\n")
    monkeypatch.setattr(imports, "ROOT", pkg)
    deps = project_imports(pkg / "science" / "energy.py")
    assert "energyat.reporting.tables" in deps
    assert LAYERS.index(layer("energyat.reporting.tables")) > LAYERS.index(layer("energyat.science.energy"))
