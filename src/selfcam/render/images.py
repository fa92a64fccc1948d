"""Images from computed arrays: overlays, tiles, panels, per-attribute sheets, frame strips, GIFs.

Every function takes images already in [0, 1] and maps already in [0, 1] (arrays or tensors) and
returns uint8 ``(H, W, 3)`` RGB, or a ``data:`` URI for the encoders. Nothing here loads a model,
a dataset or a file. An image is ``(H, W)``, ``(C, H, W)`` or ``(H, W, C)`` with C in {1, 3}
(channels-first wins when ambiguous); a box is ``(x0, y0, x1, y1)`` with x1, y1 exclusive.
"""

from __future__ import annotations

import base64
import functools
import io
import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from selfcam.cells import resample
from selfcam.errors import InputError

__all__ = ["attribute_sheet", "clip_frames", "clip_gif", "draw_box", "frame_strip", "gif_bytes", "gif_data_uri", "importance_rows", "mask_outline", "overlay",
           "panel", "png_data_uri", "tile"]  # fmt: skip

Array = np.ndarray | torch.Tensor
Box = Sequence[int] | Array

GREEN = (0, 255, 0)
MIN_TILE = 128  # tiles are upscaled (nearest, integer factor) until their longer side is at least this
_GAP, _FONT_SIZE = 6, 13  # panel: gap between tiles, caption font size
_TEXT, _PAD = 14, 4  # attribute sheet: caption height, gap between tiles


def _np(x: Array) -> np.ndarray:
    return x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float32)


def _rgb_float(image: Array) -> np.ndarray:
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


@functools.cache
def _jet() -> np.ndarray:
    """OpenCV's COLORMAP_JET (what grad-cam colours maps with) as a ``(256, 3)`` uint8 RGB table."""
    import cv2  # installed with grad-cam

    return cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], cv2.COLORMAP_JET)[:, 0, ::-1].copy()


