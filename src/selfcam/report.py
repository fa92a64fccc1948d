"""Self-contained HTML reports: metric table, config, training curves and a CAM gallery.

The page is one file with every image embedded as a base64 PNG data URI, so it opens
from disk with no network access. Figures are drawn with ``matplotlib.figure.Figure`` and
``FigureCanvasAgg`` (no pyplot state is touched); the page is rendered with jinja2 from
``templates/report.html.j2`` with autoescaping on.
"""

from __future__ import annotations

import base64
import io
import math
import numbers
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import jinja2
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

from selfcam.errors import InputError

__all__ = ["Gallery", "overlay", "png_data_uri", "write_report"]

_GREEN = np.array([0, 255, 0], dtype=np.uint8)
_MIN_TILE = 128  # tiles are upscaled (nearest) until their longer side is at least this
_MISSING = "–"


def _np(x: np.ndarray | torch.Tensor) -> np.ndarray:
    return x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float32)


def _rgb_float(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """(H,W), (C,H,W) or (H,W,C) with C in {1,3}, values in [0,1] -> float32 (H,W,3)."""
    img = _np(image)
    if img.ndim == 2:
        img = img[..., None]
    elif img.ndim == 3 and img.shape[0] in (1, 3):
        img = img.transpose(1, 2, 0)  # channels-first wins when ambiguous, e.g. (3,H,3)
    if img.ndim != 3 or img.shape[-1] not in (1, 3):
        raise InputError(f"image must be (H,W), (C,H,W) or (H,W,C) with C in {{1,3}}, got {tuple(img.shape)}")
    if img.size and (img.min() < -1e-4 or img.max() > 1 + 1e-4):
        raise InputError(f"image values must lie in [0,1], got [{img.min():.3g}, {img.max():.3g}]")
    return np.broadcast_to(np.clip(img, 0, 1), (*img.shape[:2], 3))


def overlay(image: np.ndarray | torch.Tensor, heatmap: np.ndarray | torch.Tensor, alpha: float = 0.5) -> np.ndarray:
    """Blend a jet-coloured heatmap over an image; returns uint8 (H,W,3).

    image: (H,W) grayscale or (C,H,W)/(H,W,C), C in {1,3}, values in [0,1].
    heatmap: (h,w) in [0,1]; resized bilinearly to (H,W) when sizes differ.
    Follows pytorch-grad-cam's ``show_cam_on_image`` (image_weight=alpha, default 0.5):
    ``cam = (1-alpha)*jet(uint8(255*heatmap)) + alpha*image``, then ``uint8(255*cam/cam.max())``.
    Uses matplotlib's "jet", which differs slightly from OpenCV's COLORMAP_JET, so pixels
    can differ from grad-cam's by a few levels.
    """
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"alpha must be in [0,1], got {alpha}")
    img = _rgb_float(image)
    heat = _np(heatmap)
    if heat.ndim != 2:
        raise InputError(f"heatmap must be (H,W), got shape {tuple(heat.shape)}")
    if heat.shape != img.shape[:2]:
        heat = F.interpolate(torch.from_numpy(heat)[None, None], size=img.shape[:2], mode="bilinear",
                             align_corners=False)[0, 0].numpy()
    index = (255 * np.clip(np.nan_to_num(heat), 0, 1)).astype(np.uint8)  # integer input indexes the 256-entry LUT
    cam = (1 - alpha) * colormaps["jet"](index)[..., :3] + alpha * img
    return (255 * cam / max(cam.max(), 1e-12)).astype(np.uint8)


def png_data_uri(rgb: np.ndarray) -> str:
    """uint8 (H,W,3) -> ``"data:image/png;base64,..."``."""
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise InputError(f"expected uint8 (H,W,3), got {rgb.dtype} {tuple(rgb.shape)}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


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
                                 f"(G={g} images of size {h}x{w})")


