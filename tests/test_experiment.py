"""Tests of the experiments (selfcam.experiment) and of results/*.json -> docs/RESULTS.md."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from selfcam import experiment as E
from selfcam.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TINY = E.Recipe(backbone_kwargs={"stem_stride": 2}, epochs=1, train_size=128, val_size=32, test_size=48, image_size=32)


def test_accuracy_experiment_summary_and_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "acc.json"
    doc = E.accuracy_experiment("cluttered-digits", ["plain", "se"], 2, out, TINY, progress=False, log=lambda s: None)
    assert json.loads(out.read_text()) == doc
    assert set(doc["methods"]) == {"plain", "se"} and doc["dataset"] == "cluttered-digits"
    for name, m in doc["methods"].items():
        accs = [doc["runs"][f"{name}/seed{s}"]["accuracy"] for s in range(2)]
        assert m["accuracy"] == accs and all(0 <= a <= 1 for a in accs)
        assert m["mean"] == pytest.approx((accs[0] + accs[1]) / 2)
        assert m["std"] == pytest.approx(abs(accs[0] - accs[1]) / math.sqrt(2))  # sample std of two values
    assert len(list((tmp_path / "cluttered-digits.runs").glob("se-*/model.safetensors"))) == 2

    # a second start trains and evaluates nothing: every run is in the JSON
    monkeypatch.setattr(E, "fit", lambda *a, **k: pytest.fail("finished runs must not be retrained"))
    monkeypatch.setattr(E, "evaluate_runs", lambda *a, **k: pytest.fail("finished runs must not be re-evaluated"))
    again = E.accuracy_experiment("cluttered-digits", ["plain", "se"], 2, out, TINY, progress=False, log=lambda s: None)
    assert again["methods"] == doc["methods"]


def test_interrupted_accuracy_experiment_reuses_finished_checkpoints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "acc.json"
    full = E.accuracy_experiment("cluttered-digits", ["plain"], 2, out, TINY, progress=False, log=lambda s: None)
    doc = json.loads(out.read_text())
    del doc["runs"]["plain/seed1"]  # as if killed after training seed 1 but before its result was written
    out.write_text(json.dumps(doc))
    monkeypatch.setattr(E, "fit", lambda *a, **k: pytest.fail("a finished checkpoint must be reloaded, not retrained"))
    again = E.accuracy_experiment("cluttered-digits", ["plain"], 2, out, TINY, progress=False, log=lambda s: None)
    assert again["methods"]["plain"]["accuracy"] == full["methods"]["plain"]["accuracy"]


def test_resume_refuses_a_different_recipe(tmp_path: Path) -> None:
    out = tmp_path / "acc.json"
    out.write_text(json.dumps({"experiment": "accuracy", "dataset": "cluttered-digits", "recipe": {"epochs": 99},
                               "seeds": 1, "runs": {}}))  # fmt: skip
    with pytest.raises(ConfigError, match="different recipe"):
        E.accuracy_experiment("cluttered-digits", ["plain"], 1, out, TINY, progress=False, log=lambda s: None)
    out.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        E.accuracy_experiment("cluttered-digits", ["plain"], 1, out, TINY, progress=False, log=lambda s: None)


def test_stability_is_one_for_identical_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    same = E.Setting(lr=3e-3, batch_size=32, weight_decay=5e-4, seed=7)
    monkeypatch.setattr(E, "SETTINGS", (same, same))
    doc = E.stability_experiment("cluttered-digits", ["lfi"], 2, tmp_path / "s.json", TINY, progress=False, log=lambda s: None)
    assert doc["methods"]["lfi"]["iou"] == pytest.approx(1.0) and doc["methods"]["lfi"]["dice"] == pytest.approx(1.0)
    assert doc["methods"]["lfi"]["accuracy"][0] == doc["methods"]["lfi"]["accuracy"][1]


def test_stability_below_one_for_different_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    acc = E.accuracy_experiment("cluttered-digits", ["se"], 1, tmp_path / "a.json", TINY, progress=False, log=lambda s: None)
    calls = []
    fit = E.fit
    monkeypatch.setattr(E, "fit", lambda *a, **k: calls.append(a[3]) or fit(*a, **k))
    doc = E.stability_experiment("cluttered-digits", ["se"], 2, tmp_path / "s.json", TINY, progress=False, log=lambda s: None)
    assert [c.seed for c in calls] == [1]  # setting 1 is the accuracy run of seed 0: reused, not retrained
    assert doc["methods"]["se"]["accuracy"][0] == acc["methods"]["se"]["accuracy"][0]
    assert 0.0 <= doc["methods"]["se"]["iou"] < 1.0 and doc["methods"]["se"]["iou"] <= doc["methods"]["se"]["dice"]
    assert doc["settings"] == [vars(s) for s in E.SETTINGS[:2]]


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError):
        E.stability_experiment("cluttered-digits", ["lfi"], 1, "x.json", TINY)
    with pytest.raises(ConfigError):
        E.accuracy_experiment("cluttered-digits", [], 1, "x.json", TINY)


def _fake(tmp_path: Path) -> Path:
    results = tmp_path / "results"
    results.mkdir()
    recipe = vars(TINY)
    acc = {"experiment": "accuracy", "dataset": "toy", "recipe": recipe, "seeds": 2, "command": "selfcam experiment accuracy x",
           "wall_seconds": 120.0, "runs": {},
           "methods": {"plain": {"accuracy": [0.9, 0.92], "mean": 0.91, "std": 0.01},
                       "lfi": {"accuracy": [0.91, 0.93], "mean": 0.92, "std": 0.01},
                       "se": {"accuracy": [0.90, 0.91], "mean": 0.905, "std": 0.01}}}  # fmt: skip
    stab = {"experiment": "stability", "dataset": "toy", "recipe": recipe, "command": "", "wall_seconds": 60.0,
            "settings": [vars(s) for s in E.SETTINGS[:2]],
            "methods": {"lfi": {"iou": 0.71, "dice": 0.8, "accuracy": [0.9, 0.9]},
                        "abn": {"iou": 0.75, "dice": 0.85, "accuracy": [0.9, 0.9]}}}  # fmt: skip
    (results / "toy-accuracy.json").write_text(json.dumps(acc))
    (results / "toy-stability.json").write_text(json.dumps(stab))
    (results / "notes.md").write_text("## Discussion\n\nHand-written.")
    return results


def test_markdown_tables_and_goal_checks(tmp_path: Path) -> None:
    text = E.write_results_markdown(_fake(tmp_path), tmp_path / "docs" / "RESULTS.md")
    assert "| lfi | 91.00, 93.00 | 92.00 | 1.00 | +1.00 |" in text
    assert "lfi +1.00 points: met" in text and "se -0.50 points: NOT met" in text  # 0.5 > 0.3 points below plain
    assert "LFI-CAM IoU 0.710, ABN 0.750: NOT met" in text  # >= 0.7 but not above ABN
    assert "Wall time 2.0 min" in text and "selfcam experiment accuracy x" in text and "Hand-written." in text
    for png in ("accuracy.png", "stability.png"):
        assert (tmp_path / "docs" / "results" / png).read_bytes()[:4] == b"\x89PNG"


def test_committed_results_match_their_markdown(tmp_path: Path) -> None:
    """docs/RESULTS.md is exactly what `selfcam experiment results` makes of results/*.json."""
    committed = (ROOT / "docs" / "RESULTS.md").read_text()
    regenerated = E.write_results_markdown(ROOT / "results", tmp_path / "RESULTS.md")
    assert regenerated == committed
    for png in ("accuracy.png", "stability.png"):
        assert (ROOT / "docs" / "results" / png).exists()
