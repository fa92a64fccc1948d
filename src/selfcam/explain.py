"""Explain image files with a trained run: the self-explanation and post-hoc maps, side by side.

:func:`find_images` turns files and directories into a sorted list of image files (and the
files it skipped); :class:`Preprocess` reads one file the way the run was trained (channels,
centred square crop, resize, normalization); :func:`explain_images` runs a model over a batch
of normalized images and returns logits, scores and every requested map; :func:`selfcam.render.panel`
draws one image's maps in a row; :func:`explain_files` does all of it and writes
``OUT/<stem>.png`` per image plus ``OUT/predictions.json``.

Normalization statistics, in order: ``doc["data"]["mean"/"std"]`` when the run stored them;
the cluttered-digits ``MEAN``/``STD`` when the run was trained on ``cluttered-digits``;
ImageNet's for 3 channels; 0.5 / 0.5 for 1 channel.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from .data import MEAN as DIGITS_MEAN
from .data import STD as DIGITS_STD
from .data.base import image_pixels, image_problem
from .data.transforms import Transform
from .errors import ConfigError, InputError, require_int
from .safeio import check_regular, load_image
from . import explainers
from .model import SelfExplainer
from .checkpoint import CONFIG
from .posthoc import POSTHOC_METHODS
from .render import panel

__all__ = [
    "IMAGE_SUFFIXES",
    "Preprocess",
    "Explanations",
    "find_images",
    "explain_images",
    "explain_files",
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

    logits ``(N, classes)``; pred ``(N,)`` int64; score ``(N,)`` softmax probability of
    ``pred``; maps: method -> ``(N, H, W)`` in [0, 1] at input size, ``"self"`` first (the
    head's own map), then each post-hoc method for class ``pred``. All on the CPU.
    """

    logits: Tensor
    pred: Tensor
    score: Tensor
    maps: dict[str, Tensor]


def check_methods(model: SelfExplainer, methods: Sequence[str]) -> tuple[str, ...]:
    """Validate the post-hoc methods added beside ``model``'s own map (:func:`selfcam.explainers.check_methods`)."""
    unknown = [m for m in methods if m not in POSTHOC_METHODS]
    if unknown:
        raise ConfigError(f"unknown post-hoc method(s) {', '.join(unknown)}; choose from {', '.join(POSTHOC_METHODS)}")
    explainers.check_methods(model, methods)
    if model.task != "image":
        raise ConfigError(f"explain shows one class per image; the {model.config.method!r} head is multi-label")
    return tuple(methods)


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
    score, pred = torch.softmax(logits, dim=1).max(dim=1)
    return Explanations(logits, pred, score, {k: torch.cat(v) for k, v in parts.items()})


def _unique_names(files: Sequence[Path]) -> list[str]:
    """``<stem>.png`` for each file; repeated stems get ``-2``, ``-3``... in order."""
    seen: dict[str, int] = {}
    names = []
    for f in files:
        n = seen[f.stem] = seen.get(f.stem, 0) + 1
        names.append(f"{f.stem}.png" if n == 1 else f"{f.stem}-{n}.png")
    return names


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
    """Explain image ``files`` with a run (``model``, ``doc`` from :func:`selfcam.load_checkpoint`).

    Writes ``out_dir/<stem>.png`` per file (see :func:`selfcam.render.panel`) and
    ``out_dir/predictions.json``: a list of ``{"file", "output", "class", "class_name", "score"}``,
    which is also returned. Class names come from ``doc["data"]["class_names"]`` when stored.
    ``source`` names the config file in error messages.
    """
    methods = check_methods(model, methods)
    require_int("batch_size", batch_size)
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha must be in [0, 1], got {alpha}")
    prep = Preprocess.from_config(doc, size, source)
    names_cfg = (doc.get("data") or {}).get("class_names")
    class_names = [str(c) for c in names_cfg] if isinstance(names_cfg, list) else []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = [Path(f) for f in files]
    outputs = _unique_names(files)
    label = f"self ({model.config.method})"
    records: list[dict[str, Any]] = []
    starts = range(0, len(files), batch_size)
    try:  # a file that fails to decode half-way: the panels already written go, nothing half-done stays
        for i in progress(starts, len(starts)) if progress else starts:
            chunk = files[i : i + batch_size]
            raw = torch.stack([prep.load(f) for f in chunk])
            result = explain_images(model, prep.normalize(raw), methods, batch_size=batch_size)
            for j, f in enumerate(chunk):
                c, p = int(result.pred[j]), float(result.score[j])
                name = class_names[c] if c < len(class_names) else str(c)
                maps = {label if m == "self" else m: v[j] for m, v in result.maps.items()}
                picture = panel(raw[j], maps, f"{f.name}: predicted {name}, softmax {p:.3f}", alpha)
                records.append({"file": str(f), "output": outputs[i + j], "class": c, "class_name": name, "score": p})
                Image.fromarray(picture).save(out / outputs[i + j])
        (out / "predictions.json").write_text(json.dumps(records, indent=2) + "\n", encoding="utf-8")
    except BaseException:
        for r in records:
            (out / r["output"]).unlink(missing_ok=True)
        raise
    return records
