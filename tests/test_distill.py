"""selfcam.distill (issue 14.5): a head trained on a teacher's frozen backbone to reproduce its outputs.

The teacher stays bit for bit as it was; the student's backbone is the teacher's (BatchNorm statistics
included); agreement and the loss against hand values; the run loads everywhere; the CLI end to end."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset
from typer.testing import CliRunner

from selfcam.checkpoint import load_checkpoint
from selfcam.cli import app
from selfcam.data import load_dataset
from selfcam.distill import agreement, compare, distill, distill_loss
from selfcam.errors import CheckpointError, ConfigError
from selfcam.model import SelfExplainer, create_model
from selfcam.train import TrainConfig, fit, seed_all

torch.set_num_threads(1)
runner = CliRunner()
CFG = TrainConfig(epochs=1, batch_size=32)
TINY = ["--train-size", "64", "--val-size", "32", "--test-size", "32", "--batch-size", "32", "--epochs", "1", "--quiet"]


def _run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes is not None else "")


@pytest.fixture(scope="module")
def data() -> tuple[Any, Any, Any]:
    return tuple(load_dataset("cluttered-digits", split, n, seed=0, size=32) for split, n in (("train", 96), ("val", 32), ("test", 32)))  # type: ignore[return-value]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory: pytest.TempPathFactory, data: tuple[Any, Any, Any]) -> Path:
    """A briefly trained ``plain`` resnet8 run (the teacher)."""
    seed_all(0)
    model = create_model("plain", "resnet8", 10, 1, {"stem_stride": 2})
    run = tmp_path_factory.mktemp("teacher") / "plain"
    fit(model, data[0], data[1], CFG, run, progress=False)
    return run


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def _digest(run: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.iterdir()) if p.is_file()}


@pytest.mark.parametrize("method", ["se", "lfi-light", "abn"])
def test_the_teacher_is_unchanged_and_the_student_backbone_is_the_teachers(method: str, teacher_run: Path,
                                                                          data: tuple[Any, Any, Any]) -> None:  # fmt: skip
    teacher, _ = load_checkpoint(teacher_run)
    teacher.train()  # a teacher in train mode: distill runs it in eval mode and hands it back as it came
    before = _snapshot(teacher)
    assert any(k.endswith("running_mean") for k in before)
    result = distill(teacher, method, *data, CFG, progress=False)
    assert _identical(_snapshot(teacher), before)  # weights and BatchNorm statistics, bit for bit
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())
    student = result.model
    assert isinstance(student, SelfExplainer) and student.config.method == method
    assert _identical(_snapshot(student.backbone), _snapshot(teacher.backbone))  # frozen: running stats too
    assert not {id(p) for p in student.parameters()} & {id(p) for p in teacher.parameters()}  # a copy, not shared
    assert student.config.backbone == teacher.config.backbone and student.config.backbone_kwargs == teacher.config.backbone_kwargs
    m = result.metrics
    assert m["split"] == "test" and m["n"] == 32 and 0 <= m["agreement"] <= 1 and m["agreement"] == result.agreement
    assert [row["epoch"] for row in result.history] == [0] and "val_acc" in result.history[0]


def test_agreement_and_the_loss_against_hand_values() -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 3.0], [1.0, 1.0]])
    b = torch.tensor([[5.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert agreement(a, b) == 0.5  # rows 0 and 2 agree; a tie takes the first class (row 3: 0 vs 1)
    with pytest.raises(ConfigError, match="one shape"):
        agreement(a, b[:3])
    s, t = torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([[2.0, 0.0, 0.0]])
    for temp in (1.0, 2.0):
        p, q = F.softmax(t / temp, 1), F.softmax(s / temp, 1)
        by_hand = temp**2 * float((p * (p.log() - q.log())).sum())
        assert float(distill_loss(s, t, temp)) == pytest.approx(by_hand, rel=1e-6)
    assert float(distill_loss(t, t, 3.0)) == pytest.approx(0.0, abs=1e-7)


def test_compare_on_a_tiny_case_by_hand() -> None:
    x = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.0, 1.0, 2.0], [1.0, 0.0, 0.0]])
    y = torch.tensor([0, 1, 1, 0])
    teacher = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        teacher.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 0, 1], [0, 1, 0]]))  # swaps classes 1 and 2
    doc = compare(nn.Identity(), teacher, TensorDataset(x, y), batch_size=3)
    # student classes 0, 1, 2, 0; teacher 0, 2, 1, 0; labels 0, 1, 1, 0
    assert doc["agreement"] == 0.5 and doc["n"] == 4
    assert doc["student_accuracy"] == 0.75 and doc["teacher_accuracy"] == 0.75
    p, q = F.softmax(x @ teacher.weight.detach().T, 1), F.softmax(x, 1)
    assert doc["kl"] == pytest.approx(float((p * (p.log() - q.log())).sum(1).mean()), rel=1e-6)
    assert compare(nn.Identity(), teacher, TensorDataset(x))["student_accuracy"] is None  # no labels: no accuracy


class TupleNet(nn.Module):
    """A user's classifier returning ``(logits, embedding)``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1),
                                  nn.BatchNorm2d(16), nn.ReLU())  # fmt: skip
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.body(x).mean(dim=(2, 3))
        return self.fc(emb), emb


