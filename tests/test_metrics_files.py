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
    assert columns <= set(headline.COLUMNS) and len(headline.COLUMNS) <= 14
    assert all(isinstance(v, (int, float)) for row in rows.values() for v in row.values())
    assert not [c for c in columns if "second" in c or "time" in c]
