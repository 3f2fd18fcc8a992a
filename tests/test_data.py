"""Data sources, validation split, prepared files and batching: on synthetic files and the real datasets."""
from __future__ import annotations

import gzip
import hashlib
import struct
import tarfile
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from PIL import Image

from energyat.errors import UserError
from energyat.params import DataCfg, Params
from energyat.science import data
from energyat.stages import prepare

ROOT = Path(__file__).resolve().parents[1]
CIFAR_JPEG = ROOT.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"
needs_fashion = pytest.mark.skipif(data._fashion_mnist_files(data.DEBIAN_FASHION_MNIST) is None,
                                   reason=f"Fashion-MNIST IDX files not in {data.DEBIAN_FASHION_MNIST} "
                                          f"(Debian package dataset-fashion-mnist)")
needs_cifar_jpeg = pytest.mark.skipif(not CIFAR_JPEG.is_file(), reason=f"{CIFAR_JPEG} not present")


def idx_bytes(array: np.ndarray, code: int) -> bytes:
    big = array.astype(array.dtype.newbyteorder(">"))
    return bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + big.tobytes()


# ------------------------------------------------------------------------------------------------ IDX

@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip(tmp_path, compress):
    images = np.random.default_rng(0).integers(0, 256, (5, 3, 4), dtype=np.uint8)
    ints = np.array([-7, 0, 123456, 2**31 - 1], dtype=np.int32)
    for name, array, code in [("img", images, 0x08), ("ints", ints, 0x0C)]:
        blob = idx_bytes(array, code)
        path = tmp_path / name
        path.write_bytes(gzip.compress(blob) if compress else blob)
        out = data.read_idx(path)
        assert out.dtype == array.dtype and out.shape == array.shape
        np.testing.assert_array_equal(out, array)


