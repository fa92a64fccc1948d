"""Metrics against hand values; post-hoc maps against the classic CAM identity; no hook leaks."""

from __future__ import annotations

import pytest
import torch

from selfcam.data import box_mask
from selfcam.errors import ConfigError, InputError
from selfcam.metrics import accuracy, iou, pointing_game
from selfcam.model import create_model
from selfcam.posthoc import POSTHOC_METHODS, posthoc_map


def test_pointing_game_hand_values() -> None:
    maps = torch.zeros(3, 4, 4)
    maps[0, 1, 1] = 1.0  # inside the box
    maps[1, 3, 3] = 1.0  # outside, two pixels from the box corner (2, 2) diagonally
    maps[2, 0, 3] = 1.0  # outside
    masks = box_mask(torch.tensor([[0, 0, 3, 3]] * 3), 4)
    assert pointing_game(maps, masks).tolist() == [1.0, 0.0, 0.0]
    assert pointing_game(maps, masks, tolerance=1).tolist() == [1.0, 0.0, 1.0]
    assert pointing_game(maps, masks, tolerance=2).tolist() == [1.0, 1.0, 1.0]


def test_iou_hand_values() -> None:
    maps = torch.tensor([[[0.9, 0.6, 0.1, 0.0]]])  # >= 0.5: first two pixels
    masks = torch.tensor([[[True, False, True, False]]])
    assert iou(maps, masks).tolist() == pytest.approx([1 / 3])
    assert iou(maps, masks, threshold=0.95).tolist() == [0.0]
    empty = torch.zeros(1, 1, 4, dtype=torch.bool)
    assert iou(torch.zeros(1, 1, 4), empty).tolist() == [0.0]


def test_metric_shape_errors_and_accuracy() -> None:
    with pytest.raises(InputError, match="maps and masks"):
        iou(torch.zeros(1, 4, 4), torch.zeros(1, 4, 5, dtype=torch.bool))
    assert accuracy(torch.tensor([[0.1, 0.9], [2.0, 1.0]]), torch.tensor([1, 1])).tolist() == [1.0, 0.0]


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


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


@pytest.mark.parametrize("method", POSTHOC_METHODS)
def test_every_posthoc_method_range_and_no_hooks(method: str) -> None:
    model = create_model("plain", "resnet8", 3, in_chans=1).eval()
    maps = posthoc_map(model, torch.randn(2, 1, 16, 16), method)
    assert maps.shape == (2, 16, 16) and maps.min() >= 0 and maps.max() <= 1
    assert _hooks(model) == 0 and not model.training


def test_posthoc_hooks_removed_when_the_call_raises() -> None:
    model = create_model("plain", "resnet8", 3, in_chans=1)
    with pytest.raises(InputError, match="target must be"):
        posthoc_map(model, torch.randn(2, 1, 16, 16), "gradcam", target=torch.tensor([0, 99]))
    assert _hooks(model) == 0 and model.training

    def explode(*args: object) -> None:
        raise RuntimeError("boom inside the forward pass")

    hook = model.head.register_forward_hook(explode)  # the user's own hook fails mid-call
    with pytest.raises(RuntimeError, match="boom"):
        posthoc_map(model, torch.randn(2, 1, 16, 16), "gradcam", target=torch.tensor([0, 1]))
    hook.remove()
    assert _hooks(model) == 0 and model.training


def test_posthoc_errors() -> None:
    model = create_model("se", "resnet8", 3, in_chans=1)
    with pytest.raises(ConfigError, match="unknown post-hoc"):
        posthoc_map(model, torch.randn(1, 1, 16, 16), "lime2")
    with pytest.raises(ConfigError, match="plain"):
        posthoc_map(model, torch.randn(1, 1, 16, 16), "cam")
