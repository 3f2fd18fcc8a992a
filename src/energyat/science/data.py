"""Dataset sources -> uint8 image tensors with checksums; a seeded validation split; batches from memory.

Sources (``data.dataset`` / ``data.source``):
  fashion-mnist  IDX files (.gz or raw) from a folder: Debian's package, a path, or a torchvision download;
                 their content is checked against the official files' MD5s.
  cifar10, cifar100, svhn  torchvision datasets (torchvision verifies their MD5s), downloaded or from a path.
  image-folder   ``train/<class>/<image>`` and ``test/<class>/<image>``, in a directory or a .tar.gz.
Only the download sources touch the network.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import math
import struct
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import UserError
from ..infra.artifacts import load_torch, read_json, sha256
from ..infra.runtime import progress

SPLITS = ("train", "val", "test")
PREPARED = Path("data/prepared")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# file -> (MD5 of the official .gz, MD5 of its decompressed IDX content). Debian recompressed the .gz files
# (different gzip headers), so the content MD5 is what identifies the official data in every copy.
FASHION_MNIST_MD5 = {
    "train-images-idx3-ubyte": ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
    "train-labels-idx1-ubyte": ("25c81989df183df01b3e8a0aad5dffbe", "9018921c3c673c538a1fc5bad174d6f9"),
    "t10k-images-idx3-ubyte": ("bef4ecab320f06d8554ea6380940ec79", "8181f5470baa50b63fa0f6fddb340f0a"),
    "t10k-labels-idx1-ubyte": ("bb300cfdad3c16e7a12a480ee83cd310", "15d484375f8d13e6eb1aabb0c3f46965"),
}
TORCHVISION = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "svhn": "SVHN"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff")
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")


@dataclass(frozen=True)
class Split:
    """Images and labels of one split, kept as uint8 so a whole dataset fits in (device) memory."""

    x: torch.Tensor  # uint8, N x C x H x W
    y: torch.Tensor  # int64, N

    def __post_init__(self):
        if self.x.dtype != torch.uint8 or self.x.dim() != 4:
            raise ValueError(f"Split.x must be uint8 N x C x H x W, got {self.x.dtype} {tuple(self.x.shape)}")
        if self.y.dtype != torch.int64 or self.y.shape != (self.x.shape[0],):
            raise ValueError(f"Split.y must be int64 of length {self.x.shape[0]}, got {self.y.dtype} {tuple(self.y.shape)}")

    def __len__(self) -> int:
        return self.x.shape[0]


@dataclass(frozen=True)
class Source:
    """A dataset as its source provides it, before the validation split."""

    train: Split
    test: Split
    classes: tuple[str, ...]
    description: str  # where it came from and how it was verified
    checksums: dict[str, str] = field(default_factory=dict)  # source file -> sha256


# ------------------------------------------------------------------------------------------------ IDX files

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _gunzip(blob: bytes, path: Path) -> bytes:
    try:
        return gzip.decompress(blob)
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile, truncated stream, bad CRC
        raise UserError(f"{path}: truncated or corrupt gzip file ({exc})") from None


def parse_idx(raw: bytes, path: Path) -> np.ndarray:
    """The array stored in IDX bytes (magic 0 0 <dtype> <ndim>, big-endian uint32 dims, then the data)."""
    if len(raw) < 4 or raw[0] or raw[1] or raw[2] not in _IDX_DTYPES:
        raise UserError(f"{path}: not an IDX file (magic bytes {raw[:4].hex() or 'missing'})")
    ndim, header = raw[3], 4 + 4 * raw[3]
    if len(raw) < header:
        raise UserError(f"{path}: truncated IDX file ({len(raw)} bytes, header alone needs {header})")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + math.prod(dims) * dtype.itemsize
    if len(raw) != expected:
        raise UserError(f"{path}: truncated or corrupt IDX file ({len(raw)} bytes, its header {dims} needs {expected})")
    return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file, gzip-compressed or not (told apart by the gzip magic bytes, not the name)."""
    path = Path(path)
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    return parse_idx(_gunzip(blob, path) if blob[:2] == b"\x1f\x8b" else blob, path)


# ------------------------------------------------------------------------------------------------ Fashion-MNIST

