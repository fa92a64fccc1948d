"""ONNX export of every head and every task (parity with PyTorch in onnxruntime) and torch.compile parity."""

from __future__ import annotations

import copy
import functools
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from selfcam.asd import MODALITIES, ASDConfig, ASDModel, log_mel
from selfcam.cli import app
from selfcam.errors import ConfigError
from selfcam.export import example_inputs, export_onnx, onnx_parity
from selfcam.heads import se_select
from selfcam.model import SelfExplainer, create_model
from selfcam.checkpoint import load_checkpoint, save_checkpoint
from selfcam.tasks import get_task
from selfcam.video import create_video_model

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

HEADS = ("plain", "lfi", "lfi-light", "se", "abn")
SIZE, CLASSES, TOL = 32, 4, 1e-4
runner = CliRunner()


def _trained(method: str, seed: int = 0, **head_kwargs) -> SelfExplainer:
    """A resnet8 head after 3 SGD steps on random data: non-trivial BN statistics and weights."""
    torch.manual_seed(seed)
    model = create_model(method, "resnet8", CLASSES, 3, **head_kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(3):
        x, y = torch.randn(8, 3, SIZE, SIZE), torch.randint(0, CLASSES, (8,))
        opt.zero_grad()
        model.loss(model(x), y).backward()
        opt.step()
    return model.eval()


def _run_onnx(path: Path, x: torch.Tensor) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits", "heatmap"], {"image": x.numpy()})


@pytest.mark.parametrize("method", HEADS)
def test_onnx_matches_pytorch_for_every_head_and_batch_size(method: str, tmp_path: Path) -> None:
    model = _trained(method)
    path = export_onnx(model, tmp_path / f"{method}.onnx", SIZE)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert [i.name for i in proto.graph.input] == ["image"]
    assert [o.name for o in proto.graph.output] == ["logits", "heatmap"]
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # symbolic: any batch size
    assert json.loads({p.key: p.value for p in proto.metadata_props}["selfcam_model"])["method"] == method
    gen = torch.Generator().manual_seed(1)
    for n in (1, 3):
        x = torch.randn(n, 3, SIZE, SIZE, generator=gen)
        logits, heat = _run_onnx(path, x)
        with torch.no_grad():
            want = model.explain(x)  # heatmap at input resolution
        assert logits.shape == (n, CLASSES) and heat.shape == (n, SIZE, SIZE)
        assert np.abs(logits - want.logits.numpy()).max() <= TOL
        assert np.abs(heat - want.heatmap.numpy()).max() <= TOL
        assert heat.min() >= 0 and heat.max() <= 1 and heat.reshape(n, -1).std(1).min() > 0.01  # not constant


def test_se_channel_selection_is_data_dependent_in_onnx(tmp_path: Path) -> None:
    """Different images select different channel sets; the fallback (no channel above the bar) too."""
    x = torch.randn(6, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    for factor in (1.282, 100.0):  # 100: every row falls back to its arg-max channel
        model = _trained("se", factor=factor, reduction=4)
        with torch.no_grad():
            out = model(x)
        counts = out.selected.sum(1)
        if factor == 100.0:
            assert counts.tolist() == [1] * 6
        else:
            assert len(set(counts.tolist())) > 1 or len({tuple(r) for r in out.selected.int().tolist()}) > 1
        path = export_onnx(model, tmp_path / f"se-{factor}.onnx", SIZE)
        logits, heat = _run_onnx(path, x)
        with torch.no_grad():
            want = model.explain(x)
        assert np.abs(logits - want.logits.numpy()).max() <= TOL
        assert np.abs(heat - want.heatmap.numpy()).max() <= TOL


def test_se_select_fallback_by_hand() -> None:
    s = torch.tensor([[0.0, 0.0, 0.0, 10.0], [1.0, 2.0, 3.0, 4.0]])
    # row 0: mean 2.5, std 4.33 -> bar 8.05: only channel 3. row 1: mean 2.5, std 1.118 -> bar 3.93: channel 3
    assert se_select(s).tolist() == [[False, False, False, True], [False, False, False, True]]
    # factor 5: no channel passes, each row takes its arg-max (ties: the first)
    assert se_select(torch.tensor([[1.0, 3.0, 3.0, 2.0]]), 5.0).tolist() == [[False, True, False, False]]


def _run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output  # click >= 8.2: stdout and stderr together


def test_cli_export_writes_a_checked_model_with_preprocessing(tmp_path: Path) -> None:
    run = tmp_path / "run"
    save_checkpoint(_trained("lfi-light"), run, data={"name": "cluttered-digits", "size": SIZE})
    code, out = _run("export", "--checkpoint", str(run), "--format", "onnx", "--out", str(tmp_path / "m.onnx"))
    assert code == 0, out
    assert "opset 17" in out and "max |diff|" in out
    proto = onnx.load(str(tmp_path / "m.onnx"))
    assert proto.opset_import[0].version == 17
    meta = {p.key: json.loads(p.value) for p in proto.metadata_props}
    assert meta["preprocess"] == {"size": SIZE, "channels": 3, "mean": [0.15] * 3, "std": [0.26] * 3}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--format", "tflite"], "unknown export format 'tflite'"),
        (["--opset", "9"], "writes integer opsets 11 to 20"),
        (["--opset", "21"], "writes integer opsets 11 to 20"),
    ],
)
def test_cli_export_bad_options_are_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    run = tmp_path / "run"
    save_checkpoint(create_model("plain", "resnet8", CLASSES, 3), run, data={"size": SIZE})
    code, out = _run("export", "--checkpoint", str(run), "--out", str(tmp_path / "m.onnx"), *args)
    assert code == 2 and message in out and "Traceback" not in out
    assert not (tmp_path / "m.onnx").exists()


