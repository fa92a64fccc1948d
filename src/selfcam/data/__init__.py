"""Data: built-in generators with ground truth and readers for the formats users have.

``load_dataset(spec, split, n=None, seed=0, size=None, ...)`` is the one entry point. ``spec`` is
a name (``"cluttered-digits"``, built in; ``"mnist"``, ``"fashion-mnist"``, installed copies) or
``KIND:PATH`` for data on disk, KIND one of :data:`KINDS` (docs/data.md describes each layout).
Every dataset yields ``(image (C, H, W) float32 normalized, label[, box (4,) int64])`` and has
``num_classes``, ``in_chans``, ``class_names``, ``task``, ``mean`` and ``std``; the on-disk ones
(:class:`ImageDataset`) also ``raw(i)`` and ``denormalize(x)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from ..errors import ConfigError, DataError
from .base import ImageDataset
from .digits import MEAN, SIZES, SPLITS, STD, ClutteredDigits, box_mask, source_indices
from .formats import FORMATS, open_format
from .transforms import Transform

__all__ = ["DATASETS", "KINDS", "MEAN", "SPLITS", "STD", "ClutteredDigits", "ImageDataset", "Transform", "box_mask",
           "load_dataset", "source_indices"]  # fmt: skip

DATASETS: tuple[str, ...] = ("cluttered-digits", "mnist", "fashion-mnist")  # usable without a path
KINDS: tuple[str, ...] = tuple(FORMATS)  # KIND of KIND:PATH


def _cluttered(split: str, n: int | None, seed: int, size: int | None) -> ClutteredDigits:
    """The built-in generator (it has the same protocol attributes as the on-disk datasets)."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} for cluttered-digits; expected one of {', '.join(SPLITS)}")
    return ClutteredDigits(split, SIZES[split] if n is None else n, size=size or 64, seed=seed)  # type: ignore[arg-type]


def load_dataset(spec: str, split: str, n: int | None = None, *, seed: int = 0, size: int | None = None,
                 augment: bool = False, mean: float | Sequence[float] | None = None,
                 std: float | Sequence[float] | None = None, **options: Any) -> Dataset:  # fmt: skip
    """Build dataset ``spec`` for ``split`` (train / val / test).

    ``n``: the first n items (default: cluttered-digits' per-split size; the whole split on disk).
    ``seed`` drives the cluttered-digits generator only: on-disk splits are fixed.
    ``size`` / ``augment`` / ``mean`` / ``std`` override the format's defaults (cluttered-digits
    takes ``size`` only); ``options`` go to the reader (imagefolder ``mode="L"``, celeba
    ``attributes=[...]``).
    """
    if spec == "cluttered-digits":
        if augment or mean is not None or std is not None or options:
            raise ConfigError("cluttered-digits takes only n, seed and size: it has no augmentation and fixed mean/std")
        return _cluttered(split, n, seed, size)
    kind, sep, path = spec.partition(":")
    if kind not in FORMATS:
        raise DataError(f"unknown dataset {spec!r}; known datasets: {', '.join(DATASETS)}, "
                        f"or KIND:PATH with KIND one of {', '.join(KINDS)}")  # fmt: skip
    if (sep and not path) or (not sep and kind not in DATASETS):
        raise DataError(f"{spec!r}: {kind} needs a path, as {kind}:PATH")
    return open_format(kind, Path(path) if sep else None, split, n, size=size, augment=augment, mean=mean, std=std, **options)
