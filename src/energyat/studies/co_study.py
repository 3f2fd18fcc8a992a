"""The catastrophic-overfitting study table: single-step methods ± DER (rows) against ε (columns), over seeds.

Pure functions over aggregate.Group's (experiments that differ only in `seed`). A group is one ε of one setting;
a setting is everything but `seed` and `train.eps`, so a study queued as `-S seed=S -S train.eps=E` gives one
table whose columns are the E's (a run with its own `eps` goes to the column of that ε). Rows are the
single-step runs of `runs` (the method's name, "+ DER" for the DER twin, and that run's `der:` overrides, e.g.
"FGSM + DER (aae: start, aae_norm: batch)"); a run that differs from an earlier one only in `der:` adds its DER
row only, since its base model is that earlier run's.

Cells, final checkpoint (`last`) of metrics/eval/<run>.<variant>.json: clean, the strongest PGD, PGD + APGD,
AutoAttack and worst-case accuracy as mean ± std over seeds, with the test images per seed each counts (`images`;
the worst cases recomputed from the per-example flags where they were kept, `flags.worst_cases`); and from
metrics/train/<run>.<variant>.json how many seeds collapsed:
`co_at_end` (catastrophic overfitting that the final model still shows) and, counted separately, `diverged`
(validation clean accuracy fell below twice chance at some epoch after having been above it; a run may recover,
which the clean-accuracy table shows); a seed may be in both. `catastrophic_overfitting` (CO at any epoch, even if
later recovered) is kept in the JSON.

Where a run's base and DER cells share seeds: `der_gain`, DER minus base per accuracy over those seeds (mean, the
t-interval, paired-t p, each seed's exact McNemar p from the per-example flags where they were kept), with the
paired-t p Holm-adjusted over the setting's differences; and per seed the evaluation's paired attack check (images
PGD left standing that APGD / AutoAttack broke, the reverse, the one-sided binomial p).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import UserError
from ..evaluation import stats
from ..params import VARIANTS
from ..reporting import flags as flagfile
from ..reporting.tables import METHOD_NAMES, family
from .seeds import (
    EVAL,
    PATH_PARAMS,
    POOL_IGNORE,
    TRAIN,
    Group,
    accuracy,
    differing,
    finite,
    fmt_points,
    own_flags,
    paired_over_seeds,
    pooling_params,
)

COUNTS = ("co_at_end", "catastrophic_overfitting", "diverged")
CHECK = ("pgd_missed", "apgd_missed", "n", "p")  # the evaluate stage's paired attack check (last.check.*)
EPS = "train.eps"
AGGREGATES_ONLY = "aggregates only"  # a setting kept from an earlier table whose experiments' evidence was lost


def fmt_eps(eps: float) -> str:
    """0.1 -> "0.1", 8/255 -> "8/255" (k/255 when a short decimal would not be exact)."""
    k = eps * 255
    if len(f"{eps:g}") > 6 and abs(k - round(k)) < 1e-6:
        return f"{round(k)}/255"
    return f"{eps:g}"


def _rows(g: Group) -> list[dict]:
    """The table rows a group supplies: single-step runs × variants, with their labels."""
    rows, seen_base = [], set()
    for run, cfg in g.runs().items():
        if family(cfg["method"]) != "co":
            continue
        base_key = json.dumps({k: v for k, v in cfg["overrides"].items() if k != "der"}, sort_keys=True)
        for variant in VARIANTS:
            if variant == "base" and base_key in seen_base:
                continue
            label = METHOD_NAMES.get(cfg["method"], cfg["method"])
            if variant == "der":
                overrides = ", ".join(f"{k}: {v}" for k, v in cfg["der"].items())
                label += " + DER" + (f" ({overrides})" if overrides else "")
            rows.append({"label": label, "run": run, "variant": variant, "method": cfg["method"],
                         "der": cfg["der"] if variant == "der" else {}, "eps": cfg["eps"]})
        seen_base.add(base_key)
    labels = [r["label"] for r in rows]
    for r in rows:  # runs the labels cannot tell apart (e.g. two FGSM runs of different length) carry their name
        if labels.count(r["label"]) > 1:
            r["label"] += f" [{r['run']}]"
    return rows


def _accuracy_keys(pgd: str | None) -> list[str]:
    return [k for k in ("clean_acc", pgd, "pgd_apgd_acc", "aa_acc", "worst_acc") if k]


def _own(m, cell: dict, ev: dict, tr: dict) -> bool:
    """Whether the cell's metrics files were made by this experiment. One that ran only some runs' stages still
    holds its base commit's files for the others (the default run's, say), which give themselves away by the eps,
    method or test-image count they record."""
    recorded = ev or tr
    eps, n = recorded.get("eps"), ev.get("n_examples")
    wanted_n = m.flat_params.get("evaluate.n_examples")
    return ((eps is None or math.isclose(float(eps), cell["eps"], rel_tol=1e-6))
            and recorded.get("method", cell["method"]) == cell["method"]
            and (n is None or wanted_n is None or n == wanted_n))


def _seed_record(m, cell: dict, pgd: str | None, flags: dict | None = None) -> dict | None:
    """One seed of one cell: final-checkpoint accuracies, the images each counts (`images`) and collapse flags (None
    when the seed has neither file of its own). Accuracies come from the seed's per-example flags where they were
    kept (the worst cases recomputed, `flags.worst_cases`), else from its evaluate JSON (its `worst_acc` only where
    it is taken over the same images)."""
    ev = m.metrics.get(EVAL.format(run=cell["run"], variant=cell["variant"])) or {}
    tr = m.metrics.get(TRAIN.format(run=cell["run"], variant=cell["variant"])) or {}
    if not (ev or tr) or not _own(m, cell, ev, tr):
        return None
    fl = own_flags((flags or {}).get((m.rev, cell["run"], cell["variant"])), {"eps": cell["eps"], **ev})
    found = {k: accuracy(ev, fl, "last", k) for k in _accuracy_keys(pgd)}
    record = {"seed": m.seed, "name": m.name, "rev": m.rev, **{k: a for k, (a, _) in found.items()},
              **{k: tr.get(k) for k in COUNTS}, "images": {k: n for k, (_, n) in found.items() if n is not None}}
    if "last.check.p" in ev:
        record["check"] = {k: ev.get(f"last.check.{k}") for k in CHECK}
    return record


def _newest_record(g: Group, m, cell: dict, pgd: str | None, flags: dict | None = None) -> dict | None:
    """Seed `m.seed`'s record of the cell from the newest of its experiments that ran the cell (`m`, then the
    group's older experiments of that seed): a later experiment of a few runs adds cells without hiding the
    others."""
    same_seed = [o for o in g.older if json.dumps(o.seed) == json.dumps(m.seed)]
    return next((rec for e in (m, *same_seed) if (rec := _seed_record(e, cell, pgd, flags))), None)


def _images(records: list[dict], keys: list[str]) -> dict:
    """{key: test images per seed} where every record counts the same number."""
    counts = {k: {r.get("images", {}).get(k) for r in records} for k in keys}
    return {k: n.pop() for k, n in counts.items() if len(n) == 1 and None not in n}


def _stats(values: list) -> dict | None:
    nums = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return {k: finite(v) for k, v in stats.t_interval(nums).items()} if nums else None


def _cells(groups: list[tuple[Group, list[dict]]], pgd: str | None, flags: dict | None = None
           ) -> dict[tuple[str, float], dict]:
    """(row label, eps) -> cell, over the groups of one setting."""
    cells = {}
    for g, rows in groups:
        for r in rows:
            where = (r["label"], r["eps"])
            if where in cells:
                raise UserError(f"co study: two groups fill the cell {r['label']} at eps {r['eps']:g} "
                                f"({cells[where]['group']}, {g.id}); their params differ in more than seed and eps")
            seeds = [rec for m in g.members if (rec := _newest_record(g, m, r, pgd, flags))]
            if seeds:
                summaries = {k: _stats([x[k] for x in seeds]) for k in _accuracy_keys(pgd)}
                cells[where] = {**r, "group": g.id, "n": len(seeds), "seeds": seeds,
                                "stats": summaries, "images": _images(seeds, [k for k, v in summaries.items() if v]),
                                **{k: sum(bool(x[k]) for x in seeds) for k in COUNTS}}
    return cells


def der_gains(cells: list[dict], pgd: str | None, flags: dict[tuple[str, str, str], dict]) -> list[dict]:
    """DER − base of every run and ε with both cells, over the seeds they share, per accuracy both report; the
    paired-t p-values Holm-adjusted over all of them (one family per setting). `flags`: (rev, run, variant) -> that
    evaluate flags file's content, for the per-seed McNemar p (left None where a seed's flags were not kept)."""
    by_cell = {(c["run"], c["variant"], c["eps"]): c for c in cells}
    out = []
    for (run, variant, eps), der in by_cell.items():
        base = by_cell.get((run, "base", eps))
        if variant != "der" or base is None:
            continue
        base_seeds = {json.dumps(x["seed"]): x for x in base["seeds"]}
        pairs = [(base_seeds[key], x) for x in der["seeds"] if (key := json.dumps(x["seed"])) in base_seeds]
        metrics = {}
        for k in _accuracy_keys(pgd):
            if pairs and all(isinstance(a.get(k), (int, float)) and isinstance(b.get(k), (int, float))
                             for a, b in pairs):
                flag_pairs = [flagfile.pair(own_flags(flags.get((a["rev"], run, "base")), base), "last",
                                            own_flags(flags.get((b["rev"], run, "der")), der), "last", k,
                                            (_where(a, run, "base"), _where(b, run, "der"))) for a, b in pairs]
                metrics[k] = paired_over_seeds([a[k] for a, _ in pairs], [b[k] for _, b in pairs], flag_pairs)
        if metrics:
            images = _images([x for pair in pairs for x in pair], list(metrics))
            out.append({"run": run, "eps": eps, "label": der["label"], "seeds": [b["seed"] for _, b in pairs],
                        "metrics": metrics, "images": images})
    family = [m for d in out for m in d["metrics"].values()]
    for m, p in zip(family, stats.holm([m["paired_t_p"] for m in family])):
        m["paired_t_p_holm"] = p
    return out


def _where(record: dict, run: str, variant: str) -> str:
    """A seed's flags file, in words."""
    return f"{record.get('name')}: {flagfile.PATH.format(run=run, variant=variant)}"


