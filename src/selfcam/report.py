"""Reports from run, evaluation and demo directories: what to show, gathered and computed; drawing is :mod:`selfcam.render`'s.

:func:`read_sources` sorts directories into runs (any task), evaluations and demos; :func:`explain_runs`
loads the runs and computes the maps the report shows, on a few test inputs regenerated from each run's
recorded data: a per-class :class:`~selfcam.render.Gallery` of image runs, each attribute's map of
attribute runs (:class:`AttributeMaps`) and per-frame maps of video and ASD clips (:class:`ClipMaps`).
:func:`build_report` collects the metric tables, configs, histories and evaluation curves, and hands
all of it to :func:`selfcam.render.write_report`, which writes one self-contained HTML page.
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selfcam.errors import InputError

from . import render
from .explain import AttributeMaps, ClipMaps, attribute_maps, clip_maps, raw_item, spread_over_classes
from .render import Gallery

__all__ = ["AttributeMaps", "ClipMaps", "DEMO_RUNS", "RunMaps", "Sources", "build_report", "explain_runs",
           "gallery_from_runs", "read_sources"]  # fmt: skip


# --- reports from run, evaluation and demo directories ------------------------------------


@dataclass
class Sources:
    """What :func:`read_sources` found: run directories, ``evaluation.json`` and demo ``metrics.json`` docs.

    runs: name -> run directory (``config.json``, ``history.json``, ``model.safetensors``), of any task;
    evaluations / demos: name -> parsed JSON document. Names are the directory names,
    made unique with their parent's name when two collide; a demo's ``run/`` or ``model/`` run is
    named ``DEMO/run`` / ``DEMO/model``, its ``runs/METHOD`` runs ``METHOD``.
    """

    runs: dict[str, Path]
    evaluations: dict[str, dict]
    demos: dict[str, dict]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from e


def _unique(path: Path, taken: dict[str, Any]) -> str:
    """The directory's name (``.`` resolved), or ``parent/name``, or the whole path: the first not taken."""
    full = path.resolve()
    for name in (full.name, f"{full.parent.name}/{full.name}"):
        if name and name not in taken:
            return name
    return str(path)


DEMO_RUNS: tuple[str, ...] = ("runs/*",)  # where demos keep their runs (one per head)


def _demo_problem(doc: Any) -> str | None:
    """Why ``doc`` is not a demo's ``metrics.json`` of this version (``None`` when it is one)."""
    if isinstance(doc, dict) and doc.get("format") == "selfcam-demo" and isinstance(doc.get("runs"), dict):
        return None
    if isinstance(doc, dict) and (isinstance(doc.get("models"), dict) or isinstance(doc.get("attributes"), dict)
                                  or isinstance(doc.get("modality_importance"), dict)):  # fmt: skip
        return "written by an older selfcam demo (before every demo shared one format); rerun `selfcam demo --task T`"
    return "not a demo's metrics.json (no \"format\": \"selfcam-demo\" and no 'runs'); was it written by `selfcam demo`?"


def read_sources(paths: Sequence[str | Path]) -> Sources:
    """Sort directories into runs (``config.json``, any task), evaluations (``evaluation.json``) and
    demos (``metrics.json`` of the digits, faces or ASD demo; the run directories it holds at any of
    :data:`DEMO_RUNS` join ``runs``). Anything else raises :class:`InputError` naming the directory."""
    found = Sources({}, {}, {})
    if not paths:
        raise InputError("no run, evaluation or demo directories given")
    for path in map(Path, paths):
        if not path.is_dir():
            raise InputError(f"{path}: not a directory (give a run, evaluation or demo directory)")
        kinds = 0
        if (path / "evaluation.json").is_file():
            doc = _read_json(path / "evaluation.json")
            if not isinstance(doc, dict) or not isinstance(doc.get("runs"), dict):
                raise InputError(f"{path / 'evaluation.json'}: no 'runs' object; was it written by `selfcam evaluate`?")
            found.evaluations[_unique(path, found.evaluations)] = doc
            kinds += 1
        if (path / "metrics.json").is_file():
            doc = _read_json(path / "metrics.json")
            problem = _demo_problem(doc)
            if problem:
                raise InputError(f"{path / 'metrics.json'}: {problem}")
            demo = _unique(path, found.demos)
            found.demos[demo] = doc
            for pattern in DEMO_RUNS:
                for run in sorted(r for r in path.glob(pattern) if (r / "config.json").is_file()):
                    name = _unique(run, found.runs)
                    found.runs[name if name not in found.runs else str(run)] = run
            kinds += 1
        if (path / "config.json").is_file():
            found.runs[_unique(path, found.runs)] = path
            kinds += 1
        if not kinds:
            raise InputError(f"{path}: not a run, evaluation or demo directory "
                             "(no config.json, evaluation.json or metrics.json)")  # fmt: skip
    return found


