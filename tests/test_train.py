"""Crash-safe, resumable, deterministic and multi-process training (issues 8.3, 8.4, 7.5).

Bit-identity is checked with ``torch.equal`` against an uninterrupted run with the same
seed; the data order against ``torch.randperm`` drawn independently; the sharded
evaluation against a one-process evaluation of the same checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import selfcam.train as T
from selfcam.cli import app
from selfcam.data import load_dataset
from selfcam.errors import CheckpointError, ConfigError, SelfcamError
from selfcam.evaluate import _shards
from selfcam.model import SelfExplainer, create_model
from selfcam.checkpoint import load_checkpoint
from selfcam.train import (
    DivergenceError,
    EpochSampler,
    TrainConfig,
    epoch_seed,
    fit,
    latest_state,
    request_checkpoint,
    seed_all,
    steps_per_epoch,
)

runner = CliRunner()
TINY = ["--backbone", "resnet8", "--backbone-kwargs", '{"stem_stride": 2}', "--image-size", "32", "--batch-size", "32", "--quiet"]


def _env() -> dict[str, str]:
    """Subprocesses: one thread each (bit-exact comparisons need the same thread count) and this checkout's sources."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "selfcam", *args]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model.safetensors"))


def _assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


# ----------------------------------------------------------------------------- data order


def test_epoch_order_is_a_seeded_permutation_shared_out_by_rank() -> None:
    n, seed, epoch = 23, 7, 3
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(seed, epoch))).tolist()
    assert list(EpochSampler(n, seed=seed, epoch=epoch)) == perm
    shards = [list(EpochSampler(n, seed=seed, epoch=epoch, rank=r, world=3)) for r in range(3)]
    assert shards == [perm[0:21:3], perm[1:21:3], perm[2:21:3]]  # 7 each: the last 2 of 23 are left out
    assert list(EpochSampler(n, seed=seed, epoch=epoch, rank=1, world=3, skip=4)) == perm[1:21:3][4:]
    assert len(EpochSampler(n, seed=seed, epoch=epoch, rank=1, world=3, skip=4)) == 3
    # the same (seed, epoch) gives the same order in a fresh generator; other epochs or seeds do not
    assert list(EpochSampler(n, seed=seed, epoch=epoch)) == perm
    assert list(EpochSampler(n, seed=seed, epoch=epoch + 1)) != perm
    assert list(EpochSampler(n, seed=seed + 1, epoch=epoch)) != perm
    assert 0 <= epoch_seed(seed, epoch) < 2**63


def test_unshuffled_shards_are_contiguous_and_cover_everything() -> None:
    shards = [list(EpochSampler(10, shuffle=False, rank=r, world=3)) for r in range(3)]
    assert shards == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    with pytest.raises(ConfigError):
        EpochSampler(2, world=3)


@pytest.mark.parametrize(("n", "batch", "world", "steps"), [(256, 32, 1, 8), (256, 32, 2, 4), (20, 32, 1, 1), (100, 32, 3, 1), (100, 32, 1, 3), (64, 32, 1, 2)])
def test_steps_per_epoch(n: int, batch: int, world: int, steps: int) -> None:
    assert steps_per_epoch(n, batch, world) == steps


def test_evaluation_shards_are_whole_batches() -> None:
    assert _shards(10, 3, 2) == [range(0, 6), range(6, 10)]  # batches [0,3) [3,6) | [6,9) [9,10)
    assert _shards(5, 10, 3) == [range(0, 5)]
    assert _shards(100, 10, 3) == [range(0, 30), range(30, 60), range(60, 100)]


# ----------------------------------------------------------------------------- in-process resume


@pytest.fixture(scope="module")
def tiny_data() -> tuple[Any, Any]:
    return load_dataset("cluttered-digits", "train", 128, seed=0, size=32), load_dataset("cluttered-digits", "val", 32, seed=0, size=32)


CFG = TrainConfig(epochs=3, batch_size=32, seed=0)  # 4 steps per epoch, 12 in all


