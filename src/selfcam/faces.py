"""Multi-label attributes on synthetic faces: the model, per-attribute scores, the faces demo.

One ``se-multilabel`` model (shared backbone, one SE block per attribute, see
:class:`~selfcam.heads.MultiLabelSEHead`) gives a logit and a heatmap per attribute.
:func:`evaluate_attributes` scores, per attribute, the accuracy (sigmoid > 0.5) on every
test image and the pointing game and IoU of the attribute's map against its mask on the
images where the attribute is present (an absent attribute has no location to point at).
:func:`run_faces_demo` trains, scores and writes ``metrics.json`` and ``report.html``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from . import metrics as M
from .data.faces import SyntheticFaces
from .errors import InputError
from .model import SelfExplainer, create_model
from .render import attribute_sheet, png_data_uri, write_report
from .train import TrainConfig, fit, seed_all

__all__ = [
    "FacesRecipe",
    "attribute_scores",
    "create_faces_model",
    "evaluate_attributes",
    "run_faces_demo",
]

SCORES = ("accuracy", "pointing_game", "pointing_game_15px", "iou")
LOCAL = SCORES[1:]  # scored where the attribute is present
GALLERY_SIZE = 12


@dataclass
class FacesRecipe:
    """The quick faces recipe (one model; see docs/faces.md for its time and scores)."""

    backbone: str = "resnet8"
    stem_stride: int = 1
    output_stride: int = 4  # 64 px faces -> a 16x16 feature map (earrings are a few pixels wide)
    se_reduction: int = 4
    epochs: int = 6
    train_size: int = 6000
    val_size: int = 500
    test_size: int = 1000
    image_size: int = 64
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0


def create_faces_model(recipe: FacesRecipe, num_attributes: int) -> SelfExplainer:
    """The recipe's ``se-multilabel`` model for ``num_attributes`` attributes on RGB input."""
    return create_model("se-multilabel", recipe.backbone, num_attributes, 3, {"stem_stride": recipe.stem_stride, "output_stride": recipe.output_stride},
                        reduction=recipe.se_reduction)  # fmt: skip


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


def _round(v: Any) -> Any:
    return round(v, 4) if isinstance(v, float) and math.isfinite(v) else v


def run_faces_demo(out_dir: str | Path, recipe: FacesRecipe | None = None, progress: bool = True,
                   log: Callable[[str], None] = print) -> dict[str, Any]:  # fmt: skip
    """Train the faces model, score it on the test split, write ``metrics.json`` and ``report.html``.

    ``out_dir/run`` holds the checkpoint. Returns the ``metrics.json`` document:
    ``{"attributes": {name: {"accuracy", "pointing_game", "pointing_game_15px", "iou", "present"}}, "mean", "recipe", "train_seconds"}``.
    """
    recipe = recipe or FacesRecipe()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = {
        split: SyntheticFaces(split, n, size=recipe.image_size, seed=recipe.seed)
        for split, n in (("train", recipe.train_size), ("val", recipe.val_size), ("test", recipe.test_size))
    }
    test = data["test"]
    cfg = TrainConfig(epochs=recipe.epochs, batch_size=recipe.batch_size, lr=recipe.lr, seed=recipe.seed)
    log(f"[faces] training se-multilabel on {recipe.backbone} for {recipe.epochs} epochs ({len(data['train'])} faces)")
    t0 = time.perf_counter()
    seed_all(recipe.seed)
    model = create_faces_model(recipe, test.num_classes)
    history = fit(model, data["train"], data["val"], cfg, out / "run", progress,
                  extra_config={"data": {"name": "synthetic-faces", "size": recipe.image_size,
                                         "attributes": test.class_names}})  # fmt: skip
    train_seconds = time.perf_counter() - t0
    model = model.cpu().eval()
    scores = evaluate_attributes(model, test)
    metrics = {
        "attributes": {k: {m: _round(v) for m, v in row.items()} for k, row in scores["attributes"].items()},
        "mean": {m: _round(v) for m, v in scores["mean"].items()},
        "recipe": asdict(recipe),
        "train_seconds": round(train_seconds, 1),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    mean = scores["mean"]
    log(f"[faces] test: mean accuracy {mean['accuracy']:.3f}, pointing game {mean['pointing_game']:.3f} "
        f"({mean['pointing_game_15px']:.3f} within 15 px at 224)")  # fmt: skip
    g = min(GALLERY_SIZE, len(test))
    x = torch.stack([test[i][0] for i in range(g)])
    with torch.no_grad():
        shown = model.explain(x)
    figure = png_data_uri(attribute_sheet(test.raw_images(slice(0, g)), shown.heatmap, test.attribute_masks(slice(0, g)),
                                          torch.sigmoid(shown.logits), test.labels[:g], test.class_names))  # fmt: skip
    table = {"dataset": "synthetic-faces (test split; pointing game and IoU on faces with the attribute)",
             "models": {**metrics["attributes"], "mean": metrics["mean"]}}  # fmt: skip
    caption = ("Per-attribute SE-CAM maps: each attribute's own map over the input; green outline: the attribute's "
               "mask (absent attributes have none); title: predicted probability (truth), red when wrong")  # fmt: skip
    write_report(out / "report.html", title="selfcam demo: synthetic faces, one map per attribute", metrics=table,
                 config=asdict(recipe), history={"se-multilabel": history}, figures=[(caption, figure)])  # fmt: skip
    return metrics