def test_a_user_module_without_labels_is_wrapped_and_kept(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = TupleNet()
    net.body[1].running_mean.uniform_(-0.1, 0.1)  # statistics that a frozen copy must keep
    before = _snapshot(net)
    images = TensorDataset(torch.randn(64, 3, 16, 16))  # bare images: no labels at all
    held_out = TensorDataset(torch.randn(16, 3, 16, 16))
    result = distill(net, "se", images, None, held_out, CFG, run_dir=tmp_path / "run", progress=False, input_size=16,
                     head_kwargs={"reduction": 4})  # fmt: skip
    assert _identical(_snapshot(net), before) and net.training
    assert result.metrics["n"] == 16 and result.metrics["student_accuracy"] is None
    trunk = {k.removeprefix("trunk."): v for k, v in result.model.backbone.state_dict().items()}
    assert _identical(trunk, {k: v for k, v in before.items() if k.startswith("body.")})  # the cut keeps body, stats too
    loaded, doc = load_checkpoint(tmp_path / "run", model=TupleNet)
    assert doc["distill"]["teacher"]["source"] == "user:TupleNet" and doc["model"].backbone == "wrap:user:TupleNet"
    assert _identical(_snapshot(loaded), _snapshot(result.model))


def test_bad_inputs_are_one_clear_error(teacher_run: Path, data: tuple[Any, Any, Any], tmp_path: Path) -> None:
    class ThreeClasses(TensorDataset):
        num_classes, in_chans, spec = 3, 1, "three-classes"

    other = ThreeClasses(torch.randn(8, 1, 32, 32), torch.zeros(8, dtype=torch.long))
    with pytest.raises(ConfigError, match="the teacher has 10 classes but the training data three-classes has 3"):
        distill(teacher_run, "se", other, progress=False)
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        distill(teacher_run, "nope", data[0], progress=False)
    with pytest.raises(ConfigError, match="se-multilabel.*attributes task"):
        distill(teacher_run, "se-multilabel", data[0], progress=False)
    with pytest.raises(ConfigError, match="temperature must be a number > 0"):
        distill(teacher_run, "se", data[0], temperature=0, progress=False)
    with pytest.raises(CheckpointError, match="teacher run not found"):
        distill(tmp_path / "missing", "se", data[0], progress=False)


def test_cli_distill_end_to_end_and_every_command_loads_the_run(teacher_run: Path, tmp_path: Path) -> None:
    before = _digest(teacher_run)
    out = tmp_path / "se"
    code, text = _run("distill", "--teacher", str(teacher_run), "--method", "se", "--head-kwargs", '{"reduction": 4}',
                      "--temperature", "3", "--out", str(out), *TINY)  # fmt: skip
    assert code == 0, text
    assert "top-1 agreement" in text and "32 held-out images (cluttered-digits, test" in text
    assert _digest(teacher_run) == before  # the teacher's run is never written
    held = json.loads((out / "distill.json").read_text())["held_out"]
    assert f"agreement {held['agreement']:.4f}" in text
    model, doc = load_checkpoint(out)
    assert doc["model"].method == "se" and doc["train"]["freeze_backbone"] is True
    assert doc["distill"]["teacher"]["source"] == str(teacher_run.resolve()) and doc["distill"]["temperature"] == 3.0
    assert doc["data"]["name"] == "cluttered-digits" and doc["data"]["size"] == 32  # the teacher run's data and size
    teacher, _ = load_checkpoint(teacher_run)
    assert _identical(_snapshot(model.backbone), _snapshot(teacher.backbone))
    code, text = _run("info", str(out))
    assert code == 0 and '"distill"' in text, text
    code, text = _run("evaluate", "--checkpoint", str(out), "--metrics", "accuracy,pointing_game", "--n", "16",
                      "--out", str(tmp_path / "eval"))  # fmt: skip
    assert code == 0, text
    scores = json.loads((tmp_path / "eval" / "evaluation.json").read_text())["runs"]["se"]["results"]["self"]
    assert 0 <= scores["pointing_game"] <= 1


def test_an_interrupted_distillation_resumes_bit_identically(teacher_run: Path, data: tuple[Any, Any, Any], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from safetensors.torch import load_file
    from test_finetune import _crash_at

    cfg = TrainConfig(epochs=2, batch_size=32)  # 96 images: 3 steps per epoch
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    distill(teacher_run, "se", data[0], data[1], data[2], cfg, run_dir=reference, progress=False)
    with monkeypatch.context() as m:
        _crash_at(m, 4)  # the second step of epoch 1
        with pytest.raises(RuntimeError, match="simulated crash"):
            distill(teacher_run, "se", data[0], data[1], data[2], cfg, run_dir=crashed, progress=False)
    assert not (crashed / "distill.json").exists()
    with pytest.raises(ConfigError):  # another recipe than the run's
        distill(teacher_run, "se", data[0], data[1], data[2], cfg, temperature=3.0, run_dir=crashed, progress=False, resume=True)
    with pytest.raises(ConfigError, match="run_dir"):
        distill(teacher_run, "se", data[0], cfg=cfg, progress=False, resume=True)
    result = distill(teacher_run, "se", data[0], data[1], data[2], cfg, run_dir=crashed, progress=False, resume=True)
    final = load_file(str(crashed / "model.safetensors"))
    assert _identical(final, load_file(str(reference / "model.safetensors")))
    done = json.loads((crashed / "distill.json").read_text())["held_out"]
    assert done == json.loads((reference / "distill.json").read_text())["held_out"] == result.metrics
    # a finished run: loaded, not trained again, its distill.json kept byte for byte; the CLI says the same
    before = (crashed / "distill.json").read_bytes()
    again = distill(teacher_run, "se", data[0], data[1], data[2], cfg, run_dir=crashed, progress=False, resume=True)
    assert again.metrics["agreement"] == done["agreement"] and (crashed / "distill.json").read_bytes() == before
    code, text = _run("distill", "--teacher", str(teacher_run), "--method", "se", "--out", str(crashed), "--resume",
                      *[a if a != "1" else "2" for a in TINY])  # fmt: skip
    assert code == 0 and f"agreement {done['agreement']:.4f}" in text, text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--teacher", "MISSING", "--method", "se"], "teacher run not found"),
        (["--teacher", "RUN", "--method", "nope"], "unknown method 'nope'"),
        (["--teacher", "RUN", "--method", "se", "--temperature", "0"], "--temperature must be a finite number > 0"),
        (["--teacher", "torchvision:resnet18", "--method", "se", "--data", "cluttered-digits"], "give its trained weights"),
        (["--teacher", "RUN", "--method", "se", "--pretrained", "w.pth"], "build a teacher given by name"),
    ],
)
def test_cli_bad_input_is_one_line(args: list[str], message: str, teacher_run: Path, tmp_path: Path) -> None:
    args = [str(tmp_path / "missing") if a == "MISSING" else str(teacher_run) if a == "RUN" else a for a in args]
    code, text = _run("distill", *args, "--out", str(tmp_path / "out"), *TINY)
    assert code == 2, text
    assert message in text and "Traceback" not in text
    assert len(text.strip().splitlines()) == 1 or "error:" in text.strip().splitlines()[0]


