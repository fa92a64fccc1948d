"""Run models over a dataset and score their maps with every metric, streaming.

Every map, the model's own (``"self"``) or a post-hoc one, comes from one interface
(:func:`selfcam.explainers.explain`), so every method is scored by the same code.
:func:`evaluate_task` scores runs of any task and returns one document family
(``{"task", "n_items", "runs": {RUN: {"params", "results": {METHOD: {metric: value}}}}, ...}``):

- image runs: :func:`evaluate_runs` walks the data once, batch by batch, runs every (model,
  method) pair on the batch and adds each metric's per-sample values to running sums (memory does
  not grow with the number of images); localization, faithfulness, stability, sanity;
- video runs: :func:`evaluate_clips`, accuracy per clip and localization per frame against its box;
- attribute runs: :func:`selfcam.faces.evaluate_attributes` per attribute (the run's entry adds
  ``"attributes"``: a row per attribute);
- ASD runs: :func:`selfcam.asd.evaluate_asd` (the run's entry adds ``"modality_importance"`` and
  ``"silence_check"``).

Each task's :meth:`~selfcam.tasks.Task.evaluate` says which of these it is, and its ``metrics`` what it scores.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from . import metrics as M
from .data import box_mask
from .errors import ConfigError, InputError, require_int
from .explainers import EXPLAINERS, explain, get_explainer
from .model import SelfExplainer

__all__ = ["CLIP_METRICS", "METRICS", "EvalConfig", "check_fits", "evaluate", "evaluate_clips",
           "evaluate_runs", "evaluate_task", "count_params", "grid_scores", "task_metrics"]  # fmt: skip

from .tasks import TASKS, get_task, list_tasks
from .tasks.image import GRID, IMAGE_METRICS as METRICS, LOCALIZATION
from .tasks.video import CLIP_METRICS


def task_metrics(task: str, default: bool = False) -> tuple[str, ...]:
    """The metric names :func:`evaluate_task` computes for runs of ``task`` (``Task.metrics``; ``default``:
    those it computes when :class:`EvalConfig` names none, ``Task.default_metrics``: for images the
    cheap ones, accuracy, pointing game and IoU; all otherwise)."""
    t = get_task(task)
    if not t.metrics:
        with_metrics = [name for name in list_tasks() if TASKS[name].metrics]
        raise ConfigError(f"no metrics are defined for the {task} task; tasks with metrics: {', '.join(with_metrics)}")
    return t.default_metrics or t.metrics if default else t.metrics


def _with_metrics(cfg: "EvalConfig", task: str) -> "EvalConfig":
    """``cfg`` with its metrics chosen: the task's defaults when it names none."""
    return cfg if cfg.metrics is not None else replace(cfg, metrics=task_metrics(task, default=True))


