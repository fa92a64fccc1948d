"""Video files and folders of frames on disk: the ``videofolder:DIR`` data of the ``video`` task, and PyAV I/O.

Layout (docs/data.md, "videofolder:DIR")::

    DIR/<class>/<clip>.mp4            a video file PyAV (FFmpeg) decodes: .mp4 .m4v .avi .mov .mkv .webm
    DIR/<class>/<clip>/0001.png ...   or a folder of frame images (any Pillow format), in name order
    DIR/train|val|test/<class>/...    optional split folders (val/ may also be valid/ or validation/)

Classes are the sorted names of the class folders. With a ``train/`` folder the split folders are
the splits (``val`` a stratified 10 % of ``train/`` when there is no val folder); otherwise every
class is cut into fixed 80 / 10 / 10 % parts (:func:`~selfcam.data.base.partition`, the same for
every seed, as ``imagefolder:``). Other files (not a video by extension, not a folder) are skipped
with a warning and listed in ``dataset.skipped``.

Each item samples ``frames`` (``T``) frames uniformly over its clip of ``N`` frames: frame
``floor((t + 1/2) N / T)`` for ``t = 0..T-1``, the centres of ``T`` equal segments (a clip shorter
than ``T`` repeats frames). Each frame is converted to RGB (``mode="L"``: grey, one channel),
cropped to its centred square and resized to ``size`` (:class:`~selfcam.data.transforms.Transform`,
as the image formats), then normalized with ImageNet's mean / std (grey: 0.449 / 0.226); with
``augment=True`` one random horizontal flip per clip. Nothing is decoded when the dataset is built
but the video headers (frame count, frame size within :data:`~selfcam.safeio.MAX_IMAGE_BYTES`): an
item decodes its clip from the start up to its last sampled frame (exact frames, no seeking) and
keeps only the ``T`` sampled ones, so memory holds ``T`` frames. Unreadable videos are a
:class:`~selfcam.errors.DataError` naming the file, when the split is built (header) or when the
item is read (body). There are no boxes: evaluation scores accuracy and the temporal stability of
the maps, not localization.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..errors import ConfigError, DataError, require_int
from ..safeio import MAX_FRAMES, MAX_IMAGE_BYTES, check_regular, load_image
from .base import SPLITS, ImageDataset, partition, take_first
from .transforms import Transform

__all__ = ["DEFAULT_TRANSFORM", "VIDEO_SUFFIXES", "VideoFolder", "VideoWriter", "open_videofolder", "probe_video",
           "read_audio", "sample_indices", "video_frames"]  # fmt: skip

VIDEO_SUFFIXES = (".mp4", ".m4v", ".avi", ".mov", ".mkv", ".webm")
DEFAULT_TRANSFORM = Transform(112, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), flip=True)


def _av(path: str | Path) -> Any:
    try:
        import av
    except ImportError as e:
        raise DataError(f"{path}: reading videos needs PyAV: pip install 'selfcam[video]'") from e
    return av


def _av_errors(av: Any) -> tuple[type[BaseException], ...]:
    return (av.FFmpegError, OSError, ValueError, IndexError, EOFError)


def sample_indices(n: int, t: int) -> list[int]:
    """The ``t`` frames of a clip of ``n`` taken as its sample: ``floor((i + 1/2) n / t)``, i = 0..t-1."""
    return [((2 * i + 1) * n) // (2 * t) for i in range(t)]


@contextlib.contextmanager
def _video_stream(path: str | Path, what: str) -> Iterator[tuple[Any, Any]]:
    """``(container, first video stream)`` of the regular file ``path`` opened with PyAV; any failure is a
    :class:`DataError` ``"PATH: cannot WHAT video (why)"`` (``"PATH: video file not found"``)."""
    av = _av(path)
    try:
        check_regular(path, DataError)
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DataError(f"{path}: no video stream")
            yield container, container.streams.video[0]
    except FileNotFoundError:
        raise DataError(f"{path}: video file not found") from None
    except _av_errors(av) as e:
        raise DataError(f"{path}: cannot {what} video ({e})") from e


def _budget(path: str | Path, width: int, height: int) -> None:
    if width * height * 3 > MAX_IMAGE_BYTES:
        raise DataError(f"{path}: frames of {width} x {height} pixels decode to {width * height * 3:,} bytes, over "
                        f"selfcam's pixel budget of {MAX_IMAGE_BYTES:,} bytes (safeio.MAX_IMAGE_BYTES)")  # fmt: skip


def probe_video(path: str | Path) -> tuple[int, float, int, int]:
    """``(frames, fps, width, height)`` of a video file from its headers (frames counted by demuxing,
    without decoding, when the container does not say); :class:`DataError` naming the file otherwise."""
    with _video_stream(path, "read") as (container, stream):
        width, height = stream.codec_context.width, stream.codec_context.height
        rate = stream.average_rate or stream.guessed_rate or Fraction(25)
        count = int(stream.frames or 0)
        if count <= 0:
            count = sum(1 for p in container.demux(stream) if p.size)
    if count <= 0 or width <= 0 or height <= 0:
        raise DataError(f"{path}: cannot read video (no frames)")
    _budget(path, width, height)
    return count, float(rate), width, height


def video_frames(path: str | Path, mode: str = "RGB", stop: int | None = None) -> Iterator[tuple[np.ndarray, float]]:
    """Decode a video file frame by frame: ``(pixels uint8 (h, w, 3) or (h, w) for mode "L", time in s)``,
    up to frame ``stop`` (exclusive; None: all). :class:`DataError` naming the file when it cannot be decoded."""
    fmt = "gray" if mode == "L" else "rgb24"
    with _video_stream(path, "decode") as (container, stream):
        for i, frame in enumerate(container.decode(stream)):
            if stop is not None and i >= stop:
                return
            _budget(path, frame.width, frame.height)
            time = frame.time if frame.time is not None else i / float(stream.average_rate or 25)
            yield frame.to_ndarray(format=fmt), float(time)


def read_audio(path: str | Path, sample_rate: int) -> tuple[np.ndarray, float] | None:
    """The first audio track of a video file, mono float32 resampled to ``sample_rate`` by FFmpeg
    (PyAV's ``AudioResampler``), and its start time in seconds; None when the file has no audio."""
    av = _av(path)
    parts: list[np.ndarray] = []
    start = None
    try:
        check_regular(path, DataError)
        with av.open(str(path)) as container:
            if not container.streams.audio:
                return None
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="flt", layout="mono", rate=int(sample_rate))
            for frame in container.decode(stream):
                if start is None:
                    start = float(frame.time or 0.0)
                for out in resampler.resample(frame):
                    parts.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                parts.append(out.to_ndarray().reshape(-1))
    except _av_errors(av) as e:
        raise DataError(f"{path}: cannot decode its audio ({e})") from e
    samples = np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)
    return samples, start or 0.0


