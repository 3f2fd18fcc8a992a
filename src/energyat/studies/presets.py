"""A preset as DVC parameter overrides: `dvc exp run -S ...` turns params.yaml into the preset inside an
experiment, so applying a preset never means overwriting the tracked params.yaml by hand.

DVC's `--set-param` speaks Hydra's override grammar: `key=value` changes, `+key=value` adds, `~key` removes.
"""
from __future__ import annotations

import json
import re

PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_./-]*")  # read by Hydra as this very string


def _value(v) -> str:
    """A Hydra override value; a string that Hydra could read as something else (8/255, "", true) is quoted."""
    if isinstance(v, str):
        if PLAIN.fullmatch(v) and v.lower() not in ("true", "false", "null", "nan", "inf"):
            return v
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, bool) or v is None:
        return json.dumps(v)
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ",".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {v!r} as a parameter override")


def overrides(current: dict, target: dict, prefix: str = "") -> list[str]:
    """The overrides that turn the params mapping `current` into `target`: removals first, then changes."""
    out = [f"~{prefix}{k}" for k in current if k not in target]
    for k, v in target.items():
        key = f"{prefix}{k}"
        if k not in current:
            out.append(f"+{key}={_value(v)}")
        elif isinstance(v, dict) and isinstance(current[k], dict):
            out += overrides(current[k], v, key + ".")
        elif v != current[k] or type(v) is not type(current[k]):
            out.append(f"{key}={_value(v)}")
    return out
