"""What every on-disk dataset shares: the item protocol, two storages, the fixed splits.

:class:`ImageDataset` yields ``(normalized image (C, S, S) float32, label)``: an int64 scalar, or
for ``task == "multilabel"`` a float32 ``(A,)`` vector of 0/1. It has ``num_classes``,
``in_chans``, ``class_names``, ``task``, ``mean``, ``std``, ``size``, ``labels`` and ``raw(i)``
(the unnormalized, unaugmented [0, 1] image, for reports). Its two storages:
:class:`ArrayImages` (decoded uint8 pixels in memory: CIFAR, STL-10, idx) and
:class:`FileImages` (one image file per item, decoded when asked for: ImageFolder, CelebA).

Splits are fixed: they depend on the files only, never on the user's seed.
:func:`partition` cuts each class by a permutation drawn from a constant seed, so every method
and every seed sees the same validation and test items; :func:`take_first` keeps the first ``n``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import DataError, SelfcamError
from ..safeio import MAX_CLASSES, image_pixels, load_image, open_image
from .transforms import Transform

__all__ = ["SPLITS", "VAL_FRACTION", "ArrayImages", "FileImages", "ImageDataset", "fixed_order", "image_pixels",
           "image_problem", "partition", "take_first"]

SPLITS: tuple[str, ...] = ("train", "val", "test")
VAL_FRACTION = 0.1  # share of the official training set held out as "val" where a format has no val split
_SPLIT_SEED = 20_240_605  # constant on purpose: splits must not follow the user's seed


def fixed_order(n: int) -> np.ndarray:
    """A permutation of ``range(n)`` drawn from a constant seed."""
    return np.random.default_rng(_SPLIT_SEED).permutation(n)


def partition(labels: np.ndarray, fractions: Sequence[float]) -> list[np.ndarray]:
    """Stratified fixed split of items with class ``labels`` (N,) into ``len(fractions)`` parts.

    Each class's items, in the order of one permutation drawn from a constant seed, are cut at the
    rounded cumulative ``fractions`` (the last part takes the rest). Each part lists item indices
    in that permuted order, so classes are mixed and any prefix is a fair subset.
    """
    order = fixed_order(len(labels))
    lab = np.asarray(labels)[order]
    classes, inverse, counts = np.unique(lab, return_inverse=True, return_counts=True)
    by_class = np.argsort(inverse, kind="stable")  # positions grouped by class, permuted order inside
    rank = np.empty(len(lab), np.int64)
    rank[by_class] = np.arange(len(lab)) - np.repeat(np.cumsum(counts) - counts, counts)
    cuts = np.rint(np.cumsum(fractions)[:-1][None, :] * counts[:, None])  # (classes, parts - 1)
    part = (rank[:, None] >= cuts[inverse]).sum(1)
    return [order[part == k] for k in range(len(fractions))]


def take_first(index: np.ndarray, n: int | None, what: str) -> np.ndarray:
    """The first ``n`` entries of ``index`` (all when None); DataError when there are fewer."""
    if n is None:
        return index
    if n > len(index):
        raise DataError(f"asked for {n} images but {what} has only {len(index)}")
    return index[:n]


def image_problem(path: str | Path) -> str | None:
    """``None`` when Pillow reads ``path`` as an image, else why not. Checks the header and, where
    the format allows it without decoding (PNG: every chunk and its checksum), the rest of the file;
    special files (FIFOs, devices) are refused unopened and images over the pixel budget
    (:data:`selfcam.safeio.MAX_IMAGE_BYTES`) by their header (:func:`selfcam.safeio.open_image`)."""
    try:
        with open_image(path) as im:
            im.verify()
    except SelfcamError as e:
        return str(e).removeprefix(f"{path}: ")
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, struct.error... for a broken file
        return str(e) or type(e).__name__
    return None


class ImageDataset(Dataset):
    """Base of the on-disk datasets; subclasses say how to :meth:`load` item ``i``."""

    skipped: tuple[tuple[str, str], ...] = ()  # (path, reason) of files found but not used

    def __init__(self, labels: Tensor, transform: Transform, class_names: Sequence[str], *, in_chans: int,
                 task: str = "multiclass", source: str = "") -> None:  # fmt: skip
        if task == "multiclass" and len(class_names) < 2:
            raise DataError(f"{source or type(self).__name__}: only {len(class_names)} class ({', '.join(map(repr, class_names))}); "
                            "a classifier needs at least two classes")  # fmt: skip
        if len(class_names) > MAX_CLASSES:
            raise DataError(f"{source or type(self).__name__}: {len(class_names):,} classes, over selfcam's limit of "
                            f"{MAX_CLASSES:,} (safeio.MAX_CLASSES)")  # fmt: skip
        self.labels = labels  # (n,) int64, or (n, A) float32 for multilabel
        self.transform = transform.for_channels(in_chans)
        self.class_names: list[str] = list(class_names)
        self.num_classes = len(self.class_names)
        self.in_chans = in_chans
        self.task = task
        self.source = source  # what was read, for messages and reports

    @property
    def mean(self) -> tuple[float, ...]:
        return self.transform.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.transform.std

    @property
    def size(self) -> int:
        return self.transform.size

    def load(self, i: int) -> Tensor:
        """Item ``i`` as decoded, uint8 (C, h, w)."""
        raise NotImplementedError

    def raw(self, i: int) -> Tensor:
        """Item ``i`` in [0, 1], float32 (C, S, S), cropped and resized but neither augmented nor normalized."""
        return self.transform.prepare(self.load(i))

    def denormalize(self, x: Tensor) -> Tensor:
        """Normalized (..., C, H, W) -> [0, 1]."""
        return self.transform.denormalize(x)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        """(normalized image (C, S, S) float32, label)."""
        return self.transform(self.load(i)), self.labels[i]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r}, n={len(self)}, classes={self.num_classes}, size={self.size})"


class ArrayImages(ImageDataset):
    """Items held decoded in memory: ``images`` uint8 (n, C, H, W)."""

    def __init__(self, images: np.ndarray, labels: Tensor, transform: Transform, class_names: Sequence[str],
                 **kw: str) -> None:  # fmt: skip
        super().__init__(labels, transform, class_names, in_chans=images.shape[1], **kw)
        self.images = np.ascontiguousarray(images)

    def load(self, i: int) -> Tensor:
        return torch.from_numpy(self.images[i])


class FileImages(ImageDataset):
    """Items stored one per image file, opened with Pillow in ``mode`` ("RGB" or "L") when asked for."""

    def __init__(self, paths: Sequence[str | Path], labels: Tensor, transform: Transform, class_names: Sequence[str],
                 *, mode: str = "RGB", **kw: str) -> None:  # fmt: skip
        super().__init__(labels, transform, class_names, in_chans=len(mode), **kw)
        self.paths = [str(p) for p in paths]
        self.mode = mode

    def load(self, i: int) -> Tensor:
        path = self.paths[i]
        try:
            pixels = load_image(path, self.mode, self.size, DataError)  # the loader of `selfcam explain` too
        except SelfcamError:
            raise
        except FileNotFoundError:
            raise DataError(f"{path}: image file is missing (listed in {self.source})") from None
        except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError... for a broken file
            raise DataError(f"{path}: cannot read image: {e}") from e
        return torch.from_numpy(pixels.reshape(*pixels.shape[:2], -1).transpose(2, 0, 1).copy())
