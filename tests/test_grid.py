"""The grid pointing game (B-cos / CoDA-Nets protocol): grid construction, scoring by hand, evaluate."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from selfcam.errors import ConfigError, InputError
from selfcam.evaluate import EvalConfig, evaluate_runs, grid_scores
from selfcam.explainers import explain
from selfcam.metrics import confident_correct, grid_cell_masks, grid_pointing_game, make_grids, tile_grid
from selfcam.model import create_model


def test_confident_correct_hand_values() -> None:
    # softmax of (log 9, 0) = (0.9, 0.1); of (0, 0) = (0.5, 0.5), ties go to class 0
    logits = torch.tensor([[9.0, 1.0], [1.0, 9.0], [1.0, 1.0], [1.0, 9.0]]).log()
    target = torch.tensor([0, 1, 0, 0])
    assert confident_correct(logits, target, 0.9).tolist() == [True, True, False, False]
    assert confident_correct(logits, target, 0.5).tolist() == [True, True, True, False]
    with pytest.raises(ConfigError, match="confidence"):
        confident_correct(logits, target, 1.5)


def test_grids_hold_eligible_images_of_distinct_classes_and_are_seeded() -> None:
    labels = torch.arange(60) % 6  # six classes, ten images each
    eligible = torch.arange(60) % 4 != 0  # every fourth image is not eligible
    grids = make_grids(labels, eligible, grid=2, count=50, seed=3)
    assert grids.shape == (50, 4) and grids.dtype == torch.long
    for row in grids:
        assert eligible[row].all()
        assert len(set(labels[row].tolist())) == 4  # distinct classes in a grid
    assert torch.equal(grids, make_grids(labels, eligible, grid=2, count=50, seed=3))
    assert not torch.equal(grids, make_grids(labels, eligible, grid=2, count=50, seed=4))
    # positions and classes are both drawn: every class shows up in every cell over 50 grids
    for k in range(4):
        assert set(labels[grids[:, k]].tolist()) == set(range(6))
    three = make_grids(torch.arange(90) % 9, torch.ones(90, dtype=torch.bool), grid=3, count=5, seed=0)
    assert three.shape == (5, 9) and all(len(set((row % 9).tolist())) == 9 for row in three)


def test_too_few_classes_and_bad_arguments_are_refused() -> None:
    labels = torch.tensor([0, 1, 2, 3, 3])
    with pytest.raises(ConfigError, match="needs 4 classes .* 3 have one"):
        make_grids(labels, torch.tensor([True, True, True, False, False]), grid=2)
    with pytest.raises(ConfigError, match="grid must be"):
        make_grids(labels, torch.ones(5, dtype=torch.bool), grid=1)
    with pytest.raises(InputError, match="must both be"):
        make_grids(labels, torch.ones(4, dtype=torch.bool))


def test_tile_grid_puts_image_k_in_cell_k_row_major() -> None:
    images = torch.arange(4.0).view(1, 4, 1, 1, 1).expand(1, 4, 1, 2, 3).contiguous()  # image k is all k, 2 x 3
    grid = tile_grid(images, 2)
    assert grid.shape == (1, 1, 4, 6)
    assert grid[0, 0].tolist() == [[0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1], [2, 2, 2, 3, 3, 3], [2, 2, 2, 3, 3, 3]]
    with pytest.raises(InputError, match="takes 4 images"):
        tile_grid(images[:, :3], 2)


def test_cell_masks_hand_values() -> None:
    masks = grid_cell_masks(torch.tensor([0, 3, 5]), 3, (3, 6))
    assert masks[0].int().tolist() == [[1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]]
    assert masks[1].int().tolist() == [[0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]]
    assert masks[2].int().tolist() == [[0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0]]


def test_grid_pointing_game_hand_values() -> None:
    m = torch.tensor([[0.0, 1.0, 0.5, 0.5],
                      [1.0, 0.0, 0.0, 0.0],
                      [0.0, 0.0, 0.25, 0.0],
                      [0.75, 0.0, 0.0, 0.0]])  # fmt: skip
    # cell masses: top-left 2, top-right 1, bottom-left 0.75, bottom-right 0.25; total 4
    maps = torch.stack([m, m, m, m, torch.zeros(4, 4), m - 0.5])
    got = grid_pointing_game(maps, torch.tensor([0, 1, 2, 3, 0, 0]), 2)
    # the last map keeps only its positive part: 0.5 (top-left), 0.5 (top-left), 0.25 (bottom-left): 1 / 1.25
    assert torch.allclose(got, torch.tensor([0.5, 0.25, 0.1875, 0.0625, 0.0, 0.8]))
    with pytest.raises(InputError, match="cell indices"):
        grid_pointing_game(maps[:1], torch.tensor([4]), 2)
    with pytest.raises(InputError, match="NaN"):
        grid_pointing_game(torch.full((1, 4, 4), float("nan")), torch.tensor([0]), 2)


def test_a_class_agnostic_map_scores_one_over_the_cell_count() -> None:
    """The same map for every cell of a grid: its shares sum to 1 over the cells, so the mean is 1 / g**2."""
    torch.manual_seed(0)
    for g in (2, 3):
        m = torch.rand(1, 6 * g, 6 * g).expand(g * g, -1, -1)
        assert grid_pointing_game(m, torch.arange(g * g), g).mean().item() == pytest.approx(1 / g**2)


def _labelled_by_the_model(n: int = 40, classes: int = 10):
    """A random plain model and images labelled with its own predictions (so all are correct), among
    at least 4 classes: seeds are tried until the predictions cover 4 classes."""
    for seed in range(20):
        torch.manual_seed(seed)
        model = create_model("plain", "resnet8", classes, in_chans=1, backbone_kwargs={"stem_stride": 2}).eval()
        x = torch.randn(n, 1, 16, 16) * 3
        with torch.no_grad():
            pred = model(x).logits.argmax(1)
        if len(pred.unique()) >= 4:
            return model, TensorDataset(x, pred)
    raise AssertionError("no seed gave 4 predicted classes")


def test_evaluate_scores_every_class_specific_method_on_the_grids_it_draws() -> None:
    model, data = _labelled_by_the_model()
    cfg = EvalConfig(methods=("self", "self-class", "gradcam"), metrics=("accuracy", "grid-pointing-game"),
                     batch_size=8, grid_count=6, grid_confidence=0.0, grid_seed=1)  # fmt: skip
    result = evaluate_runs({"m": model}, data, cfg)
    rows = result["runs"]["m"]["results"]
    assert "grid_pointing_game" not in rows["self"]  # class-agnostic: left out
    assert result["grid"] == {"size": "2x2", "count": 6, "confidence": 0.0, "seed": 1, "eligible": {"m": 40}, "skipped": {}}
    # by hand: the same grids, each tiled and explained once per cell for that cell's class
    x, y = data.tensors
    grids = make_grids(y, torch.ones(40, dtype=torch.bool), 2, 6, seed=1)
    for method in ("self-class", "gradcam"):
        scores = []
        for row in grids:
            tiled = tile_grid(x[row][None], 2)
            for k in range(4):
                maps = explain(model, tiled, method=method, target=y[row][k : k + 1]).maps
                scores.append(grid_pointing_game(maps, torch.tensor([k]), 2))
        assert rows[method]["grid_pointing_game"] == pytest.approx(torch.cat(scores).mean().item(), abs=1e-5)
    # self-class and Grad-CAM of a plain model are the same map (docs/methods.md), so the same score
    assert rows["self-class"]["grid_pointing_game"] == pytest.approx(rows["gradcam"]["grid_pointing_game"], abs=1e-5)


def test_a_run_without_enough_confident_classes_is_skipped_with_the_reason() -> None:
    model, data = _labelled_by_the_model()
    x, y = data.tensors
    wrong = TensorDataset(x, (y + 1) % 10)  # no image is correct
    doc = grid_scores({"m": model}, wrong, EvalConfig(methods=("self-class",), grid_confidence=0.0))
    assert doc["eligible"] == {"m": 0} and doc["scores"] == {}
    assert "needs 4 classes" in doc["skipped"]["m"]
    with pytest.raises(ConfigError, match="grid_size"):
        EvalConfig(grid_size=1)


def test_cli_evaluate_takes_the_grid_options(tmp_path) -> None:
    """`selfcam evaluate --metrics grid-pointing-game --grid-size 3 --grid-count 2 --grid-confidence 0 --grid-seed 4`
    reaches EvalConfig (recorded in evaluation.json's "grid"); a grid of one image is refused in one line."""
    import json

    from typer.testing import CliRunner

    from selfcam.cli import app

    run = tmp_path / "run"
    train = ["train", "--method", "plain", "--backbone", "resnet8", "--epochs", "1", "--train-size", "64", "--val-size", "16",
             "--image-size", "32", "--batch-size", "32", "--quiet", "--out", str(run)]  # fmt: skip
    assert CliRunner().invoke(app, train).exit_code == 0
    args = ["evaluate", "--checkpoint", str(run), "--n", "60", "--methods", "self-class", "--metrics", "accuracy,grid-pointing-game",
            "--grid-size", "3", "--grid-count", "2", "--grid-confidence", "0", "--grid-seed", "4"]  # fmt: skip
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    grid = json.loads((tmp_path / "eval" / "evaluation.json").read_text())["grid"]
    assert (grid["size"], grid["count"], grid["confidence"], grid["seed"]) == ("3x3", 2, 0.0, 4)
    result = CliRunner().invoke(app, [*args[:-8], "--grid-size", "1", "--out", str(tmp_path / "bad")])
    assert result.exit_code == 2 and "grid_size must be >= 2" in result.output, result.output
