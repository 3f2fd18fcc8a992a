"""Seeds as DVC experiments: which experiments pool, and mean ± std with a 95 % t-interval per metric key.

Pure functions over the JSON of `dvc exp show --json` (DVC 3.x: a list of baseline commits, each with its
`experiments`, each with `revs[0].data.{params,metrics}`; per file either `{"data": ...}` or `{"error": ...}`).

- An experiment is a candidate when it finished and has at least one readable metrics file. The workspace row is
  never one (it is HEAD plus uncommitted edits); the HEAD commit itself is one, pooled like any experiment when
  its params equal a group's except `seed` (the committed default run is seed 0 of the queued seeds).
- A group is the candidates whose params (all params files, flattened) are equal except `seed` and the execution
  settings `threads`, `distributed.nproc` / `eval_nproc`, `cuda_graphs` and the GPU index of `device: cuda:N`,
  with a data source path compared by its normalised spelling (`/a/b/../c` is `/a/c`); within a group a seed
  counts once (the newest experiment with it). `device: auto` ran on the CPU (fp32) or on CUDA (bf16 autocast),
  and neither the params nor the metrics record which: it never pools with an explicit `cpu` or `cuda`, and says so
  in one line.
- Per metric key (metrics file + flattened key): numbers give n, mean, sample std and the Student-t 95 % interval
  of the mean over seeds (`stats.t_interval`); booleans give how many seeds were true.
- Robust overfitting (multi-step runs of the experiments' `runs`, read from `metrics/eval/<run>.<variant>.json`):
  the best − last gap per variant and the DER gain on the last checkpoint, paired across seeds (`stats.paired_t`,
  nan -> None when the differences have no spread; Holm-adjusted over the rows of the run's table), and per seed
  on the same test images (exact McNemar from the per-example flags, where they are readable; unadjusted).
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import posixpath
import re
from dataclasses import dataclass
from fractions import Fraction

from ..errors import UserError
from ..evaluation import stats
from ..params import VARIANTS
from ..reporting import flags as flagfile
from ..reporting.tables import METHOD_NAMES, family

PARAMS_FILE = "params.yaml"
SEED = "seed"
# how many cores / ranks compute a run, not what is computed (ranks give the same numbers; threads change only
# float summation order), whether CUDA graphs launch the steps (replays are bit-identical to eager steps; absent in
# experiments older than the param), and which GPU (`device: cuda:N` counts as `cuda`): experiments differing in
# these pool
EXECUTION = ("threads", "distributed.nproc", "distributed.eval_nproc", "cuda_graphs")
POOL_IGNORE = (SEED, *EXECUTION)
# params naming a file: `-S data.source=$PWD/../shared/x.tar.gz` and `/work/shared/x.tar.gz` are one source
PATH_PARAMS = ("data.source",)


def pooling_params(flat: dict, ignore: tuple[str, ...] = POOL_IGNORE) -> dict:
    """The flattened params that decide whether experiments pool: all but `ignore`, the GPU index dropped, file
    paths normalised (lexically: `..` and `.` segments, doubled slashes)."""
    out = {k: v for k, v in flat.items() if k not in ignore}
    if isinstance(out.get("device"), str) and out["device"].startswith("cuda:"):
        out["device"] = "cuda"
    for key in PATH_PARAMS:
        if isinstance(out.get(key), str):
            out[key] = posixpath.normpath(out[key])
    return out


EVAL = "metrics/eval/{run}.{variant}.json"
TRAIN = "metrics/train/{run}.{variant}.json"
SUMMARY = "metrics/summary.json"
WILSON_BOUNDS = ("_acc_lo", "_acc_hi")  # one seed's interval bounds: in seeds.json, not in the seeds.md tables


@dataclass(frozen=True)
class Experiment:
    name: str          # the experiment's name (`dvc exp run -n`), or the branch name / short rev of HEAD
    rev: str           # its commit
    baseline: str      # the commit it was run from (itself for HEAD)
    timestamp: str     # ISO time of its commit ("" when unknown)
    params: dict       # params file -> its nested params
    metrics: dict      # metrics file -> flat {key: value}

    @property
    def flat_params(self) -> dict:
        return flat_params(self.params)

    @property
    def seed(self):
        return self.flat_params.get(SEED)


@dataclass(frozen=True)
class Group:
    members: tuple[Experiment, ...]  # ordered by seed
    older: tuple[Experiment, ...] = ()  # earlier experiments of the same seeds (group(keep_older=True)), newest first

    @property
    def params(self) -> dict:
        """The params every member shares (all but `seed`)."""
        return {k: v for k, v in self.members[0].flat_params.items() if k != SEED}

    @property
    def id(self) -> str:
        return hashlib.sha1(json.dumps(self.params, sort_keys=True).encode()).hexdigest()[:8]

    @property
    def seeds(self) -> list:
        return [m.seed for m in self.members]

    def runs(self) -> dict[str, dict]:
        return runs_of(self.members[0].params.get(PARAMS_FILE, {}))


def runs_of(raw: dict) -> dict[str, dict]:
    """run -> {"method", "eps", "der", "overrides"} from an experiment's params.yaml as written: the run's own value,
    else `train`'s. Not validated by today's params.py, which may reject params of experiments run before a key
    was added."""
    train = raw.get("train") or {}
    out = {}
    for run, over in (raw.get("runs") or {}).items():
        over = over or {}
        eps = over.get("eps", train.get("eps"))
        out[run] = {"method": over.get("method", train.get("method")), "der": over.get("der") or {}, "overrides": over,
                    "eps": float(Fraction(str(eps))) if isinstance(eps, str) else eps}
    return out


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def flat_params(params: dict) -> dict:
    """Dotted keys of every params file; keys of a file other than params.yaml carry `<file>:`."""
    out = {}
    for file, values in params.items():
        out.update(flatten(values, "" if file == PARAMS_FILE else f"{file}:"))
    return out


def _file_data(files: dict | None) -> dict:
    """{file: data} of the files DVC could read (`{"data": ...}`), leaving out `{"error": ...}` entries."""
    return {f: v["data"] for f, v in (files or {}).items() if isinstance(v, dict) and "data" in v}


def experiments(show: list[dict], head: str | None, files=None) -> tuple[list[Experiment], list[str]]:
    """Candidates from `dvc exp show --json` (the HEAD commit `head` included), and one note per experiment
    left out (queued, running, failed, or without metrics). `files(rev, params)`, where given, adds the metrics
    files DVC does not show as metrics (the stages' per-run JSON, kept in git as plots): {file: data}."""
    found, notes = [], []
    for entry in show:
        base = entry.get("rev")
        if base == "workspace":
            continue
        rows = [(entry.get("name") or base[:7], entry)] if base == head else []
        for exp in entry.get("experiments") or []:
            state = (exp.get("executor") or {}).get("state")
            rev = (exp.get("revs") or [{}])[0]
            name = exp.get("name") or rev.get("name") or str(rev.get("rev", "?"))[:7]
            if state in ("queued", "running", "failed") or rev.get("error"):
                notes.append(f"{name}: skipped ({state or (rev.get('error') or {}).get('msg', 'error')})")
                continue
            rows.append((name, rev))
        for name, row in rows:
            data = row.get("data") or {}
            params = _file_data(data.get("params"))
            shown = _file_data(data.get("metrics"))
            if files is not None:
                shown = {**files(row.get("rev") or data.get("rev"), params), **shown}
            metrics = {f: flatten(d) for f, d in shown.items() if isinstance(d, dict)}
            if not metrics:
                notes.append(f"{name}: skipped (no metrics)")
                continue
            found.append(Experiment(name=name, rev=row.get("rev") or data.get("rev"), baseline=base,
                                    timestamp=data.get("timestamp") or "", params=params,
                                    metrics=metrics))
    return found, notes


def evidence(exp: Experiment) -> dict:
    """What an experiment contributes to an aggregate, as committed JSON (metrics/studies/<study>/<name>/)."""
    return {"name": exp.name, "rev": exp.rev, "baseline": exp.baseline, "timestamp": exp.timestamp,
            "params": exp.params, "metrics": exp.metrics}


def from_evidence(record: dict) -> Experiment:
    return Experiment(**{k: record[k] for k in ("name", "rev", "baseline", "timestamp", "params", "metrics")})


def merge(committed: list[Experiment], live: list[Experiment]) -> list[Experiment]:
    """Committed evidence, plus the experiments of git refs that it does not hold (the same commit counts once)."""
    revs = {e.rev for e in committed}
    return committed + [e for e in live if e.rev not in revs]


def select(exps: list[Experiment], names: list[str]) -> list[Experiment]:
    """The experiments matching `names`: an experiment name, a glob over names (`co-*`) or a rev prefix
    (≥ 4 hex digits); every name must match something."""
    chosen: dict[str, Experiment] = {}
    for pattern in names:
        hits = [e for e in exps if fnmatch.fnmatchcase(e.name, pattern)
                or (re.fullmatch(r"[0-9a-f]{4,40}", pattern) and e.rev.startswith(pattern))]
        if not hits:
            known = ", ".join(e.name for e in exps[:8]) + (", ..." if len(exps) > 8 else "")
            raise UserError(f"{pattern}: no finished experiment with metrics matches (candidates: {known or 'none'})")
        chosen.update({e.rev: e for e in hits})
    return list(chosen.values())


def device_clash(exps: list[Experiment]) -> str | None:
    """One line when `exps` mix `device: auto` (or no `device` param: its default) with an explicit device kind:
    they may have computed in different precisions (fp32 on the CPU, bf16 autocast on CUDA), and whether auto found
    a GPU is recorded nowhere the aggregator reads; None when they do not mix them."""
    kinds = {e.name: pooling_params(e.flat_params).get("device", "auto") for e in exps}
    auto = [name for name, kind in kinds.items() if kind == "auto"]
    other = [name for name, kind in kinds.items() if kind != "auto"]
    if not auto or not other:
        return None
    explicit = ", ".join(sorted({kinds[name] for name in other}))
    return (f"{', '.join(auto)} (device auto) and {', '.join(other)} (device {explicit}) do not pool: auto ran on "
            "the CPU (fp32) or CUDA (bf16 autocast), and no params or metrics file records which")


def differing(exps: list[Experiment], ignore: tuple[str, ...] = POOL_IGNORE) -> list[str]:
    """The flattened params whose values are not the same in all of `exps` (`ignore`d keys left out)."""
    flats = [pooling_params(e.flat_params, ignore) for e in exps]
    keys = sorted({k for f in flats for k in f})
    return [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flats}) > 1]


