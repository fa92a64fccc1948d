"""Explain image files with a trained run: the self-explanation and post-hoc maps, side by side.

:func:`find_images` turns files and directories into a sorted list of image files (and the
files it skipped); :class:`Preprocess` reads one file the way the run was trained (channels,
centred square crop, resize, normalization); :func:`explain_images` runs a model over a batch
of normalized images and returns logits, scores and every requested map; :func:`selfcam.render.panel`
draws one image's maps in a row; :func:`explain_files` does all of it and writes
``OUT/<stem>.png`` per image plus ``OUT/predictions.json``. :func:`explain_videos` explains video
files with video and ASD runs (an overlay MP4, a GIF and the per-frame maps per file).

Normalization statistics, in order: ``doc["data"]["mean"/"std"]`` when the run stored them;
the cluttered-digits ``MEAN``/``STD`` when the run was trained on ``cluttered-digits``;
ImageNet's for 3 channels; 0.5 / 0.5 for 1 channel.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from .data import MEAN as DIGITS_MEAN
from .data import STD as DIGITS_STD
from .data.base import image_problem
from .data.transforms import Transform
from .errors import ConfigError, InputError, OutputError, SelfcamError, require_int
from .safeio import check_regular, held_signals, load_image, read_json, sigterm_as_interrupt
from . import explainers
from .model import SelfExplainer
from .checkpoint import CONFIG
from .posthoc import POSTHOC_METHODS
from .render import clip_frames, frame_strip, gif_bytes, importance_rows, panel

__all__ = [
    "IMAGE_SUFFIXES",
    "AttributeMaps",
    "ClipMaps",
    "Preprocess",
    "Explanations",
    "attribute_maps",
    "clip_maps",
    "explain_files",
    "explain_images",
    "explain_items",
    "explain_videos",
    "find_images",
    "find_videos",
    "raw_item",
    "spread_over_classes",
]

# torchvision's ImageFolder extensions, plus GIF
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
Progress = Callable[[Iterable[Any], int], Iterable[Any]]


def find_images(paths: Sequence[str | Path]) -> tuple[list[Path], list[Path]]:
    """Image files named by ``paths`` (files, or directories searched recursively, sorted).

    Returns ``(images, skipped)``: ``skipped`` lists the files inside directories that are not
    readable images. A file given explicitly that is not an image, a missing path or a
    directory without images raises :class:`InputError` naming it.
    """
    images: list[Path] = []
    skipped: list[Path] = []
    if not paths:
        raise InputError("no images given")
    for given in map(Path, paths):
        if given.is_dir():
            found = []
            for f in sorted(p for p in given.rglob("*") if p.is_file() or (p.exists() and not p.is_dir())):  # special files: skipped
                ok = f.suffix.lower() in IMAGE_SUFFIXES and image_problem(f) is None
                (found if ok else skipped).append(f)
            if not found:
                raise InputError(f"{given}: directory holds no images ({', '.join(IMAGE_SUFFIXES)})")
            images += found
        elif given.exists() and not given.is_file():
            check_regular(given)  # a FIFO or a device given by name: refused, never opened
        elif given.is_file():
            reason = image_problem(given)
            if reason is not None:
                raise InputError(f"{given}: not an image file Pillow can read ({reason})")
            images.append(given)
        else:
            raise InputError(f"{given}: no such file or directory")
    return images, skipped


def _stats(value: Any, what: str, source: str) -> tuple[float, ...]:
    values = [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    if not isinstance(values, list) or not values or not all(isinstance(v, (int, float)) for v in values):
        raise ConfigError(f"{source}: data.{what} must be a number or a list of numbers, got {value!r}")
    return tuple(float(v) for v in values)


@dataclass(frozen=True)
class Preprocess:
    """How a run's images are fed: ``in_chans`` channels, ``size x size`` pixels, per-channel mean/std.

    A file is decoded with Pillow (EXIF orientation applied), converted to ``L`` (1 channel) or
    ``RGB`` (3), then cropped to its centred square and resized (bilinear, antialiased), as the
    dataset readers of :mod:`selfcam.data` do.
    """

    in_chans: int
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.in_chans not in (1, 3):
            raise ConfigError(f"image files can feed 1- or 3-channel models, this one takes {self.in_chans} channels")
        transform = Transform(self.size, self.mean, self.std).for_channels(self.in_chans)
        object.__setattr__(self, "_transform", transform)
        object.__setattr__(self, "mean", transform.mean)  # one value per channel from here on
        object.__setattr__(self, "std", transform.std)

    @classmethod
    def from_config(cls, doc: dict[str, Any], size: int | None = None, source: str = CONFIG) -> Preprocess:
        """From a run's config (as :func:`selfcam.load_checkpoint` returns it); ``size`` overrides ``data.size``."""
        data = doc.get("data") if isinstance(doc.get("data"), dict) else {}
        in_chans = doc["model"].in_chans
        if size is None:
            size = data.get("size")
            if size is None:
                raise ConfigError(f"{source}: the run does not record its image size (data.size); pass --size")
        require_int("size", size)
        if "mean" in data and "std" in data:
            mean, std = _stats(data["mean"], "mean", source), _stats(data["std"], "std", source)
        elif data.get("name") == "cluttered-digits":
            mean, std = (DIGITS_MEAN,), (DIGITS_STD,)
        elif in_chans == 3:
            mean, std = IMAGENET_MEAN, IMAGENET_STD
        else:
            mean, std = (0.5,), (0.5,)
        try:
            return cls(in_chans, size, mean, std)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from e

    def load(self, path: str | Path) -> Tensor:
        """One image file -> float32 ``(C, size, size)`` in [0, 1] (not normalized)."""
        # the one loader of training and evaluation too (regular files, pixel budget, EXIF, JPEG draft);
        # InputError "PATH: cannot decode image (why)" for whatever Pillow raised
        pixels = load_image(path, "L" if self.in_chans == 1 else "RGB", self.size)
        chw = torch.from_numpy(pixels.reshape(*pixels.shape[:2], -1)).permute(2, 0, 1)
        return self._transform.prepare(chw)  # type: ignore[attr-defined]

    def normalize(self, images: Tensor) -> Tensor:
        """``(..., C, H, W)`` in [0, 1] -> ``(x - mean) / std`` per channel."""
        return self._transform.normalize(images)  # type: ignore[attr-defined]