def _history(run: Path, notes: list[str]) -> list[dict] | None:
    path = run / "history.json"
    if not path.is_file():
        return None
    doc = _read_json(path)
    if not isinstance(doc, list) or not all(isinstance(e, dict) for e in doc):
        notes.append(f"{path}: not a list of per-epoch objects; its curves are left out")
        return None
    return doc


def _run_row(doc: dict, history: list[dict] | None) -> dict[str, Any]:
    """Summary of one run of any task: what it is and where its training ended."""
    model, data, train = doc["model"], doc.get("data") or {}, doc.get("train") or {}
    row: dict[str, Any] = {"task": doc.get("task"), "method": getattr(model, "method", "se"),
                           "backbone": getattr(model, "backbone", None), "data": data.get("name"),
                           "size": data.get("size")}  # fmt: skip
    row["frames"] = data.get("frames", getattr(model, "frames", None))  # clips; build_report drops it for images only
    row["epochs"] = len(history) if history else train.get("epochs")
    if history:
        last = history[-1]
        row.update({k: last.get(k) for k in ("train_loss", "val_loss", "val_acc")})
        accs = [e["val_acc"] for e in history if isinstance(e.get("val_acc"), (int, float))]
        row["best_val_acc"] = max(accs) if accs else None
    return row


def _evaluation_parts(name: str, doc: dict, prefix: str) -> tuple[dict, list, list]:
    """Rows, tables and figures of one ``evaluation.json``."""
    rows = {f"{prefix}{run}/{method}": r for run, v in doc["runs"].items() if isinstance(v, dict)
            for method, r in (v.get("results") or {}).items() if isinstance(r, dict)}  # fmt: skip
    tables: list[tuple[str, dict]] = []
    figures: list[tuple[str, str]] = []
    curves = doc.get("curves") or {}
    lines = {kind: {f"{run}/{method}": c[kind] for run, per in curves.items() for method, c in per.items()
                    if isinstance(c.get(kind), list) and c[kind]} for kind in ("deletion", "insertion")}  # fmt: skip
    if any(lines.values()):
        panels = [(f"{kind} (mean over images)", "fraction of pixels " + ("removed" if kind == "deletion" else "inserted"),
                   "target probability", lines[kind]) for kind in ("deletion", "insertion") if lines[kind]]  # fmt: skip
        steps = max(len(v) for d in lines.values() for v in d.values())
        figures.append((f"{name}: deletion and insertion curves", render.line_panels(panels, np.linspace(0, 1, steps))))
    stability = doc.get("stability") or {}
    if stability:
        tables.append((f"{name}: stability across runs (mean pairwise IoU and Dice{_threshold(doc)})",
                       {m: {"iou": v.get("iou"), "dice": v.get("dice")} for m, v in stability.items()}))  # fmt: skip
        run_names = list(doc["runs"])
        for what in ("iou", "dice"):
            mats = {m: v[f"{what}_matrix"] for m, v in stability.items() if isinstance(v.get(f"{what}_matrix"), list)}
            if mats:
                figures.append((f"{name}: stability matrix ({what.upper()})", render.matrices(mats, run_names, what.upper())))
    sanity = doc.get("sanity") or {}
    lines = {f"{run}/{method}": [float(rho) for _, rho in steps] for run, per in sanity.items()
             for method, steps in per.items() if steps}  # fmt: skip
    if lines:
        layers = [str(layer) for layer, _ in next(iter(next(iter(sanity.values())).values()))]
        figures.append((f"{name}: sanity check (cascading randomization)", render.line_panels(
            [("rank correlation with the trained model's map", "randomized up to layer", "Spearman rho", lines)],
            xticks=layers if all(len(v) == len(layers) for v in lines.values()) else None)))  # fmt: skip
    return rows, tables, figures


