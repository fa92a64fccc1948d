"""selfcam.render: the drawing functions on small hand-made inputs (no model, no data set)."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

from selfcam.errors import InputError
from selfcam.render import (attribute_sheet, clip_gif, draw_box, frame_strip, gif_data_uri, importance_bars, line_panels,
                            mask_outline, matrices, overlay, panel, png_data_uri, tile, training_curves)  # fmt: skip
from selfcam.render.images import _jet

GREEN = [0, 255, 0]


def _bytes(uri: str, mime: str) -> bytes:
    prefix = f"data:{mime};base64,"
    assert uri.startswith(prefix)
    return base64.b64decode(uri[len(prefix):])


def _png(uri: str) -> np.ndarray:
    with Image.open(io.BytesIO(_bytes(uri, "image/png"))) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def _gif_frames(uri: str) -> tuple[list[np.ndarray], list[int]]:
    frames, durations = [], []
    with Image.open(io.BytesIO(_bytes(uri, "image/gif"))) as im:
        assert im.format == "GIF"
        for k in range(im.n_frames):
            im.seek(k)
            frames.append(np.asarray(im.convert("RGB")))
            durations.append(im.info["duration"])
    return frames, durations


def _clip(t: int = 5, c: int = 3, h: int = 10, w: int = 12, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(t, c, h, w, generator=gen), torch.rand(t, h, w, generator=gen)


# --- overlay, tiles, boxes, outlines ----------------------------------------------------------------


def test_overlay_colours_the_maps_max_red_and_its_min_blue() -> None:
    heat = np.zeros((8, 8), np.float32)
    heat[2, 3] = 1.0
    out = overlay(np.zeros((8, 8)), heat, alpha=0.0)  # the colour map alone (then scaled so its max is 255)
    assert out.dtype == np.uint8 and out.shape == (8, 8, 3)
    hot, cold = out[2, 3].astype(int), out[0, 0].astype(int)
    assert hot[0] > 100 and hot[0] > hot[2] + 100  # jet's top is dark red
    assert cold[2] > 100 and cold[2] > cold[0] + 100  # jet's bottom is dark blue
    jet = _jet()
    scale = 255 / jet[[0, 255]].max()
    assert np.abs(out[2, 3] - jet[255] * scale).max() <= 1 and np.abs(out[0, 0] - jet[0] * scale).max() <= 1


def test_overlay_alpha_one_is_the_image_and_bad_inputs_are_named() -> None:
    img = np.full((4, 4, 3), 0.5, np.float32)
    assert np.array_equal(overlay(img, np.random.default_rng(0).random((4, 4)), alpha=1.0), np.full((4, 4, 3), 255))
    with pytest.raises(InputError, match=r"heatmap must be \(H,W\), got shape \(1, 4, 4\)"):
        overlay(img, np.zeros((1, 4, 4)))
    with pytest.raises(InputError, match=r"image must be .* got \(4, 4, 2\)"):
        overlay(np.zeros((4, 4, 2)), np.zeros((4, 4)))
    with pytest.raises(InputError, match=r"alpha must be in \[0,1\]"):
        overlay(img, np.zeros((4, 4)), alpha=1.5)


def test_tile_upscales_to_128_and_draws_the_box_before_upscaling() -> None:
    image = torch.rand(1, 16, 20)
    t = tile(image, box=(2, 3, 8, 9))
    assert t.dtype == np.uint8 and t.shape == (16 * 7, 20 * 7, 3)  # ceil(128 / 20) = 7
    small = t[::7, ::7]
    assert (small[3, 2:8] == GREEN).all() and (small[8, 2:8] == GREEN).all()  # rows y0 and y1 - 1
    assert (small[3:9, 2] == GREEN).all() and (small[3:9, 7] == GREEN).all()  # columns x0 and x1 - 1
    gray = np.round(255 * image[0].numpy()).astype(np.uint8)
    assert np.array_equal(small[5, 4], [gray[5, 4]] * 3)  # inside the box: the image, gray to RGB
    assert tile(np.zeros((200, 50)), scale=None).shape == (200, 50, 3)  # already at least 128 px
    assert tile(np.zeros((4, 4)), np.ones((2, 2)), scale=3).shape == (12, 12, 3)


def test_draw_box_clips_to_the_image_and_leaves_its_input_alone() -> None:
    rgb = np.zeros((6, 6, 3), np.uint8)
    out = draw_box(rgb, (-3, 2, 10, 4))
    assert not rgb.any()
    assert (out[2] == GREEN).all() and (out[3] == GREEN).all()  # rows 2 and 3 (y1 - 1), across the whole width
    assert (out[2:4, [0, 5]] == GREEN).all() and not out[[0, 1, 4, 5]].any()
    assert np.array_equal(draw_box(rgb, None), rgb) and np.array_equal(draw_box(rgb, (7, 7, 9, 9)), rgb)


def test_mask_outline_is_the_border_of_the_mask() -> None:
    mask = np.zeros((7, 7), bool)
    mask[1:6, 2:5] = True
    edge = mask_outline(torch.from_numpy(mask))
    assert edge.dtype == bool and edge.sum() == 2 * 3 + 2 * 3  # 5 x 3 block: all but its 3 x 1 inside
    assert not edge[2:5, 3].any() and edge[1, 2:5].all() and edge[5, 2:5].all()
    full = mask_outline(np.ones((3, 3), bool))
    assert full.sum() == 8 and not full[1, 1]  # the image's edge counts as outside
    with pytest.raises(InputError, match=r"mask must be \(H,W\)"):
        mask_outline(np.ones((1, 3, 3), bool))


# --- encoders -------------------------------------------------------------------------------------


def test_png_data_uri_round_trips_and_refuses_floats() -> None:
    rgb = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    assert np.array_equal(_png(png_data_uri(rgb)), rgb)
    with pytest.raises(InputError, match=r"expected uint8 \(H,W,3\), got float64 \(5, 7, 3\)"):
        png_data_uri(rgb / 255)


def test_gif_data_uri_has_every_frame_and_refuses_mixed_sizes() -> None:
    frames = [np.full((4, 6, 3), v, np.uint8) for v in (0, 128, 255)]
    got, durations = _gif_frames(gif_data_uri(frames, 70))
    assert len(got) == 3 and durations == [70] * 3 and [int(f.mean()) for f in got] == [0, 128, 255]
    with pytest.raises(InputError, match="all of one size"):
        gif_data_uri([frames[0], np.zeros((5, 6, 3), np.uint8)], 70)
    with pytest.raises(InputError, match="at least one frame"):
        gif_data_uri([], 70)


# --- clips: the frame strip and the GIF -----------------------------------------------------------


def test_frame_strip_size_layout_and_boxes() -> None:
    frames, maps = _clip(t=5, c=3, h=10, w=12)
    boxes = torch.tensor([[1, 2, 6, 8]] * 5)
    strip = frame_strip(frames, maps, boxes, scale=2)
    assert strip.dtype == np.uint8 and strip.shape == (2 * (10 + 2) * 2, 5 * (12 + 2) * 2, 3)
    s = strip[::2, ::2]  # one pixel per source pixel: 1 px white border around every tile
    assert (s[0] == 255).all() and (s[11] == 255).all() and (s[:, 0] == 255).all()
    frame3 = s[1:11, 3 * 14 + 1 : 3 * 14 + 13]
    want = np.round(255 * frames[3].permute(1, 2, 0).numpy()).astype(np.uint8)
    assert (frame3[2, 1:6] == GREEN).all() and np.array_equal(frame3[4, 3], want[4, 3])
    over3 = s[13:23, 3 * 14 + 1 : 3 * 14 + 13]
    assert np.array_equal(over3[4, 3], overlay(frames[3], maps[3])[4, 3]) and (over3[7, 1:6] == GREEN).all()
    assert frame_strip(frames, maps).shape == (2 * 12 * 11, 5 * 14 * 11, 3)  # default scale: ceil(128 / 12) = 11


def test_frame_strip_of_gray_frames_equals_the_rgb_strip() -> None:
    frames, maps = _clip(t=3, c=1)
    assert np.array_equal(frame_strip(frames, maps, scale=1), frame_strip(frames.expand(-1, 3, -1, -1), maps, scale=1))
    assert frame_strip(frames[:, :, :4, :4], maps, scale=1).shape == (12, 18, 3)  # maps are resized to the frames


def test_frame_strip_and_gif_name_wrong_shapes() -> None:
    frames, maps = _clip(t=4)
    with pytest.raises(InputError, match=r"frames \(T,C,H,W\).*got frames \(4, 3, 10, 12\), maps \(3, 10, 12\)"):
        frame_strip(frames, maps[:3])
    with pytest.raises(InputError, match=r"boxes \(4, 2\)"):
        frame_strip(frames, maps, torch.zeros(4, 2))
    with pytest.raises(InputError, match=r"got frames \(3, 10, 12\)"):
        clip_gif(frames[0], maps)


def test_clip_gif_has_one_frame_per_frame_at_the_slowed_rate() -> None:
    frames, maps = _clip(t=6, h=8, w=9)
    boxes = torch.tensor([[0, 0, 4, 4]] * 6)
    got, durations = _gif_frames(clip_gif(frames, maps, boxes, fps=25, scale=3))
    assert len(got) == 6 and durations == [160] * 6  # 4x slower than 25 fps
    assert all(f.shape == (8 * 3, 2 * 9 * 3, 3) for f in got)  # frame | overlay, upscaled 3x
    assert _gif_frames(clip_gif(frames, maps, fps=10, slowdown=1))[1] == [100] * 6


# --- panel and attribute sheet --------------------------------------------------------------------


def test_panel_size_and_tiles() -> None:
    gen = torch.Generator().manual_seed(3)
    image = torch.rand(3, 32, 32, generator=gen)
    maps = {"self": torch.rand(32, 32, generator=gen), "gradcam": torch.rand(8, 8, generator=gen)}
    row = panel(image, maps, "x")
    assert row.dtype == np.uint8 and row.shape == (2 * 19 + 128 + 6, 3 * (128 + 6) + 6, 3)
    assert np.array_equal(row[2 * 19 : 2 * 19 + 128, 6 : 6 + 128], tile(image))
    assert np.array_equal(row[2 * 19 : 2 * 19 + 128, 6 + 134 : 6 + 134 + 128], tile(image, maps["self"]))
    assert panel(image, {}, "a much longer caption than one tile is wide, so the row grows").shape[1] > 134 + 6
    with pytest.raises(InputError, match="image must be"):
        panel(torch.rand(2, 32, 32), maps, "x")


def test_attribute_sheet_layout_outline_and_shape_errors() -> None:
    gen = torch.Generator().manual_seed(4)
    g, a, h, w = 2, 3, 16, 16
    images, maps = torch.rand(g, 3, h, w, generator=gen), torch.rand(g, a, h, w, generator=gen)
    masks = torch.zeros(g, a, h, w, dtype=torch.bool)
    masks[1, 2, 4:9, 5:12] = True
    probs, attrs = torch.tensor([[0.9, 0.2, 0.6], [0.1, 0.8, 0.7]]), torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    sheet = attribute_sheet(images, maps, masks, probs, attrs, ["beard", "hat", "glasses"])
    k = 8  # 16 px tiles upscaled to 128
    assert sheet.dtype == np.uint8 and sheet.shape == (14 + (128 + 14 + 4) * g, (128 + 4) * (a + 1), 3)
    top = 14 + 128 + 14 + 4  # the second image's row
    cell = sheet[top : top + 128, 3 * 132 : 3 * 132 + 128][::k, ::k]  # its last attribute's map
    assert (cell[4, 5:12] == GREEN).all() and (cell[8, 5:12] == GREEN).all() and (cell[6, 7] != GREEN).any()
    assert np.array_equal(cell, overlay(images[1], maps[1, 2]) * ~mask_outline(masks[1, 2])[..., None]
                          + np.array(GREEN, np.uint8) * mask_outline(masks[1, 2])[..., None])  # fmt: skip
    red = (sheet[..., 0] > 200) & (sheet[..., 1] < 60) & (sheet[..., 2] < 60)
    assert red[14 + 128 : 14 + 128 + 14, 3 * 132 :].any()  # p=0.60 said yes where the truth is no: red
    assert not red[14 + 128 : 14 + 128 + 14, : 3 * 132].any()
    with pytest.raises(InputError, match=r"attribute sheet: .*maps \(2, 2, 16, 16\)"):
        attribute_sheet(images, maps[:, :2], masks, probs, attrs, ["beard", "hat", "glasses"])
    with pytest.raises(InputError, match="2 names"):
        attribute_sheet(images, maps, masks, probs, attrs, ["beard", "hat"])


# --- figures --------------------------------------------------------------------------------------


def test_figures_are_png_data_uris_of_the_expected_size() -> None:
    history = {"a": [{"epoch": e, "train_loss": 1 / (e + 1), "val_acc": 0.2 * e} for e in range(3)]}
    assert _png(training_curves(history)).shape == (360, 1000, 3)
    assert training_curves({"a": [{"epoch": 0}]}) is None  # nothing to plot
    lines = _png(line_panels([("t", "x", "y", {"l": [0.1, 0.5]}), ("u", "x", "y", {"m": [1, 2, 3]})], x=[0, 1]))
    assert lines.shape == (360, 1000, 3)
    assert _png(matrices({"m": [[1, 0.5], [0.5, 1]]}, ["r1", "r2"], "IOU")).shape == (320, 350, 3)  # max(3.5, 3.2) x max(3.2, 3) in
    imp = {"speaking": {"audio": 0.6, "face": 0.4}, "not_speaking": {"audio": 0.3, "face": 0.5}}
    bars = _png(importance_bars({"modality_importance": imp, "silence_check": {"silent_modality_importance": imp}}))
    assert bars.shape == (340, 700, 3) and (bars < 250).any()
    with pytest.raises(KeyError, match="silence_check"):
        importance_bars({"modality_importance": imp})


def test_render_reads_nothing_and_the_report_draws_nothing() -> None:
    """render/ loads no model, data or file (the template aside); selfcam.report has no drawing code."""
    from pathlib import Path

    import selfcam.render as render
    import selfcam.report as report

    for path in Path(render.__file__).parent.glob("*.py"):
        text = path.read_text()
        assert not re.search(r"matplotlib\.pyplot|import pyplot|torch\.load|checkpoint|load_dataset|\bopen\(|read_text|Image\.open", text), path.name
    text = Path(report.__file__).read_text()
    assert not re.search(r"^\s*(import|from)\s+(PIL|matplotlib|cv2|jinja2)\b", text, re.M)
    assert not re.search(r"ImageDraw|\bFigure\(|applyColorMap|\.repeat\(|np\.pad|b64encode", text)
