"""Backbones, create_model, input checks and checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from selfcam.backbones import cifar_resnet, create_backbone
from selfcam.errors import CheckpointError, ConfigError, InputError
from selfcam.model import create_model
from selfcam.checkpoint import load_checkpoint, save_checkpoint

METHODS = ["plain", "lfi", "lfi-light", "se", "abn"]


@pytest.mark.parametrize(
    ("depth", "bottleneck", "blocks", "channels"),
    [(20, False, 3, 64), (56, False, 9, 64), (110, False, 18, 64), (20, True, 2, 256), (56, True, 6, 256)],
)
def test_cifar_resnet_depths_follow_the_paper(depth: int, bottleneck: bool, blocks: int, channels: int) -> None:
    bb = cifar_resnet(depth, in_chans=2, bottleneck=bottleneck)
    assert len(bb.last) == blocks and bb.out_channels == channels
    if not bottleneck:  # stem + 6n 3x3 convs = depth - 1 weighted layers before the FC
        assert sum(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) for m in bb.modules()) == depth - 1
    f = bb(torch.randn(2, 2, 32, 32))
    assert f.shape == (2, channels, 8, 8)


@pytest.mark.parametrize(("stem", "output_stride", "side"), [(1, None, 16), (1, 2, 32), (1, 1, 64), (2, 4, 16), (2, None, 8)])
def test_output_stride_gives_finer_maps_with_the_same_weights(stem: int, output_stride: int | None, side: int) -> None:
    torch.manual_seed(0)
    reference = cifar_resnet(8, 3, stem_stride=stem).eval()
    bb = cifar_resnet(8, 3, stem_stride=stem, output_stride=output_stride).eval()
    assert {k: v.shape for k, v in bb.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    bb.load_state_dict(reference.state_dict())
    x = torch.randn(2, 3, 64, 64)
    f = bb(x)
    assert f.shape == (2, 64, side, side)
    step = 4 * stem // (output_stride or 4 * stem)
    # strides turned into dilations: the default map is the fine map at every step-th pixel
    torch.testing.assert_close(f[..., ::step, ::step], reference(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("output_stride", [8, 3, 0])
def test_bad_output_stride(output_stride: int) -> None:
    with pytest.raises(ConfigError, match="output_stride must be 1, 2 or 4 with stem_stride=1"):
        cifar_resnet(8, output_stride=output_stride)
    with pytest.raises(ConfigError, match="output_stride' must be int or null"):
        create_backbone("resnet8", 3, output_stride="2")


def test_bad_cifar_depth() -> None:
    with pytest.raises(ConfigError, match="6n\\+2"):
        cifar_resnet(21)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_torchvision_backbones_are_cut_at_the_last_stage(name: str) -> None:
    bb = create_backbone(name, in_chans=1)
    assert bb.out_channels == (512 if name == "resnet18" else 2048)
    pre, f = bb.forward_split(torch.randn(1, 1, 64, 64))
    assert f.shape == (1, bb.out_channels, 2, 2) and pre.shape[-1] == 4


def test_torchvision_features_backbone_and_heads() -> None:
    model = create_model("se", "mobilenet_v3_small", num_classes=3, in_chans=3)
    out = model(torch.randn(2, 3, 64, 64))
    assert out.heatmap.shape == (2, 2, 2)


def test_timm_backbone_through_forward_features() -> None:
    pytest.importorskip("timm")
    for method in METHODS:
        model = create_model(method, "timm:resnet10t", num_classes=3, in_chans=1)
        out = model(torch.randn(2, 1, 64, 64))
        assert out.logits.shape == (2, 3) and out.heatmap.shape == (2, 2, 2)
    assert not model.backbone.splittable


def test_unknown_names_are_clear_errors() -> None:
    with pytest.raises(ConfigError, match="unknown method 'gradcam'"):
        create_model("gradcam", "resnet20", 10)
    with pytest.raises(ConfigError, match="unknown backbone 'resnet7'"):
        create_model("plain", "resnet7", 10)
    with pytest.raises(ConfigError, match="bad option"):
        create_model("se", "resnet8", 10, reduction_factor=3)


def test_wrong_rank_and_channel_count_are_named() -> None:
    model = create_model("lfi", "resnet8", 10, in_chans=1)
    with pytest.raises(InputError, match="takes 1 input channel"):
        model(torch.randn(2, 3, 32, 32))
    with pytest.raises(InputError, match="rank 3"):
        model(torch.randn(1, 32, 32))
    with pytest.raises(InputError, match="floating-point"):
        model(torch.zeros(1, 1, 32, 32, dtype=torch.uint8))


def test_finite_check_is_exact_when_the_sum_overflows() -> None:
    """check_input sums the input first; a sum that overflows on huge finite values must not be an error, and
    NaN / infinity must be one whatever the sum does (NaN + -inf, +inf + -inf)."""
    model = create_model("plain", "resnet8", 10, in_chans=1).eval()
    x = torch.full((1, 1, 8, 8), 3e38)
    assert not torch.isfinite(x.sum())
    model.check_input(x)  # every value is finite
    for bad, count in ((float("nan"), 1), (float("inf"), 1)):
        y = x.clone()
        y[0, 0, 3, 4] = bad
        with pytest.raises(InputError, match=rf"input has {count} NaN or infinite value\(s\) of 64"):
            model.check_input(y)
    z = torch.zeros(1, 1, 8, 8)
    z[0, 0, 0, 0], z[0, 0, 0, 1] = float("inf"), float("-inf")  # the sum is NaN, the count 2
    with pytest.raises(InputError, match=r"input has 2 NaN"):
        model.check_input(z)


@pytest.mark.parametrize("method", METHODS)
def test_checkpoint_round_trip_gives_identical_outputs(method: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model(method, "resnet8", 4, in_chans=1).eval()
    # make the BN statistics non-trivial so they must round-trip too
    model.train()
    model(torch.randn(8, 1, 32, 32))
    model.eval()
    save_checkpoint(model, tmp_path / "run", data={"name": "unit"})
    loaded, doc = load_checkpoint(tmp_path / "run")
    x = torch.randn(3, 1, 32, 32)
    a, b = model(x), loaded(x)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.heatmap, b.heatmap)
    assert doc["data"] == {"name": "unit"} and doc["model"].method == method
    assert not loaded.training


def test_missing_and_corrupt_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope")
    model = create_model("se", "resnet8", 3, in_chans=1)
    run = save_checkpoint(model, tmp_path / "run")
    weights = run / "model.safetensors"
    blob = weights.read_bytes()
    weights.write_bytes(blob[: len(blob) // 2])  # truncated
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        load_checkpoint(run)
    weights.write_bytes(b"\x80\x04\x95 not safetensors, a pickle header")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_checkpoint(run)
    weights.unlink()
    with pytest.raises(CheckpointError, match="weights file not found"):
        load_checkpoint(run)


def test_config_that_does_not_match_weights(tmp_path: Path) -> None:
    run = save_checkpoint(create_model("se", "resnet8", 3, in_chans=1), tmp_path / "run")
    cfg_path = run / "config.json"
    doc = json.loads(cfg_path.read_text())
    doc["model"]["method"] = "lfi"
    cfg_path.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="do not match config"):
        load_checkpoint(run)
    doc["model"]["method"] = "se"
    doc["model"]["num_classes"] = 7
    cfg_path.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="do not match config"):
        load_checkpoint(run)


@pytest.mark.parametrize(
    ("model_entry", "message"),
    [
        ({"method": "se", "backbone": "resnet8"}, "missing fields \\['num_classes'\\]"),
        ({"method": "se", "backbone": "resnet8", "num_classes": 3, "extra": 1}, "unknown fields \\['extra'\\]"),
        ({"method": "se", "backbone": "resnet8", "num_classes": "3"}, "num_classes must be int"),
        ({"method": "se", "backbone": "resnet8", "num_classes": True}, "num_classes must be int"),
    ],
)
def test_config_validation(tmp_path: Path, model_entry: dict, message: str) -> None:
    run = save_checkpoint(create_model("se", "resnet8", 3, in_chans=1), tmp_path / "run")
    (run / "config.json").write_text(json.dumps({"model": model_entry}))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(run)
    (run / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(run)