def _threshold(doc: dict) -> str:
    t = (doc.get("config") or {}).get("stability_threshold")
    return f" of maps >= {t:.3f}" if isinstance(t, (int, float)) else ""


# --- demo metrics.json documents ---------------------------------------------------------------


def _plain(v: object) -> bool:
    return v is None or isinstance(v, (bool, str, numbers.Real))


def _task_parts(name: str, doc: dict, prefix: str, notes: list[str]) -> tuple[dict, list, list]:
    """What the task adds to a run's entry of an evaluation or demo document, as rows, tables and figures:
    attribute runs a table with a row per attribute; ASD runs the scores with silent audio (a row), the
    modality importance per class (a table and a bar chart) and the silence check (a table)."""
    rows: dict[str, dict] = {}
    tables: list[tuple[str, dict]] = []
    figures: list[tuple[str, str]] = []
    for run, entry in doc["runs"].items():
        if not isinstance(entry, dict):
            continue
        if isinstance(entry.get("attributes"), dict):
            per = {a: r for a, r in entry["attributes"].items() if isinstance(r, dict)}
            tables.append((f"{name}: {run}, per-attribute test metrics (pointing game and IoU on the images with the "
                           "attribute)", per))  # fmt: skip
        silence = entry["silence_check"] if isinstance(entry.get("silence_check"), dict) else {}
        if isinstance(silence.get("silent_scores"), dict):
            rows[f"{prefix}{run}/self, audio replaced by silence"] = silence["silent_scores"]
        if isinstance(entry.get("modality_importance"), dict):
            importance = {c: v for c, v in entry["modality_importance"].items() if isinstance(v, dict)}
            silent = silence.get("silent_modality_importance")
            if isinstance(silent, dict):
                importance.update({f"{c}, silent audio": v for c, v in silent.items() if isinstance(v, dict)})
            what = {"removal": "the change of p(speaking) when the modality is removed",
                    "se_mean": "mean fusion-SE weight of each modality's slice"}.get(silence.get("definition"), "as the run defines it")
            tables.append((f"{name}: {run}, modality importance ({what})", importance))
            try:
                figures.append((f"{name}: {run}, modality importance (speaking / not speaking, real and silent audio)",
                                render.importance_bars(entry)))  # fmt: skip
            except (KeyError, TypeError, ValueError) as e:
                notes.append(f"{name}: {run}: modality importance chart left out (the document lacks {e})")
        if silence:
            tables.append((f"{name}: {run}, silence check (every waveform replaced by zeros)",
                           {"test split": {k: v for k, v in silence.items() if _plain(v)}}))  # fmt: skip
    return rows, tables, figures


# --- maps of test inputs, computed from the runs ------------------------------------------------


@dataclass
class RunMaps:
    """What :func:`explain_runs` computed: the per-class gallery of the image runs, and per run name
    the attribute maps of attribute runs and the clips of video and ASD runs."""

    gallery: Gallery | None = None
    attributes: dict[str, AttributeMaps] = field(default_factory=dict)
    clips: dict[str, list[ClipMaps]] = field(default_factory=dict)


class _Skip(Exception):
    """A run's maps cannot be computed here; the message says why (it becomes a note)."""


# what building or reading test data, or running a model on it, raises when they do not fit
_UNAVAILABLE = (OSError, ValueError, RuntimeError, KeyError, IndexError, TypeError)


