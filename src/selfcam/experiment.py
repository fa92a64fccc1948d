"""Experiments behind the papers' claims: accuracy per method, map stability across settings.

``accuracy_experiment`` trains every method with the same backbone and recipe under
several seeds and scores test accuracy; ``stability_experiment`` trains every method
under several hyper-parameter settings and compares the maps of the resulting models
on the same test images (mean pairwise IoU / Dice, as in LFI-CAM's paper). Both write
their JSON after every finished run and skip finished runs when started again, so an
interrupted experiment resumes where it stopped. ``write_results_markdown`` turns the
JSON files under ``results/`` into ``docs/RESULTS.md`` with tables and plots.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .data import load_dataset
from .errors import ConfigError
from .evaluate import EvalConfig, evaluate_runs
from .model import SelfExplainer, create_model
from .checkpoint import load_checkpoint
from .recipes import Recipe
from .tasks import get_task
from .train import TrainConfig, fit, seed_all

__all__ = ["Recipe", "Setting", "RECIPES", "SETTINGS", "accuracy_experiment", "grid_results", "shortcut_experiment",
           "stability_experiment", "recipe_for", "write_grid_results", "write_results_markdown"]  # fmt: skip

Log = Callable[[str], None]


@dataclass(frozen=True)
class Setting:
    """One hyper-parameter setting of the stability experiment."""

    lr: float
    batch_size: int
    weight_decay: float
    seed: int


# The quick recipes used for results/: small enough that all six experiments fit one working session
# on 2 CPU cores shared with other work (see docs/RESULTS.md for what that costs in accuracy).
# Their JSON records Recipe.training() (backbone and training fields), as it did before Recipe was shared.
RECIPES: dict[str, Recipe] = {
    "cluttered-digits": Recipe(data="cluttered-digits", backbone_kwargs={"stem_stride": 2}, epochs=4, train_size=3000,
                               val_size=500, test_size=1000, image_size=64),
    "mnist": Recipe(data="mnist", epochs=2, train_size=4000, val_size=1000, test_size=2000),
    "fashion-mnist": Recipe(data="fashion-mnist", epochs=2, train_size=4000, val_size=1000, test_size=2000),
}  # fmt: skip

# Five settings: the base recipe, then lower lr, bigger batch, more weight decay, higher lr with a
# smaller batch; every setting has its own seed, so initialisation and data order differ too.
SETTINGS: tuple[Setting, ...] = (
    Setting(lr=3e-3, batch_size=64, weight_decay=5e-4, seed=0),
    Setting(lr=1.5e-3, batch_size=64, weight_decay=5e-4, seed=1),
    Setting(lr=3e-3, batch_size=128, weight_decay=5e-4, seed=2),
    Setting(lr=3e-3, batch_size=64, weight_decay=5e-3, seed=3),
    Setting(lr=6e-3, batch_size=32, weight_decay=1e-4, seed=4),
)


def recipe_for(data: str, **overrides: Any) -> Recipe:
    """The recipe for dataset spec ``data`` (``RECIPES`` or the default), with ``overrides`` applied."""
    return RECIPES.get(data, Recipe(data=data)).with_overrides(**overrides)


def _command() -> str:
    return shlex.join(["selfcam", *sys.argv[1:]]) if Path(sys.argv[0]).name in ("selfcam", "__main__.py") else ""


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _resume(path: Path, header: dict[str, Any]) -> dict[str, Any]:
    """The document in ``path`` when it was written by the same experiment, else a fresh one."""
    if not path.exists():
        return {**header, "runs": {}, "wall_seconds": 0.0}
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} exists but is not valid JSON ({e}); move it away to start afresh") from e
    mismatch = [k for k in ("experiment", "dataset", "recipe", "seeds", "settings") if doc.get(k) != header.get(k)]
    if mismatch:
        raise ConfigError(f"{path} holds an experiment with a different {', '.join(mismatch)}; "
                          "use another --out or delete it to start afresh")  # fmt: skip
    doc.setdefault("runs", {})
    doc["methods_requested"] = list(dict.fromkeys([*doc.get("methods_requested", []), *header["methods_requested"]]))
    return doc


class _Runner:
    """Trains (or reloads) one model per (method, training config); the splits are loaded once.

    Checkpoints live in ``work_dir/<method>-<key>/`` where ``key`` hashes the dataset, the recipe and
    the training config, so the two experiments share the runs they have in common (the accuracy
    experiment's seed 0 is the stability experiment's setting 1).
    """

    def __init__(self, data: str, recipe: Recipe, work_dir: Path, progress: bool, log: Log) -> None:
        self.data, self.recipe, self.work_dir, self.progress, self.log = data, recipe, work_dir, progress, log
        r = recipe
        self.train = load_dataset(data, "train", r.train_size, size=r.image_size)
        # the experiments compare the heads of the image task (the other tasks have one head each)
        get_task("image").check_dataset(self.train, "experiment data")
        self.val = load_dataset(data, "val", r.val_size, size=r.image_size)
        self.test = load_dataset(data, "test", r.test_size, size=r.image_size)

    def model(self, method: str, cfg: TrainConfig) -> SelfExplainer:
        key = json.dumps([self.data, method, self.recipe.training(), asdict(cfg)], sort_keys=True)
        run_dir = self.work_dir / f"{method}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
        if (run_dir / "model.safetensors").exists() and (run_dir / "config.json").exists():
            model, _ = load_checkpoint(run_dir)
            return model
        seed_all(cfg.seed)
        r = self.recipe
        model = create_model(method, r.backbone, self.test.num_classes, self.test.in_chans, r.backbone_kwargs,
                             **r.head_kwargs.get(method, {}))  # fmt: skip
        fit(model, self.train, self.val, cfg, run_dir, self.progress,
            extra_config={"data": {"name": self.data, "size": self.test.size, "seed": 0}})  # fmt: skip
        return model.cpu().eval()

    def train_config(self, setting: Setting) -> TrainConfig:
        return TrainConfig(epochs=self.recipe.epochs, batch_size=setting.batch_size, lr=setting.lr,
                           weight_decay=setting.weight_decay, seed=setting.seed)  # fmt: skip


def _work_dir(out: Path, data: str) -> Path:
    """Where checkpoints go: ``<out's folder>/<dataset>.runs`` (shared by the experiments of one dataset)."""
    return out.parent / (data.replace(":", "_").replace("/", "_") + ".runs")


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def accuracy_experiment(data: str, methods: Sequence[str], seeds: int, out: str | Path, recipe: Recipe | None = None,
                        progress: bool = True, log: Log = print) -> dict[str, Any]:  # fmt: skip
    """Train every method under seeds ``0..seeds-1``; test accuracy per seed, mean and sample std.

    Writes ``out`` (JSON) after every run: ``{"dataset", "recipe", "seeds", "methods": {NAME:
    {"accuracy": [per seed], "mean", "std"}}, "runs", "wall_seconds", "command"}``; checkpoints go
    to ``<out's folder>/<dataset>.runs/``. Started again with the same arguments, it skips finished runs.
    """
    if seeds < 1 or not methods:
        raise ConfigError(f"need at least one method and one seed, got {list(methods)} and {seeds}")
    recipe = recipe or recipe_for(data)
    out = Path(out)
    header = {"experiment": "accuracy", "dataset": data, "recipe": recipe.training(), "seeds": seeds,
              "methods_requested": list(methods), "command": _command()}  # fmt: skip
    doc = _resume(out, header)
    runner = _Runner(data, recipe, _work_dir(out, data), progress, log)
    base = SETTINGS[0]
    todo = [(m, s) for m in methods for s in range(seeds)]
    for i, (method, seed) in enumerate(todo, 1):
        key = f"{method}/seed{seed}"
        if key in doc["runs"]:
            continue
        log(f"[{i}/{len(todo)}] {method}, seed {seed}: training on {data}")
        t0 = time.perf_counter()
        model = runner.model(method, runner.train_config(replace(base, seed=seed)))
        result = evaluate_runs({key: model}, runner.test, EvalConfig(metrics=("accuracy",)))
        seconds = time.perf_counter() - t0
        doc["runs"][key] = {"accuracy": result["runs"][key]["results"]["self"]["accuracy"], "seconds": round(seconds, 1)}
        doc["wall_seconds"] = round(doc.get("wall_seconds", 0.0) + seconds, 1)
        doc["methods"] = _accuracy_summary(doc["runs"], methods, seeds)
        _write_json(out, doc)
    doc["methods"] = _accuracy_summary(doc["runs"], methods, seeds)
    _write_json(out, doc)
    return doc


