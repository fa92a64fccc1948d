"""Synthetic clips: a real handwritten digit moving across a cluttered, noisy canvas, boxed in every frame.

Each clip is ``T`` frames of a black ``size x size`` canvas. One digit of
:func:`sklearn.datasets.load_digits` (8x8, bundled with scikit-learn, no download), scaled to [0, 1]
and upscaled bilinearly to a random side (as :class:`~selfcam.data.digits.ClutteredDigits` draws
it), moves in a straight line from a random start position to a random end position, both chosen
so that the digit lies fully inside the canvas; the position of frame ``t`` is
``rint(start + (end - start) * t / (T - 1))`` (the start itself when ``T == 1``), so the digit is
translated by whole pixels and its box keeps its size. ``clutter`` random crops (about 1/4..1/3 of
the area) of *other* upscaled digits are drawn once per clip and stay still for the whole clip,
placed preferably off the target's path (a fragment may cover at most 20 % of its area inside the
target's box of any frame; of 8 candidate positions the first that does is kept, else the one of
least overlap), and combined with ``max``; fresh Gaussian noise is added to every frame and the
result clipped to [0, 1]. The box of a frame is the tight bound of the target's pixels > 0.1 in
that frame, as ``(x0, y0, x1, y1)`` with exclusive ends.

Sources come from the same disjoint train / val / test pools of the 1797 digits as
``ClutteredDigits`` (:func:`~selfcam.data.digits.source_indices`), for targets and clutter alike.
Generation is vectorized over all ``n * T`` frames (the patches are ``A_y @ digit @ A_x^T`` with
bilinear interpolation matrices; the clutter is rendered once per clip), and all randomness comes
from one NumPy generator seeded by (seed, split) (the noise from a torch generator seeded by it);
the target's draws come first, so the same seed with other ``clutter`` or ``noise`` gives the same
digits, motions and boxes.
"""

from __future__ import annotations

from numbers import Integral, Real
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError
from .digits import _MAX_OVERLAP, MEAN, SPLITS, STD, DigitCanvases, _digits, _fragments, _paste, _tight_boxes, source_indices

__all__ = ["SyntheticClips"]

_STREAM = 11  # third word of the generator's seed: clips draw a stream of their own, apart from ClutteredDigits'
_CHUNK = 256  # clips per chunk of noise (bounds the temporary memory)


