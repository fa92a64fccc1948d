"""evaluate_runs streams every metric for every method; the `selfcam evaluate` command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset
from typer.testing import CliRunner

from selfcam.cli import app
from selfcam.data import box_mask, load_dataset
from selfcam.errors import ConfigError, InputError
from selfcam.evaluate import METRICS, EvalConfig, evaluate_runs
from selfcam.metrics import iou, pointing_game
from selfcam.model import create_model
from selfcam.checkpoint import save_checkpoint


def _model(method: str = "plain", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(method, "resnet8", 10, in_chans=1, backbone_kwargs={"stem_stride": 2}).eval()


def test_streaming_means_equal_one_big_batch() -> None:
    data = load_dataset("cluttered-digits", "test", 24, size=32)
    model = _model()
    cfg = EvalConfig(methods=("self",), metrics=("accuracy", "pointing_game", "iou"), batch_size=5)
    got = evaluate_runs({"m": model}, data, cfg)["runs"]["m"]["results"]["self"]
    x = torch.stack([data[i][0] for i in range(24)])
    with torch.no_grad():
        out = model.explain(x)
    masks = box_mask(data.boxes, 32)
    assert got["accuracy"] == pytest.approx((out.logits.argmax(1) == data.labels).float().mean().item())
    assert got["pointing_game"] == pytest.approx(pointing_game(out.heatmap, masks).mean().item())
    assert got["iou"] == pytest.approx(iou(out.heatmap, masks).mean().item(), abs=1e-6)


def test_every_metric_and_several_runs_give_stability() -> None:
    data = load_dataset("cluttered-digits", "test", 6, size=32)
    runs = {"a": _model("se", 0), "b": _model("se", 1), "p": _model("plain", 2)}
    cfg = EvalConfig(methods=("self", "cam", "gradcam"), metrics=METRICS, batch_size=3, steps=4)
    result = evaluate_runs(runs, data, cfg)
    assert result["n_items"] == 6
    assert set(result["runs"]["a"]["results"]) == {"self", "gradcam"}  # classic CAM needs a plain model
    assert set(result["runs"]["p"]["results"]) == {"self", "cam", "gradcam"}
    # untrained models: no image is confidently correct, so the grid pointing game skips them and says why
    assert set(result["grid"]["skipped"]) == {"a", "b", "p"} and "needs 4 classes" in result["grid"]["skipped"]["p"]
    for row in result["runs"]["p"]["results"].values():
        assert set(METRICS) - {"grid_pointing_game"} <= row.keys()
        assert 0 <= row["pointing_game"] <= 1 and 0 <= row["deletion_auc"] <= 1
    assert 0 <= result["stability"]["self"]["iou"] <= 1


def test_sanity_check_reports_rank_correlations_per_layer() -> None:
    data = load_dataset("cluttered-digits", "test", 4, size=32)
    cfg = EvalConfig(methods=("self",), metrics=("accuracy",), sanity_images=2)
    steps = evaluate_runs({"m": _model()}, data, cfg)["sanity"]["m"]["self"]
    assert len(steps) >= 3 and all(-1 <= rho <= 1 for _, rho in steps)


def test_bad_configuration_and_empty_data() -> None:
    with pytest.raises(ConfigError, match="unknown or no method"):
        EvalConfig(methods=("gradcam3",))
    with pytest.raises(ConfigError, match="unknown or no metric"):
        EvalConfig(metrics=("accuracy", "vibes"))
    empty = TensorDataset(torch.zeros(0, 1, 32, 32), torch.zeros(0, dtype=torch.long), torch.zeros(0, 4, dtype=torch.long))
    with pytest.raises(InputError, match="empty"):
        evaluate_runs({"m": _model()}, empty, EvalConfig())


def test_evaluate_command_writes_json(tmp_path: Path) -> None:
    for name, seed in (("se1", 0), ("se2", 1)):
        save_checkpoint(_model("se", seed), tmp_path / name, data={"name": "cluttered-digits", "size": 32})
    result = CliRunner().invoke(app, [
        "evaluate", "--checkpoint", str(tmp_path / "se1"), "--checkpoint", str(tmp_path / "se2"),
        "--n", "8", "--methods", "self,gradcam", "--metrics", "accuracy,pointing_game,iou,deletion_auc",
        "--steps", "4", "--out", str(tmp_path / "eval"),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert doc["n_items"] == 8 and set(doc["runs"]) == {"se1", "se2"}
    assert set(doc["runs"]["se1"]["results"]) == {"self", "gradcam"}
    assert "stability" in doc and "se1/self" in result.output


def test_evaluate_command_rejects_class_count_mismatch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    save_checkpoint(create_model("plain", "resnet8", 3, in_chans=1), tmp_path / "three")
    result = CliRunner().invoke(app, ["evaluate", "--checkpoint", str(tmp_path / "three"), "--n", "4", "--out", str(tmp_path / "e")])
    assert result.exit_code == 2
    assert "has 3 classes" in result.output and "Traceback" not in result.output
