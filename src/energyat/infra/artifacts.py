"""Atomic file writes and checked reads: a stage writes an output completely or not at all.

Every write goes to a temporary file beside its target (`.<name>.<random>.tmp`), is flushed to disk (fsync), then
renamed onto the target, and the directory is synced after the rename: a kill, or a crash of the machine, leaves the
old file or the new one, never a mix; at most a stray temporary file remains, which `remove_temporaries` deletes.
An OSError while writing (disk full, no permission, read-only file system) is a UserError naming the path.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import io
import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError

TMP_SUFFIX = ".tmp"

_UMASK = os.umask(0)
os.umask(_UMASK)


def _fsync(path: Path, directory: bool = False) -> None:
    if directory and not hasattr(os, "O_DIRECTORY"):
        return  # no directory handles to sync on this OS (Windows)
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if not (directory and exc.errno == errno.EINVAL):  # some file systems cannot sync a directory
            raise
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path`; once the body has written it, it is synced to disk and renamed onto
    `path`. On any error the temporary file is removed and `path` is left as it was."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        yield tmp
        _fsync(tmp)  # data on disk before the rename makes it visible
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs get the usual permissions
        os.replace(tmp, path)
        _fsync(path.parent, directory=True)  # the rename itself survives a crash of the machine
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise UserError(f"{path}: cannot write ({exc.strerror or exc})") from None
        raise


def remove_temporaries(path: str | Path) -> None:
    """Delete the temporary files that killed writes of `path` left beside it."""
    path = Path(path)
    for stray in path.parent.glob(f".{glob.escape(path.name)}.*{TMP_SUFFIX}"):
        stray.unlink(missing_ok=True)


def json_text(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def torch_bytes(obj: Any) -> bytes:
    # through a file object: torch.save(obj, <path>) embeds the file name in the archive, and identical tensors
    # must give identical bytes (DVC, the prepared-data checksums and the training state compare them)
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json_text(obj))


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_torch(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)  # streamed: prepared datasets are large


def save_sealed(path: str | Path, obj: Any) -> None:
    """torch.save `obj` together with the sha256 of its bytes, in one file: `load_sealed` detects any damage."""
    payload = torch_bytes(obj)
    write_bytes(path, torch_bytes({"sha256": digest(payload),
                                   "payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8)}))


def save_figure(path: str | Path, fig) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png", dpi=110, bbox_inches="tight")


# which `dvc repro` target makes a stage input (paths relative to the pipeline's root)
MAKERS = ((r"data/prepared", "prepare"), (r"models/base/standard", "train-standard"),
          (r"models/base/([^/]+)", r"train@\1"), (r"models/der/([^/]+)", r"train-der@\1"), (r"data/pca", "pca"),
          (r"data/samples/([^/]+)", r"sample@\1"), (r"data/class_energy\.json", "class-energy"),
          (r"metrics/eval/standard\.", "evaluate-standard"),
          (r"metrics/eval/([^/]+)\.(base|der)\.", r"evaluate@\1-\2"), (r"metrics/train/standard\.", "train-standard"),
          (r"metrics/train/([^/]+)\.base\.", r"train@\1"), (r"metrics/train/([^/]+)\.der\.", r"train-der@\1"),
          (r"metrics/score\.json", "score"), (r"metrics/sample/([^/.]+)", r"sample@\1"))


def missing(path: str | Path) -> UserError:
    """The error for a missing stage input, naming the command that makes it."""
    rel = Path(path).as_posix()
    for pattern, target in MAKERS:
        if m := re.match(pattern, rel):
            return UserError(f"{path}: file not found; make it first with `dvc repro {m.expand(target)}`")
    return UserError(f"{path}: file not found (run the stage that makes it first)")


def read_tsv(path: str | Path) -> list[dict[str, float]]:
    """A numeric TSV with a header (a per-epoch history) as rows; an empty cell is nan."""
    path = Path(path)
    if not path.is_file():
        raise missing(path)
    header, *lines = path.read_text().splitlines()
    names = header.split("\t")
    return [{k: float(v) if v else float("nan") for k, v in zip(names, line.split("\t"))} for line in lines if line]


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise missing(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def load_torch(path: str | Path) -> Any:
    """torch.load with weights_only=True (safe on untrusted files); a missing or corrupt file is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise missing(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, pickle with forbidden globals, ...
        raise UserError(f"{path}: unreadable or corrupt ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})") from None


def load_sealed(path: str | Path) -> Any:
    """The object `save_sealed` wrote; a missing file, or one whose bytes differ from its checksum, is a UserError."""
    path = Path(path)
    sealed = load_torch(path)
    if not (isinstance(sealed, dict) and set(sealed) == {"sha256", "payload"}):
        raise UserError(f"{path}: corrupt (no checksum)")
    payload = sealed["payload"].numpy().tobytes()
    if digest(payload) != sealed["sha256"]:
        raise UserError(f"{path}: corrupt (checksum differs from its contents)")
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)


def sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_rows(folder: str | Path, rows: dict[str, dict]) -> None:
    """`folder/<row>.json` for each row (headline rows, a folder DVC declares as metrics); files of rows that no
    longer exist are removed (a stage run outside DVC, which would have removed the whole folder first)."""
    folder = Path(folder)
    if folder.is_dir():
        for old in folder.glob("*.json"):
            if old.stem not in rows:
                old.unlink()
    for name, row in rows.items():
        write_json(folder / f"{name}.json", row)