def _fashion_mnist_files(folder: Path) -> dict[str, Path] | None:
    """The four IDX files in `folder` (each as .gz or raw), or None when one is missing."""
    files = {}
    for name in FASHION_MNIST_MD5:
        found = [p for p in (folder / f"{name}.gz", folder / name) if p.is_file()]
        if not found:
            return None
        files[name] = found[0]
    return files


def fashion_mnist(folder: str | Path) -> Source:
    """Fashion-MNIST from the IDX files in `folder`; anything but the official content is a UserError."""
    folder = Path(folder)
    files = _fashion_mnist_files(folder)
    if files is None:
        names = ", ".join(f"{n}[.gz]" for n in FASHION_MNIST_MD5)
        raise UserError(f"data.source: {folder}: Fashion-MNIST IDX files not found (needs {names})")
    arrays, checksums, official_gz = {}, {}, True
    for name, (gz_md5, content_md5) in FASHION_MNIST_MD5.items():
        path = files[name]
        blob = path.read_bytes()
        checksums[path.name] = hashlib.sha256(blob).hexdigest()
        is_gz = blob[:2] == b"\x1f\x8b"
        official_gz &= is_gz and hashlib.md5(blob).hexdigest() == gz_md5
        raw = _gunzip(blob, path) if is_gz else blob
        arrays[name] = parse_idx(raw, path)
        md5 = hashlib.md5(raw).hexdigest()
        if md5 != content_md5:
            raise UserError(f"{path}: content MD5 {md5} is not the official Fashion-MNIST {name} ({content_md5}); "
                            f"corrupt or another dataset")
    verified = ("official .gz files, MD5 verified" if official_gz
                else "IDX content MD5 verified against the official files")

    def split(images: str, labels: str) -> Split:
        return Split(torch.from_numpy(arrays[images]).unsqueeze(1), torch.from_numpy(arrays[labels]).long())

    return Source(split("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                  split("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
                  FASHION_MNIST_CLASSES, f"{folder} ({verified})", checksums)


def _download_fashion_mnist(root: Path) -> Path:
    import torchvision.datasets as tvd

    try:
        tvd.FashionMNIST(str(root), train=True, download=True)
    except Exception as exc:  # URLError, RuntimeError (MD5), tarfile/gzip errors: all mean "no dataset"
        raise _download_error("fashion-mnist", root, exc) from None
    return root / "FashionMNIST" / "raw"


def _one_line(exc: Exception) -> str:
    # torchvision's messages span lines ("Error downloading x:\nTried <url>, got:\n<error>")
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _download_error(dataset: str, root: Path, exc: Exception) -> UserError:
    return UserError(f"could not download {dataset} into {root}: {_one_line(exc)}; "
                     f"put the files there or use source: <path>")


# ------------------------------------------------------------------------------------------------ torchvision

def torchvision_dataset(dataset: str, root: str | Path, download: bool) -> Source:
    """CIFAR-10/100 or SVHN in torchvision's layout under `root` (downloaded first when `download`)."""
    import torchvision.datasets as tvd

    root = Path(root)
    cls = getattr(tvd, TORCHVISION[dataset])
    try:
        if dataset == "svhn":
            parts = [cls(str(root), split=s, download=download) for s in ("train", "test")]
        else:
            parts = [cls(str(root), train=t, download=download) for t in (True, False)]
    except Exception as exc:  # download failures, MD5 mismatches, unreadable archives
        if download:
            raise _download_error(dataset, root, exc) from None
        raise UserError(f"data.source: {root}: no usable {dataset} in torchvision's layout there "
                        f"({_one_line(exc)})") from None
    if dataset == "svhn":
        splits = [Split(torch.from_numpy(np.ascontiguousarray(p.data)), torch.from_numpy(p.labels).long())
                  for p in parts]
        classes = tuple(str(d) for d in range(10))
        files = [root / p.filename for p in parts]
    else:
        splits = [Split(torch.from_numpy(p.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(p.targets))
                  for p in parts]
        classes = tuple(parts[0].classes)
        files = [root / cls.base_folder / name for name, _ in cls.train_list + cls.test_list]
    checksums = {str(f.relative_to(root)): sha256(f) for f in files}
    return Source(splits[0], splits[1], classes, f"{root} (torchvision {TORCHVISION[dataset]}, MD5 verified)", checksums)


# ------------------------------------------------------------------------------------------------ image folders

def _tree_members(root: Path) -> Iterator[tuple[str, bytes]]:
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES)):
        yield path.relative_to(root).as_posix(), path.read_bytes()


