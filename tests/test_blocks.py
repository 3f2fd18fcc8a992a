"""The paper's setting in GPU-window blocks: each block is a valid params set with the published recipe and fits one
GPU window by the cost model; `--next` takes the queue in order; the block runner (the pipeline's own stages) writes
whole jobs of evidence, honours its deadline over training and evaluation alike, records its own times per job and
command, resumes, refuses a stale data link; the generation block runs end to end (CPU dry run); and the results
page is built from that evidence alone, its percentages rounded from exact counts."""
import json
import tarfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from energyat import cli
from energyat import params as P
from energyat.commands import block as block_cmd
from energyat.errors import UserError
from energyat.evaluation import stats
from energyat.reporting import headline
from energyat.science.methods import METHODS
from energyat.stages import paper_report as paper_report_stage
from energyat.studies import paper_blocks, paper_page

ROOT = Path(__file__).resolve().parents[1]
PRESET = yaml.safe_load((ROOT / "presets/paper.yaml").read_text())


@pytest.mark.parametrize("name", paper_blocks.names())
@pytest.mark.parametrize("tiny", [False, True])
def test_every_block_is_a_valid_params_set(name, tiny):
    p = P.parse(paper_blocks.params_for(PRESET, name, "/nowhere", seed=3, device="cpu", tiny=tiny))
    assert p.seed == 3 and p.data.augmentation() == "crop-flip"
    assert set(p.run_names()) == set(paper_blocks.BLOCKS[paper_blocks.experiment(name)].runs)


def test_co_blocks_follow_the_fast_at_recipe():
    p = P.parse(paper_blocks.params_for(PRESET, "co16-rs-fgsm", "/x", seed=0))
    rc = p.run("rs-fgsm")
    assert (rc.train.epochs, rc.train.lr_schedule, rc.train.lr_max) == (30, "cyclic", 0.2)
    assert (rc.train.momentum, rc.train.weight_decay, rc.train.batch_size) == (0.9, 5e-4, 128)
    assert rc.train.eps == pytest.approx(16 / 255)
    assert METHODS["rs-fgsm"].threat(rc.train).alpha == pytest.approx(1.25 * 16 / 255)
    n = P.parse(paper_blocks.params_for(PRESET, "co8-n-fgsm", "/x", seed=0)).run("n-fgsm").train
    assert METHODS["n-fgsm"].threat(n).alpha == pytest.approx(8 / 255)
    assert p.evaluate.checkpoints == ("last",) or list(p.evaluate.checkpoints) == ["last"]
    assert (p.evaluate.n_examples, p.evaluate.restarts, p.evaluate.pgd_steps[0]) == (2000, 10, 50)
    lam = P.parse(paper_blocks.params_for(PRESET, "co16-lambda", "/x", seed=0))
    assert sorted(lam.variant_run(r, "der").der.lam for r in lam.run_names()) == [0.1, 0.5, 6.0]  # 1: co16-fgsm
    assert paper_blocks.BLOCKS["co16-lambda"].jobs() == [(r, "der") for r in lam.run_names()]


def test_ro_block_switches_der_on_at_the_first_lr_drop():
    from energyat.science.training import learning_rate

    for name in ("ro", "ro-der"):
        p = P.parse(paper_blocks.params_for(PRESET, name, "/x", seed=0))
        rc = p.variant_run("pgd", "der")
        epochs = rc.train.epochs
        first_drop = next(e for e in range(1, epochs + 1) if learning_rate(rc.train, e - 0.5) < rc.train.lr_max)
        assert epochs == paper_blocks.RO_EPOCHS >= 30 and first_drop == epochs // 2 + 1
        assert rc.der.first_epoch(epochs) == first_drop and rc.train.lr_milestones == (0.5, 0.75)
        assert (rc.der.lam, rc.der.gamma, rc.train.steps) == (6.0, 0.2, 10)
        assert METHODS["pgd"].threat(rc.train).alpha == pytest.approx(2 / 255)
        assert list(p.evaluate.checkpoints) == ["best", "last"]
        assert (p.evaluate.n_examples, p.evaluate.aa_examples, p.evaluate.pgd_steps, p.evaluate.restarts) == \
            (2000, 500, (50,), 10)
    assert paper_blocks.window_jobs("ro") == ["pgd.base"] and paper_blocks.window_jobs("ro-der") == ["pgd.der"]
    assert f"{paper_blocks.RO_EPOCHS} epochs" in paper_blocks.BLOCKS["ro"].about


