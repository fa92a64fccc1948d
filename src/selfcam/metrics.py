"""Explanation metrics. Maps are ``(N, H, W)`` in ``[0, 1]`` at input size; masks are bool ``(N, H, W)``.

Each function returns one value per sample (``(N,)``) so callers can stream over
a data loader and average at the end.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import InputError

__all__ = ["accuracy", "pointing_game", "iou"]


def _check(maps: Tensor, masks: Tensor) -> None:
    if maps.dim() != 3 or maps.shape != masks.shape:
        raise InputError(f"maps and masks must both be (N, H, W), got {tuple(maps.shape)} and {tuple(masks.shape)}")


def accuracy(logits: Tensor, target: Tensor) -> Tensor:
    """Top-1 hit per sample: ``(N, classes), (N,) -> (N,)`` float."""
    return (logits.argmax(dim=1) == target).float()


def pointing_game(maps: Tensor, masks: Tensor, tolerance: int = 0) -> Tensor:
    """Hit (1.0) when the map's maximum lies in the mask, or within ``tolerance`` pixels of it.

    Ties go to the first maximum in row-major order. Returns ``(N,)`` float.
    """
    _check(maps, masks)
    n, h, w = maps.shape
    idx = maps.reshape(n, -1).argmax(dim=1)
    py, px = idx // w, idx % w
    if tolerance <= 0:
        return masks[torch.arange(n, device=maps.device), py, px].float()
    ys = torch.arange(h, device=maps.device).view(1, h, 1)
    xs = torch.arange(w, device=maps.device).view(1, 1, w)
    near = (ys - py.view(n, 1, 1)) ** 2 + (xs - px.view(n, 1, 1)) ** 2 <= tolerance**2
    return (near & masks).flatten(1).any(dim=1).float()


def iou(maps: Tensor, masks: Tensor, threshold: float = 0.5) -> Tensor:
    """IoU of ``maps >= threshold`` with the mask; ``(N,)`` float (0 when both are empty)."""
    _check(maps, masks)
    pred = maps >= threshold
    inter = (pred & masks).flatten(1).sum(1).float()
    union = (pred | masks).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(union))
