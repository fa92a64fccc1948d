"""The self-contained HTML report page: metric tables, config, training curves, a CAM gallery, figures.

:func:`write_report` renders what it is given; :func:`selfcam.report.build_report` gathers it from
run, evaluation and demo directories. Every image is embedded as a base64 data URI, so the page
opens from disk with no network access. The page is rendered with jinja2 from
``templates/report.html.j2`` (next to this file) with autoescaping on.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import jinja2
import torch

from selfcam.errors import InputError

from .figures import training_curves
from .images import png_data_uri, tile

__all__ = ["Gallery", "write_report"]

TEMPLATES = Path(__file__).parent / "templates"
_MISSING = "–"


@dataclass
class Gallery:
    """Images, labels, per-method heatmaps and predictions for the report's gallery.

    images (G,C,H,W) in [0,1], C in {1,3}; labels (G,) int; maps: method -> (G,H,W) in [0,1];
    predictions: method -> (G,) int; boxes (G,4) x0,y0,x1,y1 (exclusive) or None.
    """

    images: torch.Tensor
    labels: torch.Tensor
    maps: dict[str, torch.Tensor]
    predictions: dict[str, torch.Tensor]
    boxes: torch.Tensor | None = None
    class_names: list[str] | None = None

    def check(self) -> None:
        """Raise ValueError (InputError) unless every tensor agrees on G and (H,W)."""
        if self.images.ndim != 4 or self.images.shape[1] not in (1, 3):
            raise InputError(f"gallery images must be (G,C,H,W), C in {{1,3}}, got {tuple(self.images.shape)}")
        g, _, h, w = self.images.shape
        shapes = {"labels": (self.labels, (g,))}
        if self.boxes is not None:
            shapes["boxes"] = (self.boxes, (g, 4))
        for name, m in self.maps.items():
            if name not in self.predictions:
                raise InputError(f"gallery has a map for method {name!r} but no predictions")
            shapes[f"maps[{name!r}]"] = (m, (g, h, w))
            shapes[f"predictions[{name!r}]"] = (self.predictions[name], (g,))
        for what, (t, want) in shapes.items():
            if tuple(t.shape) != want:
                raise InputError(f"gallery {what} has shape {tuple(t.shape)}, expected {want} "
                                 f"(G={g} images of size {h}x{w})")  # fmt: skip


def _gallery_groups(g: Gallery) -> list[tuple[str, list[list[dict]]]]:
    """The gallery's tiles, one row per image, grouped by true class (classes ascending, images in order)."""
    g.check()
    names = g.class_names or []

    def cls(i: int) -> str:
        return names[i] if 0 <= i < len(names) else str(i)

    groups: dict[int, list[list[dict]]] = {}
    for i in sorted(range(len(g.images)), key=lambda i: int(g.labels[i])):
        image = g.images[i]
        true = int(g.labels[i])
        box = None if g.boxes is None else g.boxes[i]
        row = [dict(src=png_data_uri(tile(image, box=box)), alt=f"image {i}, true class {cls(true)}",
                    caption=f"true: {cls(true)}", wrong=False)]  # fmt: skip
        for method, maps in g.maps.items():
            pred = int(g.predictions[method][i])
            row.append(dict(src=png_data_uri(tile(image, maps[i], box=box)),
                            alt=f"{method} heatmap for image {i}: pred {cls(pred)}, true {cls(true)}",
                            caption=f"pred: {cls(pred)} (true: {cls(true)})", wrong=pred != true))  # fmt: skip
        groups.setdefault(true, []).append(row)
    return [(cls(label), rows) for label, rows in groups.items()]


def _fmt(v: object) -> str:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        return _MISSING if v is None else str(v)
    if isinstance(v, numbers.Integral):
        return f"{int(v):,}"
    return _MISSING if math.isnan(v) else f"{float(v):.3f}"


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, str]]:
    return [kv for k, v in d.items() for kv in
            (_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", str(v))])]  # fmt: skip


def _table(rows: dict[str, dict]) -> dict:
    """``{name: {column: value}}`` -> ``{"columns": [...], "rows": [(name, [formatted values])]}``."""
    columns = list(dict.fromkeys(k for row in rows.values() for k in row))
    return {"columns": columns, "rows": [(name, [_fmt(row.get(c)) for c in columns]) for name, row in rows.items()]}


def write_report(path: str | Path, *, title: str, metrics: dict, gallery: Gallery | None = None,
                 config: dict | None = None, history: dict[str, list[dict]] | None = None,
                 figures: list[tuple[str, str]] | None = None,
                 tables: list[tuple[str, dict[str, dict]]] | None = None, notes: list[str] | None = None) -> Path:  # fmt: skip
    """Render the self-contained HTML report to ``path`` (atomically) and return the path.

    metrics: {"dataset": str, "models": {name: {metric: value}}}; config: key/value dict (nested
    dicts are flattened to dotted keys); history: model -> list of per-epoch dicts ("epoch",
    "train_loss", "val_acc", ...); figures: extra (caption, image data URI) pairs, shown in order
    after the gallery; tables: extra (title, {name: {column: value}}) tables after the metrics;
    notes: lines shown under the title. The gallery is grouped by true class.
    """
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True, trim_blocks=True,
                             lstrip_blocks=True)  # fmt: skip
    html = env.get_template("report.html.j2").render(
        title=title,
        generated=datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z"),
        dataset=metrics.get("dataset"),
        metrics=_table(metrics.get("models", {})),
        tables=[(caption, _table(rows)) for caption, rows in tables or [] if rows],
        notes=notes or [],
        config=_flatten(config or {}),
        curves=training_curves(history) if history else None,
        methods=list(gallery.maps) if gallery is not None else [],
        gallery=_gallery_groups(gallery) if gallery is not None else [],
        figures=figures or [],
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(html, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