# ------------------------------------------------------------------------------------------------ the plan


@pytest.mark.parametrize("gpu", ["h100", "h200"])
@pytest.mark.parametrize("name", paper_blocks.names())
def test_every_block_fits_one_gpu_window(name, gpu):
    """At most two commands of at most 9 minutes, at most ~11 minutes of work (11.5) in all, by the cost model."""
    w = paper_blocks.WINDOW
    assert (w.commands, w.command, w.work) == (2, 540.0, 690.0)
    p = paper_blocks.plan(name, gpu)
    assert p.fits, f"{name} on {gpu}: {p.why}\n{paper_blocks.plan_detail(name, gpu)}"
    assert len(p.commands) <= 2 and all(c.seconds <= 540 for c in p.commands) and p.seconds <= 690
    jobs = [job for c in p.commands for job, what, _ in c.parts if what in ("evaluate", "run")]
    assert set(jobs) <= set(paper_blocks.window_jobs(name))
    # every job's evaluation (or step) is planned once, after its training
    ends = [job for c in p.commands for job, what, _ in c.parts if what in ("evaluate", "run")]
    trained = [job for c in p.commands for job, what, _ in c.parts if what.startswith("train")]
    assert len(ends) == len(set(ends)) and set(trained) <= set(paper_blocks.window_jobs(name))


def test_the_ro_schedule_is_the_longest_that_fits_and_the_big_blocks_are_split():
    assert paper_blocks.RO_EPOCHS == paper_blocks.longest_ro("h100") >= 30
    # the experiments that do not fit one window whole are split into blocks, base and DER apart
    for exp in ("ro", "co16-gradalign"):
        jobs = paper_blocks.BLOCKS[exp].job_names()
        whole = paper_blocks.plan(exp, "h100", costs=[(j, paper_blocks.job_cost(exp, j, with_jobs=jobs)) for j in jobs])
        assert not whole.fits
    assert [paper_blocks.window_jobs(b) for b in ("co16-gradalign", "co16-gradalign-der")] == \
        [["gradalign.base"], ["gradalign.der"]]
    # every job of every experiment is run by exactly one block
    for exp, spec in paper_blocks.BLOCKS.items():
        owned = [j for b, (e, _) in paper_blocks.WINDOWS.items() if e == exp for j in paper_blocks.window_jobs(b)]
        assert sorted(owned) == sorted(spec.job_names())
    # the generation block: the samplers that fit, pca-local-adaptive and gaussian first
    assert paper_blocks.BLOCKS["gen"].samplers[:2] == ("pca-local-adaptive", "gaussian")
    assert paper_blocks.plan("gen", "h100").fits
    more = paper_blocks.gen_block(samplers=paper_blocks.GEN_SAMPLERS + ("pca-global",))
    costs = [(j, paper_blocks.job_cost("gen", j, block=more, with_jobs=more.job_names())) for j in more.job_names()]
    assert not paper_blocks.plan("gen", "h100", costs=costs).fits