def _accuracy_summary(runs: dict[str, Any], methods: Sequence[str], seeds: int) -> dict[str, Any]:
    summary = {}
    for method in methods:
        accs = [runs[f"{method}/seed{s}"]["accuracy"] for s in range(seeds) if f"{method}/seed{s}" in runs]
        if accs:
            mean, std = _mean_std(accs)
            summary[method] = {"accuracy": accs, "mean": mean, "std": std}
    return summary


def stability_experiment(data: str, methods: Sequence[str], settings: int, out: str | Path,
                         recipe: Recipe | None = None, progress: bool = True, log: Log = print) -> dict[str, Any]:  # fmt: skip
    """Train every method under the first ``settings`` of ``SETTINGS``; compare maps across them.

    Maps of the models of one method are compared on the same test images: mean over images
    of the mean pairwise IoU / Dice of the maps binarized at 100/255 (see ``metrics.stability``).
    Writes ``{"dataset", "recipe", "settings": [...], "methods": {NAME: {"iou", "dice",
    "accuracy": [per setting]}}, "wall_seconds", "command"}``; resumable like the accuracy experiment.
    """
    if not 2 <= settings <= len(SETTINGS) or not methods:
        raise ConfigError(f"settings must be 2..{len(SETTINGS)} and methods non-empty, got {settings}, {list(methods)}")
    recipe = recipe or recipe_for(data)
    out = Path(out)
    chosen = SETTINGS[:settings]
    header = {"experiment": "stability", "dataset": data, "recipe": recipe.training(),
              "settings": [asdict(s) for s in chosen], "methods_requested": list(methods), "command": _command()}  # fmt: skip
    doc = _resume(out, header)
    doc.setdefault("methods", {})
    runner = _Runner(data, recipe, _work_dir(out, data), progress, log)
    for i, method in enumerate(methods, 1):
        if method in doc["methods"]:
            continue
        t0 = time.perf_counter()
        models = {}
        for j, setting in enumerate(chosen):
            log(f"[{i}/{len(methods)}] {method}, setting {j + 1}/{len(chosen)} {asdict(setting)}: training on {data}")
            models[f"setting{j + 1}"] = runner.model(method, runner.train_config(setting))
        result = evaluate_runs(models, runner.test, EvalConfig(metrics=("accuracy",)))
        seconds = time.perf_counter() - t0
        stability = result.get("stability", {}).get("self", {"iou": 0.0, "dice": 0.0})
        doc["methods"][method] = {**stability,
                                  "accuracy": [r["results"]["self"]["accuracy"] for r in result["runs"].values()],
                                  "seconds": round(seconds, 1)}  # fmt: skip
        doc["wall_seconds"] = round(doc.get("wall_seconds", 0.0) + seconds, 1)
        _write_json(out, doc)
    return doc


