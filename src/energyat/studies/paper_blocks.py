"""The paper's CIFAR-10 setting split into blocks that each fit one GPU window (docs/paper.md, docs/performance.md).

An *experiment* (`BLOCKS`; its evidence is the folder metrics/paper/<name>/seed<k>/) is a named set of training runs
(each without and/or with DER) over `presets/paper.yaml` with the evaluation its claim needs, or (kind "generation")
robust models and the samplers that generate from them. A *block* (`WINDOWS`) is what one GPU window runs: an
experiment, or a part of one where the whole does not fit (`ro` and `co16-gradalign`: base and DER apart; both
parts write into the experiment's one folder). `params_for` turns an experiment into an ordinary params mapping,
validated like params.yaml, so that a block runs the pipeline's own stage functions (commands/block.py), not a second
implementation. `tiny` shrinks any block to a few hundred images on a small CNN: the CPU dry run of the same code.

The cost model. `job_cost` gives every job's expected seconds on one H200 from the measured numbers below (measured:
metrics/gpu_check.json and the block evidence under metrics/paper/, all on one H200; assumed: marked so), and
`GPU_FACTOR` the card's (the H100's factor is assumed: no job has run on one yet). `plan` simulates what the runner
(commands/block.py) does with a window's commands and deadlines, job by job, with the runner's own rules
(`starts`): `python -m energyat block --plan` prints it, and a test fails where a block does not fit `WINDOW`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

EPS16, EPS8 = 16 / 255, 8 / 255

# The fast-AT recipe of the single-step references (Wong et al. 2020; de Jorge et al. 2022): 30 epochs, cyclic LR
# to 0.2, SGD momentum 0.9, weight decay 5e-4 (the preset's). Method defaults give RS-FGSM alpha 1.25 eps with
# projection and N-FGSM noise 2 eps, alpha eps, no projection (methods.py).
FAST_AT = {"epochs": 30, "lr_schedule": "cyclic", "lr_max": 0.2}
SINGLE_STEP_DER = {"lambda": 1.0, "gamma": 0.0}  # not published for single-step runs: ours (co16-lambda tunes it)
CO_EVAL = {"checkpoints": ["last"], "n_examples": 2000, "aa_examples": 500, "pgd_steps": [50], "restarts": 10}
RO_EPOCHS = 32  # the longest PGD-10 schedule whose blocks fit a window on one H100 with an epoch to spare (longest_ro)
GEN_EPOCHS = 10  # the generation block's PGD-AT schedule (shorter than the RO block's: it leaves time for sampling)
# generation: every sampler of the default run, in the priority; GEN_SAMPLERS: the first that fit a window
SAMPLERS = {"pca-local-adaptive": {"init": "pca-local", "adaptive": True},
            "gaussian": {"init": "gaussian", "adaptive": False},
            "pca-local": {"init": "pca-local", "adaptive": False},
            "pca-global": {"init": "pca-global", "adaptive": False},
            "uniform": {"init": "uniform", "adaptive": False}}
GEN_SAMPLERS = ("pca-local-adaptive", "gaussian", "pca-local")

# ------------------------------------------------------------------------------------------------ cost model

# Training throughput of our step on one H200 (bf16 + CUDA graphs, batch 128; metrics/gpu_check.json), img/s,
# base and with DER. Measured.
IMG_PER_S = {"standard": (41682, 41682), "fgsm": (23786, 17762), "rs-fgsm": (23478, 15309),
             "n-fgsm": (23504, 15307), "gradalign": (3638, 3459), "pgd": (5160, 4607), "trades": (4221, 4210)}
EPOCH_VALIDATE = 0.21  # measured: an epoch's seconds beyond its steps (2.27 s vs 2.06 s, FGSM; 2.98 vs 2.76, + DER)
EPOCH_SAVE = 0.8  # measured: a 30-epoch job's train seconds beyond its epochs' (23–29 s), per epoch (state, checkpoints)
WARMUP = 13.4  # measured: a job's first epoch in a new process (CUDA graph capture, cuDNN autotuning): 14–16 s vs 2.3
JOB_START = 5.0  # assumed: a job's data to the GPU, model, resume check (paid again by a command that resumes it)
EVAL_SECONDS = 100.0  # measured per evaluated checkpoint of a robust model: PGD-50 x 10 on 2,000, AutoAttack on 500
#                       (93–104 s; a collapsed model's 19–21 s is not planned on)
COMMAND_START = 20.0  # measured prepare (decoding the JPEG tarball: 9.5–13 s) + assumed 7 s of imports and wheels
COMMAND_RESUME = 10.0  # assumed: a later command on the warm machine (imports, wheels; the prepared data is kept)
# generation, assumed unless marked: SGLD at the eager bf16 PGD rate (measured 1,533 img/s x 11 passes of batch 128;
# a batch of 1,000 chains is less launch-bound), PCA on the machine's CPU (measured 18 s for 100 local fits on
# 10,000 images; the global fits on 49,000 assumed), Inception (never run under CUDA here) at 2,000 img/s
SGLD_IMG_STEPS_PER_S = 16_900
FORWARD_IMG_PER_S = 40_000  # classifier features, class energies: forward passes only
INCEPTION_IMG_PER_S = 2_000
PCA_SECONDS = 40.0
STEP_START = 5.0  # a generation step's own start (loading models, samples)
SCORE_START = 15.0  # torch-fidelity, the Inception file's SHA-1 check and load

GPU_FACTOR = {"h200": 1.0, "h100": 1.1}  # seconds on the card / seconds on one H200. H100: assumed (same 132 SMs
# and clocks, bf16 matrix throughput measured equal, 798 vs 788 TFLOP/s; memory bandwidth 30 % lower, 3.0 vs 4.3 TB/s;
# our batch-128 step of 32x32 images is a stream of small kernels, not bandwidth-bound: metrics/gpu_profile.json)


@dataclass(frozen=True)
class Window:
    """One GPU window: 15 minutes of device time, the machine's start (1–2 min) included; at most 10 minutes a command.
    Planned: at most `commands` commands of at most `command` seconds each (a minute short of the hard limit, for the
    evidence's packing and a late epoch), at most `work` seconds of work in all (15 min less a 2-min start and
    1.5 min for the transfers, the gap between the commands and the give-back)."""

    commands: int = 2
    command: float = 540.0
    work: float = 690.0


WINDOW = Window()


@dataclass(frozen=True)
class Cost:
    """A job's expected seconds on one H200: `epochs`, each epoch it trains, in order; `start`, paid by every command
    that trains part of it; `evaluate` (GPU) after its training; a generation step's `gpu` and `cpu` seconds."""

    epochs: tuple[float, ...] = ()
    start: float = 0.0
    evaluate: float = 0.0
    gpu: float = 0.0
    cpu: float = 0.0

    def train(self, gpu: str = "h200", done: int = 0) -> float:
        """Seconds of the training left after `done` epochs (a finished training is still resumed and checked)."""
        left = self.epochs[done:]
        return GPU_FACTOR[gpu] * ((self.start + sum(left)) if left else (JOB_START if self.epochs else 0.0))

    def after(self, gpu: str = "h200") -> float:
        """Seconds after the training: the evaluation, or a generation step's work."""
        return GPU_FACTOR[gpu] * (self.evaluate + self.gpu) + self.cpu

    def seconds(self, gpu: str = "h200", done: int = 0) -> float:
        return self.train(gpu, done) + self.after(gpu)