def test_the_plan_follows_the_runners_rule():
    assert paper_blocks.starts(100, 200, 500, True) == "run"
    assert paper_blocks.starts(300, 200, 500, True) == "skip"  # fits a fresh command: wait for it
    assert paper_blocks.starts(600, 200, 500, True) == "part"  # fits no command: train until the deadline
    assert paper_blocks.starts(600, 200, 500, False) == "skip"
    assert paper_blocks.starts(600, 200, 500, True, 300) == "skip"  # the window's next command could not end it
    assert paper_blocks.starts(600, 200, 500, True, 0) == "skip"  # the window's last command
    w = paper_blocks.WINDOW
    assert paper_blocks.next_command(w, 0, w.command) == w.work - w.command - paper_blocks.COMMAND_RESUME
    # a job longer than a command trains over two, paying its start again, and is evaluated in the second
    cost = paper_blocks.Cost(epochs=(60.0,) * 9, start=20.0, evaluate=100.0)
    p = paper_blocks.plan("x", "h200", costs=[("j.base", cost)], window=paper_blocks.Window(work=800))
    parts = [(c.parts[1][1], round(c.seconds)) for c in p.commands]
    assert parts == [("train epochs 1–8", 520), ("train epochs 9–9", 190)] and p.fits
    assert p.commands[1].parts[-1] == ("j.base", "evaluate", 100.0)
    assert not paper_blocks.plan("x", "h200", costs=[("j.base", cost)]).fits  # 11.8 min of work
    # the H100 is planned slower (its factor assumed), the command starts are not (CPU work)
    slow = paper_blocks.plan("co16-fgsm", "h100").seconds - paper_blocks.COMMAND_START
    fast = paper_blocks.plan("co16-fgsm", "h200").seconds - paper_blocks.COMMAND_START
    assert slow == pytest.approx(fast * paper_blocks.GPU_FACTOR["h100"])
    # the measured numbers: a 30-epoch FGSM job as measured on the H200 (111 s training, block evidence)
    fgsm = paper_blocks.job_cost("co16-fgsm", "fgsm.base")
    assert fgsm.train() == pytest.approx(111, abs=5) and fgsm.evaluate == paper_blocks.EVAL_SECONDS


def test_plan_command_prints_both_cards_and_next_takes_the_queue_in_order(capsys):
    done = block_cmd.done_jobs([ROOT / "metrics/paper"])
    assert done[("co16-fgsm", 0)] == {"fgsm.base", "fgsm.der"} and done[("co16-lambda", 0)] == {"fgsm-l6.der"}
    queue = paper_blocks.next_blocks(done)
    assert queue[:3] == [("ro", 0), ("ro-der", 0), ("gen", 0)]
    assert ("co16-fgsm", 0) not in queue and ("co16-rs-fgsm", 0) not in queue  # all their jobs have evidence
    assert ("co16-n-fgsm", 0) in queue and ("co16-lambda", 0) in queue  # a job left: n-fgsm DER; lambda 0.5
    order = [paper_blocks.QUEUE.index(entry) for entry in queue]
    assert order == sorted(order)
    every = {(exp, seed): set(spec.job_names()) for exp, spec in paper_blocks.BLOCKS.items() for seed in (0, 1, 2)}
    assert paper_blocks.next_blocks(every) == []
    assert cli.main(["block", "--plan", "--gpu", "h200", "--next", "--evidence", str(ROOT / "metrics/paper"),
                     "--out", str(ROOT / "metrics/paper"), "ro"]) == 0
    out = capsys.readouterr().out
    assert "Blocks on one H200" in out and "| ro | pgd.base |" in out and "--next, in this order: ro seed 0" in out
    assert "ro on one H200:" in out and "pgd.base" in out


def _image_tree(root: Path, per_class_train: int = 48, per_class_test: int = 8) -> Path:
    """10 classes of 32x32 colour images whose mean colour depends on the class."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class_train), ("test", per_class_test)):
        for c in range(10):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                base = np.array([25 * c, 255 - 25 * c, 128], dtype=float)
                img = np.clip(base + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{i}.png")
    return root


def _block(tmp_path, *extra, name="co16-fgsm"):
    return cli.main(["block", name, "--tiny", "--device", "cpu", "--preset", str(ROOT / "presets/paper.yaml"),
                     "--data", str(tmp_path / "cifar"), "--out", str(tmp_path / "out"),
                     "--work", str(tmp_path / "work"), *extra])


class Clock:
    """The runner's clock in tests: it moves only when a stage says how long it took."""

    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _timed(monkeypatch, clock: Clock, module, seconds: float) -> None:
    """Run the real stage, then let `seconds` pass on the runner's clock."""
    real = module.run

    def run(*args):
        real(*args)
        clock.t += seconds

    monkeypatch.setattr(module, "run", run)