@dataclass
class EvalConfig:
    """What to compute and with which settings (stored in ``evaluation.json``)."""

    methods: Sequence[str] = ("self",)
    metrics: Sequence[str] | None = None  # None: the task's defaults (images: accuracy, pointing_game, iou; others: all)
    batch_size: int = 50
    threshold: float = 0.5
    tolerance: int = 0
    steps: int = 20
    deletion_baseline: str = "zero"
    insertion_baseline: str = "blur"
    stability_threshold: float = 100 / 255
    sanity_images: int = 0
    posthoc_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    grid_size: int = 2  # grid pointing game: grid_size x grid_size images per grid
    grid_count: int = 100  # grids per run
    grid_confidence: float = 0.9  # softmax probability an image needs (and a correct prediction) to enter a grid
    grid_seed: int = 0

    def __post_init__(self) -> None:
        if self.metrics is not None:  # "grid-pointing-game" as the command line may spell it
            self.metrics = tuple(m.replace("-", "_") for m in self.metrics)
        every_metric = tuple(dict.fromkeys(m for name in list_tasks() for m in TASKS[name].metrics))
        chosen = ("method", self.methods, tuple(EXPLAINERS)), ("metric", () if self.metrics is None else self.metrics, every_metric)
        for kind, given, known in chosen:
            if kind == "metric" and self.metrics is None:
                continue
            unknown = [g for g in given if g not in known]
            if unknown or not given:
                raise ConfigError(f"unknown or no {kind}(s) {unknown}; choose from {', '.join(known)}")
        if self.batch_size < 1 or self.steps < 1:
            raise ConfigError(f"batch_size and steps must be >= 1, got {self.batch_size}, {self.steps}")
        if self.grid_size < 2 or self.grid_count < 1 or not 0 <= self.grid_confidence <= 1:
            raise ConfigError(f"grid_size must be >= 2, grid_count >= 1 and grid_confidence in [0, 1], got "
                              f"{self.grid_size}, {self.grid_count}, {self.grid_confidence}")  # fmt: skip


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _batch_scores(model: SelfExplainer, x: Tensor, y: Tensor, masks: Tensor | None, logits: Tensor,
                  maps: Tensor, cfg: EvalConfig) -> dict[str, Tensor]:  # fmt: skip
    """Per-sample values ``(N,)`` of every requested metric for one batch (maps explain the predicted class).

    With ``deletion_auc`` / ``insertion_auc`` also their curves ``(N, steps + 1)`` as
    ``deletion_curve`` / ``insertion_curve`` (averaged into ``evaluation.json``'s ``"curves"``).
    """
    pred = logits.argmax(dim=1)
    curves: dict[str, Tensor] = {}

    def auc(kind: str, curve: Callable[..., Tensor], baseline: str) -> Tensor:
        """:func:`metrics.deletion_auc` / ``insertion_auc``, keeping the curve it integrates."""
        curves[f"{kind}_curve"] = c = curve(model, x, maps, pred, cfg.steps, baseline)
        return torch.trapezoid(c, dx=1 / cfg.steps, dim=1)

    fns: dict[str, Callable[[], Tensor]] = {
        "accuracy": lambda: M.accuracy(logits, y),
        "pointing_game": lambda: M.pointing_game(maps, masks, cfg.tolerance),
        "energy_pointing_game": lambda: M.energy_pointing_game(maps, masks),
        "iou": lambda: M.iou(maps, masks, cfg.threshold),
        "dice": lambda: M.dice(maps, masks, cfg.threshold),
        "average_drop": lambda: M.average_drop(model, x, maps, pred),
        "increase_in_confidence": lambda: M.increase_in_confidence(model, x, maps, pred),
        "deletion_auc": lambda: auc("deletion", M.deletion_curve, cfg.deletion_baseline),
        "insertion_auc": lambda: auc("insertion", M.insertion_curve, cfg.insertion_baseline),
        "road_morf": lambda: M.road(model, x, maps, pred, order="morf").mean(dim=1),
        "road_lerf": lambda: M.road(model, x, maps, pred, order="lerf").mean(dim=1),
    }
    scores = {name: fns[name]() for name in cfg.metrics if name in fns and (masks is not None or name not in LOCALIZATION)}
    return {**scores, **curves}


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def sync(device: torch.device) -> None:
    """Wait for the device's queue, so wall times include the work (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class _Sums:
    """Running sums of one pass over (part of) the data: per (run, method) metric sums and seconds,
    per method stability sums (IoU, Dice times images), and the image count. Shards add up."""

    sums: dict[tuple[str, str], dict[str, float]]
    seconds: dict[tuple[str, str], float]
    stab: dict[str, dict[str, float]]
    n: int = 0

    @classmethod
    def zero(cls, pairs: list[tuple[str, str]], methods: Sequence[str], stability: bool) -> "_Sums":
        return cls({p: {} for p in pairs}, {p: 0.0 for p in pairs}, {m: {"iou": 0.0, "dice": 0.0} for m in methods} if stability else {})

    def __add__(self, other: "_Sums") -> "_Sums":
        sums = {p: {k: v + other.sums[p][k] for k, v in d.items()} for p, d in self.sums.items()}
        seconds = {p: v + other.seconds[p] for p, v in self.seconds.items()}
        stab = {m: {k: v + other.stab[m][k] for k, v in d.items()} for m, d in self.stab.items()}
        return _Sums(sums, seconds, stab, self.n + other.n)


def check_fits(models: dict[str, SelfExplainer], dataset: Dataset) -> None:
    """Raise :class:`ConfigError` naming the run and the data when a model's class or channel count is not the dataset's."""
    want = getattr(dataset, "num_classes", None), getattr(dataset, "in_chans", None)
    source = getattr(dataset, "source", "") or type(dataset).__name__
    for name, model in models.items():
        have = model.config.num_classes, model.config.in_chans
        if None not in want and have != want:
            raise ConfigError(f"run {name} has {have[0]} classes / {have[1]} input channel(s) but dataset {source} has "
                              f"{want[0]} / {want[1]}: evaluate a run on data like the data it was trained on")  # fmt: skip


def evaluate_runs(
    models: dict[str, SelfExplainer],
    dataset: Dataset,
    cfg: EvalConfig,
    progress: Callable[[Iterable[Any], int], Iterable[Any]] | None = None,
    devices: int = 1,
) -> dict[str, Any]:
    """Score every model with every method on ``dataset`` (items ``(image, label[, box])``).

    Returns ``{"task": "image", "n_items", "runs": {RUN: {"params", "results": {METHOD: {metric: mean}}}},
    "stability": {METHOD: {"iou", "dice", "iou_matrix", "dice_matrix"}}`` (when there are several
    runs; matrices ``R x R`` in the order of ``models``), ``"curves": {RUN: {METHOD: {"deletion",
    "insertion"}}}`` (mean curves, ``steps + 1`` points, when those AUCs are computed),
    ``"sanity": {RUN: {METHOD: [[layer, mean rho], ...]}}`` (when ``cfg.sanity_images``)}``.
    ``devices > 1`` splits the images into as many contiguous shards of whole batches, scores
    them in as many processes (on ``cuda:i`` when the models are on a GPU) and adds up their
    sums: the means are those of one process, up to the order of float additions.
    """
    if not models:
        raise ConfigError("no models to evaluate")
    require_int("devices", devices)
    cfg = _with_metrics(cfg, "image")
    check_fits(models, dataset)
    for model in models.values():
        model.eval()
    total = _score(models, dataset, cfg, progress) if devices == 1 else _score_sharded(models, dataset, cfg, devices)
    n = total.n
    if n == 0:
        raise InputError("the dataset is empty: nothing to evaluate")
    runs: dict[str, Any] = {run: {"params": count_params(m), "results": {}} for run, m in models.items()}
    curves: dict[str, dict[str, dict[str, list[float]]]] = {}
    for (run, method), sums in total.sums.items():
        means = {k: _mean(v, n) for k, v in sums.items()}
        kept = {k.removesuffix("_curve"): means.pop(k) for k in list(means) if k.endswith("_curve")}
        if kept:
            curves.setdefault(run, {})[method] = kept
        runs[run]["results"][method] = {**means, "map_ms_per_image": 1000 * total.seconds[run, method] / n}
    result: dict[str, Any] = {"task": "image", "n_items": n, "runs": runs}
    if curves:
        result["curves"] = curves
    if total.stab:
        result["stability"] = {m: {k: _mean(v, n) for k, v in d.items()} for m, d in total.stab.items() if d["iou"] or d["dice"]}
    if cfg.sanity_images > 0:
        result["sanity"] = _sanity(models, dataset, cfg)
    if any(m in GRID for m in cfg.metrics):
        result["grid"] = grid_scores(models, dataset, cfg, progress)
        for run, by_method in result["grid"].pop("scores").items():
            for method, score in by_method.items():
                runs[run]["results"][method]["grid_pointing_game"] = score
    return result


def grid_scores(models: dict[str, SelfExplainer], dataset: Dataset, cfg: EvalConfig,
                progress: Callable[[Iterable[Any], int], Iterable[Any]] | None = None) -> dict[str, Any]:  # fmt: skip
    """The grid pointing game of every class-specific method on every run (docs/metrics.md).

    Per run: its correctly classified images of probability ``>= cfg.grid_confidence``
    (:func:`metrics.confident_correct`) form the pool; ``cfg.grid_count`` grids of ``cfg.grid_size**2``
    images of distinct classes are drawn from it (:func:`metrics.make_grids`, seed ``cfg.grid_seed``) and
    tiled (:func:`metrics.tile_grid`); each method explains every grid once per cell, for that cell's class,
    and :func:`metrics.grid_pointing_game` scores the map. Class-agnostic methods (``self``) are left out:
    on average over a grid's cells they score ``1 / grid_size**2`` by construction. Returns ``{"size": "2x2",
    "count", "confidence", "seed", "eligible": {RUN: images}, "skipped": {RUN: reason}, "scores": {RUN:
    {METHOD: mean}}}``; a run whose pool has fewer classes than a grid has cells is skipped.
    """
    g = cfg.grid_size
    doc: dict[str, Any] = {"size": f"{g}x{g}", "count": cfg.grid_count, "confidence": cfg.grid_confidence,
                           "seed": cfg.grid_seed, "eligible": {}, "skipped": {}, "scores": {}}  # fmt: skip
    methods = [m for m in cfg.methods if get_explainer(m).class_specific]
    for run, model in models.items():
        device = _device(model)
        labels, eligible = [], []
        with torch.no_grad():
            for batch in DataLoader(dataset, batch_size=cfg.batch_size):
                y = batch[1].to(device)
                eligible.append(M.confident_correct(model(batch[0].to(device)).logits, y, cfg.grid_confidence).cpu())
                labels.append(y.cpu())
        label, ok = torch.cat(labels), torch.cat(eligible)
        doc["eligible"][run] = int(ok.sum())
        try:
            index = M.make_grids(label, ok, g, cfg.grid_count, cfg.grid_seed)
        except ConfigError as e:
            doc["skipped"][run] = str(e)
            continue
        chosen = [m for m in methods if get_explainer(m).unsupported(model) is None]
        sums = dict.fromkeys(chosen, 0.0)
        per_chunk = max(1, cfg.batch_size // (g * g))  # grids per call: about batch_size maps at a time
        chunks = index.split(per_chunk)
        for chunk in progress(chunks, len(chunks)) if progress else chunks:
            images = torch.stack([torch.stack([dataset[int(i)][0] for i in row]) for row in chunk])
            x = M.tile_grid(images, g).to(device).repeat_interleave(g * g, dim=0)  # one copy per cell
            target = label[chunk].flatten().to(device)
            cell = torch.arange(g * g, device=device).repeat(len(chunk))
            for method in chosen:
                maps = explain(model, x, method=method, target=target, **cfg.posthoc_options.get(method, {})).maps
                sums[method] += float(M.grid_pointing_game(maps, cell, g).sum())
        doc["scores"][run] = {m: v / index.numel() for m, v in sums.items()}
    return doc


def _mean(total: float | Tensor, n: int) -> float | list:
    """A running sum over ``n`` images as a JSON-ready mean (a float, or nested lists for curves and matrices)."""
    return total / n if isinstance(total, float) else (total / n).tolist()


def _score(models: dict[str, SelfExplainer], dataset: Dataset, cfg: EvalConfig,
           progress: Callable[[Iterable[Any], int], Iterable[Any]] | None = None) -> _Sums:  # fmt: skip
    """One pass over ``dataset`` in batches of ``cfg.batch_size``: every metric's sums."""
    pairs = _pairs(models, cfg.methods)
    total = _Sums.zero(pairs, cfg.methods, stability=len(models) > 1)
    sums, seconds, stab = total.sums, total.seconds, total.stab
    loader = DataLoader(dataset, batch_size=cfg.batch_size)
    batches = progress(loader, len(loader)) if progress else loader
    for batch in batches:
        batch_maps: dict[str, list[Tensor]] = {m: [] for m in cfg.methods}
        for run, model in models.items():
            x, y = batch[0].to(_device(model)), batch[1].to(_device(model))
            masks = box_mask(batch[2].to(x.device), tuple(x.shape[-2:])) if len(batch) > 2 else None
            for method in (m for r, m in pairs if r == run):
                t0 = time.perf_counter()
                e = explain(model, x, method=method, **cfg.posthoc_options.get(method, {}))
                logits, maps = e.logits, e.maps
                sync(x.device)
                seconds[run, method] += time.perf_counter() - t0
                if not torch.isfinite(maps).all():
                    raise InputError(f"{run}/{method} produced a map with NaN or inf values")
                for name, values in _batch_scores(model, x, y, masks, logits, maps, cfg).items():
                    batch_sum = values.sum().item() if values.dim() == 1 else values.sum(dim=0).double().cpu()  # curves
                    sums[run, method][name] = sums[run, method].get(name, 0.0) + batch_sum
                batch_maps[method].append(maps.cpu())
        for method, maps_per_run in batch_maps.items():
            if method in stab and len(maps_per_run) > 1:
                s = M.stability(torch.stack(maps_per_run), cfg.stability_threshold)
                stab[method]["iou"] += s["iou"] * len(batch[0])
                stab[method]["dice"] += s["dice"] * len(batch[0])
                for key in ("iou_matrix", "dice_matrix"):  # (R, R), runs in the order of ``models``
                    stab[method][key] = stab[method].get(key, 0.0) + s[key].double() * len(batch[0])
        total.n += len(batch[0])
    return total