def grid_results(evaluation: dict[str, Any], command: str = "") -> dict[str, Any]:
    """The grid pointing game of a ``selfcam evaluate`` document (``evaluation.json`` with metric
    ``grid_pointing_game``) as ``results/grid-pointing-game.json``: ``{"experiment": "grid-pointing-game",
    "dataset", "split", "n_items", "grid": "2x2", "count", "confidence", "seed", "eligible": {RUN: images},
    "skipped": {RUN: reason}, "accuracy": {RUN: a}, "methods": {"RUN/METHOD": {"score": x}}, "command"}``."""
    grid = evaluation.get("grid")
    if not isinstance(grid, dict):
        raise ConfigError("the evaluation has no grid pointing game (evaluate with --metrics grid-pointing-game)")
    methods, accuracy = {}, {}
    for run, entry in evaluation["runs"].items():
        for method, row in entry["results"].items():
            if "accuracy" in row:
                accuracy[run] = row["accuracy"]
            if "grid_pointing_game" in row:
                methods[f"{run}/{method}"] = {"score": row["grid_pointing_game"]}
    return {"experiment": "grid-pointing-game", "dataset": evaluation.get("dataset"), "split": evaluation.get("split"),
            "n_items": evaluation.get("n_items"), "grid": grid["size"], "count": grid["count"],
            "confidence": grid["confidence"], "seed": grid["seed"], "eligible": grid["eligible"],
            "skipped": grid["skipped"], "accuracy": accuracy, "methods": methods, "command": command}  # fmt: skip


