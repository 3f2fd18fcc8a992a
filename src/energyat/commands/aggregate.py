"""Command `aggregate [names...] [--co-study] [--export STUDY]`: seeds pooled from DVC experiments (not a dvc.yaml
stage: it reads the experiments, which live in git refs, and their committed evidence).

Experiments come from two places, the same commit counted once: the evidence committed under
`metrics/studies/<study>/<experiment>/` (experiment.json: params and metrics as `dvc exp show` gave them; eval/ and
history/: each run's per-example flags and per-epoch history) and, where this clone has them, the experiment refs
(`dvc exp show --json` of HEAD and every commit with experiments; flags read with `git show <rev>:<path>`).
Experiment refs do not survive a clone: `--export STUDY` writes the selected experiments' evidence into
metrics/studies/STUDY/ (kilobytes each), so that the aggregates regenerate from git alone.

- `aggregate`: every group of ≥ 2 experiments that differ only in `seed` -> metrics/seeds.md + metrics/seeds.json.
- `aggregate NAME...`: exactly the named experiments (names, globs such as 'ro-*', or rev prefixes) as one group;
  refused with one line naming the params that differ.
- `aggregate --co-study [NAME...]`: the catastrophic-overfitting table (groups of any size; NAMEs restrict the
  candidates) -> metrics/co_study.md + metrics/co_study.json.
- `aggregate --export STUDY [NAME...]`: the evidence of the named (default: all) experiments of the refs, with
  the exporting machine's CPU model (`export_cpu`).
Experiments that differ from a pooled one only in `evaluate.*` params re-evaluate its models (`reevaluation`):
wherever their per-example flags agree with its own on the images both cover, their other attacks join its flags.
Experiments that are queued, running, failed or without metrics are skipped with a one-line note on stderr.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from ..errors import UserError
from ..infra.artifacts import read_json, read_tsv, write_json, write_text
from ..infra.runtime import cpu_name, log
from ..params import VARIANTS, Params
from ..reporting.tables import family
from ..studies import co_study, reevaluation, seeds

FLAGS = "metrics/eval/{run}.{variant}.flags.json"
HISTORY = "plots/history/{run}.{variant}.tsv"
STUDIES = Path("metrics/studies")
RECORD = "experiment.json"
CO_AGGREGATES_ONLY = STUDIES / "co/aggregates-only.json"  # cells of experiments whose evidence was not kept


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


STAGE_FILES = ("metrics/train/{run}.{variant}.json", "metrics/eval/{run}.{variant}.json")


def _stage_files(rev: str, params: dict) -> dict:
    """The run's summary and its per-run train and eval JSON in an experiment's commit (DVC lists them as plots,
    not metrics)."""
    runs = ["standard", *seeds.runs_of(params.get(seeds.PARAMS_FILE, {}))]
    paths = [seeds.SUMMARY, *(pattern.format(run=run, variant=variant) for run in runs
                                  for variant in (("base",) if run == "standard" else VARIANTS)
                                  for pattern in STAGE_FILES)]
    out = {}
    for path in paths:
        shown = _git("show", f"{rev}:{path}")
        if shown.returncode == 0:
            try:
                out[path] = json.loads(shown.stdout)
            except json.JSONDecodeError:
                log(f"aggregate: {rev[:7]}: {path} is not valid JSON; left out")
    return out


def _committed(root: Path = STUDIES) -> tuple[list[seeds.Experiment], dict[str, Path]]:
    """The experiments of the committed evidence, and rev -> its evidence folder."""
    exps, folders = [], {}
    for record in sorted(root.glob(f"*/*/{RECORD}")):
        exp = seeds.from_evidence(read_json(record))
        exps.append(exp)
        folders[exp.rev] = record.parent
    return exps, folders


def _export(study: str, exps: list[seeds.Experiment]) -> None:
    """Each experiment's record, flags and histories into metrics/studies/<study>/<name>/ (from its commit)."""
    if not exps:
        raise UserError("aggregate --export: no finished experiment to export (dvc exp show lists none)")
    for exp in exps:
        folder = STUDIES / study / exp.name
        # the CPU model decides the floating-point bits; experiments in the refs ran here unless pulled from a remote
        write_json(folder / RECORD, {**seeds.evidence(exp), "export_cpu": cpu_name()})
        for run in seeds.runs_of(exp.params.get(seeds.PARAMS_FILE, {})):
            for variant in VARIANTS:
                for src, dest in ((FLAGS, "eval/{run}.{variant}.flags.json"), (HISTORY, "history/{run}.{variant}.tsv")):
                    shown = _git("show", f"{exp.rev}:{src.format(run=run, variant=variant)}")
                    if shown.returncode == 0:
                        write_text(folder / dest.format(run=run, variant=variant), shown.stdout)
        log(f"aggregate: {exp.name} -> {folder}")


