"""The CLI through typer's test runner, and the demo end to end on a small recipe."""

from __future__ import annotations

import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from selfcam.cli import app
from selfcam.checkpoint import load_checkpoint

runner = CliRunner()


def _run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes is not None else "")


def test_train_writes_checkpoint_history_and_repeats_with_a_seed(tmp_path: Path) -> None:
    common = ["train", "--method", "lfi-light", "--backbone", "resnet8", "--epochs", "2", "--train-size", "128",
              "--val-size", "64", "--image-size", "32", "--batch-size", "32", "--quiet"]  # fmt: skip
    code, out = _run(*common, "--out", str(tmp_path / "a"))
    assert code == 0, out
    _run(*common, "--out", str(tmp_path / "b"))
    history = json.loads((tmp_path / "a" / "history.json").read_text())
    assert [row["epoch"] for row in history] == [0, 1]
    assert {"train_loss", "train_acc", "val_loss", "val_acc"} <= history[0].keys()
    a, doc = load_checkpoint(tmp_path / "a")
    b, _ = load_checkpoint(tmp_path / "b")
    assert doc["train"]["epochs"] == 2 and doc["data"]["name"] == "cluttered-digits"
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), f"seeded runs differ in {name}"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--method", "nope", "--out", "X", "--epochs", "1"], "unknown method 'nope'"),
        (["train", "--method", "se", "--backbone", "resnet7", "--out", "X"], "unknown backbone 'resnet7'"),
        (["train", "--method", "se", "--data", "imagenet", "--out", "X"], "unknown dataset"),
        (["info", "does-not-exist"], "checkpoint directory not found"),
    ],
)
def test_bad_input_is_one_readable_line(args: list[str], message: str, tmp_path: Path) -> None:
    args = [str(tmp_path / a) if a == "X" else a for a in args]
    code, out = _run(*args)
    assert code == 2
    assert message in out
    assert "Traceback" not in out