def _model() -> SelfExplainer:
    seed_all(0)
    return create_model("se", "resnet8", 10, 1, {"stem_stride": 2}, reduction=4)


def _crash_at(monkeypatch: pytest.MonkeyPatch, crash_step: int, request_step: int | None = None) -> None:
    """Make training raise before optimizer step ``crash_step`` (and ask for a checkpoint during ``request_step``)."""
    original = T.SelfcamModule.training_step

    def step(self: T.SelfcamModule, batch: Any, batch_idx: int) -> torch.Tensor:
        done = self.step_offset + self.global_step
        if done == request_step:
            request_checkpoint()
        if done == crash_step:
            raise RuntimeError("simulated crash")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(T.SelfcamModule, "training_step", step)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory, tiny_data: tuple[Any, Any]) -> Path:
    run = tmp_path_factory.mktemp("reference")
    fit(_model(), *tiny_data, CFG, run, progress=False)
    return run


@pytest.fixture(scope="module")
def crashed_template(tmp_path_factory: pytest.TempPathFactory, tiny_data: tuple[Any, Any]) -> Path:
    """A run that saved its state after step 6 on request (epoch 1, batch 2) and crashed before step 8."""
    run = tmp_path_factory.mktemp("crashed") / "run"
    with pytest.MonkeyPatch.context() as monkeypatch:
        _crash_at(monkeypatch, crash_step=7, request_step=5)
        with pytest.raises(RuntimeError, match="simulated crash"):
            fit(_model(), *tiny_data, CFG, run, progress=False)
    return run


@pytest.fixture
def crashed_run(tmp_path: Path, crashed_template: Path) -> Path:
    """A fresh copy of the crashed run, for a test to resume or damage."""
    return Path(shutil.copytree(crashed_template, tmp_path / "run"))


def test_requested_state_mid_epoch_then_resume_is_bit_identical(crashed_run: Path, reference_run: Path, tiny_data: tuple[Any, Any]) -> None:
    state = latest_state(crashed_run)
    assert state is not None and (state.epoch, state.batch, state.global_step) == (1, 2, 6)
    assert state.path == crashed_run / "checkpoints" / "step-000000006"
    assert sorted(p.name for p in state.path.iterdir()) == ["state.json", "state.safetensors"]
    assert sorted(p.name for p in (crashed_run / "checkpoints").iterdir()) == ["step-000000004", "step-000000006"]  # the newest and the one before
    assert [row["epoch"] for row in state.history] == [0]
    assert not (crashed_run / "model.safetensors").exists()

    history = fit(_model(), *tiny_data, CFG, crashed_run, progress=False, resume=True)
    _assert_bit_identical(_weights(crashed_run), _weights(reference_run))
    assert [row["epoch"] for row in history] == [0, 1, 2]
    reference = json.loads((reference_run / "history.json").read_text())
    assert history[-1]["val_loss"] == reference[-1]["val_loss"]  # same weights, same validation
    assert not (crashed_run / "checkpoints").exists()  # the state goes once the final checkpoint is written
    load_checkpoint(crashed_run)


