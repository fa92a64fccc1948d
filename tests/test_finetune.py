"""Fine-tuning recipes of ``fit`` (issue 14.4): a frozen backbone, the head first then everything,
a lower backbone learning rate; resumed runs repeat uninterrupted ones bit for bit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import selfcam.train as T
from selfcam.cli import app
from selfcam.data import load_dataset
from selfcam.errors import ConfigError
from selfcam.model import SelfExplainer, create_model
from selfcam.train import SelfcamModule, TrainConfig, fit, latest_state, seed_all

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data() -> tuple[Any, Any]:
    return load_dataset("cluttered-digits", "train", 128, seed=0, size=32), load_dataset("cluttered-digits", "val", 32, seed=0, size=32)


def _model() -> SelfExplainer:
    seed_all(0)
    return create_model("se", "resnet8", 10, 1, {"stem_stride": 2}, reduction=4)


def _part(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_frozen_backbone_keeps_its_weights_and_batchnorm_statistics(data: tuple[Any, Any]) -> None:
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit(model, *data, TrainConfig(epochs=1, batch_size=32, freeze_backbone=True), progress=False)
    after = model.state_dict()
    assert _same(_part(after, "backbone."), _part(before, "backbone."))  # running_mean / var included
    assert any("running_mean" in k for k in _part(before, "backbone."))
    assert not _same(_part(after, "head."), _part(before, "head."))
    assert all(p.requires_grad for p in model.parameters())  # handed back as it came


def test_the_frozen_backbone_runs_in_eval_mode_and_gets_no_gradient(data: tuple[Any, Any]) -> None:
    model = _model().train()
    module = SelfcamModule(model, TrainConfig(epochs=3, head_epochs=2, batch_size=32), total_steps=12)
    assert module.frozen and not model.backbone.training and model.head.training
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    module.set_frozen(False)
    assert model.backbone.training and all(p.requires_grad for p in model.parameters())


def test_a_lower_backbone_learning_rate_is_a_second_parameter_group() -> None:
    model = _model()
    module = SelfcamModule(model, TrainConfig(epochs=1, lr=1e-2, backbone_lr_scale=0.1), total_steps=10)
    cfg = module.configure_optimizers()
    groups = cfg["optimizer"].param_groups
    assert [g["max_lr"] for g in groups] == [pytest.approx(1e-2), pytest.approx(1e-3)]
    backbone = {id(p) for p in model.backbone.parameters()}
    assert {id(p) for p in groups[1]["params"]} == backbone
    assert not backbone & {id(p) for p in groups[0]["params"]}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def _crash_at(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    original = T.SelfcamModule.training_step

    def training_step(self: T.SelfcamModule, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.step_offset + self.global_step == step:
            raise RuntimeError("simulated crash")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(T.SelfcamModule, "training_step", training_step)


def test_head_epochs_then_unfreeze_resumes_bit_identically(tmp_path: Path, data: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = TrainConfig(epochs=2, batch_size=32, head_epochs=1, backbone_lr_scale=0.1)  # 4 steps per epoch
    initial = {k: v.clone() for k, v in _model().state_dict().items()}
    reference = tmp_path / "reference"
    fit(_model(), *data, cfg, reference, progress=False)
    crashed = tmp_path / "crashed"
    with monkeypatch.context() as m:
        _crash_at(m, 4)  # the first step of epoch 1, after the head-only epoch's state
        with pytest.raises(RuntimeError, match="simulated crash"):
            fit(_model(), *data, cfg, crashed, progress=False)
    state = latest_state(crashed)
    assert state is not None and (state.epoch, state.batch) == (1, 0)
    saved = _part(load_file(str(state.path / T.STATE_TENSORS)), "model.")
    assert _same(_part(saved, "backbone."), _part(initial, "backbone."))  # epoch 0: the head alone
    assert not _same(_part(saved, "head."), _part(initial, "head."))
    fit(_model(), *data, cfg, crashed, progress=False, resume=True)
    final = load_file(str(crashed / "model.safetensors"))
    assert _same(final, load_file(str(reference / "model.safetensors")))
    assert not _same(_part(final, "backbone."), _part(initial, "backbone."))  # epoch 1: everything
    assert json.loads((crashed / "config.json").read_text())["train"]["head_epochs"] == 1


def test_a_state_written_before_the_recipes_existed_still_resumes(tmp_path: Path, data: tuple[Any, Any],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    cfg = TrainConfig(epochs=2, batch_size=32)
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        _crash_at(m, 4)
        with pytest.raises(RuntimeError):
            fit(_model(), *data, cfg, run, progress=False)
    state = latest_state(run)
    assert state is not None
    doc = json.loads((state.path / T.STATE_JSON).read_text())
    for key in ("freeze_backbone", "head_epochs", "backbone_lr_scale"):
        del doc["train"][key]
    (state.path / T.STATE_JSON).write_text(json.dumps(doc))
    history = fit(_model(), *data, cfg, run, progress=False, resume=True)
    assert [row["epoch"] for row in history] == [0, 1]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"epochs": 2, "head_epochs": 2}, "must be below epochs"),
        ({"epochs": 3, "head_epochs": 1, "freeze_backbone": True}, "not combined with freeze_backbone"),
        ({"head_epochs": 1, "devices": 2}, "DDP"),
        ({"backbone_lr_scale": 0.0}, "backbone_lr_scale must be > 0"),
        ({"backbone_lr_scale": float("nan")}, "backbone_lr_scale must be > 0"),
        ({"head_epochs": -1}, "head_epochs must be an integer >= 0"),
    ],
)
def test_recipes_that_cannot_run_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**options)


def test_a_model_without_a_backbone_cannot_be_frozen() -> None:
    class Bare(torch.nn.Module):
        task, config = "image", None

    with pytest.raises(ConfigError, match="no backbone with weights"):
        T.backbone_of(Bare())


def test_cli_fine_tuning_options_are_recorded_and_kept_on_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    base = ["train", "--method", "se", "--backbone", "resnet8", "--backbone-kwargs", '{"stem_stride": 2}', "--epochs", "2",
            "--train-size", "64", "--val-size", "16", "--image-size", "32", "--batch-size", "32", "--quiet"]  # fmt: skip
    with monkeypatch.context() as m:
        _crash_at(m, 2)  # 2 steps per epoch: after the head-only epoch
        result = CliRunner().invoke(app, [*base, "--out", str(run), "--head-epochs", "1", "--backbone-lr-scale", "0.1"])
    assert isinstance(result.exception, RuntimeError), result.output
    result = CliRunner().invoke(app, ["train", "--resume", str(run), "--freeze-backbone"])
    assert result.exit_code == 2 and "--freeze-backbone True (the run has False)" in result.output, result.output
    result = CliRunner().invoke(app, ["train", "--resume", str(run), "--features", "layer4", "--pretrained", "w.pth"])
    assert result.exit_code == 2 and "--features layer4 (the run has None), --pretrained w.pth (the run has None)" in result.output, result.output
    result = CliRunner().invoke(app, ["train", "--resume", str(run), "--quiet"])
    assert result.exit_code == 0, result.output
    train = json.loads((run / "config.json").read_text())["train"]
    assert (train["head_epochs"], train["backbone_lr_scale"], train["freeze_backbone"]) == (1, 0.1, False)
    result = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "bad"), "--head-epochs", "2"])
    assert result.exit_code == 2 and "must be below epochs" in result.output, result.output