class SyntheticClips(DigitCanvases):
    """``n`` clips of a moving digit of one split; see the module docstring for the generator.

    Attributes: ``clips`` float32 ``(n, T, 1, S, S)`` in [0, 1] (unnormalized), ``labels`` ``(n,)``
    int64, ``boxes`` ``(n, T, 4)`` int64 ``(x0, y0, x1, y1)`` exclusive ends, ``sources`` ``(n,)``
    int64 (index of each target into ``load_digits()``), ``positions`` ``(n, T, 2)`` int64 (top-left
    ``(x, y)`` of the digit's ``side x side`` square in each frame), ``sides`` ``(n,)`` int64, and
    ``frames`` (the clip length ``T``; also as ``num_frames``, the name the video task reads),
    ``split``, ``size``, ``seed``, ``class_names``.
    """

    task: str = "video"
    spec: str = "synthetic-clips"

    def __init__(self, split: Literal["train", "val", "test"], n: int, *, frames: int = 8, size: int = 64,
                 seed: int = 0, clutter: int = 4, noise: float = 0.05,
                 digit_size: tuple[int, int] | None = None) -> None:  # fmt: skip
        for name, value, low in (("n", n, 1), ("frames", frames, 1), ("size", size, 16), ("seed", seed, 0),
                                 ("clutter", clutter, 0)):  # fmt: skip
            if not isinstance(value, Integral) or isinstance(value, bool) or value < low:
                raise DataError(f"{name} must be an integer >= {low}, got {value!r}")
        if not isinstance(noise, Real) or isinstance(noise, bool) or not 0 <= noise < float("inf"):
            raise DataError(f"noise must be a finite number >= 0, got {noise!r}")
        if digit_size is None:
            lo, hi = round(size * 11 / 32), round(size / 2)
        else:
            try:
                lo, hi = digit_size
            except (TypeError, ValueError):
                raise DataError(f"digit_size must be a pair (low, high) of integers, got {digit_size!r}") from None
            if not all(isinstance(v, Integral) and not isinstance(v, bool) for v in (lo, hi)):
                raise DataError(f"digit_size must be a pair (low, high) of integers, got {digit_size!r}")
        if not 4 <= lo <= hi <= size:
            raise DataError(f"digit_size must satisfy 4 <= low <= high <= size={size}, got {(lo, hi)}")
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        pool = source_indices(split)
        n, T, S = int(n), int(frames), int(size)
        self.split, self.size, self.seed, self.frames, self.num_frames = split, S, int(seed), T, T
        self.class_names: list[str] = [str(d) for d in range(10)]
        digits, labels = _digits()
        rng = np.random.default_rng([int(seed), SPLITS.index(split), _STREAM])
        t = torch.from_numpy

        # the target: digit, side, straight path from start to end (all drawn before anything else)
        pick = rng.integers(0, len(pool), n)
        side = rng.integers(lo, hi + 1, n)
        room = (S - side + 1)[:, None]
        start = rng.integers(0, room, (n, 2))
        end = rng.integers(0, room, (n, 2))
        frac = np.arange(T) / (T - 1) if T > 1 else np.zeros(1)
        pos = np.rint(start[:, None] + (end - start)[:, None] * frac[None, :, None]).astype(np.int64)  # (n, T, 2)
        self.positions: Tensor = t(pos)  # (n, T, 2) int64 (x, y) top-left of the digit's square
        self.sides: Tensor = t(side.astype(np.int64))  # (n,)
        self.labels: Tensor = t(labels[pool[pick]])  # (n,) int64
        self.sources: Tensor = t(pool[pick])  # (n,) int64 index of each target into load_digits()
        side_f = np.repeat(side, T)
        sides2 = t(np.stack([side_f, side_f], 1))
        video = _paste(t(np.repeat(digits[pool[pick]], T, axis=0)), t(side_f), t(pos.reshape(n * T, 2)), sides2,
                       torch.zeros_like(sides2), S)  # (n * T, S, S), the target alone  # fmt: skip
        self.boxes: Tensor = _tight_boxes(video > 0.1).view(n, T, 4)  # (n, T, 4) int64

        # static clutter, drawn once per clip, preferably off the target's box in every frame
        other, f_side, f_ext, f_off, cand = _fragments(rng, len(pool), pick, clutter, lo, hi, S)
        box = self.boxes.numpy()[None, :, None]  # (1, n, 1, T, 4)
        c0, c1 = cand[..., None, :], (cand + f_ext)[..., None, :]  # (tries, n, clutter, 1, 2)
        ov = np.clip(np.minimum(c1, box[..., 2:]) - np.maximum(c0, box[..., :2]), 0, None).prod(-1).max(-1)
        ok = ov <= _MAX_OVERLAP * f_ext.prod(-1)  # (tries, n, clutter): off the box of every frame
        choice = np.where(ok.any(0), ok.argmax(0), ov.argmin(0))  # first acceptable try, else least overlap
        f_start = np.take_along_axis(cand, choice[None, ..., None], 0)[0]
        video = video.view(n, T, S, S)
        if clutter:
            still = torch.zeros(n, S, S)  # the clutter of each clip, the same in all its frames
            for k in range(clutter):
                frag = _paste(t(digits[pool[other[:, k]]]), t(f_side[:, k]), t(f_start[:, k]), t(f_ext[:, k]),
                              t(f_off[:, k]), S)  # fmt: skip
                torch.maximum(still, frag, out=still)
            torch.maximum(video, still[:, None], out=video)
        if noise > 0:  # fresh noise in every frame, from a torch generator seeded by the NumPy one
            gen = torch.Generator().manual_seed(int(rng.integers(0, 2**63)))
            for a in range(0, n, _CHUNK):
                chunk = video[a : a + _CHUNK]
                chunk.add_(torch.randn(chunk.shape, generator=gen), alpha=float(noise))
        self.clips: Tensor = video.clamp_(0, 1).unsqueeze(2)  # (n, T, 1, S, S) float32

    def normalize(self, x: Tensor) -> Tensor:
        """(x - MEAN) / STD, any shape."""
        return (x - MEAN) / STD

    def denormalize(self, x: Tensor) -> Tensor:
        """Inverse of :meth:`normalize`."""
        return x * STD + MEAN

    def raw(self, i: int) -> Tensor:
        """The unnormalized clip ``(T, 1, S, S)`` in [0, 1], for reports."""
        return self.clips[i]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        """(normalized clip (T, 1, S, S) float32, label () int64, boxes (T, 4) int64)."""
        return self.normalize(self.clips[i]), self.labels[i], self.boxes[i]