def test_cli_export_of_a_checkpoint_whose_config_does_not_match_its_weights(tmp_path: Path) -> None:
    run = tmp_path / "run"
    save_checkpoint(create_model("se", "resnet8", CLASSES, 3), run, data={"size": SIZE})
    doc = json.loads((run / "config.json").read_text())
    doc["model"]["method"] = "lfi"  # the weights are an SE model's
    (run / "config.json").write_text(json.dumps(doc))
    code, out = _run("export", "--checkpoint", str(run), "--out", str(tmp_path / "m.onnx"))
    assert code == 2 and "Traceback" not in out
    assert "weights do not match config (lfi on resnet8)" in out and len(out.strip().splitlines()) == 1


def test_cli_export_needs_a_size_when_the_run_has_none(tmp_path: Path) -> None:
    run = tmp_path / "run"
    save_checkpoint(create_model("plain", "resnet8", CLASSES, 3), run)
    code, out = _run("export", "--checkpoint", str(run), "--out", str(tmp_path / "m.onnx"))
    assert code == 2 and "pass --size" in out
    code, out = _run("export", "--checkpoint", str(run), "--out", str(tmp_path / "m.onnx"), "--size", "24")
    assert code == 0, out
    dims = onnx.load(str(tmp_path / "m.onnx")).graph.output[1].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[1:]] == [24, 24]


@pytest.mark.parametrize("method", HEADS)
def test_torch_compile_matches_eager(method: str) -> None:
    """``backend="aot_eager"``: traced by dynamo and AOTAutograd like inductor, without the C++ compile
    (inductor takes 17-30 s per head on 2 CPU cores; `selfcam bench latency --compile` uses it)."""
    torch._dynamo.reset()
    model = _trained(method)
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want, got = model(x), compiled(x)
    assert type(got) is type(want)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.heatmap, want.heatmap, atol=1e-5, rtol=1e-5)
    if want.selected is not None:
        assert torch.equal(got.selected, want.selected)


# --- the other tasks: attributes, video, asd ---------------------------------------------------

ATTRS, FRAMES = 5, 4
IO = {  # task -> (input names, output names), as docs/export.md's table
    "attributes": (("image",), ("logits", "heatmap")),
    "video": (("clip",), ("logits", "heatmap")),
    "asd": (("frames", "audio"), ("logits", "frame_logits", "heatmap", "modality_importance")),
}


