"""Readers of the binary formats: idx (MNIST family), CIFAR-10/100 binary, STL-10 binary.

Each file is decoded once with ``numpy``: memory-mapped when raw, decompressed in one go when
gzipped; only the rows of the requested split are copied out. These formats have an official
train and test set but no validation set: ``val`` is a fixed stratified 10 % of the official
training set (:func:`~selfcam.data.base.partition`), ``train`` the other 90 %.
"""

from __future__ import annotations

import math
import os
import re
import zlib
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from ..safeio import MAX_DECOMPRESSED_BYTES, check_regular, gzip_reader, open_regular, read_bytes, read_gzip
from .base import VAL_FRACTION, ArrayImages, fixed_order, partition, take_first
from .transforms import Transform

__all__ = ["file_bytes", "idx_files", "read_cifar", "read_idx", "read_idx_file", "read_stl10"]

CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
STL10_NAMES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_NAME = re.compile(r"(?P<prefix>.*?)(?P<set>train|t10k|test)[-_.](?P<what>images|labels)[-_.]idx[13]-ubyte(?P<gz>\.gz)?")
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


@lru_cache(maxsize=2)
def _gunzip(path: Path, stamp: tuple[int, int], limit: int) -> np.ndarray:
    """Decompressed bytes of a .gz file (at most ``limit``: :func:`selfcam.safeio.read_gzip`), kept for
    the next call (train and val read the same files); ``stamp`` (mtime, size) makes a changed file a new entry."""
    return np.frombuffer(read_gzip(path, limit, DataError), np.uint8)


def file_bytes(path: Path, limit: int = MAX_DECOMPRESSED_BYTES) -> np.ndarray:
    """The bytes of ``path``, uint8 (k,) read-only: memory-mapped, or decompressed when the name ends in
    .gz (refused past ``limit`` bytes). Regular files only: a FIFO or a device is refused unopened."""
    try:
        if path.suffix == ".gz":
            st = check_regular(path, DataError)
            return _gunzip(path.resolve(), (st.st_mtime_ns, st.st_size), limit)
        with open_regular(path, DataError) as f:
            if os.fstat(f.fileno()).st_size == 0:
                return np.zeros(0, np.uint8)
            return np.memmap(f, np.uint8, mode="r")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read: {e}") from e


def _split_rows(labels: np.ndarray, split: str) -> np.ndarray:
    """Rows of an official set for ``split``: test -> all; train / val -> the 90 % / 10 % partition."""
    if split == "test":
        return fixed_order(len(labels))
    return partition(labels, (1 - VAL_FRACTION, VAL_FRACTION))[split == "val"]


def _names(path: Path, default: Sequence[str], count: int) -> list[str]:
    """Class names, one per non-empty line of ``path``; ``default`` when the file is absent."""
    if not path.exists():
        return list(default)
    text = read_bytes(path, 1 << 20, DataError, "class names file").decode(errors="replace")
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if len(names) != count:
        raise DataError(f"{path}: expected {count} class names, one per line, found {len(names)}")
    return names


def _check_labels(labels: np.ndarray, count: int, path: Path, low: int = 0) -> None:
    if len(labels) and (labels.min() < low or labels.max() >= low + count):
        raise DataError(f"{path}: labels must lie in {low}..{low + count - 1}, found {labels.min()}..{labels.max()}")


# ---------------------------------------------------------------------------------------------- idx


def _idx_header(head: bytes, path: Path) -> tuple[int, tuple[int, ...], np.dtype]:
    """(header length, dims, dtype) of the idx header at the start of ``head``; DataError for a wrong
    magic number, a dimension of 0 or a shape over the size limit."""
    if len(head) < 4 or head[0] or head[1] or head[2] not in _IDX_TYPES or head[3] == 0:
        raise DataError(f"{path}: not an idx file: magic number 0x{head[:4].hex()}, expected 0x0000, a type "
                        "byte 08..0E and the number of dimensions (0x00000803 images, 0x00000801 labels)")  # fmt: skip
    header = 4 + 4 * head[3]
    if len(head) < header:
        raise DataError(f"{path}: truncated or corrupt: {len(head)} bytes, shorter than its own header")
    dims = tuple(int(d) for d in np.frombuffer(head[4:header], ">u4"))
    dtype = np.dtype(_IDX_TYPES[head[2]])
    if 0 in dims:
        raise DataError(f"{path}: the header's shape {dims} has a dimension of 0 (no items, or items of no pixels)")
    need = math.prod(dims) * dtype.itemsize  # Python integers: a shape cannot overflow into a small size
    if need > MAX_DECOMPRESSED_BYTES:
        raise DataError(f"{path}: the header's shape {dims} of {dtype.name} needs {need:,} bytes, over selfcam's limit "
                        f"of {MAX_DECOMPRESSED_BYTES:,} (safeio.MAX_DECOMPRESSED_BYTES)")  # fmt: skip
    return header, dims, dtype


