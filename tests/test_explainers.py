"""The one explainer interface (selfcam.explainers) and the evaluation of every task (evaluate_task)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F_
from typer.testing import CliRunner

from selfcam.checkpoint import save_checkpoint
from selfcam.cli import app
from selfcam.data import load_dataset
from selfcam.errors import ConfigError
from selfcam.evaluate import EvalConfig, evaluate_task, task_metrics
from selfcam.explainers import EXPLAINERS, check_methods, explain
from selfcam.heads import minmax
from selfcam.model import create_model
from selfcam.posthoc import METHOD_TASKS, POSTHOC_METHODS
from selfcam.tasks import get_task, list_tasks
from selfcam.video import create_video_model


def _video_model(frames: int = 3):
    torch.manual_seed(0)
    # stem stride 1 and output stride 1: the feature map has the clip's own size, grad-cam resizes nothing
    return create_video_model("resnet8", 3, 1, frames=frames, backbone_kwargs={"stem_stride": 1, "output_stride": 1}).eval()


def test_the_registry_holds_self_and_every_posthoc_method() -> None:
    assert list(EXPLAINERS) == ["self", "self-class", *POSTHOC_METHODS]
    assert EXPLAINERS["self"].tasks is None  # the model's own map: every task
    assert EXPLAINERS["self-class"].tasks == ("image",)  # its class-specific map: image heads
    assert METHOD_TASKS["gradcam"] == METHOD_TASKS["gradcam++"] == ("image", "video")
    assert all(METHOD_TASKS[m] == ("image",) for m in ("cam", "scorecam", "rise", "lime"))


def test_gradcam_on_clips_equals_a_hand_computed_3d_gradcam() -> None:
    model = _video_model()
    x = torch.randn(2, 3, 1, 12, 12)
    target = torch.tensor([0, 2])
    feats = model.backbone(x).detach().requires_grad_(True)  # F (N, K, T, h, w), h = H here
    logits = model.head(feats).logits
    (grad,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), feats)
    weights = grad.mean(dim=(2, 3, 4))  # Grad-CAM: mean gradient over time and space, per channel
    expected = minmax(F_.relu(torch.einsum("nk,nkthw->nthw", weights, feats.detach())))  # each frame min-max
    e = explain(model, x, method="gradcam", target=target)
    assert e.maps.shape == (2, 3, 12, 12) and e.logits.shape == (2, 3)
    torch.testing.assert_close(e.maps, expected, atol=2e-5, rtol=0)


def test_self_map_of_a_clip_is_the_model_explain_output() -> None:
    model = _video_model()
    x = torch.randn(2, 3, 1, 12, 12)
    e = explain(model, x)
    torch.testing.assert_close(e.maps, model.explain(x).heatmap)


@pytest.mark.parametrize(("method", "message"), [
    ("rise", "rise explains image models; this is a video model"),
    ("cam", "cam explains image models; this is a video model"),
    ("vibes", "unknown method 'vibes'"),
])  # fmt: skip
def test_methods_that_do_not_apply_are_refused_in_one_line(method: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_methods(_video_model(), ("self", method))


def test_cam_needs_a_plain_image_model() -> None:
    with pytest.raises(ConfigError, match="classic CAM needs a 'plain' model"):
        explain(create_model("se", "resnet8", 3, 1), torch.randn(1, 1, 16, 16), method="cam")
    plain = create_model("plain", "resnet8", 3, 1).eval()
    x = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(explain(plain, x, method="cam").maps, plain.explain(x).heatmap)  # CAM of the predicted class


@pytest.fixture(scope="module")
def task_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[torch.nn.Module, Path]]:
    """An untrained model and a saved run of every task (its data recorded as fit would: name, size)."""
    runs = {}
    for name in list_tasks():
        t = get_task(name)
        data = load_dataset(t.default_data, "test", 8, seed=0, size=32)
        torch.manual_seed(0)
        model = t.create(data, t.methods[0], "resnet8", {"stem_stride": 2}, {}).eval()
        path = tmp_path_factory.mktemp(name)
        save_checkpoint(model, path, extra={"data": {"name": t.default_data, "size": 32}})
        runs[name] = (model, path)
    return runs


@pytest.mark.parametrize("task", ["image", "attributes", "video", "asd"])
def test_every_task_is_scored_into_one_document_family(task: str, task_runs) -> None:
    t = get_task(task)
    model = task_runs[task][0]
    data = load_dataset(t.default_data, "test", 8, seed=0, size=32)
    methods = {"video": ("self", "gradcam"), "image": ("self", "gradcam")}.get(task, ("self",))
    doc = evaluate_task({"a": model, "b": model}, data, EvalConfig(methods=methods, metrics=task_metrics(task), batch_size=4))
    assert doc["task"] == task and doc["n_items"] == 8 and set(doc["runs"]) == {"a", "b"}
    for run in doc["runs"].values():
        assert set(run["results"]) == set(methods)
        for row in run["results"].values():
            values = [v for k, v in row.items() if k in task_metrics(task)]
            assert values and all(isinstance(v, float) for v in values)
    a, b = doc["runs"]["a"]["results"], doc["runs"]["b"]["results"]
    for m in methods:  # the same model twice: the same numbers
        assert {k: v for k, v in a[m].items() if "ms_per" not in k} == {k: v for k, v in b[m].items() if "ms_per" not in k}
    if task == "attributes":
        assert set(doc["runs"]["a"]["attributes"]) == set(data.class_names)
    if task == "asd":
        assert {"modality_importance", "silence_check"} <= set(doc["runs"]["a"])


def test_clip_localization_by_hand() -> None:
    """A model whose map is the box itself scores 1 on every localization metric."""

    class BoxModel(torch.nn.Module):
        task = "video"

        def __init__(self, boxes: torch.Tensor) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.boxes = boxes
            self.config = type("C", (), {"num_classes": 10, "in_chans": 1})()

        def explain(self, x: torch.Tensor):
            from selfcam.data import box_mask

            n, t = x.shape[:2]
            maps = box_mask(self.boxes[:n].flatten(0, 1), tuple(x.shape[-2:])).float().view(n, t, *x.shape[-2:])
            logits = torch.zeros(n, 10)
            logits[:, 3] = 1
            return type("O", (), {"logits": logits, "heatmap": maps})()

    data = load_dataset("synthetic-clips", "test", 6, seed=0, size=32)
    doc = evaluate_task({"box": BoxModel(data.boxes)}, data, EvalConfig(metrics=task_metrics("video"), batch_size=6))
    row = doc["runs"]["box"]["results"]["self"]
    assert row["accuracy"] == pytest.approx(float((data.labels == 3).float().mean()))
    for k in ("pointing_game", "pointing_game_15px", "energy_pointing_game", "iou", "dice"):
        assert row[k] == pytest.approx(1.0), k
    assert doc["n_frames"] == 6 * data.num_frames


def test_mixed_tasks_and_foreign_metrics_are_refused(task_runs) -> None:
    data = load_dataset("synthetic-clips", "test", 4, seed=0, size=32)
    with pytest.raises(ConfigError, match="one task at a time"):
        evaluate_task({"v": task_runs["video"][0], "i": task_runs["image"][0]}, data, EvalConfig())
    with pytest.raises(ConfigError, match="deletion_auc do not apply to video runs"):
        evaluate_task({"v": task_runs["video"][0]}, data, EvalConfig(metrics=("accuracy", "deletion_auc")))
    with pytest.raises(ConfigError, match="own maps only"):
        evaluate_task({"a": task_runs["asd"][0]}, load_dataset("speaker-clips", "test", 4, seed=0, size=32),
                      EvalConfig(methods=("self", "gradcam")))  # fmt: skip


@pytest.mark.parametrize("task", ["attributes", "video", "asd"])
def test_evaluate_command_scores_every_task_on_its_own_data(task: str, task_runs, tmp_path: Path) -> None:
    path = task_runs[task][1]
    extra = ["--methods", "self,gradcam"] if task == "video" else []
    r = CliRunner().invoke(app, ["evaluate", "--checkpoint", str(path), "--n", "6", "--batch-size", "3", "--out", str(tmp_path), *extra])
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "evaluation.json").read_text())
    assert doc["task"] == task and doc["dataset"] == get_task(task).default_data and doc["n_items"] == 6
    assert set(doc["runs"][path.name]["results"]) == ({"self", "gradcam"} if task == "video" else {"self"})
