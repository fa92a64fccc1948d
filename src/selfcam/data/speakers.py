"""Synthetic audio-visual speaker clips: a face whose mouth follows (or not) the loudness of a voice.

Each clip is ``T`` frames (25 fps) of a face crop, ``size x size`` RGB, and ``T * 640`` samples of
16 kHz audio. Every clip is one of four kinds (:data:`KINDS`):

- ``speaking`` (half of the clips): the face's own voice is heard; its loudness per frame is a
  syllable-like burst pattern (bursts of 1-3 frames, gaps of 1-2), over the whole clip or over a
  segment of at least ``ceil(T / 2)`` frames, and the mouth opening follows that loudness frame by
  frame. Outside the segment the mouth is closed and only background noise is heard.
- ``still`` (20 %): another speaker is heard; the mouth does not move. In half of these clips the
  eyes blink in time with that voice: a distractor synchronized with the audio but away from the
  mouth, so that only the mouth tells a speaker from a listener.
- ``desync`` (20 %): another speaker is heard and the mouth moves with a *different* burst
  pattern (pairs whose per-frame correlation exceeds 0.3 are redrawn).
- ``silent`` (10 %): only background noise; the mouth does not move.

Labels: the clip label is 1 for ``speaking`` clips. The *frame* label is 1 on the frames of the
speaking segment, from the first frame of its first burst to the last frame of its last burst
(the short gaps between syllables count as speaking, as AVA ActiveSpeaker annotates utterances);
every frame of the other kinds is 0. The mouth box of a frame is the region the mouth takes when
fully open at that frame's face position (lip corners and upper lip to fully-open lower lip, plus
1 px), so it contains the drawn mouth in every frame whatever its opening.

Faces are drawn vectorized with anti-aliased ellipses: background (two-colour ramp), hair, head,
eyes that blink (at random, 15 % of the frames, or with the heard voice), nose, lips and mouth cavity;
position (with a per-frame jitter), scale, skin tone, hair and background vary per clip. The
voice is a harmonic series on a speaker's pitch (100-250 Hz, slight vibrato) plus some noise,
multiplied by the burst envelope (a 10 ms moving average); background noise is added to every clip.
Randomness comes from one NumPy generator seeded by (seed, split).
"""

from __future__ import annotations

import math
from numbers import Integral
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError

__all__ = [
    "FPS",
    "FRAME_MEAN",
    "FRAME_STD",
    "KINDS",
    "SAMPLE_RATE",
    "SpeakerClips",
    "draw_faces",
    "normalize_frames",
]

SAMPLE_RATE: int = 16000
FPS: int = 25
FRAME_MEAN: float = 0.5  # frames are normalized as (x / 255 - MEAN) / STD
FRAME_STD: float = 0.25
KINDS: tuple[str, ...] = ("speaking", "still", "desync", "silent")
_KIND_P = (0.5, 0.2, 0.2, 0.1)
_SPLITS = ("train", "val", "test")
_MAX_DESYNC_CORR = 0.3


def normalize_frames(frames: Tensor) -> Tensor:
    """uint8 frames (any shape) -> float32 ``(x / 255 - FRAME_MEAN) / FRAME_STD``."""
    return (frames.float() / 255.0 - FRAME_MEAN) / FRAME_STD


def _bursts(rng: np.random.Generator, frames: int, start: int, stop: int) -> np.ndarray:
    """Syllable-like loudness per frame ``(frames,)``: bursts of 1-3 frames (level 0.5-1) and gaps
    of 1-2 frames, the first burst at ``start``, none at or after ``stop``."""
    amp = np.zeros(frames, np.float32)
    f = start
    while f < stop:
        length = int(rng.integers(1, 4))
        amp[f : min(f + length, stop)] = rng.uniform(0.5, 1.0)
        f += length + int(rng.integers(1, 3))
    return amp