def read_idx_file(path: Path) -> np.ndarray:
    """One idx file -> its array (shape and dtype from the header); DataError naming ``path`` when
    the magic number is wrong, a dimension is 0 or the size does not match the header. A ``.gz``
    file is decompressed only as far as its header says (a longer stream is refused)."""
    if path.suffix == ".gz":
        try:
            with gzip_reader(path, DataError) as g:
                head = g.read(4)
                head += g.read(4 * head[3]) if len(head) == 4 else b""
        except FileNotFoundError:
            raise DataError(f"{path}: file not found") from None
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: cannot read: {e}") from e
        header, dims, dtype = _idx_header(head, path)
        limit = header + math.prod(dims) * dtype.itemsize
        try:
            buf = file_bytes(path, limit)
        except DataError as e:
            if "decompresses to more than" not in str(e):
                raise
            raise DataError(f"{path}: decompresses to more than the {limit:,} bytes its header's shape {dims} needs; "
                            "refused") from None  # fmt: skip
    else:
        buf = file_bytes(path)
        header, dims, dtype = _idx_header(buf[: 4 + 4 * 255].tobytes(), path)
    expected = header + math.prod(dims) * dtype.itemsize
    if len(buf) != expected:
        raise DataError(f"{path}: truncated or corrupt: {len(buf)} bytes, the header's shape {dims} of "
                        f"{dtype.name} needs {expected}")  # fmt: skip
    return buf[header:].view(dtype).reshape(dims)


def idx_files(root: Path) -> dict[tuple[str, str], Path]:
    """``{(set, kind): path}`` with set "train"/"test" and kind "images"/"labels" for the idx files
    in directory ``root``, or in ``root.parent`` whose names start with ``root.name``. Uncompressed
    files win over ``.gz`` twins; MNIST's ``t10k`` is the test set."""
    folder, want = (root, None) if root.is_dir() else (root.parent, root.name)
    found: dict[str, dict[tuple[str, str], Path]] = {}
    for path in sorted(folder.iterdir()) if folder.is_dir() else ():
        m = _IDX_NAME.fullmatch(path.name)
        prefix = m["prefix"].rstrip("-_.") if m else None
        if m is None or (want is not None and prefix != want):
            continue
        files = found.setdefault(prefix, {})
        key = ("train" if m["set"] == "train" else "test", m["what"])
        if key not in files or files[key].suffix == ".gz":
            files[key] = path
    if not found and not root.exists():
        raise DataError(f"{root} does not exist, and no idx files in {folder} have names starting with {want!r}")
    if not found:
        raise DataError(f"{root}: no idx files found (expected train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                        "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, optionally .gz)")  # fmt: skip
    if len(found) > 1:
        raise DataError(f"{root}: idx files of several datasets ({', '.join(sorted(found))}); "
                        f"choose one as idx:{folder / sorted(found)[0]}")  # fmt: skip
    return next(iter(found.values()))


def _idx_array(files: dict[tuple[str, str], Path], part: str, what: str, root: Path) -> np.ndarray:
    """Images (N, H, W) uint8 or labels (N,) int64 of one official set ("train" / "test")."""
    rank = 3 if what == "images" else 1
    if (part, what) not in files:
        raise DataError(f"{root}: no {part} {what} file ({'t10k' if part == 'test' else 'train'}-{what}-idx{rank}-ubyte)")
    a = read_idx_file(files[part, what])
    if a.ndim != rank or a.dtype.kind != "u" or (rank == 3 and a.dtype.itemsize != 1):
        raise DataError(f"{files[part, what]}: expected {what} as {rank}-d unsigned integers "
                        f"(magic 0x0000080{rank}), got {a.ndim}-d {a.dtype.name}")  # fmt: skip
    return a if rank == 3 else a.astype(np.int64)


def read_idx(root: Path, split: str, n: int | None, transform: Transform, *,
             names: Sequence[str] | None = None) -> ArrayImages:  # fmt: skip
    """MNIST-style idx files in ``root`` (see :func:`idx_files`); ``names`` default to the digits
    0..K-1 with K = 1 + the largest training label."""
    files, part = idx_files(root), "test" if split == "test" else "train"
    images, labels = _idx_array(files, part, "images", root), _idx_array(files, part, "labels", root)
    if len(images) != len(labels):
        raise DataError(f"{files[part, 'images']} has {len(images)} images but {files[part, 'labels']} has {len(labels)} labels")
    if names is None:
        top = (labels if part == "train" else _idx_array(files, "train", "labels", root)).max(initial=0)
        names = [str(k) for k in range(int(top) + 1)]
    _check_labels(labels, len(names), files[part, "labels"])
    rows = take_first(_split_rows(labels, split), n, f"the {split} split of {root}")
    return ArrayImages(images[rows][:, None], torch.from_numpy(labels[rows]), transform, names, source=str(root))


# ---------------------------------------------------------------------------------------------- CIFAR


