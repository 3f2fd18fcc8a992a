"""The paper's setting in GPU-window blocks: each block is a valid params set with the published recipe, and the
block runner (the pipeline's own stages) writes whole jobs of evidence, honours its deadline, resumes, and the
results page is built from that evidence alone."""
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from energyat import cli
from energyat import params as P
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
    assert set(p.run_names()) == set(paper_blocks.BLOCKS[name].runs)


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
    assert sorted(lam.variant_run(r, "der").der.lam for r in lam.run_names()) == [0.1, 0.5, 1.0, 6.0]
    assert paper_blocks.BLOCKS["co16-lambda"].jobs() == [(r, "der") for r in lam.run_names()]


def test_ro_block_switches_der_on_at_the_first_lr_drop():
    from energyat.science.training import learning_rate

    rc = P.parse(paper_blocks.params_for(PRESET, "ro", "/x", seed=0)).variant_run("pgd", "der")
    first_drop = next(e for e in range(1, 31) if learning_rate(rc.train, e - 0.5) < rc.train.lr_max)
    assert rc.der.first_epoch(rc.train.epochs) == first_drop == 16
    assert (rc.der.lam, rc.der.gamma) == (6.0, 0.2)
    assert METHODS["pgd"].threat(rc.train).alpha == pytest.approx(2 / 255)


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


def _block(tmp_path, *extra):
    return cli.main(["block", "co16-fgsm", "--tiny", "--device", "cpu", "--preset", str(ROOT / "presets/paper.yaml"),
                     "--data", str(tmp_path / "cifar"), "--out", str(tmp_path / "out"),
                     "--work", str(tmp_path / "work"), *extra])


def test_block_runner_deadline_resume_evidence_and_page(tmp_path, monkeypatch, capsys):
    _image_tree(tmp_path / "cifar")
    monkeypatch.chdir(tmp_path)  # no params.yaml here: a block needs none
    tar = tmp_path / "ev.tar.gz"
    # the tiny prior is 5 s a job: the first starts, the measured cost of the first then rules the second out
    assert _block(tmp_path, "--deadline", "8", "--tar", str(tar)) == 0
    out = tmp_path / "out/co16-fgsm/seed0"
    record = json.loads((out / "block.json").read_text())
    assert record["jobs"]["fgsm.base"]["status"] == "done"
    assert record["jobs"]["fgsm.der"]["status"] == "skipped" and "left" in record["jobs"]["fgsm.der"]["why"]
    suffixes = ["train.json", "history.tsv", "eval.json", "flags.json", "autoattack.log"]
    assert all((out / f"fgsm.base.{s}").is_file() for s in suffixes)
    assert not (out / "fgsm.der.eval.json").exists()
    with tarfile.open(tar) as archive:
        assert "out/co16-fgsm/seed0/fgsm.base.flags.json" in archive.getnames()
    ev, flags = json.loads((out / "fgsm.base.eval.json").read_text()), json.loads((out / "fgsm.base.flags.json").read_text())
    assert (ev["n_examples"], ev["aa_examples"], ev["restarts"]) == (64, 8, 2)
    assert len(flags["last.pgd50"]) == 64 and len(flags["last.aa"]) == 8
    assert ev["last.clean_acc"] == pytest.approx(flags["last.clean"].count("1") / 64, abs=1e-4)
    saved = yaml.safe_load((out / "params.yaml").read_text())
    assert saved["runs"]["fgsm"]["eps"] == pytest.approx(16 / 255) and saved["model"]["arch"] == "small-cnn"
    # again without a deadline: the finished job is kept as it was, the skipped one runs
    stamp = (out / "fgsm.base.eval.json").stat().st_mtime_ns
    capsys.readouterr()
    assert _block(tmp_path) == 0
    assert "fgsm.base done earlier" in capsys.readouterr().err
    assert (out / "fgsm.base.eval.json").stat().st_mtime_ns == stamp
    assert json.loads((out / "block.json").read_text())["jobs"]["fgsm.der"]["status"] == "done"
    # the results page and headline metrics from the evidence alone
    evidence = paper_report_stage.read_evidence(tmp_path / "out")
    assert set(evidence["co16-fgsm"][0]["jobs"]) == {"fgsm.base", "fgsm.der"}
    page = paper_page.page(evidence)
    assert "### `co16-fgsm`" in page and "| fgsm | 0 |" in page and "`ro` (~" in page
    diffs = paper_page.comparisons(evidence)
    assert {d["metric"] for d in diffs} == {"clean", "pgd50", "aa", "worst"} and all(0 <= d["p_holm"] <= 1 for d in diffs)
    rows = headline.from_paper(evidence)
    assert set(rows) == {"co16-fgsm.fgsm.base.seed0", "co16-fgsm.fgsm.der.seed0"}
    assert rows["co16-fgsm.fgsm.base.seed0"]["clean"] == round(ev["last.clean_acc"], 4)


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
    check = {"last.check.pgd_missed": 41, "last.check.apgd_missed": 0, "last.check.p": 4.547e-13}
    assert paper_page.check_cell({"eval": check}) == "41 / 0 (p < 0.001)"
    assert paper_page.check_cell({"eval": {}}) == "–"
    assert paper_page.co_verdict({}).startswith("unresolved")