@dataclass
class Explanations:
    """What :func:`explain_images` returns for ``N`` images.

    logits ``(N, classes)``; maps: method -> ``(N, H, W)`` in [0, 1] at input size (``(N, A, H, W)``
    for an attribute model), ``"self"`` first (the head's own map), then each post-hoc method for
    class ``pred``. pred ``(N,)`` int64 and score ``(N,)`` its softmax probability; for an attribute
    model pred ``(N, A)`` bool (present) and score ``(N, A)`` sigmoid probabilities. All on the CPU.
    """

    logits: Tensor
    pred: Tensor
    score: Tensor
    maps: dict[str, Tensor]


def check_methods(model: nn.Module, methods: Sequence[str]) -> tuple[str, ...]:
    """Validate the post-hoc methods added beside ``model``'s own map (:func:`selfcam.explainers.check_methods`)."""
    unknown = [m for m in methods if m not in POSTHOC_METHODS]
    if unknown:
        raise ConfigError(f"unknown post-hoc method(s) {', '.join(unknown)}; choose from {', '.join(POSTHOC_METHODS)}")
    return explainers.check_methods(model, methods)


def explain_images(
    model: SelfExplainer,
    images: Tensor,
    methods: Sequence[str] = (),
    *,
    batch_size: int = 32,
    progress: Progress | None = None,
) -> Explanations:
    """Normalized images ``(N, C, H, W)`` -> :class:`Explanations` (self map and ``methods``' maps).

    Runs in batches of ``batch_size`` on the model's device.
    """
    methods = check_methods(model, methods)
    require_int("batch_size", batch_size)
    if images.dim() != 4 or len(images) == 0:
        raise InputError(f"expected a non-empty batch (N, C, H, W), got shape {tuple(images.shape)}")
    model.eval()
    device = next(model.parameters()).device
    starts = range(0, len(images), batch_size)
    parts: dict[str, list[Tensor]] = {"logits": [], "self": [], **{m: [] for m in methods}}
    for i in progress(starts, len(starts)) if progress else starts:
        x = images[i : i + batch_size].to(device)
        own = explainers.explain(model, x)
        parts["logits"].append(own.logits.cpu())
        parts["self"].append(own.maps.cpu())
        for m in methods:
            with contextlib.redirect_stderr(io.StringIO()) if m == "scorecam" else contextlib.nullcontext():
                parts[m].append(explainers.explain(model, x, method=m).maps.cpu())  # Score-CAM: no tqdm bar per image
    logits = torch.cat(parts.pop("logits")).float()
    if model.task == "attributes":
        score = torch.sigmoid(logits)
        pred = score > 0.5
    else:
        score, pred = torch.softmax(logits, dim=1).max(dim=1)
    return Explanations(logits, pred, score, {k: torch.cat(v) for k, v in parts.items()})


def _unique_names(files: Sequence[Path], kinds: Callable[[str], Sequence[str]] = lambda stem: (f"{stem}.png",)) -> list[str]:
    """``kinds(stem)``'s first name (``<stem>.png``) for each file; a stem whose output files (any of
    ``kinds(stem)``, compared case-insensitively, for case-insensitive file systems) another file already
    has, or that would be ``predictions.json``, gets ``-2``, ``-3``... until none is taken."""
    taken = {PREDICTIONS.casefold()}
    names = []
    for f in files:
        stem, n = f.stem, 1
        while any(k.casefold() in taken for k in kinds(stem if n == 1 else f"{stem}-{n}")):
            n += 1
        chosen = kinds(stem if n == 1 else f"{stem}-{n}")
        taken.update(k.casefold() for k in chosen)
        names.append(chosen[0])
    return names


