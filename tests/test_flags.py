"""Per-example flags (reporting/flags.py): decoding, the worst cases over the attacks that ran on the same images, the
paired attack check, pairing by the test split's checksum; on synthetic flags and on every committed flags file."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from energyat.errors import UserError
from energyat.evaluation import robustness
from energyat.reporting import flags as flagfile
from energyat.stages import evaluate

ROOT = Path(__file__).resolve().parents[1]


def _s(bits) -> str:
    return "".join("1" if b else "0" for b in bits)


def synthetic(rng, n=60, n_apgd=30, n_aa=20, checkpoint="last") -> dict:
    """A flags file whose evaluations are nested the way attacks nest: clean ⊇ PGD-10 ⊇ PGD-50, APGD and AutoAttack
    drawn independently of PGD (either may miss what the other breaks), each on its prefix."""
    clean = rng.random(n) < 0.8
    pgd10 = clean & (rng.random(n) < 0.7)
    pgd50 = pgd10 & (rng.random(n) < 0.9)
    apgd = clean[:n_apgd] & (rng.random(n_apgd) < 0.6)
    aa = clean[:n_aa] & (rng.random(n_aa) < 0.5)
    out = {"format": flagfile.FORMAT, "test_sha256": "abc", "n": n, "apgd_n": n_apgd, "aa_n": n_aa,
           f"{checkpoint}.epoch": 5}
    out.update({f"{checkpoint}.{k}": _s(v) for k, v in (("clean", clean), ("pgd10", pgd10), ("pgd50", pgd50),
                                                        ("apgd", apgd), ("aa", aa)) if len(v)})
    return out


def test_decoding_and_the_strongest_pgd():
    fl = {"last.aa": "011", "last.pgd50": "", "best.clean": "0a1", "last.epoch": 3}
    assert flagfile.vector(fl, "last", "aa_acc") == flagfile.vector(fl, "last", "aa") == [False, True, True]
    assert flagfile.vector(fl, "last", "pgd50") is None and flagfile.vector(fl, "best", "clean") is None
    assert flagfile.vector(fl, "last", "epoch") is None and flagfile.vector(None, "last", "aa") is None
    assert flagfile.strongest_pgd(["pgd10_acc", "pgd50_acc", "pgd50_acc_lo"]) == "pgd50_acc"
    keys = ["best.pgd100_acc", "last.pgd50_acc", "last.pgd20_acc", "apgd.apgd-t_acc"]
    assert flagfile.strongest_pgd(keys) == "pgd100_acc" and flagfile.strongest_pgd(keys, "last") == "pgd50_acc"
    assert flagfile.strongest_pgd(["clean_acc"]) is None


@pytest.mark.parametrize("n_apgd, n_aa", [(30, 20), (20, 20), (10, 20), (30, 0), (0, 20), (0, 0)])
def test_worst_cases_are_over_the_attacks_that_ran_on_the_same_images(n_apgd, n_aa):
    rng = np.random.default_rng(n_apgd * 100 + n_aa)
    for _ in range(20):
        fl = synthetic(rng, n_apgd=n_apgd, n_aa=n_aa)
        parts = flagfile.components(fl, "last")
        assert set(parts) == {"clean", "pgd10", "pgd50", *(["apgd"] if n_apgd else []), *(["aa"] if n_aa else [])}
        cases = flagfile.worst_cases(fl, "last")
        if not (n_apgd or n_aa):
            assert cases == {}
            continue
        worst = cases["worst"]
        assert len(worst) == (n_aa or n_apgd)  # AutoAttack's images where it ran, else APGD's
        assert ("pgd_apgd" in cases) == bool(n_apgd and n_aa)
        for name, f in cases.items():
            # never above any accuracy counted on the same images, per image and as an accuracy
            for part, g in parts.items():
                if name == "pgd_apgd" and part == "aa":
                    continue
                m = min(len(f), len(g))
                assert all(not w or c for w, c in zip(f[:m], g[:m])), (name, part)
                if len(g) >= len(f):
                    assert sum(f) / len(f) <= sum(g[:len(f)]) / len(f)
            # the evaluate stage's own worst case (torch), over the same evaluations and images
            over = {k: torch.tensor(g) for k, g in parts.items() if name == "worst" or k != "aa"}
            assert robustness.worst_case(over, len(f)).tolist() == f
        if "pgd_apgd" in cases:  # on the images both count, every attack is at most PGD + APGD
            m = min(len(worst), len(cases["pgd_apgd"]))
            assert sum(worst[:m]) <= sum(cases["pgd_apgd"][:m])
        assert flagfile.accuracy_vector({**fl, "last.worst": "1" * 60}, "last", "worst_acc") == worst  # never stored


def test_the_evaluate_stage_counts_the_worst_cases_on_the_same_images():
    class Cfg:
        n_examples, apgd_examples, aa_examples, autoattack = 1000, 100, 50, True
    assert evaluate.attacked_examples(Cfg) == {"apgd": 100, "aa": 50, "check": 100, "worst": 50, "pgd_apgd": 100}
    Cfg.autoattack = False
    assert evaluate.attacked_examples(Cfg) == {"apgd": 100, "aa": 0, "check": 100, "worst": 100, "pgd_apgd": 0}
    Cfg.autoattack, Cfg.apgd_examples, Cfg.aa_examples = True, 0, 500
    assert evaluate.attacked_examples(Cfg) == {"apgd": 0, "aa": 500, "check": 500, "worst": 500, "pgd_apgd": 0}


def test_the_attack_check_from_flags_is_the_evaluate_stages():
    rng = np.random.default_rng(7)
    for n_apgd, n_aa in ((30, 20), (0, 20), (30, 0)):
        fl = synthetic(rng, n_apgd=n_apgd, n_aa=n_aa)
        parts = {k: torch.tensor(v) for k, v in flagfile.components(fl, "last").items()}
        n = max(n_apgd, n_aa)
        strong = robustness.worst_case({k: v for k, v in parts.items() if k in ("apgd", "aa")}, n)
        assert flagfile.attack_check(fl, "last") == evaluate.attack_check(parts["pgd50"][:n], strong)
    assert flagfile.attack_check({"last.clean": "11", "last.pgd50": "10"}, "last") is None


def test_pairing_is_by_the_test_splits_checksum_and_the_images():
    a = {"test_sha256": "abc", "run": "r", "last.clean": "1100", "last.aa": "10"}
    assert flagfile.pair(a, "last", {**a, "last.clean": "0110"}, "last", "clean_acc") == \
        ([True, True, False, False], [False, True, True, False])
    assert flagfile.pair(a, "last", {"test_sha256": "abc"}, "last", "clean") is None  # nothing to pair
    with pytest.raises(UserError, match=r"^a\.json and b\.json cover different test images \(test_sha256 'abc' vs "
                                        r"'def'\); re-run evaluate for both$"):
        flagfile.pair(a, "last", {**a, "test_sha256": "def"}, "last", "clean", ("a.json", "b.json"))
    with pytest.raises(UserError, match=r"test_sha256 'abc' vs None"):  # no checksum: which images is unknown
        flagfile.pair(a, "last", {k: v for k, v in a.items() if k != "test_sha256"}, "last", "clean")
    with pytest.raises(UserError, match=r"\(clean: the first 4 vs the first 3\)"):
        flagfile.pair(a, "last", {**a, "last.clean": "110"}, "last", "clean")


def committed_flags() -> list[tuple[Path, dict, dict]]:
    """(path, flags, the evaluate JSON of the same evaluation) of every committed flags file."""
    out = []
    for path in sorted(ROOT.glob("metrics/**/*.flags.json")):
        if path.parents[3].name == "studies":  # metrics/studies/<study>/<experiment>/eval/
            record = json.loads((path.parent.parent / "experiment.json").read_text())
            ev = record["metrics"].get(f"metrics/eval/{path.name.removesuffix('.flags.json')}.json", {})
        elif path.parent.parent.parent.name == "paper":
            ev = json.loads(path.with_name(path.name.replace(".flags.json", ".eval.json")).read_text())
        else:
            ev = json.loads(path.with_name(path.name.replace(".flags.json", ".json")).read_text())
        out.append((path, json.loads(path.read_text()), ev))
    return out


def test_committed_flags_worst_cases_and_checks():
    """On every committed evaluation: the worst cases never exceed an accuracy on the same images, the check from the
    flags is the one the evaluation recorded, and every file names its test split."""
    files = committed_flags()
    assert len(files) >= 50
    for path, fl, ev in files:
        assert len(fl["test_sha256"]) == 64, path
        for ck in ("best", "last"):
            parts = flagfile.components(fl, ck)
            for name, f in flagfile.worst_cases(fl, ck).items():
                for part, g in parts.items():
                    if len(g) >= len(f) and not (name == "pgd_apgd" and part == "aa"):
                        assert sum(f) <= sum(g[:len(f)]), (path, ck, name, part)
            if f"{ck}.check.p" in ev:
                check = flagfile.attack_check(fl, ck)
                assert (check["n"], check["pgd_missed"], check["apgd_missed"]) == \
                    (ev[f"{ck}.check.n"], ev[f"{ck}.check.pgd_missed"], ev[f"{ck}.check.apgd_missed"]), (path, ck)
                assert float(f"{check['p']:.4g}") == ev[f"{ck}.check.p"]
