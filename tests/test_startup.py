"""Start-up: the CLI imports no heavy module before a command needs it; the lazy package keeps its API."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from selfcam.bench import HEAVY_MODULES, heavy_modules_of


def _fresh(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout


def test_import_selfcam_cli_imports_no_heavy_module() -> None:
    loaded = json.loads(_fresh("import json, sys\nimport selfcam.cli\nprint(json.dumps(sorted(sys.modules)))"))
    tops = {m.split(".")[0] for m in loaded}
    assert not tops & set(HEAVY_MODULES), sorted(tops & set(HEAVY_MODULES))
    assert not {"selfcam.evaluate", "selfcam.train", "selfcam.report", "selfcam.posthoc"} & set(loaded)


def test_import_selfcam_imports_not_even_torch() -> None:
    out = _fresh("import sys, selfcam\nprint(selfcam.__version__, 'torch' in sys.modules)")
    assert out.split() == ["0.1.0", "False"]


@pytest.mark.parametrize("args", [["--help"], ["bench", "--help"], ["train", "--help"]])
def test_help_imports_no_heavy_module(args: list[str]) -> None:
    assert heavy_modules_of(args) == []


def test_models_and_info_import_no_heavy_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from selfcam import create_model, save_checkpoint

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    run = save_checkpoint(create_model("lfi", "resnet8", 10, 1), tmp_path / "run")
    assert heavy_modules_of(["info", str(run)], heavy=(*HEAVY_MODULES, "PIL")) == []  # PIL: the data modules (ASD task)
    heavy_modules_of(["models"])  # the first call lists torchvision's models and caches the names
    assert list((tmp_path / "cache" / "selfcam").glob("torchvision-*-models.json"))
    assert heavy_modules_of(["models"]) == []


def test_the_probe_sees_heavy_modules() -> None:
    """The guard can fail: modules the command did import are reported."""
    assert heavy_modules_of(["--help"], heavy=("typer", "rich", "no_such_module")) == ["rich", "typer"]
    assert heavy_modules_of(["--help"], heavy=("rich.console", "rich.no_such_module", "ric")) == ["rich.console"]  # submodules


def test_lazy_package_keeps_the_public_api() -> None:
    import selfcam
    import selfcam.wrap  # the submodule must not shadow the function of the same name

    assert callable(selfcam.wrap) and selfcam.wrap.__module__ == "selfcam.wrap"
    assert set(selfcam.__all__) <= set(dir(selfcam))
    for name in selfcam.__all__:
        assert getattr(selfcam, name) is not None
    from selfcam import ConfigError, create_model, fit, posthoc_map  # noqa: F401

    assert selfcam.fit.__module__ == "selfcam.train" and selfcam.ConfigError.__module__ == "selfcam.errors"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        selfcam.nope  # noqa: B018


def test_info_counts_parameters_from_the_header_without_reading_the_tensors(tmp_path: Path) -> None:
    """info takes the shapes from the weights file's header: with every data byte turned into NaN (a file
    load_checkpoint refuses) it still prints the model's parameter count (buffers not counted); a header
    whose shapes do not fit the config, and a truncated file, are refused as load_checkpoint refuses them."""
    from safetensors.torch import load_file, save_file
    from typer.testing import CliRunner

    from selfcam import CheckpointError, create_model, load_checkpoint, save_checkpoint
    from selfcam.cli import app

    model = create_model("se", "resnet8", 10, 1)
    expected = sum(p.numel() for p in model.parameters())
    assert expected < sum(v.numel() for v in model.state_dict().values())  # BatchNorm buffers are not parameters
    runner = CliRunner()

    def info(run: Path) -> tuple[int, str]:
        result = runner.invoke(app, ["info", str(run)])
        return result.exit_code, result.output + (result.stderr if result.stderr_bytes is not None else "")

    run = save_checkpoint(model, tmp_path / "nan")
    weights = run / "model.safetensors"
    blob = weights.read_bytes()
    start = 8 + int.from_bytes(blob[:8], "little")
    weights.write_bytes(blob[:start] + b"\xff" * (len(blob) - start))  # 0xffffffff is a NaN in float32
    with pytest.raises(CheckpointError, match="NaN or infinite weights"):
        load_checkpoint(run)
    code, out = info(run)
    assert code == 0 and json.loads(out)["params"] == expected and json.loads(out)["model"]["method"] == "se", out

    state = load_file(weights)
    state["head.fc.weight"] = state["head.fc.weight"][:7].contiguous()
    save_file(state, str(weights))
    code, out = info(run)
    assert code == 2 and "weights do not match config" in out and "head.fc.weight (7, " in out, out

    weights.write_bytes(blob[: len(blob) // 2])
    code, out = info(run)
    assert code == 2 and "not a readable safetensors file" in out, out