def test_sigusr1_asks_for_a_state_at_the_end_of_the_batch(tmp_path: Path, tiny_data: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    original = T.SelfcamModule.training_step

    def step(self: T.SelfcamModule, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.global_step == 1:
            os.kill(os.getpid(), signal.SIGUSR1)  # what `kill -USR1 PID` does from outside
        if self.global_step == 3:
            raise RuntimeError("simulated crash")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(T.SelfcamModule, "training_step", step)
    before = signal.getsignal(signal.SIGUSR1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(_model(), *tiny_data, CFG, tmp_path / "run", progress=False)
    state = latest_state(tmp_path / "run")
    assert state is not None and (state.epoch, state.batch, state.global_step) == (0, 2, 2)
    assert signal.getsignal(signal.SIGUSR1) == before  # the handler is only installed while training


class _Noisy(torch.utils.data.Dataset):
    """The tiny training set plus noise drawn from torch's global generator: a random augmentation."""

    def __init__(self, base: Any) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        x, *rest = self.base[i]
        return (x + 0.1 * torch.randn_like(x), *rest)


def test_resume_at_an_epoch_boundary_repeats_random_augmentation(tmp_path: Path, tiny_data: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    train, val = _Noisy(tiny_data[0]), tiny_data[1]
    fit(_model(), train, val, CFG, tmp_path / "ref", progress=False)
    _crash_at(monkeypatch, crash_step=8)  # the state after epoch 1 (step 8) is on disk; epoch 2 crashes at once
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(_model(), train, val, CFG, tmp_path / "run", progress=False)
    monkeypatch.undo()
    shutil.copytree(tmp_path / "run", tmp_path / "run-no-rng")
    assert latest_state(tmp_path / "run").global_step == 8  # type: ignore[union-attr]
    fit(_model(), train, val, CFG, tmp_path / "run", progress=False, resume=True)
    _assert_bit_identical(_weights(tmp_path / "run"), _weights(tmp_path / "ref"))
    # without the per-epoch seeding of the global generators the augmentation would not repeat
    monkeypatch.setattr(T, "_seed_globals", lambda seed: None)
    fit(_model(), train, val, CFG, tmp_path / "run-no-rng", progress=False, resume=True)
    ref, other = _weights(tmp_path / "ref"), _weights(tmp_path / "run-no-rng")
    assert any(not torch.equal(ref[k], other[k]) for k in ref)


def test_resuming_a_finished_run_loads_it_and_trains_nothing(reference_run: Path, tiny_data: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(T, "_train", lambda *a, **k: pytest.fail("a finished run was trained again"))
    model = _model()
    history = fit(model, *tiny_data, CFG, reference_run, progress=False, resume=True)
    assert len(history) == CFG.epochs
    _assert_bit_identical({k: v for k, v in model.state_dict().items()}, _weights(reference_run))
    code = runner.invoke(app, ["train", "--resume", str(reference_run)])
    assert code.exit_code == 0 and "already finished" in code.output


def test_resume_refuses_another_recipe(crashed_run: Path, tiny_data: tuple[Any, Any]) -> None:
    with pytest.raises(ConfigError, match="lr: 0.003 stored, 0.01 given"):
        fit(_model(), *tiny_data, TrainConfig(epochs=3, batch_size=32, seed=0, lr=0.01), crashed_run, progress=False, resume=True)
    with pytest.raises(ConfigError, match="trained as"):
        fit(create_model("plain", "resnet8", 10, 1, {"stem_stride": 2}), *tiny_data, CFG, crashed_run, progress=False, resume=True)
    result = runner.invoke(app, ["train", "--resume", str(crashed_run), "--epochs", "5", "--method", "se"])
    assert result.exit_code == 2
    assert "--epochs 5 (the run has 3)" in result.output and "--method" not in result.output.split("differ")[1]
    with pytest.raises(CheckpointError, match="nothing to resume"):
        fit(_model(), *tiny_data, CFG, crashed_run.parent / "empty", progress=False, resume=True)


def _edit_json(path: Path, edit: Any) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.pop("global_step"), r"missing fields \['global_step'\]"),
        (lambda d: d.update(surprise=1), r"unknown fields \['surprise'\]"),
        (lambda d: d.update(epoch="1"), "field 'epoch' must be int"),
        (lambda d: d.update(epoch=True), "field 'epoch' must be int"),
        (lambda d: d["rng"]["numpy"].pop("pos"), r"rng.numpy: missing fields \['pos'\]"),
        (lambda d: d["train"].update(lr="fast"), "train: field 'lr' must be float"),
        (lambda d: d["model"].update(num_classes=2.5), "model.num_classes must be int"),
        (lambda d: d["history"].append({"epoch": "x"}), r"history\[1\] must be an object of numbers"),
        (lambda d: d.update(format="something else"), "not a selfcam training state"),
    ],
)
def test_state_json_is_validated(crashed_run: Path, edit: Any, message: str) -> None:
    shutil.rmtree(crashed_run / "checkpoints" / "step-000000004")  # no state to fall back to
    state_json = crashed_run / "checkpoints" / "step-000000006" / "state.json"
    _edit_json(state_json, edit)
    with pytest.raises(CheckpointError, match=message) as e:
        latest_state(crashed_run)
    assert str(state_json) in str(e.value)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["optimizer"]["param_groups"][0].update(lr="high"), r"optimizer.param_groups\[0\].lr: expected a float"),
        (lambda d: d["optimizer"]["param_groups"][0].pop("betas"), r"optimizer.param_groups\[0\]: expected fields"),
        (lambda d: d["scheduler"].update(total_steps=99), "schedule of 99 steps, this run has 12"),
        (lambda d: d["optimizer"]["state"].update({"999": {}}), "optimizer.state has an entry '999' for no parameter"),
    ],
)
def test_optimizer_and_scheduler_state_are_validated_on_resume(crashed_run: Path, tiny_data: tuple[Any, Any], edit: Any, message: str) -> None:
    state_json = crashed_run / "checkpoints" / "step-000000006" / "state.json"
    _edit_json(state_json, edit)
    with pytest.raises(CheckpointError, match=message) as e:
        fit(_model(), *tiny_data, CFG, crashed_run, progress=False, resume=True)
    assert str(state_json) in str(e.value)