def _shown(key: str, value):
    """A param's value in a setting's label: a data file by its name (where it lay is the machine's business)."""
    return Path(value).name if key in PATH_PARAMS and isinstance(value, str) else value


def study(groups: list[Group], flags: dict[tuple[str, str, str], dict] | None = None) -> dict:
    """The JSON of metrics/co_study.json: per setting its label (the params that set it apart from the other
    settings), the PGD key, its ε columns, row labels and cells (per-seed records, mean ± std with the t-interval
    per accuracy, collapse counts) and the DER − base differences (`der_gains`)."""
    settings: dict[str, list[tuple[Group, list[dict]]]] = {}
    for g in groups:
        if rows := _rows(g):
            key = json.dumps({k: v for k, v in g.params.items() if k != EPS}, sort_keys=True)
            settings.setdefault(key, []).append((g, rows))
    firsts = [gs[0][0].members[0] for gs in settings.values()]
    distinct = differing(firsts, ignore=(*POOL_IGNORE, EPS))
    out = []
    for gs, first in zip(settings.values(), firsts):
        pgd = flagfile.strongest_pgd((k for g, rows in gs for r in rows for m in g.members
                                      for k in m.metrics.get(EVAL.format(run=r["run"], variant=r["variant"])) or {}),
                                     "last")
        if cells := _cells(gs, pgd, flags):
            out.append({"title": _title(first.flat_params),
                        "label": ", ".join(f"{k}={json.dumps(_shown(k, first.flat_params.get(k)))}" for k in distinct),
                        "pgd": pgd, "eps": sorted({e for _, e in cells}),
                        "params": {k: v for k, v in pooling_params(first.flat_params).items() if k != EPS},
                        "rows": list(dict.fromkeys(label for label, _ in cells)), "cells": list(cells.values()),
                        "der_gain": der_gains(list(cells.values()), pgd, flags or {})})
    return {"settings": out}