def _names(doc: dict[str, Any], k: int) -> list[str]:
    """The run's class (or attribute) names, ``doc["data"]["class_names"]``, else ``"0"``, ``"1"``..., ``k`` of them."""
    stored = (doc.get("data") or {}).get("class_names")
    names = [str(c) for c in stored] if isinstance(stored, list) else []
    return [names[c] if c < len(names) else str(c) for c in range(k)]


PREDICTIONS = "predictions.json"  # also what makes an --out folder one that selfcam explain wrote: its manifest
_PARTIAL = ".selfcam-partial-"  # a run's files before they are moved into place


def check_explain_out(out: str | Path, inputs: Iterable[str | Path] = ()) -> None:
    """OutputError unless ``out`` is absent, an empty folder, or a folder ``selfcam explain`` wrote (its
    manifest ``predictions.json``: a list of selfcam's records, each naming its output files); and unless
    no input lies in it (or is it): an explanation never overwrites its own input."""
    out = Path(out)
    root = out.resolve()
    for given in map(Path, inputs):
        where = given.resolve()
        if where == root or root in where.parents:
            what = "is" if where == root else "holds"
            raise OutputError(f"{out}: --out {what} the input {given}; explanations would overwrite their inputs: "
                              "choose another folder (nothing was written)")  # fmt: skip
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputError(f"{out}: --out is a file, not a folder; refused (nothing was written)")
    entries = [e for e in out.iterdir() if not e.name.startswith(_PARTIAL)]  # a killed run's leftovers are ours
    if not entries:
        return
    try:
        doc = read_json(out / PREDICTIONS, OutputError)
    except (SelfcamError, OSError):
        doc = None
    if isinstance(doc, list) and doc and all(isinstance(r, dict) and ("output" in r or "overlay" in r) for r in doc):
        return
    raise OutputError(f"{out}: --out is a folder selfcam explain did not create (no selfcam {PREDICTIONS} in it); refused, nothing in it is changed: choose a new or empty folder")  # fmt: skip


class _Outputs:
    """Files written for ``out``: all of them, plus ``predictions.json``, or (on any failure) none.

    ``out`` must be new, empty, or written by selfcam explain before, and hold none of ``inputs``
    (:func:`check_explain_out`). The files go into a hidden folder inside ``out`` first (``self.out``);
    only when everything is written are they moved into place, ``predictions.json`` last, with SIGINT and SIGTERM held off meanwhile. A failure (or SIGINT, or SIGTERM, which raises
    KeyboardInterrupt while this is open) removes the hidden folder: what ``out`` held stays as it was.
    """

    def __init__(self, out: str | Path, inputs: Iterable[str | Path] = ()) -> None:
        self.final = Path(out)
        check_explain_out(self.final, inputs)
        self.created = not self.final.exists()
        self.final.mkdir(parents=True, exist_ok=True)
        self.out = Path(tempfile.mkdtemp(dir=self.final, prefix=_PARTIAL))
        self.records: list[dict[str, Any]] = []
        self.written: list[Path] = []
        self._sigterm: contextlib.AbstractContextManager[None] = sigterm_as_interrupt()

    def image(self, name: str, picture: Any) -> None:
        Image.fromarray(picture).save(self.out / name)
        self.written.append(self.out / name)

    def gif(self, name: str, frames: Sequence[Any], duration_ms: int) -> None:
        (self.out / name).write_bytes(gif_bytes(frames, duration_ms))
        self.written.append(self.out / name)

    def __enter__(self) -> _Outputs:
        self._sigterm.__enter__()
        return self

    def __exit__(self, kind: Any, *rest: Any) -> None:
        try:
            if kind is None:
                with held_signals():  # all of it or (killed by SIGKILL only) the hidden folder
                    (self.out / PREDICTIONS).write_text(json.dumps(self.records, indent=2) + "\n", encoding="utf-8")
                    for f in sorted(self.out.iterdir(), key=lambda f: f.name == PREDICTIONS):  # the manifest last
                        os.replace(f, self.final / f.name)
                    self.out.rmdir()
        finally:
            shutil.rmtree(self.out, ignore_errors=True)  # a failure: nothing half-done, the earlier files untouched
            if kind is not None and self.created and not any(self.final.iterdir()):
                self.final.rmdir()
            self._sigterm.__exit__(kind, *rest)


def _panels(model: SelfExplainer, raw: Tensor, x: Tensor, methods: Sequence[str], names: list[str], alpha: float,
            titles: Sequence[str], batch_size: int) -> Iterator[tuple[Any, dict[str, Any]]]:  # fmt: skip
    """For each image: ``(panel, record)``: the input beside its maps (every attribute's, for an attribute
    model), under ``"TITLE: predicted ..."``; the record holds the prediction."""
    result = explain_images(model, x, methods, batch_size=batch_size)
    for j, title in enumerate(titles):
        if model.task == "attributes":
            probs = {n: round(float(p), 4) for n, p in zip(names, result.score[j])}
            present = [n for n, yes in zip(names, result.pred[j]) if yes]
            maps = {f"{n} (p={p:.2f})": m for (n, p), m in zip(probs.items(), result.maps["self"][j])}
            caption = f"{title}: attributes present: {', '.join(present) or 'none'} (each attribute's own map)"
            record: dict[str, Any] = {"attributes": probs, "present": present}
        else:
            c, p = int(result.pred[j]), float(result.score[j])
            maps = {f"self ({model.config.method})" if m == "self" else m: v[j] for m, v in result.maps.items()}
            caption = f"{title}: predicted {names[c]}, softmax {p:.3f}"
            record = {"class": c, "class_name": names[c], "score": p}
        yield panel(raw[j], maps, caption, alpha), record


