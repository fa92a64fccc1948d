"""AVA-ActiveSpeaker-style data on disk: a CSV of face boxes and labels, frame folders (or mp4) and wav.

Layout under ``root`` (docs/asd.md has an example):

- ``annotations.csv`` (any name, ``annotations=``): one row per face and frame, no header (a first row
  starting with ``video_id`` is skipped), the AVA ActiveSpeaker columns
  ``video_id, frame_timestamp, entity_box_x1, entity_box_y1, entity_box_x2, entity_box_y2, label,
  entity_id``; box corners normalized to [0, 1]; label one of :data:`LABELS`.
- ``frames/<video_id>/<frame_timestamp>.jpg``: the frame of that timestamp, named by the CSV's
  timestamp text verbatim (``902.04.jpg`` for ``902.04``) or, failing that, by the timestamp with
  two decimals (``902.00.jpg`` for ``902``);
- or, when ``frames/<video_id>/`` does not exist, ``videos/<video_id>.mp4``, decoded with PyAV
  (the frame nearest each timestamp);
- ``audio/<video_id>.wav``: the video's audio as 16 kHz PCM (8-, 16- or 32-bit integer; several
  channels are averaged). Other sample rates are an error, not resampled: convert with
  ``ffmpeg -i in.mp4 -ac 1 -ar 16000 audio/<video_id>.wav``.

Clips: the rows of each (video, entity) are sorted by time, cut where consecutive timestamps are
more than ``max_gap`` seconds apart, and each run is cut into clips of ``frames`` consecutive rows
(a shorter tail is dropped). A clip's audio is the ``frames * sample_rate / fps`` samples from its
first timestamp. Each frame is cropped to its face box and resized to ``size x size``. Frame label
1 = ``SPEAKING_AUDIBLE`` (the positive class of AVA's evaluation), 0 otherwise; the clip label is 1
when any of its frames is 1. Every referenced file is checked when the dataset is built, so
errors name the CSV line and the missing or bad file up front.

:func:`write_ava` writes a dataset with ``frames``, ``waves`` and ``frame_labels`` (such as
:class:`~selfcam.data.speakers.SpeakerClips`) in this layout.
"""

from __future__ import annotations

import csv
import math
import wave as wavfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..errors import DataError
from ..safeio import check_regular, open_image
from .speakers import FPS, FRAME_MEAN, FRAME_STD, SAMPLE_RATE, normalize_frames

__all__ = ["AVAActiveSpeaker", "AVARow", "COLUMNS", "LABELS", "open_ava", "read_ava_csv", "read_wav", "write_ava"]
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)  # train / val / test clips when the layout has one CSV for all

COLUMNS: tuple[str, ...] = ("video_id", "frame_timestamp", "entity_box_x1", "entity_box_y1", "entity_box_x2",
                            "entity_box_y2", "label", "entity_id")  # fmt: skip
LABELS: tuple[str, ...] = ("NOT_SPEAKING", "SPEAKING_AUDIBLE", "SPEAKING_NOT_AUDIBLE")
POSITIVE = "SPEAKING_AUDIBLE"


@dataclass(frozen=True)
class AVARow:
    """One CSV row: ``line`` is its 1-based line number, ``timestamp`` the text as written, ``time`` its value."""

    line: int
    video_id: str
    timestamp: str
    time: float
    box: tuple[float, float, float, float]
    label: str
    entity_id: str