def starts(need: float, left: float, whole: float, can_progress: bool, next_whole: float = float("inf")) -> str:
    """The runner's rule for a job with `need` seconds left and `left` seconds before the deadline, where a fresh
    command offers `whole` seconds and the window's next command `next_whole` (0: this is its last): "run" when all
    of it fits; "part" when it fits no command at all but can end in the next one and its training can make
    progress now (it trains until the deadline, the next command resumes it); else "skip"."""
    if need <= left:
        return "run"
    if need > whole and can_progress and need <= left + next_whole:
        return "part"
    return "skip"


def next_command(window: "Window", before: float, this: float) -> float:
    """Seconds the window's next command offers to jobs, after `before` seconds of earlier commands and this one's
    `this` (0 where this is the window's last command)."""
    return max(0.0, min(window.command, window.work - before - this) - COMMAND_RESUME)


# ------------------------------------------------------------------------------------------------ blocks


@dataclass(frozen=True)
class Block:
    about: str
    runs: dict[str, dict]  # run name -> its overrides (method, eps, der, ...), as under params `runs`
    variants: tuple[str, ...] = ("base", "der")
    evaluate: dict = field(default_factory=lambda: dict(CO_EVAL))
    train: dict = field(default_factory=dict)  # overrides of the preset's `train` defaults
    kind: str = "robustness"  # or "generation": train the models, then pca, class-energy, sample, score
    standard: dict = field(default_factory=dict)  # generation: the feature classifier (`standard`) overrides
    samplers: tuple[str, ...] = ()  # generation: SAMPLERS names, in order

    def jobs(self) -> list[tuple[str, str]]:
        """(run, variant) trainings in the order they run: a run's base before its DER variant (a generation block's
        `standard` feature classifier first)."""
        first = [("standard", "base")] if self.kind == "generation" else []
        return first + [(run, v) for run in self.runs for v in self.variants]

    def steps(self) -> list[str]:
        """A generation block's steps after its trainings."""
        if self.kind != "generation":
            return []
        return ["pca", "class-energy", *(f"sample.{s}" for s in self.samplers), "score"]

    def job_names(self) -> list[str]:
        return [f"{run}.{variant}" for run, variant in self.jobs()] + self.steps()