def test_block_runner_deadline_resume_evidence_and_page(tmp_path, monkeypatch, capsys):
    from energyat.stages import evaluate, train

    _image_tree(tmp_path / "cifar")
    monkeypatch.chdir(tmp_path)  # no params.yaml here: a block needs none
    clock = Clock()
    monkeypatch.setattr(block_cmd, "_clock", clock)
    _timed(monkeypatch, clock, train, 4.0)
    _timed(monkeypatch, clock, evaluate, 3.0)
    tar = tmp_path / "ev.tar.gz"
    # the tiny prior is 5 s a job (training 3, evaluation 2): the first starts (5 <= 10), its evaluation still fits
    # (2 <= 6), and what it measured (training 4/3, evaluation 3/2 of the prior) rules the second out: 7 s > 3 s left
    assert _block(tmp_path, "--deadline", "10", "--grace", "600", "--tar", str(tar)) == 0
    out = tmp_path / "out/co16-fgsm/seed0"
    record = json.loads((out / "block.json").read_text())
    base, der = record["jobs"]["fgsm.base"], record["jobs"]["fgsm.der"]
    assert base["status"] == "done" and (base["train_seconds"], base["eval_seconds"]) == (4.0, 3.0)
    assert der["status"] == "skipped" and der["why"] == "estimated 7 s, 3 s left"
    # what ran is recorded per job (and per command): params, data, device, torch, code
    saved_text = (out / "params.yaml").read_text()
    assert base["params"] == block_cmd._sha(saved_text) and base["data"] == record["data"]["files"]
    assert base["device"] == "cpu" and base["torch"] and base["code"] and len(base["commands"]) == 1
    assert base["commands"][0]["epochs"] == [1, 2] and "note" not in base
    suffixes = ["train.json", "history.tsv", "eval.json", "flags.json", "autoattack.log"]
    assert all((out / f"fgsm.base.{s}").is_file() for s in suffixes)
    assert not (out / "fgsm.der.eval.json").exists()
    with tarfile.open(tar) as archive:
        assert "out/co16-fgsm/seed0/fgsm.base.flags.json" in archive.getnames()
    ev, flags = json.loads((out / "fgsm.base.eval.json").read_text()), json.loads((out / "fgsm.base.flags.json").read_text())
    assert (ev["n_examples"], ev["aa_examples"], ev["restarts"]) == (64, 8, 2)
    assert len(flags["last.pgd50"]) == 64 and len(flags["last.aa"]) == 8
    assert ev["last.clean_acc"] == pytest.approx(flags["last.clean"].count("1") / 64, abs=1e-4)
    saved = yaml.safe_load(saved_text)
    assert saved["runs"]["fgsm"]["eps"] == pytest.approx(16 / 255) and saved["model"]["arch"] == "small-cnn"
    # again without a deadline: the finished job is kept as it was, the skipped one runs
    stamp = (out / "fgsm.base.eval.json").stat().st_mtime_ns
    capsys.readouterr()
    assert _block(tmp_path) == 0
    assert "fgsm.base done earlier" in capsys.readouterr().err
    assert (out / "fgsm.base.eval.json").stat().st_mtime_ns == stamp
    der = json.loads((out / "block.json").read_text())["jobs"]["fgsm.der"]
    assert der["status"] == "done" and len(der["commands"]) == 1 and "why" not in der
    # the results page and headline metrics from the evidence alone
    evidence = paper_report_stage.read_evidence(tmp_path / "out")
    assert set(evidence["co16-fgsm"][0]["jobs"]) == {"fgsm.base", "fgsm.der"}
    page = paper_page.page(evidence)
    assert "### `co16-fgsm`" in page and "| fgsm | 0 |" in page and "- `ro` seed 0: pgd.base (~" in page
    diffs = paper_page.comparisons(evidence)
    assert {d["metric"] for d in diffs} == {"clean", "pgd50", "aa", "worst"} and all(0 <= d["p_holm"] <= 1 for d in diffs)
    rows = headline.from_paper(evidence)
    assert set(rows) == {"co16-fgsm.fgsm.base.seed0", "co16-fgsm.fgsm.der.seed0"}
    assert rows["co16-fgsm.fgsm.base.seed0"]["clean"] == round(ev["last.clean_acc"], 4)