def _load_runs(runs: dict[str, Path], notes: list[str]) -> dict[str, tuple[torch.nn.Module, dict]]:
    """Every run that loads, as ``name -> (model, config)``; the others are noted."""
    from .checkpoint import load_checkpoint
    from .errors import SelfcamError

    loaded = {}
    for name, path in runs.items():
        try:
            loaded[name] = load_checkpoint(path)
        except SelfcamError as e:
            notes.append(f"gallery: run {name} left out ({e})")
    return loaded


def _image_gallery(loaded: dict[str, tuple[torch.nn.Module, dict]], per_class: int, methods: Sequence[str],
                   notes: list[str]) -> Gallery | None:  # fmt: skip
    """The per-class gallery of the image runs that share the most common dataset, size and seed."""
    from .data import load_dataset
    from .errors import SelfcamError
    from .explainers import explain

    grouped: dict[tuple, dict[str, Any]] = {}
    for name, (model, doc) in loaded.items():
        data, train = doc.get("data") or {}, doc.get("train") or {}
        if not data.get("name"):
            notes.append(f"gallery: run {name} left out (no dataset name recorded)")
            continue
        key = (data["name"], data.get("size"), data.get("seed", train.get("seed", 0)))  # the generator's seed
        grouped.setdefault(key, {})[name] = model
    if not grouped or per_class < 1:
        return None
    (spec, size, seed), models = max(grouped.items(), key=lambda kv: len(kv[1]))
    for key, other in grouped.items():
        if key != (spec, size, seed):
            notes.append(f"gallery: runs {', '.join(other)} left out (trained on {key[0]} at {key[1]} px, data seed "
                         f"{key[2]}; the gallery shows {spec} at {size} px, data seed {seed})")  # fmt: skip
    try:
        n = 20 * per_class * max(m.config.num_classes for m in models.values()) if spec == "cluttered-digits" else None
        data = load_dataset(spec, "test", n, seed=seed, size=size)
        idx = spread_over_classes(data.labels, per_class * len(torch.as_tensor(data.labels).unique()))
        items = [data[i] for i in idx]
        images = torch.stack([raw_item(data, i, it) for i, it in zip(idx, items)])
    except (SelfcamError, OSError) as e:
        notes.append(f"gallery: test images of {spec} unavailable ({e})")
        return None
    x = torch.stack([it[0] for it in items])
    labels = torch.stack([torch.as_tensor(it[1]) for it in items])
    boxes = torch.stack([it[2] for it in items]) if len(items[0]) > 2 else None
    maps, preds = {}, {}
    for name, model in models.items():
        if model.config.in_chans != x.shape[1]:
            notes.append(f"gallery: run {name} left out (takes {model.config.in_chans} channels, {spec} has {x.shape[1]})")
            continue
        for method in ("self", *(methods if model.config.method == "plain" else ())):
            e = explain(model, x, method=method)
            logits, m = e.logits, e.maps
            head = model.config.method
            column = (name if name == head else f"{name} ({head})") if method == "self" else f"{name}/{method}"
            maps[column], preds[column] = m.cpu(), logits.argmax(dim=1).cpu()
    if not maps:
        return None
    return Gallery(images=images, labels=labels, maps=maps, predictions=preds, boxes=boxes,
                   class_names=list(getattr(data, "class_names", []) or []) or None)  # fmt: skip


def _test_data(model: torch.nn.Module, doc: dict, n: int) -> tuple[str, Any]:
    """``(spec, the first n test items of the run's recorded data)`` (:meth:`selfcam.tasks.Task.run_data`);
    :class:`_Skip` when they cannot be built or read here."""
    from .errors import SelfcamError
    from .tasks import task_of

    try:
        return task_of(model).run_data(doc, "test", n)
    except (SelfcamError, *_UNAVAILABLE) as e:
        spec = (doc.get("data") or {}).get("name")
        raise _Skip(f"test data of {spec} unavailable here: {e}" if spec else "no dataset name recorded") from e