def _co(method: str, eps: float, eps_name: str) -> Block:
    return Block(f"catastrophic overfitting: {method} at {eps_name}, without and with DER (fast-AT recipe)",
                 {method: {"method": method, "eps": eps, **FAST_AT, "der": dict(SINGLE_STEP_DER)}})


def ro_block(epochs: int = RO_EPOCHS) -> Block:
    """PGD-10 AT at 8/255 for `epochs`, piecewise LR (x0.1 at 50 % and 75 %), DER from the first LR drop."""
    first_drop, second_drop = epochs // 2 + 1, 3 * epochs // 4 + 1  # the epochs holding 50 % and 75 % of training
    return Block(
        f"robust overfitting: PGD-10 AT at 8/255 (alpha 2/255), {epochs} epochs (the longest even schedule whose "
        f"blocks fit one window on one H100 with an epoch to spare), LR 0.1, x0.1 at 50 % and 75 % of training "
        f"(in epochs {first_drop} and {second_drop}); "
        f"DER (lambda 6, gamma 0.2, the paper's Table III) from epoch {first_drop}, the first LR drop. Two blocks: "
        "`ro` trains and evaluates the base run, `ro-der` the DER run (its first "
        f"{first_drop - 1} epochs, without DER, trained again: the same recipe, in its own window)",
        {"pgd": {"method": "pgd", "eps": EPS8, "steps": 10, "epochs": epochs, "lr_schedule": "piecewise",
                 "lr_max": 0.1, "der": {"lambda": 6.0, "gamma": 0.2, "start_epoch": -(epochs - epochs // 2)}}},
        evaluate={**CO_EVAL, "checkpoints": ["best", "last"]})


def gen_block(epochs: int = GEN_EPOCHS, samplers: tuple[str, ...] = GEN_SAMPLERS) -> Block:
    return Block(
        f"generation: PreActResNet-18 PGD-10 AT at 8/255 for {epochs} epochs (shorter than `ro`'s {RO_EPOCHS}: the "
        f"block also samples and scores), LR 0.1 x0.1 at 50 % and 75 %, and its DER twin (lambda 6, gamma 0.2 from "
        f"epoch {epochs // 2 + 1}); 1,000 samples per class (10,000) per sampler and model: "
        f"{', '.join(samplers)} (the samplers that fit a window; {', '.join(s for s in SAMPLERS if s not in samplers)}"
        " do not); classifier-feature IS / FID (a `standard` PreActResNet-18, 10 epochs, cyclic LR to 0.2) and "
        "Inception FID against the 49,000 training images",
        {"pgd": {"method": "pgd", "eps": EPS8, "steps": 10, "epochs": epochs, "lr_schedule": "piecewise",
                 "lr_max": 0.1, "der": {"lambda": 6.0, "gamma": 0.2, "start_epoch": -(epochs - epochs // 2)}}},
        evaluate={}, kind="generation", standard={"epochs": 10, "lr_schedule": "cyclic", "lr_max": 0.2},
        samplers=samplers)


BLOCKS: dict[str, Block] = {
    **{f"co16-{m}": _co(m, EPS16, "16/255") for m in ("fgsm", "rs-fgsm", "n-fgsm")},
    **{f"co8-{m}": _co(m, EPS8, "8/255") for m in ("fgsm", "rs-fgsm", "n-fgsm")},
    "co16-gradalign": _co("gradalign", EPS16, "16/255"),
    "co16-lambda": Block(
        "DER's single-step weight: FGSM + DER at 16/255 over lambda in {6, 0.5, 0.1} (gamma 0; the strongest first, "
        "the one most likely to prevent CO; lambda 1 is co16-fgsm's DER run)",
        {f"fgsm-l{lam:g}": {"method": "fgsm", "eps": EPS16, **FAST_AT, "der": {"lambda": lam, "gamma": 0.0}}
         for lam in (6.0, 0.5, 0.1)},
        variants=("der",)),
    "ro": ro_block(),
    "gen": gen_block(),
}

# Blocks (what one window runs) -> (experiment, its jobs run by the block; None: all of them). Where an experiment
# does not fit one window its base and DER runs are blocks of their own, writing into the experiment's folder.
WINDOWS: dict[str, tuple[str, tuple[str, ...] | None]] = {
    **{name: (name, None) for name in BLOCKS if name.startswith(("co16-fgsm", "co16-rs", "co16-n", "co8-"))},
    "co16-lambda": ("co16-lambda", ("fgsm-l6.der", "fgsm-l0.5.der")),
    "co16-lambda-0.1": ("co16-lambda", ("fgsm-l0.1.der",)),
    "co16-gradalign": ("co16-gradalign", ("gradalign.base",)),
    "co16-gradalign-der": ("co16-gradalign", ("gradalign.der",)),
    "ro": ("ro", ("pgd.base",)),
    "ro-der": ("ro", ("pgd.der",)),
    "gen": ("gen", None),
}

# What `block --next` runs, in this order (the issue's §4): (block, seed). Entries whose jobs all have evidence are
# passed over; the others run as far as each command's deadline allows.
QUEUE: tuple[tuple[str, int], ...] = (
    ("ro", 0), ("ro-der", 0), ("gen", 0),
    ("co16-rs-fgsm", 1), ("co16-rs-fgsm", 2), ("co16-fgsm", 1), ("co16-fgsm", 2),
    ("co8-fgsm", 0), ("co8-rs-fgsm", 0), ("co8-n-fgsm", 0),
    ("co16-n-fgsm", 0), ("co16-lambda", 0), ("co16-lambda-0.1", 0),
    ("co16-gradalign", 0), ("co16-gradalign-der", 0),
)


def names() -> list[str]:
    """The blocks, as `python -m energyat block` takes them."""
    return list(WINDOWS)


def experiment(name: str) -> str:
    """The experiment (evidence folder) of block or experiment `name`."""
    return WINDOWS[name][0] if name in WINDOWS else name


def window_jobs(name: str) -> list[str]:
    """The jobs block `name` runs, in order ("<run>.<variant>", generation steps)."""
    exp, only = WINDOWS[name]
    return [j for j in BLOCKS[exp].job_names() if only is None or j in only]


def job_cost(name: str, job: str, n_train: int = 49_000, block: Block | None = None,
             with_jobs: list[str] | None = None) -> Cost:
    """Expected H200 seconds of `job` of block or experiment `name` (or of `block`, with its jobs `with_jobs`). A
    late-DER run forks from its base run when that runs in the same block (and process); otherwise it trains its
    epochs before DER again."""
    spec = block or BLOCKS[experiment(name)]
    jobs = with_jobs if with_jobs is not None else (window_jobs(name) if name in WINDOWS else spec.job_names())
    if job in spec.steps():
        return _step_cost(spec, job, n_train)
    run, variant = job.rsplit(".", 1)
    r = {"method": "standard", **spec.standard} if run == "standard" else spec.runs[run]
    method, epochs = r["method"], r.get("epochs", 30)
    base_rate, der_rate = IMG_PER_S.get(method, (1000, 1000))
    per = [n_train / base_rate] * epochs
    if variant == "der":
        start = r.get("der", {}).get("start_epoch", 1)
        first = (start if start > 0 else epochs + start + 1) if method in ("pgd", "trades") else 1
        forked = first > 1 and f"{run}.base" in jobs[:jobs.index(job) if job in jobs else 0]
        per = per[:first - 1] + [n_train / der_rate] * (epochs - first + 1)
        if forked:
            per = per[first - 1:]
    n_checkpoints = len(spec.evaluate.get("checkpoints", [])) if spec.kind == "robustness" else 0
    return Cost(epochs=tuple(p + EPOCH_VALIDATE + EPOCH_SAVE for p in per), start=JOB_START + WARMUP,
                evaluate=EVAL_SECONDS * n_checkpoints)


def _step_cost(spec: Block, step: str, n_train: int) -> Cost:
    n = 10 * 1000  # 1,000 samples per class, per model
    if step == "pca":
        return Cost(cpu=PCA_SECONDS)
    if step == "class-energy":
        return Cost(gpu=STEP_START + 2 * n_train / FORWARD_IMG_PER_S)
    if step.startswith("sample."):
        return Cost(gpu=STEP_START + 2 * n * 50 / SGLD_IMG_STEPS_PER_S)
    # score: classifier features of the reference, of every set and its step-sweep snapshots (3), of the real images;
    # Inception features of the reference, of every final set and of the real images
    sets = 2 * len(spec.samplers)
    return Cost(gpu=SCORE_START + (n_train + sets * n * 4 + n) / FORWARD_IMG_PER_S
                + (n_train + sets * n + n) / INCEPTION_IMG_PER_S)


def window_of(exp: str, job: str) -> str:
    """The block that runs `job` of experiment `exp`."""
    return next(w for w, (e, only) in WINDOWS.items() if e == exp and (only is None or job in only))


def block_seconds(name: str, n_train: int = 49_000, jobs: list[str] | None = None, gpu: str = "h200") -> float:
    """The expected seconds of experiment `name` (each job costed in the block that runs it), or of block `name` where
    no experiment has that name (one seed; only `jobs` where given) on `gpu`, without the commands' starts."""
    if name in BLOCKS:
        mine = [(window_of(name, j), j) for j in BLOCKS[name].job_names()]
    else:
        mine = [(name, j) for j in window_jobs(name)]
    return sum(job_cost(w, j, n_train).seconds(gpu) for w, j in mine if jobs is None or j in jobs)


# ------------------------------------------------------------------------------------------------ the plan


@dataclass
class Command:
    parts: list[tuple[str, str, float]]  # (job, what, seconds); the first: the command's start

    @property
    def seconds(self) -> float:
        return sum(s for *_, s in self.parts)


@dataclass
class Plan:
    block: str
    gpu: str
    commands: list[Command]
    fits: bool
    why: str = ""

    @property
    def seconds(self) -> float:
        return sum(c.seconds for c in self.commands)


def plan(name: str, gpu: str = "h100", done: tuple[str, ...] = (), window: Window = WINDOW,
         costs: list[tuple[str, Cost]] | None = None) -> Plan:
    """What `block <name> --deadline <window.command>`, run again in consecutive commands of one window, does by the
    cost model (`costs`: (job, Cost) in order, default block `name`'s, less the `done` jobs)."""
    if costs is None:
        costs = [(j, job_cost(name, j)) for j in window_jobs(name) if j not in done]
    commands = [Command([("start", "prepare, imports", COMMAND_START)])]
    whole = window.command - COMMAND_RESUME
    for job, cost in costs:
        done_epochs = 0
        while True:
            cmd = commands[-1]
            left = window.command - cmd.seconds
            need = cost.seconds(gpu, done_epochs)
            can = done_epochs < len(cost.epochs) and left >= GPU_FACTOR[gpu] * (cost.start + 2 * max(cost.epochs))
            before = sum(c.seconds for c in commands[:-1])
            after = next_command(window, before, window.command) if len(commands) < window.commands else 0.0
            decision = starts(need, left, whole, can, after)
            if decision == "run":
                cmd.parts += _to_the_end(job, cost, gpu, done_epochs)
                break
            if decision == "part":
                done_epochs, finished = _train_part(cmd, job, cost, gpu, done_epochs, left, window)
                if finished:
                    break
            elif len(cmd.parts) == 1:  # not even a fresh command holds it
                return Plan(name, gpu, commands, False, f"{job}: {need:.0f} s fit no command of {window.command:.0f} s")
            commands.append(Command([("start", "imports (prepared data kept)", COMMAND_RESUME)]))
    why = _overruns(commands, window)
    return Plan(name, gpu, commands, not why, "; ".join(why))


def _to_the_end(job: str, cost: Cost, gpu: str, done: int) -> list[tuple[str, str, float]]:
    """The parts of a job that runs to its end in this command: its training after `done` epochs (a finished one is
    still resumed and checked), then its evaluation or a generation step's work."""
    parts = []
    if cost.epochs:
        if done == len(cost.epochs):
            what = "resume (trained)"
        else:
            what = "train" if done == 0 else f"train epochs {done + 1}–{len(cost.epochs)}"
        parts.append((job, what, cost.train(gpu, done)))
    if cost.after(gpu):
        parts.append((job, "evaluate" if cost.epochs else "run", cost.after(gpu)))
    return parts


def _train_part(cmd: Command, job: str, cost: Cost, gpu: str, done: int, left: float,
                window: Window) -> tuple[int, bool]:
    """Train the job's epochs after `done` that fit the command's `left` seconds (the runner stops at its deadline),
    and evaluate it too where its training ends with room for that; the epochs trained by then, and whether the job
    is finished."""
    k = done
    while k < len(cost.epochs) and GPU_FACTOR[gpu] * (cost.start + sum(cost.epochs[done:k + 1])) <= left:
        k += 1
    cmd.parts.append((job, f"train epochs {done + 1}–{k}", GPU_FACTOR[gpu] * (cost.start + sum(cost.epochs[done:k]))))
    if k == len(cost.epochs) and cost.after(gpu) + GPU_FACTOR[gpu] * JOB_START <= window.command - cmd.seconds:
        cmd.parts.append((job, "evaluate", cost.after(gpu)))
        return k, True
    return k, False


def _overruns(commands: list[Command], window: Window) -> list[str]:
    """How a plan's commands break the window's limits (none: it fits)."""
    total = sum(c.seconds for c in commands)
    why = []
    if len(commands) > window.commands:
        why.append(f"{len(commands)} commands > {window.commands}")
    if total > window.work:
        why.append(f"{total / 60:.1f} min of work > {window.work / 60:.1f}")
    if any(c.seconds > window.command for c in commands):
        why.append("a command over its limit")
    return why


def longest_ro(gpu: str = "h100", window: Window = WINDOW) -> int:
    """The longest even PGD-10 schedule (>= 30 epochs; even: the LR drop at half falls between two epochs) whose two
    blocks each fit `window` on `gpu` with one DER epoch's seconds to spare."""
    def fits(epochs: int) -> bool:
        block = ro_block(epochs)
        for job in ("pgd.base", "pgd.der"):
            cost = job_cost("ro", job, block=block, with_jobs=[job])
            p = plan("ro", gpu, window=window, costs=[(job, cost)])
            if not p.fits or p.seconds + GPU_FACTOR[gpu] * max(cost.epochs) > window.work:
                return False
        return True

    epochs = 30
    while fits(epochs + 2):
        epochs += 2
    return epochs


def plan_table(gpu: str, blocks: list[str] | None = None) -> str:
    """The plan of every block on `gpu` as a Markdown table (minutes)."""
    lines = [f"Blocks on one {gpu.upper()} (cost model: paper_blocks; window: at most {WINDOW.commands} commands of "
             f"{WINDOW.command / 60:.0f} min, {WINDOW.work / 60:.1f} min of work in all)", "",
             "| Block | Jobs | Command 1 (min) | Command 2 (min) | Work (min) | Fits |", "|---|---|---:|---:|---:|---|"]
    for name in blocks or names():
        p = plan(name, gpu)
        cmds = [f"{c.seconds / 60:.1f}" for c in p.commands] + ["–"] * max(0, 2 - len(p.commands))
        extra = f" (+{len(p.commands) - 2} more)" if len(p.commands) > 2 else ""
        lines.append(f"| {name} | {', '.join(window_jobs(name))} | {cmds[0]} | {cmds[1]}{extra} | "
                     f"{p.seconds / 60:.1f} | {'yes' if p.fits else 'NO: ' + p.why} |")
    return "\n".join(lines)


def plan_detail(name: str, gpu: str) -> str:
    """One block's plan, command by command, part by part (seconds)."""
    p = plan(name, gpu)
    out = [f"{name} on one {gpu.upper()}: {p.seconds / 60:.1f} min in {len(p.commands)} command(s)"
           + ("" if p.fits else f"; does NOT fit: {p.why}")]
    for i, c in enumerate(p.commands, 1):
        out.append(f"  command {i}: {c.seconds:.0f} s")
        out += [f"    {job:<24} {what:<32} {s:6.0f} s" for job, what, s in c.parts]
    return "\n".join(out)


def gpu_of(device_name: str) -> str:
    """The cost model's card for a CUDA device name; an unknown card is planned as the slower H100."""
    name = device_name.upper()
    return "h200" if "H200" in name else "h100"


# ------------------------------------------------------------------------------------------------ params


def params_for(preset: dict, name: str, data_source: str, seed: int, device: str = "auto",
               tiny: bool = False) -> dict:
    """The params mapping of block or experiment `name` over the preset's raw mapping (not modified)."""
    block = BLOCKS[experiment(name)]
    raw = copy.deepcopy(preset)
    raw.update(seed=seed, device=device)
    raw["data"] = {**raw["data"], "source": data_source,
                   "dataset": "image-folder" if not _is_torchvision_root(data_source) else "cifar10",
                   "augment": "crop-flip"}
    raw["train"] = {**raw["train"], **block.train}
    raw["runs"] = copy.deepcopy(block.runs)
    raw["evaluate"] = {**raw["evaluate"], **block.evaluate}
    raw["sample"] = {**raw["sample"], "run": next(iter(block.runs))}
    if block.kind == "generation":
        raw["standard"] = {**raw.get("standard", {}), **block.standard}
        raw["sample"].update(samplers={s: dict(SAMPLERS[s]) for s in block.samplers}, samples_per_class=1000,
                             batch_size=1000)
        raw["score"] = {**raw["score"], "inception_fid": True, "inception_reference": 0, "n_reference": 0}
    if tiny:
        _shrink(raw, block.kind)
    return raw


def _is_torchvision_root(source: str) -> bool:
    from pathlib import Path

    return (Path(source) / "cifar-10-batches-py").is_dir()


def _shrink(raw: dict, kind: str = "robustness") -> None:
    """The CPU dry run: every run for 2 epochs on 256 images with a small CNN, a few dozen test images; generation:
    images resized to 8x8 (an image folder's; the class Gaussian's covariance is then 192x192, not 3072x3072), 2
    samples per class and 3 SGLD steps per sampler, scored without Inception."""
    raw["threads"] = min(raw.get("threads", 2), 2)
    raw["model"] = {"arch": "small-cnn", "width": 8}
    raw["data"]["val_size"] = 200
    raw["train"].update(n_val=64, val_steps=2, batch_size=64)
    runs = list(raw["runs"].values()) + ([raw["standard"]] if kind == "generation" else [])
    for run in runs:
        run.update(epochs=2, n_train=256)
        if run.get("steps"):
            run["steps"] = 2
        der = run.get("der", {})
        if der.get("start_epoch", 1) != 1:
            der["start_epoch"] = -1
    raw["evaluate"].update(n_examples=64, aa_examples=8, restarts=2, batch_size=32)
    if kind == "generation":
        raw["data"]["image_size"] = 8
        raw["pca"] = {**raw["pca"], "k": 10, "n_anchors": 2}
        raw["sample"].update(samples_per_class=2, steps=3, step_sweep=[0, 1], batch_size=20, n_energy=10)
        raw["score"].update(inception_fid=False, n_reference=100, batch_size=50)


def next_blocks(done: dict[tuple[str, int], set[str]]) -> list[tuple[str, int]]:
    """The entries of QUEUE, in order, with a job that has no evidence yet (`done`: (experiment, seed) -> jobs)."""
    return [(name, seed) for name, seed in QUEUE
            if any(j not in done.get((experiment(name), seed), set()) for j in window_jobs(name))]