def _segment(rng: np.random.Generator, frames: int) -> tuple[int, int]:
    """The whole clip (half the time) or a random segment of at least ``ceil(frames / 2)`` frames."""
    if rng.random() < 0.5:
        return 0, frames
    length = int(rng.integers(math.ceil(frames / 2), frames + 1))
    start = int(rng.integers(0, frames - length + 1))
    return start, start + length


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation, 0 when either vector is constant."""
    if a.std() < 1e-6 or b.std() < 1e-6:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def _envelopes(rng: np.random.Generator, kinds: np.ndarray, frames: int) -> tuple[np.ndarray, ...]:
    """Per clip and frame: heard voice loudness, mouth opening, frame label; all ``(n, frames)``."""
    n = len(kinds)
    voice = np.zeros((n, frames), np.float32)
    mouth = np.zeros((n, frames), np.float32)
    label = np.zeros((n, frames), np.int64)
    still_open = rng.uniform(0.0, 0.2, n).astype(np.float32)
    gain = rng.uniform(0.85, 1.0, n).astype(np.float32)
    for i, kind in enumerate(KINDS[k] for k in kinds):
        if kind == "speaking":
            a, b = _segment(rng, frames)
            voice[i] = _bursts(rng, frames, a, b)
            active = np.flatnonzero(voice[i])
            label[i, active[0] : active[-1] + 1] = 1
            jitter = rng.normal(0, 0.03, frames) * (voice[i] > 0)
            mouth[i] = np.clip(gain[i] * voice[i] + jitter, 0, 1)
        elif kind == "desync":
            while True:
                voice[i] = _bursts(rng, frames, *_segment(rng, frames))
                mouth[i] = gain[i] * _bursts(rng, frames, *_segment(rng, frames))
                if _corr(voice[i], mouth[i]) <= _MAX_DESYNC_CORR:
                    break
        else:
            if kind == "still":
                voice[i] = _bursts(rng, frames, *_segment(rng, frames))
            mouth[i] = still_open[i]
    return voice, mouth, label


def _voice(rng: np.random.Generator, loudness: np.ndarray, sample_rate: int, fps: int) -> np.ndarray:
    """Waveforms ``(n, frames * sample_rate / fps)`` float32: a harmonic voice gated by the per-frame
    ``loudness (n, frames)`` (10 ms moving average) plus background noise."""
    n, frames = loudness.shape
    spf = sample_rate // fps
    t = np.arange(frames * spf, dtype=np.float64) / sample_rate
    f0 = rng.uniform(100, 250, (n, 1))
    vibrato = 1 + 0.02 * np.sin(2 * np.pi * rng.uniform(3, 6, (n, 1)) * t + rng.uniform(0, 2 * np.pi, (n, 1)))
    phase = np.mod(2 * np.pi * np.cumsum(f0 * vibrato, axis=1) / sample_rate, 2 * np.pi).astype(np.float32)
    weights = rng.uniform(0.3, 1.0, (n, 8)).astype(np.float32)
    prev, cur, twice_cos = np.zeros_like(phase), np.sin(phase), 2 * np.cos(phase)
    wave = weights[:, :1] * cur
    for h in range(2, 9):  # sin(h p) = 2 cos(p) sin((h - 1) p) - sin((h - 2) p)
        prev, cur = cur, twice_cos * cur - prev
        wave += weights[:, h - 1 : h] / h * cur
    wave /= wave.std(axis=1, keepdims=True)
    wave += 0.3 * rng.standard_normal(wave.shape, dtype=np.float32)
    k = spf // 4  # 10 ms at 16 kHz / 25 fps: moving average of the per-frame levels
    steps = np.pad(np.repeat(loudness, spf, axis=1), ((0, 0), (k // 2, k - 1 - k // 2)), mode="edge")
    csum = np.pad(np.cumsum(steps, axis=1, dtype=np.float64), ((0, 0), (1, 0)))
    env = (csum[:, k:] - csum[:, :-k]) / k
    level = rng.uniform(0.05, 0.15, (n, 1))
    noise = rng.uniform(0.001, 0.005, (n, 1)) * rng.standard_normal(wave.shape, dtype=np.float32)
    return (level * env * wave + noise).astype(np.float32)


def _ellipse(xs: Tensor, ys: Tensor, cx: Tensor, cy: Tensor, rx: Tensor, ry: Tensor) -> Tensor:
    """Anti-aliased coverage in [0, 1] of ellipses: pixel centres ``xs (W,)``, ``ys (H,)``; one
    ellipse per frame, parameters ``(M,)``; returns ``(M, H, W)``. The signed distance to the
    boundary is approximated by ``(r - 1) / |grad r|``; coverage is zero outside the ellipse's
    bounding box grown by half a pixel (the approximation is loose far from thin ellipses)."""
    ox, oy = xs[None, None, :] - cx[:, None, None], ys[None, :, None] - cy[:, None, None]  # (M, 1, W), (M, H, 1)
    rx, ry = rx[:, None, None], ry[:, None, None]
    dx, dy = ox / rx, oy / ry
    r = (dx.square() + dy.square()).sqrt_().clamp_(min=1e-6)
    grad = ((dx / rx).square() + (dy / ry).square()).sqrt_().clamp_(min=1e-6)  # |grad r| * r
    near = (ox.abs() <= rx + 0.5) & (oy.abs() <= ry + 0.5)
    return (r - 1).mul_(r).div_(grad).neg_().add_(0.5).clamp_(0, 1).mul_(near)


def _blend(canvas: Tensor, alpha: Tensor, colour: Tensor) -> Tensor:
    """Paint ``colour (M, 3)`` with coverage ``alpha (M, H, W)`` over ``canvas (M, 3, H, W)``."""
    return torch.lerp(canvas, colour[:, :, None, None].expand_as(canvas), alpha[:, None])


def draw_faces(p: dict[str, Tensor], size: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Render frames from per-frame parameters ``p`` (each ``(M,)`` or ``(M, 3)``, see
    :meth:`SpeakerClips._face_params`; pixel noise drawn from ``generator``): returns (uint8
    ``(M, 3, size, size)``, mouth coverage ``(M, size, size)`` in [0, 1], lips and cavity)."""
    m = len(p["cx"])
    grid = torch.arange(size, dtype=torch.float32) + 0.5
    ramp = grid[None, :, None] * torch.sin(p["bg_angle"])[:, None, None] + grid[None, None, :] * torch.cos(p["bg_angle"])[:, None, None]
    ramp = ((ramp - ramp.amin((1, 2), keepdim=True)) / (ramp.amax((1, 2), keepdim=True) - ramp.amin((1, 2), keepdim=True))).clamp(0, 1)
    img = p["bg0"][:, :, None, None] + (p["bg1"] - p["bg0"])[:, :, None, None] * ramp[:, None]
    cx, cy, a, b = p["cx"], p["cy"], p["a"], p["b"]
    hair = _ellipse(grid, grid, cx, cy - 0.08 * b, 1.08 * a, 1.05 * b) * (grid[None, :, None] < (cy - 0.45 * b)[:, None, None])
    img = _blend(img, hair, p["hair"])
    head = _ellipse(grid, grid, cx, cy, a, b) * (1 - hair)
    img = _blend(img, head, p["skin"])
    dark = torch.full((m, 3), 0.08)
    for side in (-1.0, 1.0):
        eye = _ellipse(grid, grid, cx + side * 0.38 * a, cy - 0.18 * b, 0.13 * a, 0.07 * b * p["eye_open"])
        img = _blend(img, eye, dark)
    nose = _ellipse(grid, grid, cx, cy + 0.12 * b, 0.08 * a, 0.16 * b)
    img = _blend(img, nose, p["skin"] * 0.8)
    mx, my, mw, lip, gap = cx, cy + 0.5 * b, p["mouth_w"], p["lip"], p["mouth_h"] * p["opening"]
    lips = _ellipse(grid, grid, mx, my, mw, lip + gap)
    img = _blend(img, lips, p["skin"] * torch.tensor([0.85, 0.45, 0.45]))
    cavity = _ellipse(grid, grid, mx, my, 0.85 * mw, gap.clamp(min=1e-3)) * (gap > 0.05)[:, None, None]
    img = _blend(img, cavity, torch.tensor([0.3, 0.04, 0.06]).expand(m, 3))
    img = img + p["noise"][:, None, None, None] * torch.randn(img.shape, generator=generator)
    frames = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    return frames, torch.maximum(lips, cavity)