def _tar_members(path: Path) -> Iterator[tuple[str, bytes]]:
    # one streaming pass: random access into a .tar.gz would decompress it again for every member
    try:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                if member.isfile() and member.name.lower().endswith(IMAGE_SUFFIXES):
                    yield member.name, tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise UserError(f"{path}: unreadable or corrupt archive ({exc})") from None


def decode_image(blob: bytes, name: str, size: int = 0) -> np.ndarray:
    """uint8 H x W x C, C = 1 (greyscale) or 3, resized to size x size when `size` (PIL, antialiased).

    PIL rather than torchvision.io.decode_jpeg: that one is deprecated since torchvision 0.29 (a warning per
    call); it decodes 32x32 JPEGs ~2x faster, but on the 60k CIFAR-10 JPEGs that is ~1.5 s once per prepare.
    """
    try:
        with Image.open(io.BytesIO(blob)) as im:
            mode = "L" if im.mode in _GREY_MODES else "RGB"
            im = im.convert(mode) if im.mode != mode else im
            if size and im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BILINEAR)
            arr = np.asarray(im)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"{name}: cannot decode image ({exc})") from None
    return arr[:, :, None] if arr.ndim == 2 else arr


def _image_entries(members: Iterator[tuple[str, bytes]], where: Path) -> dict[str, list[tuple[str, str, bytes]]]:
    """{split: [(class, name, bytes)]} from the members laid out as [prefix/]<split>/<class>/<image>."""
    entries: dict[str, list[tuple[str, str, bytes]]] = {"train": [], "test": []}
    prefixes = set()
    for name, blob in members:
        parts = tuple(name.split("/"))  # plain str ops: PurePosixPath is slow over 60k members
        if (len(parts) < 3 or parts[-3] not in entries or parts[-1].startswith(".")
                or not name.lower().endswith(IMAGE_SUFFIXES)):
            continue
        prefixes.add(parts[:-3])
        entries[parts[-3]].append((parts[-2], name, blob))
    if len(prefixes) > 1:
        found = ", ".join(sorted("/".join(p) or "." for p in prefixes)[:3])
        raise UserError(f"data.source: {where}: train/ and test/ found under several folders ({found}); keep one tree")
    for split, items in entries.items():
        if not items:
            raise UserError(f"data.source: {where}: no {split}/<class>/<image> files "
                            f"(an image folder needs train/ and test/ with one sub-folder per class)")
    return entries


def image_folder(path: str | Path, image_size: int = 0) -> Source:
    """Images under train/<class>/ and test/<class>/ in a directory or a (.tar.gz) archive.

    Class indices follow the sorted train folder names; images are ordered by (class, path). With
    `image_size` every image is resized to image_size x image_size; without it all must share one square size.
    """
    path = Path(path)
    if path.is_dir():
        members = list(_tree_members(path))
        tree = hashlib.sha256()
        for name, blob in members:
            tree.update(f"{name}\0{hashlib.sha256(blob).hexdigest()}\n".encode())
        checksums = {f"{path.name}/": tree.hexdigest()}  # over the lines "<path> NUL <file sha256>", sorted
    elif path.is_file():
        members = list(progress(_tar_members(path), desc="read archive", unit="file"))
        checksums = {path.name: sha256(path)}
    else:
        raise UserError(f"data.source: {path}: not found (image-folder needs a directory or a .tar.gz)")
    entries = _image_entries(iter(members), path)
    del members
    classes = tuple(sorted({c for c, _, _ in entries["train"]}))
    unknown = sorted({c for c, _, _ in entries["test"]} - set(classes))
    if unknown:
        raise UserError(f"data.source: {path}: test classes {unknown} have no train/ folder")
    index = {c: i for i, c in enumerate(classes)}

    decoded = {}
    for split, items in entries.items():
        items.sort(key=lambda item: (item[0], item[1]))
        images = [decode_image(blob, f"{path}:{name}", image_size)
                  for _, name, blob in progress(items, desc=f"decode {split}")]
        decoded[split] = (images, torch.tensor([index[c] for c, _, _ in items]), [name for _, name, _ in items])

    shapes = {img.shape[:2] for images, _, _ in decoded.values() for img in images}
    if len(shapes) > 1 or any(h != w for h, w in shapes):
        names = {img.shape[:2]: name for images, _, files in decoded.values() for img, name in zip(images, files)}
        found = "; ".join(f"{h}x{w} ({names[(h, w)]})" for h, w in sorted(shapes)[:3])
        raise UserError(f"data.source: {path}: images must share one square size, found {found}; "
                        f"set data.image_size to resize them")
    (side, _), = shapes
    channels = max(img.shape[2] for images, _, _ in decoded.values() for img in images)  # greyscale joins RGB
    splits = [Split(torch.from_numpy(np.stack([np.broadcast_to(img, (side, side, channels)) for img in images]))
                    .permute(0, 3, 1, 2).contiguous(), y)
              for images, y, _ in decoded.values()]
    resized = f", resized to {image_size}x{image_size}" if image_size else ""
    return Source(splits[0], splits[1], classes, f"{path} (image folder{resized})", checksums)