def write_grid_results(evaluation: str | Path, out: str | Path, command: str = "") -> dict[str, Any]:
    """:func:`grid_results` of the ``evaluation.json`` at ``evaluation``, written to ``out``."""
    doc = grid_results(json.loads(Path(evaluation).read_text()), command)
    _write_json(Path(out), doc)
    return doc


class _MarkBoxes(torch.utils.data.Dataset):
    """A :class:`~selfcam.data.digits.ShortcutDigits` whose items carry the mark's box instead of the digit's."""

    def __init__(self, data: Any) -> None:
        self.data = data
        self.num_classes, self.in_chans = data.num_classes, data.in_chans

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[Any, Any, Any]:
        image, label, _ = self.data[i]
        return image, label, self.data.mark_boxes[i]


def shortcut_experiment(runs: dict[str, str | Path], methods: Sequence[str], out: str | Path, n: int = 1000,
                        seed: int = 0, batch_size: int = 50, tolerance: int | None = None,
                        command: str = "") -> dict[str, Any]:  # fmt: skip
    """How much trained runs rely on the mark of ``shortcut-digits`` (docs/metrics.md, shortcut benchmark).

    Each run (``{NAME: run directory}``) and each of ``methods`` that applies to it is evaluated on two test
    sets of ``n`` images (data seed ``seed``): *correlated* (``correlation=1.0``: the mark at its class's place)
    and *decorrelated* (``correlation=0.0``: anywhere). Per ``NAME/METHOD``: ``acc_correlated``,
    ``acc_decorrelated`` (the model's, the same for all its methods), ``mark_energy`` (the share of the map's mass
    on the mark's box on the correlated set, :func:`selfcam.metrics.energy_pointing_game`),
    ``mark_energy_decorrelated``, ``digit_energy`` (the share on the digit's box, correlated set), and
    ``mark_pointing_game`` / ``digit_pointing_game`` (the map's maximum on the mark / the digit, correlated set,
    within ``tolerance`` px; default one feature cell of the first run: the mark, 4 px at 64, is smaller than
    a cell of the stride-8 ResNets, and a map's maximum lies on a cell centre). Writes
    ``out``: ``{"experiment": "shortcut", "dataset": "shortcut-digits", "n_items", "seed", "mark", "mark_area",
    "methods": {NAME/METHOD: {...}}, "wall_seconds", "command"}``.
    """
    t0 = time.perf_counter()
    loaded = {name: load_checkpoint(path) for name, path in runs.items()}
    models = {name: model for name, (model, _) in loaded.items()}
    size = (next(iter(loaded.values()))[1].get("data") or {}).get("size")  # the first run's training size
    sets = {}
    for key, corr in (("correlated", 1.0), ("decorrelated", 0.0)):
        sets[key] = load_dataset("shortcut-digits", "test", n, seed=seed, size=size, correlation=corr)
    if tolerance is None:
        first, image = next(iter(models.values())), sets["correlated"][0][0][None]
        with torch.no_grad():
            tolerance = round(image.shape[-1] / first.forward_features(image).shape[-1])  # one cell's stride
    cfg = EvalConfig(methods=tuple(methods), metrics=("accuracy", "pointing_game", "energy_pointing_game"),
                     batch_size=batch_size, tolerance=tolerance)  # fmt: skip
    by_digit = evaluate_runs(models, sets["correlated"], cfg)["runs"]
    by_mark = {key: evaluate_runs(models, _MarkBoxes(d), cfg)["runs"] for key, d in sets.items()}
    results: dict[str, Any] = {}
    for run in models:
        for method, row in by_mark["correlated"][run]["results"].items():
            results[f"{run}/{method}"] = {
                "acc_correlated": row["accuracy"],
                "acc_decorrelated": by_mark["decorrelated"][run]["results"][method]["accuracy"],
                "mark_energy": row["energy_pointing_game"],
                "mark_energy_decorrelated": by_mark["decorrelated"][run]["results"][method]["energy_pointing_game"],
                "digit_energy": by_digit[run]["results"][method]["energy_pointing_game"],
                "mark_pointing_game": row["pointing_game"],
                "digit_pointing_game": by_digit[run]["results"][method]["pointing_game"],
            }
    d = sets["correlated"]
    doc = {"experiment": "shortcut", "dataset": "shortcut-digits", "n_items": n, "seed": seed, "mark": d.mark,
           "mark_area": d.mark**2 / d.size**2, "tolerance": tolerance, "runs": {k: str(v) for k, v in runs.items()}, "methods": results,
           "wall_seconds": round(time.perf_counter() - t0, 1), "command": command}  # fmt: skip
    _write_json(Path(out), doc)
    return doc


