"""Metrics against hand values (the post-hoc map tests live in test_posthoc.py)."""

from __future__ import annotations

import pytest
import torch

from selfcam.data import box_mask
from selfcam.errors import InputError
from selfcam.metrics import accuracy, iou, pointing_game


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
