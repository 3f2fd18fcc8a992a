"""Further attacks on a study's trained models: an experiment whose params differ from a study experiment's only in
`evaluate.*` (the same seed, data, runs and training) evaluates the same checkpoints, e.g. AutoAttack on the last
checkpoints after a study that ran PGD and APGD on best and last. Its per-example flags of evaluations the study's
own file lacks join that file, so that the worst case per image covers every attack that ran on the image.

They join only where the two files agree: the same test split (`test_sha256`), the same eps, and every evaluation
both hold (clean, each PGD-k, APGD) identical image by image on the images both cover — the check that they are
the same models, attacked with the same seeds. Pure functions; the caller reads the files.
"""
from __future__ import annotations

import json
import math

from ..reporting import flags as flagfile
from . import seeds

EVALUATE = "evaluate."


def _training_params(exp: seeds.Experiment) -> str:
    flat = seeds.pooling_params(exp.flat_params, seeds.EXECUTION)
    return json.dumps({k: v for k, v in flat.items() if not k.startswith(EVALUATE)}, sort_keys=True)


def _evaluate_params(exp: seeds.Experiment) -> str:
    return json.dumps({k: v for k, v in exp.flat_params.items() if k.startswith(EVALUATE)}, sort_keys=True)


def of(member: seeds.Experiment, exps: list[seeds.Experiment]) -> list[seeds.Experiment]:
    """The experiments of `exps` that re-evaluate `member`'s models: the same params but the execution settings
    (seed included) and at least one `evaluate.*` param; newest first."""
    mine, evaluated = _training_params(member), _evaluate_params(member)
    found = [e for e in exps if _training_params(e) == mine and _evaluate_params(e) != evaluated]
    return sorted(found, key=lambda e: e.timestamp, reverse=True)


def _checkpoints(flag_file: dict) -> set[str]:
    return {k.partition(".")[0] for k in flag_file if "." in k and isinstance(flag_file[k], str)}


def disagreement(own: dict, other: dict) -> str | None:
    """Why `other`'s flags cannot join `own`'s (another test split or eps, or an evaluation both hold that differs on
    an image both cover), or None."""
    if own.get("test_sha256") is None or own.get("test_sha256") != other.get("test_sha256"):
        return "another test split (test_sha256)"
    if not math.isclose(float(own.get("eps", math.nan)), float(other.get("eps", math.nan)), rel_tol=1e-6):
        return f"another eps ({own.get('eps')} vs {other.get('eps')})"
    for ck in _checkpoints(own) & _checkpoints(other):
        mine, theirs = flagfile.components(own, ck), flagfile.components(other, ck)
        for name in mine.keys() & theirs.keys():
            n = min(len(mine[name]), len(theirs[name]))
            if mine[name][:n] != theirs[name][:n]:
                diff = sum(a != b for a, b in zip(mine[name][:n], theirs[name][:n]))
                return f"{ck}.{name} differs on {diff} of the {n} images both cover (not the same model or attack)"
    return None


def join(own: dict, other: dict) -> dict:
    """`own` with the evaluations of `other` it lacks (clean, PGD-k, APGD, AutoAttack: `flags.components`; stored
    worst cases are recomputed, never joined), per checkpoint, and their image counts (`aa_n`, `apgd_n`); assumes
    `disagreement(own, other)` is None."""
    out = dict(own)
    for ck in _checkpoints(other):
        for name in flagfile.components(other, ck).keys() - flagfile.components(own, ck).keys():
            out[f"{ck}.{name}"] = other[f"{ck}.{name}"]
            if f"{name}_n" in other and not own.get(f"{name}_n"):
                out[f"{name}_n"] = other[f"{name}_n"]
    return out


def with_reevaluations(groups: list[seeds.Group], exps: list[seeds.Experiment],
                       flags: dict[tuple[str, str, str], dict]) -> tuple[dict, dict[str, list[str]], list[str]]:
    """The flags of every group member with its re-evaluations' flags joined (`of`, `join`); per member rev the
    names of the experiments that joined; and one note per re-evaluation left out (`disagreement`).
    `flags`: (rev, run, variant) -> flags file content, the re-evaluations' included."""
    out, joined, notes = dict(flags), {}, []
    for g in groups:
        for m in g.members:
            for other in of(m, exps):
                keys = [(run, v) for (rev, run, v) in flags if rev == other.rev and (m.rev, run, v) in out]
                for run, v in keys:
                    if why := disagreement(out[m.rev, run, v], flags[other.rev, run, v]):
                        notes.append(f"{other.name}: {run}.{v} not joined to {m.name}: {why}")
                        continue
                    out[m.rev, run, v] = join(out[m.rev, run, v], flags[other.rev, run, v])
                    if other.name not in joined.setdefault(m.rev, []):
                        joined[m.rev].append(other.name)
    return out, joined, notes
