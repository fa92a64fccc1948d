"""Explanation-supervised training (issue 15 item 5): the map loss on the in-forward map against the boxes.

The loss is checked against hand-computed shares, the supervised map against the head's own maps computed
directly, its gradient on every image head's own parameters, the masked items against an independent count,
and the training loop's total loss against the cross-entropy plus the weighted share computed by hand.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import TensorDataset

import selfcam.train as T
from selfcam.data import box_mask, load_dataset
from selfcam.errors import ConfigError
from selfcam.model import SelfExplainer, create_model
from selfcam.tasks import get_task
from selfcam.train import (SelfcamModule, TrainConfig, fit, latest_state, map_dice_loss, map_outside_share, mask_flags,
                           request_checkpoint, seed_all)

IMAGE = get_task("image")


def _model(method: str = "lfi") -> SelfExplainer:
    seed_all(0)
    return create_model(method, "resnet8", 10, 1, {"stem_stride": 2})


# ----------------------------------------------------------------------------- the loss, by hand


def test_outside_share_of_a_map_at_mask_resolution() -> None:
    maps = torch.tensor([[[1.0, 0.5], [0.0, 0.0]]])  # already in [0, 1] with min 0: upsample leaves it as it is
    masks = torch.tensor([[[True, False], [False, False]]])
    assert map_outside_share(maps, masks).item() == pytest.approx(0.5 / 1.5)
    assert map_outside_share(maps, ~masks).item() == pytest.approx(1.0 / 1.5)


def test_outside_share_after_upsampling_and_of_an_empty_map() -> None:
    maps = torch.full((2, 1, 1), 0.3)  # a constant non-zero map scales to 1 everywhere (minmax), at any size
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[0, :2, :2] = True  # 4 of 16 pixels
    masks[1, :, :3] = True  # 12 of 16
    assert map_outside_share(maps, masks).tolist() == pytest.approx([12 / 16, 4 / 16])
    assert map_outside_share(torch.zeros(1, 2, 2), masks[:1]).item() == 1.0  # no mass inside: all of it "outside"


def test_dice_loss_by_hand() -> None:
    maps = torch.tensor([[[1.0, 0.5], [0.0, 0.0]]])
    masks = torch.tensor([[[True, False], [False, False]]])
    assert map_dice_loss(maps, masks).item() == pytest.approx(1 - 2 * 1.0 / (1.5 + 1))
    assert map_dice_loss(masks.float(), masks).item() == 0.0  # 1 on the mask, 0 off it
    full = torch.full((2, 1, 1), 0.3)  # 1 everywhere after minmax: Dice 2 |m| / (16 + |m|)
    boxes = torch.zeros(2, 4, 4, dtype=torch.bool)
    boxes[0, :2, :2], boxes[1, :, :3] = True, True
    assert map_dice_loss(full, boxes).tolist() == pytest.approx([1 - 8 / 20, 1 - 24 / 28])


def test_mask_flags_count_and_seed() -> None:
    flags = mask_flags(300, 0.1, seed=3)
    assert flags.dtype == torch.bool and int(flags.sum()) == 30
    assert torch.equal(flags, mask_flags(300, 0.1, seed=3))
    assert not torch.equal(flags, mask_flags(300, 0.1, seed=4))
    assert int(mask_flags(7, 1.0, 0).sum()) == 7 and int(mask_flags(10, 0.25, 0).sum()) == 2  # round(2.5) == 2
    with pytest.raises(ConfigError, match="no item with a mask"):
        mask_flags(10, 0.01, 0)


# ----------------------------------------------------------------------------- the supervised map and its gradient


def test_supervised_map_is_the_heads_own_and_plains_cam_of_the_label() -> None:
    x = torch.randn(4, 1, 32, 32)
    model = _model("plain").eval()
    out = model(x)
    label = (out.logits.argmax(1) + 1) % 10  # never the predicted class
    cam = IMAGE.supervised_map(model, out, label, "self")
    assert torch.equal(cam, model.head.cam(out.features, label)) and not torch.equal(cam, out.heatmap)
    lfi = _model("lfi").eval()
    out = lfi(x)
    assert IMAGE.supervised_map(lfi, out, label, "self") is out.heatmap
    assert torch.equal(IMAGE.supervised_map(lfi, out, label, "class"), lfi(x, target=label).class_heatmap)
    with pytest.raises(ConfigError, match="must be one of self, class"):
        IMAGE.supervised_map(lfi, out, label, "gradcam")


HEAD_PARAMS = {"plain": "head.fc.weight", "lfi": "head.fin.0.weight", "lfi-light": "head.fin.0.weight",
               "se": "head.excite.0.weight", "abn": "head.att_map.0.weight"}  # fmt: skip


@pytest.mark.parametrize("method", sorted(HEAD_PARAMS))
def test_the_map_losss_gradient_reaches_the_head(method: str) -> None:
    model = _model(method).train()
    x, label = torch.randn(4, 1, 32, 32), torch.tensor([0, 1, 2, 3])
    boxes = torch.tensor([[0, 0, 12, 12], [10, 10, 30, 30], [4, 16, 20, 32], [16, 0, 32, 16]])
    out = model(x)
    loss = map_outside_share(IMAGE.supervised_map(model, out, label), box_mask(boxes, 32), model.backbone.cell_grid((32, 32))).mean()
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    head = grads[HEAD_PARAMS[method]]
    assert head is not None and float(head.abs().sum()) > 0, f"no gradient on {HEAD_PARAMS[method]}"
    assert float(grads["backbone.trunk.0.0.weight"].abs().sum()) > 0  # and the backbone's first conv


def test_a_few_steps_on_the_map_loss_move_the_mass_into_the_box() -> None:
    data = load_dataset("cluttered-digits", "train", 32, seed=0, size=32)
    x, y, boxes = (torch.stack([data[i][k] for i in range(32)]) for k in range(3))
    model = _model("plain").train()
    masks, cells = box_mask(boxes, 32), model.backbone.cell_grid((32, 32))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    shares = []
    for _ in range(8):
        share = map_outside_share(IMAGE.supervised_map(model, model(x), y), masks, cells).mean()
        opt.zero_grad()
        share.backward()
        opt.step()
        shares.append(share.item())
    assert shares[-1] < shares[0] - 0.1, shares


# ----------------------------------------------------------------------------- the training loop


@pytest.fixture(scope="module")
def tiny_data() -> tuple[Any, Any]:
    return load_dataset("shortcut-digits", "train", 128, seed=0, size=32), load_dataset("shortcut-digits", "val", 32, seed=0, size=32)


def test_the_loss_is_cross_entropy_plus_the_weighted_share_of_the_flagged_items(tiny_data: tuple[Any, Any]) -> None:
    model = _model("lfi").eval()  # eval: BatchNorm gives the same logits to both computations
    cfg = TrainConfig(epochs=1, batch_size=16, map_loss_weight=2.5, mask_fraction=0.5)
    module = SelfcamModule(model, cfg, total_steps=1, map_cells=model.backbone.cell_grid((32, 32)))
    items = [tiny_data[0][i] for i in range(16)]
    x, y, boxes = (torch.stack([it[k] for it in items]) for k in range(3))
    flags = torch.tensor([i % 3 == 0 for i in range(16)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log outside a Trainer
        with torch.no_grad():
            _, total, _ = module.forward_loss((x, y, boxes, flags), "train")
            _, val_total, _ = module.forward_loss((x, y, boxes), "val")
            _, none, _ = module.forward_loss((x, y, boxes, torch.zeros(16, dtype=torch.bool)), "train")
            out = model(x)
    ce = torch.nn.functional.cross_entropy(out.logits, y)
    masks = box_mask(boxes, 32)
    share = map_outside_share(out.heatmap, masks, model.backbone.cell_grid((32, 32)))
    assert total.item() == pytest.approx((ce + 2.5 * share[flags].mean()).item(), rel=1e-5)
    assert val_total.item() == pytest.approx((ce + 2.5 * share.mean()).item(), rel=1e-5)  # validation: every item
    assert none.item() == pytest.approx(ce.item(), rel=1e-6)
    module.cfg = TrainConfig(epochs=1, batch_size=16, map_loss_weight=2.5, mask_fraction=0.5, map_loss="dice")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        _, dice, _ = module.forward_loss((x, y, boxes, flags), "train")
    assert dice.item() == pytest.approx((ce + 2.5 * map_dice_loss(out.heatmap, masks, module.map_cells)[flags].mean()).item(), rel=1e-5)


def test_fit_records_the_options_and_the_masked_count(tmp_path: Path, tiny_data: tuple[Any, Any]) -> None:
    cfg = TrainConfig(epochs=1, batch_size=32, map_loss_weight=1.0, mask_fraction=0.25, map_loss_map="class")
    history = fit(_model("se"), *tiny_data, cfg, tmp_path / "run", progress=False)
    doc = json.loads((tmp_path / "run" / "config.json").read_text())
    assert {k: doc["train"][k] for k in ("map_loss_weight", "mask_fraction", "map_loss_map")} == {
        "map_loss_weight": 1.0, "mask_fraction": 0.25, "map_loss_map": "class"}  # fmt: skip
    assert doc["data"]["masked_items"] == 32
    assert 0 <= history[-1]["train_map_loss"] <= 1 and 0 <= history[-1]["val_map_loss"] <= 1


def test_data_without_boxes_and_bad_options_are_one_clear_error(tmp_path: Path) -> None:
    plain = TensorDataset(torch.randn(8, 1, 32, 32), torch.arange(8) % 10)
    with pytest.raises(ConfigError, match="needs training data with ground-truth boxes"):
        fit(_model("plain"), plain, None, TrainConfig(epochs=1, map_loss_weight=1.0), tmp_path / "run", progress=False)
    for kwargs, message in (({"map_loss_weight": -1.0}, "map_loss_weight must be"), ({"map_loss_weight": math.nan}, "map_loss_weight must be"),
                            ({"map_loss_weight": 1.0, "mask_fraction": 0.0}, "mask_fraction must lie"),
                            ({"mask_fraction": 0.1}, "set map_loss_weight > 0"),
                            ({"map_loss_weight": 1.0, "map_loss_map": "cam"}, "map_loss_map must be"),
                            ({"map_loss_weight": 1.0, "map_loss": "iou"}, "map_loss must be one of outside, dice")):  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            TrainConfig(**kwargs)  # type: ignore[arg-type]


def test_the_command_line_options_are_recorded_and_bad_ones_are_one_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from selfcam.cli import app

    tiny = ["train", "--method", "plain", "--backbone", "resnet8", "--backbone-kwargs", '{"stem_stride": 2}', "--image-size", "32",
            "--train-size", "64", "--val-size", "16", "--epochs", "1", "--batch-size", "32", "--quiet"]  # fmt: skip
    runner = CliRunner()
    result = runner.invoke(app, [*tiny, "--data", "shortcut-digits", "--map-loss-weight", "0.5", "--mask-fraction", "0.5",
                                 "--map-loss-map", "class", "--out", str(tmp_path / "run")])  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (doc["train"]["map_loss_weight"], doc["train"]["mask_fraction"], doc["train"]["map_loss_map"]) == (0.5, 0.5, "class")
    assert doc["data"]["masked_items"] == 32
    for options, message in ((["--map-loss-weight", "-1"], "--map-loss-weight must be a finite number >= 0"),
                             (["--mask-fraction", "0.5"], "set map_loss_weight > 0")):  # fmt: skip
        result = runner.invoke(app, [*tiny, *options, "--out", str(tmp_path / "bad")])
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.output


def test_a_resumed_supervised_run_is_bit_identical(tmp_path: Path, tiny_data: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = TrainConfig(epochs=2, batch_size=32, map_loss_weight=1.0, mask_fraction=0.25)  # 4 steps per epoch
    fit(_model("lfi"), *tiny_data, cfg, tmp_path / "ref", progress=False)
    original = T.SelfcamModule.training_step

    def step(self: T.SelfcamModule, batch: Any, batch_idx: int) -> torch.Tensor:
        done = self.step_offset + self.global_step
        if done == 2:
            request_checkpoint()
        if done == 6:
            raise RuntimeError("simulated crash")
        return original(self, batch, batch_idx)

    with monkeypatch.context() as m:
        m.setattr(T.SelfcamModule, "training_step", step)
        with pytest.raises(RuntimeError, match="simulated crash"):
            fit(_model("lfi"), *tiny_data, cfg, tmp_path / "run", progress=False)
    state = latest_state(tmp_path / "run")
    assert state is not None and state.global_step == 4
    shutil.rmtree(state.path)  # resume from the mid-epoch state of step 3
    assert latest_state(tmp_path / "run").global_step == 3  # type: ignore[union-attr]
    fit(_model("lfi"), *tiny_data, cfg, tmp_path / "run", progress=False, resume=True)
    a, b = load_file(str(tmp_path / "ref" / "model.safetensors")), load_file(str(tmp_path / "run" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = TrainConfig(epochs=2, batch_size=32, map_loss_weight=1.0, mask_fraction=0.5)
    with pytest.raises(ConfigError, match="mask_fraction: 0.25 stored, 0.5 given"):
        fit(_model("lfi"), *tiny_data, other, tmp_path / "ref", progress=False, resume=True)


# ----------------------------------------------------------------------------- the shortcut benchmark's supervised entries


def test_supervision_goal_line_by_hand() -> None:
    from selfcam.experiment import _supervision_check

    accs = {"lfi": (99.0, 19.0), "lfi+mask10": (98.0, 69.0), "plain": (99.0, 29.0), "plain+mask10-w0.3": (98.0, 50.0),
            "plain+mask10": (19.0, 14.0), "se": (100.0, 40.0), "se+mask50": (90.0, 90.0)}  # fmt: skip
    (line, _) = _supervision_check(accs)
    assert "lfi+mask10 69.0 % decorrelated against lfi's 19.0 %, +50.0 of the 80.0 points lost (62 %): met" in line
    assert "plain+mask10-w0.3 50.0 % decorrelated against plain's 29.0 %, +21.0 of the 70.0 points lost (30 %): NOT met" in line
    assert "plain+mask10 14.0 % decorrelated against plain's 29.0 %, -15.0 of the 70.0 points lost (-21 %): NOT met" in line  # no drop, no gain
    assert "se+mask50 90.0 % decorrelated against se's 40.0 %, +50.0 of the 60.0 points lost (83 %): 50 % of the images, not the goal's <= 10 %" in line
    assert _supervision_check({"lfi": (99.0, 19.0), "abn+mask10": (99.0, 96.0)}) == []  # no unsupervised run to compare with
    (line, _) = _supervision_check({"lfi": (99.0, 19.0), "lfi-s1": (99.0, 59.0), "lfi+mask10-s1": (99.0, 69.0),
                                    "lfi+mask10-dice-s1": (99.0, 79.0)})  # fmt: skip
    assert "lfi+mask10-s1 69.0 % decorrelated against lfi-s1's 59.0 %, +10.0 of the 40.0 points lost (25 %): NOT met" in line  # its seed's run
    assert "lfi+mask10-dice-s1 79.0 % decorrelated against lfi-s1's 59.0 %" in line


def test_shortcut_results_merge_keeps_the_earlier_runs(tmp_path: Path, tiny_data: tuple[Any, Any]) -> None:
    from selfcam.experiment import shortcut_experiment

    fit(_model("plain"), tiny_data[0], None, TrainConfig(epochs=1, batch_size=64), tmp_path / "plain", progress=False)
    out = tmp_path / "shortcut.json"
    first = shortcut_experiment({"plain": tmp_path / "plain"}, ["self"], out, n=8, command="first")
    again = shortcut_experiment({"plain+mask10": tmp_path / "plain"}, ["self"], out, n=8, command="second", merge=True)
    assert set(again["methods"]) == {"plain/self", "plain+mask10/self"} and set(again["runs"]) == {"plain", "plain+mask10"}
    assert again["methods"]["plain/self"] == first["methods"]["plain/self"] == again["methods"]["plain+mask10/self"]
    assert again["command"] == "first\nsecond"
    assert again["wall_seconds"] >= first["wall_seconds"]
    with pytest.raises(ConfigError, match="cannot merge runs measured with n=4"):
        shortcut_experiment({"x": tmp_path / "plain"}, ["self"], out, n=4, merge=True)
