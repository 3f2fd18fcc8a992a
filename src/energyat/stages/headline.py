"""Writes headline rows (`energyat.headline`) as one JSON file per row into a folder that DVC declares as metrics."""
from __future__ import annotations

from pathlib import Path

from ..artifacts import write_json


def write(folder: str | Path, rows: dict[str, dict]) -> None:
    """`folder/<row>.json` for each row; files of rows that no longer exist are removed (a stage run outside DVC,
    which would have removed the whole folder first)."""
    folder = Path(folder)
    if folder.is_dir():
        for old in folder.glob("*.json"):
            if old.stem not in rows:
                old.unlink()
    for name, row in rows.items():
        write_json(folder / f"{name}.json", row)