def _one_per_seed(members: list[Experiment], keep_older: bool = False
                  ) -> tuple[list[Experiment], list[Experiment], list[str]]:
    """One experiment per seed (the newest), ordered by seed; the older ones, newest first; notes on them."""
    by_seed: dict[str, Experiment] = {}
    older, notes = [], []
    for e in sorted(members, key=lambda e: e.timestamp, reverse=True):
        key = json.dumps(e.seed)
        if key in by_seed:
            older.append(e)
            notes.append(f"{e.name}: " + (f"fills only what {by_seed[key].name} (seed {e.seed}, newer) lacks"
                                          if keep_older else
                                          f"skipped (seed {e.seed} already pooled from {by_seed[key].name}, newer)"))
        else:
            by_seed[key] = e
    return sorted(by_seed.values(), key=lambda e: (str(type(e.seed)), e.seed)), older, notes


def group(exps: list[Experiment], min_members: int = 2, keep_older: bool = False) -> tuple[list[Group], list[str]]:
    """Experiments whose params differ only in `seed`, one group per params setting (groups with fewer than
    `min_members` seeds are left out), in the order of their first member; and notes. `keep_older`: earlier
    experiments of a seed stay in the group as `older` (the CO study takes each cell from the newest experiment
    of the seed that ran it)."""
    buckets: dict[str, list[Experiment]] = {}
    for e in exps:
        key = json.dumps(pooling_params(e.flat_params), sort_keys=True)
        buckets.setdefault(key, []).append(e)
    groups, notes = [], []
    for members in buckets.values():
        members, older, dup_notes = _one_per_seed(members, keep_older)
        notes += dup_notes
        if len(members) >= min_members:
            groups.append(Group(tuple(members), tuple(older) if keep_older else ()))
        else:
            notes.append(f"{', '.join(m.name for m in members)}: not pooled (no other seed with the same params)")
    # buckets apart only by the device: say why an auto one stays apart from an explicit one
    twins: dict[str, list[Experiment]] = {}
    for e in exps:
        rest = {k: v for k, v in pooling_params(e.flat_params).items() if k != "device"}
        twins.setdefault(json.dumps(rest, sort_keys=True), []).append(e)
    notes += [clash for same in twins.values() if (clash := device_clash(same))]
    return groups, notes