class VideoWriter:
    """An H.264 MP4 written frame by frame with PyAV: ``with VideoWriter(path, fps) as w: w.write(rgb)``.

    Frames are uint8 ``(H, W, 3)`` of one size, H and W even (yuv420p, what browsers play); ``crf``
    is x264's quality (0 lossless, 23 its default).
    """

    def __init__(self, path: str | Path, fps: float, crf: int = 18, pix_fmt: str = "yuv420p") -> None:
        self.path, self.fps, self.crf, self.pix_fmt = Path(path), fps, crf, pix_fmt
        self.container: Any = None
        self.stream: Any = None
        self.frames = 0

    def __enter__(self) -> VideoWriter:
        av = _av(self.path)
        self.container = av.open(str(self.path), "w")
        return self

    def write(self, rgb: np.ndarray) -> None:
        import av

        if self.stream is None:
            rate = Fraction(self.fps).limit_denominator(1001)
            self.stream = self.container.add_stream("libx264", rate=rate, options={"crf": str(self.crf)})
            self.stream.height, self.stream.width = rgb.shape[:2]
            self.stream.pix_fmt = self.pix_fmt
        self.container.mux(self.stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")))
        self.frames += 1

    def __exit__(self, *_: Any) -> None:
        try:
            if self.stream is not None:
                self.container.mux(self.stream.encode())
        finally:
            self.container.close()


# ---------------------------------------------------------------------------------------------- videofolder


def _frame_files(folder: str) -> list[str]:
    """The frame images of a clip folder (Pillow's extensions, hidden files excepted), sorted by name."""
    extensions = {e.lower() for e in Image.registered_extensions()}
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if not f.startswith(".") and os.path.splitext(f)[1].lower() in extensions)  # fmt: skip


