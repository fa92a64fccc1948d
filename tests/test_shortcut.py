"""The shortcut benchmark and the grid pointing game's result files (selfcam.experiment)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from selfcam import experiment as E
from selfcam.checkpoint import save_checkpoint
from selfcam.data import box_mask, load_dataset
from selfcam.metrics import energy_pointing_game, pointing_game
from selfcam.model import create_model


def test_shortcut_experiment_against_a_hand_computation(tmp_path: Path) -> None:
    runs = {}
    for method, seed in (("plain", 0), ("se", 1)):
        torch.manual_seed(seed)
        model = create_model(method, "resnet8", 10, in_chans=1, backbone_kwargs={"stem_stride": 2}).eval()
        save_checkpoint(model, tmp_path / method, data={"name": "shortcut-digits", "size": 32})
        runs[method] = tmp_path / method
    doc = E.shortcut_experiment(runs, ["self", "gradcam"], tmp_path / "shortcut.json", n=12, seed=3, batch_size=5)
    assert json.loads((tmp_path / "shortcut.json").read_text()) == doc
    assert set(doc["methods"]) == {"plain/self", "plain/gradcam", "se/self", "se/gradcam"}
    assert doc["mark"] == 2 and doc["mark_area"] == pytest.approx(4 / 1024) and doc["tolerance"] == 8
    model = E.load_checkpoint(runs["se"])[0]
    row = doc["methods"]["se/self"]
    for key, corr in (("", 1.0), ("_decorrelated", 0.0)):
        data = load_dataset("shortcut-digits", "test", 12, seed=3, size=32, correlation=corr)
        with torch.no_grad():
            out = model.explain(data.normalize(data.images))
        acc = (out.logits.argmax(1) == data.labels).float().mean().item()
        assert row["acc_correlated" if corr else "acc_decorrelated"] == pytest.approx(acc)
        mark = energy_pointing_game(out.heatmap, box_mask(data.mark_boxes, 32)).mean().item()
        assert row[f"mark_energy{key}"] == pytest.approx(mark, abs=1e-6)
        if corr:
            digit = energy_pointing_game(out.heatmap, box_mask(data.boxes, 32)).mean().item()
            assert row["digit_energy"] == pytest.approx(digit, abs=1e-6)
            # tolerance: one feature cell (resnet8, stem stride 2: 32 px -> 4 x 4 cells of 8 px)
            hits = pointing_game(out.heatmap, box_mask(data.mark_boxes, 32), 8).mean().item()
            assert row["mark_pointing_game"] == pytest.approx(hits)
            assert row["digit_pointing_game"] == pytest.approx(pointing_game(out.heatmap, box_mask(data.boxes, 32), 8).mean().item())
    assert doc["methods"]["se/gradcam"]["acc_correlated"] == row["acc_correlated"]  # the model's, whatever the map


def _evaluation() -> dict:
    return {"dataset": "cluttered-digits", "split": "test", "n_items": 100,
            "grid": {"size": "2x2", "count": 10, "confidence": 0.9, "seed": 0, "eligible": {"p": 40, "l": 50}, "skipped": {}},
            "runs": {"p": {"results": {"self": {"accuracy": 0.9}, "self-class": {"accuracy": 0.9, "grid_pointing_game": 0.7},
                                       "gradcam": {"accuracy": 0.9, "grid_pointing_game": 0.7}}},
                     "l": {"results": {"self": {"accuracy": 0.8}, "self-class": {"accuracy": 0.8, "grid_pointing_game": 0.6},
                                       "gradcam": {"accuracy": 0.8, "grid_pointing_game": 0.65}}}}}  # fmt: skip


def test_grid_results_and_their_markdown(tmp_path: Path) -> None:
    (tmp_path / "evaluation.json").write_text(json.dumps(_evaluation()))
    results = tmp_path / "results"
    doc = E.write_grid_results(tmp_path / "evaluation.json", results / "grid-pointing-game.json", "selfcam evaluate x")
    assert doc["grid"] == "2x2" and doc["dataset"] == "cluttered-digits"
    assert doc["methods"] == {"p/self-class": {"score": 0.7}, "p/gradcam": {"score": 0.7},
                              "l/self-class": {"score": 0.6}, "l/gradcam": {"score": 0.65}}  # fmt: skip
    shortcut = {"experiment": "shortcut", "n_items": 10, "seed": 0, "mark": 4, "mark_area": 16 / 4096, "wall_seconds": 60,
                "command": "", "methods": {"p/self": {"acc_correlated": 0.99, "acc_decorrelated": 0.5, "mark_energy": 0.3,
                                                      "mark_energy_decorrelated": 0.2, "digit_energy": 0.4},
                                           "l/self": {"acc_correlated": 0.9, "acc_decorrelated": 0.85, "mark_energy": 0.1,
                                                      "mark_energy_decorrelated": 0.05, "digit_energy": 0.6}}}  # fmt: skip
    (results / "shortcut.json").write_text(json.dumps(shortcut))
    (results / "toy-accuracy.json").write_text(json.dumps({"experiment": "accuracy", "dataset": "toy", "seeds": 1,
        "recipe": vars(E.recipe_for("toy")), "command": "", "wall_seconds": 1.0, "methods": {}}))  # fmt: skip
    text = E.write_results_markdown(results, tmp_path / "RESULTS.md", plots=False)
    assert "| p | 90.00 | 0.700 | 0.700 | +0.000 |" in text and "| l | 80.00 | 0.600 | 0.650 | -0.050 |" in text
    assert "p +0.000: met; l -0.050: NOT met" in text and "selfcam evaluate x" in text
    assert "| p/self | 99.00 | 50.00 | 49.00 | 0.300 | 0.200 | 0.400 | - | - |" in text
    assert "p 49.0: met; l 5.0: NOT met" in text and "0.39 % of the image" in text