def pool(exps: list[Experiment]) -> Group:
    """Exactly these experiments as one group; refused (UserError) when params other than `seed` differ or a
    seed repeats."""
    if len(exps) < 2:
        raise UserError(f"pooling needs at least two experiments, got {len(exps)}")
    if clash := device_clash(exps):
        raise UserError(f"refusing to pool: {clash}")
    if diff := differing(exps):
        shown = ", ".join(diff[:6]) + (f" and {len(diff) - 6} more" if len(diff) > 6 else "")
        raise UserError(f"refusing to pool {', '.join(e.name for e in exps)}: params other than seed differ ({shown})")
    seeds = [json.dumps(e.seed) for e in exps]
    if len(set(seeds)) < len(seeds):
        dup = next(s for s in seeds if seeds.count(s) > 1)
        raise UserError(f"refusing to pool {', '.join(e.name for e in exps if json.dumps(e.seed) == dup)}: "
                        f"same seed {dup}")
    return Group(tuple(sorted(exps, key=lambda e: (str(type(e.seed)), e.seed))))


def labels(groups: list[Group]) -> list[str]:
    """What sets each group apart from the others (`train.eps=0.2`), "" when there is one group."""
    if len(groups) < 2:
        return ["" for _ in groups]
    keys = differing([g.members[0] for g in groups])
    return [", ".join(f"{k}={json.dumps(g.params.get(k))}" for k in keys) for g in groups]


