"""`remote add [URL] [--name N]` and `remote push`: share the pipeline's outputs and runs through a DVC remote (docs/sharing.md).

`remote add` writes the default remote into .dvc/config, the committed config, so that every clone pulls from it once
that file is committed. The URL is checked before the config changes, so a bad one leaves a working remote in
place: an unknown scheme, a cloud remote whose DVC plugin is not installed, a local folder whose parent is missing
(a mistyped mount). A relative URL (`make remote`'s default) is resolved by DVC against each clone, so every clone beside
this one finds the same store, where an absolute path under one user's $HOME would be wrong for the others.

`remote push` is `dvc push --run-cache` and the files the run records name. `dvc push --run-cache` sends the outputs of
dvc.lock and the run records (every stage run of this clone, DVC experiments included), not the files those records
name, and this pipeline's records name its git-tracked metrics and plots as cached files too: without them a
clone's `dvc exp run --pull -S ...` would run the stages again instead of restoring them.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

from ..errors import UserError



def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("add", "push"),
                   help="add: make URL the default remote; push: send the outputs, the run-cache and its files")
    p.add_argument("url", nargs="?", default=None, metavar="URL",
                   help="add: a folder or an s3://, gs://, ssh:// URL (`make remote` gives ../energyat-dvc-store)")
    p.add_argument("--name", default="storage", help="add: the remote's name (default: storage)")


def check_url(url: str) -> None:
    """A UserError naming what is wrong with `url` as a DVC remote, before anything is written."""
    import dvc
    from dvc.fs import get_cloud_fs

    if not url:  # None (not given) or ""
        raise UserError("URL is empty (make remote URL=<folder or s3://, gs://, ssh://... URL>)")
    try:
        protocol = get_cloud_fs({}, url=url)[0].protocol
    except ImportError as exc:  # "s3 is supported, but requires 'dvc-s3' to be installed"
        plugin = re.search(r"'dvc-([\w-]+)'", str(exc))
        # dvc's extra at the installed version: the plugin comes without moving dvc itself
        hint = f": {sys.executable} -m pip install 'dvc[{plugin[1]}]=={dvc.__version__}'" if plugin else ""
        raise UserError(f"{url}: {exc}{hint} (docs/sharing.md)") from None
    except Exception as exc:  # noqa: BLE001 - dvc's own config errors ("Unsupported URL type ftp://")
        raise UserError(f"{url}: {exc}") from None
    if protocol == "local":
        parent = os.path.dirname(os.path.abspath(url))
        if not os.path.isdir(parent):
            raise UserError(f"{url}: {parent} does not exist (create or mount it first)")
        if os.path.exists(url) and not os.path.isdir(url):
            raise UserError(f"{url}: a file, not a folder")


def _dvc(*args: str) -> None:
    if subprocess.run([sys.executable, "-m", "dvc", *args]).returncode:  # the dvc of this environment
        raise UserError(f"dvc {' '.join(args)} failed (its output is above)")


def add_remote(url: str, name: str) -> None:
    check_url(url)
    _dvc("remote", "add", "--project", "--default", "--force", "-q", name, url)
    print(f"DVC remote '{name}' -> {url}, the default, in .dvc/config: commit that file so clones pull from it;\n"
          "then 'make push' sends the outputs and the run-cache")


def push_run_outputs() -> None:
    """The files every run record of this clone names, from the local cache to the default remote."""
    from dvc.cachemgr import LEGACY_HASH_NAMES
    from dvc.exceptions import CollectCacheError
    from dvc.repo import Repo

    with Repo() as repo:
        runs = repo.stage_cache
        records = [(os.path.basename(d), f) for d, _, files in os.walk(runs.cache_dir) for f in files]
        objs, gone = set(), 0
        for record in records:
            try:
                objs.update(*runs.get_used_objs([record]).values())
            except CollectCacheError:  # a folder output since removed from the local cache (dvc gc): nothing to send
                gone += 1
        present = {h for h in objs
                   if (repo.cache.legacy if h.name in LEGACY_HASH_NAMES else repo.cache.local).exists(h.value)}
        result = repo.cloud.push(present)
    gone += len(objs) - len(present)
    print(f"{len(result.transferred)} files of {len(records)} stage runs pushed"
          + (f" ({gone} of their outputs are no longer in the local cache)" if gone else ""))
    if result.failed:
        raise UserError(f"{len(result.failed)} files of the run records could not be pushed")


def run(_params: None, ns: argparse.Namespace) -> None:
    if ns.action == "add":
        add_remote(ns.url, ns.name)
    else:
        _dvc("push", "--run-cache")
        push_run_outputs()
