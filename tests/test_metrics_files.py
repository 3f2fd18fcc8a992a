"""`dvc metrics show` prints headline numbers a person compares: few keys, no timings, no settings; the details
stay in git as the stages' other files."""
import json
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
MAX_KEYS = 400  # summary (~260 with the worst-case columns), the paper page's, the studies'


def _flat(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def declared_metrics() -> list[str]:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    files = []
    for stage in stages.values():
        for entry in stage.get("do", stage).get("metrics", []):
            files.append(next(iter(entry)) if isinstance(entry, dict) else entry)
    return files


def test_metrics_are_few_headline_numbers_without_timings():
    files = declared_metrics()
    assert all("${" not in f for f in files), "a metrics file per run or sampler multiplies the columns"
    assert {"metrics/summary.json", "metrics/paper.json", "metrics/studies.json"} <= set(files)
    keys = [k for f in files for k, _ in _flat(json.loads((ROOT / f).read_text()))]
    assert len(keys) <= MAX_KEYS, f"{len(keys)} metric keys"
    assert not [k for k in keys if "second" in k or k.startswith("aa.") or "time" in k]
