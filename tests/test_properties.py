"""Property-based tests (hypothesis) of the maps, the heads and the localization metrics."""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from selfcam import create_model, metrics as M
from selfcam.heads import HEADS, minmax, upsample

FAST = settings(max_examples=40, deadline=None)
SLOW = settings(max_examples=12, deadline=None)


@st.composite
def maps_and_masks(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of maps (N, H, W) with values in [0, 1] (ties likely) and non-empty boolean masks."""
    n, h, w = draw(st.integers(1, 3)), draw(st.integers(1, 12)), draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    levels = draw(st.sampled_from([2, 5, 1000]))  # few levels -> many ties
    maps = torch.randint(0, levels, (n, h, w), generator=g).float() / (levels - 1)
    masks = torch.rand(n, h, w, generator=g) < draw(st.floats(0.05, 0.9))
    masks[:, 0, 0] |= ~masks.flatten(1).any(1)  # never empty
    return maps, masks


@FAST
@given(data=maps_and_masks(), k=st.integers(-20, 20))
def test_pointing_game_and_iou_are_invariant_to_positive_rescaling(data: tuple[torch.Tensor, torch.Tensor], k: int) -> None:
    maps, masks = data
    c = 2.0**k  # exact in floating point, so ties and orderings are kept bit for bit
    assert torch.equal(M.pointing_game(maps * c, masks), M.pointing_game(maps, masks))
    assert torch.equal(M.pointing_game(maps * c, masks, tolerance=2), M.pointing_game(maps, masks, tolerance=2))
    assert torch.equal(M.iou(maps * c, masks, 0.5 * c), M.iou(maps, masks, 0.5))
    assert torch.equal(M.dice(maps * c, masks, 0.5 * c), M.dice(maps, masks, 0.5))
    # after the min-max normalization every selfcam map goes through, the threshold needs no rescaling
    assert torch.equal(M.iou(minmax(maps * c), masks), M.iou(minmax(maps), masks))
    assert torch.allclose(M.energy_pointing_game(maps * c, masks), M.energy_pointing_game(maps, masks), atol=1e-6)


@FAST
@given(data=maps_and_masks(), t=st.floats(0.0, 1.0))
def test_localization_metric_ranges_and_relations(data: tuple[torch.Tensor, torch.Tensor], t: float) -> None:
    maps, masks = data
    pg, i, d, e = M.pointing_game(maps, masks), M.iou(maps, masks, t), M.dice(maps, masks, t), M.energy_pointing_game(maps, masks)
    for v in (pg, i, d, e):
        assert ((v >= 0) & (v <= 1)).all()
    assert set(pg.tolist()) <= {0.0, 1.0}
    assert (i <= d + 1e-6).all()  # IoU <= Dice, with Dice = 2 IoU / (1 + IoU)
    assert torch.allclose(d, 2 * i / (1 + i), atol=1e-6)
    # the whole image as the map's support: IoU is the mask's share of the image
    full = M.iou(torch.ones_like(maps), masks, 0.5)
    assert torch.allclose(full, masks.flatten(1).float().mean(1))


@FAST
@given(seed=st.integers(0, 2**31 - 1), h=st.integers(1, 9), w=st.integers(1, 9),
       a=st.floats(1e-3, 1e3), b=st.floats(-1e3, 1e3))  # fmt: skip
def test_minmax_bounds_and_affine_invariance(seed: int, h: int, w: int, a: float, b: float) -> None:
    t = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    m = minmax(t)
    assert ((m >= 0) & (m <= 1)).all()
    if h * w > 1:
        assert torch.allclose(m.amax(dim=(-2, -1)), torch.ones(2, 3, dtype=torch.float64))
        assert torch.allclose(minmax(a * t + b), m, atol=1e-6)


@FAST
@given(seed=st.integers(0, 2**31 - 1), h=st.integers(1, 8), w=st.integers(1, 8), H=st.integers(1, 40),
       W=st.integers(1, 40), mode=st.sampled_from(["bilinear", "bicubic"]))  # fmt: skip
def test_upsample_shape_and_bounds(seed: int, h: int, w: int, H: int, W: int, mode: str) -> None:
    maps = minmax(torch.rand(2, h, w, generator=torch.Generator().manual_seed(seed)))
    up = upsample(maps, (H, W), mode)
    assert up.shape == (2, H, W) and torch.isfinite(up).all()
    assert ((up >= 0) & (up <= 1)).all()


@lru_cache(maxsize=None)
def _model(method: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(method, "resnet8", num_classes=3, in_chans=2).eval()


def _feature_side(n: int) -> int:
    """ResNet-8 (stride-1 stem, two stride-2 stages): each 3x3 stride-2 conv with padding 1 gives ceil(n / 2)."""
    return math.ceil(math.ceil(n / 2) / 2)


@SLOW
@given(n=st.integers(1, 3), H=st.integers(4, 48), W=st.integers(4, 48), seed=st.integers(0, 2**31 - 1),
       scale=st.floats(0.01, 100.0))  # fmt: skip
def test_every_head_gives_a_bounded_map_of_the_feature_shape(n: int, H: int, W: int, seed: int, scale: float) -> None:
    """Every head registered when the test runs (heads registered by other test files too)."""
    x = scale * torch.randn(n, 2, H, W, generator=torch.Generator().manual_seed(seed))
    for method in sorted(HEADS):
        _check_head(method, x)


def _check_head(method: str, x: torch.Tensor) -> None:
    n, _, H, W = x.shape
    with torch.no_grad():
        out = _model(method)(x)
        up = _model(method).explain(x)
    per_class = (3,) if _model(method).task == "attributes" else ()  # one map per label
    assert out.logits.shape == (n, 3) and torch.isfinite(out.logits).all(), method
    assert out.heatmap.shape == (n, *per_class, _feature_side(H), _feature_side(W)), method
    assert up.heatmap.shape == (n, *per_class, H, W), method
    for m in (out.heatmap, up.heatmap):
        assert torch.isfinite(m).all() and ((m >= 0) & (m <= 1)).all(), method
    if out.selected is not None:  # SE: at least one channel builds each map
        assert out.selected.flatten(0, -2).any(dim=-1).all(), method