def _label_params(label: str) -> dict:
    """The `k=v` pairs of a setting's label (values as JSON)."""
    return {k: json.loads(v) for k, _, v in (part.partition("=") for part in label.split(", ") if "=" in part)}


def same_setting(earlier: dict, fresh: dict) -> bool:
    """Whether a fresh setting has every param value that an earlier setting's label names (a data file by its
    name): the same dataset, schedule and DER variant, re-run."""
    params = fresh.get("params", {})
    return earlier["title"] == fresh["title"] and all(
        k not in params or _shown(k, params[k]) == _shown(k, v) for k, v in _label_params(earlier["label"]).items())


def with_aggregates_only(st: dict, earlier: dict) -> dict:
    """`st` plus the cells of `earlier` (a co_study.json whose experiments left no evidence) that `st` has not
    re-run (the same setting, row and ε): those settings are marked AGGREGATES_ONLY and come after the others."""
    kept = []
    for s in earlier["settings"]:
        fresh = {(c["label"], c["eps"]) for f in st["settings"] if same_setting(s, f) for c in f["cells"]}
        cells = [c for c in s["cells"] if (c["label"], c["eps"]) not in fresh]
        if cells:
            labels = {c["label"] for c in cells}
            kept.append({**s, "evidence": AGGREGATES_ONLY, "eps": sorted({c["eps"] for c in cells}),
                         "rows": [r for r in s["rows"] if r in labels], "cells": cells})
    return {"settings": [*st["settings"], *kept]}


