"""Tests of the experiments (selfcam.experiment) and of results/*.json -> docs/RESULTS.md."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

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


def test_named_recipes_record_train_size_and_augment() -> None:
    full = E.named_recipe("mnist-full").training()
    assert full["train_size"] == 54000 and full["test_size"] == 10000 and "augment" not in full
    assert E.named_recipe("fashion-mnist-full", epochs=3).training()["augment"] is True
    assert "augment" not in E.RECIPES["mnist"].training()  # documents written before augment existed still resume
    with pytest.raises(ConfigError, match="unknown recipe 'mnist-huge'"):
        E.named_recipe("mnist-huge")


def test_accuracy_experiment_grows_its_seeds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "acc.json"
    one = E.accuracy_experiment("cluttered-digits", ["plain"], 1, out, TINY, progress=False, log=lambda s: None)
    calls = []
    fit = E.fit
    monkeypatch.setattr(E, "fit", lambda *a, **k: calls.append(a[3].seed) or fit(*a, **k))
    two = E.accuracy_experiment("cluttered-digits", ["plain"], 2, out, TINY, progress=False, log=lambda s: None)
    assert calls == [1] and two["seeds"] == 2  # seed 0 is kept from the first start
    assert two["methods"]["plain"]["accuracy"][0] == one["methods"]["plain"]["accuracy"][0]
    assert len(two["methods"]["plain"]["accuracy"]) == 2


def test_stability_stores_uint8_maps_and_resumes_from_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "stab.json"
    doc = E.stability_experiment("cluttered-digits", ["lfi"], 2, out, TINY, progress=False, log=lambda s: None, map_images=20)
    import numpy as np
    import torch
    from selfcam.checkpoint import load_checkpoint
    from selfcam.data import load_dataset
    from selfcam.evaluate import EvalConfig, evaluate_runs

    files = sorted((tmp_path / "stab.maps").glob("*.npz"))
    assert [f.name for f in files] == ["lfi-setting1.npz", "lfi-setting2.npz"]
    assert doc["runs"]["lfi/setting1"]["maps"] == "stab.maps/lfi-setting1.npz"
    stored = np.load(files[0])["maps"]
    assert stored.dtype == np.uint8 and stored.shape == (20, 32, 32)
    # the stored maps are floor(255 * map) of the run's own maps of the first 20 test images
    runs = {p.name: load_checkpoint(p)[0] for p in sorted((tmp_path / "cluttered-digits.runs").iterdir())}
    test = load_dataset("cluttered-digits", "test", TINY.test_size, size=TINY.image_size)
    first20 = torch.utils.data.Subset(test, range(20))
    x = torch.stack([first20[i][0] for i in range(20)])
    model = next(m for name, m in runs.items() if E.quantized_maps(m, first20).tobytes() == stored.tobytes())
    with torch.no_grad():
        assert np.array_equal(stored, (model.explain(x).heatmap.clamp(0, 1) * 255).floor().to(torch.uint8).numpy())
    # IoU from the stored maps = evaluate's stability of the float maps on the same images (independent path)
    direct = evaluate_runs(runs, first20, EvalConfig(metrics=("accuracy",)))["stability"]["self"]
    assert doc["methods"]["lfi"]["iou"] == pytest.approx(direct["iou"], abs=1e-6)
    assert doc["methods"]["lfi"]["dice"] == pytest.approx(direct["dice"], abs=1e-6)
    # another machine resumes from the JSON and the .npz files alone: nothing trained or evaluated again
    saved = json.loads(out.read_text())
    del saved["methods"]["lfi"]
    out.write_text(json.dumps(saved))
    monkeypatch.setattr(E, "fit", lambda *a, **k: pytest.fail("finished runs must not be retrained"))
    monkeypatch.setattr(E, "evaluate_runs", lambda *a, **k: pytest.fail("finished runs must not be re-evaluated"))
    again = E.stability_experiment("cluttered-digits", ["lfi"], 2, out, TINY, progress=False, log=lambda s: None, map_images=20)
    assert again["methods"]["lfi"]["iou"] == doc["methods"]["lfi"]["iou"]
    with pytest.raises(ConfigError, match="maps of 20 test images, not 10"):
        E.stability_experiment("cluttered-digits", ["lfi"], 2, out, TINY, progress=False, log=lambda s: None, map_images=10)


def _grid_evaluation(runs: dict[str, Any]) -> dict[str, Any]:
    """An evaluation.json with the grid pointing game of ``runs`` (10 grids of 2x2)."""
    return {"dataset": "toy", "split": "test", "n_items": 8, "runs": runs,
            "grid": {"size": "2x2", "count": 10, "confidence": 0.9, "seed": 0, "eligible": {r: 8 for r in runs}, "skipped": {}}}  # fmt: skip


def _fake_board(results: Path) -> None:
    evaluation = {"dataset": "toy", "split": "test", "n_items": 8, "config": {"batch_size": 4}, "task": "image",
                  "runs": {"plain": {"results": {"self": {"accuracy": 0.5, "pointing_game": 0.75, "deletion_auc": 0.2,
                                                          "map_ms_per_image": 1.25}}},
                           "lfi": {"results": {"self": {"accuracy": 0.625, "pointing_game": 0.5},
                                               "gradcam": {"accuracy": 0.625, "pointing_game": 0.875}}}},
                  "command": "selfcam evaluate ..."}  # fmt: skip
    (results / "evaluation-toy.json").write_text(json.dumps(evaluation))
    road = {"dataset": "toy", "split": "test", "n_items": 2, "config": {"batch_size": 2}, "task": "image",
            "runs": {"plain": {"results": {"self": {"road_morf": 0.125, "map_ms_per_image": 9.0}}}}}  # fmt: skip
    (results / "evaluation-toy.road.json").write_text(json.dumps(road))  # a part of the same leaderboard
    grid = E.grid_results(_grid_evaluation({"lfi": {"results": {"gradcam": {"accuracy": 1.0, "grid_pointing_game": 0.6}}}}))
    (results / "grid.json").write_text(json.dumps(grid))


def test_leaderboard_per_dataset_with_reasons_for_missing_cells(tmp_path: Path) -> None:
    results = _fake(tmp_path)
    _fake_board(results)
    boards = E.leaderboards(results)
    toy = boards["toy"]["rows"]
    assert toy["lfi/gradcam"] == {"accuracy": 0.92, "pointing_game": 0.875, "grid_pointing_game": 0.6}  # mean of seeds
    assert toy["lfi/self"]["stability"] == 0.71 and toy["abn/self"] == {"stability": 0.75}
    assert toy["plain/self"]["map_ms"] == 1.25 and toy["plain/self"]["road_morf"] == 0.125  # the first file's timing
    assert toy["se/self"] == {"accuracy": 0.905} and set(boards) == {"toy"}
    text = E.write_results_markdown(results, tmp_path / "docs" / "RESULTS.md")
    assert "| lfi/self | 92.00 | 0.500 | - | - | - | 0.710 | - |" in text
    assert "| plain/self | 91.00 | 0.750 | - | 0.200 | 0.125 | - | 1.25 |" in text
    assert "ROAD MoRF (lower better): `results/evaluation-toy.road.json` (2 test images); '-': not evaluated for this map." in text
    assert "grid PG 2x2: `results/grid.json` (10 grids); '-': class-agnostic map" in text
    # the evaluation's accuracy is replaced by the mean over seeds, so only that file is named
    assert "accuracy (%): `results/toy-accuracy.json` (mean over 2 seeds); '-': no accuracy for this model." in text
    assert "Not measured on toy (no results file): insertion, ROAD LeRF, shortcut mark energy." in text
    assert (tmp_path / "docs" / "results" / "leaderboard.png").read_bytes()[:4] == b"\x89PNG"


def test_converged_goal_check(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    for label, plain in (("mnist-full", 0.9931), ("fashion-mnist-full", 0.9195)):
        doc = {"experiment": "accuracy", "dataset": label.removesuffix("-full"), "recipe": vars(TINY), "seeds": 1,
               "command": "", "wall_seconds": 60.0, "methods": {"plain": {"accuracy": [plain], "mean": plain, "std": 0.0}}}  # fmt: skip
        (results / f"{label}-accuracy.json").write_text(json.dumps(doc))
    text = E.write_results_markdown(results, tmp_path / "RESULTS.md", plots=False)
    assert "### mnist-full" in text and "plain >= 99.30 %): plain 99.31 %: met." in text
    assert "plain >= 92.00 %): plain 91.95 %: NOT met." in text and "Goal check (mean vs plain)" not in text


def test_cli_experiment_grid_and_shortcut(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from selfcam.cli import app

    evaluation = _grid_evaluation({"r": {"results": {"self-class": {"accuracy": 1.0, "grid_pointing_game": 0.7}}}})
    (tmp_path / "EVAL").mkdir()
    (tmp_path / "EVAL" / "evaluation.json").write_text(json.dumps(evaluation))
    out = tmp_path / "grid.json"
    result = CliRunner().invoke(app, ["experiment", "grid", "--evaluation", str(tmp_path / "EVAL"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text()) == {**E.grid_results(evaluation), "command": json.loads(out.read_text())["command"]}
    assert json.loads(out.read_text())["methods"] == {"r/self-class": {"score": 0.7}}
    result = CliRunner().invoke(app, ["experiment", "grid", "--evaluation", str(tmp_path / "nothing")])
    assert result.exit_code != 0 and "not found" in result.output

    seen = {}
    doc = {"methods": {"a/self": {"acc_correlated": 0.9, "acc_decorrelated": 0.2, "mark_energy": 0.05}}, "wall_seconds": 1.0}
    monkeypatch.setattr(E, "shortcut_experiment", lambda runs, methods, out, **kw: seen.update(runs=runs, methods=methods, **kw) or doc)
    args = ["experiment", "shortcut", "--run", "a=RUNS/a", "--run", "b=RUNS/b", "--methods", "self,cam", "--n", "10"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "s.json")])
    assert result.exit_code == 0, result.output
    assert seen["runs"] == {"a": Path("RUNS/a"), "b": Path("RUNS/b")} and seen["methods"] == ("self", "cam") and seen["n"] == 10
    for bad, message in ((["--run", "a"], "NAME=RUN_DIR"), (["--run", "a=x", "--run", "a=y"], "given twice"),
                         (["--run", "a=x", "--n", "0"], "--n")):  # fmt: skip
        result = CliRunner().invoke(app, ["experiment", "shortcut", *bad])
        assert result.exit_code != 0 and message in result.output, result.output


def test_cli_experiment_recipe_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from selfcam.cli import app

    seen = {}
    doc = {"methods": {"plain": {"mean": 0.9, "std": 0.0}}, "wall_seconds": 1.0}
    monkeypatch.setattr(E, "accuracy_experiment", lambda data, methods, seeds, out, recipe, **kw: seen.update(data=data, recipe=recipe) or doc)
    out = str(tmp_path / "a.json")
    result = CliRunner().invoke(app, ["experiment", "accuracy", "--recipe", "fashion-mnist-full", "--epochs", "3", "--out", out])
    assert result.exit_code == 0, result.output
    assert seen["data"] == "fashion-mnist" and seen["recipe"] == E.named_recipe("fashion-mnist-full", epochs=3)
    for args, message in ((["--recipe", "mnist-huge"], "unknown recipe 'mnist-huge'"), ([], "give --data or --recipe")):
        result = CliRunner().invoke(app, ["experiment", "accuracy", *args, "--out", out])
        assert result.exit_code != 0 and message in result.output, result.output


def test_an_interrupted_training_is_resumed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def stopped_fit(model: Any, train: Any, val: Any, cfg: Any, run_dir: Path, *a: Any, resume: bool, **k: Any) -> None:
        calls.append((run_dir, resume))
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)  # the state after an epoch, then killed
        raise KeyboardInterrupt

    monkeypatch.setattr(E, "fit", stopped_fit)
    for _ in range(2):
        with pytest.raises(KeyboardInterrupt):
            E.accuracy_experiment("cluttered-digits", ["plain"], 1, tmp_path / "a.json", TINY, progress=False, log=lambda s: None)
    assert calls[0][0] == calls[1][0] and [resume for _, resume in calls] == [False, True]
