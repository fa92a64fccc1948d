from __future__ import annotations

import base64
import io
from html.parser import HTMLParser

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from selfcam.report import Gallery, overlay, png_data_uri, write_report

PREFIX = "data:image/png;base64,"


class _Imgs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[dict[str, str | None]] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.imgs.append(dict(attrs))


def _imgs(html: str) -> list[dict[str, str | None]]:
    p = _Imgs()
    p.feed(html)
    p.close()
    return p.imgs


def _decode(src: str) -> np.ndarray:
    assert src.startswith(PREFIX)
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src[len(PREFIX):]))).convert("RGB"))


def _gallery(g: int = 16, methods=("cam", "gradcam", "lfi"), size: int = 8) -> Gallery:
    gen = torch.Generator().manual_seed(0)
    return Gallery(
        images=torch.rand(g, 3, size, size, generator=gen),
        labels=torch.arange(g) % 4,
        maps={m: torch.rand(g, size, size, generator=gen) for m in methods},
        predictions={m: (torch.arange(g) + k) % 4 for k, m in enumerate(methods)},
        boxes=torch.tensor([[1, 1, 6, 7]] * g),
        class_names=["cat", "dog", "bird", "fish"],
    )


METRICS = {"dataset": "toy", "models": {
    "lfi": {"accuracy": 0.91234, "pointing_game": 0.5, "iou": 0.25, "map_ms_per_image": 1.5, "params": 1234567},
    "abn": {"accuracy": 0.8, "params": 42},
}}
HISTORY = {m: [{"epoch": e, "train_loss": 1.0 / (e + 1), "train_acc": 0.5, "val_acc": 0.1 * e} for e in range(3)]
           for m in ("lfi", "abn")}


def test_overlay_zero_heatmap_matches_hand_computation():
    assert matplotlib.colormaps["jet"](0)[:3] == (0.0, 0.0, 0.5)  # jet at 0 is half-intensity blue
    out = overlay(np.full((4, 5), 0.4), np.zeros((4, 5)))
    assert out.dtype == np.uint8 and out.shape == (4, 5, 3)
    # cam = 0.5*(0,0,0.5) + 0.5*0.4 = (0.2,0.2,0.45); /max -> (0.444,0.444,1) -> floor(255*x)
    assert (out == np.array([113, 113, 255], np.uint8)).all()


def test_overlay_layouts_and_resize():
    img = torch.rand(3, 6, 6)
    heat = torch.rand(3, 3)
    a = overlay(img, heat, alpha=0.3)
    b = overlay(img.permute(1, 2, 0).numpy(), heat.numpy(), alpha=0.3)
    assert a.shape == (6, 6, 3) and np.array_equal(a, b)
    assert overlay(torch.rand(1, 6, 6), torch.rand(6, 6)).shape == (6, 6, 3)
    with pytest.raises(ValueError):
        overlay(torch.rand(6, 6) * 255, torch.rand(6, 6))


def test_png_data_uri_round_trip():
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    assert np.array_equal(_decode(png_data_uri(rgb)), rgb)


@pytest.mark.parametrize("history", [None, HISTORY])
def test_write_report_self_contained(tmp_path, history):
    out = write_report(tmp_path / "sub" / "report.html", title="Toy <run>", metrics=METRICS, gallery=_gallery(),
                       config={"lr": 0.0003, "model": {"name": "lfi"}}, history=history)
    assert out.exists() and [p.name for p in out.parent.iterdir()] == ["report.html"]
    html = out.read_text(encoding="utf-8")
    assert "http://" not in html and "https://" not in html
    imgs = _imgs(html)
    assert len(imgs) == 16 * (1 + 3) + (history is not None)
    assert sum("curves" in (i.get("class") or "") for i in imgs) == (history is not None)
    for img in imgs:
        assert img.get("alt")
        assert _decode(img["src"]).size > 0
    for text in ("0.912", "0.500", "1,234,567", "42", "–", "toy", "0.0003", "model.name",
                 "pred: dog (true: cat)", "Toy &lt;run&gt;"):
        assert text in html
    assert "Toy <run>" not in html


def test_gallery_tile_draws_clipped_green_box(tmp_path):
    g = _gallery(g=1, methods=("cam",))
    g.images = torch.zeros(1, 1, 8, 8)
    g.boxes = torch.tensor([[2, 3, 20, 6]])  # x1 beyond the image: clipped to column 7
    html = write_report(tmp_path / "r.html", title="t", metrics={}, gallery=g).read_text()
    tile = _decode(_imgs(html)[0]["src"])
    k = tile.shape[0] // 8
    assert tile.shape == (8 * k, 8 * k, 3) and 8 * k >= 128
    green, black = [0, 255, 0], [0, 0, 0]
    assert (tile[3 * k, 2 * k] == green).all() and (tile[5 * k, 7 * k] == green).all()
    assert (tile[4 * k, 4 * k] == black).all() and (tile[0, 0] == black).all()


@pytest.mark.parametrize("break_it", [
    lambda g: setattr(g, "labels", g.labels[:15]),
    lambda g: g.maps.__setitem__("cam", g.maps["cam"][:, :4, :4]),
    lambda g: g.predictions.__setitem__("lfi", g.predictions["lfi"][:3]),
    lambda g: g.predictions.pop("gradcam"),
    lambda g: setattr(g, "boxes", g.boxes[:, :3]),
])
def test_inconsistent_gallery_raises(tmp_path, break_it):
    g = _gallery()
    break_it(g)
    with pytest.raises(ValueError):
        write_report(tmp_path / "r.html", title="t", metrics=METRICS, gallery=g)
    assert not any(tmp_path.iterdir())
