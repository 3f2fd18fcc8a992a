"""Which project modules a stage runs: the transitive closure of its imports, read from the source (ast).

dvc.yaml must list each stage's closure as deps (a test checks it), and the train stage hashes the same files
into its resume digest (`code_digest`), so that a change to any code a stage runs re-runs it and never resumes
across it.
"""
from __future__ import annotations

import ast
import hashlib
from pathlib import Path

PACKAGE = "energyat"
ROOT = Path(__file__).resolve().parents[1]  # src/energyat


def _module_file(name: str) -> Path | None:
    """The file of project module `energyat.a.b` (a module file or a package's __init__.py), if it exists."""
    parts = name.split(".")
    if parts[0] != PACKAGE:
        return None
    base = ROOT.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = [PACKAGE, *rel.parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(path: Path) -> set[str]:
    """Project modules named by the import statements of `path`, anywhere in the file."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    return {m for m in found if _module_file(m) is not None}


def closure(*modules: str) -> list[Path]:
    """Every project file that importing `modules` executes (parent packages' __init__ included), sorted."""
    seen: set[Path] = set()
    todo = list(modules)
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__ first
            path = _module_file(".".join(parts[:i]))
            if path is not None and path not in seen:
                seen.add(path)
                todo.extend(_imported(path))
    return sorted(seen)


def stage_closure(stage_module: str) -> list[Path]:
    """The files `python -m energyat <stage>` runs: the CLI's imports and the stage module's (`stages.train`, ...)."""
    return closure(f"{PACKAGE}.__main__", f"{PACKAGE}.cli", f"{PACKAGE}.{stage_module}")


def relative(paths: list[Path], start: Path) -> list[str]:
    """`paths` as POSIX paths relative to `start` (e.g. the repository root, for dvc.yaml)."""
    return [p.relative_to(start).as_posix() for p in paths]


def package_files() -> list[Path]:
    """Every source file of the package, sorted."""
    return sorted(ROOT.rglob("*.py"))


def code_digest(paths: list[Path], root: Path = ROOT) -> str:
    """The code that `paths` hold, in 16 hex digits: the sha256 of each file's POSIX path relative to `root` and its
    bytes, in sorted order, so that an edit, a rename or a file added or dropped changes it. The train stage digests
    its import closure (`stage_closure`: a saved state is resumed only by the code that wrote it), the paper blocks
    every package source (`package_files`: evidence names the code that produced it)."""
    h = hashlib.sha256()
    for path in sorted(paths):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]