def _fake_stages(monkeypatch, clock: Clock, epoch_sleep: float, epoch_seconds: float = 1.0):
    """A train stage that writes one epoch at a time as the real one does (history after each epoch, the state file),
    sleeping `epoch_sleep` real seconds and taking `epoch_seconds` on the runner's clock per epoch; an evaluate stage
    that writes the evaluation's evidence files in 2 s."""
    from energyat.stages import evaluate, train

    def fake_train(params, run, variant):
        job, epochs = f"{run}.{variant}", params.variant_run(run, variant).train.epochs
        history, state = Path("plots/history") / f"{job}.tsv", Path(".energyat/state") / variant / run / "state.pt"
        done = len(history.read_text().splitlines()) - 1 if history.is_file() else 0
        for epoch in range(done + 1, epochs + 1):
            time.sleep(epoch_sleep)
            clock.t += epoch_seconds
            state.parent.mkdir(parents=True, exist_ok=True)
            state.write_text(str(epoch))
            history.parent.mkdir(parents=True, exist_ok=True)
            history.write_text("epoch\tseconds\n" + "".join(f"{e}\t1.5\n" for e in range(1, epoch + 1)))
        Path("metrics/train").mkdir(parents=True, exist_ok=True)
        Path(f"metrics/train/{job}.json").write_text(json.dumps({"train_seconds": 1.5 * epochs}))

    def fake_evaluate(params, run, variant):
        clock.t += 2.0
        for src in block_cmd.EVIDENCE:
            if src.startswith("metrics/eval/"):
                path = Path(src.format(job=f"{run}.{variant}"))
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("{}")

    monkeypatch.setattr(train, "run", fake_train)
    monkeypatch.setattr(evaluate, "run", fake_evaluate)


def test_a_job_longer_than_a_command_trains_to_the_deadline_then_resumes_and_its_record_tells(tmp_path, monkeypatch):
    _image_tree(tmp_path / "cifar", per_class_train=30, per_class_test=2)
    monkeypatch.chdir(tmp_path)
    clock = Clock()
    monkeypatch.setattr(block_cmd, "_clock", clock)
    _fake_stages(monkeypatch, clock, epoch_sleep=3.0)
    # command 1 of a window: a 5-s job (tiny prior) fits no command of a 4-s deadline (less the next command's start)
    # but the window's next can end it: it starts, trains until the deadline (4 real seconds: during its second
    # epoch) and stops, its first epoch kept
    assert _block(tmp_path, "--deadline", "4") == 0
    out = tmp_path / "out/co16-fgsm/seed0"
    base = json.loads((out / "block.json").read_text())["jobs"]["fgsm.base"]
    assert base["status"] == "training" and base["why"] == ("stopped at the deadline after epoch 1/2; the next command "
                                                            "resumes it")
    assert base["commands"][0]["epochs"] == [1, 1]
    assert "fgsm.der" not in json.loads((out / "block.json").read_text())["jobs"]  # the command ended there
    window = json.loads((tmp_path / "work/window.json").read_text())
    assert len(window["commands"]) == 1
    # command 2 (the window's last): the job resumes; its last epoch leaves too little for its evaluation (9 s
    # expected, 8.2 left): trained, evaluation deferred; the DER job could not end in this window: not started
    clock.t = 0.0
    _fake_stages(monkeypatch, clock, epoch_sleep=0.0, epoch_seconds=4.0)
    monkeypatch.setattr(block_cmd, "TINY_EVALUATE", 9.0)
    assert _block(tmp_path, "--deadline", "12.2") == 0
    record = json.loads((out / "block.json").read_text())
    base, der = record["jobs"]["fgsm.base"], record["jobs"]["fgsm.der"]
    assert base["status"] == "trained" and base["why"] == ("evaluation deferred: estimated 9 s, 8 s left; the next "
                                                           "command evaluates it")
    assert der["status"] == "skipped" and not (out / "fgsm.base.eval.json").exists()
    # command 3, no deadline: resumed (nothing left to train), evaluated; the record tells the job's story
    clock.t = 0.0
    _fake_stages(monkeypatch, clock, epoch_sleep=0.0)
    assert _block(tmp_path) == 0
    record = json.loads((out / "block.json").read_text())
    base = record["jobs"]["fgsm.base"]
    assert base["status"] == "done" and [c["epochs"] for c in base["commands"]] == [[1, 1], [2, 2], [3, 2]]
    assert (base["train_seconds"], base["eval_seconds"], base["epoch_seconds"]) == (5.0, 2.0, 3.0)
    assert base["note"] == (
        f"ran over 3 commands: command 1 ({base['commands'][0]['at']}, cpu): trained epoch 1 in 1 s, stopped at the "
        f"deadline after epoch 1/2; command 2 ({base['commands'][1]['at']}, cpu): trained epoch 2 in 4 s, evaluation "
        f"deferred: estimated 9 s, 8 s left; command 3 ({base['commands'][2]['at']}, cpu): resumed its finished "
        "training (0 s), evaluated in 2 s")
    assert record["jobs"]["fgsm.der"]["status"] == "done" and "note" not in record["jobs"]["fgsm.der"]
    assert len(json.loads((tmp_path / "work/window.json").read_text())["commands"]) == 3