def _number(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def finite(v):
    """NaN (the std of one seed, a p-value without spread) -> None, so that the JSON stays strict."""
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _clean(d: dict) -> dict:
    return {k: finite(v) for k, v in d.items()}


def summarize(values: list) -> dict | None:
    """Seed statistics of one metric key (`values`: one per seed, None where a seed lacks it): numbers ->
    t_interval fields; booleans -> {"n", "true"}; None when no seed has a number or a boolean."""
    if (flags := [v for v in values if isinstance(v, bool)]) and len(flags) == sum(v is not None for v in values):
        return {"n": len(flags), "true": sum(flags), "values": values}
    nums = [x for v in values if (x := _number(v)) is not None]
    if not nums:
        return None
    return {**_clean(stats.t_interval(nums)), "values": [_number(v) for v in values]}


def metric_stats(g: Group) -> dict[str, dict[str, dict]]:
    """metrics file -> key -> :func:`summarize` over the group's seeds (keys in first-seen order)."""
    out: dict[str, dict[str, dict]] = {}
    files = list(dict.fromkeys(f for m in g.members for f in m.metrics))
    for f in files:
        keys = list(dict.fromkeys(k for m in g.members for k in m.metrics.get(f, {})))
        per_key = {k: s for k in keys if (s := summarize([m.metrics.get(f, {}).get(k) for m in g.members]))}
        if per_key:
            out[f] = per_key
    return out


# ------------------------------------------------------------------------------------------ robust overfitting

def paired_over_seeds(a: list[float], b: list[float], flag_pairs: list[tuple | None] | None = None) -> dict:
    """b − a over seeds: t-interval fields, the paired-t p-value and, with `flag_pairs` (per seed the (a, b) flag
    vectors on the same test images, `flags.pair`, or None where a seed's flags were not kept), the per-seed exact
    McNemar p-values."""
    d = [y - x for x, y in zip(a, b)]
    out = {**_clean(stats.t_interval(d)), "values": d, "paired_t_p": finite(stats.paired_t(a, b))}
    if flag_pairs is not None:
        out["mcnemar_p"] = [None if pair is None else round(stats.paired_difference(*pair)["p"], 6)
                            for pair in flag_pairs]
    return out


EPOCH_COLUMNS = ("val_pgd_acc", "val_clean_acc")  # the per-epoch curves pooled over seeds


def epoch_bands(histories: list[list[dict]]) -> dict[str, dict[str, list]]:
    """Per column of EPOCH_COLUMNS, over the epochs every history has: mean and 95 % t-interval over the seeds."""
    epochs = sorted(set.intersection(*({int(r["epoch"]) for r in h} for h in histories))) if histories else []
    by_epoch = [{int(r["epoch"]): r for r in h} for h in histories]
    out = {}
    for col in EPOCH_COLUMNS:
        bands = [stats.t_interval([h[e][col] for h in by_epoch]) for e in epochs]
        out[col] = {"epoch": epochs, **{k: [finite(b[k]) for b in bands] for k in ("mean", "lo", "hi")}}
    return out


ACCURACY_KEYS = ("clean_acc", "pgd_apgd_acc", "aa_acc", "worst_acc")  # with the strongest PGD's, after clean
EXAMPLES = {"aa_acc": "aa_examples", "worst_acc": "worst_examples", "pgd_apgd_acc": "pgd_apgd_examples"}


def same_worst_case(ev: dict) -> bool:
    """Whether an evaluate JSON's `worst_acc` is the worst case of `flags.worst_cases` (on AutoAttack's images, else
    APGD's): earlier evaluations took it over the first max(APGD, AutoAttack) images."""
    return ev.get("worst_examples") == (ev.get("aa_examples") or ev.get("apgd_examples"))


def own_flags(fl: dict | None, ev: dict) -> dict | None:
    """A flags file when it is that evaluate JSON's (the same eps and test-image count), else None."""
    if not isinstance(fl, dict):
        return None
    same_eps = fl.get("eps") is None or ev.get("eps") is None or math.isclose(float(fl["eps"]), float(ev["eps"]),
                                                                            rel_tol=1e-6)
    return fl if same_eps and ev.get("n_examples") in (None, fl.get("n")) else None


def _vector(fl: dict | None, checkpoint: str, key: str) -> list[bool] | None:
    """The per-example flags behind accuracy `key`: for `pgd_apgd_acc` PGD + APGD on APGD's images also where
    AutoAttack did not run (`flags.pgd_apgd`), else `flags.accuracy_vector`."""
    if key.removesuffix("_acc") == "pgd_apgd":
        return flagfile.pgd_apgd(fl, checkpoint)
    return flagfile.accuracy_vector(fl, checkpoint, key)


def accuracy(ev: dict, fl: dict | None, checkpoint: str, key: str) -> tuple[float | None, int | None]:
    """One checkpoint's accuracy `key` and the images it counts. A worst case comes from the per-example flags where
    they were kept (`flags.worst_cases`; `pgd_apgd_acc`: PGD + APGD on APGD's images, `flags.pgd_apgd`, also where
    AutoAttack did not run), else from the evaluate JSON where it is taken over the same images; the other
    accuracies from the evaluate JSON, with the image count of their flags where kept, or from the flags alone
    where only they hold it (an evaluation joined from a re-evaluation, `reevaluation`)."""
    name = key.removesuffix("_acc")
    f = _vector(fl, checkpoint, key) if fl is not None else None
    if name in flagfile.WORST_CASES:
        if fl is not None:
            return (sum(f) / len(f), len(f)) if f else (None, None)
        if name == "pgd_apgd" and not ev.get("aa_examples") and f"{checkpoint}.{key}" not in ev:
            key = "worst_acc"  # without AutoAttack the worst case is PGD + APGD's
        if key == "worst_acc" and not same_worst_case(ev):
            return None, None
    value = ev.get(f"{checkpoint}.{key}")
    if value is None:
        return (sum(f) / len(f), len(f)) if f else (None, None)
    return value, len(f) if f else ev.get(EXAMPLES.get(key, "n_examples"))


class _RunAccuracies:
    """One run's accuracies over a group's seeds, per variant, checkpoint and key (`accuracy`), and their pairing."""

    def __init__(self, members: tuple[Experiment, ...], run: str, evals: dict, fls: dict):
        self.members, self.run, self.evals, self.fls = members, run, evals, fls
        self.found: dict[tuple, list] = {}

    def __call__(self, v: str, ck: str, key: str) -> list[tuple[float | None, int | None]]:
        if (v, ck, key) not in self.found:
            self.found[v, ck, key] = [accuracy(e, fl, ck, key) for e, fl in zip(self.evals[v], self.fls[v])]
        return self.found[v, ck, key]

    def values(self, v: str, ck: str, key: str) -> list:
        return [a for a, _ in self(v, ck, key)]

    def has(self, key: str, checkpoints=("best", "last")) -> bool:
        return all(a is not None for v in VARIANTS for ck in checkpoints for a in self.values(v, ck, key))

    def images(self, key: str, checkpoints=("best", "last")) -> int | None:
        """The test images per seed `key` counts, where one count holds for every seed, variant and checkpoint of
        `checkpoints` that has it."""
        counts = {n for v in VARIANTS for ck in checkpoints for a, n in self(v, ck, key) if a is not None}
        return counts.pop() if len(counts) == 1 and None not in counts else None

    def paired(self, va: str, cka: str, vb: str, ckb: str, key: str) -> dict:
        """(vb, ckb) − (va, cka) over seeds (`paired_over_seeds`), McNemar per seed where both flags were kept."""
        pairs = [flagfile.pair(fa, cka, fb, ckb, key, (f"{m.name}: {flagfile.PATH.format(run=self.run, variant=va)}",
                                                       f"{m.name}: {flagfile.PATH.format(run=self.run, variant=vb)}"),
                               _vector) for m, fa, fb in zip(self.members, self.fls[va], self.fls[vb])]
        return paired_over_seeds(self.values(va, cka, key), self.values(vb, ckb, key), pairs)

    def attack_check(self, v: str, ck: str) -> list[dict] | None:
        """Per seed the paired attack check from the flags where kept (with every attack joined to them), else as
        the evaluate JSON has it; None where a seed has neither."""
        keys = ("pgd_missed", "apgd_missed", "n", "p")
        out = [flagfile.attack_check(fl, ck) if fl is not None else
               ({k: e.get(f"{ck}.check.{k}") for k in keys} if f"{ck}.check.p" in e else None)
               for e, fl in zip(self.evals[v], self.fls[v])]
        return [{k: c[k] for k in keys} for c in out] if all(out) else None


def _ro_run(cfg: dict, pgd: str, acc: _RunAccuracies, hist: dict) -> dict:
    """The robust-overfitting table of one run (`robust_overfitting`)."""
    res = {"method": cfg["method"], "pgd": pgd}
    for name, key in (("", pgd), ("_pgd_apgd", "pgd_apgd_acc")):
        if key == pgd or acc.has(key):
            res[f"gap{name}"] = {v: acc.paired(v, "last", v, "best", key) for v in VARIANTS}
            res[f"gap_change{name}"] = paired_over_seeds(res[f"gap{name}"]["base"]["values"],
                                                         res[f"gap{name}"]["der"]["values"])
    # the worst case beside PGD + APGD only where AutoAttack ran (without it they are one quantity)
    keys = [k for k in ("clean_acc", pgd, "pgd_apgd_acc", "aa_acc", "worst_acc") if acc.has(k, ("last",))
            and (k != "worst_acc" or acc.has("aa_acc", ("last",)))]
    res["der_gain_last"] = {k: acc.paired("base", "last", "der", "last", k) for k in keys}
    res["levels"] = {v: {k: summarize(acc.values(v, "last", k)) for k in keys} for v in VARIANTS}
    res["images"] = {k: n for k in keys if (n := acc.images(k, ("last",))) is not None}  # the gaps': the same
    res["attack_check"] = {f"{v}.{ck}": check for v in VARIANTS for ck in ("best", "last")
                           if (check := acc.attack_check(v, ck))}
    if all(h for v in VARIANTS for h in hist[v]):
        res["epochs"] = {v: epoch_bands(hist[v]) for v in VARIANTS}
    rows = [*res["gap"].values(), res["gap_change"], *res.get("gap_pgd_apgd", {}).values(),
            *([res["gap_change_pgd_apgd"]] if "gap_change_pgd_apgd" in res else []),
            *res["der_gain_last"].values()]  # one table, one family
    for row, p in zip(rows, stats.holm([r["paired_t_p"] for r in rows])):
        row["paired_t_p_holm"] = p
    return res


def robust_overfitting(g: Group, flags: dict[tuple[str, str, str], dict],
                       histories: dict[tuple[str, str, str], list[dict]] | None = None) -> dict[str, dict]:
    """Per multi-step run of the group (with base and DER eval files in every seed): the best − last gap of the
    strongest PGD accuracy and of PGD + APGD per variant (b = best, a = last), the change of each gap with DER, the
    DER gain on the last checkpoint per accuracy (with AutoAttack and the worst case over every attack where
    AutoAttack ran on the last checkpoints), the last checkpoint's accuracies over seeds (`levels`), the test
    images per seed each key counts (`images`) and the paired attack check. Accuracies come from the per-example
    flags where kept (`accuracy`). `flags`: (rev, run, variant) -> that evaluate flags file's content."""
    out = {}
    for run, cfg in g.runs().items():
        if family(cfg["method"]) != "ro":
            continue
        evals = {v: [m.metrics.get(EVAL.format(run=run, variant=v)) for m in g.members] for v in VARIANTS}
        if not all(e for v in VARIANTS for e in evals[v]):
            continue
        pgd = flagfile.strongest_pgd((k for v in VARIANTS for e in evals[v] for k in e), "last")
        if pgd is None or not all(f"{ck}.{pgd}" in e for v in VARIANTS for e in evals[v] for ck in ("best", "last")):
            continue
        fls = {v: [own_flags(flags.get((m.rev, run, v)), e) for m, e in zip(g.members, evals[v])] for v in VARIANTS}
        hist = {v: [(histories or {}).get((m.rev, run, v)) for m in g.members] for v in VARIANTS}
        out[run] = _ro_run(cfg, pgd, _RunAccuracies(g.members, run, evals, fls), hist)
    return out


# ------------------------------------------------------------------------------------------------ output

def report(groups: list[Group], flags: dict[tuple[str, str, str], dict],
           histories: dict[tuple[str, str, str], list[dict]] | None = None,
           joined: dict[str, list[str]] | None = None) -> dict:
    """The JSON of metrics/seeds.json. `histories`: (rev, run, variant) -> that run's per-epoch history rows;
    `joined`: member rev -> the re-evaluations whose flags joined its own (`reevaluation.with_reevaluations`)."""
    joined = joined or {}
    return {"groups": [
        {"id": g.id, "label": label, "seeds": g.seeds,
         "members": [{"name": m.name, "rev": m.rev, "baseline": m.baseline, "seed": m.seed,
                      **({"reevaluated_by": joined[m.rev]} if joined.get(m.rev) else {})} for m in g.members],
         "params": g.params, "metrics": metric_stats(g),
         "robust_overfitting": robust_overfitting(g, flags, histories)}
        for g, label in zip(groups, labels(groups))]}


def _g(v) -> str:
    return "–" if v is None else f"{v:.4g}"


def fmt_points(v) -> str:
    """A difference of fractions in signed percentage points (`+4.1`), `–` when absent."""
    return "–" if v is None else f"{100 * v:+.1f}"


def _p(v) -> str:
    return "–" if v is None else ("< 0.001" if v < 0.001 else f"{v:.3f}")


def _row(key: str, s: dict) -> str:
    seeds = " | ".join("–" if v is None else (str(v) if isinstance(v, bool) else _g(v)) for v in s["values"])
    if "true" in s:
        return f"| {key} | {s['true']}/{s['n']} true | | {s['n']} | {seeds} |"
    return f"| {key} | {_g(s['mean'])} ± {_g(s['std'])} | [{_g(s['lo'])}, {_g(s['hi'])}] | {s['n']} | {seeds} |"


def _ro_lines(run: str, ro: dict, seeds: list, joined: list[str] = ()) -> list[str]:
    name = METHOD_NAMES.get(ro["method"], ro["method"])
    pgd = f"PGD-{ro['pgd'][3:-4]}"
    lines = [f"**Robust overfitting, run `{run}` ({name})**: percentage points, mean ± std over seeds [95 % "
             "t-interval]; paired t-test across seeds (Holm-adjusted over this table's rows in brackets; n/a: the "
             "differences do not vary over seeds); exact McNemar per seed on the same test images, unadjusted.", "",
             "| Quantity | mean ± std | 95 % CI | paired t p | McNemar p per seed |", "|---|---:|---:|---:|---|"]

    def row(label: str, d: dict) -> str:
        mc = ", ".join(_p(p) for p in d.get("mcnemar_p", [])) or "–"
        t = stats.fmt_p(d["paired_t_p"])
        if d.get("paired_t_p_holm") is not None:
            t += f" (Holm {stats.fmt_p(d['paired_t_p_holm'])})"
        mean, std, lo, hi = (fmt_points(d[k]) for k in ("mean", "std", "lo", "hi"))
        return f"| {label} | {mean} ± {std.lstrip('+')} | [{lo}, {hi}] | {t} | {mc} |"

    names = {"clean_acc": "clean", "aa_acc": "AutoAttack", "worst_acc": "worst case", ro["pgd"]: pgd,
             "pgd_apgd_acc": f"{pgd} + APGD"}
    for gap, key in (("gap", ro["pgd"]), ("gap_pgd_apgd", "pgd_apgd_acc")):
        for v, d in ro.get(gap, {}).items():
            lines.append(row(f"best − last {names[key]}, {'base' if v == 'base' else '+ DER'}", d))
        if f"gap_change{gap[3:]}" in ro:
            lines.append(row(f"gap change with DER (DER − base) {names[key]}", ro[f"gap_change{gap[3:]}"]))
    for k, d in ro["der_gain_last"].items():
        lines.append(row(f"DER gain, last checkpoint, {names.get(k, f'PGD-{k[3:-4]}')}", d))
    if images := ro.get("images"):
        lines += ["", "Test images per seed: " + ", ".join(f"{names.get(k, k)} {n}" for k, n in images.items())
                  + f" ({pgd} + APGD: an image counts when it survives both"
                  + ("; worst case: when it survives every attack run on it, on the images every attack ran on)."
                     if "worst_acc" in images else ").")]
    if joined:
        lines += ["", "Joined from re-evaluations of the same models (per-example flags identical on the images both "
                  "evaluated): " + ", ".join(f"`{name}`" for name in joined) + "."]
    if ro.get("attack_check"):
        lines += ["", "Paired attack check per seed (images the PGD attack left standing that APGD / AutoAttack "
                      "broke, the reverse, of n; exact one-sided binomial p, unadjusted):", "",
                  "| Model, checkpoint | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---:|" * len(seeds)]
        for key, seeds in ro["attack_check"].items():
            v, ck = key.split(".")
            cells = [f"{c['pgd_missed']} / {c['apgd_missed']} of {c['n']} (p {stats.fmt_p(c['p'])})" for c in seeds]
            lines.append(f"| {'base' if v == 'base' else '+ DER'}, {ck} | {' | '.join(cells)} |")
    return lines + [""]


def _varying(keys: dict) -> dict:
    """The keys whose value differs between seeds, without the Wilson bounds of single accuracies."""
    return {k: s for k, s in keys.items() if len({json.dumps(v) for v in s["values"]}) > 1
            and not k.endswith(WILSON_BOUNDS)}


def markdown(rep: dict) -> str:
    """metrics/seeds.md: per group its members, the robust-overfitting section, and per metric key mean ± std, the
    95 % t-interval, n and the per-seed values. Only keys of metrics/summary.json when a group has that file (the
    others are in seeds.json); keys equal in every seed and the Wilson bounds of single accuracies are left out."""
    lines = ["# Seeds: mean ± std and 95 % t-intervals", "",
             "Experiments (`dvc exp show`) whose params differ only in `seed`, pooled per group by "
             "`energyat aggregate`; std is the sample std over seeds, the interval Student-t on the mean. "
             "Every key, with per-seed values, is in `metrics/seeds.json`.", ""]
    if not rep["groups"]:
        lines.append("No two finished experiments differ only in `seed`.")
    for g in rep["groups"]:
        title = g["label"] or "pooled experiments"
        lines += [f"## {title} ({len(g['seeds'])} seeds: {', '.join(map(str, g['seeds']))})", "",
                  "Members: " + ", ".join(f"`{m['name']}` ({m['rev'][:7]}, seed {m['seed']})" for m in g["members"])
                  + "; baseline commit(s): " + ", ".join(sorted({m["baseline"][:7] for m in g["members"]})) + ".", ""]
        for run, ro in g["robust_overfitting"].items():
            lines += _ro_lines(run, ro, g["seeds"], [n for m in g["members"] for n in m.get("reevaluated_by", [])])
        # a summary.json equal in every seed is the baseline's, not re-made by the experiments (they ran no
        # `report`): the stage files then carry the results
        summary = g["metrics"].get(SUMMARY)
        files = {SUMMARY: summary} if summary and _varying(summary) else g["metrics"]
        header = "| Metric | mean ± std | 95 % CI | n | " + " | ".join(f"seed {s}" for s in g["seeds"]) + " |"
        sep = "|---|---:|---:|---:|" + "---:|" * len(g["seeds"])
        for f, keys in files.items():
            varying = _varying(keys)
            if not varying:
                continue
            lines += [f"`{f}` ({len(varying)} of {len(keys)} keys shown)", ""]
            if varying:
                lines += [header, sep, *(_row(k, s) for k, s in varying.items()), ""]
    return "\n".join(lines).rstrip() + "\n"