def read_ava_csv(path: str | Path) -> list[AVARow]:
    """Parse and validate an AVA ActiveSpeaker CSV; :class:`DataError` names the file and line of any bad row."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: annotation CSV not found")
    rows: list[AVARow] = []
    check_regular(path, DataError)
    with path.open(newline="", encoding="utf-8") as f:
        for line, fields in enumerate(csv.reader(f), start=1):
            if not fields or (line == 1 and fields[0].strip() == "video_id"):
                continue
            where = f"{path}, line {line}"
            if len(fields) != len(COLUMNS):
                raise DataError(f"{where}: expected {len(COLUMNS)} columns ({', '.join(COLUMNS)}), got {len(fields)}")
            vid, ts, *coords, label, entity = (v.strip() for v in fields)
            try:
                t = float(ts)
                box = tuple(float(c) for c in coords)
            except ValueError as e:
                raise DataError(f"{where}: timestamp and box must be numbers ({e})") from e
            if not (math.isfinite(t) and t >= 0):
                raise DataError(f"{where}: frame_timestamp must be a number >= 0, got {ts!r}")
            x1, y1, x2, y2 = box
            if not (0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1):
                raise DataError(f"{where}: box must be normalized corners 0 <= x1 < x2 <= 1, 0 <= y1 < y2 <= 1, got {box}")
            if label not in LABELS:
                raise DataError(f"{where}: unknown label {label!r}; expected one of {', '.join(LABELS)}")
            if not vid or not entity:
                raise DataError(f"{where}: empty video_id or entity_id")
            rows.append(AVARow(line, vid, ts, t, box, label, entity))  # type: ignore[arg-type]
    if not rows:
        raise DataError(f"{path}: no annotation rows")
    return rows


@lru_cache(maxsize=8)
def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """A PCM wav file -> (mono float32 samples in [-1, 1], sample rate); channels are averaged."""
    try:
        check_regular(path, DataError)
        with wavfile.open(str(path), "rb") as w:
            channels, width, rate, count = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
            raw = w.readframes(count)
    except (wavfile.Error, EOFError) as e:
        raise DataError(f"{path}: not a PCM wav file ({e})") from e
    if width == 1:
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128) / 128
    elif width in (2, 4):
        dtype = np.int16 if width == 2 else np.int32
        x = np.frombuffer(raw, dtype).astype(np.float32) / float(np.iinfo(dtype).max)
    else:
        raise DataError(f"{path}: {8 * width}-bit samples are not supported; convert to 16-bit PCM")
    return x.reshape(-1, channels).mean(1), rate


def _wav_header(path: Path) -> tuple[int, int]:
    """(sample rate, samples per channel) of a wav file, reading only its header."""
    try:
        check_regular(path, DataError)
        with wavfile.open(str(path), "rb") as w:
            return w.getframerate(), w.getnframes()
    except (wavfile.Error, EOFError) as e:
        raise DataError(f"{path}: not a PCM wav file ({e})") from e


def _frame_path(root: Path, row: AVARow) -> Path:
    """``frames/<video>/<timestamp>.jpg``, the CSV's text first, then two decimals."""
    folder = root / "frames" / row.video_id
    verbatim = folder / f"{row.timestamp}.jpg"
    return verbatim if verbatim.is_file() else folder / f"{row.time:.2f}.jpg"


def _crop(image: Image.Image, box: tuple[float, float, float, float], size: int) -> Tensor:
    """Crop the normalized ``box`` (rounded to pixels, at least 1 px) and resize: uint8 ``(3, size, size)``."""
    w, h = image.size
    x0, y0 = min(round(box[0] * w), w - 1), min(round(box[1] * h), h - 1)
    x1, y1 = max(round(box[2] * w), x0 + 1), max(round(box[3] * h), y0 + 1)
    crop = image.convert("RGB").crop((x0, y0, x1, y1))
    if crop.size != (size, size):
        crop = crop.resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(crop).copy()).permute(2, 0, 1)


def _video_frames(path: Path, times: list[float]) -> list[Image.Image]:
    """The decoded frame nearest each time (seconds) of an mp4, via PyAV."""
    try:
        import av
    except ImportError as e:
        raise DataError(f"{path}: reading videos needs PyAV: pip install 'selfcam[video]'") from e
    best: list[Any] = [None] * len(times)
    dist = [math.inf] * len(times)
    try:
        check_regular(path, DataError)
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            container.seek(int(max(0.0, min(times) - 1.0) / stream.time_base), stream=stream)
            for frame in container.decode(stream):
                ft = frame.time if frame.time is not None else float(frame.pts * stream.time_base)
                for j, t in enumerate(times):
                    if abs(ft - t) < dist[j]:
                        best[j], dist[j] = frame.to_image(), abs(ft - t)
                if ft > max(times) + 1.0:
                    break
    except (av.FFmpegError, IndexError) as e:
        raise DataError(f"{path}: cannot decode video ({e})") from e
    if any(b is None for b in best):
        raise DataError(f"{path}: no frame near times {times}")
    return best


