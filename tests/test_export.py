"""ONNX export of every head (parity with PyTorch in onnxruntime) and torch.compile parity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from selfcam.cli import app
from selfcam.export import export_onnx
from selfcam.heads import se_select
from selfcam.model import SelfExplainer, create_model
from selfcam.checkpoint import save_checkpoint

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
