"""The command line a newcomer meets: --help lists every stage with one line, arguments have help and choices,
a missing input names the `dvc repro` target that makes it, logs print rounded numbers and an ETA."""
import subprocess
import sys
from pathlib import Path

import pytest

from energyat import cli
from energyat.infra import artifacts
from energyat.stages.train import _eta, _fmt

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_every_stage_with_one_line(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for name, (_, _, about) in cli.STAGES.items():
        assert name in out and about.split()[0] in out
    assert "ENERGYAT_PROGRESS" in out


def test_arguments_have_choices(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "pgd", "both"])
    assert "argument variant: invalid choice: 'both' (choose from base, der)" in capsys.readouterr().err.replace("'base', 'der'", "base, der")


@pytest.mark.parametrize("path, target", [
    ("data/prepared/train.pt", "prepare"),
    ("models/base/standard/best.pt", "train-standard"),
    ("models/base/fgsm/last.pt", "train@fgsm"),
    ("models/der/pgd/best.json", "train-der@pgd"),
    ("data/pca/global.pt", "pca"),
    ("data/samples/pca-local/base.pt", "sample@pca-local"),
    ("data/class_energy.json", "class-energy"),
    ("metrics/eval/standard.base.json", "evaluate-standard"),
    ("metrics/eval/pgd.der.flags.json", "evaluate@pgd-der"),
    ("metrics/train/n-fgsm.base.json", "train@n-fgsm"),
    ("metrics/score.json", "score"),
])
def test_a_missing_input_names_the_command_that_makes_it(path, target):
    assert f"make it first with `dvc repro {target}`" in str(artifacts.missing(path))


def test_missing_prepared_data_from_the_command_line(tmp_path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    proc = subprocess.run([sys.executable, "-m", "energyat", "evaluate", "pgd", "base"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith("make it first with `dvc repro prepare`")


def test_nproc_is_a_number_of_ranks_or_auto(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--nproc", "two", "evaluate", "pgd", "base"])
    assert "argument --nproc: 'two': a number of ranks, or auto" in capsys.readouterr().err


def test_log_numbers_are_rounded_and_the_eta_uses_the_recent_pace():
    class RC:
        class train:
            epochs = 10

    history = [{"epoch": e, "seconds": s} for e, s in ((1, 30.0), (2, 10.0), (3, 10.0), (4, 10.0), (5, 10.0), (6, 10.0))]
    assert _eta(history, RC) == "0m40s"  # 4 epochs left at the last five epochs' 10 s
    assert _fmt(float("nan")) == "–" and _fmt(0.014000000432133675) == "0.014"