# ---------------------------------------------------------------- results/*.json -> docs/RESULTS.md

_GOALS = ("LFI-CAM mean accuracy >= plain's; SE-CAM within 0.3 points of plain's; "
          "LFI-CAM stability IoU >= 0.7 and above ABN's.")  # fmt: skip


def _load_results(results_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    docs = []
    for path in sorted(results_dir.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e
        if doc.get("experiment") in ("accuracy", "stability"):
            docs.append({**doc, "file": path.name})
    return [d for d in docs if d["experiment"] == "accuracy"], [d for d in docs if d["experiment"] == "stability"]


def _load_kind(results_dir: Path, kind: str) -> list[dict[str, Any]]:
    """The ``results_dir/*.json`` documents of experiment ``kind`` (``grid-pointing-game``, ``shortcut``)."""
    docs = []
    for path in sorted(results_dir.glob("*.json")):
        doc = json.loads(path.read_text())
        if doc.get("experiment") == kind:
            docs.append({**doc, "file": path.name})
    return docs


def _grid_section(doc: dict[str, Any]) -> list[str]:
    runs = list(dict.fromkeys(name.split("/")[0] for name in doc["methods"]))
    methods = list(dict.fromkeys(name.split("/", 1)[1] for name in doc["methods"]))
    lines = [f"### {doc['dataset']}, {doc['grid']} grids", "",
             f"{doc['count']} grids per run from the {doc['split']} split ({doc['n_items']} images); an image enters "
             f"a grid when it is classified correctly with probability >= {doc['confidence']:g} (eligible images per "
             f"run: {', '.join(f'{r} {n}' for r, n in doc['eligible'].items())}); grid seed {doc['seed']} "
             f"(`results/{doc['file']}`).", "",
             "| run | accuracy (%) | " + " | ".join(methods) + " | self-class - gradcam |",
             "|---|---|" + "---|" * len(methods) + "---|"]  # fmt: skip
    checks = []
    for run in runs:
        row = {m: doc["methods"].get(f"{run}/{m}", {}).get("score") for m in methods}
        cells = " | ".join("-" if v is None else f"{v:.3f}" for v in row.values())
        delta = ""
        if row.get("self-class") is not None and row.get("gradcam") is not None:
            d = row["self-class"] - row["gradcam"]
            delta = f"{d:+.3f}"
            checks.append(f"{run} {delta}: {'met' if d >= 0 else 'NOT met'}")
        lines.append(f"| {run} | {_pct(doc['accuracy'].get(run, float('nan')))} | {cells} | {delta} |")
    if checks:
        lines += ["", "Goal check (self-class >= Grad-CAM on the same model): " + "; ".join(checks) + "."]
    return lines + [""]


def _shortcut_section(doc: dict[str, Any]) -> list[str]:
    lines = [f"{doc['n_items']} test images per set (data seed {doc['seed']}); the mark is a {doc['mark']} px square, "
             f"{100 * doc['mark_area']:.2f} % of the image: a map that ignores it puts about that share of its mass "
             f"on it. The maximum counts as on the mark or the digit within {doc.get('tolerance', 0)} px. Wall time {doc['wall_seconds'] / 60:.1f} min (`results/{doc['file']}`).", "",
             "| run/method | acc. correlated (%) | acc. decorrelated (%) | drop (points) | mark energy | "
             "mark energy, decorrelated | digit energy | max on the mark | max on the digit |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    drops = {}
    for name, m in doc["methods"].items():
        drop = 100 * (m["acc_correlated"] - m["acc_decorrelated"])
        drops[name.split("/")[0]] = drop
        lines.append(f"| {name} | {_pct(m['acc_correlated'])} | {_pct(m['acc_decorrelated'])} | {drop:.2f} | "
                     f"{m['mark_energy']:.3f} | {m['mark_energy_decorrelated']:.3f} | {m['digit_energy']:.3f} | "
                     f"{_opt(m.get('mark_pointing_game'))} | {_opt(m.get('digit_pointing_game'))} |")  # fmt: skip
    checks = [f"{run} {d:.1f}: {'met' if d >= 10 else 'NOT met'}" for run, d in drops.items()]
    return lines + ["", "Goal check (a drop of at least 10 points): " + "; ".join(checks) + ".", ""]


def _opt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _recipe_line(doc: dict[str, Any]) -> str:
    r = doc["recipe"]
    kw = f" {json.dumps(r['backbone_kwargs'])}" if r["backbone_kwargs"] else ""
    sizes = ", ".join(f"{k.split('_')[0]} {r[k]}" for k in ("train_size", "val_size", "test_size") if r.get(k))
    return (f"{r['backbone']}{kw}, {r['epochs']} epochs, AdamW + one-cycle, image size "
            f"{r['image_size'] or 'dataset default'}; {sizes or 'full splits'}")


def _accuracy_section(doc: dict[str, Any]) -> list[str]:
    methods = doc.get("methods", {})
    plain = methods.get("plain", {}).get("mean")
    seeds = doc["seeds"]
    lines = [f"### {doc['dataset']}", "", f"Recipe: {_recipe_line(doc)}. Seeds 0..{seeds - 1}. "
             f"Wall time {doc['wall_seconds'] / 60:.1f} min (`results/{doc['file']}`).", "",
             "| method | accuracy per seed (%) | mean (%) | std (points) | vs plain (points) |",
             "|---|---|---|---|---|"]  # fmt: skip
    for name, m in methods.items():
        delta = "" if plain is None or name == "plain" else f"{100 * (m['mean'] - plain):+.2f}"
        lines.append(f"| {name} | {', '.join(_pct(a) for a in m['accuracy'])} | {_pct(m['mean'])} | "
                     f"{100 * m['std']:.2f} | {delta} |")  # fmt: skip
    if plain is not None:
        checks = []
        for name, rule in (("lfi", lambda d: d >= 0), ("lfi-light", lambda d: d >= 0), ("se", lambda d: d >= -0.003)):
            if name in methods:
                d = methods[name]["mean"] - plain
                checks.append(f"{name} {100 * d:+.2f} points: {'met' if rule(d) else 'NOT met'}")
        lines += ["", "Goal check (mean vs plain): " + "; ".join(checks) + "."]
    return lines + [""]


def _stability_section(doc: dict[str, Any]) -> list[str]:
    methods = doc.get("methods", {})
    lines = [f"### {doc['dataset']}", "", f"Recipe: {_recipe_line(doc)}. Wall time {doc['wall_seconds'] / 60:.1f} min "
             f"(`results/{doc['file']}`).", "", "| method | IoU | Dice | accuracy per setting (%) |", "|---|---|---|---|"]  # fmt: skip
    for name, m in methods.items():
        lines.append(f"| {name} | {m['iou']:.3f} | {m['dice']:.3f} | {', '.join(_pct(a) for a in m['accuracy'])} |")
    if "lfi" in methods:
        lfi, abn = methods["lfi"]["iou"], methods.get("abn", {}).get("iou")
        ok = lfi >= 0.7 and (abn is None or lfi > abn)
        vs = "" if abn is None else f", ABN {abn:.3f}"
        lines += ["", f"Goal check: LFI-CAM IoU {lfi:.3f}{vs}: {'met' if ok else 'NOT met'}."]
    return lines + [""]


def _settings_table(doc: dict[str, Any]) -> list[str]:
    lines = ["| setting | learning rate | batch size | weight decay | seed |", "|---|---|---|---|---|"]
    for i, s in enumerate(doc["settings"], 1):
        lines.append(f"| {i} | {s['lr']:g} | {s['batch_size']} | {s['weight_decay']:g} | {s['seed']} |")
    return lines + [""]


def _bar_plot(path: Path, groups: dict[str, dict[str, tuple[float, float]]], ylabel: str, title: str) -> None:
    """Grouped bars: ``groups[dataset][method] = (value, error)``; written as PNG without metadata."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    methods = list(dict.fromkeys(m for g in groups.values() for m in g))
    fig = Figure(figsize=(8, 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / max(len(methods), 1)
    for j, method in enumerate(methods):
        xs = [i + (j - (len(methods) - 1) / 2) * width for i, g in enumerate(groups.values()) if method in g]
        vals = [g[method] for g in groups.values() if method in g]
        ax.bar(xs, [v for v, _ in vals], width, yerr=[e for _, e in vals], label=method, capsize=2)
    ax.set_xticks(range(len(groups)), list(groups))
    ax.set(ylabel=ylabel, title=title, ylim=(0.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small", ncols=len(methods))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", metadata={"Software": None})


def write_results_markdown(results_dir: str | Path = "results", out: str | Path = "docs/RESULTS.md",
                           plots: bool = True) -> str:  # fmt: skip
    """Render ``out`` from ``results_dir/*.json`` (+ ``results_dir/notes.md`` verbatim); returns the text.

    Plots go to ``<out's folder>/results/{accuracy,stability}.png`` unless ``plots`` is False.
    """
    results_dir, out = Path(results_dir), Path(out)
    acc, stab = _load_results(results_dir)
    if not acc and not stab:
        raise ConfigError(f"no experiment JSON files in {results_dir}")
    lines = ["# Results", "",
             "Generated by `selfcam experiment results` from the JSON files in `results/`; do not edit by hand "
             "(the discussion comes from `results/notes.md`). Every figure was measured on the project's "
             "development machine: 2 CPU cores, no GPU.", "", f"Goals (issue 5): {_GOALS}", ""]  # fmt: skip
    if acc:
        lines += ["## Accuracy (same backbone and recipe for every method)", ""]
        lines += ["![accuracy per method](results/accuracy.png)", ""] if plots else []
        for doc in acc:
            lines += _accuracy_section(doc)
    if stab:
        lines += ["## Stability of the maps across hyper-parameter settings", "",
                  "Each method is trained under the settings below; its models' maps of the same test images "
                  "are binarized at 100/255 and compared pairwise (IoU, Dice), averaged over pairs and images.", ""]  # fmt: skip
        lines += _settings_table(stab[0])
        lines += ["![stability per method](results/stability.png)", ""] if plots else []
        for doc in stab:
            lines += _stability_section(doc)
    grids, shortcuts = _load_kind(results_dir, "grid-pointing-game"), _load_kind(results_dir, "shortcut")
    if grids:
        lines += ["## Grid pointing game (class-specific maps)", "",
                  "B-cos / CoDA-Nets protocol (docs/metrics.md): grids of images of distinct classes, each explained "
                  "for the class of each cell; the score is the share of the map's positive mass in that cell "
                  "(1 / cells for a map that ignores the class). `self-class` is the head's own class-specific "
                  "map (docs/methods.md); the papers' class-agnostic maps (`self`) are left out.", ""]  # fmt: skip
        for doc in grids:
            lines += _grid_section(doc)
    for doc in shortcuts:
        lines += ["## Shortcut benchmark (shortcut-digits)", "",
                  "Trained on `shortcut-digits` (docs/metrics.md, shortcut benchmark): a mark at a class-dependent place in 90 % of the "
                  "training images. Tested with the mark at its class's place (correlated) and anywhere "
                  "(decorrelated); the mark energy is the share of a map's mass on the mark (correlated set).", ""]  # fmt: skip
        lines += _shortcut_section(doc)
    lines += ["## Commands", "", "```"]
    lines += [d["command"] or f"# {d['file']}: command not recorded" for d in (*acc, *stab, *grids, *shortcuts)]
    lines += ["selfcam experiment results --results results --out docs/RESULTS.md", "```", ""]
    notes = results_dir / "notes.md"
    if notes.exists():
        lines += [notes.read_text().strip(), ""]
    text = "\n".join(lines)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    if plots:
        if acc:
            groups = {d["dataset"]: {m: (v["mean"], v["std"]) for m, v in d["methods"].items()} for d in acc}
            _bar_plot(out.parent / "results" / "accuracy.png", groups, "test accuracy", "accuracy per method (mean, std over seeds)")
        if stab:
            groups = {d["dataset"]: {m: (v["iou"], 0.0) for m, v in d["methods"].items()} for d in stab}
            _bar_plot(out.parent / "results" / "stability.png", groups, "mean pairwise IoU", "map stability across settings")
    return text
