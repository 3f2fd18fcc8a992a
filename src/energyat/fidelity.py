"""IS / FID through torch-fidelity, with Inception-v3 or with a classifier of our own as feature extractor.

- Inception (torch-fidelity's `inception-v3-compat`): comparable with the literature, but only from a
  local weights file; nothing here downloads or estimates it.
- `energyat-classifier`: a checkpoint of this project (the `standard` model) registered as a
  torch-fidelity feature extractor. IS reads its softmax; FID and diversity read its last feature
  map, rectified and averaged over space — the role Inception's 2048-d pool3 plays. For the
  PreAct-ResNet/WRN that is exactly the vector their linear head reads; the small CNN's head reads
  the 64×7×7 map flattened (3136 numbers), too many for a covariance from a few hundred samples
  (and an eigendecomposition of seconds per FID), so its 64 channel means are used.

Both extractors take uint8 images (N, C, H, W), as torch-fidelity feeds them.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
import torch_fidelity
from torch import Tensor
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3

from . import checkpoint
from .artifacts import load_torch
from .errors import UserError

CLASSIFIER = "energyat-classifier"
INCEPTION = "inception-v3-compat"
INCEPTION_FILE = os.path.basename(URL_INCEPTION_V3)


class ClassifierFeatures(torch_fidelity.FeatureExtractorBase):
    """A classifier checkpoint (`feature_extractor_weights_path`) as a torch-fidelity feature extractor."""

    def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None,
                 **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise UserError(f"{CLASSIFIER}: needs feature_extractor_weights_path, a classifier checkpoint (.pt)")
        self.model, self.meta = checkpoint.load(feature_extractor_weights_path)
        self.model.requires_grad_(False)
        # the last 4-D output among the network's top-level blocks is its last feature map
        self._maps: list[Tensor] = []
        for block in self.model.net.children():
            block.register_forward_hook(self._keep_map)

    def _keep_map(self, _module, _inputs, out) -> None:
        if torch.is_tensor(out) and out.ndim == 4:
            self._maps.append(out)

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
        if not self._maps:
            raise UserError(f"{CLASSIFIER}: arch {self.meta['arch']!r} has no 4-D feature map among its top-level blocks")
        pool = F.relu(self._maps[-1]).mean((2, 3))
        self._maps.clear()
        out = {"pool": pool, "logits": logits}
        return tuple(out[f].float() for f in self.features_list)


torch_fidelity.register_feature_extractor(CLASSIFIER, ClassifierFeatures)


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


class Scorer:
    """IS and FID of sample sets against one fixed reference set, with one feature extractor.

    The reference features are extracted once: torch-fidelity caches them (and their FID statistics)
    under a private temporary folder that lives as long as this object.
    """

    def __init__(self, extractor: str, weights: str | Path, reference: Tensor, *, device: torch.device,
                 batch_size: int, seed: int, **options):
        """`options`: further `torch_fidelity.calculate_metrics` arguments (e.g. `feature_layer_fid`)."""
        self.rgb = extractor == INCEPTION
        self.reference = Images(reference, self.rgb)
        self._cache = tempfile.TemporaryDirectory(prefix="energyat-fidelity-")
        self.kwargs = dict(
            feature_extractor=extractor, feature_extractor_weights_path=str(weights),
            cuda=device.type == "cuda", batch_size=batch_size, rng_seed=seed, verbose=False,
            save_cpu_ram=True,  # no DataLoader worker processes: the images are already in memory
            cache=True, cache_root=self._cache.name, input2_cache_name="reference", **options,
        )

    def score(self, samples: Tensor) -> dict[str, float]:
        """{"is", "is_std", "fid"} of uint8 `samples` (N, C, H, W); IS uses min(10, N) splits."""
        m = torch_fidelity.calculate_metrics(input1=Images(samples, self.rgb), input2=self.reference, isc=True,
                                             fid=True, isc_splits=min(10, samples.shape[0]), **self.kwargs)
        return {"is": m[torch_fidelity.KEY_METRIC_ISC_MEAN], "is_std": m[torch_fidelity.KEY_METRIC_ISC_STD],
                "fid": m[torch_fidelity.KEY_METRIC_FID]}

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
