"""`preset PRESET [--name N] [--dry] [--exp-args "OPTIONS"]`: run the pipeline with a preset's values as a DVC
experiment (`dvc exp run -n N -S ...`, the overrides from presets.py), leaving the tracked params.yaml alone."""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from ..errors import UserError
from ..params import load
from ..studies.presets import overrides


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("preset", help="a params file, e.g. presets/paper.yaml")
    p.add_argument("--name", default="", help="experiment name (default: the preset's file name)")
    p.add_argument("--dry", action="store_true", help="print the dvc command instead of running it")
    p.add_argument("--exp-args", default="",
                   help="more options for `dvc exp run`, as one string: --exp-args=\"--queue\" (or \"--temp\", \"train@pgd\")")


def run(_params: None, ns: argparse.Namespace) -> None:
    preset = Path(ns.preset)
    load(preset)  # a preset with a bad value stops here, not inside DVC
    current = yaml.safe_load(Path("params.yaml").read_text())
    args = ["dvc", "exp", "run", "-n", ns.name or preset.stem]
    for o in overrides(current, yaml.safe_load(preset.read_text())):
        args += ["-S", o]
    args += shlex.split(ns.exp_args)
    if ns.dry:
        print(shlex.join(args))
        return
    if subprocess.run([sys.executable, "-m", *args]).returncode:  # the dvc of this environment
        raise UserError(f"dvc exp run with {preset} failed (its output is above)")