def _run_maps(model: torch.nn.Module, doc: dict, per_class: int) -> AttributeMaps | list[ClipMaps]:
    """Attribute runs: each attribute's map of the first ``2 * per_class`` test images. Video and ASD
    runs: per-frame maps of ``2 * per_class`` test clips spread over the classes (of the first ``16 * per_class``)."""
    from .errors import SelfcamError

    k = 2 * per_class
    spec, data = _test_data(model, doc, k if doc["task"] == "attributes" else 8 * k)
    try:
        if doc["task"] == "attributes":
            return attribute_maps(model, data, range(min(k, len(data))), spec)
        return clip_maps(model, data, spread_over_classes(getattr(data, "labels", range(len(data))), k), spec)
    except SelfcamError as e:
        raise _Skip(str(e)) from e


def explain_runs(runs: dict[str, Path], per_class: int = 2, methods: Sequence[str] = (),
                 notes: list[str] | None = None) -> RunMaps:  # fmt: skip
    """Load every run once and compute the maps the report shows, on test data regenerated from
    what each run recorded (``config.json``'s ``data``: name, seed, size, frames, attribute names).

    Image runs: :func:`gallery_from_runs`' per-class gallery. Attribute runs: each attribute's map of
    the first ``2 * per_class`` test images. Video and ASD runs: per-frame maps of ``2 * per_class``
    test clips spread over the classes, picked among the first ``16 * per_class``. A run that does not load, records no dataset, whose data cannot be
    built or read on this machine or does not fit the model is left out with a line in ``notes``.
    """
    notes = notes if notes is not None else []
    found = RunMaps()
    if per_class < 1 or not runs:
        return found
    loaded = _load_runs(runs, notes)
    image = {name: run for name, run in loaded.items() if run[1]["task"] == "image"}
    found.gallery = _image_gallery(image, per_class, methods, notes) if image else None
    for name, (model, doc) in loaded.items():
        task = doc["task"]
        if task == "image":
            continue
        try:
            if task == "attributes":
                found.attributes[name] = _run_maps(model, doc, per_class)
            elif task in ("video", "asd"):
                found.clips[name] = _run_maps(model, doc, per_class)
            else:
                notes.append(f"gallery: run {name} left out (the report draws no maps of {task} runs)")
        except _Skip as e:
            notes.append(f"gallery: run {name} left out ({e})")
        except _UNAVAILABLE as e:  # the model does not take the recorded data
            notes.append(f"gallery: run {name} left out (its test data does not fit the model: {type(e).__name__}: {e})")
    return found


def gallery_from_runs(runs: dict[str, Path], per_class: int = 2, methods: Sequence[str] = (),
                      notes: list[str] | None = None) -> Gallery | None:  # fmt: skip
    """A per-class gallery for the image run directories that share the most common dataset and size.

    Test images come from ``load_dataset(data.name, "test", ...)`` (the generator with the run's
    training seed); each run adds its own map (column ``RUN (HEAD)``, or ``RUN`` when the run is
    named after its head), and each ``plain`` run the post-hoc ``methods`` (``RUN/METHOD``). Runs
    that cannot be loaded, are not image runs (see :func:`explain_runs` for those) or do not fit the
    data are skipped with a note in ``notes``; returns ``None`` when no gallery can be made.
    """
    notes = notes if notes is not None else []
    loaded = _load_runs(runs, notes)
    others = [name for name, (_, doc) in loaded.items() if doc["task"] != "image"]
    if others:
        notes.append(f"gallery: runs {', '.join(others)} left out (not image runs; explain_runs draws their maps)")
    return _image_gallery({n: r for n, r in loaded.items() if n not in others}, per_class, methods, notes)