def test_a_stale_data_link_and_changed_params_are_not_reused_silently(tmp_path):
    work, old, new = tmp_path / "work", tmp_path / "prep-old", tmp_path / "prep-new"
    old.mkdir()
    new.mkdir()
    block_cmd._link_prepared(work, old.resolve(), tmp_path / "a", 0)
    block_cmd._link_prepared(work, old.resolve(), tmp_path / "a", 0)  # the same data: kept
    with pytest.raises(UserError, match="points to .*prep-old, not to the data prepared from --data"):
        block_cmd._link_prepared(work, new.resolve(), tmp_path / "b", 0)
    out = tmp_path / "out"
    out.mkdir()
    jobs = {"a.base": {"status": "done"}, "b.base": {"status": "skipped"}}
    first = block_cmd._write_params(out, "seed: 0\n", jobs)
    jobs["a.base"]["params"] = first
    second = block_cmd._write_params(out, "seed: 0\nthreads: 2\n", jobs)
    assert (out / "params.yaml").read_text() == "seed: 0\nthreads: 2\n" and second != first
    assert (out / f"params-{first}.yaml").read_text() == "seed: 0\n"  # what the finished job ran with
    assert jobs["a.base"]["params"] == first and "params" not in jobs["b.base"]


def test_generation_block_runs_end_to_end_on_the_cpu(tmp_path, monkeypatch, capsys):
    """The generation block's CPU dry run: the standard, base and DER models trained, PCA, class energies, three
    samplers, the score; its evidence, the page's section; a second run keeps everything."""
    _image_tree(tmp_path / "cifar", per_class_test=2)
    monkeypatch.chdir(tmp_path)
    assert _block(tmp_path, name="gen") == 0
    out = tmp_path / "out/gen/seed0"
    record = json.loads((out / "block.json").read_text())
    assert set(record["jobs"]) == set(paper_blocks.BLOCKS["gen"].job_names())
    assert all(r["status"] == "done" for r in record["jobs"].values())
    assert record["jobs"]["pgd.der"]["commands"][0]["epochs"] == [2, 2]  # forked from the base run after epoch 1
    for s in paper_blocks.GEN_SAMPLERS:
        assert (out / f"{s}.base.png").is_file() and (out / f"{s}.der.png").is_file()
        assert json.loads((out / f"sample.{s}.json").read_text())[f"sample.{s}.der.steps_used"] <= 3
    score = json.loads((out / "score.json").read_text())
    assert all(f"gen.{s}.{v}.fid" in score for s in paper_blocks.GEN_SAMPLERS for v in ("base", "der"))
    assert score["gen.pca-local.base.inception_fid"] == "not computed"  # the dry run: no Inception pass
    assert yaml.safe_load((out / "params.yaml").read_text())["sample"]["samples_per_class"] == 2
    evidence = paper_report_stage.read_evidence(tmp_path / "out")
    page = paper_page.page(evidence)
    assert "### `gen`" in page and "| der | 0 | gaussian |" in page and "gen/seed0/pca-local.der.png" in page
    assert "improve generation | supported" in page or "improve generation | mixed" in page or \
        "improve generation | not supported" in page
    assert headline.from_paper(evidence) == {}  # no accuracies: no headline rows
    capsys.readouterr()
    assert _block(tmp_path, name="gen") == 0
    assert capsys.readouterr().err.count("done earlier") == len(paper_blocks.BLOCKS["gen"].job_names())