def test_corrupt_checkpoint_through_the_real_console_script(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"model": {"method": "se", "backbone": "resnet8", "num_classes": 3, "in_chans": 1}}')
    (run / "model.safetensors").write_bytes(b"garbage")
    proc = subprocess.run([sys.executable, "-m", "selfcam", "info", str(run)], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "not a readable safetensors file" in lines[0], proc.stderr


def test_models_lists_methods_and_backbones() -> None:
    code, out = _run("models")
    assert code == 0
    for name in ("plain", "lfi-light", "abn", "resnet20", "resnet110-bottleneck", "torchvision:resnet50", "wrap:timm:<name>", "--model-factory"):
        assert name in out


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.srcs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.srcs.append(dict(attrs).get("src") or "")


def test_demo_map_loss_defaults_and_options(tmp_path: Path) -> None:
    """faces and asd supervise 10 % of the maps by default; --map-loss-weight 0 is the papers' unsupervised recipe."""
    from selfcam.recipes import demo_recipe

    for name in ("faces", "asd"):
        r = demo_recipe(name)
        assert (r.map_loss_weight, r.mask_fraction) == (0.3, 0.1), name
    assert demo_recipe("digits").map_loss_weight == demo_recipe("video").map_loss_weight == 0
    small = ("--epochs", "1", "--train-size", "40", "--test-size", "16", "--quiet")
    code, text = _run("demo", "--task", "faces", "--out", str(tmp_path / "f"), *small)
    assert code == 0, text
    assert json.loads((tmp_path / "f" / "metrics.json").read_text())["recipe"]["map_loss_weight"] == 0.3
    config = json.loads((tmp_path / "f" / "runs" / "se-multilabel" / "config.json").read_text())
    assert config["train"]["map_loss_weight"] == 0.3 and config["data"]["masked_items"] == 4
    code, text = _run("demo", "--task", "faces", "--out", str(tmp_path / "u"), "--map-loss-weight", "0", *small)
    assert code == 0, text
    config = json.loads((tmp_path / "u" / "runs" / "se-multilabel" / "config.json").read_text())
    assert config["train"]["map_loss_weight"] == 0 and "masked_items" not in config["data"]
    code, text = _run("demo", "--task", "faces", "--out", str(tmp_path / "x"), "--map-loss-weight", "0", "--mask-fraction", "0.5")
    assert code != 0 and "give --map-loss-weight > 0" in text and not (tmp_path / "x").exists()


def test_demo_small_recipe_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    code, text = _run("demo", "--out", str(out), "--epochs", "1", "--train-size", "256", "--test-size", "64", "--quiet")
    assert code == 0, text
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["format"] == "selfcam-demo" and metrics["task"] == "image" and metrics["dataset"] == "cluttered-digits"
    assert set(metrics["runs"]) == {"plain", "lfi", "lfi-light", "se", "abn"} and metrics["n_items"] == 64
    for name, run in metrics["runs"].items():
        assert set(run["results"]) == {"self", "gradcam"} and isinstance(run["params"], int), name
        for row in run["results"].values():
            assert {"accuracy", "pointing_game", "iou", "map_ms_per_image"} <= row.keys(), name
            assert 0 <= row["accuracy"] <= 1 and 0 <= row["pointing_game"] <= 1 and 0 <= row["iou"] <= 1
            assert row["map_ms_per_image"] > 0
    assert metrics["recipe"]["train_size"] == 256 and set(metrics["train_seconds"]) == set(metrics["runs"])
    html = (out / "report.html").read_text()
    parser = _Images()
    parser.feed(html)
    gallery = [s for s in parser.srcs if s.startswith("data:image/png;base64,")]
    assert len(gallery) >= 10 * 2 * 7  # 2 images per class: input, 5 self maps, Grad-CAM of the plain run
    assert "http://" not in html and "https://" not in html
    for method in ("plain", "lfi", "lfi-light", "se", "abn"):
        assert (out / "runs" / method / "model.safetensors").is_file()
    assert "cluttered-digits, test split (64 items)" in text


_USER_MODULE = '''
import torch
from torch import nn


class TupleNet(nn.Module):
    """A user's own classifier: returns (logits, features)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        f = self.pool(self.body(x)).flatten(1)
        return self.fc(f), f


def build():
    return TupleNet()


NOT_CALLABLE = 3
'''


def test_a_run_of_your_own_class_through_every_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """train --model-factory wraps the user's class (crashed and resumed with it); info, evaluate, explain, export and
    report load the run only with --model-factory, and without it say so in one line naming the option."""
    import selfcam.train as T

    (tmp_path / "usernets.py").write_text(_USER_MODULE)
    monkeypatch.chdir(tmp_path)  # model_factory looks in the current directory first, as python -m does
    run = tmp_path / "run"
    train = ["train", "--method", "se", "--model-factory", "usernets:build", "--epochs", "2", "--train-size", "32",
             "--val-size", "16", "--image-size", "16", "--batch-size", "16", "--quiet", "--head-kwargs", '{"reduction": 4}']  # fmt: skip
    original = T.SelfcamModule.training_step

    def crash(self: T.SelfcamModule, batch: object, batch_idx: int) -> torch.Tensor:
        if self.step_offset + self.global_step == 2:  # 2 steps per epoch: after epoch 0's state
            raise RuntimeError("simulated crash")
        return original(self, batch, batch_idx)

    with monkeypatch.context() as m:
        m.setattr(T.SelfcamModule, "training_step", crash)
        result = runner.invoke(app, [*train, "--out", str(run)])
    assert isinstance(result.exception, RuntimeError), result.output
    result = runner.invoke(app, ["train", "--resume", str(run), "--quiet"])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "--model-factory module:function" in lines[0] and "'TupleNet'" in lines[0], result.output
    code, out = _run("train", "--resume", str(run), "--quiet", "--model-factory", "usernets:build")
    assert code == 0, out
    assert json.loads((run / "config.json").read_text())["model"]["backbone"] == "wrap:user:TupleNet"
    image = tmp_path / "digit.png"
    from PIL import Image

    Image.fromarray((torch.rand(16, 16) * 255).byte().numpy()).save(image)
    commands = [["info", str(run)], ["evaluate", "--checkpoint", str(run), "--n", "8", "--metrics", "accuracy", "--out", str(tmp_path / "ev")],
                ["explain", "--checkpoint", str(run), str(image), "--out", str(tmp_path / "ex"), "--quiet"],
                ["export", "--checkpoint", str(run), "--out", str(tmp_path / "m.onnx")],
                ["report", str(run), "--out", str(tmp_path / "r.html"), "--per-class", "1"]]  # fmt: skip
    for args in commands[:4]:
        code, out = _run(*args)
        assert code == 2 and "--model-factory module:function" in out and "Traceback" not in out, (args, out)
    for args in commands:
        code, out = _run(*args, "--model-factory", "usernets:build")
        assert code == 0, (args, out)
    assert "left out" not in (tmp_path / "r.html").read_text()  # the gallery drew the run
    code, out = _run("info", str(run), "--model-factory", "usernets:NOT_CALLABLE")
    assert code == 2 and "NOT_CALLABLE is a int, not a function or class" in out, out


def test_train_a_wrapped_timm_model_from_a_pth_file_and_resume_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """train --backbone wrap:timm:NAME --pretrained FILE.pth on RGB images, head first: the file's weights are where
    training starts (the frozen epoch leaves them as they are), the run records the file, and a crashed run resumes
    (rebuilt by name); --pretrained of another file on --resume is refused."""
    import numpy as np
    import timm
    from PIL import Image
    from safetensors.torch import load_file

    import selfcam.train as T

    for split, count in (("train", 6), ("test", 2)):
        for label in ("a", "b"):
            folder = tmp_path / "rgb" / split / label
            folder.mkdir(parents=True)
            for k in range(count):
                Image.fromarray(np.random.default_rng(k).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"{k}.png")
    torch.manual_seed(0)
    source = timm.create_model("resnet10t", pretrained=False)
    torch.save(source.state_dict(), tmp_path / "resnet10t.pth")
    run = tmp_path / "run"
    train = ["train", "--method", "se", "--backbone", "wrap:timm:resnet10t", "--pretrained", str(tmp_path / "resnet10t.pth"),
             "--data", f"imagefolder:{tmp_path / 'rgb'}", "--image-size", "64", "--epochs", "2", "--head-epochs", "1",
             "--batch-size", "4", "--train-size", "8", "--val-size", "2", "--quiet", "--out", str(run)]  # fmt: skip
    original = T.SelfcamModule.training_step

    def crash(self: T.SelfcamModule, batch: object, batch_idx: int) -> torch.Tensor:
        if self.step_offset + self.global_step == 2:  # after the head-only epoch's state
            raise RuntimeError("simulated crash")
        return original(self, batch, batch_idx)

    with monkeypatch.context() as m:
        m.setattr(T.SelfcamModule, "training_step", crash)
        result = runner.invoke(app, train)
    assert isinstance(result.exception, RuntimeError), result.output
    assert "pretrained: " in result.output and "tensors fit, 0 missing, 0 unexpected" in result.output
    state = T.latest_state(run)
    saved = load_file(str(state.path / T.STATE_TENSORS))
    conv = "model.backbone.trunk.model.conv1.0.weight"
    assert torch.equal(saved[conv], source.state_dict()["conv1.0.weight"])  # the file's weights, frozen in epoch 0
    code, out = _run("train", "--resume", str(run), "--pretrained", "other.pth")
    assert code == 2 and "--pretrained other.pth (the run has" in out, out
    code, out = _run("train", "--resume", str(run), "--quiet")
    assert code == 0, out
    doc = json.loads((run / "config.json").read_text())
    assert doc["model"]["backbone"] == "wrap:timm:resnet10t" and doc["pretrained"] == str(tmp_path / "resnet10t.pth")
    assert doc["train"]["head_epochs"] == 1
