"""torch-fidelity wiring: the classifier feature extractor, a locally made Inception weights file, diversity."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
import torch_fidelity
from torch_fidelity import feature_extractor_inceptionv3 as tf_inception

from energyat import checkpoint, fidelity
from energyat.errors import UserError

META = {"arch": "small-cnn", "dataset": "synthetic", "num_classes": 4, "channels": 1, "size": 16,
        "mean": [0.5], "std": [0.25], "run": "standard", "variant": "base", "method": "standard", "eps": 0.0}


def images(n: int, seed: int, size: int = 16, channels: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (n, channels, size, size), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """An untrained small CNN saved as a checkpoint (path, model)."""
    torch.manual_seed(0)
    model = checkpoint.new_model(META).eval()
    path = tmp_path_factory.mktemp("std") / "best.pt"
    checkpoint.save(path, model, META)
    return path, model


def fid_reference(f1: np.ndarray, f2: np.ndarray) -> float:
    """FID from its definition, with scipy's matrix square root (torch-fidelity uses eigenvalues instead)."""
    m1, m2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_classifier_extractor_matches_a_direct_computation(classifier):
    path, model = classifier
    x1, x2 = images(40, 1), images(60, 2)
    got = torch_fidelity.calculate_metrics(
        input1=fidelity.Images(x1), input2=fidelity.Images(x2), isc=True, fid=True, isc_splits=1, cuda=False,
        feature_extractor=fidelity.CLASSIFIER, feature_extractor_weights_path=str(path), verbose=False,
        save_cpu_ram=True, cache=False)
    def feats(x):
        with torch.no_grad():
            z = model.net.features((x.float() / 255 - 0.5) / 0.25)  # the small CNN's last feature map
        return z.mean((2, 3)).double().numpy()

    with torch.no_grad():
        p = F.softmax(model(x1.float() / 255).double(), 1)
    is_ref = float(torch.exp((p * (p.log() - p.mean(0, keepdim=True).log())).sum(1).mean()))
    assert got[torch_fidelity.KEY_METRIC_ISC_MEAN] == pytest.approx(is_ref, rel=1e-4)
    assert got[torch_fidelity.KEY_METRIC_FID] == pytest.approx(fid_reference(feats(x1), feats(x2)), rel=1e-3, abs=1e-6)
    assert feats(x1).shape == (40, 64)  # the small CNN: 64 channel means, not the 64·4·4 flattened map


def test_scorer_reuses_the_reference_and_scores_it_as_identical(classifier):
    path, _ = classifier
    ref = images(50, 3)
    scorer = fidelity.Scorer(fidelity.CLASSIFIER, path, ref, device=torch.device("cpu"), batch_size=16, seed=0)
    try:
        same = scorer.score(ref)
        other = scorer.score(images(30, 4))
        again = scorer.score(images(30, 4))
    finally:
        scorer.close()
    assert same["fid"] == pytest.approx(0.0, abs=1e-6)
    assert other["fid"] > 1e-4 and again == other
    assert 1.0 <= other["is"] <= META["num_classes"]


def test_features_and_diversity(classifier):
    path, model = classifier
    x = images(12, 5)
    f = fidelity.features(fidelity.pooled_features(path, torch.device("cpu")), x, batch_size=5)
    with torch.no_grad():
        direct = model.net.features((x.float() / 255 - 0.5) / 0.25).mean((2, 3))
    torch.testing.assert_close(f, direct, atol=1e-5, rtol=1e-5)
    feats = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0], [0.0, 1.0], [0.0, 2.0]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    # class 0: one pair at distance 5; class 1: pairs at 1, 2, 1
    assert fidelity.diversity(feats, labels) == pytest.approx((5 + 4 / 3) / 2)
    with pytest.raises(ValueError, match="two samples"):
        fidelity.diversity(feats[:1], labels[:1])
    with pytest.raises(ValueError, match="uint8"):
        fidelity.Images(x.float())


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """A weights file with the keys and shapes torch-fidelity's Inception-v3 loads, random values."""
    real_load = tf_inception.FeatureExtractorInceptionV3.load_state_dict
    tf_inception.load_state_dict_from_url = lambda *a, **k: {}  # never reach the network
    tf_inception.FeatureExtractorInceptionV3.load_state_dict = lambda self, state: None
    try:
        torch.manual_seed(0)
        net = tf_inception.FeatureExtractorInceptionV3(fidelity.INCEPTION, ["2048"])
    finally:
        tf_inception.FeatureExtractorInceptionV3.load_state_dict = real_load
    path = tmp_path_factory.mktemp("inception") / fidelity.INCEPTION_FILE
    torch.save(net.state_dict(), path)
    return path


def test_inception_weights_are_found_and_checked(inception_file, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert fidelity.inception_weights("") is None  # nothing named, nothing cached: "not computed"
    cached = tmp_path / "torch" / "hub" / "checkpoints" / fidelity.INCEPTION_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(inception_file.read_bytes())
    assert fidelity.inception_weights("") == cached
    assert fidelity.inception_weights(str(inception_file)) == inception_file
    with pytest.raises(UserError, match="is not a file"):
        fidelity.inception_weights(str(tmp_path / "missing.pth"))
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(UserError, match="does not fit torch-fidelity's Inception-v3"):
        fidelity.inception_weights(str(wrong))
    torch.save({"fc.weight": "not a tensor"}, wrong)
    with pytest.raises(UserError, match="not a state dict of tensors"):
        fidelity.inception_weights(str(wrong))


def test_inception_scorer_runs_on_grey_images(inception_file):
    ref = images(5, 6, size=20)
    # FID on the 64-d early pool instead of the 2048-d one: the same wiring without a 2048² eigendecomposition
    scorer = fidelity.Scorer(fidelity.INCEPTION, inception_file, ref, device=torch.device("cpu"), batch_size=5, seed=0,
                             feature_layer_fid="64")
    try:
        got = scorer.score(images(5, 7, size=20))  # grey: repeated to the 3 channels Inception reads
        same = scorer.score(ref)
    finally:
        scorer.close()
    assert 1.0 <= got["is"] <= 1008 and np.isfinite(got["fid"]) and got["fid"] > 0
    assert same["fid"] == pytest.approx(0.0, abs=1e-6)