def overlay(image: Array, heatmap: Array, alpha: float = 0.5) -> np.ndarray:
    """Blend a jet-coloured heatmap over an image; returns uint8 (H,W,3).

    image: (H,W) grayscale or (C,H,W)/(H,W,C), C in {1,3}, values in [0,1].
    heatmap: (h,w) in [0,1]; resized bilinearly to (H,W) when sizes differ.
    Same pixels as pytorch-grad-cam's ``show_cam_on_image(image, heatmap, use_rgb=True,
    image_weight=alpha)``: ``cam = (1-alpha)*jet(uint8(255*heatmap))/255 + alpha*image`` in float32
    with OpenCV's COLORMAP_JET (RGB order), then ``uint8(255*(cam/cam.max()))``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"alpha must be in [0,1], got {alpha}")
    img = _rgb_float(image)
    heat = _np(heatmap)
    if heat.ndim != 2:
        raise InputError(f"heatmap must be (H,W), got shape {tuple(heat.shape)}")
    if heat.shape != img.shape[:2]:
        # the resampling of selfcam.heads.upsample without a cell grid (maps explain() returns are at image size already)
        heat = resample(torch.from_numpy(np.ascontiguousarray(heat)), img.shape[:2]).numpy()
    index = (255 * np.clip(np.nan_to_num(heat), 0, 1)).astype(np.uint8)
    cam = (1 - alpha) * (_jet()[index].astype(np.float32) / 255) + alpha * img
    cam = cam / max(cam.max(), np.float32(1e-12))
    return (255 * cam).astype(np.uint8)


def draw_box(rgb: np.ndarray, box: Box | None, colour: tuple[int, int, int] = GREEN) -> np.ndarray:
    """A copy of uint8 ``(H, W, 3)`` with a 1 px box outline, clipped to the image; ``None``: no box."""
    rgb = np.array(rgb, copy=True)
    if box is not None:
        h, w = rgb.shape[:2]
        x0, y0, x1, y1 = (int(v) for v in box)
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        if x0 < x1 and y0 < y1:
            rgb[[y0, y1 - 1], x0:x1] = colour
            rgb[y0:y1, [x0, x1 - 1]] = colour
    return rgb


def mask_outline(mask: Array) -> np.ndarray:
    """Border pixels of a mask ``(H, W)`` -> bool ``(H, W)``: in the mask with a 4-neighbour outside it (or the edge)."""
    mask = _np(mask) > 0.5 if not (isinstance(mask, np.ndarray) and mask.dtype == bool) else mask
    if mask.ndim != 2:
        raise InputError(f"mask must be (H,W), got shape {tuple(mask.shape)}")
    padded = np.pad(mask, 1)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def _scale(h: int, w: int, at_least: int = MIN_TILE) -> int:
    """The smallest integer factor (>= 1) that makes the longer side at least ``at_least``."""
    return max(1, math.ceil(at_least / max(h, w, 1)))


def tile(image: Array, heatmap: Array | None = None, *, box: Box | None = None, mask: Array | None = None,
         alpha: float = 0.5, scale: int | None = None) -> np.ndarray:  # fmt: skip
    """One tile: the image (or, with ``heatmap``, its :func:`overlay`), ``mask``'s outline and ``box`` in green,
    upscaled (nearest) by ``scale`` (default: until the longer side is at least 128 px).

    image (H,W) / (C,H,W) / (H,W,C) in [0,1]; heatmap (h,w) in [0,1]; mask (H,W) bool -> uint8 (sH, sW, 3).
    """
    rgb = np.round(255 * _rgb_float(image)).astype(np.uint8) if heatmap is None else overlay(image, heatmap, alpha)
    if mask is not None:
        rgb[mask_outline(mask)] = GREEN
    rgb = draw_box(rgb, box)
    k = _scale(*rgb.shape[:2]) if scale is None else scale
    return rgb.repeat(k, axis=0).repeat(k, axis=1)


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def png_data_uri(rgb: np.ndarray) -> str:
    """uint8 (H,W,3) -> ``"data:image/png;base64,..."``."""
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise InputError(f"expected uint8 (H,W,3), got {rgb.dtype} {tuple(rgb.shape)}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="PNG")
    return _data_uri(buf.getvalue(), "image/png")


def gif_data_uri(frames: Sequence[np.ndarray], duration_ms: int, loop: int = 0) -> str:
    """:func:`gif_bytes` as ``"data:image/gif;base64,..."``."""
    return _data_uri(gif_bytes(frames, duration_ms, loop), "image/gif")


def gif_bytes(frames: Sequence[np.ndarray], duration_ms: int, loop: int = 0) -> bytes:
    """An animated GIF file of uint8 (H,W,3) frames, all one size, ``duration_ms`` each (``loop`` 0: for ever)."""
    if not len(frames):
        raise InputError("a GIF needs at least one frame")
    shapes = sorted({(str(np.asarray(f).dtype), *np.shape(f)) for f in frames})
    if len(shapes) != 1 or shapes[0][0] != "uint8" or len(shapes[0]) != 4 or shapes[0][-1] != 3:
        raise InputError(f"GIF frames must be uint8 (H,W,3), all of one size; got (dtype, *shape) {shapes}")
    pics = [Image.fromarray(np.ascontiguousarray(f)) for f in frames]
    buf = io.BytesIO()
    pics[0].save(buf, format="GIF", save_all=True, append_images=pics[1:], duration=duration_ms, loop=loop)
    return buf.getvalue()


def _font(size: int = _FONT_SIZE) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def panel(image: Array, maps: dict[str, Array], caption: str, alpha: float = 0.5) -> np.ndarray:
    """One row: the input, then each map overlaid on it (jet, as grad-cam's ``show_cam_on_image``).

    image ``(C, H, W)`` in [0, 1], C in {1, 3}; maps: label -> ``(H, W)`` in [0, 1]; ``alpha`` is
    the image's weight in the blend. Tiles are upscaled (nearest) to at least 128 px; a label
    sits above each tile and ``caption`` above the row. Returns uint8 ``(H', W', 3)``.
    """
    tiles = [("input", tile(image))] + [(label, tile(image, m, alpha=alpha)) for label, m in maps.items()]
    th, tw = tiles[0][1].shape[:2]
    font = _font()
    line = _FONT_SIZE + 6
    width = max(len(tiles) * (tw + _GAP) + _GAP, int(font.getlength(caption)) + 2 * _GAP)
    sheet = Image.new("RGB", (width, 2 * line + th + _GAP), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((_GAP, 3), caption, fill="black", font=font)
    for j, (label, t) in enumerate(tiles):
        x = _GAP + j * (tw + _GAP)
        draw.text((x, line + 2), label, fill="black", font=font)
        sheet.paste(Image.fromarray(t), (x, 2 * line))
    return np.asarray(sheet)


def attribute_sheet(images: Array, maps: Array, masks: Array, probs: Array, attrs: Array, names: Sequence[str]) -> np.ndarray:
    """A row per image: the input, then each attribute's map over it; uint8 ``(H', W', 3)``.

    ``images (G, C, H, W)`` in [0, 1], ``maps (G, A, H, W)`` in [0, 1], ``masks (G, A, H, W)`` bool,
    ``probs`` (predicted probabilities) and ``attrs`` (truth, > 0.5: present) ``(G, A)``, ``names``: A
    attribute names. Green outline: the attribute's mask; under each map: ``p=PROB (yes|no)``, red when wrong.
    """
    g, a = tuple(probs.shape) if len(probs.shape) == 2 else (-1, -1)
    h, w = images.shape[-2:]
    if (len(images.shape) != 4 or images.shape[0] != g or tuple(maps.shape) != (g, a, h, w)
            or tuple(masks.shape) != (g, a, h, w) or tuple(attrs.shape) != (g, a) or len(names) != a):  # fmt: skip
        raise InputError(f"attribute sheet: expected images (G,C,H,W), maps and masks (G,A,H,W), probs and attrs (G,A) "
                         f"and A names; got images {tuple(images.shape)}, maps {tuple(maps.shape)}, masks "
                         f"{tuple(masks.shape)}, probs {tuple(probs.shape)}, attrs {tuple(attrs.shape)}, {len(names)} names")  # fmt: skip
    k = _scale(h, w)
    th, tw = h * k, w * k
    sheet = Image.new("RGB", ((tw + _PAD) * (a + 1), _TEXT + (th + _TEXT + _PAD) * g), "white")
    draw = ImageDraw.Draw(sheet)
    for j, name in enumerate(["input", *names]):
        draw.text(((tw + _PAD) * j + 2, 2), name[:20], fill="black")
    for i in range(g):
        top = _TEXT + (th + _TEXT + _PAD) * i
        tiles = [tile(images[i], scale=k)]
        for j in range(a):
            tiles.append(tile(images[i], maps[i, j], mask=masks[i, j], scale=k))
            truth, p = bool(attrs[i, j] > 0.5), float(probs[i, j])
            draw.text(((tw + _PAD) * (j + 1) + 2, top + th + 1), f"p={p:.2f} ({'yes' if truth else 'no'})",
                      fill="red" if (p > 0.5) != truth else "black")  # fmt: skip
        for j, t in enumerate(tiles):
            sheet.paste(Image.fromarray(t), ((tw + _PAD) * j, top))
    return np.asarray(sheet)


def _check_clip(frames: Array, maps: Array, boxes: Array | None) -> None:
    t = len(frames) if len(frames.shape) == 4 else -1
    if t < 1 or len(maps.shape) != 3 or len(maps) != t or (boxes is not None and tuple(boxes.shape) != (t, 4)):
        raise InputError(f"a clip needs frames (T,C,H,W), maps (T,h,w) and boxes (T,4) or None with one T; got frames "
                         f"{tuple(frames.shape)}, maps {tuple(maps.shape)}, boxes {None if boxes is None else tuple(boxes.shape)}")  # fmt: skip


def frame_strip(frames: Array, maps: Array, boxes: Array | None = None, scale: int | None = None) -> np.ndarray:
    """The frames (top row) over their maps' overlays (bottom row), one column per frame, boxes in green.

    frames ``(T, C, H, W)`` in [0, 1], C in {1, 3}; maps ``(T, h, w)`` in [0, 1]; boxes ``(T, 4)`` or None.
    Each tile has a 1 px white border; the whole is upscaled by ``scale`` (default: the smallest
    integer >= 2 that makes a frame at least 128 px). Returns uint8 ``(2 s (H + 2), s T (W + 2), 3)``.
    """
    _check_clip(frames, maps, boxes)
    s = max(2, _scale(*frames.shape[-2:])) if scale is None else scale
    rows = []
    for heat in (False, True):
        tiles = [tile(frames[t], maps[t] if heat else None, box=None if boxes is None else boxes[t], scale=1)
                 for t in range(len(frames))]  # fmt: skip
        rows.append(np.concatenate([np.pad(x, ((1, 1), (1, 1), (0, 0)), constant_values=255) for x in tiles], 1))
    return np.concatenate(rows, 0).repeat(s, 0).repeat(s, 1)


def clip_frames(frames: Array, maps: Array, boxes: Array | None = None, scale: int = 3) -> list[np.ndarray]:
    """One picture per frame of a clip: the frame | its map's overlay, boxes in green, upscaled by ``scale``.

    frames ``(T, C, H, W)`` in [0, 1], C in {1, 3}; maps ``(T, h, w)`` in [0, 1]; boxes ``(T, 4)`` or None
    -> T uint8 arrays ``(s H, 2 s W, 3)`` (the frames of :func:`gif_bytes`).
    """
    _check_clip(frames, maps, boxes)
    pics = []
    for t in range(len(frames)):
        box = None if boxes is None else boxes[t]
        pics.append(np.concatenate([tile(frames[t], box=box, scale=scale),
                                    tile(frames[t], maps[t], box=box, scale=scale)], 1))  # fmt: skip
    return pics


def clip_gif(frames: Array, maps: Array, boxes: Array | None = None, *, fps: float = 25, slowdown: float = 4,
             scale: int = 3) -> str:  # fmt: skip
    """:func:`clip_frames` as an animated GIF, shown ``slowdown`` times slower than ``fps``:
    ``"data:image/gif;base64,..."`` of T frames."""
    return gif_data_uri(clip_frames(frames, maps, boxes, scale), int(1000 * slowdown / fps))


def importance_rows(values: dict[str, float], width: int) -> np.ndarray:
    """One horizontal bar per entry (``name value`` then a bar of ``value`` x the free width), for values
    in [0, 1] such as an ASD clip's modality importance; uint8 ``(rows * (font + 8), width, 3)``."""
    font, line = _font(), _FONT_SIZE + 8
    sheet = Image.new("RGB", (width, line * len(values)), "white")
    draw = ImageDraw.Draw(sheet)
    label_w = max((int(font.getlength(f"{k} 0.000")) for k in values), default=0) + 2 * _GAP
    for i, (name, v) in enumerate(values.items()):
        if not math.isfinite(v) or not 0.0 <= v <= 1.0:
            raise InputError(f"importance bar {name}: expected a value in [0, 1], got {v}")
        top = i * line
        draw.text((_GAP, top + 3), f"{name} {v:.3f}", fill="black", font=font)
        draw.rectangle((label_w, top + 4, label_w + int(v * max(0, width - label_w - _GAP)), top + line - 4), fill=(70, 110, 200))
    return np.asarray(sheet)