def _check_options(model: SelfExplainer, methods: Sequence[str], batch_size: int, alpha: float) -> tuple[str, ...]:
    require_int("batch_size", batch_size)
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha must be in [0, 1], got {alpha}")
    return check_methods(model, methods)


def explain_files(
    model: SelfExplainer,
    doc: dict[str, Any],
    files: Sequence[str | Path],
    out_dir: str | Path,
    methods: Sequence[str] = (),
    *,
    batch_size: int = 32,
    alpha: float = 0.5,
    size: int | None = None,
    progress: Progress | None = None,
    source: str = CONFIG,
) -> list[dict[str, Any]]:
    """Explain image ``files`` with an image or attribute run (``model``, ``doc`` from :func:`selfcam.load_checkpoint`).

    Writes ``out_dir/<stem>.png`` per file (see :func:`selfcam.render.panel`) and
    ``out_dir/predictions.json``: a list of ``{"file", "output", "class", "class_name", "score"}``
    (attribute runs: ``{"file", "output", "attributes": {name: probability}, "present": [names]}``),
    which is also returned. Names come from ``doc["data"]["class_names"]`` when stored.
    ``source`` names the config file in error messages. Video and ASD runs: ``files`` are video
    files, see :func:`explain_videos`.
    """
    if getattr(model, "task", None) in ("video", "asd"):  # video files (image files are refused there)
        return explain_videos(model, doc, files, out_dir, methods, alpha=alpha, size=size, source=source)
    if getattr(model, "task", None) not in ("image", "attributes"):
        raise ConfigError(f"explain reads image files for image and attribute runs; this is a {getattr(model, 'task', '?')} "
                          "run: explain its clips from a dataset (explain_items, or `selfcam explain` without files)")  # fmt: skip
    methods = _check_options(model, methods, batch_size, alpha)
    prep = Preprocess.from_config(doc, size, source)
    names = _names(doc, model.config.num_classes)
    files = [Path(f) for f in files]
    outputs = _unique_names(files)
    starts = range(0, len(files), batch_size)
    with _Outputs(out_dir, files) as out:
        for i in progress(starts, len(starts)) if progress else starts:
            chunk = files[i : i + batch_size]
            raw = torch.stack([prep.load(f) for f in chunk])
            drawn = _panels(model, raw, prep.normalize(raw), methods, names, alpha, [f.name for f in chunk], batch_size)
            for j, (picture, record) in enumerate(drawn):
                out.image(outputs[i + j], picture)
                out.records.append({"file": str(chunk[j]), "output": outputs[i + j], **record})
    return out.records


# --- dataset items: the maps of a run on the data it was trained on (any task) ----------------------


def raw_item(data: Any, i: int, item: tuple | None = None) -> Tensor:
    """Item ``i`` of a dataset in [0, 1] (an image ``(C, H, W)`` or a clip's frames ``(T, C, H, W)``):
    ``raw(i)`` (on-disk datasets, clips), ``raw_images(i)`` (faces), ``images[i]`` (digits), else the
    normalized item undone with the dataset's mean and std."""
    if hasattr(data, "raw"):
        return data.raw(i)
    if hasattr(data, "raw_images"):
        return data.raw_images(i)
    if hasattr(data, "images"):
        return data.images[i]
    x = (item if item is not None else data[i])[0]
    mean, std = (torch.as_tensor(getattr(data, k), dtype=x.dtype).view(-1, 1, 1) for k in ("mean", "std"))
    return (x * std + mean).clamp(0, 1)


def spread_over_classes(labels: Any, n: int) -> list[int]:
    """``n`` indices, as many of each class as fit (classes ascending, first items of each class first)."""
    labels = torch.as_tensor(labels)
    if labels.ndim != 1:  # multi-label targets: the first n
        return list(range(min(n, len(labels))))
    per = math.ceil(n / max(1, len(labels.unique())))
    picked: dict[int, list[int]] = {}
    for i, c in enumerate(labels.tolist()):
        if len(picked.setdefault(c, [])) < per:
            picked[c].append(i)
    return [i for c in sorted(picked) for i in picked[c]][:n]


@dataclass
class AttributeMaps:
    """An attribute run's maps of ``G`` images: images ``(G, 3, H, W)`` in [0, 1]; maps and masks
    ``(G, A, H, W)`` (masks bool, all False where the data has none); probs and attrs ``(G, A)``;
    names: the ``A`` attributes; data: the dataset spec."""

    images: Tensor
    maps: Tensor
    masks: Tensor
    probs: Tensor
    attrs: Tensor
    names: list[str]
    data: str


