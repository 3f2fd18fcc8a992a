"""`python -m energyat [--nproc N] <stage> [args]`: one entry per dvc.yaml stage; no logic lives here.

`--nproc N` (default auto: params `distributed.nproc`, for evaluate / analyze `distributed.eval_nproc`) runs a stage
of DISTRIBUTED on N ranks of this machine through torchrun's own launcher (`torch.distributed.run`, standalone
rendezvous); under an outer `torchrun` (several machines) the process is already a rank and runs the stage directly.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import uuid

from .errors import UserError

DISTRIBUTED = ("train", "evaluate", "analyze", "sample")
LAUNCHED = "ENERGYAT_LAUNCHED"  # set for the ranks our launcher starts: they leave the error line to it

# stage or command name -> (module under energyat: stages.* are dvc.yaml stages, commands.* the other commands;
# argument names; one line for --help)
STAGES: dict[str, tuple[str, tuple[str, ...], str]] = {
    "prepare": ("stages.prepare", (), "dataset -> data/prepared (train/val/test tensors, checksums)"),
    "train": ("stages.train", ("run", "variant"), "train one run without (base) or with (der) DER, resumable per epoch"),
    "evaluate": ("stages.evaluate", ("run", "variant"), "clean, PGD-k (restarts) and AutoAttack accuracy of a run's checkpoints"),
    "analyze": ("stages.analyze", (), "energies of natural vs adversarial test images, per attack"),
    "pca": ("stages.pca", (), "class-wise global and local PCA of the training images"),
    "class-energy": ("stages.class_energy", (), "mean energy E(x,y) of each class's training images (adaptive stopping's target)"),
    "sample": ("stages.sample", ("sampler",), "SGLD samples from the base and DER models with one sampler"),
    "score": ("stages.score", (), "IS / FID / diversity of the samples"),
    "report": ("stages.report", (), "summary metrics and the CO / RO / training tables"),
    "paper-report": ("stages.paper_report", (), "docs/paper.md from the paper-setting evidence in metrics/paper/"),
    "study-figures": ("stages.study_figures", (), "figures of the CO and RO studies from their committed aggregates"),
    "bench": ("commands.bench", (), "training and AutoAttack speed -> metrics/bench.json (not a dvc.yaml stage)"),
    "aggregate": ("commands.aggregate", ("names...", "--co-study", "--export"),
                  "pool seeds from DVC experiments -> metrics/seeds.* or co_study.* (not a dvc.yaml stage)"),
    "block": ("commands.block", (), "the paper's setting in GPU-window blocks (not a dvc.yaml stage; own arguments)"),
    "preset": ("commands.preset", (), "run a preset as the DVC experiment `dvc exp run -S ...` (not a dvc.yaml stage)"),
    "remote": ("commands.remote", (), "add a DVC remote, or push outputs + run-cache to it (not a dvc.yaml stage)"),
}
ARGUMENTS = {  # positional argument -> add_argument options
    "run": {"help": "a run of params.yaml `runs`, or standard"},
    "variant": {"choices": ("base", "der"), "help": "base: without DER; der: with DER"},
    "sampler": {"help": "a sampler of params.yaml `sample.samplers`"},
    "names...": {"nargs": "*", "help": "experiment names or globs to pool (default: all)"},
    "--co-study": {"action": "store_true", "help": "write metrics/co_study.{md,json} instead of metrics/seeds.*"},
    "--export": {"default": "", "metavar": "STUDY",
                 "help": "write the experiments' evidence to metrics/studies/STUDY/ (refs do not survive a clone)"},
}
EPILOG = """Every stage reads params.yaml (--params). Environment: ENERGYAT_PROGRESS=1 shows progress bars when stderr is
not a terminal (they are on at a terminal; DVC and CI logs get one line per epoch with an ETA instead)."""
OWN_ARGUMENTS = ("block", "preset", "remote")  # stages that declare their own arguments (add_arguments) and read no params.yaml


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    argv = sys.argv[1:] if argv is None else argv
    ns = parser.parse_args(argv)
    from .infra import distributed

    rank = f" (rank {os.environ['RANK']})" if distributed.launched() else ""
    launched_here = bool(os.environ.get(LAUNCHED))
    if launched_here:
        _die_with_launcher()
    try:
        return _run_stage(ns, argv)
    except UserError as exc:
        if launched_here:
            _record(exc)
        else:
            print(f"energyat {ns.stage}: error{rank}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"energyat {ns.stage}: interrupted; completed outputs are kept, rerun to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a rank of our launcher reports through it, traceback included
        if not launched_here:
            raise
        _record(exc)
        return 1
    finally:
        distributed.shutdown()  # a rank that exits with its process group alive can abort in gloo's teardown


def _parser() -> argparse.ArgumentParser:
    """The command line: the global options, then one subcommand per stage of STAGES."""
    parser = argparse.ArgumentParser(prog="energyat", description=__doc__.split("\n\n")[0], epilog=EPILOG)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--nproc", type=_nproc, default="auto",
                        help=f"ranks for {', '.join(DISTRIBUTED)} (default auto: params distributed.nproc, for "
                             "evaluate / analyze distributed.eval_nproc)")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="stage", title="stages")
    for name, (module_name, args, about) in STAGES.items():
        p = sub.add_parser(name, help=about, description=about)
        if name in OWN_ARGUMENTS:
            importlib.import_module(f"energyat.{module_name}").add_arguments(p)
        for arg in args:
            p.add_argument(arg.rstrip("."), **ARGUMENTS[arg])
    return parser


def _run_stage(ns: argparse.Namespace, argv: list[str]) -> int:
    """Run the stage in this process, or launch it on several local ranks (`--nproc`); its exit status."""
    from . import params as params_mod
    from .infra import distributed

    if ns.stage in OWN_ARGUMENTS:  # these build their params themselves (a block: preset + its overrides)
        module = importlib.import_module(f"energyat.{STAGES[ns.stage][0]}")
        module.run(None, ns)
        return 0
    params = params_mod.load(ns.params)
    if ns.stage in DISTRIBUTED and not distributed.launched():
        from .infra.runtime import device_type

        kind = device_type(params.device)
        nproc = params.stage_nproc(ns.stage, kind) if ns.nproc == "auto" else ns.nproc
        distributed.check_nproc(nproc, kind, params.nproc_key(ns.stage))  # --nproc stands in for that param
        if nproc > 1:
            _check_args(params, ns)  # once here: every rank would fail alike, and race to say so
            return _launch(ns.stage, nproc, params.threads, argv)
    module = importlib.import_module(f"energyat.{STAGES[ns.stage][0]}")
    module.run(params, *[getattr(ns, a.strip("-.").replace("-", "_")) for a in STAGES[ns.stage][1]])
    return 0


def _nproc(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: a number of ranks, or auto") from None


def _check_args(params, ns: argparse.Namespace) -> None:
    """The stage arguments that params alone can judge (the stage checks them again when it runs)."""
    if ns.stage in ("train", "evaluate"):
        params.variant_run(ns.run, ns.variant)
    elif ns.stage == "sample":
        params.sample.sampler(ns.sampler)


def _record(exc: BaseException) -> None:
    """Hand a rank's error (message and traceback) to the launcher through torchelastic's error file."""
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

    ErrorHandler().record_exception(exc)


def _die_with_launcher() -> None:
    """A rank ends when the launcher that started it does (even on SIGKILL), instead of training on unwatched."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the launcher died before the line above
            os._exit(1)


