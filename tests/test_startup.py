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
    assert heavy_modules_of(["info", str(run)]) == []
    heavy_modules_of(["models"])  # the first call lists torchvision's models and caches the names
    assert list((tmp_path / "cache" / "selfcam").glob("torchvision-*-models.json"))
    assert heavy_modules_of(["models"]) == []


def test_the_probe_sees_heavy_modules() -> None:
    """The guard can fail: modules the command did import are reported."""
    assert heavy_modules_of(["--help"], heavy=("typer", "rich", "no_such_module")) == ["rich", "typer"]


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