# ------------------------------------------------------------------------------------------------ preparation

def load_source(cfg) -> Source:
    """The dataset that `cfg` (params.DataCfg) names, from the source it names."""
    source, root = cfg.source, Path(cfg.download_root)
    if cfg.dataset == "image-folder":
        if source in ("auto", "download"):
            raise UserError(f"data.source: {source!r} is not allowed for image-folder; "
                            f"give a directory or .tar.gz with train/<class>/ and test/<class>/")
        return image_folder(source, cfg.image_size)
    if source not in ("auto", "download") and not Path(source).exists():
        raise UserError(f"data.source: {source}: not found (allowed: auto, download or an existing path)")
    if cfg.dataset == "fashion-mnist":
        if source == "auto" and _fashion_mnist_files(DEBIAN_FASHION_MNIST) is not None:
            return fashion_mnist(DEBIAN_FASHION_MNIST)
        if source in ("auto", "download"):
            return fashion_mnist(_download_fashion_mnist(root))
        folder = Path(source)
        # also accept a torchvision root, e.g. an earlier download_root
        if _fashion_mnist_files(folder) is None and _fashion_mnist_files(folder / "FashionMNIST" / "raw"):
            folder = folder / "FashionMNIST" / "raw"
        return fashion_mnist(folder)
    if source in ("auto", "download"):
        return torchvision_dataset(cfg.dataset, root, download=True)
    return torchvision_dataset(cfg.dataset, source, download=False)


def split_validation(train: Split, val_size: int, seed: int) -> tuple[Split, Split]:
    """(train, val): `val_size` images held out by a seeded permutation; the rest stay in that shuffled order,
    so the first n training images are a random subset."""
    n = len(train)
    if val_size >= n:
        raise UserError(f"data.val_size: {val_size} is not allowed; must be < {n} (the training images)")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    keep, held = perm[val_size:], perm[:val_size]
    return Split(train.x[keep], train.y[keep]), Split(train.x[held], train.y[held])


TEST_ORDER_SEED = 0  # not params.seed: every experiment, whatever its seed, scores the same test images


def shuffle_test(test: Split) -> Split:
    """The test split in one fixed random order, so that the first n images (what evaluate and analyze score) are
    a random, class-mixed sample whatever order the source lists them in (image folders list them by class)."""
    order = torch.randperm(len(test), generator=torch.Generator().manual_seed(TEST_ORDER_SEED))
    return Split(test.x[order], test.y[order])


