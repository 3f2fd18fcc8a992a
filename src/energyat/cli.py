"""`python -m energyat <stage> [args]`: one entry per dvc.yaml stage; no logic lives here."""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import UserError

# stage name -> (module under energyat.stages, positional argument names)
STAGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "prepare": ("prepare", ()),
    "train": ("train", ("run", "variant")),
    "evaluate": ("evaluate", ("run", "variant")),
    "analyze": ("analyze", ()),
    "pca": ("pca", ()),
    "sample": ("sample", ("sampler",)),
    "score": ("score", ()),
    "report": ("report", ()),
    "bench": ("bench", ()),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="energyat", description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="stage")
    for name, (_, args) in STAGES.items():
        p = sub.add_parser(name)
        for arg in args:
            p.add_argument(arg)
    ns = parser.parse_args(argv)
    from . import params as params_mod

    try:
        params = params_mod.load(ns.params)
        module = importlib.import_module(f"energyat.stages.{STAGES[ns.stage][0]}")
        module.run(params, *[getattr(ns, a) for a in STAGES[ns.stage][1]])
    except UserError as exc:
        print(f"energyat {ns.stage}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"energyat {ns.stage}: interrupted; completed outputs are kept, rerun to resume", file=sys.stderr)
        return 130
    return 0