def _run_files(groups: list[seeds.Group], folders: dict[str, Path], kept: str, source: str, read,
               fam: str = "ro") -> dict:
    """(rev, run, variant) -> `read(path)` of one file per run of family `fam` (multi-step `ro`, single-step `co`)
    of every experiment of the groups: the committed evidence (`kept` under its folder) first, else `source` from
    its commit where git has it; an unreadable file is left out."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for g in groups:
            for run in [run for run, cfg in g.runs().items() if family(cfg["method"]) == fam]:
                for m in (*g.members, *g.older):
                    for variant in VARIANTS:
                        path = folders.get(m.rev, Path("/nonexistent")) / kept.format(run=run, variant=variant)
                        if not path.is_file():
                            shown = _git("show", f"{m.rev}:{source.format(run=run, variant=variant)}")
                            if shown.returncode or not shown.stdout.strip():
                                continue
                            path = Path(tmp) / f"{m.rev}.{run}.{variant}"
                            path.write_text(shown.stdout)
                        try:
                            out[m.rev, run, variant] = read(path)
                        except (UserError, ValueError):
                            log(f"aggregate: {m.name}: {source.format(run=run, variant=variant)} is not readable; "
                                "left out")
    return out


def _log_notes(notes: list[str]) -> None:
    for note in notes:
        log(f"aggregate: {note}")


def _co_study(exps: list[seeds.Experiment], folders: dict[str, Path]) -> None:
    """metrics/co_study.{json,md} from `exps` (and the cells kept as aggregates only)."""
    groups, notes = seeds.group(exps, min_members=1, keep_older=True)
    _log_notes(notes)
    flags = _run_files(groups, folders, "eval/{run}.{variant}.flags.json", FLAGS, read_json, "co")  # McNemar
    study = co_study.study(groups, flags)
    if CO_AGGREGATES_ONLY.is_file():
        study = co_study.with_aggregates_only(study, read_json(CO_AGGREGATES_ONLY))
    write_json("metrics/co_study.json", study)
    write_text("metrics/co_study.md", co_study.markdown(study))
    cells = sum(len(s["cells"]) for s in study["settings"])
    log(f"aggregate: co study: {len(study['settings'])} setting(s), {cells} cells -> metrics/co_study.md")


def _seeds(groups: list[seeds.Group], everything: list[seeds.Experiment], folders: dict[str, Path]) -> None:
    """metrics/seeds.{json,md} of `groups`, with the flags of the experiments among `everything` that re-evaluate
    their models (e.g. AutoAttack on the last checkpoints) joined to theirs."""
    reevaluations = {r.rev: r for g in groups for m in g.members for r in reevaluation.of(m, everything)}
    flags = _run_files([*groups, *(seeds.Group((r,)) for r in reevaluations.values())], folders,
                       "eval/{run}.{variant}.flags.json", FLAGS, read_json)  # for McNemar and the worst cases
    flags, joined, notes = reevaluation.with_reevaluations(groups, list(reevaluations.values()), flags)
    _log_notes(notes)
    histories = _run_files(groups, folders, "history/{run}.{variant}.tsv", HISTORY, read_tsv)
    rep = seeds.report(groups, flags, histories, joined)
    write_json("metrics/seeds.json", rep)
    write_text("metrics/seeds.md", seeds.markdown(rep))
    log(f"aggregate: {len(groups)} group(s) of seeds "
        f"({'; '.join(str(len(g.members)) + ' seeds' for g in groups) or 'none'}) -> metrics/seeds.md")


def run(params: Params, names: list[str], co: bool = False, export: str = "") -> None:
    head = _git("rev-parse", "HEAD")
    live, notes = seeds.experiments(_exp_show(), head.stdout.strip() if head.returncode == 0 else None,
                                        files=_stage_files)
    _log_notes(notes)
    if export:
        _export(export, seeds.select(live, names) if names else live)
        return
    committed, folders = _committed()
    exps = everything = seeds.merge(committed, live)
    if not exps and not (co and CO_AGGREGATES_ONLY.is_file()):
        # a clone without refs or evidence: the committed aggregates are all there is, keep them
        raise UserError(f"no experiments to aggregate: no evidence under {STUDIES}/ and no experiment refs; "
                        "metrics/seeds.* and metrics/co_study.* left as they are")
    if names:
        try:
            exps = seeds.select(exps, names)
        except UserError:
            if not (co and CO_AGGREGATES_ONLY.is_file()):
                raise
            exps = []  # only cells kept without evidence: the table is theirs alone
    if co:
        _co_study(exps, folders)
        return
    groups, notes = ([seeds.pool(exps)], []) if names else seeds.group(exps)
    _log_notes(notes)
    _seeds(groups, everything, folders)
