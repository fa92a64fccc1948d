"""The task registry and the one run format: every task through create, fit, save and load; a head
registered here goes through the shared pipeline (and the property tests) without editing them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F_
from torch import Tensor

import selfcam
from selfcam.checkpoint import CONFIG, load_checkpoint, read_config, save_checkpoint
from selfcam.data import load_dataset
from selfcam.errors import CheckpointError, ConfigError
from selfcam.heads import HEADS, ExplainedOutput, Head, minmax, register_head
from selfcam.model import create_model
from selfcam.tasks import TASKS, get_task, list_tasks, task_of
from selfcam.train import TrainConfig, fit, seed_all


@register_head("test-maxpool")
class MaxPoolHead(Head):
    """A head written by a user: max-pooled features, the map is the channel-mean of ReLU(F)."""

    task: ClassVar[str] = "image"

    def __init__(self, in_channels: int, num_classes: int, scale: float = 1.0) -> None:
        super().__init__(in_channels, num_classes)
        self.scale = scale

    def forward(self, features: Tensor, image: Tensor, pre_features: Tensor | None = None) -> ExplainedOutput:
        logits = self.fc(self.scale * features.amax(dim=(-2, -1)))
        return ExplainedOutput(logits=logits, heatmap=minmax(F_.relu(features).mean(1)))


# small data for every task: (load_dataset spec, options, create() arguments)
SMALL: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "image": ("cluttered-digits", {"size": 32}, {"method": "se", "head_kwargs": {"reduction": 4}}),
    "attributes": ("synthetic-faces", {"size": 32}, {"method": "se-multilabel", "head_kwargs": {}}),
    "video": ("synthetic-clips", {"size": 32, "frames": 4}, {"method": "se", "head_kwargs": {}}),
    "asd": ("speaker-clips", {"size": 32, "frames": 4}, {"method": "se", "head_kwargs": {}}),
}


def test_the_built_in_tasks_are_registered_in_order() -> None:
    assert list_tasks()[:4] == ["image", "attributes", "video", "asd"]
    assert set(SMALL) <= set(TASKS)
    with pytest.raises(ConfigError, match="unknown task 'speech'; choose one of image, attributes, video, asd"):
        get_task("speech")


@pytest.mark.parametrize("name", list(SMALL))
def test_every_task_trains_saves_and_loads_through_the_shared_path(tmp_path: Path, name: str) -> None:
    task = get_task(name)
    spec, options, create = SMALL[name]
    assert spec == task.default_data
    train = load_dataset(spec, "train", 16, seed=0, **options)
    seed_all(0)
    model = task.create(train, create["method"], "resnet8", {"stem_stride": 2}, create["head_kwargs"])
    assert task_of(model) is task and model.task == name
    history = fit(model, train, None, TrainConfig(epochs=1, batch_size=8), tmp_path / "run", progress=False)
    assert len(history) == 1
    loaded, doc = load_checkpoint(tmp_path / "run")
    assert doc["task"] == name and doc["format_version"] == 2 and doc["model"] == model.config
    assert doc["data"]["name"] == spec and doc["data"]["train_size"] == 16 and doc["data"]["size"] == 32
    assert doc["data"]["class_names"] == list(train.class_names) and len(doc["data"]["mean"]) == train.in_chans
    inputs = task.example_inputs(model, 3, 32)
    with torch.no_grad():
        a, b = model.eval()(*inputs), loaded(*inputs)
    torch.testing.assert_close(a.logits, b.logits)
    torch.testing.assert_close(a.heatmap, b.heatmap)
    assert a.logits.shape[0] == 3


def test_a_task_refuses_data_of_another_task(tmp_path: Path) -> None:
    faces = load_dataset("synthetic-faces", "train", 8, size=32)
    model = create_model("se", "resnet8", 5, 3)
    with pytest.raises(ConfigError, match="training data synthetic-faces holds multilabel data; the image task trains on multiclass"):
        fit(model, faces, None, TrainConfig(epochs=1), tmp_path / "run", progress=False)
    with pytest.raises(ConfigError, match="'se-multilabel' is a head of the attributes task, not of image"):
        get_task("image").create(faces, "se-multilabel", "resnet8", {}, {})


def test_a_head_registered_by_a_user_goes_through_create_fit_save_load_and_export(tmp_path: Path) -> None:
    assert "test-maxpool" in HEADS and "test-maxpool" in selfcam.list_methods()
    assert "test-maxpool" in get_task("image").methods
    train = load_dataset("cluttered-digits", "train", 32, seed=0, size=32)
    seed_all(0)
    model = create_model("test-maxpool", "resnet8", 10, 1, {"stem_stride": 2}, scale=0.5)
    fit(model, train, None, TrainConfig(epochs=1, batch_size=16), tmp_path / "run", progress=False)
    loaded, doc = load_checkpoint(tmp_path / "run")
    assert isinstance(loaded.head, MaxPoolHead) and loaded.head.scale == 0.5 and doc["model"].head_kwargs == {"scale": 0.5}
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.explain(x).heatmap, model.eval().explain(x).heatmap)
    pytest.importorskip("onnxruntime")
    from selfcam.export import export_onnx, onnx_parity

    path = export_onnx(loaded, tmp_path / "m.onnx", 32)
    assert max(onnx_parity(loaded, path, torch.randn(3, 1, 32, 32)).values()) < 1e-4


def test_a_saved_model_loads_after_reset_classifier(tmp_path: Path) -> None:
    model = create_model("se", "resnet8", 10, 1, reduction=4).eval()
    assert model.get_classifier() is model.head.fc
    model.reset_classifier(3)
    assert model.config.num_classes == 3 and model.get_classifier().out_features == 3
    save_checkpoint(model, tmp_path)
    loaded, doc = load_checkpoint(tmp_path)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert loaded(x).logits.shape == (2, 3)
        torch.testing.assert_close(loaded(x).logits, model(x).logits)
        feats = model.forward_features(x)
        torch.testing.assert_close(model.forward_head(feats, x).logits, model(x).logits)
    with pytest.raises(ConfigError, match="num_classes must be an integer >= 1"):
        model.reset_classifier(0)


def test_runs_of_format_1_keep_loading_and_a_newer_format_is_one_clear_line(tmp_path: Path) -> None:
    model = create_model("plain", "resnet8", 10, 1).eval()
    save_checkpoint(model, tmp_path, data={"name": "cluttered-digits", "size": 32})
    doc = json.loads((tmp_path / CONFIG).read_text())
    old = {k: v for k, v in doc.items() if k not in ("format", "format_version", "task")}  # what selfcam wrote before
    (tmp_path / CONFIG).write_text(json.dumps(old))
    loaded, read = load_checkpoint(tmp_path)
    assert read["task"] == "image" and read["model"] == model.config and read["data"]["size"] == 32
    (tmp_path / CONFIG).write_text(json.dumps({**doc, "format_version": 3}))
    with pytest.raises(CheckpointError, match="run format 'selfcam-run' version 3; this selfcam .* reads version 2"):
        read_config(tmp_path)
    (tmp_path / CONFIG).write_text(json.dumps({**doc, "task": "attributes"}))
    with pytest.raises(CheckpointError, match="method 'plain' belongs to the image task, the run says attributes"):
        read_config(tmp_path)