def _tile(rgb: np.ndarray, box: list[int] | None) -> str:
    """Draw the 1px green box (clipped) on a uint8 (H,W,3) tile, upscale (nearest), encode."""
    h, w = rgb.shape[:2]
    if box is not None:
        x0, y0, x1, y1 = max(box[0], 0), max(box[1], 0), min(box[2], w), min(box[3], h)
        if x0 < x1 and y0 < y1:
            rgb = rgb.copy()
            rgb[[y0, y1 - 1], x0:x1] = _GREEN
            rgb[y0:y1, [x0, x1 - 1]] = _GREEN
    k = max(1, math.ceil(_MIN_TILE / max(h, w, 1)))
    return png_data_uri(rgb.repeat(k, axis=0).repeat(k, axis=1))


def _gallery_rows(g: Gallery) -> list[list[dict]]:
    g.check()
    names = g.class_names or []

    def cls(i: int) -> str:
        return names[i] if 0 <= i < len(names) else str(i)

    rows = []
    for i, image in enumerate(g.images):
        true = int(g.labels[i])
        box = None if g.boxes is None else [int(v) for v in g.boxes[i]]
        row = [dict(src=_tile(np.round(255 * _rgb_float(image)).astype(np.uint8), box),
                    alt=f"image {i}, true class {cls(true)}", caption=f"true: {cls(true)}", wrong=False)]
        for method, maps in g.maps.items():
            pred = int(g.predictions[method][i])
            row.append(dict(src=_tile(overlay(image, maps[i]), box),
                            alt=f"{method} heatmap for image {i}: pred {cls(pred)}, true {cls(true)}",
                            caption=f"pred: {cls(pred)} (true: {cls(true)})", wrong=pred != true))
        rows.append(row)
    return rows


def _fmt(v: object) -> str:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        return _MISSING if v is None else str(v)
    if isinstance(v, numbers.Integral):
        return f"{int(v):,}"
    return _MISSING if math.isnan(v) else f"{float(v):.3f}"


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, str]]:
    return [kv for k, v in d.items() for kv in
            (_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", str(v))])]


def _curves(history: dict[str, list[dict]]) -> str | None:
    """One figure, two panels: train loss and validation accuracy per model, as a data URI."""
    fig = Figure(figsize=(10, 3.6), dpi=100, layout="constrained")
    canvas = FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for ax, key, label in zip(axes, ("train_loss", "val_acc"), ("train loss", "val accuracy")):
        for model, epochs in history.items():
            pts = [(e.get("epoch", j), e[key]) for j, e in enumerate(epochs) if e.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", markersize=3, label=model)
        ax.set(xlabel="epoch", ylabel=label, title=label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize="small")
    if not any(ax.has_data() for ax in axes):
        return None
    canvas.draw()
    return png_data_uri(np.asarray(canvas.buffer_rgba())[..., :3])


def write_report(path: str | Path, *, title: str, metrics: dict, gallery: Gallery | None = None,
                 config: dict | None = None, history: dict[str, list[dict]] | None = None,
                 figures: list[tuple[str, str]] | None = None) -> Path:
    """Render the self-contained HTML report to ``path`` (atomically) and return the path.

    metrics: {"dataset": str, "models": {name: {metric: value}}}; config: key/value dict;
    history: model -> list of per-epoch dicts ("epoch", "train_loss", "val_acc", ...);
    figures: extra (caption, image data URI) pairs, shown in order after the gallery.
    """
    models = metrics.get("models", {})
    columns = list(dict.fromkeys(k for row in models.values() for k in row))
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
                             autoescape=True, trim_blocks=True, lstrip_blocks=True)
    html = env.get_template("report.html.j2").render(
        title=title,
        generated=datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z"),
        dataset=metrics.get("dataset"),
        columns=columns,
        rows=[(name, [_fmt(row.get(c)) for c in columns]) for name, row in models.items()],
        config=_flatten(config or {}),
        curves=_curves(history) if history else None,
        methods=list(gallery.maps) if gallery is not None else [],
        gallery=_gallery_rows(gallery) if gallery is not None else [],
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
