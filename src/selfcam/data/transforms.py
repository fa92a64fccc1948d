"""Per-dataset preprocessing: square crop and resize, optional augmentation, normalization.

A :class:`Transform` turns one decoded image, ``uint8 (C, h, w)``, into the normalized float
tensor a model sees, ``float32 (C, size, size)``:

1. ``prepare``: scale to [0, 1], crop the centred square of side ``min(h, w)`` and resize it to
   ``size x size`` (bilinear, antialiased); a no-op for images already ``size x size``;
2. with ``augment``: a random ``size x size`` crop of the image zero-padded by ``pad`` pixels, then
   a horizontal flip with probability 1/2 when ``flip``; all randomness comes from torch's global
   generator, so ``torch.manual_seed`` repeats it;
3. ``normalize``: ``(x - mean) / std`` per channel.

Every dataset has one (``dataset.transform``); ``dataclasses.replace`` derives variants.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError, require_int
from ..safeio import MAX_IMAGE_SIZE

__all__ = ["Transform"]


def _values(v: float | Sequence[float] | None) -> tuple[float, ...] | None:
    """One number or a sequence -> a tuple (None stays None)."""
    return None if v is None else (float(v),) if isinstance(v, (int, float)) else tuple(v)


@dataclass(frozen=True)
class Transform:
    """Preprocessing of one dataset; ``mean`` and ``std`` have one value per channel (a single value
    is repeated to match the other)."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool = False
    pad: int = 0  # random-crop padding, pixels (augmentation only)
    flip: bool = False  # random horizontal flip (augmentation only)

    def __post_init__(self) -> None:
        require_int("size", self.size, 1, MAX_IMAGE_SIZE)
        require_int("pad", self.pad, 0, MAX_IMAGE_SIZE)
        mean, std = tuple(map(float, self.mean)), tuple(map(float, self.std))
        if len(mean) == 1 or len(std) == 1:  # one value stands for every channel
            mean, std = mean * (len(std) if len(mean) == 1 else 1), std * (len(mean) if len(std) == 1 else 1)
        if not mean or len(mean) != len(std):
            raise ConfigError(f"mean and std need one value per channel (or one for all), got {self.mean!r} and {self.std!r}")
        if not all(math.isfinite(m) for m in mean) or not all(s > 0 and math.isfinite(s) for s in std):
            raise ConfigError(f"mean must be finite and std > 0, got {self.mean!r} and {self.std!r}")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    def with_options(self, *, size: int | None = None, augment: bool | None = None,
                     mean: float | Sequence[float] | None = None,
                     std: float | Sequence[float] | None = None) -> Transform:
        """A copy with the options that are not None replaced."""
        given = {"size": size, "augment": augment, "mean": _values(mean), "std": _values(std)}
        return replace(self, **{k: v for k, v in given.items() if v is not None})

    def for_channels(self, channels: int) -> Transform:
        """This transform for ``channels``-channel images: one value is repeated, three values are
        averaged for one channel (RGB statistics on grayscale data); anything else is an error."""
        if len(self.mean) == channels:
            return self
        if len(self.mean) == 1:
            return replace(self, mean=self.mean * channels, std=self.std * channels)
        if channels == 1:
            return replace(self, mean=(sum(self.mean) / len(self.mean),), std=(sum(self.std) / len(self.std),))
        raise ConfigError(f"mean/std have {len(self.mean)} values but the images have {channels} channels")

    def prepare(self, image: Tensor) -> Tensor:
        """uint8 (C, h, w) -> float32 (C, size, size) in [0, 1]: centred square crop, resize."""
        x = image.float() / 255 if image.dtype == torch.uint8 else image.float()
        h, w = x.shape[-2:]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        x = x[:, top : top + side, left : left + side]
        if side != self.size:
            x = F.interpolate(x[None], size=(self.size, self.size), mode="bilinear", align_corners=False,
                              antialias=side > self.size)[0].clamp_(0, 1)  # fmt: skip
        return x

    def augmented(self, x: Tensor) -> Tensor:
        """(C, S, S) -> (C, S, S): random crop of the ``pad``-padded image, random flip."""
        if self.pad:
            s = x.shape[-1]
            dy, dx = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
            x = F.pad(x, (self.pad,) * 4)[:, dy : dy + s, dx : dx + s]
        if self.flip and bool(torch.rand(()) < 0.5):
            x = x.flip(-1)
        return x

    def normalize(self, x: Tensor) -> Tensor:
        """(..., C, H, W) in [0, 1] -> (x - mean) / std per channel."""
        mean, std = (torch.tensor(v, dtype=x.dtype, device=x.device)[:, None, None] for v in (self.mean, self.std))
        return (x - mean) / std

    def denormalize(self, x: Tensor) -> Tensor:
        """Inverse of :meth:`normalize`: (..., C, H, W) normalized -> [0, 1] (not clipped)."""
        mean, std = (torch.tensor(v, dtype=x.dtype, device=x.device)[:, None, None] for v in (self.mean, self.std))
        return x * std + mean

    def __call__(self, image: Tensor) -> Tensor:
        """uint8 (C, h, w) -> normalized float32 (C, size, size), augmented when ``augment``."""
        x = self.prepare(image)
        return self.normalize(self.augmented(x) if self.augment else x)