def test_a_damaged_or_half_written_state_is_never_taken_for_a_good_one(crashed_run: Path, tiny_data: tuple[Any, Any]) -> None:
    root = crashed_run / "checkpoints"
    # a writer killed mid-way leaves only a temporary directory: ignored
    (root / ".tmp-killed").mkdir()
    (root / ".tmp-killed" / "state.json").write_text('{"epoch": 99')
    assert latest_state(crashed_run).global_step == 6  # type: ignore[union-attr]
    # a truncated tensor file under a complete name: caught by the checksum; the state before it is taken
    tensors = root / "step-000000006" / "state.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-100])
    assert latest_state(crashed_run).global_step == 4  # type: ignore[union-attr]
    # both damaged: the newest one's error, named
    older = root / "step-000000004" / "state.safetensors"
    older.write_bytes(older.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="does not match the checksum") as e:
        fit(_model(), *tiny_data, CFG, crashed_run, progress=False, resume=True)
    assert str(tensors) in str(e.value)


# ----------------------------------------------------------------------------- NaN


def _nan_after(monkeypatch: pytest.MonkeyPatch, steps: int) -> None:
    """The training loss becomes NaN from optimizer step ``steps`` on."""
    original, calls = SelfExplainer.loss, {"train": 0}

    def loss(self: SelfExplainer, out: Any, target: torch.Tensor) -> torch.Tensor:
        value = original(self, out, target)
        if self.training:
            calls["train"] += 1
            if calls["train"] > steps:
                return value * float("nan")
        return value

    monkeypatch.setattr(SelfExplainer, "loss", loss)