def test_idx_corrupt_files_name_the_path(tmp_path):
    blob = idx_bytes(np.zeros((4, 2, 2), np.uint8), 0x08)
    cases = {
        "truncated": (blob[:-1], "truncated or corrupt IDX"),
        "too-long": (blob + b"\0", "truncated or corrupt IDX"),
        "short-header": (blob[:9], "truncated IDX"),
        "bad-magic": (b"\1\0" + blob[2:], "not an IDX file"),
        "bad-dtype": (blob[:2] + b"\x07" + blob[3:], "not an IDX file"),
        "truncated-gz": (gzip.compress(blob)[:-10], "corrupt gzip"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(UserError, match=message) as err:
            data.read_idx(tmp_path / name)
        assert str(tmp_path / name) in str(err.value) and "\n" not in str(err.value)


def test_fashion_mnist_rejects_files_that_are_not_the_official_ones(tmp_path):
    for name in data.FASHION_MNIST_MD5:
        shape = (3, 28, 28) if "images" in name else (3,)
        (tmp_path / f"{name}.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(shape, np.uint8), 0x08)))
    with pytest.raises(UserError, match="not the official Fashion-MNIST train-images"):
        data.fashion_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(UserError, match="IDX files not found"):
        data.fashion_mnist(tmp_path)


# ------------------------------------------------------------------------------------------------ real Fashion-MNIST

@pytest.fixture(scope="module")
def fashion():
    return data.fashion_mnist(data.DEBIAN_FASHION_MNIST)


@needs_fashion
def test_real_fashion_mnist(fashion):
    assert fashion.train.x.shape == (60000, 1, 28, 28) and fashion.test.x.shape == (10000, 1, 28, 28)
    assert fashion.train.x.dtype == torch.uint8 and fashion.train.y.dtype == torch.int64
    assert torch.bincount(fashion.train.y).tolist() == [6000] * 10
    assert torch.bincount(fashion.test.y).tolist() == [1000] * 10
    assert len(fashion.classes) == 10 and fashion.classes[9] == "Ankle boot"
    assert sorted(fashion.checksums) == sorted(f"{n}.gz" for n in data.FASHION_MNIST_MD5)
    path = data.DEBIAN_FASHION_MNIST / "t10k-labels-idx1-ubyte.gz"
    assert fashion.checksums[path.name] == hashlib.sha256(path.read_bytes()).hexdigest()
    # the well-known statistics of Fashion-MNIST's 60k training images
    mean, std = data.channel_stats(fashion.train.x)
    assert mean[0] == pytest.approx(0.2860, abs=1e-4) and std[0] == pytest.approx(0.3530, abs=1e-4)


@needs_fashion
def test_prepare_stage_on_fashion_mnist(tmp_path, fashion):
    out = tmp_path / "prepared"
    prepare.run(Params(threads=1, seed=3, data=DataCfg(val_size=5000)), out=out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]  # no temporary folder left
    splits, meta = data.load_prepared(out)
    assert meta["counts"] == {"train": 55000, "val": 5000, "test": 10000}
    assert (meta["channels"], meta["size"], meta["num_classes"]) == (1, 28, 10)
    assert len(meta["source_checksums"]) == 4 and meta["source"].startswith(str(data.DEBIAN_FASHION_MNIST))
    # the test split in one fixed order, the same for every seed: any prefix is a class-mixed random sample
    order = torch.randperm(10000, generator=torch.Generator().manual_seed(data.TEST_ORDER_SEED))
    assert torch.equal(splits["test"].x, fashion.test.x[order]) and torch.equal(splits["test"].y, fashion.test.y[order])
    assert torch.equal(data.prepare(DataCfg(), seed=5)[0]["test"].y, splits["test"].y)
    assert torch.bincount(splits["test"].y[:500], minlength=10).min() >= 30
    # train + val is a re-ordering of the original training set: per-class counts and pixel sums add up
    both_y = torch.cat([splits["train"].y, splits["val"].y])
    assert torch.bincount(both_y).tolist() == [6000] * 10
    pixel_sum = splits["train"].x.sum(dtype=torch.int64) + splits["val"].x.sum(dtype=torch.int64)
    assert pixel_sum == fashion.train.x.sum(dtype=torch.int64)
    # the split is the seeded permutation, the kept train images in its (shuffled) order
    perm = torch.randperm(60000, generator=torch.Generator().manual_seed(3))
    assert torch.equal(splits["val"].y, fashion.train.y[perm[:5000]])
    assert torch.equal(splits["train"].x[:100], fashion.train.x[perm[5000:5100]])
    assert meta["mean"] == list(data.channel_stats(splits["train"].x)[0])


# ------------------------------------------------------------------------------------------------ validation split

def test_split_validation_sizes_disjoint_deterministic():
    ids = torch.arange(100)
    train = data.Split(ids.to(torch.uint8).view(100, 1, 1, 1), ids)
    kept, val = data.split_validation(train, 30, seed=0)
    assert (len(kept), len(val)) == (70, 30)
    assert set(kept.y.tolist()).isdisjoint(val.y.tolist())
    assert sorted(kept.y.tolist() + val.y.tolist()) == list(range(100))
    assert torch.equal(kept.x.view(-1).long(), kept.y)  # images travel with their labels
    assert kept.y[:10].tolist() != list(range(30, 40))  # kept images are shuffled, not in source order
    again, _ = data.split_validation(train, 30, seed=0)
    other, _ = data.split_validation(train, 30, seed=1)
    assert torch.equal(again.y, kept.y) and not torch.equal(other.y, kept.y)
    with pytest.raises(UserError, match="data.val_size: 100 is not allowed; must be < 100"):
        data.split_validation(train, 100, seed=0)


# ------------------------------------------------------------------------------------------------ image folders

def write_tree(root: Path) -> dict[str, np.ndarray]:
    """train/{cat,dog}/ and test/{cat,dog}/ PNGs (one greyscale); returns path -> pixels (H x W x 3)."""
    rng = np.random.default_rng(0)
    written = {}
    for split, n in [("train", 3), ("test", 2)]:
        for cls in ["dog", "cat"]:
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                rel = f"{split}/{cls}/{i}.png"
                if rel == "train/dog/1.png":
                    grey = rng.integers(0, 256, (8, 8), dtype=np.uint8)
                    Image.fromarray(grey, "L").save(root / rel)
                    written[rel] = np.repeat(grey[:, :, None], 3, axis=2)
                else:
                    written[rel] = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                    Image.fromarray(written[rel], "RGB").save(root / rel)
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    return written


def check_tree(source: data.Source, written: dict[str, np.ndarray]) -> None:
    assert source.classes == ("cat", "dog")
    assert source.train.x.shape == (6, 3, 8, 8) and source.test.x.shape == (4, 3, 8, 8)
    assert source.train.y.tolist() == [0, 0, 0, 1, 1, 1] and source.test.y.tolist() == [0, 0, 1, 1]
    expected = np.stack([written[f"train/{c}/{i}.png"] for c in ("cat", "dog") for i in range(3)])
    np.testing.assert_array_equal(source.train.x.permute(0, 2, 3, 1).numpy(), expected)  # PNG: lossless


def test_image_folder_directory_and_tarball(tmp_path):
    written = write_tree(tmp_path / "tree" / "mydata")
    from_dir = data.image_folder(tmp_path / "tree" / "mydata")
    check_tree(from_dir, written)
    tarball = tmp_path / "mydata.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(tmp_path / "tree" / "mydata", arcname="mydata")  # a top folder, as in cifar10-jpeg.tar.gz
    from_tar = data.image_folder(tarball)
    check_tree(from_tar, written)
    assert from_tar.checksums == {"mydata.tar.gz": hashlib.sha256(tarball.read_bytes()).hexdigest()}
    assert data.image_folder(tmp_path / "tree").checksums != {}  # the tree one level up works too
    resized = data.image_folder(tarball, image_size=4)
    assert resized.train.x.shape == (6, 3, 4, 4) and resized.test.x.shape == (4, 3, 4, 4)


def test_image_folder_errors(tmp_path):
    write_tree(tmp_path / "d")
    Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(tmp_path / "d" / "test" / "cat" / "odd.png")
    with pytest.raises(UserError, match=r"one square size, found 6x6 .*set data.image_size"):
        data.image_folder(tmp_path / "d")
    assert data.image_folder(tmp_path / "d", image_size=8).test.x.shape == (5, 3, 8, 8)
    (tmp_path / "d" / "test" / "cat" / "bad.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(UserError, match="bad.png: cannot decode image"):
        data.image_folder(tmp_path / "d", image_size=8)
    (tmp_path / "e" / "train" / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "e" / "train" / "a" / "0.png")
    with pytest.raises(UserError, match="no test/<class>/<image> files"):
        data.image_folder(tmp_path / "e")
    (tmp_path / "broken.tar.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(UserError, match="broken.tar.gz: unreadable or corrupt archive"):
        data.image_folder(tmp_path / "broken.tar.gz")
    with pytest.raises(UserError, match="'auto' is not allowed for image-folder"):
        data.load_source(DataCfg(dataset="image-folder"))
    with pytest.raises(UserError, match="nowhere: not found"):
        data.load_source(DataCfg(dataset="image-folder", source=str(tmp_path / "nowhere")))


def test_prepare_stage_is_deterministic_and_load_checks_files(tmp_path):
    write_tree(tmp_path / "src")
    cfg = DataCfg(dataset="image-folder", source=str(tmp_path / "src"), val_size=2)
    prepare.run(Params(threads=1, data=cfg), out=tmp_path / "a")
    prepare.run(Params(threads=1, data=cfg), out=tmp_path / "b")
    prepare.run(Params(threads=1, data=cfg), out=tmp_path / "b")  # replaces an existing output
    splits, meta = data.load_prepared(tmp_path / "a")
    assert meta["files"] == data.load_prepared(tmp_path / "b")[1]["files"]
    assert meta["counts"] == {"train": 4, "val": 2, "test": 4} and meta["classes"] == ["cat", "dog"]
    assert splits["train"].x.dtype == torch.uint8 and splits["val"].y.dtype == torch.int64
    x = torch.cat([splits["train"].x, splits["val"].x]).double() / 255
    assert meta["mean"] == pytest.approx(x[:4].mean(dim=(0, 2, 3)).tolist(), abs=1e-6)
    assert meta["std"] == pytest.approx(x[:4].std(dim=(0, 2, 3), unbiased=False).tolist(), abs=1e-6)

    val = tmp_path / "a" / "val.pt"
    blob = bytearray(val.read_bytes())
    blob[-30] ^= 0xFF
    val.write_bytes(bytes(blob))
    with pytest.raises(UserError, match=r"val.pt: sha256 .* does not match meta.json"):
        data.load_prepared(tmp_path / "a")
    (tmp_path / "b" / "test.pt").unlink()
    with pytest.raises(UserError, match="test.pt: file not found"):
        data.load_prepared(tmp_path / "b")
    with pytest.raises(UserError, match="meta.json: file not found"):
        data.load_prepared(tmp_path / "missing")


@needs_cifar_jpeg
def test_real_cifar10_jpeg_tarball():
    source = data.image_folder(CIFAR_JPEG)
    assert source.train.x.shape == (50000, 3, 32, 32) and source.test.x.shape == (10000, 3, 32, 32)
    assert source.classes[:3] == ("airplane", "automobile", "bird") and len(source.classes) == 10
    assert torch.bincount(source.train.y).tolist() == [5000] * 10
    assert torch.bincount(source.test.y).tolist() == [1000] * 10
    # JPEG-decoded CIFAR-10 keeps the real set's statistics (0.4914, 0.4822, 0.4465) within JPEG noise
    mean, _ = data.channel_stats(source.train.x)
    assert mean == pytest.approx([0.4914, 0.4822, 0.4465], abs=2e-3)


# ------------------------------------------------------------------------------------------------ torchvision sources

def test_torchvision_download_failure_is_one_line(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar

    def offline(*args, **kwargs):
        raise URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(cifar, "download_and_extract_archive", offline)
    with pytest.raises(UserError) as err:
        data.load_source(DataCfg(dataset="cifar10", download_root=str(tmp_path / "dl")))
    assert str(err.value) == (f"could not download cifar10 into {tmp_path / 'dl'}: <urlopen error [Errno -2] Name or "
                              f"service not known>; put the files there or use source: <path>")
    with pytest.raises(UserError, match="no usable cifar100 in torchvision's layout"):
        data.load_source(DataCfg(dataset="cifar100", source=str(tmp_path)))


def test_torchvision_source_from_a_local_root(tmp_path):
    """A CIFAR-10 root in torchvision's layout, with batch files written here (MD5s patched to match)."""
    import pickle

    import torchvision.datasets as tvd

    folder = tmp_path / tvd.CIFAR10.base_folder
    folder.mkdir()
    rng = np.random.default_rng(0)
    lists = {}
    for attr, names in [("train_list", [n for n, _ in tvd.CIFAR10.train_list]),
                        ("test_list", [n for n, _ in tvd.CIFAR10.test_list])]:
        lists[attr] = []
        for k, name in enumerate(names):
            batch = {"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), "labels": [k % 10, (k + 1) % 10]}
            (folder / name).write_bytes(pickle.dumps(batch))
            lists[attr].append([name, hashlib.md5((folder / name).read_bytes()).hexdigest()])
    meta = pickle.dumps({"label_names": [f"c{i}" for i in range(10)]})
    (folder / "batches.meta").write_bytes(meta)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tvd.CIFAR10, "train_list", lists["train_list"])
        mp.setattr(tvd.CIFAR10, "test_list", lists["test_list"])
        mp.setitem(tvd.CIFAR10.meta, "md5", hashlib.md5(meta).hexdigest())
        source = data.load_source(DataCfg(dataset="cifar10", source=str(tmp_path)))
    first = pickle.loads((folder / "data_batch_1").read_bytes())
    assert source.train.x.shape == (10, 3, 32, 32) and source.test.x.shape == (2, 3, 32, 32)
    assert torch.equal(source.train.x[0].reshape(-1), torch.from_numpy(first["data"][0]))
    assert source.train.y[:2].tolist() == [0, 1] and source.classes[:2] == ("c0", "c1")
    assert len(source.checksums) == 6


# ------------------------------------------------------------------------------------------------ consumers

def test_batches_and_to_float():
    x = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1) * 25
    y = torch.arange(10)
    sizes = [len(b) for b, _ in data.batches(x, y, 4)]
    assert sizes == [4, 4, 2]  # last partial batch kept
    assert torch.equal(torch.cat([b for _, b in data.batches(x, y, 4)]), y)
    shuffled = [yb for _, yb in data.batches(x, y, 3, shuffle=True, generator=torch.Generator().manual_seed(0))]
    again = [yb for _, yb in data.batches(x, y, 3, shuffle=True, generator=torch.Generator().manual_seed(0))]
    order = torch.cat(shuffled)
    assert sorted(order.tolist()) == list(range(10)) and order.tolist() != list(range(10))
    assert all(torch.equal(a, b) for a, b in zip(shuffled, again))
    for xb, yb in data.batches(x, y, 3, shuffle=True, generator=torch.Generator().manual_seed(1)):
        assert torch.equal(xb.view(-1).long(), yb * 25)  # images stay with their labels
    f = data.to_float(x, "cpu")
    assert f.dtype == torch.float32 and f.max().item() == pytest.approx(225 / 255) and x.dtype == torch.uint8
    assert data.to_float(torch.tensor([255], dtype=torch.uint8)).item() == 1.0


# ------------------------------------------------------------------------------------------------ augmentation

def test_augmentation_draws_are_uniform_shifts_and_fair_flips_and_deterministic():
    from energyat.science.data import draw_augmentation

    n = 90_000
    aug = draw_augmentation(n, "crop-flip", torch.Generator().manual_seed(0), "cpu")
    for shifts in (aug.dy, aug.dx):
        counts = torch.bincount(shifts + 4, minlength=9)
        assert shifts.min() == -4 and shifts.max() == 4 and len(counts) == 9
        # each of the 9 offsets in [-4, 4] ~ n/9 = 10,000 (binomial sd ~94: 5 sd)
        assert (counts - n / 9).abs().max() < 500
    assert aug.flip.float().mean().item() == pytest.approx(0.5, abs=0.01)
    again = draw_augmentation(n, "crop-flip", torch.Generator().manual_seed(0), "cpu")
    assert torch.equal(aug.dx, again.dx) and torch.equal(aug.flip, again.flip)
    crop = draw_augmentation(1000, "crop", torch.Generator().manual_seed(0), "cpu")
    assert not crop.flip.any()  # SVHN: digits are never mirrored
    assert draw_augmentation(10, "none", torch.Generator(), "cpu") is None


def test_augment_is_a_padded_crop_then_a_flip():
    from energyat.science.data import Augmentation, augment

    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.uint8).view(2, 3, 6, 6)
    aug = Augmentation(torch.tensor([-2, 1]), torch.tensor([3, 0]), torch.tensor([False, True]))
    out = augment(x, aug, pad=4)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    torch.testing.assert_close(out[0], padded[0, :, 2:8, 7:13])  # rows shifted by -2, columns by +3, zeros padded
    torch.testing.assert_close(out[1], padded[1, :, 5:11, 4:10].flip(-1))
    assert out.dtype == torch.uint8 and (out[0, :, :2] == 0).all()  # the two rows above the image are padding


def test_augmentation_param_resolves_per_dataset():
    from energyat.params import DataCfg

    assert [DataCfg(dataset=d).augmentation() for d in ("cifar10", "cifar100", "svhn", "fashion-mnist", "image-folder")] \
        == ["crop-flip", "crop-flip", "crop", "none", "none"]
    assert DataCfg(dataset="image-folder", augment="crop-flip").augmentation() == "crop-flip"
    assert DataCfg(dataset="cifar10", augment="none").augmentation() == "none"