def _scan(folder: Path, classes: Sequence[str]) -> tuple[list[str], np.ndarray, list[tuple[str, str]]]:
    """(clip paths: video files or frame folders, class indices, skipped (path, reason)) under ``folder``."""
    skipped: list[tuple[str, str]] = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if not entry.name.startswith(".") and not entry.is_dir():
            skipped.append((entry.path, "not inside a class folder"))
        elif not entry.name.startswith(".") and entry.name not in classes:
            skipped.append((entry.path, "folder of a class the training folder does not have"))
    paths, labels = [], []
    for k, name in enumerate(classes):
        if not (folder / name).is_dir():
            continue
        for entry in sorted(os.scandir(folder / name), key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            if entry.is_dir() or os.path.splitext(entry.name)[1].lower() in VIDEO_SUFFIXES:
                paths.append(entry.path)
                labels.append(k)
            else:
                skipped.append((entry.path, "neither a video file (" + ", ".join(VIDEO_SUFFIXES) + ") nor a folder of frames"))
    return paths, np.asarray(labels, np.int64), skipped


class VideoFolder(ImageDataset):
    """Clips of a ``videofolder:DIR`` tree: items ``(clip (T, C, S, S) float32 normalized, label () int64)``.

    ``paths``: one video file or frame folder per item; ``counts``: each clip's frame count;
    ``num_frames`` (also ``frames``): ``T``; ``raw(i)``: the sampled frames ``(T, C, S, S)`` in [0, 1].
    """

    def __init__(self, paths: Sequence[str], counts: Sequence[int], labels: Tensor, transform: Transform,
                 class_names: Sequence[str], *, frames: int = 8, mode: str = "RGB", source: str = "") -> None:  # fmt: skip
        super().__init__(labels, transform, class_names, in_chans=len(mode), task="video", source=source)
        self.paths, self.counts = list(paths), [int(c) for c in counts]
        self.num_frames = self.frames = int(frames)
        self.mode = mode

    def load(self, i: int) -> Tensor:
        """The ``T`` sampled frames of clip ``i`` as decoded: uint8 ``(T, C, h, w)``."""
        path, count = self.paths[i], self.counts[i]
        if os.path.isdir(path):
            files = _frame_files(path)
            if not files:
                raise DataError(f"{path}: the clip folder holds no frame images")
            picked = []
            for j in sample_indices(len(files), self.frames):
                try:
                    pixels = load_image(files[j], self.mode, self.size, DataError)
                except FileNotFoundError:
                    raise DataError(f"{files[j]}: frame image is missing") from None
                picked.append(pixels)
        else:
            picked = self._decode(path, count)
        shapes = {p.shape for p in picked}
        if len(shapes) != 1:
            raise DataError(f"{path}: frames of different sizes {sorted(shapes)}")
        stack = np.stack(picked)  # (T, h, w[, 3])
        stack = stack[..., None] if stack.ndim == 3 else stack
        return torch.from_numpy(stack).permute(0, 3, 1, 2).contiguous()

    def _decode(self, path: str, count: int) -> list[np.ndarray]:
        want = sample_indices(count, self.frames)
        kept: dict[int, np.ndarray] = {}
        seen = 0
        for j, (pixels, _) in enumerate(video_frames(path, self.mode, stop=max(want) + 1)):
            seen = j + 1
            if j in want:
                kept[j] = pixels
        if seen < max(want) + 1:  # the header counted more frames than the stream holds: sample what is there
            if seen == 0:
                raise DataError(f"{path}: cannot decode video (no frames)")
            want = sample_indices(seen, self.frames)
            kept = {j: p for j, (p, _) in enumerate(video_frames(path, self.mode, stop=seen)) if j in want}
        return [kept[j] for j in want]

    def raw(self, i: int) -> Tensor:
        """Clip ``i`` in [0, 1], float32 ``(T, C, S, S)``: each frame cropped and resized, not augmented or normalized."""
        frames = self.load(i)
        t, c = frames.shape[:2]
        return self.transform.prepare(frames.flatten(0, 1)).view(t, c, self.size, self.size)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        """(normalized clip (T, C, S, S) float32, label () int64); ``augment``: one random flip for the whole clip."""
        x = self.raw(i)
        if self.transform.augment:
            t, c = x.shape[:2]
            x = self.transform.augmented(x.flatten(0, 1)).view(t, c, self.size, self.size)
        return self.transform.normalize(x), self.labels[i]


def open_videofolder(root: Path, split: str, n: int | None = None, *, size: int | None = None, augment: bool = False,
                     mean: float | Sequence[float] | None = None, std: float | Sequence[float] | None = None,
                     **options: Any) -> VideoFolder:  # fmt: skip
    """``split`` of the ``videofolder:`` tree at ``root`` (see the module docstring); ``n`` keeps the first n clips;
    ``options``: ``frames`` (T, default 8) and ``mode`` ("RGB", default, or "L")."""
    from .folders import _warn_skipped, split_folder

    unknown = sorted(set(options) - {"frames", "mode"})
    if unknown:
        raise ConfigError(f"videofolder has no option(s) {', '.join(unknown)}; its options: frames, mode")
    frames, mode = options.get("frames", 8), options.get("mode", "RGB")

    root = Path(root).expanduser()
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} for videofolder:{root}; expected one of {', '.join(SPLITS)}")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise DataError(f"n must be an integer >= 1 (or None for the whole split), got {n!r}")
    require_int("frames", frames, 1, MAX_FRAMES)
    if mode not in ("RGB", "L"):
        raise ConfigError(f"mode must be 'RGB' or 'L', got {mode!r}")
    if not root.is_dir():
        raise DataError(f"{root} does not exist or is not a folder (dataset videofolder:{root})")
    transform = DEFAULT_TRANSFORM.with_options(size=size, augment=augment, mean=mean, std=std)
    folder, classes, fractions, part = split_folder(root, split)
    paths, labels, skipped = _scan(folder, classes)
    if not paths:
        raise DataError(f"{folder}: no video files or frame folders in its class folders")
    if skipped:
        _warn_skipped(root, skipped)
    rows = take_first(partition(labels, fractions)[part], n, f"the {split} split of videofolder:{root}")
    if not len(rows):
        raise DataError(f"{folder}: no clips in the {split} split")
    counts = []
    for i in rows:  # headers only: frame counts, and unreadable videos named before training starts
        path = paths[i]
        if os.path.isdir(path):
            count = len(_frame_files(path))
            if not count:
                raise DataError(f"{path}: the clip folder holds no frame images")
        else:
            count = probe_video(path)[0]
        counts.append(count)
    data = VideoFolder([paths[i] for i in rows], counts, torch.from_numpy(labels[rows]), transform, classes,
                       frames=frames, mode=mode, source=str(root))  # fmt: skip
    data.skipped = tuple(skipped)
    return data