def _title(flat: dict) -> str:
    """A setting's heading: its dataset, and the file an image folder came from."""
    dataset, source = flat.get("data.dataset") or "dataset of params.yaml", flat.get("data.source")
    return dataset + (f" ({Path(str(source)).name})" if dataset == "image-folder" and source else "")


def _cell(s: dict | None, n_max: int) -> str:
    if s is None:
        return "–"
    txt = f"{100 * s['mean']:.1f}" + (f" ± {100 * s['std']:.1f}" if s["std"] is not None else "")
    return txt + (f" (n={s['n']})" if s["n"] < n_max else "")


INTRO = ("# Catastrophic overfitting: single-step methods ± DER", "",
         "Final checkpoint; accuracy (%) mean ± std over seeds (the t-intervals and every seed's values are in "
         "`metrics/co_study.json`); collapsed: seeds whose final model is in catastrophic overfitting "
         "(`co_at_end`), and seeds that diverged at some epoch (validation clean accuracy fell below twice chance "
         "after having been above it; the clean-accuracy table shows whether the final model recovered), of the "
         "seeds run; PGD + APGD: per image, robust only if it survived PGD with its restarts and APGD-CE + APGD-T, "
         "on APGD's images; worst case: robust only if it survived every attack run on it (PGD, APGD-CE + APGD-T, "
         "AutoAttack), on the images every attack ran on (AutoAttack's). Each table names the test images per "
         "seed it counts. Made by `energyat aggregate --co-study`.", "")


def markdown(st: dict) -> str:
    """metrics/co_study.md: per setting, tables PGD / AutoAttack / clean accuracy and collapsed seeds, rows
    method ± DER, columns ε."""
    settings = st["settings"]
    lines = [*INTRO] + ([] if settings else ["No finished experiment with single-step runs."])
    mixed = any(s.get("evidence") == AGGREGATES_ONLY for s in settings)
    fresh = any(s.get("evidence") != AGGREGATES_ONLY for s in settings)
    for s in settings:
        seeds = sorted({x["seed"] for c in s["cells"] for x in c["seeds"]})
        lines += [*_heading(s, len(settings) > 1, mixed, fresh), *_accuracy_tables(s), *_collapsed(s), "",
                  f"Seeds: {', '.join(map(str, seeds))}; (n=k): a cell with fewer seeds than the others.", "",
                  *_gain_lines(s), *_check_lines(s, seeds)]
    return "\n".join(lines).rstrip() + "\n"


def _heading(s: dict, several: bool, mixed: bool, fresh: bool) -> list[str]:
    """A setting's heading (where there is more than one setting or it has a label), the params that set it apart,
    and for a setting kept as aggregates only, a note saying so. `mixed`: some settings are aggregates only, so the
    others say where their evidence is; `fresh`: some are not, so the note points at them."""
    legacy = s.get("evidence") == AGGREGATES_ONLY
    lines = []
    if s["label"] or several:
        where = f" — {AGGREGATES_ONLY}" if legacy else " — evidence in `metrics/studies/co/`" if mixed else ""
        lines += [f"## {s['title']}{where}", ""]
    if s["label"]:
        lines += [f"Params that set this setting apart: {s['label']}.", ""]
    if legacy:
        lines += [f"*{AGGREGATES_ONLY.capitalize()}*: the per-run evidence of these experiments (flags, histories) "
                  "was not kept; the numbers come from the table they made, `metrics/studies/co/aggregates-only.json`."
                  + (" Cells re-run since are in the settings above." if fresh else ""), ""]
    return lines


def _grid(s: dict, text: dict[tuple[str, float], str]) -> list[str]:
    """A table of `text` ((row label, ε) -> cell) with the setting's rows and ε columns, `–` where a row has no cell
    at that ε."""
    return ["| Method | " + " | ".join(f"ε = {fmt_eps(e)}" for e in s["eps"]) + " |",
            "|---|" + "---:|" * len(s["eps"]),
            *(f"| {row} | " + " | ".join(text.get((row, e), "–") for e in s["eps"]) + " |" for row in s["rows"])]


def _accuracy_tables(s: dict) -> list[str]:
    """One table per accuracy: the strongest PGD (where known), AutoAttack, PGD + APGD and the worst case (where some
    cell has them), clean."""
    n_max = max(c["n"] for c in s["cells"])
    pgd = f"PGD-{s['pgd'][3:-4]}" if s["pgd"] else "PGD"
    worst = [(title, key) for title, key in ((f"{pgd} + APGD", "pgd_apgd_acc"), ("Worst-case", "worst_acc"))
             if any(c["stats"].get(key) for c in s["cells"])]
    lines = []
    for title, key in [*([(pgd, s["pgd"])] if s["pgd"] else []), ("AutoAttack", "aa_acc"), *worst,
                       ("Clean", "clean_acc")]:
        text = {(c["label"], c["eps"]): _cell(c["stats"].get(key), n_max) for c in s["cells"]}
        lines += [f"**{title} accuracy (%)**{_images_note(s['cells'], key)}", "", *_grid(s, text), ""]
    return lines


