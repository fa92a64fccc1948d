"""Tests of the cluttered-digits dataset (selfcam.data)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from selfcam.data import MEAN, STD, ClutteredDigits, box_mask, load_dataset, source_indices
from selfcam.data.digits import _paste
from selfcam.errors import DataError


@pytest.fixture(scope="module")
def ds() -> ClutteredDigits:
    return ClutteredDigits("train", 200, seed=1)


def test_shapes_dtypes_ranges(ds: ClutteredDigits) -> None:
    assert ds.images.shape == (200, 1, 64, 64) and ds.images.dtype == torch.float32
    assert ds.images.min() >= 0 and ds.images.max() <= 1
    assert ds.labels.shape == (200,) and ds.labels.dtype == torch.int64
    assert ds.labels.min() >= 0 and ds.labels.max() <= 9 and len(ds.labels.unique()) == 10
    assert ds.boxes.shape == (200, 4) and ds.boxes.dtype == torch.int64
    x0, y0, x1, y1 = ds.boxes.T
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= 64).all() and (y1 <= 64).all()
    assert ((x1 - x0) >= 4).all() and ((y1 - y0) >= 10).all() and ((y1 - y0) <= 32).all()
    assert len(ds) == 200 and ds.num_classes == 10 and ds.in_chans == 1
    assert ds.class_names == [str(d) for d in range(10)]
    image, label, box = ds[3]
    assert image.shape == (1, 64, 64) and label.shape == () and box.shape == (4,)
    torch.testing.assert_close(image, (ds.images[3] - MEAN) / STD)
    assert torch.equal(box, ds.boxes[3]) and torch.equal(label, ds.labels[3])


def test_other_sizes() -> None:
    small = ClutteredDigits("val", 5, size=32, digit_size=(10, 12))
    assert small.images.shape == (5, 1, 32, 32)
    assert ((small.boxes[:, 3] - small.boxes[:, 1]) <= 12).all()


def test_normalized_train_stats(ds: ClutteredDigits) -> None:
    x = ds.normalize(ds.images)
    assert abs(x.mean().item()) < 0.1 and abs(x.std().item() - 1) < 0.1


def test_determinism() -> None:
    a, b = ClutteredDigits("test", 50, seed=7), ClutteredDigits("test", 50, seed=7)
    for name in ("images", "labels", "boxes"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    c = ClutteredDigits("test", 50, seed=8)
    assert not torch.equal(a.images, c.images) and not torch.equal(a.boxes, c.boxes)
    d = ClutteredDigits("val", 50, seed=7)
    assert not torch.equal(a.images, d.images)


def test_box_is_tight_around_target() -> None:
    clean = ClutteredDigits("train", 100, seed=2, clutter=0, noise=0.0)
    ink = clean.images[:, 0] > 0.1
    inside = box_mask(clean.boxes, 64)
    assert ink.any((1, 2)).all()
    assert not (ink & ~inside).any()  # every target pixel lies in its box
    for img, (x0, y0, x1, y1) in zip(ink, clean.boxes.tolist()):
        assert img[y0, x0:x1].any() and img[y1 - 1, x0:x1].any()  # top and bottom rows touch ink
        assert img[y0:y1, x0].any() and img[y0:y1, x1 - 1].any()  # left and right columns too


def test_clutter_and_noise_change_only_the_canvas() -> None:
    clean = ClutteredDigits("train", 30, seed=4, clutter=0, noise=0.0)
    busy = ClutteredDigits("train", 30, seed=4)
    assert torch.equal(clean.labels, busy.labels) and torch.equal(clean.boxes, busy.boxes)
    outside = ~box_mask(busy.boxes, 64)
    assert (busy.images[:, 0][outside] > 0.3).sum() > (clean.images[:, 0][outside] > 0.3).sum() + 30 * 50
    # fragments mostly avoid the target: its box holds little more ink than the clean canvas
    inside = ~outside
    extra = (busy.images[:, 0] - clean.images[:, 0]).clamp(min=0)[inside & (clean.images[:, 0] < 0.1)]
    assert (extra > 0.5).float().mean() < 0.1


def test_source_pools_disjoint_and_complete() -> None:
    pools = {s: source_indices(s) for s in ("train", "val", "test")}
    sizes = {s: len(p) for s, p in pools.items()}
    assert sizes == {"train": 1258, "val": 180, "test": 359}
    joined = np.concatenate(list(pools.values()))
    assert len(np.unique(joined)) == 1797 and set(joined.tolist()) == set(range(1797))
    assert np.array_equal(source_indices("test"), pools["test"])  # fixed, not seed-dependent


def test_labels_match_sources() -> None:
    targets = load_digits().target
    for split in ("train", "test"):
        d = ClutteredDigits(split, 100, seed=5)
        assert np.isin(d.sources.numpy(), source_indices(split)).all()
        assert np.array_equal(d.labels.numpy(), targets[d.sources.numpy()])


def test_paste_is_bilinear_upscale() -> None:
    digit = torch.from_numpy(load_digits().images[:1].astype(np.float32)) / 16
    side, at = torch.tensor([27]), torch.tensor([[5, 9]])
    ext = torch.tensor([[27, 27]])
    canvas = _paste(digit, side, at, ext, torch.zeros_like(ext), 48)[0]
    ref = F.interpolate(digit[None], size=(27, 27), mode="bilinear", align_corners=False)[0, 0]
    torch.testing.assert_close(canvas[9:36, 5:32], ref, atol=1e-5, rtol=0)
    canvas[9:36, 5:32] = 0
    assert not canvas.any()
    crop = _paste(digit, side, at, torch.tensor([[6, 8]]), torch.tensor([[10, 3]]), 48)[0]
    torch.testing.assert_close(crop[9:17, 5:11], ref[3:11, 10:16], atol=1e-5, rtol=0)


def test_box_mask_by_hand() -> None:
    m = box_mask(torch.tensor([[1, 0, 3, 2], [0, 1, 1, 3]]), (3, 4))
    expected = torch.tensor([[[0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]],
                             [[0, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0]]], dtype=torch.bool)
    assert m.dtype == torch.bool and torch.equal(m, expected)
    assert box_mask(torch.tensor([[0, 0, 2, 2]]), 2).all()
    with pytest.raises(DataError):
        box_mask(torch.zeros(3), 4)


def test_load_dataset() -> None:
    d = load_dataset("cluttered-digits", "val", 8, seed=3, size=32)
    assert isinstance(d, ClutteredDigits) and d.images.shape == (8, 1, 32, 32)
    assert torch.equal(d.images, ClutteredDigits("val", 8, seed=3, size=32).images)


@pytest.mark.parametrize(("args", "kwargs", "match"), [
    (("imagenet", "train", 5), {}, "cluttered-digits"),
    (("cluttered-digits", "training", 5), {}, "split"),
    (("cluttered-digits", "train", 0), {}, "n must"),
    (("cluttered-digits", "train", -3), {}, "n must"),
    (("cluttered-digits", "train", 5), {"size": 8}, "size must"),
    (("cluttered-digits", "train", 5), {"seed": -1}, "seed must"),
])
def test_load_dataset_errors(args: tuple, kwargs: dict, match: str) -> None:
    with pytest.raises(DataError, match=match):
        load_dataset(*args, **kwargs)


def test_constructor_errors() -> None:
    with pytest.raises(DataError, match="digit_size"):
        ClutteredDigits("train", 5, digit_size=(30, 20))
    with pytest.raises(DataError, match="noise"):
        ClutteredDigits("train", 5, noise=-0.1)
    with pytest.raises(DataError, match="split"):
        ClutteredDigits("bogus", 5)  # type: ignore[arg-type]


# --- shortcut digits (issue 15 item 4) ----------------------------------------------


def test_mark_places_hand_values() -> None:
    from selfcam.data.digits import mark_places

    # ring of corners 1..13 on a 16 px canvas with a 2 px mark, 4 classes: its four corners, clockwise
    assert mark_places(16, 2, 4).tolist() == [[1, 1], [13, 1], [13, 13], [1, 13]]
    # 64 px, 4 px mark: ring 1..59 (58 px a side), every 23.2 px along it
    assert mark_places(64, 4).tolist() == [[1, 1], [24, 1], [47, 1], [59, 13], [59, 36], [59, 59], [36, 59],
                                           [13, 59], [1, 47], [1, 24]]  # fmt: skip
    with pytest.raises(DataError, match="does not fit"):
        mark_places(4, 2)


def test_the_mark_is_where_the_generator_says() -> None:
    from selfcam.data.digits import ShortcutDigits, mark_places

    plain = ClutteredDigits("train", 300, seed=2)
    ds = ShortcutDigits("train", 300, seed=2)
    assert ds.mark == 4 and ds.mark_boxes.shape == (300, 4)
    x0, y0, x1, y1 = ds.mark_boxes.T
    assert ((x1 - x0) == 4).all() and ((y1 - y0) == 4).all() and (x0 >= 0).all() and (x1 <= 64).all()
    inside = box_mask(ds.mark_boxes, 64)[:, None]
    assert (ds.images[inside] == 1).all()  # the mark: a bright square, exactly in its box
    assert torch.equal(ds.images[~inside], plain.images[~inside])  # the rest: the cluttered canvas, untouched
    assert torch.equal(ds.labels, plain.labels) and torch.equal(ds.boxes, plain.boxes)
    places = mark_places(64, 4)
    at_place = (ds.mark_boxes[:, :2] == places[ds.labels]).all(1)
    assert at_place[ds.correlated].all()  # correlated images: the mark at the class's place
    assert 0.85 <= ds.correlated.float().mean() <= 0.95  # default train correlation 0.9
    test = ShortcutDigits("test", 300, seed=2)
    assert not test.correlated.any() and test.correlation == 0.0  # test: anywhere
    spread = test.mark_boxes[:, :2]
    assert spread.min() == 0 and spread.max() == 60 and len(spread.unique(dim=0)) > 250  # uniform over the canvas
    assert ShortcutDigits("test", 50, seed=2, correlation=1.0).correlated.all()
    with pytest.raises(DataError, match="correlation"):
        ShortcutDigits("train", 5, correlation=1.5)
    with pytest.raises(DataError, match="mark"):
        ShortcutDigits("train", 5, mark=40)


def test_shortcut_digits_load_by_name() -> None:
    ds = load_dataset("shortcut-digits", "val", 20, seed=1, size=32)
    x, y, box = ds[0]
    assert x.shape == (1, 32, 32) and ds.spec == "shortcut-digits" and ds.mark == 2 and ds.num_classes == 10
    assert torch.equal(load_dataset("shortcut-digits", "val", 20, seed=1, size=32).images, ds.images)


def test_canvases_built_in_chunks_are_those_built_in_one_go(monkeypatch: pytest.MonkeyPatch) -> None:
    """The generator builds _CHUNK pixels of canvases at a time (memory: the images plus a chunk); the draws are
    those of one go, so chunks of 3 canvases (a last partial one) and a single chunk give the same tensors."""
    import selfcam.data.digits as D

    kwargs = dict(size=16, seed=4, clutter=3, noise=0.1)
    whole = D.ClutteredDigits("val", 11, **kwargs)
    monkeypatch.setattr(D, "_CHUNK", 3 * 16 * 16)
    chunked = D.ClutteredDigits("val", 11, **kwargs)
    for name in ("images", "boxes", "labels", "sources"):
        assert torch.equal(getattr(whole, name), getattr(chunked, name)), name
    assert whole.images.shape == (11, 1, 16, 16) and whole.images.is_contiguous()


def test_a_batch_of_items_is_the_items() -> None:
    """__getitems__ (what a DataLoader asks for a batch) gives [ds[i] for i], normalized in one operation."""
    ds = ClutteredDigits("test", 9, size=16)
    batch = ds.__getitems__([4, 0, 8, 4])
    assert len(batch) == 4
    for got, i in zip(batch, [4, 0, 8, 4]):
        for a, b in zip(got, ds[i]):
            assert torch.equal(a, b) and a.dtype == b.dtype
    loader = torch.utils.data.DataLoader(ds, batch_size=5)
    x, y, box = next(iter(loader))
    assert torch.equal(x, ds.normalize(ds.images[:5])) and torch.equal(y, ds.labels[:5]) and torch.equal(box, ds.boxes[:5])