class AVAActiveSpeaker(torch.utils.data.Dataset):
    """Clips of ``frames`` rows of one face from an AVA-style layout (see the module docstring).

    Yields ``(frames (T, 3, S, S) normalized, wave (T * sample_rate / fps,), label (), frame labels (T,))``.
    Attributes: ``clips`` (lists of :class:`AVARow`), ``labels (n,)``, ``frame_labels (n, T)``.
    """

    num_classes: int = 2
    in_chans: int = 3
    class_names: list[str] = ["not_speaking", "speaking"]
    task: str = "asd"
    mean: tuple[float, ...] = (FRAME_MEAN,) * 3
    std: tuple[float, ...] = (FRAME_STD,) * 3

    def __init__(self, root: str | Path, annotations: str | Path = "annotations.csv", *, frames: int = 8, size: int = 64,
                 sample_rate: int = SAMPLE_RATE, fps: int = FPS, max_gap: float = 0.5) -> None:  # fmt: skip
        if frames < 1 or size < 1 or fps < 1 or sample_rate % fps:
            raise DataError(f"need frames, size, fps >= 1 and sample_rate a multiple of fps, got {frames}, {size}, {fps}, {sample_rate}")
        self.root, self.size, self.num_frames = Path(root), int(size), int(frames)
        self.sample_rate, self.samples = int(sample_rate), int(frames) * (int(sample_rate) // int(fps))
        self.csv_path = self.root / annotations
        tracks: dict[tuple[str, str], list[AVARow]] = {}
        for row in read_ava_csv(self.csv_path):
            tracks.setdefault((row.video_id, row.entity_id), []).append(row)
        self.clips: list[list[AVARow]] = []
        for rows in tracks.values():
            rows.sort(key=lambda r: r.time)
            run: list[AVARow] = []
            for row in rows:
                if run and row.time - run[-1].time > max_gap:
                    run = []
                run.append(row)
                if len(run) == frames:
                    self.clips.append(run)
                    run = []
        if not self.clips:
            raise DataError(f"{self.csv_path}: no track has {frames} consecutive rows (gaps <= {max_gap} s)")
        self._check_files()
        self.frame_labels: Tensor = torch.tensor([[int(r.label == POSITIVE) for r in c] for c in self.clips])
        self.labels: Tensor = self.frame_labels.amax(1)

    def _check_files(self) -> None:
        """Raise :class:`DataError` for the first missing frame, video or wav, or a wav that does not fit."""
        for clip in self.clips:
            first, vid = clip[0], clip[0].video_id
            if (self.root / "frames" / vid).is_dir():
                for row in clip:
                    if not _frame_path(self.root, row).is_file():
                        raise DataError(f"{self.csv_path}, line {row.line}: frame file {_frame_path(self.root, row)} not found "
                                        f"(nor {row.timestamp}.jpg)")  # fmt: skip
            elif not (self.root / "videos" / f"{vid}.mp4").is_file():
                raise DataError(f"{self.csv_path}, line {first.line}: neither {self.root / 'frames' / vid}/ "
                                f"nor {self.root / 'videos' / f'{vid}.mp4'} exists")  # fmt: skip
            wav = self.root / "audio" / f"{vid}.wav"
            if not wav.is_file():
                raise DataError(f"{self.csv_path}, line {first.line}: audio file {wav} not found")
            rate, count = _wav_header(wav)
            if rate != self.sample_rate:
                raise DataError(f"{wav}: sample rate {rate} Hz, expected {self.sample_rate} Hz; "
                                f"convert with ffmpeg -i IN -ac 1 -ar {self.sample_rate} {wav.name}")  # fmt: skip
            start = round(first.time * rate)
            if start + self.samples > count:
                raise DataError(f"{wav}: {count} samples ({count / rate:.2f} s), too short for the clip at "
                                f"{first.timestamp} s (line {first.line}) which needs samples {start}..{start + self.samples}")  # fmt: skip

    def __len__(self) -> int:
        return len(self.clips)

    def _images(self, clip: list[AVARow]) -> list[Image.Image]:
        if (self.root / "frames" / clip[0].video_id).is_dir():
            images = []
            for row in clip:
                with open_image(_frame_path(self.root, row), DataError) as im:
                    im.load()
                    images.append(im)
            return images
        return _video_frames(self.root / "videos" / f"{clip[0].video_id}.mp4", [r.time for r in clip])

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        clip = self.clips[i]
        frames = torch.stack([_crop(im, row.box, self.size) for im, row in zip(self._images(clip), clip)])
        audio, rate = read_wav(self.root / "audio" / f"{clip[0].video_id}.wav")
        start = round(clip[0].time * rate)
        wave = torch.from_numpy(audio[start : start + self.samples].copy())
        return normalize_frames(frames), wave, self.labels[i], self.frame_labels[i]


def open_ava(root: Path, split: str, n: int | None = None, *, size: int | None = None, frames: int = 8,
             annotations: str | None = None, **options: Any) -> AVAActiveSpeaker:  # fmt: skip
    """``split`` of the AVA-style layout at ``root``: ``root/<split>.csv`` when it exists, else the clips
    of ``annotations`` (default ``annotations.csv``) cut by class into fixed 80 / 10 / 10 % parts
    (:func:`~selfcam.data.base.partition`, the same for every seed); ``n`` keeps the first n clips."""
    from .base import SPLITS, partition, take_first

    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} for ava:{root}; expected one of {', '.join(SPLITS)}")
    own = annotations is None and (root / f"{split}.csv").is_file()
    data = AVAActiveSpeaker(root, f"{split}.csv" if own else annotations or "annotations.csv", frames=frames,
                            size=size or 64, **options)  # fmt: skip
    index = np.arange(len(data)) if own else partition(data.labels.numpy(), SPLIT_FRACTIONS)[SPLITS.index(split)]
    keep = take_first(index, n, f"ava:{root} {split}")
    data.clips = [data.clips[i] for i in keep]
    data.frame_labels, data.labels = data.frame_labels[keep], data.labels[keep]
    return data