@dataclass
class ClipMaps:
    """One clip of a video or ASD run: frames ``(T, C, H, W)`` in [0, 1], C in {1, 3}; maps ``(T, H, W)``
    in [0, 1]; boxes ``(T, 4)`` (x0, y0, x1, y1 exclusive) or None; caption: what to say of it;
    record: the prediction, as :func:`explain_items` stores it."""

    frames: Tensor
    maps: Tensor
    boxes: Tensor | None
    caption: str
    record: dict[str, Any]


def _fits(model: nn.Module, x: Tensor, spec: str) -> None:
    chans = model.config.in_chans
    if x.shape[-3] != chans:
        raise ConfigError(f"the model takes {chans} channel(s); {spec} has {x.shape[-3]}")


def attribute_maps(model: SelfExplainer, data: Any, idx: Sequence[int], spec: str) -> AttributeMaps:
    """Each attribute's map of items ``idx`` of an attribute dataset ``data`` (named ``spec``)."""
    items = [data[i] for i in idx]
    x = torch.stack([it[0] for it in items])
    attrs = torch.stack([torch.as_tensor(it[1]) for it in items]).float()
    _fits(model, x, spec)
    if attrs.ndim != 2 or attrs.shape[1] != model.config.num_classes:
        raise ConfigError(f"the model gives {model.config.num_classes} attributes; {spec} has labels of shape {tuple(attrs.shape[1:])}")
    masks = (torch.stack([it[2] for it in items]).bool() if len(items[0]) > 2
             else torch.zeros(len(items), attrs.shape[1], *x.shape[-2:], dtype=torch.bool))  # fmt: skip
    images = torch.stack([raw_item(data, i, it) for i, it in zip(idx, items)])
    with torch.no_grad():
        out = model.eval().explain(x.to(next(model.parameters()).device))
    names = [str(n) for n in (getattr(data, "class_names", None) or range(attrs.shape[1]))]
    return AttributeMaps(images=images.expand(-1, 3, -1, -1), maps=out.heatmap.cpu(), masks=masks,
                         probs=torch.sigmoid(out.logits).cpu(), attrs=attrs, names=names, data=spec)  # fmt: skip


def clip_maps(model: nn.Module, data: Any, idx: Sequence[int], spec: str) -> list[ClipMaps]:
    """Per-frame maps of clips ``idx`` of a video or ASD dataset ``data`` (named ``spec``)."""
    asd = model.task == "asd"
    items = [data[i] for i in idx]
    batch = torch.utils.data.default_collate(items)
    _fits(model, batch[0], spec)
    device = next(model.parameters()).device
    with torch.no_grad():
        inputs = (batch[0], batch[1]) if asd else (batch[0],)
        out = model.eval().explain(*(t.to(device) for t in inputs))
    names = [str(c) for c in getattr(data, "class_names", None) or ()]

    def cls(c: int) -> str:
        return names[c] if 0 <= c < len(names) else str(c)

    clips = []
    where = 4 if asd else 2  # the boxes' place in an item: mouth boxes (ASD), the object's boxes (video)
    for j, (i, item) in enumerate(zip(idx, items)):
        true = int(item[2] if asd else item[1])
        if asd:
            importance = {k: round(float(v[j]), 4) for k, v in out.importance.items()}
            record = {"true": cls(true), "score": float(out.score[j]), "frame_labels": item[3].tolist(),
                      "frame_scores": [round(v, 3) for v in out.frame_score[j].tolist()], "importance": importance}  # fmt: skip
            what = (f"true: {cls(true)}, speaking score {record['score']:.2f}; frame labels {record['frame_labels']}, "
                    f"frame scores {[round(v, 1) for v in record['frame_scores']]}; audio/face importance "
                    f"{importance.get('audio', float('nan')):.3f}/{importance.get('face', float('nan')):.3f}")  # fmt: skip
        else:
            prob = torch.softmax(out.logits[j].float(), 0)
            pred = int(prob.argmax())
            record = {"true": cls(true), "class": pred, "class_name": cls(pred), "score": float(prob[pred])}
            what = f"true: {cls(true)}, predicted: {cls(pred)} (p={record['score']:.2f})"
        clips.append(ClipMaps(frames=raw_item(data, i, item), maps=out.heatmap[j].cpu(),
                              boxes=item[where] if len(item) > where else None,
                              caption=f"clip {i} of {spec}: {what}", record=record))  # fmt: skip
    return clips