def test_a_torchvision_model_given_by_name_with_its_weights(tmp_path: Path) -> None:
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=4)
    weights = tmp_path / "r18.pth"
    torch.save(net.state_dict(), weights)
    images = TensorDataset(torch.randn(32, 3, 32, 32))
    result = distill("torchvision:resnet18", "lfi-light", images, None, images, TrainConfig(epochs=1, batch_size=16),
                     run_dir=tmp_path / "run", progress=False, pretrained=weights, model_kwargs={"num_classes": 4})  # fmt: skip
    record = json.loads((tmp_path / "run" / "config.json").read_text())["distill"]["teacher"]
    assert record["source"] == f"torchvision:resnet18 with weights {weights}"
    loaded, doc = load_checkpoint(tmp_path / "run")  # a model given by name rebuilds itself: no model= needed
    assert doc["model"].backbone == "wrap:torchvision:resnet18" and _identical(_snapshot(loaded), _snapshot(result.model))
    kept = {k.removeprefix("trunk.").replace("last.", "layer4.", 1): v for k, v in loaded.backbone.state_dict().items()}
    assert _identical(kept, {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")})  # the file's weights
    # that wrapped run as a teacher in turn: its backbone is copied, the run rebuilds from its wrap: config
    again = distill(tmp_path / "run", "se", images, None, images, TrainConfig(epochs=1, batch_size=16), run_dir=tmp_path / "se",
                    progress=False, head_kwargs={"reduction": 8})  # fmt: skip
    rebuilt, doc = load_checkpoint(tmp_path / "se")
    assert doc["model"].method == "se" and doc["model"].backbone == "wrap:torchvision:resnet18"
    assert _identical(_snapshot(rebuilt.backbone), _snapshot(loaded.backbone)) and _identical(_snapshot(rebuilt), _snapshot(again.model))
