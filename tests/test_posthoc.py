"""Post-hoc maps: every method's output contract, state restoration and hook hygiene;
Grad-CAM against the classic CAM identity; RISE against a NumPy / scikit-image
re-computation of the paper's formula; RISE and LIME on a model with a known answer."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from skimage.transform import resize
from torch import Tensor, nn

from selfcam.errors import ConfigError, InputError
from selfcam.model import create_model
from selfcam.posthoc import POSTHOC_METHODS, _rise_grids, _rise_masks, posthoc_map

# small budgets for the sampling methods: the contract tests only need a valid map
FAST: dict[str, dict[str, Any]] = {"rise": {"n_masks": 60}, "lime": {"n_samples": 30}}


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


class Quadrant(nn.Module):
    """Class-1 logit = sum of the input's top-left quadrant; class-0 logit = 0."""

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        l1 = x[:, :, : h // 2, : w // 2].sum(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(l1), l1], dim=1)


def _tiny_net() -> nn.Module:
    """A small conv net (3 classes, any input size): cheap enough for repeated sampling."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def _quadrant_np(x: np.ndarray) -> np.ndarray:
    """The same model's class-1 logit in NumPy: ``(..., C, H, W) -> (...)``."""
    h, w = x.shape[-2:]
    return x[..., : h // 2, : w // 2].sum(axis=(-3, -2, -1))


# --- the contract, for every method ---------------------------------------------------


@pytest.mark.parametrize("method", POSTHOC_METHODS)
def test_every_posthoc_method_range_and_no_hooks(method: str) -> None:
    model = create_model("plain", "resnet8", 3, in_chans=1).eval()
    x = torch.randn(2, 1, 16, 16)
    maps = posthoc_map(model, x, method, **FAST.get(method, {}))
    assert maps.shape == (2, 16, 16) and maps.min() >= 0 and maps.max() <= 1
    assert maps.device == x.device and maps.dtype == x.dtype and torch.isfinite(maps).all()
    assert _hooks(model) == 0 and not model.training


@pytest.mark.parametrize("method", ["cam", "gradcam", "rise", "lime"])  # the grad-cam three share one path
def test_maps_follow_the_input_dtype(method: str) -> None:
    model = create_model("plain", "resnet8", 3, in_chans=1).double()
    maps = posthoc_map(model, torch.randn(2, 1, 16, 16, dtype=torch.float64), method, **FAST.get(method, {}))
    assert maps.dtype == torch.float64 and maps.shape == (2, 16, 16) and 0 <= maps.min() <= maps.max() <= 1


@pytest.mark.parametrize("method", POSTHOC_METHODS)
def test_mode_and_requires_grad_restored(method: str) -> None:
    model = create_model("plain", "resnet8", 3, in_chans=1).train()
    model.backbone.trunk.requires_grad_(False)  # partly frozen, mixed modes
    model.backbone.trunk.eval()
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    posthoc_map(model, torch.randn(1, 1, 16, 16), method, **FAST.get(method, {}))
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert _hooks(model) == 0


@pytest.mark.parametrize("method", POSTHOC_METHODS)
def test_state_and_hooks_restored_when_the_forward_raises(method: str) -> None:
    model = create_model("plain", "resnet8", 3, in_chans=1).train()
    model.head.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]

    def explode(*args: object) -> None:
        raise RuntimeError("boom inside the forward pass")

    # on the last stage: every method runs it (CAM calls forward_features, not the head)
    hook = model.backbone.last.register_forward_hook(explode)
    with pytest.raises(RuntimeError, match="boom"):
        posthoc_map(model, torch.randn(2, 1, 16, 16), method, target=torch.tensor([0, 1]), **FAST.get(method, {}))
    hook.remove()
    assert _hooks(model) == 0 and model.training and all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags


def test_posthoc_hooks_removed_when_the_call_raises() -> None:
    model = create_model("plain", "resnet8", 3, in_chans=1)
    with pytest.raises(InputError, match="target out of range"):
        posthoc_map(model, torch.randn(2, 1, 16, 16), "gradcam", target=torch.tensor([0, 99]))
    assert _hooks(model) == 0 and model.training

    def explode(*args: object) -> None:
        raise RuntimeError("boom inside the forward pass")

    hook = model.head.register_forward_hook(explode)  # the user's own hook fails mid-call
    with pytest.raises(RuntimeError, match="boom"):
        posthoc_map(model, torch.randn(2, 1, 16, 16), "gradcam", target=torch.tensor([0, 1]))
    hook.remove()
    assert _hooks(model) == 0 and model.training


def test_gradcam_equals_cam_for_gap_fc_and_leaves_no_hooks() -> None:
    """For GAP + linear, d logit_c / d F_k = W[c, k] / (h w): Grad-CAM is the classic CAM."""
    torch.manual_seed(0)
    model = create_model("plain", "resnet8", 3, in_chans=1)
    model.train()
    flags = [p.requires_grad for p in model.parameters()]
    x = torch.randn(4, 1, 32, 32)
    cam = posthoc_map(model, x, "cam")
    grad = posthoc_map(model, x, "gradcam")
    assert cam.shape == grad.shape == (4, 32, 32)
    # grad-cam resizes with OpenCV, we with torch: compare at the argmax and globally
    assert torch.allclose(cam, grad, atol=0.05)
    assert _hooks(model) == 0
    assert model.training and [p.requires_grad for p in model.parameters()] == flags


def test_any_logits_module_with_a_target_layer() -> None:
    net = _tiny_net()
    x = torch.randn(2, 1, 12, 12)
    for method, options in [("gradcam", {"target_layer": net[0]}), ("rise", {"n_masks": 40}), ("lime", {"n_samples": 20})]:
        maps = posthoc_map(net, x, method, **options)
        assert maps.shape == (2, 12, 12) and 0 <= maps.min() <= maps.max() <= 1
    assert _hooks(net) == 0


def test_posthoc_errors() -> None:
    model = create_model("se", "resnet8", 3, in_chans=1)
    with pytest.raises(ConfigError, match="unknown post-hoc"):
        posthoc_map(model, torch.randn(1, 1, 16, 16), "lime2")
    with pytest.raises(ConfigError, match="plain"):
        posthoc_map(model, torch.randn(1, 1, 16, 16), "cam")


@pytest.mark.parametrize(
    ("method", "options", "match"),
    [
        ("rise", {"n_mask": 10}, "unknown option.*n_mask"),
        ("gradcam", {"n_masks": 10}, "unknown option.*n_masks"),
        ("cam", {"seed": 1}, "unknown option.*seed.*accepted: none"),
        ("rise", {"n_masks": 0}, "n_masks"),
        ("rise", {"s": "8"}, "option s"),
        ("rise", {"p": 0.0}, "option p"),
        ("rise", {"p": 1.5}, "option p"),
        ("rise", {"batch_size": True}, "batch_size"),
        ("rise", {"seed": -1}, "seed"),
        ("lime", {"segments": 17}, "segments"),
        ("lime", {"n_samples": 2.5}, "n_samples"),
        ("gradcam", {"target_layer": nn.Conv2d(1, 1, 1)}, "submodule"),
    ],
)
def test_option_errors(method: str, options: dict[str, Any], match: str) -> None:
    model = create_model("plain", "resnet8", 3, in_chans=1) if method == "cam" else _tiny_net()
    with pytest.raises(ConfigError, match=match):
        posthoc_map(model, torch.randn(1, 1, 16, 16), method, **options)


def test_input_errors() -> None:
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(ConfigError, match="target_layer is required"):
        posthoc_map(Quadrant(), x, "gradcam")
    with pytest.raises(ConfigError, match="plain"):
        posthoc_map(Quadrant(), x, "cam")
    with pytest.raises(InputError, match="NaN"):  # never a silent all-zero map
        posthoc_map(Quadrant(), x.masked_fill(x > 0.5, float("nan")), "rise")
    with pytest.raises(InputError, match="target must hold integer class indices"):
        posthoc_map(Quadrant(), x, "rise", target=torch.tensor([0.0, 1.0]))
    with pytest.raises(InputError, match="target out of range"):
        posthoc_map(Quadrant(), x, "lime", target=torch.tensor([0, 2]))
    with pytest.raises(InputError, match=r"\(N, C, H, W\)"):
        posthoc_map(Quadrant(), x[0], "rise")
    with pytest.raises(InputError, match="empty"):
        posthoc_map(Quadrant(), x[:0], "lime")
    with pytest.raises(InputError, match="not finite"):  # the model's outputs make the map NaN
        posthoc_map(nn.Sequential(nn.Flatten(), nn.Linear(64, 2), nn.Threshold(10.0, float("nan"))), x, "rise", n_masks=5)


# --- RISE ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(16, 16), (13, 18)])
def test_rise_masks_match_the_papers_construction(size: tuple[int, int]) -> None:
    """Bilinear up-sampling of the binary grids and the shifted crops, redone with scikit-image
    as the authors' code does, except at the border: ``mode='edge'`` (torch's clamping)
    where they use ``mode='reflect'`` (mirroring; it changes the outer half cell only)."""
    n, s, p = 12, 4, 0.5
    masks = _rise_masks(n, s, p, size, torch.Generator().manual_seed(5)).numpy()
    grids, offsets = _rise_grids(n, s, p, size, torch.Generator().manual_seed(5))
    h, w = size
    up = (int(np.ceil((s + 1) * h / s)), int(np.ceil((s + 1) * w / s)))
    for i in range(n):
        dy, dx = offsets[i].tolist()
        assert 0 <= dy < np.ceil(h / s) and 0 <= dx < np.ceil(w / s)
        full = resize(grids[i, 0].numpy().astype(np.float64), up, order=1, mode="edge", anti_aliasing=False)
        np.testing.assert_allclose(masks[i], full[dy : dy + h, dx : dx + w], atol=1e-6)
    assert set(np.unique(grids.numpy())) <= {0.0, 1.0} and masks.shape == (n, *size)


def test_rise_formula_against_numpy() -> None:
    """saliency_c = sum_i P_c(x * M_i) M_i / (n p), min-max per image, with the same masks."""
    n, s, p, seed = 7, 4, 0.5, 3
    torch.manual_seed(0)
    x = torch.rand(2, 1, 16, 16) * 0.3
    target = torch.tensor([1, 0])  # a different class per image
    got = posthoc_map(Quadrant(), x, "rise", target=target, n_masks=n, s=s, p=p, seed=seed, batch_size=4)
    masks = _rise_masks(n, s, p, (16, 16), torch.Generator().manual_seed(seed)).double().numpy()
    logit1 = _quadrant_np(x.double().numpy()[:, None] * masks[None, :, None])  # (N, n)
    p1 = 1 / (1 + np.exp(-logit1))
    probs = np.stack([1 - p1, p1])[target.numpy(), [0, 1]]  # (class, N, n) -> P_target (N, n)
    sal = np.einsum("ni,ihw->nhw", probs, masks) / (n * p)
    lo, hi = sal.min(axis=(1, 2), keepdims=True), sal.max(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(got.numpy(), (sal - lo) / (hi - lo), atol=1e-5)


def test_rise_finds_the_quadrant() -> None:
    x = torch.full((1, 1, 16, 16), 0.05)
    maps = posthoc_map(Quadrant(), x, "rise", target=torch.tensor([1]), n_masks=1000, s=4)
    inside = maps[0, :8, :8].mean()
    outside = (maps[0].sum() - maps[0, :8, :8].sum()) / (256 - 64)
    assert inside > outside + 0.2


def test_rise_is_seeded_and_independent_of_batching() -> None:
    model = _tiny_net()
    x = torch.randn(3, 1, 16, 16)
    state = torch.get_rng_state()
    a = posthoc_map(model, x, "rise", n_masks=30, batch_size=90)
    assert torch.equal(torch.get_rng_state(), state)  # a private generator: global RNG untouched
    assert torch.equal(a, posthoc_map(model, x, "rise", n_masks=30, batch_size=90))
    target = a.new_tensor([0, 1, 2], dtype=torch.long)
    b = posthoc_map(model, x, "rise", target=target, n_masks=30, batch_size=7)  # 2 masks per forward
    c = posthoc_map(model, x[1:2], "rise", target=target[1:2], n_masks=30)  # same masks, alone
    d = posthoc_map(model, x, "rise", target=target, n_masks=30, seed=1)
    e = posthoc_map(model, x, "rise", target=target, n_masks=30)
    assert torch.allclose(b, e, atol=1e-5) and torch.allclose(c[0], e[1], atol=1e-5)
    assert not torch.allclose(d, e, atol=1e-2)


# --- LIME ------------------------------------------------------------------------------


def test_lime_on_the_quadrant_model() -> None:
    """The class-1 logit is linear in the on/off cells with weight = the cell's pixel sum:
    equal for the 16 quadrant cells, 0 elsewhere, so the map is about 1 there and 0 outside.
    The class-0 logit is constant: every coefficient is 0 and the map is 0 (minmax's rule)."""
    torch.manual_seed(0)
    x = torch.rand(2, 1, 16, 16)
    x[:, :, :8, :8] = 0.5
    state = torch.get_rng_state()
    maps = posthoc_map(Quadrant(), x, "lime", target=torch.tensor([1, 0]), n_samples=150)
    assert torch.equal(torch.get_rng_state(), state)  # sampling ran on a forked, seeded RNG
    cells = maps[:, ::2, ::2]  # segments=8 on 16 x 16: 2 x 2 cells, constant within
    assert torch.equal(maps, cells.repeat_interleave(2, 1).repeat_interleave(2, 2))
    top = cells[0].flatten().topk(16).indices
    assert ((top // 8 < 4) & (top % 8 < 4)).all()  # the 16 top cells are the quadrant's
    assert cells[0, :4, :4].min() > 0.8 and cells[0, 4:].max() < 0.1 and cells[0, :, 4:].max() < 0.1
    assert torch.equal(maps[1], torch.zeros(16, 16))
    again = posthoc_map(Quadrant(), x, "lime", target=torch.tensor([1, 0]), n_samples=150)
    assert torch.equal(maps, again)