def _run_figures(maps: RunMaps) -> list[tuple[str, str]]:
    """(caption, data URI) of :func:`explain_runs`' attribute sheets and clip strips."""
    figures = []
    for name, a in maps.attributes.items():
        outline = "green outline: the attribute's mask; " if a.masks.any() else "(this data has no attribute masks); "
        figures.append((f"Gallery, run {name}: per-attribute SE-CAM maps of {len(a.images)} test images of {a.data}: a "
                        f"row per image, the input then each attribute's own map over it; {outline}under each map: "
                        "predicted probability (truth), red when wrong",
                        render.png_data_uri(render.attribute_sheet(a.images, a.maps, a.masks, a.probs, a.attrs, a.names))))  # fmt: skip
    for name, clips in maps.clips.items():
        for clip in clips:
            boxes = ", boxes in green" if clip.boxes is not None else ""
            figures.append((f"Gallery, run {name}: test {clip.caption} (frames over their per-frame SE-CAM maps{boxes})",
                            render.png_data_uri(render.frame_strip(clip.frames, clip.maps, clip.boxes))))  # fmt: skip
    return figures


def build_report(paths: Sequence[str | Path], out: str | Path, *, title: str | None = None, per_class: int = 2,
                 methods: Sequence[str] = ()) -> Path:  # fmt: skip
    """One self-contained HTML page from run (any task), evaluation and demo (digits, faces, ASD)
    directories (see :func:`read_sources`).

    Metrics: each demo's ``metrics.json`` (digits: a row per model; faces: the mean over attributes;
    ASD: the test metrics with real and with silent audio) and each evaluation's ``RUN/METHOD`` results
    (prefixed with the directory name when there are several sources). Tables: one summary row per
    run; per-attribute metrics (faces), modality importance and the silence check (ASD); stability
    per method. Configuration: every run's ``config.json``, every demo's recipe and every evaluation's
    settings. Figures: training curves (``history.json``), deletion / insertion curves, stability
    matrices and the sanity check when the evaluation stored them, the ASD demo's modality importance,
    and maps of test inputs (``per_class``; 0: none; see :func:`explain_runs`): a per-class gallery of
    image runs, a per-attribute sheet of attribute runs, per-frame strips of video and ASD clips.
    What cannot be drawn here is said in a note at the top. Writes ``out``.
    """
    from .checkpoint import read_config

    src = read_sources(paths)
    several = len(src.evaluations) + len(src.demos) > 1
    notes: list[str] = []
    models: dict[str, dict] = {}
    tables: list[tuple[str, dict]] = []
    figures: list[tuple[str, str]] = []
    config: dict[str, Any] = {}
    datasets = []
    documents = [(name, doc, "demo") for name, doc in src.demos.items()] + [(n, d, "evaluation") for n, d in src.evaluations.items()]
    for name, doc, kind in documents:  # one family: demos are evaluations with their recipe
        prefix = f"{name}/" if several else ""
        for rows, more_tables, more_figures in (_evaluation_parts(name, doc, prefix), _task_parts(name, doc, prefix, notes)):
            models.update(rows)
            tables += more_tables
            figures += more_figures
        datasets.append(doc.get("dataset"))
        if kind == "demo" and isinstance(doc.get("recipe"), dict):
            config[f"{name} (demo recipe)"] = {**doc["recipe"], "train_seconds": doc.get("train_seconds")}
        else:
            config[f"{name} (evaluation)"] = {k: doc.get(k) for k in ("task", "dataset", "split", "n_items", "config") if k in doc}
    run_rows, history = {}, {}
    for name, path in src.runs.items():
        doc = read_config(path)
        h = _history(path, notes)
        if h:
            history[name] = h
        run_rows[name] = _run_row(doc, h)
        config[name] = {**doc, "model": asdict(doc["model"])}
    if not any(r["frames"] is not None for r in run_rows.values()):
        for r in run_rows.values():
            del r["frames"]
    tables.insert(0, ("Runs", run_rows))
    maps = explain_runs(src.runs, per_class, methods, notes)  # loads the models; what follows only draws
    names = [*src.demos, *src.evaluations, *src.runs]
    return render.write_report(out, title=title or f"selfcam report: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}",
                               metrics={"dataset": ", ".join(dict.fromkeys(str(d) for d in datasets if d)) or None,
                                        "models": models},
                               gallery=maps.gallery, config=config, history=history or None,
                               figures=[*_run_figures(maps), *figures], tables=tables, notes=notes)  # fmt: skip