def _write_wav(path: Path, samples: np.ndarray, rate: int) -> None:
    pcm = np.round(np.clip(samples, -1, 1) * 32767).astype("<i2")
    with wavfile.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())


def _write_mp4(path: Path, images: list[np.ndarray], fps: int) -> None:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"crf": "0"})  # lossless
        stream.height, stream.width = images[0].shape[:2]
        stream.pix_fmt = "yuv444p"
        for img in images:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        container.mux(stream.encode())


def write_ava(dataset: Any, root: str | Path, annotations: str = "annotations.csv", *, video: bool = False, quality: int = 95,
              prefix: str | None = None) -> Path:  # fmt: skip
    """Write ``dataset`` (``frames`` uint8 ``(n, T, 3, S, S)``, ``waves (n, T * spf)``, ``frame_labels (n, T)``,
    ``fps``, ``sample_rate``) in the layout :class:`AVAActiveSpeaker` reads; returns the CSV path.

    Clip ``i`` becomes video ``<prefix><i:05d>`` (prefix: the dataset's split) with one face entity
    ``<video_id>:0``: each frame is pasted into a ``2S x 2S`` grey scene at an offset that varies
    with ``i`` (the CSV box), saved as JPEG (``quality``, 4:4:4) under ``frames/`` or, with ``video``,
    as one lossless H.264 (4:4:4) mp4 per clip under ``videos/``; timestamps are ``t / fps`` with two decimals; the
    audio is 16-bit PCM. Frame labels 1 / 0 become ``SPEAKING_AUDIBLE`` / ``NOT_SPEAKING``.
    """
    root = Path(root)
    prefix = getattr(dataset, "split", "clip") if prefix is None else prefix
    frames, waves, labels = dataset.frames, dataset.waves, dataset.frame_labels
    n, t, _, s, _ = frames.shape
    fps, rate = int(dataset.fps), int(dataset.sample_rate)
    (root / "audio").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        vid = f"{prefix}{i:05d}"
        ox, oy = (7 * i) % s, (13 * i) % s
        box = (ox / (2 * s), oy / (2 * s), (ox + s) / (2 * s), (oy + s) / (2 * s))
        scenes = []
        for f in range(t):
            scene = np.full((2 * s, 2 * s, 3), 128, np.uint8)
            scene[oy : oy + s, ox : ox + s] = frames[i, f].permute(1, 2, 0).numpy()
            scenes.append(scene)
            label = "SPEAKING_AUDIBLE" if int(labels[i, f]) else "NOT_SPEAKING"
            lines.append([vid, f"{f / fps:.2f}", *(f"{v:.6f}" for v in box), label, f"{vid}:0"])
        if video:
            (root / "videos").mkdir(exist_ok=True)
            _write_mp4(root / "videos" / f"{vid}.mp4", scenes, fps)
        else:
            folder = root / "frames" / vid
            folder.mkdir(parents=True, exist_ok=True)
            for f, scene in enumerate(scenes):
                Image.fromarray(scene).save(folder / f"{f / fps:.2f}.jpg", quality=quality, subsampling=0)
        _write_wav(root / "audio" / f"{vid}.wav", waves[i].numpy(), rate)
    path = root / annotations
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(lines)
    return path
