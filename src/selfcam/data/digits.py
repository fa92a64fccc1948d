"""Cluttered digits: real handwritten digits on a cluttered, noisy canvas, with ground-truth boxes.

Each sample is a black ``size x size`` canvas holding one digit of
:func:`sklearn.datasets.load_digits` (8x8, bundled with scikit-learn, no download), scaled to
[0, 1], upscaled bilinearly to a random side and pasted fully inside the canvas. ``clutter``
random crops (about 1/4..1/3 of the area) of *other* upscaled digits are scattered around it,
preferably off the target's box, and combined with ``max``; Gaussian noise is added and the
result clipped to [0, 1]. The box is the tight bound of the target's pixels > 0.1 as
``(x0, y0, x1, y1)`` with exclusive ends.

The 1797 source digits are split once, by a fixed permutation, into disjoint train / val / test
pools (70 / 10 / 20 %); a split's canvases use only its own pool, for targets and clutter alike.
Generation is vectorized: a pasted patch is ``A_y @ digit @ A_x^T`` with per-sample bilinear
interpolation matrices, and all randomness comes from one NumPy generator seeded by (seed, split).
"""

from __future__ import annotations

from functools import lru_cache
from numbers import Integral
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError

__all__ = ["MEAN", "STD", "ClutteredDigits", "ShortcutDigits", "box_mask", "mark_places", "source_indices"]

MEAN: float = 0.15  # measured on load_dataset("cluttered-digits", "train"), rounded
STD: float = 0.26
SPLITS: tuple[str, ...] = ("train", "val", "test")
SIZES: dict[str, int] = {"train": 6000, "val": 1000, "test": 1000}  # default canvases per split
_POOL_SEED = 12345
_MAX_OVERLAP = 0.2  # a fragment may cover at most this share of its area inside the target box
_TRIES = 8  # candidate positions drawn per fragment
_CHUNK = 2**20  # pixels of the canvases built at a time (1024 canvases at 32 px)


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 source digits as ((1797, 8, 8) float32 in [0, 1], peak 1; (1797,) int64 labels)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images.astype(np.float32)
    images /= images.max(axis=(1, 2), keepdims=True)
    return images, bunch.target.astype(np.int64)


def source_indices(split: str) -> np.ndarray:
    """Sorted indices (into ``load_digits()``) of the source digits a split may use."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    perm = np.random.default_rng(_POOL_SEED).permutation(len(_digits()[1]))
    cut = np.rint(np.array([0.7, 0.8]) * len(perm)).astype(int)
    return np.sort(np.split(perm, cut)[SPLITS.index(split)])


def _weights(start: Tensor, extent: Tensor, offset: Tensor, side: Tensor, size: int) -> Tensor:
    """(M, size, 8) bilinear weights along one axis: canvas pixel u in [start, start + extent)
    reads pixel u - start + offset of the digit upscaled to ``side`` (as F.interpolate, bilinear,
    align_corners=False); other canvas pixels get zero weight."""
    u = torch.arange(size, dtype=torch.float32)
    start, extent, offset, side = (v.float()[:, None] for v in (start, extent, offset, side))
    t = ((u - start + offset + 0.5) * (8.0 / side) - 0.5).clamp(0, 7)
    w = (1 - (t[..., None] - torch.arange(8, dtype=torch.float32)).abs()).clamp(min=0)
    return w * ((u >= start) & (u < start + extent))[..., None]


def _paste(digits: Tensor, side: Tensor, start: Tensor, extent: Tensor, offset: Tensor, size: int) -> Tensor:
    """(M, size, size) canvases with the (offset, extent) crop of each (M, 8, 8) digit upscaled to
    ``side`` (M,) pasted at ``start``; start/extent/offset are (M, 2) as (x, y)."""
    wy = _weights(start[:, 1], extent[:, 1], offset[:, 1], side, size)
    wx = _weights(start[:, 0], extent[:, 0], offset[:, 0], side, size)
    return wy @ digits @ wx.transpose(1, 2)


def _tight_boxes(mask: Tensor) -> Tensor:
    """(N, 4) int64 (x0, y0, x1, y1), exclusive ends, of the True pixels of (N, H, W) masks."""
    spans = []
    for line in (mask.any(1), mask.any(2)):  # columns, rows holding a True pixel
        line = line.to(torch.uint8)
        spans.append((line.argmax(1), line.shape[1] - line.flip(1).argmax(1)))
    (x0, x1), (y0, y1) = spans
    return torch.stack([x0, y0, x1, y1], 1).long()


def box_mask(boxes: Tensor, size: int | tuple[int, int]) -> Tensor:
    """(N, H, W) bool, True inside each (N, 4) box (x0, y0, x1, y1), exclusive ends."""
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise DataError(f"boxes must have shape (N, 4), got {tuple(boxes.shape)}")
    h, w = (size, size) if isinstance(size, Integral) else size
    ys, xs = torch.arange(h, device=boxes.device), torch.arange(w, device=boxes.device)
    inside_x = (xs >= boxes[:, 0, None]) & (xs < boxes[:, 2, None])
    inside_y = (ys >= boxes[:, 1, None]) & (ys < boxes[:, 3, None])
    return inside_y[:, :, None] & inside_x[:, None, :]


def _fragments(rng: np.random.Generator, pool: int, pick: np.ndarray, clutter: int, lo: int, hi: int,
               size: int) -> tuple[np.ndarray, ...]:  # fmt: skip
    """The clutter of ``len(pick)`` canvases, ``clutter`` fragments each, drawn from ``rng`` in a fixed order:
    ``(other, side, extent, offset, candidates)``: the source digit of each fragment (never the target's
    own, ``pick``), its scaled side in [lo, hi], the crop's extent and offset inside it (1/4..1/3 of its
    area), and ``_TRIES`` candidate positions on the ``size`` canvas (they may cross the border)."""
    n = len(pick)
    other = rng.integers(0, pool - 1, (n, clutter))
    other += other >= pick[:, None]
    f_side = rng.integers(lo, hi + 1, (n, clutter))
    frac = rng.uniform(0.5, 0.6, (n, clutter, 2))
    f_ext = np.maximum(2, np.rint(f_side[..., None] * frac)).astype(np.int64)
    f_off = rng.integers(0, f_side[..., None] - f_ext + 1)
    cand = rng.integers(-(f_ext // 2), size - f_ext // 2, (_TRIES, n, clutter, 2))
    return other, f_side, f_ext, f_off, cand


class DigitCanvases(torch.utils.data.Dataset):
    """What the digit generators share: ten classes, one channel, the canvases' mean and std."""

    num_classes: int = 10
    in_chans: int = 1
    mean: tuple[float, ...] = (MEAN,)
    std: tuple[float, ...] = (STD,)