def test_nan_loss_stops_training_and_keeps_the_last_good_state(tmp_path: Path, tiny_data: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    _nan_after(monkeypatch, steps=5)  # epoch 0 (steps 1-4) completes and is saved; step 6 is NaN
    with pytest.raises(DivergenceError, match="train loss is nan at step 5") as e:
        fit(_model(), *tiny_data, CFG, tmp_path / "run", progress=False)
    assert isinstance(e.value, FloatingPointError) and isinstance(e.value, SelfcamError)
    assert "last good state is" in str(e.value) and "step-000000004" in str(e.value)
    monkeypatch.undo()
    state = latest_state(tmp_path / "run")
    assert state is not None and (state.epoch, state.batch, state.global_step) == (1, 0, 4)
    tensors = T._read_tensors(state)
    assert all(torch.isfinite(t).all() for k, t in tensors.items() if t.is_floating_point())
    model = _model()
    T._load_model(model, tensors, state)
    assert torch.isfinite(model(torch.randn(2, 1, 32, 32)).logits).all()


def test_nan_loss_is_one_line_and_exit_2_on_the_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _nan_after(monkeypatch, steps=0)
    result = runner.invoke(app, ["train", "--method", "se", *TINY, "--train-size", "64", "--val-size", "32", "--epochs", "1", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "train loss is nan" in lines[0], result.output


def test_weights_that_are_not_finite_are_never_saved(tmp_path: Path, tiny_data: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    original = T._StateWriter.save

    def save(self: T._StateWriter, trainer: Any, module: Any, epoch: int, batch: int) -> None:
        with torch.no_grad():  # the last step of the epoch left an infinite weight behind (its loss was finite)
            next(module.model.parameters()).view(-1)[0] = float("inf")
        original(self, trainer, module, epoch, batch)

    monkeypatch.setattr(T._StateWriter, "save", save)
    with pytest.raises(DivergenceError, match="not finite after step 4"):
        fit(_model(), *tiny_data, CFG, tmp_path / "run", progress=False)
    assert latest_state(tmp_path / "run") is None


# ----------------------------------------------------------------------------- kill -9 and resume


def _wait_for_state(run: Path, proc: subprocess.Popen[bytes], epoch: int, timeout: float = 300) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            state = latest_state(run)
        except CheckpointError:
            state = None  # being replaced right now
        if state is not None and state.epoch >= epoch:
            return
        assert proc.poll() is None, f"training ended before its epoch-{epoch} state appeared: {proc.stderr.read() if proc.stderr else ''}"  # type: ignore[union-attr]
        time.sleep(0.02)
    pytest.fail(f"no epoch-{epoch} state in {run} after {timeout} s")


# every task: a head and data sizes that make an epoch take a second or two
SIGKILL_RUNS = {
    "image": ["--method", "lfi-light", "--train-size", "256", "--val-size", "64"],
    "video": ["--task", "video", "--train-size", "96", "--val-size", "32", "--batch-size", "16"],
    "asd": ["--task", "asd", "--train-size", "96", "--val-size", "32", "--batch-size", "16"],
}


@pytest.mark.slow
@pytest.mark.parametrize("task", list(SIGKILL_RUNS))
def test_sigkill_then_resume_gives_the_uninterrupted_weights(tmp_path: Path, task: str) -> None:
    args = ["train", *TINY, *SIGKILL_RUNS[task], "--epochs", "4", "--seed", "3"]
    reference = subprocess.Popen(_cli(*args, "--out", str(tmp_path / "ref")), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    proc = subprocess.Popen(_cli(*args, "--out", str(tmp_path / "run")), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for_state(tmp_path / "run", proc, epoch=1)
        proc.send_signal(signal.SIGKILL)
        assert reference.wait(timeout=300) == 0, reference.stderr.read()  # type: ignore[union-attr]
    finally:
        for p in (proc, reference):
            p.kill()
            p.wait()
    state = latest_state(tmp_path / "run")
    assert state is not None and not state.finished and not (tmp_path / "run" / "model.safetensors").exists()
    resumed = subprocess.run(_cli("train", "--resume", str(tmp_path / "run"), "--quiet"), env=_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    _assert_bit_identical(_weights(tmp_path / "run"), _weights(tmp_path / "ref"))
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    reference_history = json.loads((tmp_path / "ref" / "history.json").read_text())
    assert [r["epoch"] for r in history] == [0, 1, 2, 3]
    assert [r["val_loss"] for r in history] == [r["val_loss"] for r in reference_history]


# ----------------------------------------------------------------------------- determinism (issue 8.4)


def _without_timing(doc: Any) -> Any:
    if isinstance(doc, dict):
        return {k: _without_timing(v) for k, v in doc.items() if k not in ("train_seconds", "seconds") and "ms_per" not in k}
    return [_without_timing(v) for v in doc] if isinstance(doc, list) else doc


@pytest.mark.slow
def test_same_seed_gives_the_same_demo_metrics(tmp_path: Path) -> None:
    from selfcam.demo import run_demo
    from selfcam.recipes import demo_recipe

    recipe = demo_recipe("digits", epochs=1, train_size=256, val_size=64, test_size=64, image_size=32, batch_size=32,
                         seed=1, methods=("plain", "se"))  # fmt: skip
    docs = []
    for name in ("a", "b"):
        run_demo(tmp_path / name, recipe, progress=False, log=lambda s: None)
        docs.append(json.loads((tmp_path / name / "metrics.json").read_text()))
    assert set(docs[0]["runs"]) == {"plain", "se"} and set(docs[0]["runs"]["plain"]["results"]) == {"self", "gradcam"}
    assert _without_timing(docs[0]) == _without_timing(docs[1])
    assert math.isfinite(docs[0]["runs"]["se"]["results"]["self"]["accuracy"])
    _assert_bit_identical(_weights(tmp_path / "a" / "runs" / "se"), _weights(tmp_path / "b" / "runs" / "se"))


# ----------------------------------------------------------------------------- DDP (issue 7.5)


@pytest.mark.slow
def test_two_process_training_and_sharded_evaluation(tmp_path: Path) -> None:
    run = tmp_path / "ddp"
    args = ["train", "--method", "se", *TINY, "--train-size", "256", "--val-size", "64", "--epochs", "1", "--devices", "2", "--accelerator", "cpu"]
    proc = subprocess.run(_cli(*args, "--out", str(run)), env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("wrote") == 1, proc.stdout  # rank 0 alone reports (and writes)
    model, doc = load_checkpoint(run)
    assert doc["train"]["devices"] == 2 and [r["epoch"] for r in json.loads((run / "history.json").read_text())] == [0]
    assert not (run / "checkpoints").exists()

    results = []
    for devices in ("1", "2"):
        out = tmp_path / f"eval{devices}"
        result = runner.invoke(app, ["evaluate", "--checkpoint", str(run), "--n", "70", "--batch-size", "16", "--metrics", "accuracy,pointing_game,iou,average_drop",
                                     "--out", str(out), "--devices", devices])  # fmt: skip
        assert result.exit_code == 0, result.output
        results.append(json.loads((out / "evaluation.json").read_text()))
    one, two = (r["runs"]["ddp"]["results"]["self"] for r in results)
    assert results[0]["n_items"] == results[1]["n_items"] == 70
    assert one.keys() == two.keys()
    for k in one:
        if k != "map_ms_per_image":
            assert one[k] == pytest.approx(two[k], rel=1e-6, abs=1e-6), k


def test_precision_is_lightnings_recorded_and_kept_on_resume(tmp_path: Path) -> None:
    """--precision bf16-mixed trains under autocast (weights stay float32) and is recorded (a resume compares it as the
    other recipe options); --num-workers is a runtime option; unknown precisions are refused in one line (issue 17.4)."""
    from typer.testing import CliRunner

    from selfcam.cli import app

    with pytest.raises(ConfigError, match="precision must be one of 32, bf16-mixed, 16-mixed"):
        TrainConfig(precision="64")
    run = tmp_path / "run"
    base = ["train", "--method", "se", "--backbone", "resnet8", "--epochs", "1", "--train-size", "64", "--val-size", "16",
            "--image-size", "32", "--batch-size", "32", "--quiet"]  # fmt: skip
    result = CliRunner().invoke(app, [*base, "--out", str(run), "--precision", "bf16-mixed", "--num-workers", "1"])
    assert result.exit_code == 0, result.output
    doc = json.loads((run / "config.json").read_text())
    assert (doc["train"]["precision"], doc["train"]["num_workers"]) == ("bf16-mixed", 1)
    model, _ = load_checkpoint(run)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    stored = T._train_config({k: v for k, v in doc["train"].items() if k != "precision"}, "an older state")
    assert stored.precision == "32"  # states written before the option read as full precision
    result = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "bad"), "--precision", "bf16"])
    assert result.exit_code == 2 and "--precision must be one of" in result.output, result.output


def test_epoch_metrics_are_the_means_over_every_item_and_fit_restores_the_kernel_flags() -> None:
    """The history's loss and accuracy (logged once per epoch from running sums) are means over items: validation
    after the only epoch is the trained model on the 300 validation images in batches of 256 and 44, by hand;
    fit leaves torch's deterministic-algorithm settings as it found them (Lightning switches them on)."""
    from selfcam.train import TrainConfig, fit

    train, val = load_dataset("cluttered-digits", "train", 96, size=16), load_dataset("cluttered-digits", "val", 300, size=16)
    torch.manual_seed(0)
    model = create_model("se", "resnet8", 10, 1, {"stem_stride": 2})
    assert not torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    rows = fit(model, train, val, TrainConfig(epochs=1, batch_size=32, accelerator="cpu"), progress=False)
    assert not torch.are_deterministic_algorithms_enabled() and torch.utils.deterministic.fill_uninitialized_memory == fill
    loss = correct = 0.0
    with torch.no_grad():
        for start in (0, 256):
            x, y = val.normalize(val.images[start : start + 256]), val.labels[start : start + 256]
            out = model(x)
            loss += float(model.loss(out, y)) * len(y)
            correct += float((out.logits.argmax(1) == y).sum())
    assert rows[0]["val_loss"] == pytest.approx(loss / 300, abs=2e-6) and rows[0]["val_acc"] == pytest.approx(correct / 300, abs=2e-6)
    assert math.isfinite(rows[0]["train_loss"]) and 0 <= rows[0]["train_acc"] <= 1


def test_correct_count_by_hand() -> None:
    """The history's accuracy: argmax against the label (multiclass), each logit > 0 against its {0, 1} target,
    every label of every item scored (multilabel); torchmetrics' Accuracy, which fit used before, agrees."""
    import torchmetrics

    from selfcam.train import correct_count

    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.5, 0.2, 0.9], [1.0, 0.0, -1.0]])
    labels = torch.tensor([0, 2, 2, 0])
    correct, scored = correct_count(logits, labels)
    assert (float(correct), scored) == (3.0, 4)
    attrs = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    correct, scored = correct_count(logits - 0.6, attrs, "multilabel")  # logits > 0.6 predict 1
    assert (float(correct), scored) == (6.0, 12)  # predictions 110, 011, 001, 100: 1 + 3 + 0 + 2 right
    for kind, target, x, n in (("multiclass", labels, logits, {"num_classes": 3}), ("multilabel", attrs, logits - 0.6, {"num_labels": 3})):
        ours = correct_count(x, target, kind)
        theirs = torchmetrics.Accuracy(task=kind, **n)(x, target.long())  # type: ignore[arg-type]
        assert float(ours[0]) / ours[1] == pytest.approx(float(theirs))


def test_compile_trains_the_compiled_model_records_it_and_a_compiler_failure_is_one_config_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """TrainConfig.compile: the module calls torch.compile(model) (the same parameters: the model given is trained),
    config.json records it; a failure of the compiler on the first step is a ConfigError naming --compile."""
    from torch._dynamo.exc import BackendCompilerFailed

    from selfcam.train import TrainConfig, fit

    train = load_dataset("cluttered-digits", "train", 64, size=16)
    compiled: list[torch.nn.Module] = []

    def spy(model: torch.nn.Module) -> Any:
        compiled.append(model)
        return lambda *x: model(*x)

    monkeypatch.setattr(torch, "compile", spy)
    model = create_model("se", "resnet8", 10, 1, {"stem_stride": 2})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit(model, train, None, TrainConfig(epochs=1, batch_size=32, accelerator="cpu", compile=True), tmp_path / "run", progress=False)
    assert compiled == [model] and any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["compile"] is True

    def failing(model: torch.nn.Module) -> Any:
        def call(*x: torch.Tensor) -> Any:
            raise BackendCompilerFailed(lambda: None, RuntimeError("no C compiler"), None)
        return call

    monkeypatch.setattr(torch, "compile", failing)
    with pytest.raises(ConfigError, match=r"compile: torch.compile could not compile the model here \(BackendCompilerFailed.*--compile"):
        fit(create_model("se", "resnet8", 10, 1), train, None, TrainConfig(epochs=1, batch_size=32, accelerator="cpu", compile=True),
            progress=False)