def _cifar_layout(hundred: bool) -> tuple[str, list[str], str, str, int]:
    """(folder, training files, test file, names file, label bytes per record)."""
    if hundred:
        return "cifar-100-binary", ["train.bin"], "test.bin", "fine_label_names.txt", 2
    return "cifar-10-batches-bin", [f"data_batch_{i}.bin" for i in range(1, 6)], "test_batch.bin", "batches.meta.txt", 1


def _cifar_folder(root: Path, hundred: bool) -> Path:
    """The folder holding the binary files: ``root`` itself or its standard sub-folder. Refuses the
    python (pickle) version, which selfcam never unpickles."""
    sub, train, _, _, _ = _cifar_layout(hundred)
    folder = root / sub if (root / sub).is_dir() else root
    if (folder / train[0]).is_file():
        return folder
    name = "CIFAR-100" if hundred else "CIFAR-10"
    pickled = ["cifar-100-python", "train", "test", "meta"] if hundred else ["cifar-10-batches-py", "data_batch_1", "test_batch", "batches.meta"]
    if (root / pickled[0]).is_dir() or any((folder / p).is_file() for p in pickled[1:]):
        raise DataError(f"{root}: this is the {name} python version, made of pickle files, and selfcam never "
                        f"unpickles files; download the {name} binary version ({name.lower()}-binary.tar.gz) "
                        f"from {_CIFAR_URL} and point {name.lower().replace('-', '')}: at its {sub} folder")  # fmt: skip
    raise DataError(f"{root}: no {name} binary files (expected {sub}/{train[0]} ... from the {name} binary version)")


def _records(path: Path, size: int) -> np.ndarray:
    """(N, size) uint8 records of a fixed-size binary file."""
    buf = file_bytes(path)
    if len(buf) == 0 or len(buf) % size:
        raise DataError(f"{path}: truncated or corrupt: {len(buf)} bytes is not a multiple of {size}")
    return buf.reshape(-1, size)


def _take(parts: Sequence[np.ndarray], rows: np.ndarray) -> np.ndarray:
    """Rows ``rows`` of the concatenation of ``parts``, without concatenating them."""
    starts = np.cumsum([0] + [len(p) for p in parts])
    which = np.searchsorted(starts, rows, side="right") - 1
    out = np.empty((len(rows), *parts[0].shape[1:]), parts[0].dtype)
    for k, part in enumerate(parts):
        sel = np.flatnonzero(which == k)
        out[sel] = part[rows[sel] - starts[k]]
    return out


def read_cifar(root: Path, split: str, n: int | None, transform: Transform, *, hundred: bool = False) -> ArrayImages:
    """CIFAR-10 or CIFAR-100 (fine labels), binary version; records of label byte(s) + 3072 pixels
    (1024 red, 1024 green, 1024 blue, rows of 32)."""
    folder = _cifar_folder(root, hundred)
    _, train, test, names_file, label_bytes = _cifar_layout(hundred)
    classes, record = (100 if hundred else 10), label_bytes + 3072
    paths = [folder / f for f in (train if split != "test" else [test])]
    parts = [_records(p, record) for p in paths]
    for p, part in zip(paths, parts):
        _check_labels(part[:, label_bytes - 1], classes, p)
    labels = np.concatenate([part[:, label_bytes - 1] for part in parts]).astype(np.int64)
    rows = take_first(_split_rows(labels, split), n, f"the {split} split of {root}")
    images = _take([part[:, label_bytes:] for part in parts], rows).reshape(-1, 3, 32, 32)
    names = _names(folder / names_file, [str(k) for k in range(100)] if hundred else CIFAR10_NAMES, classes)
    return ArrayImages(images, torch.from_numpy(labels[rows]), transform, names, source=str(folder))


# ---------------------------------------------------------------------------------------------- STL-10


def read_stl10(root: Path, split: str, n: int | None, transform: Transform) -> ArrayImages:
    """STL-10 binary: ``{train,test}_X.bin`` (3x96x96 uint8 per image, column-major) and
    ``{train,test}_y.bin`` (one byte per image, 1..10); ``root`` or its ``stl10_binary`` folder."""
    folder = root / "stl10_binary" if (root / "stl10_binary").is_dir() else root
    part = "test" if split == "test" else "train"
    x_path, y_path = folder / f"{part}_X.bin", folder / f"{part}_y.bin"
    pixels = _records(x_path, 3 * 96 * 96)
    labels = file_bytes(y_path).astype(np.int64)
    if len(labels) != len(pixels):
        raise DataError(f"{x_path} has {len(pixels)} images but {y_path} has {len(labels)} labels")
    _check_labels(labels, 10, y_path, low=1)
    rows = take_first(_split_rows(labels, split), n, f"the {split} split of {folder}")
    images = pixels[rows].reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2)  # stored as (C, W, H)
    names = _names(folder / "class_names.txt", STL10_NAMES, 10)
    return ArrayImages(images, torch.from_numpy(labels[rows] - 1), transform, names, source=str(folder))