def explain_items(
    model: nn.Module,
    doc: dict[str, Any],
    out_dir: str | Path,
    *,
    data: str | None = None,
    split: str = "test",
    n: int = 8,
    methods: Sequence[str] = (),
    batch_size: int = 32,
    alpha: float = 0.5,
    fps: float = 25,
) -> list[dict[str, Any]]:
    """Explain ``n`` items of a dataset with a run of any task: ``data`` (default: the data the run was
    trained on, rebuilt as :meth:`selfcam.tasks.Task.run_data` does) for ``split``, spread over the classes.

    Image and attribute runs: ``out_dir/item-<i>.png`` panels as :func:`explain_files` draws them.
    Video and ASD runs: ``out_dir/clip-<i>.png`` (frames over their per-frame maps, ground-truth boxes
    in green; ASD: a bar per modality's importance below) and ``out_dir/clip-<i>.gif`` (frame | map, 4x slower than ``fps``). Also
    ``out_dir/predictions.json``: one record per item (``"item"``, ``"output"``, the prediction), returned.
    """
    from .tasks import task_of

    require_int("n", n)
    task = task_of(model)
    on_disk = ":" in str(data or (doc.get("data") or {}).get("name") or "")  # KIND:PATH: the whole split, not 16 n items
    spec, dataset = task.run_data(doc, split, spec=data, n=None if task.name == "image" or on_disk else 16 * n)
    if len(dataset) == 0:
        raise InputError(f"{spec} ({split}) holds no items")
    idx = spread_over_classes(getattr(dataset, "labels", range(len(dataset))), n)
    with _Outputs(out_dir, [spec.split(":", 1)[1]] if ":" in spec else []) as out:  # KIND:PATH: never written over
        if task.name in ("video", "asd"):
            for clip, i in zip(clip_maps(model, dataset, idx, spec), idx):
                strip = frame_strip(clip.frames, clip.maps, clip.boxes)
                if "importance" in clip.record:  # ASD: the modality importance under the frames
                    strip = np.concatenate([strip, importance_rows(clip.record["importance"], strip.shape[1])])
                out.image(f"clip-{i}.png", strip)
                out.gif(f"clip-{i}.gif", clip_frames(clip.frames, clip.maps, clip.boxes), int(1000 * 4 / fps))
                out.records.append({"item": i, "output": f"clip-{i}.png", "gif": f"clip-{i}.gif", "caption": clip.caption, **clip.record})
            return out.records
        methods = _check_options(model, methods, batch_size, alpha)
        items = [dataset[i] for i in idx]
        x = torch.stack([it[0] for it in items])
        _fits(model, x, spec)
        raw = torch.stack([raw_item(dataset, i, it) for i, it in zip(idx, items)])
        names = _names(doc, model.config.num_classes)
        drawn = _panels(model, raw, x, methods, names, alpha, [f"item {i} of {spec}" for i in idx], batch_size)
        for i, it, (picture, record) in zip(idx, items, drawn):
            out.image(f"item-{i}.png", picture)
            truth = torch.as_tensor(it[1])
            true = ({"true_present": [names[a] for a in range(len(names)) if truth[a] > 0.5]} if truth.ndim
                    else {"true": names[int(truth)] if 0 <= int(truth) < len(names) else str(int(truth))})  # fmt: skip
            out.records.append({"item": i, "output": f"item-{i}.png", **true, **record})
    return out.records


# --- video files: overlay MP4, GIF, per-frame maps and predictions of a video or ASD run ---------------

GIF_MAX_FRAMES = 100  # a file's GIF shows at most this many of its frames, evenly spaced, at the file's speed