def _shards(n: int, batch_size: int, devices: int) -> list[range]:
    """Up to ``devices`` contiguous, non-empty index ranges made of whole batches, covering ``range(n)``."""
    batches = math.ceil(n / batch_size)
    cuts = [min(n, i * batches // devices * batch_size) for i in range(devices + 1)]
    return [range(a, b) for a, b in zip(cuts, cuts[1:]) if a < b]


def _score_shard(job: tuple[dict[str, SelfExplainer], Dataset, EvalConfig, range, str, int]) -> _Sums:
    """In a worker process: move the models to the shard's device and score its images."""
    models, dataset, cfg, shard, device, threads = job
    torch.set_num_threads(threads)
    return _score({k: m.to(device).eval() for k, m in models.items()}, Subset(dataset, shard), cfg)


def _score_sharded(models: dict[str, SelfExplainer], dataset: Dataset, cfg: EvalConfig, devices: int) -> _Sums:
    """Score contiguous shards in ``devices`` spawned processes (``cuda:i`` each when on a GPU) and add the sums."""
    home = {k: _device(m) for k, m in models.items()}
    gpu = any(d.type == "cuda" for d in home.values())
    if gpu and torch.cuda.device_count() < devices:
        raise ConfigError(f"{devices} devices asked for, {torch.cuda.device_count()} GPU(s) visible")
    shards = _shards(len(dataset), cfg.batch_size, devices)  # type: ignore[arg-type]
    threads = max(1, torch.get_num_threads() // max(1, len(shards)))
    jobs = [({k: m.cpu() for k, m in models.items()}, dataset, cfg, shard, f"cuda:{i}" if gpu else "cpu", threads)
            for i, shard in enumerate(shards)]  # fmt: skip
    try:
        with torch.multiprocessing.get_context("spawn").Pool(len(jobs)) as pool:
            parts = pool.map(_score_shard, jobs)
    finally:
        for k, m in models.items():
            m.to(home[k])
    return sum(parts[1:], parts[0]) if parts else _score(models, Subset(dataset, range(0)), cfg)


def _pairs(models: dict[str, torch.nn.Module], methods: Sequence[str]) -> list[tuple[str, str]]:
    """The (run, method) pairs to score: each method on the runs it applies to (the classic CAM: plain runs)."""
    return [(run, m) for run, model in models.items() for m in methods if get_explainer(m).unsupported(model) is None]


def _sanity(models: dict[str, SelfExplainer], dataset: Dataset, cfg: EvalConfig) -> dict[str, Any]:
    """Cascading randomization on the first ``cfg.sanity_images`` images: mean Spearman rho per layer."""
    batch = next(iter(DataLoader(dataset, batch_size=cfg.sanity_images)))
    out: dict[str, Any] = {}
    for run, model in models.items():
        x = batch[0].to(_device(model))
        with torch.no_grad():
            target = model(x).logits.argmax(dim=1)
        out[run] = {}
        for method in (m for r, m in _pairs(models, cfg.methods) if r == run):
            options = cfg.posthoc_options.get(method, {})
            maps = lambda model, x, target: explain(model, x, method=method, target=target, **options).maps  # noqa: E731
            steps = M.cascading_randomization(model, x, target, maps)
            out[run][method] = [[layer, float(rho.mean())] for layer, rho in steps]
    return out


def evaluate(model: SelfExplainer, dataset: Dataset, method: str = "self", cfg: EvalConfig | None = None) -> dict[str, Any]:
    """One model, one method: ``{metric: mean, "map_ms_per_image": ..., "params": ...}``."""
    cfg = replace(cfg or EvalConfig(), methods=(method,))
    result = evaluate_runs({"model": model}, dataset, cfg)["runs"]["model"]
    return {**result["results"][method], "params": result["params"]}


def _check_task(models: dict[str, torch.nn.Module]) -> str:
    """The one task of ``models``; :class:`ConfigError` when they mix tasks."""
    from .tasks import task_of

    tasks = {run: task_of(m).name for run, m in models.items()}
    if len(set(tasks.values())) > 1:
        raise ConfigError("evaluate runs of one task at a time, got " + ", ".join(f"{r} ({t})" for r, t in tasks.items()))
    return next(iter(tasks.values()))


def _keep(results: dict[str, Any], metrics: Sequence[str]) -> dict[str, Any]:
    """The requested metrics of one result row (and the timing), in the order asked."""
    return {**{k: results[k] for k in metrics if k in results}, **{k: v for k, v in results.items() if "ms_per" in k}}


def evaluate_clips(models: dict[str, torch.nn.Module], dataset: Dataset, cfg: EvalConfig,
                   progress: Callable[[Iterable[Any], int], Iterable[Any]] | None = None) -> dict[str, Any]:  # fmt: skip
    """Score video runs on clips ``(clip (T, C, H, W), label[, boxes (T, 4)])``, streaming.

    Per (run, method): ``accuracy`` over clips, and over every frame with a box the frame's map
    against it: ``pointing_game``, ``pointing_game_15px`` (Zhang et al.'s 15 px at 224,
    :func:`selfcam.metrics.zhang_tolerance`), ``energy_pointing_game``, ``iou`` and ``dice``
    (map ``>= cfg.threshold``); ``temporal_stability`` over clips of two frames or more, with or without
    boxes (:func:`selfcam.metrics.temporal_stability` at ``cfg.threshold``); ``map_ms_per_clip``. Data
    without boxes gets accuracy and temporal stability. Returns the family's document
    (``{"task": "video", "n_items", "n_frames", "runs": ...}``).
    """
    cfg = _with_metrics(cfg, "video")
    pairs = _pairs(models, cfg.methods)
    sums: dict[tuple[str, str], dict[str, float]] = {p: dict.fromkeys(CLIP_METRICS, 0.0) for p in pairs}
    seconds = dict.fromkeys(pairs, 0.0)
    n = frames = paired = 0  # paired: clips of two frames or more (temporal stability)
    loader = DataLoader(dataset, batch_size=cfg.batch_size)
    for batch in progress(loader, len(loader)) if progress else loader:
        for run, model in models.items():
            x, y = batch[0].to(_device(model)), batch[1].to(_device(model))
            h, w = x.shape[-2:]
            masks = box_mask(batch[2].to(x.device).flatten(0, 1), (h, w)) if len(batch) > 2 else None
            for method in (m for r, m in pairs if r == run):
                t0 = time.perf_counter()
                e = explain(model, x, method=method, **cfg.posthoc_options.get(method, {}))
                sync(x.device)
                seconds[run, method] += time.perf_counter() - t0
                if not torch.isfinite(e.maps).all():
                    raise InputError(f"{run}/{method} produced a map with NaN or inf values")
                s = sums[run, method]
                s["accuracy"] += float(M.accuracy(e.logits, y).sum())
                s["temporal_stability"] += float(M.temporal_stability(e.maps, cfg.threshold).nansum())
                if masks is not None:
                    maps = e.maps.flatten(0, 1)  # (N T, H, W)
                    s["pointing_game"] += float(M.pointing_game(maps, masks, cfg.tolerance).sum())
                    s["pointing_game_15px"] += float(M.pointing_game(maps, masks, M.zhang_tolerance(h)).sum())
                    s["energy_pointing_game"] += float(M.energy_pointing_game(maps, masks).sum())
                    s["iou"] += float(M.iou(maps, masks, cfg.threshold).sum())
                    s["dice"] += float(M.dice(maps, masks, cfg.threshold).sum())
        n += len(batch[0])
        paired += len(batch[0]) if batch[0].shape[1] > 1 else 0
        frames += int(batch[2].shape[0] * batch[2].shape[1]) if len(batch) > 2 else 0
    if n == 0:
        raise InputError("the dataset is empty: nothing to evaluate")
    runs: dict[str, Any] = {run: {"params": count_params(m), "results": {}} for run, m in models.items()}
    for (run, method), s in sums.items():
        per = {"accuracy": n, "temporal_stability": paired}  # the other metrics: per frame with a box
        row = {k: v / per.get(k, frames) for k, v in s.items() if per.get(k, frames)}
        runs[run]["results"][method] = _keep({**row, "map_ms_per_clip": 1000 * seconds[run, method] / n}, cfg.metrics)
    return {"task": "video", "n_items": n, "n_frames": frames, "runs": runs}


def evaluate_per_run(task: str, models: dict[str, torch.nn.Module], dataset: Dataset, cfg: EvalConfig,
                     score: Callable[[torch.nn.Module], tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, Any]:  # fmt: skip
    """Runs scored one at a time on their own maps by ``score(model) -> (results, extra entries)``
    (attribute and ASD runs), as the family's document; each row adds ``ms_per_item``."""
    if cfg.methods != ("self",):
        raise ConfigError(f"{task} runs are scored on their own maps only (--methods self); got {', '.join(cfg.methods)}")
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:  # before scoring: the per-task means divide by it
        raise InputError("the dataset is empty: nothing to evaluate")
    runs: dict[str, Any] = {}
    for run, model in models.items():
        t0 = time.perf_counter()
        results, extra = score(model)
        ms = 1000 * (time.perf_counter() - t0) / n
        runs[run] = {"params": count_params(model), "results": {"self": _keep({**results, "ms_per_item": ms}, cfg.metrics)}, **extra}
    return {"task": task, "n_items": n, "runs": runs}


def evaluate_task(models: dict[str, torch.nn.Module], dataset: Dataset, cfg: EvalConfig,
                  progress: Callable[[Iterable[Any], int], Iterable[Any]] | None = None, devices: int = 1) -> dict[str, Any]:  # fmt: skip
    """Score runs of one task on ``dataset`` with the metrics of that task (:func:`task_metrics`).

    ``cfg.metrics`` is cut down to the task's metrics (an unknown one for the task is an error);
    returns the family's document, ``{"task", "n_items", "runs": {RUN: {"params", "results": {METHOD:
    {metric: value}}, ...}}, ...}`` (see the module docstring for what each task adds).
    """
    if not models:
        raise ConfigError("no models to evaluate")
    task = _check_task(models)
    cfg = _with_metrics(cfg, task)
    known = task_metrics(task)
    t = get_task(task)
    foreign = [m for m in cfg.metrics if m not in known]
    if foreign:
        raise ConfigError(f"metric(s) {', '.join(foreign)} do not apply to {task} runs; they have {', '.join(known)}")
    for run, model in models.items():
        check_methods_for(run, model, cfg.methods)
    if not t.shards:
        if devices != 1:
            raise ConfigError(f"--devices > 1 shards image evaluations only; this is a {task} evaluation")
        check_fits(models, dataset)  # type: ignore[arg-type]
        for model in models.values():
            model.eval()
    return t.evaluate(models, dataset, cfg, progress, devices)


def check_methods_for(run: str, model: torch.nn.Module, methods: Sequence[str]) -> None:
    """:class:`ConfigError` when none of ``methods`` applies to ``model`` (the others are skipped for it)."""
    reasons = [why for m in methods if (why := get_explainer(m).unsupported(model))]
    if len(reasons) == len(methods):
        raise ConfigError(f"run {run}: no requested method applies ({'; '.join(reasons)})")