def _collapsed(s: dict) -> list[str]:
    """Per cell the seeds in catastrophic overfitting at the end and those that diverged, of the seeds run."""
    text = {(c["label"], c["eps"]): f"CO {c['co_at_end']}/{c['n']} · div {c['diverged']}/{c['n']}" for c in s["cells"]}
    return ["**Collapsed seeds** (catastrophic overfitting at the end · diverged at some epoch)", "", *_grid(s, text)]


def _images_note(cells: list[dict], key: str) -> str:
    """` (500 test images per seed)`, where the cells' evidence records it."""
    counts = {c.get("images", {}).get(key) for c in cells if c["stats"].get(key)} - {None}
    if not counts:
        return ""
    return f" ({' or '.join(map(str, sorted(counts)))} test images per seed)"


def _gain_lines(s: dict) -> list[str]:
    """DER − base per run and ε: mean [t-interval], paired-t p (Holm), and each seed's difference (McNemar p)."""
    gains = s.get("der_gain") or []
    if not gains:
        return []
    keys = [k for k in _accuracy_keys(s["pgd"]) if any(k in d["metrics"] for d in gains)]
    names = {"clean_acc": "Clean", "aa_acc": "AutoAttack", "worst_acc": "Worst case",
             "pgd_apgd_acc": f"PGD-{s['pgd'][3:-4]} + APGD" if s["pgd"] else "PGD + APGD"}
    lines = ["**DER − base** (points; mean over the seeds both ran [95 % t-interval], paired-t p and its "
             "Holm-adjusted value over this setting's differences; below, each seed's difference with its exact "
             "McNemar p on the same test images)", "",
             "| Method | ε | " + " | ".join(names.get(k, f"PGD-{k[3:-4]}") for k in keys) + " |",
             "|---|---|" + "---:|" * len(keys)]
    per_seed = []
    for d in gains:
        cells = []
        for k in keys:
            m = d["metrics"].get(k)
            cells.append("–" if m is None else f"{fmt_points(m['mean'])} [{fmt_points(m['lo'])}, "
                         f"{fmt_points(m['hi'])}], p {stats.fmt_p(m['paired_t_p'])} "
                         f"(Holm {stats.fmt_p(m.get('paired_t_p_holm'))})")
            if m is not None and k in (s["pgd"], "pgd_apgd_acc", "worst_acc"):
                seeds = ", ".join(f"seed {seed}: {fmt_points(v)}" + (f" (p {stats.fmt_p(p)})" if p is not None else "")
                                  for seed, v, p in zip(d["seeds"], m["values"],
                                                        m.get("mcnemar_p") or [None] * len(d["seeds"])))
                per_seed.append(f"- {d['label']}, ε = {fmt_eps(d['eps'])}, {names.get(k, f'PGD-{k[3:-4]}')}: {seeds}")
        lines.append(f"| {d['label']} | {fmt_eps(d['eps'])} | " + " | ".join(cells) + " |")
    return lines + ["", *per_seed, ""]


def _check_lines(s: dict, seeds: list) -> list[str]:
    """Per cell and seed the evaluation's paired attack check, where it was run."""
    checked = [c for c in s["cells"] if any("check" in x for x in c["seeds"])]
    if not checked:
        return []
    lines = ["**Paired attack check** (final model; per seed: images PGD left standing that APGD / AutoAttack broke · "
             "the reverse, of the images both ran on, and the exact one-sided binomial p of the first count; a small "
             "p says PGD alone overstates robustness)", "",
             "| Method | ε | " + " | ".join(f"seed {x}" for x in seeds) + " |", "|---|---|" + "---:|" * len(seeds)]
    for c in checked:
        by_seed = {json.dumps(x["seed"]): x.get("check") for x in c["seeds"]}
        cells = [(f"{ch['pgd_missed']} · {ch['apgd_missed']} of {ch['n']} (p {stats.fmt_p(ch['p'])})"
                  if (ch := by_seed.get(json.dumps(seed))) else "–") for seed in seeds]
        lines.append(f"| {c['label']} | {fmt_eps(c['eps'])} | " + " | ".join(cells) + " |")
    return lines + [""]