def _root_cause(failures: dict) -> tuple[int, object]:
    """The failure that ended the run: a rank killed from outside (not the SIGTERM the launcher sends to the
    survivors), else a rank's own user error, else the earliest failure."""
    import signal

    def rank_key(item):
        rank, f = item
        external_signal = f.exitcode < 0 and -f.exitcode != signal.SIGTERM
        user_error = f.exitcode == 2
        # every rank finds the same bad input: name the lowest; otherwise the earliest failure
        return (not external_signal, not user_error, 0 if user_error else f.timestamp, rank)

    return min(failures.items(), key=rank_key)


def _launch(stage: str, nproc: int, threads: int, argv: list[str]) -> int:
    """Run `python -m energyat <argv>` on `nproc` local ranks with torchrun's engine (standalone rendezvous, no
    restarts: a rank that dies ends the others); one line names the first rank that failed and why."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # its failure report is ours below
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, threads // nproc)))
    os.environ[LAUNCHED] = "1"
    # the ranks take their count from torchrun's environment, not from --nproc (which torchrun's parser would
    # also mistake for an abbreviation of its own --nproc-per-node)
    rest = [a for i, a in enumerate(argv) if not (a.startswith("--nproc") or (i and argv[i - 1] == "--nproc"))]
    # torchrun --standalone: a c10d rendezvous on a free local port
    args = torchrun.parse_args(["--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0", f"--rdzv-id={uuid.uuid4()}",
                                f"--nproc-per-node={nproc}", "--max-restarts=0", "--module", "energyat", *rest])
    config, cmd, cmd_args = torchrun.config_from_args(args)
    try:
        elastic_launch(config, cmd)(*cmd_args)
    except ChildFailedError as exc:
        rank, failure = _root_cause(exc.failures)
        message = failure.message
        if failure.exitcode < 0:
            why = f"killed by {failure.signal_name()}"
        elif isinstance(message, dict):  # written by _record: {"message": "Type: text", "extraInfo": {...}}
            why = str(message.get("message", ""))
            if failure.exitcode == 2:
                why = why.split(": ", 1)[-1]  # a user error: its one line
            else:  # a bug: its traceback first
                print(message.get("extraInfo", {}).get("py_callstack", ""), file=sys.stderr)
        else:
            why = f"exited with code {failure.exitcode} (its output is above)"
        print(f"energyat {stage}: error: rank {rank}: {why}", file=sys.stderr)
        return 2 if failure.exitcode == 2 else 1
    return 0