def test_percentages_of_counts_are_rounded_half_away_from_zero_on_the_exact_fraction():
    assert f"{100 * (471 / 2000):.1f}" == "23.5"  # 100 x the float 0.2355 is 23.549999...: what the page printed
    assert stats.pct(Fraction(471, 2000)) == "23.6" and stats.pct(Fraction(-471, 2000), sign=True) == "-23.6"
    assert stats.pct(Fraction(1, 2000)) == "0.1" and stats.pct(Fraction(0, 5), sign=True) == "+0.0"
    assert stats.pct(Fraction(1, 3)) == "33.3" and stats.pct(Fraction(2, 3)) == "66.7"
    assert stats.pct(0.2355) == "23.5"  # floats keep Python's rounding: counts go in as Fractions
    job = {"flags": {"last.pgd50": "1" * 471 + "0" * 1529}}
    assert paper_page.accuracy_cell(job, "pgd50").startswith("23.6 [")
    diff = stats.paired_difference([False] * 2000, [True] * 471 + [False] * 1529)
    assert paper_page._exact(diff)["diff"] == Fraction(471, 2000)
    assert stats.fmt_diff(paper_page._exact(diff)).startswith("+23.6 [")
    # the committed RS-FGSM + DER run: PGD-50-10 471 of 2,000; on the AutoAttack images 121 of 500 vs 80 worst case
    flags = json.loads((ROOT / "metrics/paper/co16-rs-fgsm/seed0/rs-fgsm.der.flags.json").read_text())
    assert flags["last.pgd50"].count("1") == 471 and flags["last.pgd50"][:500].count("1") == 121
    assert flags["last.worst"].count("1") == 80  # so PGD overstates by 41 of the same 500 images: 8.2 points


def test_lambda_6_diverged_after_learning_and_the_page_says_so():
    evidence = paper_report_stage.read_evidence(ROOT / "metrics/paper")
    job = evidence["co16-lambda"][0]["jobs"]["fgsm-l6.der"]
    cell = paper_page.co_cell(job)
    assert cell == ("no CO: diverged in epoch 10 after reaching validation clean 25.0 % and PGD-10 18.6 % (epoch 7); "
                    "at chance at the end (training loss 2.303 = ln 10: a constant output)")
    assert "λ 6: diverged in epoch 10" in paper_page.lambda_verdict(evidence)


def test_a_bad_block_name_or_data_path_stops_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        cli.main(["block", "co99-fgsm", "--data", str(tmp_path)])
    assert "invalid choice: 'co99-fgsm'" in capsys.readouterr().err
    assert cli.main(["block", "co16-fgsm", "--data", str(tmp_path)]) == 2  # run from outside the repository
    assert "--preset: presets/paper.yaml not found" in capsys.readouterr().err
    assert cli.main(["block", "co16-fgsm", "--preset", str(ROOT / "presets/paper.yaml"),
                     "--data", str(tmp_path / "missing")]) == 2
    assert "--data:" in capsys.readouterr().err and not (tmp_path / ".energyat").exists()