class SpeakerClips(torch.utils.data.Dataset):
    """``n`` synthetic speaker clips of one split; see the module docstring for the generator.

    Attributes: ``frames`` uint8 ``(n, T, 3, S, S)``, ``waves`` float32 ``(n, T * sample_rate / fps)``,
    ``labels`` ``(n,)``, ``frame_labels`` ``(n, T)``, ``mouth_boxes`` ``(n, T, 4)`` int64
    ``(x0, y0, x1, y1)`` exclusive ends, ``kinds`` ``(n,)`` index into :data:`KINDS`, ``loudness``
    and ``opening`` ``(n, T)`` (the per-frame voice level heard and mouth opening drawn), ``eye_sync``
    ``(n,)`` bool (the eyes blink with the heard voice), ``params`` (the drawing parameters of every
    frame, for :func:`draw_faces`).
    """

    num_classes: int = 2
    in_chans: int = 3
    class_names: list[str] = ["not_speaking", "speaking"]
    task: str = "asd"
    spec: str = "speaker-clips"
    mean: tuple[float, ...] = (FRAME_MEAN,) * 3
    std: tuple[float, ...] = (FRAME_STD,) * 3

    def __init__(self, split: Literal["train", "val", "test"], n: int, *, frames: int = 8, size: int = 64,
                 sample_rate: int = SAMPLE_RATE, fps: int = FPS, seed: int = 0) -> None:  # fmt: skip
        for name, value, low in (("n", n, 1), ("frames", frames, 2), ("size", size, 24), ("seed", seed, 0),
                                 ("sample_rate", sample_rate, 1000), ("fps", fps, 1)):  # fmt: skip
            if not isinstance(value, Integral) or isinstance(value, bool) or value < low:
                raise DataError(f"{name} must be an integer >= {low}, got {value!r}")
        if split not in _SPLITS:
            raise DataError(f"unknown split {split!r}; expected one of {', '.join(_SPLITS)}")
        if sample_rate % fps:
            raise DataError(f"sample_rate ({sample_rate}) must be a multiple of fps ({fps})")
        self.split, self.size, self.seed, self.fps, self.sample_rate = split, int(size), int(seed), int(fps), int(sample_rate)
        self.num_frames = int(frames)
        rng = np.random.default_rng([int(seed), _SPLITS.index(split), 7])
        kinds = rng.choice(len(KINDS), n, p=_KIND_P)
        loudness, opening, frame_labels = _envelopes(rng, kinds, frames)
        self.kinds: Tensor = torch.from_numpy(kinds).long()
        self.loudness: Tensor = torch.from_numpy(loudness)
        self.opening: Tensor = torch.from_numpy(opening)
        self.frame_labels: Tensor = torch.from_numpy(frame_labels)
        self.labels: Tensor = (self.kinds == KINDS.index("speaking")).long()
        self.waves: Tensor = torch.from_numpy(_voice(rng, loudness, sample_rate, fps))
        eyes = np.where(rng.random((n, frames)) < 0.15, 0.15, 1.0)
        synced = (kinds == KINDS.index("still")) & (rng.random(n) < 0.5)
        eyes[synced] = 1 - 0.85 * loudness[synced]
        self.eye_sync: Tensor = torch.from_numpy(synced)
        self.params = self._face_params(rng, n, frames, size, self.opening, eyes)
        gen = torch.Generator().manual_seed(int(rng.integers(0, 2**31)))
        chunks = [draw_faces({k: v[i : i + 512] for k, v in self.params.items()}, size, gen)[0] for i in range(0, n * frames, 512)]
        self.frames: Tensor = torch.cat(chunks).view(n, frames, 3, size, size)
        p = self.params
        x0, x1 = p["cx"] - p["mouth_w"] - 1, p["cx"] + p["mouth_w"] + 1
        my, reach = p["cy"] + 0.5 * p["b"], p["lip"] + p["mouth_h"] + 1
        boxes = torch.stack([x0.floor(), (my - reach).floor(), x1.ceil(), (my + reach).ceil()], 1).clamp(0, size)
        self.mouth_boxes: Tensor = boxes.long().view(n, frames, 4)

    @staticmethod
    def _face_params(rng: np.random.Generator, n: int, frames: int, size: int, opening: Tensor, eyes: np.ndarray) -> dict[str, Tensor]:
        """Per-frame drawing parameters, ``(n * frames,)`` or ``(n * frames, 3)`` float32 tensors."""

        def clip(*shape: int, lo: float = 0.0, hi: float = 1.0) -> np.ndarray:
            return np.repeat(rng.uniform(lo, hi, (n, *shape)), frames, axis=0)

        tone = clip(1)
        skin = (1 - tone) * np.array([0.96, 0.80, 0.68]) + tone * np.array([0.42, 0.27, 0.18]) + clip(3, lo=-0.04, hi=0.04)
        a = clip(lo=0.34, hi=0.42) * size
        b = a * clip(lo=1.12, hi=1.25)
        walk = np.cumsum(rng.uniform(-0.6, 0.6, (n, frames, 2)), axis=1).reshape(n * frames, 2)
        centre = clip(2, lo=-0.05, hi=0.05) * size + size / 2 + walk
        p = {
            "cx": centre[:, 0], "cy": centre[:, 1] - 0.04 * size, "a": a, "b": b,
            "skin": skin, "hair": clip(3, lo=0.0, hi=0.5), "bg0": clip(3), "bg1": clip(3),
            "bg_angle": clip(lo=0, hi=2 * np.pi), "eye_open": eyes.reshape(-1),
            "mouth_w": a * clip(lo=0.38, hi=0.46), "lip": b * clip(lo=0.04, hi=0.05),
            "mouth_h": b * clip(lo=0.17, hi=0.21), "opening": opening.numpy().reshape(-1),
            "noise": clip(lo=0.01, hi=0.04),
        }  # fmt: skip
        return {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in p.items()}

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(frames (T, 3, S, S) normalized, wave (T * spf,), label (), frame labels (T,), mouth boxes (T, 4))."""
        return normalize_frames(self.frames[i]), self.waves[i], self.labels[i], self.frame_labels[i], self.mouth_boxes[i]
