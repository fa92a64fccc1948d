"""Tests of the moving-digit clip dataset (selfcam.data.clips)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from selfcam.data.clips import SyntheticClips
from selfcam.data.digits import MEAN, STD, box_mask, source_indices
from selfcam.errors import DataError

N, T, S = 120, 8, 64


@pytest.fixture(scope="module")
def ds() -> SyntheticClips:
    return SyntheticClips("train", N, seed=1)


@pytest.fixture(scope="module")
def clean() -> SyntheticClips:
    return SyntheticClips("train", N, seed=1, clutter=0, noise=0.0)


def test_shapes_dtypes_ranges(ds: SyntheticClips) -> None:
    assert ds.clips.shape == (N, T, 1, S, S) and ds.clips.dtype == torch.float32
    assert ds.clips.min() >= 0 and ds.clips.max() <= 1
    assert ds.labels.shape == (N,) and ds.labels.dtype == torch.int64
    assert ds.labels.min() >= 0 and ds.labels.max() <= 9 and len(ds.labels.unique()) == 10
    assert ds.boxes.shape == (N, T, 4) and ds.boxes.dtype == torch.int64
    assert ds.sources.shape == (N,) and ds.positions.shape == (N, T, 2) and ds.sides.shape == (N,)
    assert ds.frames == T and isinstance(ds.frames, int) and ds.num_frames == T
    assert ds.size == S and ds.split == "train" and ds.seed == 1 and ds.spec == "synthetic-clips"
    assert len(ds) == N and ds.num_classes == 10 and ds.in_chans == 1 and ds.task == "video"
    assert ds.mean == (MEAN,) and ds.std == (STD,) and ds.class_names == [str(d) for d in range(10)]
    clip, label, boxes = ds[5]
    assert clip.shape == (T, 1, S, S) and clip.dtype == torch.float32
    assert label.shape == () and label.dtype == torch.int64 and boxes.shape == (T, 4) and boxes.dtype == torch.int64
    torch.testing.assert_close(clip, (ds.clips[5] - MEAN) / STD)
    assert torch.equal(label, ds.labels[5]) and torch.equal(boxes, ds.boxes[5])
    assert torch.equal(ds.raw(5), ds.clips[5]) and ds.raw(5).shape == (T, 1, S, S)


def test_other_lengths_and_sizes() -> None:
    one = SyntheticClips("val", 4, frames=1, size=32, digit_size=(10, 12), seed=3)
    assert one.clips.shape == (4, 1, 1, 32, 32) and one.boxes.shape == (4, 1, 4) and one.frames == one.num_frames == 1
    assert ((one.boxes[..., 3] - one.boxes[..., 1]) <= 12).all() and ((one.sides >= 10) & (one.sides <= 12)).all()
    long = SyntheticClips("test", 3, frames=13, size=16, digit_size=(4, 6))
    assert long.clips.shape == (3, 13, 1, 16, 16) and (long.boxes[..., 2:] <= 16).all()


def test_normalize_round_trip_and_train_stats(ds: SyntheticClips) -> None:
    x = ds.normalize(ds.clips)
    torch.testing.assert_close(x, (ds.clips - MEAN) / STD)
    torch.testing.assert_close(ds.denormalize(x), ds.clips, atol=1e-6, rtol=0)
    y = torch.linspace(-3, 3, 50)
    torch.testing.assert_close(ds.normalize(ds.denormalize(y)), y, atol=1e-5, rtol=0)
    assert abs(x.mean().item()) < 0.15 and abs(x.std().item() - 1) < 0.15


def test_determinism() -> None:
    a, b = SyntheticClips("test", 30, seed=7, frames=4), SyntheticClips("test", 30, seed=7, frames=4)
    for name in ("clips", "labels", "boxes", "sources", "positions"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    c = SyntheticClips("test", 30, seed=8, frames=4)
    assert not torch.equal(a.clips, c.clips) and not torch.equal(a.boxes, c.boxes)
    assert not torch.equal(a.sources, c.sources)
    d = SyntheticClips("val", 30, seed=7, frames=4)
    assert not torch.equal(a.clips, d.clips)
    # the noise follows the seed too: compare it where neither target is drawn and neither is clipped
    noisy = [SyntheticClips("test", 30, seed=s, frames=4, clutter=0).clips for s in (7, 8)]
    bare = [SyntheticClips("test", 30, seed=s, frames=4, clutter=0, noise=0.0).clips == 0 for s in (7, 8)]
    both = bare[0] & bare[1] & (noisy[0] > 0) & (noisy[1] > 0)
    assert both.sum() > 10_000 and (noisy[0][both] != noisy[1][both]).float().mean() > 0.99


def test_splits_use_disjoint_sources() -> None:
    targets = load_digits().target
    used = {}
    for split in ("train", "val", "test"):
        d = SyntheticClips(split, 150, seed=5, frames=2, size=32)
        src = d.sources.numpy()
        assert np.isin(src, source_indices(split)).all()
        assert np.array_equal(d.labels.numpy(), targets[src])
        used[split] = set(src.tolist())
    assert not used["train"] & used["val"] and not used["train"] & used["test"] and not used["val"] & used["test"]


def test_clean_clip_is_the_pasted_digit(clean: SyntheticClips) -> None:
    """With clutter=0 and noise=0 every frame is the source digit, upscaled bilinearly to ``side``,
    at ``positions``, on black; the digit lies fully inside the canvas."""
    images = load_digits().images.astype(np.float32)
    images /= images.max(axis=(1, 2), keepdims=True)
    assert (clean.positions >= 0).all() and (clean.positions + clean.sides[:, None, None] <= S).all()
    for i in range(0, N, 6):
        side = int(clean.sides[i])
        digit = torch.from_numpy(images[int(clean.sources[i])])[None, None]
        ref = F.interpolate(digit, size=(side, side), mode="bilinear", align_corners=False)[0, 0]
        for t in range(T):
            x, y = clean.positions[i, t].tolist()
            expected = torch.zeros(S, S)
            expected[y : y + side, x : x + side] = ref
            torch.testing.assert_close(clean.clips[i, t, 0], expected, atol=1e-5, rtol=0)


def test_boxes_are_tight_around_the_target(ds: SyntheticClips, clean: SyntheticClips) -> None:
    # same seed, other clutter / noise: same targets, motions and boxes
    for name in ("labels", "sources", "positions", "sides", "boxes"):
        assert torch.equal(getattr(ds, name), getattr(clean, name)), name
    x0, y0, x1, y1 = clean.boxes.unbind(-1)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= S).all() and (y1 <= S).all()
    assert (x1 > x0).all() and (y1 > y0).all()
    ink = clean.clips[:, :, 0].reshape(N * T, S, S) > 0.1
    boxes = clean.boxes.reshape(N * T, 4)
    assert ink.any((1, 2)).all()
    assert not (ink & ~box_mask(boxes, S)).any()  # every target pixel > 0.1 lies in its box
    for img, (a, b, c, d) in zip(ink, boxes.tolist()):
        assert img[b, a:c].any() and img[d - 1, a:c].any()  # top and bottom rows touch ink
        assert img[b:d, a].any() and img[b:d, c - 1].any()  # left and right columns too


def test_clutter_is_static_and_noise_fresh(clean: SyntheticClips) -> None:
    busy = SyntheticClips("train", N, seed=1, noise=0.0)
    b, target = busy.clips[:, :, 0], clean.clips[:, :, 0]
    never = (target == 0).all(1)  # (N, S, S): pixels the target never touches
    still = never[:, None].expand_as(b)
    assert torch.equal(b[still], b[:, :1].expand_as(b)[still])  # off the target, every frame shows the same clutter
    # the clutter of a pixel is what a frame without the target there shows; every frame is max(target, clutter)
    bare = target == 0
    seen = bare.any(1)[:, None].expand_as(b)
    fixed = torch.where(bare, b, 0).amax(1, keepdim=True)
    assert torch.equal(b[seen], torch.maximum(target, fixed)[seen])
    outside = ~box_mask(busy.boxes.reshape(N * T, 4), S).view(N, T, S, S)
    assert (b[outside] > 0.3).sum() > (target[outside] > 0.3).sum() + N * T * 50  # clutter is there
    # fragments mostly avoid the target's path: its boxes hold little more ink than the clean frames
    # (about 0.01 here; 0.04 when only the first frame's box is avoided, 0.09 when none is)
    extra = (b - target).clamp(min=0)[~outside & (target < 0.1)]
    assert (extra > 0.5).float().mean() < 0.025
    noisy = SyntheticClips("train", N, seed=1, clutter=0, noise=0.1).clips[:, :, 0]
    bg = never & (noisy[:, 0] > 0) & (noisy[:, 1] > 0)  # unclipped background in frames 0 and 1
    assert bg.sum() > N * 100
    assert (noisy[:, 0][bg] != noisy[:, 1][bg]).float().mean() > 0.99  # noise is drawn per frame
    assert 0.05 < noisy[:, 0][never].std().item() < 0.1  # about half a N(0, 0.1), clipped at 0


def test_the_digit_moves_linearly(ds: SyntheticClips) -> None:
    boxes, pos = ds.boxes, ds.positions
    moved = (boxes[:, 0] != boxes[:, -1]).any(1)
    assert moved.float().mean() > 0.9
    sizes = boxes[..., 2:] - boxes[..., :2]
    assert (sizes == sizes[:, :1]).all()  # the box keeps its size
    assert torch.equal(boxes[..., :2] - boxes[:, :1, :2], pos - pos[:, :1])  # and moves with the digit
    frac = torch.arange(T, dtype=torch.float64) / (T - 1)
    start, end = pos[:, 0].double(), pos[:, -1].double()
    line = torch.round(start[:, None] + (end - start)[:, None] * frac[None, :, None]).long()  # half to even, as rint
    assert torch.equal(line, pos)
    step = (pos[:, 1:] - pos[:, :-1]).abs()
    assert (step <= torch.ceil((end - start).abs() / (T - 1))[:, None]).all()  # no jumps along the way


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"n": 0}, "n must"),
    ({"n": 2.5}, "n must"),
    ({"n": True}, "n must"),
    ({"frames": 0}, "frames must"),
    ({"size": 8}, "size must"),
    ({"seed": -1}, "seed must"),
    ({"clutter": -1}, "clutter must"),
    ({"noise": -0.1}, "noise must"),
    ({"noise": float("nan")}, "noise must"),
    ({"noise": "0.1"}, "noise must"),
    ({"digit_size": (30, 20)}, "digit_size"),
    ({"digit_size": (3, 5)}, "digit_size"),
    ({"digit_size": (10, 80)}, "digit_size"),
    ({"digit_size": 12}, "digit_size"),
    ({"digit_size": (10.5, 12)}, "digit_size"),
    ({"split": "training"}, "split"),
])  # fmt: skip
def test_bad_arguments(kwargs: dict, match: str) -> None:
    args = {"split": "train", "n": 2, **kwargs}
    with pytest.raises(DataError, match=match):
        SyntheticClips(args.pop("split"), args.pop("n"), **args)
