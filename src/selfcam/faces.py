"""Multi-label attributes: per-attribute scores of an ``se-multilabel`` model.

One ``se-multilabel`` model (shared backbone, one SE block per attribute, see
:class:`~selfcam.heads.MultiLabelSEHead`) gives a logit and a heatmap per attribute.
:func:`evaluate_attributes` scores, per attribute, the accuracy (sigmoid > 0.5) on every
test image and the pointing game and IoU of the attribute's map against its mask on the
images where the attribute is present (an absent attribute has no location to point at).
The faces demo is ``selfcam demo --task faces`` (:mod:`selfcam.demo`, recipe in :mod:`selfcam.recipes`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from . import metrics as M
from .data.faces import SyntheticFaces
from .errors import InputError
from .model import SelfExplainer

__all__ = [
    "attribute_scores",
    "evaluate_attributes",
]

SCORES = ("accuracy", "pointing_game", "pointing_game_15px", "iou")
LOCAL = SCORES[1:]  # scored where the attribute is present


def attribute_scores(logits: Tensor, attrs: Tensor, maps: Tensor, masks: Tensor, threshold: float = 0.5,
                     tolerance: int = 0) -> dict[str, Tensor]:  # fmt: skip
    """Per sample and attribute: ``logits, attrs (N, A)``, ``maps (N, A, H, W)``, ``masks (N, A, H, W)`` -> ``(N, A)`` each.

    ``accuracy``: 1.0 where ``sigmoid(logit) > 0.5`` agrees with ``attrs > 0.5``;
    ``pointing_game`` and ``iou`` (map ``>= threshold``): :func:`selfcam.metrics.pointing_game`
    and :func:`selfcam.metrics.iou` of each attribute's map with its mask; ``pointing_game_15px``
    the pointing game within Zhang et al.'s tolerance (:func:`selfcam.metrics.zhang_tolerance`);
    ``present`` (bool) says where they count (the attribute is in the image).
    """
    if logits.dim() != 2 or attrs.shape != logits.shape:
        raise InputError(f"logits and attrs must both be (N, A), got {tuple(logits.shape)} and {tuple(attrs.shape)}")
    if maps.dim() != 4 or maps.shape[:2] != logits.shape or masks.shape != maps.shape:
        raise InputError(f"maps and masks must be (N, A, H, W) with (N, A) = {tuple(logits.shape)}, "
                         f"got {tuple(maps.shape)} and {tuple(masks.shape)}")  # fmt: skip
    n, a = logits.shape
    present = attrs > 0.5
    flat_maps, flat_masks = maps.flatten(0, 1), masks.flatten(0, 1).bool()
    return {
        "accuracy": ((logits > 0) == present).float(),
        "pointing_game": M.pointing_game(flat_maps, flat_masks, tolerance).view(n, a),
        "pointing_game_15px": M.pointing_game(flat_maps, flat_masks, M.zhang_tolerance(maps.shape[-2])).view(n, a),
        "iou": M.iou(flat_maps, flat_masks, threshold).view(n, a),
        "present": present,
    }


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


@torch.no_grad()
def evaluate_attributes(model: SelfExplainer, dataset: SyntheticFaces, batch_size: int = 100, threshold: float = 0.5,
                        tolerance: int = 0) -> dict[str, Any]:  # fmt: skip
    """Stream ``dataset`` through ``model``; per attribute the mean of :func:`attribute_scores`.

    Returns ``{"attributes": {name: {"accuracy", "pointing_game", "pointing_game_15px", "iou", "present"}},
    "mean": {...}}``: accuracy over all images, pointing games and IoU over the ``present`` images (``None`` when
    there are none); ``"mean"`` averages the attributes.
    """
    model.eval()
    device = next(model.parameters()).device
    names = list(dataset.class_names)
    totals = {k: torch.zeros(len(names), dtype=torch.float64) for k in (*SCORES, "present")}
    for x, attrs, masks in DataLoader(dataset, batch_size):
        out = model.explain(x.to(device))
        s = attribute_scores(out.logits, attrs.to(device), out.heatmap, masks.to(device), threshold, tolerance)
        totals["accuracy"] += s["accuracy"].sum(0).cpu().double()
        for key in LOCAL:
            totals[key] += (s[key] * s["present"]).sum(0).cpu().double()
        totals["present"] += s["present"].sum(0).cpu().double()
    rows: dict[str, dict[str, Any]] = {}
    for a, name in enumerate(names):
        count = int(totals["present"][a])
        local = {k: float(totals[k][a]) / count if count else None for k in LOCAL}
        rows[name] = {"accuracy": float(totals["accuracy"][a]) / len(dataset), **local, "present": count}
    return {"attributes": rows, "mean": {k: _mean([r[k] for r in rows.values()]) for k in SCORES}}