class ClutteredDigits(DigitCanvases):
    """``n`` cluttered-digit canvases of one split; see the module docstring for the generator."""

    task: str = "multiclass"
    spec: str = "cluttered-digits"

    def __init__(self, split: Literal["train", "val", "test"], n: int, *, size: int = 64, seed: int = 0,
                 clutter: int = 4, noise: float = 0.05, digit_size: tuple[int, int] | None = None) -> None:
        for name, value, low in (("n", n, 1), ("size", size, 16), ("seed", seed, 0), ("clutter", clutter, 0)):
            if not isinstance(value, Integral) or isinstance(value, bool) or value < low:
                raise DataError(f"{name} must be an integer >= {low}, got {value!r}")
        if not noise >= 0:
            raise DataError(f"noise must be >= 0, got {noise!r}")
        lo, hi = digit_size or (round(size * 11 / 32), round(size / 2))
        if not 4 <= lo <= hi <= size:
            raise DataError(f"digit_size must satisfy 4 <= low <= high <= size={size}, got {(lo, hi)}")
        pool = source_indices(split)  # validates split
        self.split, self.size, self.seed = split, int(size), int(seed)
        self.class_names: list[str] = [str(d) for d in range(10)]
        digits, labels = _digits()
        rng = np.random.default_rng([int(seed), SPLITS.index(split)])

        pick = rng.integers(0, len(pool), n)
        side = rng.integers(lo, hi + 1, n)
        start = rng.integers(0, (size - side + 1)[:, None], (n, 2))
        t = torch.from_numpy
        sides = t(np.stack([side, side], 1))
        # Built CHUNK images at a time into the one (n, size, size) array (the draws stay those of one go): memory
        # is the images plus a chunk's temporaries, not several float copies of all of them.
        chunks = [slice(i, i + max(1, _CHUNK // size**2)) for i in range(0, n, max(1, _CHUNK // size**2))]
        canvas = torch.empty(n, size, size)
        self.boxes: Tensor = torch.empty(n, 4, dtype=torch.int64)  # (n, 4) int64
        for c in chunks:
            canvas[c] = _paste(t(digits[pool[pick[c]]]), t(side[c]), t(start[c]), sides[c], torch.zeros_like(sides[c]), size)
            self.boxes[c] = _tight_boxes(canvas[c] > 0.1)
        self.labels: Tensor = t(labels[pool[pick]])  # (n,) int64
        self.sources: Tensor = t(pool[pick])  # (n,) int64 index of each target into load_digits()

        other, f_side, f_ext, f_off, cand = _fragments(rng, len(pool), pick, clutter, lo, hi, size)
        box = self.boxes.numpy()[None, :, None]
        ov = np.clip(np.minimum(cand + f_ext, box[..., 2:]) - np.maximum(cand, box[..., :2]), 0, None)
        ov = ov.prod(-1)  # (tries, n, clutter) overlap area with the target box
        ok = ov <= _MAX_OVERLAP * f_ext.prod(-1)
        choice = np.where(ok.any(0), ok.argmax(0), ov.argmin(0))  # first acceptable try, else least overlap
        f_start = np.take_along_axis(cand, choice[None, ..., None], 0)[0]
        for c in chunks:
            for k in range(clutter):
                frag = _paste(t(digits[pool[other[c, k]]]), t(f_side[c, k]), t(f_start[c, k]), t(f_ext[c, k]),
                              t(f_off[c, k]), size)
                torch.maximum(canvas[c], frag, out=canvas[c])
        for c in chunks:  # the noise drawn chunk by chunk is the same stream as in one call
            if noise > 0:
                canvas[c] += float(noise) * t(rng.standard_normal((len(canvas[c]), size, size), dtype=np.float32))
            canvas[c].clamp_(0, 1)
        self.images: Tensor = canvas.unsqueeze(1)  # (n, 1, size, size) float32

    def normalize(self, images: Tensor) -> Tensor:
        """(x - MEAN) / STD, any shape."""
        return (images - MEAN) / STD

    def raw(self, i: int) -> Tensor:
        """The unnormalized canvas ``(1, S, S)`` in [0, 1], for reports."""
        return self.images[i]

    def denormalize(self, x: Tensor) -> Tensor:
        """Inverse of :meth:`normalize`."""
        return x * STD + MEAN

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        """(normalized image (1, S, S) float32, label () int64, box (4,) int64)."""
        return self.normalize(self.images[i]), self.labels[i], self.boxes[i]

    def __getitems__(self, indices: list[int]) -> list[tuple[Tensor, Tensor, Tensor]]:
        """``[self[i] for i in indices]``, normalized in one operation (a DataLoader's batches ask for this)."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return list(zip(self.normalize(self.images[idx]).unbind(0), self.labels[idx].unbind(0), self.boxes[idx].unbind(0)))


def mark_places(size: int, mark: int, classes: int = 10) -> Tensor:
    """``(classes, 2)`` int64 ``(x, y)`` top-left corners of each class's mark in :class:`ShortcutDigits`:
    evenly spaced, clockwise from the top-left corner, along the square ring one pixel inside the canvas
    border (the ring of corners ``1 .. size - 1 - mark``)."""
    lo, hi = 1, size - 1 - mark
    side = hi - lo
    if side < 1:
        raise DataError(f"a {mark} px mark does not fit a ring inside a {size} px canvas")
    t = (torch.arange(classes, dtype=torch.float64) * (4 * side / classes)).round().long()  # distance along the ring
    edge, d = t // side, t % side
    x = torch.stack([lo + d, torch.full_like(d, hi), hi - d, torch.full_like(d, lo)], 1).gather(1, edge[:, None])[:, 0]
    y = torch.stack([torch.full_like(d, lo), lo + d, torch.full_like(d, hi), hi - d], 1).gather(1, edge[:, None])[:, 0]
    return torch.stack([x, y], 1)


class ShortcutDigits(ClutteredDigits):
    """Cluttered digits with a shortcut: a small bright square (the *mark*) that sits, in a share
    ``correlation`` of the images, at a place that depends on the class (:func:`mark_places`), and
    anywhere (uniformly, fully inside the canvas) in the others.

    The canvases are those of :class:`ClutteredDigits` with the same arguments, pixel for pixel, except
    under the mark, which is set to 1 (``mark`` px square, default ``size // 16``). ``correlation``
    defaults to 0.9 for train and val and 0.0 for test: a model that learned the mark's place loses
    accuracy on the test split (``correlation=1.0`` gives the correlated test set). The mark's draws come
    from their own generator seeded by (seed, split, 1). ``mark_boxes (n, 4)`` ``(x0, y0, x1, y1)``, exclusive
    ends; ``correlated (n,)`` bool: the mark is at its class's place.
    """

    spec: str = "shortcut-digits"

    def __init__(self, split: Literal["train", "val", "test"], n: int, *, size: int = 64, seed: int = 0,
                 correlation: float | None = None, mark: int | None = None, **options: float) -> None:  # fmt: skip
        super().__init__(split, n, size=size, seed=seed, **options)  # type: ignore[arg-type]
        correlation = (0.0 if split == "test" else 0.9) if correlation is None else correlation
        if not 0 <= correlation <= 1:
            raise DataError(f"correlation must lie in [0, 1], got {correlation!r}")
        mark = max(2, size // 16) if mark is None else mark
        if not isinstance(mark, Integral) or isinstance(mark, bool) or not 1 <= mark <= size // 4:
            raise DataError(f"mark must be an integer in [1, {size // 4}] px, got {mark!r}")
        self.correlation, self.mark = float(correlation), int(mark)
        rng = np.random.default_rng([int(seed), SPLITS.index(split), 1])
        self.correlated: Tensor = torch.from_numpy(rng.random(n) < correlation)
        anywhere = torch.from_numpy(rng.integers(0, size - mark + 1, (n, 2)))
        corner = torch.where(self.correlated[:, None], mark_places(size, mark)[self.labels], anywhere)
        self.mark_boxes: Tensor = torch.cat([corner, corner + mark], 1)  # (n, 4) int64
        self.images[box_mask(self.mark_boxes, size)[:, None]] = 1.0
