"""Data: built-in generators with ground truth and readers for the formats users have.

``load_dataset(spec, split, n=None, seed=0, size=None)`` is the one entry point; ``spec`` is a
built-in name (``"cluttered-digits"``) or ``KIND:PATH`` for data on disk. Every dataset yields
``(image (C, H, W) float32 normalized, label[, box (4,) int64])`` and has ``num_classes``,
``in_chans`` and ``class_names``.
"""

from __future__ import annotations

from torch.utils.data import Dataset

from ..errors import DataError
from .digits import MEAN, SIZES, SPLITS, STD, ClutteredDigits, box_mask, source_indices

__all__ = ["DATASETS", "MEAN", "SPLITS", "STD", "ClutteredDigits", "box_mask", "load_dataset", "source_indices"]

DATASETS: tuple[str, ...] = ("cluttered-digits",)


def load_dataset(spec: str, split: str, n: int | None = None, *, seed: int = 0, size: int | None = None) -> Dataset:
    """Build dataset ``spec`` for ``split`` (train / val / test); ``n`` defaults per split."""
    if spec not in DATASETS:
        raise DataError(f"unknown dataset {spec!r}; known datasets: {', '.join(sorted(DATASETS))}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} for {spec}; expected one of {', '.join(SPLITS)}")
    return ClutteredDigits(split, SIZES[split] if n is None else n, size=size or 64, seed=seed)  # type: ignore[arg-type]