def _task_model(task: str) -> torch.nn.Module:
    """A small model of ``task`` after 3 SGD steps on random data (non-trivial BN statistics and weights)."""
    return copy.deepcopy(_trained_task_model(task))


@functools.lru_cache(maxsize=None)
def _trained_task_model(task: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if task == "attributes":
        model = create_model("se-multilabel", "resnet8", ATTRS, 3, reduction=4)
        batch = lambda n: ((torch.randn(n, 3, SIZE, SIZE),), (torch.randint(0, 2, (n, ATTRS)).float(),))  # noqa: E731
    elif task == "video":
        model = create_video_model("resnet8", num_classes=3, in_chans=1, frames=FRAMES, backbone_kwargs={"stem_stride": 2})
        batch = lambda n: ((torch.randn(n, FRAMES, 1, SIZE, SIZE),), (torch.randint(0, 3, (n,)),))  # noqa: E731
    else:
        model = ASDModel(ASDConfig(frames=FRAMES, backbone_kwargs={"stem_stride": 2}))
        spf = model.config.samples_per_frame
        batch = lambda n: ((torch.randn(n, FRAMES, 3, SIZE, SIZE), 0.1 * torch.randn(n, FRAMES * spf)),  # noqa: E731
                           (torch.randint(0, 2, (n,)), torch.randint(0, 2, (n, FRAMES))))  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(3):
        inputs, targets = batch(8)
        opt.zero_grad()
        model.loss(model(*inputs), *targets).backward()
        opt.step()
    return model.eval()


def _expected(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> dict[str, np.ndarray]:
    """What each output of the graph should hold, from ``model.explain`` (the importance dict by hand)."""
    with torch.no_grad():
        out = model.explain(*inputs)
    want = {"logits": out.logits, "heatmap": out.heatmap}
    if hasattr(out, "frame_logits"):
        want["frame_logits"] = out.frame_logits
        want["modality_importance"] = torch.stack([out.importance["audio"], out.importance["face"]], 1)
    return {k: v.numpy() for k, v in want.items()}


def _shapes(task: str, n: int) -> dict[str, tuple[int, ...]]:
    hw = (SIZE, SIZE)
    return {
        "attributes": {"logits": (n, ATTRS), "heatmap": (n, ATTRS, *hw)},
        "video": {"logits": (n, 3), "heatmap": (n, FRAMES, *hw)},
        "asd": {"logits": (n, 2), "frame_logits": (n, FRAMES, 2), "heatmap": (n, FRAMES, *hw), "modality_importance": (n, 2)},
    }[task]


@pytest.mark.parametrize("task", list(IO))
def test_onnx_matches_pytorch_for_every_task_at_other_batch_sizes(task: str, tmp_path: Path) -> None:
    model = _task_model(task)
    assert model.task == task
    path = export_onnx(model, tmp_path / f"{task}.onnx", SIZE)  # traced at batch 2
    proto = onnx.load(str(path))
    inputs, outputs = IO[task]
    assert get_task(task).graph.inputs == inputs and get_task(task).graph.outputs == outputs
    assert tuple(i.name for i in proto.graph.input) == inputs
    assert tuple(o.name for o in proto.graph.output) == outputs
    for value in [*proto.graph.input, *proto.graph.output]:
        dim = value.type.tensor_type.shape.dim[0]
        assert dim.dim_param and not dim.dim_value, value.name  # symbolic: any batch size
    meta = {p.key: json.loads(p.value) for p in proto.metadata_props}
    assert meta["task"] == task
    assert tuple(meta["inputs"]) == inputs and tuple(meta["outputs"]) == outputs
    assert meta["selfcam_model"]["backbone"] == "resnet8"
    if task == "asd":
        assert meta["modalities"] == list(MODALITIES) == ["audio", "face"]
        assert meta["inputs"] == {"frames": f"(N, {FRAMES}, 3, {SIZE}, {SIZE})", "audio": f"(N, {FRAMES * 640})"}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(1)
    for n in (1, 3):
        xs = tuple(torch.randn(n, *x.shape[1:], generator=gen) * (0.1 if x.dim() == 2 else 1) for x in example_inputs(model, SIZE))
        got = dict(zip(outputs, session.run(list(outputs), {name: x.numpy() for name, x in zip(inputs, xs)})))
        want = _expected(model, xs)
        assert set(want) == set(outputs)
        for name in outputs:
            assert got[name].shape == _shapes(task, n)[name], name
            assert np.abs(got[name] - want[name]).max() <= TOL, name
        heat = got["heatmap"]
        assert heat.min() >= 0 and heat.max() <= 1
        assert heat.reshape(-1, SIZE * SIZE).std(1).min() > 0.01  # every map (attribute, frame) has structure
        if task == "asd":  # the two columns differ by more than the tolerance, so swapping them would fail above
            assert np.abs(want["modality_importance"][:, 0] - want["modality_importance"][:, 1]).min() > 2 * TOL
        diff = onnx_parity(model, path, *xs)
        assert list(diff) == list(outputs) and max(diff.values()) <= TOL


def test_log_mel_as_a_dft_convolution_matches_torch_stft() -> None:
    """The ONNX graph computes ASD's spectrum as a conv1d with the windowed DFT basis (no stft, no complex).

    Within 1e-5 of torch.stft (float32, after the log) on noise-like audio; on a pure tone, whose
    mel energies span 46 dB down to the eps floor, within 1e-4 (float32 stft is itself 2e-5 from a
    float64 stft there, the convolution 6e-5: the leakage bins are small differences of large sums)."""
    gen = torch.Generator().manual_seed(4)
    t = torch.arange(4 * 640) / 16000
    waves = {
        "noise": 0.1 * torch.randn(3, 4 * 640, generator=gen),
        "loud": 3.0 * torch.randn(2, 4 * 640, generator=gen),
        "sine": 0.5 * torch.sin(2 * torch.pi * 440 * t)[None],
        "silence": torch.zeros(1, 4 * 640),
        "odd length": 0.1 * torch.randn(2, 1000, generator=gen),
    }
    for name, w in waves.items():
        ref = log_mel(w)  # torch.stft outside an export
        assert torch.equal(ref, log_mel(w, dft=False)), name
        conv = log_mel(w, dft=True)
        assert conv.shape == ref.shape == (len(w), 40, w.shape[1] // 160), name
        assert (conv - ref).abs().max() <= (1e-4 if name == "sine" else 1e-5), name
    # the same on other parameters: an odd hop, fewer mels, a smaller FFT
    w = waves["noise"]
    ref, conv = log_mel(w, 8000, 20, 256, 97, dft=False), log_mel(w, 8000, 20, 256, 97, dft=True)
    assert conv.shape == ref.shape and (conv - ref).abs().max() <= 1e-5


def test_export_of_a_video_model_for_any_clip_length_needs_frames(tmp_path: Path) -> None:
    model = create_video_model("resnet8", num_classes=2, in_chans=1, backbone_kwargs={"stem_stride": 2}).eval()
    assert model.config.frames is None
    with pytest.raises(ConfigError, match="clips of any length"):
        export_onnx(model, tmp_path / "v.onnx", SIZE)
    path = export_onnx(model, tmp_path / "v.onnx", SIZE, frames=6)
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[1:]] == [6, 1, SIZE, SIZE]
    x = torch.randn(3, 6, 1, SIZE, SIZE)
    assert max(onnx_parity(model, path, x).values()) <= TOL
    import selfcam.video

    assert not hasattr(selfcam.video, "len")  # the export's len shim is gone again
    with pytest.raises(ConfigError, match="built for clips of 4 frames"):
        export_onnx(_task_model("video"), tmp_path / "w.onnx", SIZE, frames=6)
    with pytest.raises(ConfigError, match="takes no clips"):
        export_onnx(_trained("plain"), tmp_path / "i.onnx", SIZE, frames=6)
    assert not (tmp_path / "w.onnx").exists() and not (tmp_path / "i.onnx").exists()


_DATA = {  # what a run trained through selfcam.train.fit records of its data
    "attributes": {"size": SIZE, "in_chans": 3, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.2],
                   "class_names": [f"attr{i}" for i in range(ATTRS)]},
    "video": {"size": SIZE, "in_chans": 1, "mean": [0.1], "std": [0.3], "frames": FRAMES, "class_names": ["a", "b", "c"]},
    "asd": {"size": SIZE, "in_chans": 3, "mean": [0.45] * 3, "std": [0.25] * 3, "frames": FRAMES, "sample_rate": 16000},
}  # fmt: skip


@pytest.mark.parametrize("task", list(IO))
def test_cli_export_of_a_saved_run_of_every_task(task: str, tmp_path: Path) -> None:
    run, out = tmp_path / "run", tmp_path / "m.onnx"
    save_checkpoint(_task_model(task), run, data=_DATA[task])
    code, text = _run("export", "--checkpoint", str(run), "--out", str(out))
    assert code == 0, text
    inputs, outputs = IO[task]
    assert "opset 17" in text and all(f" {name} (N, " in text for name in inputs)
    diffs = dict(re.findall(r"(\w+) (\d\.\de[-+]\d\d)", text.split("max |diff|:")[1]))
    assert list(diffs) == list(outputs) and max(float(d) for d in diffs.values()) <= TOL
    proto = onnx.load(str(out))
    assert tuple(i.name for i in proto.graph.input) == inputs and tuple(o.name for o in proto.graph.output) == outputs
    meta = {p.key: json.loads(p.value) for p in proto.metadata_props}
    data = _DATA[task]
    assert meta["task"] == task and tuple(meta["outputs"]) == outputs
    pre = meta["preprocess"]
    assert pre["size"] == SIZE and pre["channels"] == data["in_chans"]
    assert pre["mean"] == pytest.approx(data["mean"]) and pre["std"] == pytest.approx(data["std"])
    if task != "attributes":
        assert pre["frames"] == FRAMES
    if task == "asd":
        assert pre["sample_rate"] == 16000
    assert meta.get("class_names") == data.get("class_names")
    # the file runs on a new batch size and agrees with the checkpoint's model
    model, _ = load_checkpoint(run)
    xs = example_inputs(model, SIZE, batch=1)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(list(outputs), {name: x.numpy() for name, x in zip(inputs, xs)})
    want = _expected(model.eval(), xs)
    assert all(np.abs(g - want[name]).max() <= TOL for name, g in zip(outputs, got))


def test_cli_export_of_a_clip_run_takes_its_clip_length_from_the_data_and_needs_a_size(tmp_path: Path) -> None:
    run, out = tmp_path / "run", tmp_path / "m.onnx"
    model = create_video_model("resnet8", num_classes=2, in_chans=1, backbone_kwargs={"stem_stride": 2})  # any length
    save_checkpoint(model, run, data={"frames": 6})
    code, text = _run("export", "--checkpoint", str(run), "--out", str(out))
    assert code == 2 and "pass --size" in text and "Traceback" not in text
    code, text = _run("export", "--checkpoint", str(run), "--out", str(out), "--size", "24")
    assert code == 0, text
    assert "input clip (N, 6, 1, 24, 24)" in text
    proto = onnx.load(str(out))
    assert [d.dim_value for d in proto.graph.output[1].type.tensor_type.shape.dim[1:]] == [6, 24, 24]
    meta = {p.key: json.loads(p.value) for p in proto.metadata_props}
    assert meta["preprocess"] == {"size": 24, "channels": 1, "frames": 6}
    save_checkpoint(model, run, data={"size": SIZE})  # no clip length anywhere: one line, exit 2
    code, text = _run("export", "--checkpoint", str(run), "--out", str(tmp_path / "n.onnx"))
    assert code == 2 and "clips of any length" in text and "Traceback" not in text
    assert not (tmp_path / "n.onnx").exists()
