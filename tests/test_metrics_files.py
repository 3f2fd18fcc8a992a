"""`dvc metrics show` prints headline numbers a person compares: few keys, no timings, no settings; the details
stay in git as the stages' other files."""
import json
from pathlib import Path

import yaml

from energyat.reporting import headline

ROOT = Path(__file__).resolve().parents[1]
MAX_ROWS = 120  # the default run's models, comparisons and samplers, the CO study's cells, the RO study, paper jobs


def declared_metrics() -> list[str]:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    files = []
    for stage in stages.values():
        for entry in stage.get("do", stage).get("metrics", []):
            files.append(next(iter(entry)) if isinstance(entry, dict) else entry)
    return files


def test_metrics_are_rows_of_a_few_shared_columns_without_timings():
    """DVC prints one row per metrics file and one column per key name: files of the same few names make a table
    a person reads (a file of hundreds of flat keys made one row thousands of characters wide)."""
    files = declared_metrics()
    assert set(files) == {"metrics/headline/run", "metrics/headline/studies", "metrics/headline/paper"}
    rows = {p: json.loads(p.read_text()) for f in files for p in sorted((ROOT / f).glob("*.json"))}
    assert 0 < len(rows) <= MAX_ROWS, f"{len(rows)} metric rows"
    columns = {k for row in rows.values() for k in row}
    # five accuracies, each with its n and a difference's p, the worst case's interval, two study columns and the
    # five of generation: no more
    assert columns <= set(headline.COLUMNS) and len(headline.COLUMNS) <= 24
    assert all(isinstance(v, (int, float)) for row in rows.values() for v in row.values())
    assert not [c for c in columns if "second" in c or "time" in c]


def committed_rows() -> dict[str, dict]:
    return {f"{p.parent.name}/{p.stem}": json.loads(p.read_text()) for f in declared_metrics()
            for p in sorted((ROOT / f).glob("*.json"))}


def aggregates_only_rows() -> set[str]:
    """The CO study's rows of cells kept without their evidence: their image counts were not recorded."""
    study = json.loads((ROOT / "metrics/co_study.json").read_text())
    return {f"studies/co.{name}.eps{headline.eps_name(s, c['eps'])}.{c['run']}.{c['variant']}"
            for s, name in zip(study["settings"], headline.setting_names(study["settings"])) if s.get("evidence")
            for c in s["cells"]}


def test_every_accuracy_of_a_headline_row_carries_the_images_it_counts():
    rows, kept = committed_rows(), aggregates_only_rows()
    assert kept and kept <= set(rows)
    for name, row in rows.items():
        if name in kept:
            assert not any(c.startswith("n_") for c in row), name
            continue
        for col in headline.SHOWN:
            if col in row:
                assert isinstance(row.get(f"n_{col}"), int) and row[f"n_{col}"] > 0, (name, col)
        if any(c.startswith("p_") for c in row):  # a difference row: one p per column it holds
            assert {c for c in headline.SHOWN if c in row} == {c[2:] for c in row if c.startswith("p_")}, name


def test_a_worst_case_never_exceeds_an_attack_on_the_same_images():
    """Every committed model row (one run, a study cell's mean over seeds, a paper job): the worst case is at most
    each accuracy counted on the same images, and PGD + APGD at most PGD's and clean where they share them."""
    checked = 0
    for name, row in committed_rows().items():
        if name.endswith(("der-base", "best-last")) or ".der-base." in name or "worst" not in row:
            continue
        for worst in ("worst", "pgd_apgd"):
            for col in ("clean", "pgd", "pgd_apgd", "aa"):
                if col != worst and worst in row and col in row and row.get(f"n_{col}") == row.get(f"n_{worst}"):
                    assert row[worst] <= row[col] + 1e-9, (name, worst, col)
                    checked += 1
    assert checked >= 30  # the default run's models, the CO and RO studies' cells, the paper's jobs
