"""Readers of image-file formats: ImageFolder trees and CelebA.

Both list their files when the dataset is built and decode an image only when an item is asked
for (:class:`~selfcam.data.base.FileImages`), so a large folder costs a list of paths in memory.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError, DataError
from ..safeio import open_regular, read_bytes
from .base import SPLITS, VAL_FRACTION, FileImages, fixed_order, image_problem, partition, take_first
from .transforms import Transform

__all__ = ["read_celeba", "read_imagefolder"]

_VAL_DIRS = ("val", "valid", "validation")
_MAX_LIST_BYTES = 1 << 30  # CelebA's attribute list is 26 MB
_ATTR_FILE, _PARTITION_FILE, _CELEBA_IMAGES = "list_attr_celeba.txt", "list_eval_partition.txt", "img_align_celeba"


# ---------------------------------------------------------------------------------------------- ImageFolder


def _classes(folder: Path) -> list[str]:
    """Sorted names of the visible sub-folders of ``folder`` (not links back to it): the classes."""
    names = sorted(e.name for e in os.scandir(folder)
                   if e.is_dir() and not e.name.startswith(".") and not _loops_back(e.path, folder))  # fmt: skip
    if not names:
        raise DataError(f"{folder}: no class folders (an ImageFolder tree holds one folder of images per class)")
    return names


def _scan(folder: Path, classes: Sequence[str]) -> tuple[list[str], np.ndarray, list[tuple[str, str]]]:
    """(image paths, class indices (N,) int64, skipped (path, reason)) under ``folder``'s class folders.

    Files count as images by their extension (any format Pillow registers); hidden files and
    folders (".name") are ignored; symbolic links to folders inside a class folder are not
    followed, and a link among the class folders that points back at ``folder`` is no class, so
    link loops cannot hang the scan; both are listed in skipped.
    """
    extensions = {e.lower() for e in Image.registered_extensions()}
    skipped = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if _loops_back(entry.path, folder):
            skipped.append((entry.path, "symbolic link loop, not followed"))
        elif not entry.is_dir():
            skipped.append((entry.path, "not inside a class folder"))
        elif entry.name not in classes:
            skipped.append((entry.path, "folder of a class the training folder does not have"))
    paths, labels = [], []
    for k, name in enumerate(classes):
        for top, dirs, files in os.walk(folder / name, followlinks=False):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            links = [os.path.join(top, d) for d in dirs if os.path.islink(os.path.join(top, d))]
            skipped += [(link, "symbolic link to a folder, not followed") for link in links]
            for f in sorted(f for f in files if not f.startswith(".")):
                path = os.path.join(top, f)
                if os.path.splitext(f)[1].lower() in extensions:
                    paths.append(path)
                    labels.append(k)
                else:
                    skipped.append((path, "not an image file"))
    return paths, np.asarray(labels, np.int64), skipped


def _unreadable(path: str) -> str | None:
    """Why Pillow cannot read ``path`` (see :func:`~selfcam.data.base.image_problem`), or None."""
    problem = image_problem(path)
    return None if problem is None else f"unreadable image: {problem}"


def _loops_back(path: str, folder: Path) -> bool:
    """Whether the symbolic link ``path`` points at ``folder`` or one of its parents (a link loop)."""
    if not os.path.islink(path):
        return False
    target, root = os.path.realpath(path), os.path.realpath(folder)
    return root == target or root.startswith(target.rstrip(os.sep) + os.sep)


def _warn_skipped(root: Path, skipped: Sequence[tuple[str, str]]) -> None:
    listed = "; ".join(f"{p} ({why})" for p, why in skipped[:5])
    more = f"; and {len(skipped) - 5} more" if len(skipped) > 5 else ""
    warnings.warn(f"{root}: skipped {len(skipped)} file(s): {listed}{more} (see dataset.skipped)", stacklevel=2)


def split_folder(root: Path, split: str) -> tuple[Path, list[str], tuple[float, ...], int]:
    """Where ``split`` of a folder-per-class tree is (ImageFolder's rule, videofolder's too): ``(folder to
    scan, classes, fractions, part)``, the split being part ``part`` of :func:`partition` of ``folder``'s
    items by ``fractions``. With ``root/train`` the split folders (val: 10 % of train/ without a val
    folder); otherwise 80 / 10 / 10 % of ``root``."""
    if not (root / "train").is_dir():
        return root, _classes(root), (0.8, 0.1, 0.1), SPLITS.index(split)
    classes = _classes(root / "train")
    val_dir = next((root / d for d in _VAL_DIRS if (root / d).is_dir()), None)
    if split == "test" and not (root / "test").is_dir():
        raise DataError(f"{root}: has a train/ folder but no test/ folder for the test split")
    folder = {"test": root / "test", "val": val_dir}.get(split) or root / "train"
    fractions = (1 - VAL_FRACTION, VAL_FRACTION) if split != "test" and val_dir is None else (1.0,)
    return folder, classes, fractions, int(split == "val" and val_dir is None)


def read_imagefolder(root: Path, split: str, n: int | None, transform: Transform, *, mode: str = "RGB") -> FileImages:
    """An ImageFolder tree (``root/CLASS/**/image``). With ``root/train`` (and ``root/test``,
    optionally ``root/val``) those folders are the splits, ``val`` carved from ``train`` when
    absent; otherwise a fixed stratified 80 / 10 / 10 % partition of all images. Files that are
    not readable images are skipped with a warning and listed in ``dataset.skipped``."""
    if mode not in ("RGB", "L"):
        raise ConfigError(f"mode must be 'RGB' or 'L', got {mode!r}")
    folder, classes, fractions, part = split_folder(root, split)
    paths, labels, skipped = _scan(folder, classes)
    if not paths:
        raise DataError(f"{folder}: no image files in its class folders")
    if folder in (root, root / "train"):  # the folder the classes come from: every class needs images
        empty = [name for k, name in enumerate(classes) if not (labels == k).any()]
        if empty:
            shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
            raise DataError(f"{folder}: {len(empty)} of its {len(classes)} class folders hold no image files ({shown}); "
                            f"the model would get {len(classes)} classes, {len(empty)} of them never seen: remove "
                            "the empty folders")  # fmt: skip
    order = partition(labels, fractions)[part]
    keep: list[int] = []
    for i in order:  # readability check of the split's files, in order, until n are readable
        if n is not None and len(keep) == n:
            break
        reason = _unreadable(paths[i])
        if reason:
            skipped.append((paths[i], reason))
        else:
            keep.append(int(i))
    if skipped:
        _warn_skipped(root, skipped)
    rows = take_first(np.asarray(keep, np.int64), n, f"the {split} split of {root} (readable images)")
    if not len(rows):
        raise DataError(f"{folder}: no readable images in the {split} split")
    data = FileImages([paths[i] for i in rows], torch.from_numpy(labels[rows]), transform, classes, mode=mode, source=str(root))
    data.skipped = tuple(skipped)
    return data


# ---------------------------------------------------------------------------------------------- CelebA


_BLANK = np.zeros(256, bool)
_BLANK[list(b" \t\r\v\f")] = True


def _digit_table(path: Path, skip: int, columns: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Rows ``KEY v1 .. v_columns`` of a text file after its first ``skip`` lines, each value one
    digit with an optional minus sign, blank lines ignored. The values are checked and decoded
    with NumPy over the bytes (CelebA's lists have 200k lines).

    Returns (keys (N), values (N, columns) int8, line number of each row (N,), 1-based);
    DataError names the first line that does not fit.
    """
    try:
        lines = read_bytes(path, _MAX_LIST_BYTES, DataError, "CelebA list").split(b"\n")[skip:]
    except FileNotFoundError:
        raise DataError(f"{path}: file not found (CelebA needs {_ATTR_FILE} and {_PARTITION_FILE})") from None
    rows = [(i, parts) for i, line in enumerate(lines, skip + 1) if (parts := line.split(None, 1))]
    numbers = np.array([i for i, _ in rows], np.int64)
    b = np.frombuffer(b"\n".join(p[1] if len(p) == 2 else b"" for _, p in rows) + b"\n", np.uint8)
    newline, minus, blank = b == 10, b == 45, _BLANK[b]
    digit = (b >= 48) & (b <= 57)
    after_blank = np.concatenate(([True], blank[:-1] | newline[:-1]))
    before_end = np.concatenate((blank[1:] | newline[1:], [True]))
    after_minus = np.concatenate(([False], minus[:-1]))
    ok = (digit & before_end & (after_blank | after_minus)) | (minus & after_blank & np.append(digit[1:], False))
    ok |= blank | newline
    line_start = np.concatenate(([0], np.flatnonzero(newline)[:-1] + 1))  # one per row
    bad = ~np.logical_and.reduceat(ok, line_start) | (np.add.reduceat(digit, line_start, dtype=np.int64) != columns)
    if len(rows) and bad.any():
        raise DataError(f"{path}, line {numbers[np.flatnonzero(bad)[0]]}: expected a file name and {columns} "
                        "single-digit values")  # fmt: skip
    values = (b[digit].astype(np.int8) - 48) * np.where(after_minus[digit], -1, 1).astype(np.int8)
    return [p[0].decode(errors="replace") for _, p in rows], values.reshape(len(rows), columns), numbers


