"""Data: built-in generators with ground truth and readers for the formats users have.

``load_dataset(spec, split, n=None, seed=0, size=None, ...)`` is the one entry point. ``spec`` is
a name of :data:`GENERATORS` (built in, with ground truth: ``"cluttered-digits"`` images,
``"synthetic-faces"`` attributes, ``"synthetic-clips"`` video, ``"speaker-clips"`` audio-visual),
``"mnist"`` / ``"fashion-mnist"`` (installed copies), or ``KIND:PATH`` for data on disk, KIND one of
:data:`KINDS` (docs/data.md describes each layout; ``ava:DIR`` is AVA-ActiveSpeaker-style clips).
Image datasets yield ``(image (C, H, W) float32 normalized, label[, box (4,) int64])``; every dataset
has ``num_classes``, ``in_chans``, ``class_names``, ``task`` (the kind of data: ``multiclass``,
``multilabel``, ``video``, ``asd``), ``mean``, ``std`` and ``spec`` (what ``load_dataset`` was asked for).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from ..errors import ConfigError, DataError, require_int
from ..safeio import MAX_IMAGE_SIZE
from .base import ImageDataset
from .digits import MEAN, SIZES, SPLITS, STD, ClutteredDigits, box_mask, source_indices
from .formats import FORMATS, open_format
from .transforms import Transform

__all__ = ["DATASETS", "GENERATORS", "KINDS", "MEAN", "SPLITS", "STD", "ClutteredDigits", "ImageDataset", "Transform", "box_mask",
           "load_dataset", "source_indices"]  # fmt: skip


def _generator(name: str, split: str, n: int | None, seed: int, size: int | None, **options: Any) -> Dataset:
    """A built-in generator (it has the same protocol attributes as the on-disk datasets)."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} for {name}; expected one of {', '.join(SPLITS)}")
    if name == "cluttered-digits":
        cls: Any = ClutteredDigits
    elif name == "shortcut-digits":
        from .digits import ShortcutDigits as cls
    elif name == "synthetic-faces":
        from .faces import SyntheticFaces as cls
    elif name == "synthetic-clips":
        from .clips import SyntheticClips as cls
    else:
        from .speakers import SpeakerClips as cls
    if size is not None:
        require_int("size", size, 1, MAX_IMAGE_SIZE)  # 0 is refused, not taken for the default
    try:
        return cls(split, GENERATORS[name][split] if n is None else n, size=64 if size is None else size, seed=seed, **options)
    except TypeError as e:
        raise ConfigError(f"{name}: unknown option ({e})") from e


# the built-in generators and their default number of items per split
GENERATORS: dict[str, dict[str, int]] = {
    "cluttered-digits": SIZES,
    "shortcut-digits": SIZES,
    "synthetic-faces": {"train": 6000, "val": 500, "test": 1000},
    "synthetic-clips": {"train": 2000, "val": 300, "test": 500},
    "speaker-clips": {"train": 2000, "val": 300, "test": 500},
}
DATASETS: tuple[str, ...] = (*GENERATORS, "mnist", "fashion-mnist")  # usable without a path
KINDS: tuple[str, ...] = (*FORMATS, "ava", "videofolder")  # KIND of KIND:PATH


def load_dataset(spec: str, split: str, n: int | None = None, *, seed: int = 0, size: int | None = None,
                 augment: bool = False, mean: float | Sequence[float] | None = None,
                 std: float | Sequence[float] | None = None, **options: Any) -> Dataset:  # fmt: skip
    """Build dataset ``spec`` for ``split`` (train / val / test).

    ``n``: the first n items (default: a generator's per-split size; the whole split on disk).
    ``seed`` drives the generators only: on-disk splits are fixed.
    ``size`` / ``augment`` / ``mean`` / ``std`` override the format's defaults (generators take
    ``size`` and their own options, e.g. ``frames=8`` for clips); ``options`` go to the reader
    (imagefolder ``mode="L"``, celeba ``attributes=[...]``, ava ``frames=8``).
    """
    dataset = _load(spec, split, n, seed=seed, size=size, augment=augment, mean=mean, std=std, **options)
    if getattr(dataset, "spec", None) != spec:
        dataset.spec = spec  # type: ignore[attr-defined]  # what was asked for, recorded by fit
    return dataset


def _load(spec: str, split: str, n: int | None, *, seed: int, size: int | None, augment: bool,
          mean: float | Sequence[float] | None, std: float | Sequence[float] | None, **options: Any) -> Dataset:  # fmt: skip
    if spec in GENERATORS:
        if augment or mean is not None or std is not None:
            raise ConfigError(f"{spec} takes only n, seed, size and its own options: it has no augmentation and fixed mean/std")
        return _generator(spec, split, n, seed, size, **options)
    kind, sep, path = spec.partition(":")
    if kind == "ava":
        from .ava import open_ava

        if not (sep and path):
            raise DataError(f"{spec!r}: ava needs a path, as ava:DIR")
        if augment or mean is not None or std is not None:
            raise ConfigError("ava data takes n, size and its reader's options (frames, annotations): no augmentation, fixed mean/std")
        return open_ava(Path(path), split, n, size=size, **options)
    if kind == "videofolder":  # video files or frame folders per class (data/videos.py)
        from .videos import open_videofolder

        if not (sep and path):
            raise DataError(f"{spec!r}: videofolder needs a path, as videofolder:DIR")
        return open_videofolder(Path(path), split, n, size=size, augment=augment, mean=mean, std=std, **options)
    if kind not in FORMATS:
        raise DataError(f"unknown dataset {spec!r}; known datasets: {', '.join(DATASETS)}, "
                        f"or KIND:PATH with KIND one of {', '.join(KINDS)}")  # fmt: skip
    if (sep and not path) or (not sep and kind not in DATASETS):
        raise DataError(f"{spec!r}: {kind} needs a path, as {kind}:PATH")
    return open_format(kind, Path(path) if sep else None, split, n, size=size, augment=augment, mean=mean, std=std, **options)
