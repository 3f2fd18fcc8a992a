"""Command `aggregate [names...] [--co-study]`: seeds pooled from DVC experiments (not a dvc.yaml stage: it reads
the experiments, which live in git refs, not in the workspace).

Reads `dvc exp show --json` for HEAD and every commit with experiments (so a study whose results were committed
block by block still aggregates as a whole; the HEAD commit counts as an experiment, other commits do not) and,
for the robust-overfitting section, each member's per-example flags `metrics/eval/<run>.<variant>.flags.json`
from its commit (`git show <rev>:<path>`; unreadable ones leave the McNemar cells empty).

- `aggregate`: every group of ≥ 2 experiments that differ only in `seed` -> metrics/seeds.md + metrics/seeds.json.
- `aggregate NAME...`: exactly the named experiments (names, globs such as 'ro-*', or rev prefixes) as one group;
  refused with one line naming the params that differ.
- `aggregate --co-study [NAME...]`: the catastrophic-overfitting table (groups of any size; NAMEs restrict the
  candidates) -> metrics/co_study.md + metrics/co_study.json.
Experiments that are queued, running, failed or without metrics are skipped with a one-line note on stderr.
"""
from __future__ import annotations

import json
import subprocess
import sys

from .. import aggregate, co_study
from ..artifacts import write_json, write_text
from ..errors import UserError
from ..params import VARIANTS, Params
from ..report import family
from ..runtime import log

FLAGS = "metrics/eval/{run}.{variant}.flags.json"


def _dvc(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"dvc {' '.join(args[:2])} failed (exit {proc.returncode}): {last}")
    return proc.stdout


def _exp_show() -> list[dict]:
    """`dvc exp show --json` of HEAD and of every commit with experiments (`dvc exp list --all-commits` prints
    them as `<short rev>:` lines): `--all-commits` itself would read the metrics of every commit in the history."""
    listed = _dvc("exp", "list", "--all-commits")
    baselines = [line[:-1] for line in listed.splitlines() if line.endswith(":") and not line[0].isspace()]
    out = _dvc("exp", "show", "--json", *(a for rev in ["HEAD", *baselines] for a in ("--rev", rev)))
    try:
        return json.loads(out)
    except json.JSONDecodeError as exc:
        raise UserError(f"dvc exp show --json: not valid JSON ({exc.msg})") from None


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], capture_output=True, text=True)


def _flags(groups: list[aggregate.Group]) -> dict[tuple[str, str, str], dict]:
    """(rev, run, variant) -> the flags file of that experiment's evaluation, where git has a readable one."""
    out = {}
    for g in groups:
        runs = [run for run, cfg in g.runs().items() if family(cfg["method"]) == "ro"]
        for m in g.members:
            for run in runs:
                for variant in VARIANTS:
                    shown = _git("show", f"{m.rev}:{FLAGS.format(run=run, variant=variant)}")
                    if shown.returncode == 0:
                        try:
                            out[m.rev, run, variant] = json.loads(shown.stdout)
                        except json.JSONDecodeError:
                            log(f"aggregate: {m.name}: {FLAGS.format(run=run, variant=variant)} is not valid JSON; "
                                "no McNemar test for it")
    return out


def run(params: Params, names: list[str], co: bool = False) -> None:
    head = _git("rev-parse", "HEAD")
    exps, notes = aggregate.experiments(_exp_show(), head.stdout.strip() if head.returncode == 0 else None)
    for note in notes:
        log(f"aggregate: {note}")
    if names:
        exps = aggregate.select(exps, names)
    if co:
        groups, notes = aggregate.group(exps, min_members=1, keep_older=True)
        for note in notes:
            log(f"aggregate: {note}")
        study = co_study.study(groups)
        write_json("metrics/co_study.json", study)
        write_text("metrics/co_study.md", co_study.markdown(study))
        cells = sum(len(s["cells"]) for s in study["settings"])
        log(f"aggregate: co study: {len(study['settings'])} setting(s), {cells} cells -> metrics/co_study.md")
        return
    if names:
        groups, notes = [aggregate.pool(exps)], []
    else:
        groups, notes = aggregate.group(exps)
    for note in notes:
        log(f"aggregate: {note}")
    rep = aggregate.report(groups, _flags(groups))
    write_json("metrics/seeds.json", rep)
    write_text("metrics/seeds.md", aggregate.markdown(rep))
    log(f"aggregate: {len(groups)} group(s) of seeds "
        f"({'; '.join(str(len(g.members)) + ' seeds' for g in groups) or 'none'}) -> metrics/seeds.md")
