"""Per-example correctness flags, as the evaluate stage writes them (format energyat-flags/1): decoding, the strongest
PGD evaluation, the per-image worst cases, and pairing two models' flags on the same test images.

A flags file (`metrics/eval/<run>.<variant>.flags.json`, and its copies in the studies' and the paper's evidence)
holds per checkpoint and evaluation a string of '0'/'1', character i for test image i (`"last.pgd50": "0110…"`),
with `n` (the images clean and PGD ran on; APGD and AutoAttack ran on prefixes of them, `apgd_n` and `aa_n`) and
`test_sha256`, the checksum of the test split the images come from. Each string covers a prefix of that split, so two
strings of the same length from files of the same `test_sha256` are the same images.

The worst cases are taken over the attacks that ran on the same images (`worst_cases`):
- `worst`: correct clean and under every evaluation run on the image (each PGD-k with its restarts, APGD-CE + APGD-T,
  AutoAttack), on the images every attack ran on: AutoAttack's when it ran (it contains APGD-CE and APGD-T with the
  same settings), else APGD's;
- `pgd_apgd`: correct clean and under every PGD-k and APGD, on APGD's images; only where AutoAttack ran as well
  (without it, `pgd_apgd` is `worst`).
Every worst case is at most each accuracy it is taken over on the same images.

Pure functions over plain numbers; nothing here reads files.
"""
from __future__ import annotations

import re
from collections.abc import Iterable

from ..errors import UserError
from ..evaluation import stats

FORMAT = "energyat-flags/1"
PATH = "metrics/eval/{run}.{variant}.flags.json"
WORST_CASES = ("worst", "pgd_apgd")
_PGD = re.compile(r"^(?:([a-z]+)\.)?pgd(\d+)_acc$")
_COMPONENT = re.compile(r"^(clean|pgd\d+|apgd|aa)$")  # the evaluations a worst case is taken over


def vector(flag_file: dict | None, checkpoint: str, metric: str) -> list[bool] | None:
    """Per-example correctness behind `<checkpoint>.<metric>` as stored (`metric`: a flags key such as `pgd50`, or an
    accuracy name such as `pgd50_acc`), or None when the file has no readable string of 0/1 for it."""
    v = flag_file.get(f"{checkpoint}.{metric.removesuffix('_acc')}") if isinstance(flag_file, dict) else None
    return [c == "1" for c in v] if isinstance(v, str) and v and set(v) <= {"0", "1"} else None


def strongest_pgd(keys: Iterable[str], checkpoint: str | None = None) -> str | None:
    """The accuracy name (e.g. `pgd50_acc`) of the PGD evaluation with the most steps among metric `keys`: bare
    names (`pgd50_acc`) or one checkpoint's (`last.pgd50_acc`; only `checkpoint`'s where given)."""
    steps = [int(m.group(2)) for k in keys
             if (m := _PGD.match(k)) and (checkpoint is None or m.group(1) == checkpoint)]
    return f"pgd{max(steps)}_acc" if steps else None


def components(flag_file: dict | None, checkpoint: str) -> dict[str, list[bool]]:
    """The evaluations of one checkpoint a worst case is taken over (clean, each PGD-k, APGD, AutoAttack), by name."""
    names = [k.partition(".")[2] for k in (flag_file or {}) if k.startswith(f"{checkpoint}.")]
    return {name: v for name in names if _COMPONENT.match(name) and (v := vector(flag_file, checkpoint, name))}


def _all_correct(flags: list[list[bool]], n: int) -> list[bool]:
    """Per image of the first n: correct under every vector that covers it (each covers a prefix)."""
    return [all(f[i] for f in flags if i < len(f)) for i in range(n)]