def _header(path: Path) -> tuple[int, list[str]]:
    """(count, attribute names) from the first two lines of ``list_attr_celeba.txt``."""
    try:
        with open_regular(path, DataError) as f:
            head = [f.readline(1 << 20).decode(errors="replace") for _ in range(2)]
    except FileNotFoundError:
        raise DataError(f"{path}: file not found (CelebA needs {_ATTR_FILE} and {_PARTITION_FILE})") from None
    if not head[0].strip().isdigit() or not head[1].split():
        raise DataError(f"{path}, line 1: expected the number of images, then a line of attribute names")
    return int(head[0]), head[1].split()


def _celeba_attributes(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """(attribute names (A), image file names (N), values (N, A) bool) of ``list_attr_celeba.txt``:
    a count line, a line of names, then ``file v1 .. vA`` with values -1 (or 0) / 1."""
    count, names = _header(path)
    files, values, lines = _digit_table(path, 2, len(names))
    bad = ~np.isin(values, (-1, 0, 1)).all(1)
    if bad.any():
        raise DataError(f"{path}, line {lines[np.flatnonzero(bad)[0]]}: attribute values must be -1 or 1")
    if count != len(files):
        raise DataError(f"{path}: line 1 says {count} images but {len(files)} are listed")
    return names, files, values == 1


def _celeba_partition(path: Path) -> dict[str, int]:
    """``{file name: 0 train | 1 val | 2 test}`` of ``list_eval_partition.txt``."""
    files, values, lines = _digit_table(path, 0, 1)
    bad = (values[:, 0] < 0) | (values[:, 0] > 2)
    if bad.any():
        raise DataError(f"{path}, line {lines[np.flatnonzero(bad)[0]]}: expected 'FILE 0|1|2'")
    return dict(zip(files, values[:, 0].tolist()))


def read_celeba(root: Path, split: str, n: int | None, transform: Transform, *,
                attributes: Sequence[str] | None = None) -> FileImages:  # fmt: skip
    """CelebA: ``img_align_celeba/``, ``list_attr_celeba.txt`` and ``list_eval_partition.txt``.
    Multi-label: labels are float32 (A,) 0/1 vectors of the chosen ``attributes`` (default all)."""
    images = root / _CELEBA_IMAGES
    images = images / _CELEBA_IMAGES if (images / _CELEBA_IMAGES).is_dir() else images  # zip extracted twice
    if not images.is_dir():
        raise DataError(f"{images}: folder of CelebA images not found")
    attr_path, part_path = root / _ATTR_FILE, root / _PARTITION_FILE
    names, files, values = _celeba_attributes(attr_path)
    if attributes is not None:
        unknown = [a for a in attributes if a not in names]
        if unknown or not attributes:
            raise ConfigError(f"unknown or no CelebA attribute(s) {unknown}; {attr_path} has {', '.join(names)}")
        chosen = [names.index(a) for a in attributes]
        names, values = list(attributes), values[:, chosen]
    split_of = _celeba_partition(part_path)
    missing = next((f for f in files if f not in split_of), None)
    if missing is not None:
        raise DataError(f"{part_path}: no entry for {missing}, which {attr_path} lists")
    in_split = np.flatnonzero(np.array([split_of[f] for f in files]) == SPLITS.index(split))  # (k,) rows
    rows = take_first(in_split[fixed_order(len(in_split))], n, f"the {split} split of {root}")
    labels = torch.from_numpy(values[rows].astype(np.float32))
    return FileImages([images / files[i] for i in rows], labels, transform, names, task="multilabel", source=str(attr_path))