def test_verdict_counts_collapsing_runs_and_their_der_twins():
    def job(co_at_end, co_epoch):
        return {"train": {"catastrophic_overfitting": co_epoch is not None, "co_at_end": co_at_end,
                          "co_epoch": co_epoch}, "flags": {}, "eval": {}, "history": []}

    kept = {"co16-fgsm": {0: {"block": {}, "jobs": {"fgsm.base": job(True, 2), "fgsm.der": job(False, None)}},
                          1: {"block": {}, "jobs": {"fgsm.base": job(True, 3), "fgsm.der": job(True, 30)}}}}
    assert paper_page.co_verdict(kept).startswith("mixed: DER's model is free of CO at the end of training in 1 of 2")
    chance = job(False, None)
    chance["flags"] = {"last.clean": "1" + "0" * 9, "last.pgd50": "1" + "0" * 9}  # 10 % clean: nothing learned
    at_chance = {"co16-fgsm": {0: {"block": {}, "jobs": {"fgsm.base": job(True, 2), "fgsm.der": chance}}}}
    assert paper_page.co_verdict(at_chance).startswith("not supported: DER's model is free of CO at the end of "
                                                         "training in 0 of 1")
    assert "DER at chance" in paper_page.co_verdict(at_chance)
    verdict = paper_page.lambda_verdict(at_chance)
    assert verdict.startswith("λ 1: at chance") and "10.0 [1.8, 40.4] (10)" in verdict
    assert verdict.endswith("not run yet: λ 0.1, 0.5, 6")
    del kept["co16-fgsm"][0]
    assert paper_page.co_verdict(kept).startswith("not supported")
    # the paired attack check from the flags on AutoAttack's images: 41 that PGD left standing and AutoAttack broke
    flags = {"last.clean": "1" * 2000, "last.pgd50": "1" * 41 + "0" * 1959, "last.aa": "0" * 500}
    assert paper_page.check_cell({"flags": flags, "eval": {}}) == "41 / 0 (p < 0.001)"
    assert paper_page.check_cell({"eval": {}}) == "–"
    assert paper_page.check_cell({"flags": {k: v for k, v in flags.items() if k != "last.aa"}}) == "–"  # no AA
    assert paper_page.co_verdict({}).startswith("unresolved")


def test_the_committed_evidence_gets_its_worst_case_and_check_wherever_the_flags_allow():
    """Jobs evaluated before the evaluation stored a worst case still have PGD-50-10 and AutoAttack flags: the page
    counts the worst case and the paired check from them (N-FGSM: PGD-50-10 left 36 of the 500 AutoAttack images
    standing that AutoAttack broke), pairs DER with base by the test split's checksum, and the headline rows carry
    each column's images."""
    evidence = paper_report_stage.read_evidence(ROOT / "metrics/paper")
    n_fgsm = evidence["co16-n-fgsm"][0]["jobs"]["n-fgsm.base"]
    assert "last.worst" not in n_fgsm["flags"] and "last.check.p" not in n_fgsm["eval"]
    assert paper_page.accuracy_cell(n_fgsm, "worst") == "19.8 [16.5, 23.5] (500)"
    assert paper_page.check_cell(n_fgsm) == "36 / 0 (p < 0.001)"
    page = paper_page.page(evidence)
    assert "| 19.8 [16.5, 23.5] (500) | 19.8 [16.5, 23.5] (500) | 36 / 0 (p < 0.001) |" in page
    diffs = paper_page.comparisons(evidence)
    assert {(d["block"], d["metric"]) for d in diffs if d["run"] == "fgsm"} >= {("co16-fgsm", "worst")}
    rows = headline.from_paper(evidence)
    assert rows["co16-n-fgsm.n-fgsm.base.seed0"]["worst"] == 0.198
    assert (rows["co16-n-fgsm.n-fgsm.base.seed0"]["n_worst"], rows["co16-n-fgsm.n-fgsm.base.seed0"]["n_pgd"]) == \
        (500, 2000)
    other = {**evidence["co16-fgsm"][0]["jobs"]["fgsm.der"]["flags"], "test_sha256": "0" * 64}
    evidence["co16-fgsm"][0]["jobs"]["fgsm.der"]["flags"] = other
    with pytest.raises(UserError, match=r"metrics/paper/co16-fgsm/seed0/fgsm\.base\.flags\.json and "
                                        r"metrics/paper/co16-fgsm/seed0/fgsm\.der\.flags\.json cover different test "
                                        r"images"):
        paper_page.comparisons(evidence)