def channel_stats(x: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images on the [0, 1] scale, exact (from 256-bin histograms)."""
    values = torch.arange(256, dtype=torch.float64) / 255
    means, stds = [], []
    for c in range(x.shape[1]):
        counts = torch.bincount(x[:, c].reshape(-1), minlength=256).double()
        n = counts.sum()
        mean = (counts * values).sum() / n
        var = (counts * (values - mean) ** 2).sum() / n
        means.append(round(mean.item(), 6))
        stds.append(round(var.sqrt().item(), 6))
    return means, stds


def prepare(cfg, seed: int) -> tuple[dict[str, Split], dict]:
    """({train, val, test} splits, manifest without the output files' checksums) for params.DataCfg `cfg`."""
    source = load_source(cfg)
    train, val = split_validation(source.train, cfg.val_size, seed)
    splits = {"train": train, "val": val, "test": shuffle_test(source.test)}
    mean, std = channel_stats(train.x)
    _, channels, height, _ = train.x.shape
    meta = {
        "dataset": cfg.dataset,
        "source": source.description,
        "source_checksums": source.checksums,
        "classes": list(source.classes),
        "num_classes": len(source.classes),
        "channels": channels,
        "size": height,
        "mean": mean,
        "std": std,
        "counts": {name: len(split) for name, split in splits.items()},
        "seed": seed,
        "val_size": cfg.val_size,
    }
    return splits, meta


# ------------------------------------------------------------------------------------------------ consumers

def load_prepared(root: str | Path = PREPARED) -> tuple[dict[str, Split], dict]:
    """The prepare stage's splits and manifest; each file's sha256 is checked against meta.json first."""
    root = Path(root)
    meta = read_json(root / "meta.json")
    splits = {}
    for name in SPLITS:
        path = root / f"{name}.pt"
        expected = meta.get("files", {}).get(name)
        if not path.is_file():
            raise UserError(f"{path}: file not found (run `dvc repro prepare`)")
        if expected is None:
            raise UserError(f"{root / 'meta.json'}: no checksum for {name}.pt (rerun `dvc repro prepare`)")
        actual = sha256(path)
        if actual != expected:
            raise UserError(f"{path}: sha256 {actual[:12]}... does not match meta.json ({expected[:12]}...); "
                            f"corrupt or modified, rerun `dvc repro prepare`")
        obj = load_torch(path)
        try:
            splits[name] = Split(obj["x"], obj["y"])
        except (TypeError, KeyError, IndexError, ValueError) as exc:
            raise UserError(f"{path}: not a prepared split ({exc})") from None
    return splits, meta


def to_float(x: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1] on `device` (moved as uint8 first: 4x less to copy)."""
    return x.to(device, non_blocking=True).float().div_(255) if device is not None else x.float().div_(255)


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = False,
            generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) batches of in-memory tensors in order (or a permutation drawn from `generator`); the last
    partial batch is kept."""
    if len(x) != len(y):
        raise ValueError(f"batches: {len(x)} images but {len(y)} labels")
    if not shuffle:
        for i in range(0, len(x), batch_size):
            yield x[i:i + batch_size], y[i:i + batch_size]
        return
    order = torch.randperm(len(x), generator=generator).to(x.device)
    for i in range(0, len(x), batch_size):
        idx = order[i:i + batch_size]
        yield x[idx], y[idx]


# ------------------------------------------------------------------------------------------------ augmentation

@dataclass(frozen=True)
class Augmentation:
    """Per-image draws of one batch: crop shifts in [-pad, pad] (pixels, rows and columns) and horizontal flips."""

    dy: torch.Tensor  # int64, N
    dx: torch.Tensor  # int64, N
    flip: torch.Tensor  # bool, N

    def __getitem__(self, rows) -> "Augmentation":
        return Augmentation(self.dy[rows], self.dx[rows], self.flip[rows])


def draw_augmentation(n: int, kind: str, generator: torch.Generator, device, pad: int = 4) -> Augmentation | None:
    """Draws for `n` images of augmentation `kind` (none | crop | crop-flip) from `generator` (on `device`);
    None for `none`. The caller draws for the whole global batch and slices, so ranks agree on every image."""
    if kind == "none":
        return None
    if kind not in ("crop", "crop-flip"):
        raise ValueError(f"augmentation {kind!r}; allowed: none, crop, crop-flip")
    shifts = torch.randint(-pad, pad + 1, (2, n), generator=generator, device=device)
    flip = torch.rand(n, generator=generator, device=device) < 0.5 if kind == "crop-flip" else \
        torch.zeros(n, dtype=torch.bool, device=device)
    return Augmentation(shifts[0], shifts[1], flip)


def augment(x: torch.Tensor, aug: Augmentation, pad: int = 4) -> torch.Tensor:
    """Random crop of the zero-padded image (torchvision's RandomCrop(size, padding=pad)) then horizontal flip,
    as one gather on `x`'s device; works on uint8 or float images (N, C, H, W)."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    rows = aug.dy[:, None] + pad + ar_h  # (N, H) rows of the padded image
    cols = aug.dx[:, None] + pad + torch.where(aug.flip[:, None], w - 1 - ar_w, ar_w)  # (N, W)
    out = padded[torch.arange(n, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


def first_per_class(y: torch.Tensor, num_classes: int, n: int) -> torch.Tensor:
    """Indices of the first `n` images of each class (all of them when n is 0)."""
    return torch.cat([(y == c).nonzero().squeeze(1)[:n or None] for c in range(num_classes)])
