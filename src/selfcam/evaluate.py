"""Run a model over a dataset with ground-truth boxes and score its maps.

One dispatcher, :func:`explain_batch`, gives maps for ``"self"`` (the head's own
map, one forward pass) or any post-hoc method, so every method is scored by the
same code. Streams over a loader: memory does not grow with the dataset.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .data import box_mask
from .metrics import accuracy, iou, pointing_game
from .model import SelfExplainer
from .posthoc import posthoc_map

__all__ = ["explain_batch", "evaluate", "count_params"]


def explain_batch(model: SelfExplainer, x: Tensor, method: str = "self") -> tuple[Tensor, Tensor]:
    """``(N, C, H, W) -> (logits (N, classes), maps (N, H, W) in [0, 1])``."""
    if method == "self":
        with torch.no_grad():
            out = model.explain(x)
        return out.logits, out.heatmap
    with torch.no_grad():
        logits = model(x).logits
    return logits, posthoc_map(model, x, method, target=logits.argmax(dim=1))


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def evaluate(
    model: SelfExplainer, dataset: Dataset, method: str = "self", batch_size: int = 100, threshold: float = 0.5
) -> dict[str, Any]:
    """Accuracy, pointing game, IoU of ``map >= threshold`` with the box, and map latency.

    ``dataset`` yields ``(image, label, box)``. ``map_ms_per_image`` is the wall
    time of :func:`explain_batch` divided by the number of images (batched).
    """
    device = next(model.parameters()).device
    model.eval()
    sums = {"accuracy": 0.0, "pointing_game": 0.0, "iou": 0.0}
    n, seconds = 0, 0.0
    for x, y, box in DataLoader(dataset, batch_size=batch_size):
        x, y, box = x.to(device), y.to(device), box.to(device)
        t0 = time.perf_counter()
        logits, maps = explain_batch(model, x, method)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - t0
        masks = box_mask(box, tuple(x.shape[-2:]))
        sums["accuracy"] += accuracy(logits, y).sum().item()
        sums["pointing_game"] += pointing_game(maps, masks).sum().item()
        sums["iou"] += iou(maps, masks, threshold).sum().item()
        n += len(x)
    result: dict[str, Any] = {k: v / max(n, 1) for k, v in sums.items()}
    result["map_ms_per_image"] = 1000 * seconds / max(n, 1)
    result["params"] = count_params(model)
    return result