def worst_cases(flag_file: dict | None, checkpoint: str) -> dict[str, list[bool]]:
    """`worst` and, where AutoAttack and APGD both ran, `pgd_apgd` of one checkpoint, from its component flags (see
    the module's docstring); {} when neither APGD nor AutoAttack ran."""
    parts = components(flag_file, checkpoint)
    apgd, aa = parts.get("apgd"), parts.get("aa")
    if not (apgd or aa):
        return {}
    out = {"worst": _all_correct(list(parts.values()), len(aa or apgd))}
    if aa and apgd:
        out["pgd_apgd"] = _all_correct([f for name, f in parts.items() if name != "aa"], len(apgd))
    return out


def pgd_apgd(flag_file: dict | None, checkpoint: str) -> list[bool] | None:
    """Correct clean and under every PGD-k and APGD, on APGD's images, whether or not AutoAttack ran as well: the
    `pgd_apgd` of `worst_cases` where it did, their `worst` where it did not; None without APGD."""
    parts = components(flag_file, checkpoint)
    if "apgd" not in parts:
        return None
    return _all_correct([f for name, f in parts.items() if name != "aa"], len(parts["apgd"]))


def accuracy_vector(flag_file: dict | None, checkpoint: str, metric: str) -> list[bool] | None:
    """Per-example correctness of an accuracy (`clean_acc`, `pgd50_acc`, `aa_acc`, `worst_acc`, `pgd_apgd_acc`, or the
    bare flags names): the worst cases recomputed from the component flags (never a stored `worst` string, which
    earlier evaluations defined over other images), the others as stored."""
    name = metric.removesuffix("_acc")
    if name in WORST_CASES:
        return worst_cases(flag_file, checkpoint).get(name)
    return vector(flag_file, checkpoint, name)


def attack_check(flag_file: dict | None, checkpoint: str) -> dict | None:
    """The paired attack check, as the evaluate stage makes it, from one checkpoint's flags: on the images APGD or
    AutoAttack ran on, `pgd_missed` images the strongest PGD left standing that they broke, `apgd_missed` the
    reverse, and `p`, the exact one-sided binomial p of the first count (`stats.binomial_excess_p`); None where no
    PGD, or neither APGD nor AutoAttack, was run."""
    parts = components(flag_file, checkpoint)
    pgd = strongest_pgd(f"{name}_acc" for name in parts)
    strong = [f for name, f in parts.items() if name in ("apgd", "aa")]
    if pgd is None or not strong:
        return None
    n = max(len(f) for f in strong)
    broke = _all_correct(strong, n)
    pgd_missed, apgd_missed = stats.discordant(parts[pgd.removesuffix("_acc")][:n], broke)
    return {"n": n, "pgd_missed": pgd_missed, "apgd_missed": apgd_missed,
            "p": stats.binomial_excess_p(pgd_missed, apgd_missed)}


def pair(file_a: dict | None, ck_a: str, file_b: dict | None, ck_b: str, metric: str,
         names: tuple[str, str] = ("a", "b"), vector=None) -> tuple[list[bool], list[bool]] | None:
    """The two vectors of `metric` (`vector(file, checkpoint, metric)`, default `accuracy_vector`) on the same test
    images, or None where either file lacks them. Refused (UserError, naming the files as `names`) when they come
    from different test splits (their `test_sha256`; a file without one cannot be paired) or cover different numbers
    of its images."""
    vector = vector or accuracy_vector
    a, b = vector(file_a, ck_a, metric), vector(file_b, ck_b, metric)
    if a is None or b is None:
        return None
    sha_a, sha_b = file_a.get("test_sha256"), file_b.get("test_sha256")
    if sha_a is None or sha_b is None or sha_a != sha_b:
        raise UserError(f"{names[0]} and {names[1]} cover different test images (test_sha256 {sha_a!r} vs "
                        f"{sha_b!r}); re-run evaluate for both")
    if len(a) != len(b):
        raise UserError(f"{names[0]} and {names[1]} cover different test images ({metric.removesuffix('_acc')}: the "
                        f"first {len(a)} vs the first {len(b)}); re-run evaluate for both with the same image counts")
    return a, b