def find_videos(paths: Sequence[str | Path], task: str = "video") -> list[Path]:
    """Video files named by ``paths`` (files, or directories searched recursively for
    :data:`~selfcam.data.videos.VIDEO_SUFFIXES`, sorted). An image file, a file of another kind, a missing
    path or a directory without videos raises :class:`InputError` naming it (a ``task`` run explains videos)."""
    from .data.videos import VIDEO_SUFFIXES

    if not paths:
        raise InputError("no video files given")
    kinds = ", ".join(VIDEO_SUFFIXES)
    videos: list[Path] = []
    for given in map(Path, paths):
        if given.is_dir():
            found = sorted(p for p in given.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
            if not found:
                raise InputError(f"{given}: directory holds no video files ({kinds})")
            videos += found
        elif given.exists() and not given.is_file():
            check_regular(given)  # a FIFO or a device given by name: refused, never opened
        elif not given.is_file():
            raise InputError(f"{given}: no such file or directory")
        elif given.suffix.lower() in IMAGE_SUFFIXES:
            run = "an ASD run" if task == "asd" else f"a {task} run"
            raise InputError(f"{given}: an image file, and this is {run}: it explains video files ({kinds}), "
                             "or, without files, clips of its data")  # fmt: skip
        elif given.suffix.lower() not in VIDEO_SUFFIXES:
            raise InputError(f"{given}: not a video file ({kinds})")
        else:
            videos.append(given)
    return videos


def _window_audio(samples: np.ndarray, start: float, t0: float, rate: int, length: int) -> tuple[Tensor, int]:
    """``length`` samples of ``samples`` (which begin at ``start`` s) from time ``t0``, zero-padded where the
    track does not reach; returns (wave (length,), how many samples were padded)."""
    i0 = round((t0 - start) * rate)
    wave = np.zeros(length, np.float32)
    lo, hi = max(i0, 0), min(i0 + length, len(samples))
    if hi > lo:
        wave[lo - i0 : hi - i0] = samples[lo:hi]
    return torch.from_numpy(wave), length - max(0, hi - lo)


def _video_windows(frames: Iterable[tuple[Tensor, float]], t: int) -> Iterator[tuple[list[int], Tensor, list[float], int]]:
    """Consecutive windows of ``t`` frames of a stream of ``(frame (C, S, S), time)``:
    ``(frame indices, frames (t, C, S, S), their times, first new frame)``. Frames ``[k t, (k + 1) t)``
    make window k; the ``r`` frames left at the end go in a last window made of the file's last ``t``
    frames (only its last ``r`` are new); a file shorter than ``t`` is one window of its frames sampled
    uniformly (:func:`~selfcam.data.videos.sample_indices`: frames repeat)."""
    from collections import deque

    from .data.videos import sample_indices

    recent: deque[tuple[int, Tensor, float]] = deque(maxlen=t)
    done = 0  # frames explained so far
    count = 0
    for i, (frame, time) in enumerate(frames):
        recent.append((i, frame, time))
        count = i + 1
        if count - done == t:
            yield [j for j, _, _ in recent], torch.stack([f for _, f, _ in recent]), [s for _, _, s in recent], 0
            done = count
    if count == done:
        return
    if count >= t:  # the tail: the last t frames, of which the last count - done are new
        yield [j for j, _, _ in recent], torch.stack([f for _, f, _ in recent]), [s for _, _, s in recent], t - (count - done)
    else:
        pick = sample_indices(count, t)
        kept = list(recent)
        yield pick, torch.stack([kept[j][1] for j in pick]), [kept[j][2] for j in pick], 0


def _explain_video(model: nn.Module, doc: dict[str, Any], path: Path, stem: str, out: _Outputs, prep: Preprocess,
                   names: list[str], alpha: float) -> dict[str, Any]:  # fmt: skip
    """Explain one video file; writes ``<stem>-explained.mp4``, ``<stem>.gif``, ``<stem>.maps.safetensors``;
    returns its ``predictions.json`` record."""
    from safetensors.torch import save_file

    from .data.videos import VideoWriter, probe_video, read_audio, video_frames
    from .render.images import tile
    from .safeio import MAX_FRAMES

    asd = model.task == "asd"
    c = model.config
    t = int(c.frames or (doc.get("data") or {}).get("frames") or 8)
    count, fps, _, _ = probe_video(path)
    if count > MAX_FRAMES:
        raise InputError(f"{path}: {count} frames, over the {MAX_FRAMES:,} frames selfcam explains per file "
                         f"(safeio.MAX_FRAMES); cut it first, e.g. ffmpeg -i {path.name} -frames:v {MAX_FRAMES} part.mp4")  # fmt: skip
    if asd:
        audio = read_audio(path, c.sample_rate)
        if audio is None:
            raise InputError(f"{path}: no audio track; an ASD run needs each clip's sound (explain it with a video run, "
                             "or add the audio: ffmpeg -i video.mp4 -i sound.wav -c:v copy -shortest with-audio.mp4)")  # fmt: skip
        samples, audio_start = audio
    mode = "L" if prep.in_chans == 1 else "RGB"
    transform = prep._transform  # type: ignore[attr-defined]

    def prepared() -> Iterator[tuple[Tensor, float]]:
        for pixels, time in video_frames(path, mode):
            chw = torch.from_numpy(pixels.reshape(*pixels.shape[:2], -1)).permute(2, 0, 1)
            yield transform.prepare(chw), time

    s = prep.size
    scale = max(2, math.ceil(128 / s))
    scale += (scale * s) % 2  # even sides for yuv420p
    step = max(1, math.ceil(count / GIF_MAX_FRAMES))
    device = next(model.parameters()).device
    files = {"overlay": f"{stem}-explained.mp4", "gif": f"{stem}.gif", "maps": f"{stem}.maps.safetensors"}
    out.written += [out.out / f for f in files.values()]
    maps: list[Tensor] = []
    per_frame: list[dict[str, Any]] = []
    windows: list[dict[str, Any]] = []
    gif: list[np.ndarray] = []
    probs: list[Tensor] = []
    model.eval()
    with VideoWriter(out.out / files["overlay"], fps) as writer:
        for w, (idx, frames, times, first) in enumerate(_video_windows(prepared(), t)):
            x = prep.normalize(frames)[None].to(device)
            with torch.no_grad():
                if asd:
                    wave, padded = _window_audio(samples, audio_start, times[0], c.sample_rate, t * c.samples_per_frame)
                    res = model.explain(x, wave[None].to(device))
                else:
                    res = model.explain(x)
            heat = res.heatmap[0].float().cpu()  # (t, S, S)
            if asd:
                importance = {k: round(float(v[0]), 4) for k, v in res.importance.items()}
                windows.append({"window": w, "start": idx[first], "stop": idx[-1] + 1, "score": round(float(res.score[0]), 4),
                                "importance": importance, "padded_audio_samples": padded})  # fmt: skip
                frame_scores = res.frame_score[0].float().cpu().tolist()
            else:
                p = torch.softmax(res.logits[0].float().cpu(), 0)
                probs.append(p)
                k = int(p.argmax())
                windows.append({"window": w, "start": idx[first], "stop": idx[-1] + 1, "class": k, "class_name": names[k],
                                "score": round(float(p[k]), 4)})  # fmt: skip
            seen: set[int] = set()
            for j in range(first, len(idx)):
                if idx[j] in seen:  # a short file's repeated frame: its first copy's map
                    continue
                seen.add(idx[j])
                maps.append(heat[j].half())
                rec: dict[str, Any] = {"frame": idx[j], "time": round(times[j], 4), "window": w}
                rec.update({"speaking_score": round(frame_scores[j], 4)} if asd else
                           {"class": windows[-1]["class"], "class_name": windows[-1]["class_name"], "score": windows[-1]["score"]})  # fmt: skip
                per_frame.append(rec)
                pic = np.concatenate([tile(frames[j], scale=scale), tile(frames[j], heat[j], alpha=alpha, scale=scale)], 1)
                writer.write(pic)
                if idx[j] % step == 0 and len(gif) < GIF_MAX_FRAMES:
                    gif.append(pic[::2, ::2] if scale > 2 else pic)
    (out.out / files["gif"]).write_bytes(gif_bytes(gif, max(20, round(1000 * step / fps))))
    save_file({"maps": torch.stack(maps), "frame_times": torch.tensor([r["time"] for r in per_frame], dtype=torch.float64)},
              str(out.out / files["maps"]), metadata={"file": str(path), "fps": str(fps), "window": str(t)})  # fmt: skip
    (out.out / files["maps"]).chmod(0o644)  # safetensors writes 0600
    record: dict[str, Any] = {"file": str(path), **files, "frames": len(per_frame), "fps": round(fps, 4), "window": t}
    if asd:
        record["score"] = round(float(np.mean([wd["score"] for wd in windows])), 4)
        record["importance"] = {k: round(float(np.mean([wd["importance"][k] for wd in windows])), 4) for k in windows[0]["importance"]}
        record["run_fps"] = c.fps
    else:
        mean = torch.stack(probs).mean(0)
        k = int(mean.argmax())
        record.update({"class": k, "class_name": names[k], "score": round(float(mean[k]), 4)})
    return {**record, "windows": windows, "per_frame": per_frame}


def explain_videos(
    model: nn.Module,
    doc: dict[str, Any],
    files: Sequence[str | Path],
    out_dir: str | Path,
    methods: Sequence[str] = (),
    *,
    alpha: float = 0.5,
    size: int | None = None,
    source: str = CONFIG,
) -> list[dict[str, Any]]:
    """Explain video files (or directories of them) with a video or ASD run, every frame of each file.

    The model runs over consecutive windows of its clip length ``T`` (``model.config.frames``, else the
    run's ``data.frames``, else 8); see :func:`_video_windows` for the last window and files shorter than
    ``T``. Each frame is read as the run's training data was (channels, centred square crop, resize,
    mean / std). An ASD run reads the file's first audio track, resampled to the run's sample rate by
    FFmpeg; window k's sound is the ``T * sample_rate / fps`` samples (the run's fps) from its first
    frame's time, zeros where the track does not reach. Writes per file ``<stem>-explained.mp4``
    (H.264 at the file's frame rate: each frame as the model sees it | its map over it),
    ``<stem>.gif`` (at most :data:`GIF_MAX_FRAMES` evenly spaced frames, at the file's speed),
    ``<stem>.maps.safetensors`` (``maps`` float16 ``(frames, S, S)`` in [0, 1], ``frame_times`` float64
    seconds) and one ``predictions.json`` record per file (returned): the file's prediction (video: the
    mean of the windows' softmax; ASD: the mean speaking score and modality importance), then
    ``windows`` and ``per_frame`` (each frame's window and its prediction; ASD: its speaking score).
    """
    task = getattr(model, "task", None)
    if task not in ("video", "asd"):
        raise ConfigError(f"explain_videos explains video files with video and ASD runs; this is a {task} run")
    if methods:
        raise ConfigError(f"post-hoc maps ({', '.join(methods)}) are not drawn on video files; the run's own map is "
                          "(explain clips of a dataset, without files, with post-hoc methods in `selfcam evaluate`)")  # fmt: skip
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha must be in [0, 1], got {alpha}")
    videos = find_videos(files, task)
    prep = Preprocess.from_config(doc, size, source)
    names = _names(doc, model.config.num_classes)
    kinds = lambda stem: (f"{stem}-explained.mp4", f"{stem}.gif", f"{stem}.maps.safetensors")  # noqa: E731
    stems = [name.removesuffix("-explained.mp4") for name in _unique_names(videos, kinds)]
    with _Outputs(out_dir, videos) as out:
        for path, stem in zip(videos, stems):
            out.records.append(_explain_video(model, doc, path, stem, out, prep, names, alpha))
    return out.records
