"""Audio-visual active speaker detection with SE-CAM (docs/design.md 2.2 step 5). Shapes: docs/asd.md.

``ASDModel(ASDConfig())`` takes face clips ``(N, T, 3, H, W)`` and 16 kHz waveforms ``(N, T * 640)``:

1. audio: :class:`LogMel` ``(N, n_mels, 4 T)`` -> :class:`AudioEncoder` -> ``(N, D_a, T)``;
2. face: :class:`~selfcam.video.VideoBackbone` ``F (N, K, T, h, w)`` -> its own
   :class:`~selfcam.video.SqueezeExcite` (per-frame heatmaps ``(N, T, h, w)``) -> spatial mean of
   ``F * s_v`` -> ``(N, D_v = K, T)``;
3. concatenation ``(N, D_a + D_v, T)`` -> one SE block over it (squeezed over time) ->
   temporal convolutions -> clip logits ``(N, 2)`` and frame logits ``(N, T, 2)``.

The importance of a modality (per clip; :func:`importance_by_class` averages it over a split by class)
has two definitions (:data:`IMPORTANCE_DEFINITIONS`, ``ASDConfig.importance`` picks the one ``importance``
holds; ``importances`` holds both): ``"removal"`` (default), how far the speaking probability moves when
the modality is removed (its input replaced by silence or a blank frame, the fusion recomputed), and
``"se_mean"``, the paper's mean SE weight ``s`` over its slice of the concatenated embedding. Training runs
through :func:`selfcam.train.fit` (the ``asd`` task of :mod:`selfcam.tasks`; in training, ``audio_dropout``
of the clips are heard as silence) and runs are saved like every other (:mod:`selfcam.checkpoint`).
:func:`evaluate_asd` scores a model; the demo is ``selfcam demo --task asd`` (:mod:`selfcam.demo`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, ClassVar

import torch
import torch.nn.functional as F_
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .data.digits import box_mask
from .errors import ConfigError, InputError
from .metrics import pointing_game, zhang_tolerance
from .video import SqueezeExcite, VideoBackbone, check_clip, upsample_clip

__all__ = [
    "ASDConfig",
    "ASDModel",
    "ASDOutput",
    "AudioEncoder",
    "LogMel",
    "IMPORTANCE_DEFINITIONS",
    "MODALITIES",
    "evaluate_asd",
    "importance_by_class",
    "log_mel",
    "mel_filterbank",
    "modality_importance",
    "predict_asd",
    "removal_importance",
]

MODALITIES: tuple[str, ...] = ("audio", "face")  # order of the slices in the concatenated embedding
IMPORTANCE_DEFINITIONS: tuple[str, ...] = ("removal", "se_mean")  # docs/asd.md compares them
LOG_EPS = 1e-3  # log(mel + eps): silence sits at log(1e-3) = -6.9, just under the generator's noise floor
AUDIO_SCALE = 5.0  # log-mel is fed as (log(mel + eps) - log(eps)) / AUDIO_SCALE: silence is exactly 0


# --- audio features -------------------------------------------------------------------


@lru_cache(maxsize=8)
def mel_filterbank(n_freqs: int, n_mels: int, sample_rate: int, f_min: float = 0.0, f_max: float | None = None) -> Tensor:
    """Triangular filters on the HTK mel scale ``2595 log10(1 + f / 700)``, peak 1: ``(n_freqs, n_mels)``.

    ``n_mels + 2`` points equally spaced in mel between ``f_min`` and ``f_max`` (default Nyquist)
    give the edges and centres; the FFT bins are ``linspace(0, sample_rate / 2, n_freqs)``. The
    same filters as ``torchaudio.functional.melscale_fbanks(..., norm=None, mel_scale="htk")``.
    """
    f_max = sample_rate / 2 if f_max is None else f_max
    if not 0 <= f_min < f_max <= sample_rate / 2 or n_mels < 1 or n_freqs < 2:
        raise ConfigError(f"mel filterbank needs 0 <= f_min < f_max <= {sample_rate / 2}, n_mels >= 1, got {f_min}, {f_max}, {n_mels}")
    freqs = torch.linspace(0, sample_rate / 2, n_freqs, dtype=torch.float64)
    mel = torch.linspace(2595 * math.log10(1 + f_min / 700), 2595 * math.log10(1 + f_max / 700), n_mels + 2, dtype=torch.float64)
    hz = 700 * (10 ** (mel / 2595) - 1)
    rise = (freqs[:, None] - hz[None, :-2]) / (hz[1:-1] - hz[:-2])
    fall = (hz[None, 2:] - freqs[:, None]) / (hz[2:] - hz[1:-1])
    return torch.minimum(rise, fall).clamp(min=0).float()


def log_mel(wave: Tensor, sample_rate: int = 16000, n_mels: int = 40, n_fft: int = 512, hop: int = 160, eps: float = LOG_EPS,
            dft: bool | None = None) -> Tensor:  # fmt: skip
    """``(N, S)`` waveforms -> ``log(mel power + eps)`` ``(N, n_mels, S // hop)``.

    Hann-windowed ``torch.stft`` (centred, reflect padding), power spectrum, :func:`mel_filterbank`;
    the last (half-padded) frame is dropped so that ``hop`` samples make one frame exactly.
    ``dft=True`` computes the same spectrum as a strided ``conv1d`` with the Hann-windowed DFT basis
    (cos and sin rows; after the log within 2e-6 of ``torch.stft`` on noise-like audio, 7e-5 on a pure tone,
    whose leakage bins are float32 round-off in both; tests/test_export.py); ``None``
    (default) does so only inside ``torch.onnx.export``, which cannot export ``stft``'s complex output.
    """
    if not isinstance(wave, Tensor) or wave.dim() != 2 or not wave.is_floating_point():
        desc = f"{wave.dtype} {tuple(wave.shape)}" if isinstance(wave, Tensor) else type(wave).__name__
        raise InputError(f"waveforms must be a float tensor (N, samples), got {desc}")
    if wave.shape[1] < n_fft // 2 + 1:
        raise InputError(f"waveforms of {wave.shape[1]} samples are too short for n_fft={n_fft}")
    if torch.onnx.is_in_onnx_export() if dft is None else dft:
        half, bins = n_fft // 2, n_fft // 2 + 1
        k = torch.arange(n_fft, dtype=torch.float64)
        angle = (2 * math.pi / n_fft) * (k[:, None] * k[None, :bins] % n_fft)  # (n_fft, bins)
        basis = torch.hann_window(n_fft, dtype=torch.float64)[:, None] * torch.cat([angle.cos(), angle.sin()], 1)
        # stft's center=True reflect padding, by hand: F_.pad's reflect loses the static shapes in ONNX
        padded = torch.cat([wave[:, 1 : half + 1].flip(1), wave, wave[:, -half - 1 : -1].flip(1)], 1)
        spec = F_.conv1d(padded[:, None], basis.T[:, None].to(wave.device, wave.dtype), stride=hop)  # (N, 2 bins, S // hop + 1)
        power = spec[:, :bins].square() + spec[:, bins:].square()
        power = power[..., : int(wave.shape[1]) // hop]  # int(): a constant when traced, so ONNX keeps a static time axis
    else:
        spec = torch.stft(wave, n_fft, hop, window=torch.hann_window(n_fft, device=wave.device), center=True, return_complex=True)
        power = spec.abs().square()[..., : wave.shape[1] // hop]  # (N, n_fft // 2 + 1, frames)
    fb = mel_filterbank(n_fft // 2 + 1, n_mels, sample_rate).to(wave.device)
    return torch.log(torch.einsum("nft,fm->nmt", power, fb) + eps)


class LogMel(nn.Module):
    """:func:`log_mel` referenced to silence, ``(x - log(eps)) / AUDIO_SCALE``: ``(N, S) -> (N, n_mels, S // hop)``,
    0 for silence and positive for any sound (about 1 on average on the synthetic clips, at most 3)."""

    def __init__(self, sample_rate: int = 16000, n_mels: int = 40, n_fft: int = 512, hop: int = 160) -> None:
        super().__init__()
        self.sample_rate, self.n_mels, self.n_fft, self.hop = sample_rate, n_mels, n_fft, hop

    def forward(self, wave: Tensor) -> Tensor:
        return (log_mel(wave, self.sample_rate, self.n_mels, self.n_fft, self.hop) - math.log(LOG_EPS)) / AUDIO_SCALE


def _conv_relu(cin: int, cout: int) -> list[nn.Module]:
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return [conv, nn.ReLU()]


class AudioEncoder(nn.Module):
    """A small 2D CNN on the log-mel image: ``(N, n_mels, A) -> (N, dim, T)``.

    Three 3x3 conv + ReLU (16, 32, ``dim`` channels) with 2x2 max pooling after the first two,
    mean over the mel axis, then average pooling of the ``A / 4`` time steps to ``T``. No biases and
    no normalization layers: the encoder is positively homogeneous, so silence (an all-zero
    :class:`LogMel`) gives an all-zero embedding, and the fusion SE sees "no sound" as "no signal".
    """

    def __init__(self, dim: int = 64) -> None:
        super().__init__()
        self.body = nn.Sequential(*_conv_relu(1, 16), nn.MaxPool2d(2), *_conv_relu(16, 32), nn.MaxPool2d(2), *_conv_relu(32, dim))
        self.dim = dim

    def forward(self, mel: Tensor, frames: int) -> Tensor:
        x = self.body(mel.unsqueeze(1)).mean(2)  # (N, dim, A / 4)
        return F_.adaptive_avg_pool1d(x, frames)


# --- the multimodal model ---------------------------------------------------------------


@dataclass(frozen=True)
class ASDConfig:
    """What builds an :class:`ASDModel` (stored in ``config.json`` under ``"asd"``)."""

    num_classes: ClassVar[int] = 2  # not speaking / speaking
    frames: int = 8
    in_chans: int = 3
    backbone: str = "resnet8"
    backbone_kwargs: dict[str, Any] = field(default_factory=lambda: {"stem_stride": 2})
    temporal_kernel: int = 3
    visual_reduction: int = 4
    audio_dim: int = 64
    fusion_reduction: int = 8
    fusion_dim: int = 64
    fusion_bias: bool = False
    gate_l1: float = 0.0
    audio_dropout: float = 0.0
    face_pool: str = "mean"
    importance: str = "removal"
    factor: float = 1.282
    space: str = "logit"
    sample_rate: int = 16000
    fps: int = 25
    n_mels: int = 40

    def __post_init__(self) -> None:
        for name in ("frames", "in_chans", "visual_reduction", "audio_dim", "fusion_reduction", "fusion_dim", "fps", "n_mels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"ASD config: {name} must be an integer >= 1, got {value!r}")
        if self.importance not in IMPORTANCE_DEFINITIONS:
            raise ConfigError(f"ASD config: importance must be one of {', '.join(IMPORTANCE_DEFINITIONS)}, got {self.importance!r}")
        if self.face_pool not in ("mean", "max"):
            raise ConfigError(f"ASD config: face_pool must be 'mean' or 'max', got {self.face_pool!r}")
        if not (self.gate_l1 >= 0 and math.isfinite(self.gate_l1)):
            raise ConfigError(f"ASD config: gate_l1 must be a finite number >= 0, got {self.gate_l1!r}")
        if not 0 <= self.audio_dropout < 1:
            raise ConfigError(f"ASD config: audio_dropout must be in [0, 1), got {self.audio_dropout!r}")
        if self.sample_rate % self.fps or (self.sample_rate // self.fps) % 160:
            raise ConfigError(f"ASD config: sample_rate / fps must be a multiple of the 160-sample hop, got {self.sample_rate} / {self.fps}")

    @property
    def samples_per_frame(self) -> int:
        return self.sample_rate // self.fps


@dataclass
class ASDOutput:
    """What :class:`ASDModel` returns.

    logits ``(N, 2)`` clip logits; frame_logits ``(N, T, 2)``; heatmap ``(N, T, h, w)`` per-frame
    maps in [0, 1] from the face encoder's SE; se_weights ``(N, D_a + D_v)`` the fusion SE vector
    ``s``; face_weights / face_selected ``(N, K)`` the face SE vector and its selected channels;
    importances: definition (:data:`IMPORTANCE_DEFINITIONS`) -> modality -> ``(N,)``: ``"removal"``
    (:func:`removal_importance`) and ``"se_mean"`` (:func:`modality_importance`, the paper's);
    importance: the one of them ``ASDConfig.importance`` names.
    """

    logits: Tensor
    frame_logits: Tensor
    heatmap: Tensor
    se_weights: Tensor
    face_weights: Tensor
    face_selected: Tensor
    importance: dict[str, Tensor]
    importances: dict[str, dict[str, Tensor]] = field(default_factory=dict)

    @property
    def score(self) -> Tensor:
        """Speaking score per clip ``(N,)``: logit(speaking) - logit(not speaking)."""
        return self.logits[:, 1] - self.logits[:, 0]

    @property
    def frame_score(self) -> Tensor:
        """Speaking score per frame ``(N, T)``."""
        return self.frame_logits[..., 1] - self.frame_logits[..., 0]


def modality_importance(se_weights: Tensor, sizes: dict[str, int]) -> dict[str, Tensor]:
    """Mean of ``se_weights (N, D)`` over consecutive slices of the given sizes: name -> ``(N,)``."""
    if se_weights.dim() != 2 or se_weights.shape[1] != sum(sizes.values()):
        raise InputError(f"SE weights {tuple(se_weights.shape)} do not split into slices of sizes {sizes}")
    parts = torch.split(se_weights, list(sizes.values()), dim=1)
    return {name: part.mean(1) for name, part in zip(sizes, parts)}


def removal_importance(prob: Tensor, removed: dict[str, Tensor]) -> dict[str, Tensor]:
    """``|p - p_without_m|`` per clip: ``prob (N,)`` the speaking probability, ``removed`` modality -> ``(N,)`` the
    speaking probability with that modality removed. In [0, 1]; 0 where removing the modality changes nothing."""
    return {m: (prob - p).abs() for m, p in removed.items()}


def importance_by_class(importance: dict[str, Tensor], labels: Tensor, names: tuple[str, str] = ("not_speaking", "speaking")) -> dict[str, dict[str, float]]:
    """Dataset-level importance: per class name, the mean over its clips of each modality's importance."""
    out: dict[str, dict[str, float]] = {}
    for c in (1, 0):
        hit = labels == c
        out[names[c]] = {m: float(v[hit].mean()) if hit.any() else float("nan") for m, v in importance.items()}
    return out


class ASDModel(nn.Module):
    """Audio encoder + face encoder (video backbone with its own SE) + an SE block over the concatenated
    per-frame embeddings + a temporal classifier; see the module docstring for the shapes."""

    task: ClassVar[str] = "asd"

    def __init__(self, config: ASDConfig | None = None) -> None:
        super().__init__()
        c = self.config = config or ASDConfig()
        self.mel = LogMel(c.sample_rate, c.n_mels)
        self.audio = AudioEncoder(c.audio_dim)
        self.face = VideoBackbone(c.backbone, c.in_chans, c.temporal_kernel, **c.backbone_kwargs)
        self.face_se = SqueezeExcite(self.face.out_channels, c.visual_reduction, c.factor, c.space)
        self.sizes = {"audio": c.audio_dim, "face": self.face.out_channels}
        width = sum(self.sizes.values())
        self.fusion_se = SqueezeExcite(width, c.fusion_reduction, c.factor, c.space, c.fusion_bias)
        h = c.fusion_dim
        self.temporal = nn.Sequential(
            nn.Conv1d(width, h, 3, padding=1, bias=False), nn.BatchNorm1d(h), nn.ReLU(),
            nn.Conv1d(h, h, 3, padding=1, bias=False), nn.BatchNorm1d(h), nn.ReLU(),
        )  # fmt: skip
        self.clip_fc = nn.Linear(h, 2)
        self.frame_fc = nn.Conv1d(2 * h, 2, 1)

    def check_inputs(self, frames: Tensor, wave: Tensor, sample_rate: int | None = None) -> None:
        """Raise :class:`InputError` naming the problem unless the clip and the audio fit the model."""
        c = self.config
        check_clip(frames, c.in_chans, c.frames, "frames")
        if sample_rate is not None and sample_rate != c.sample_rate:
            raise InputError(f"audio: the model takes {c.sample_rate} Hz audio, got {sample_rate} Hz; resample it first")
        want = c.frames * c.samples_per_frame
        if not isinstance(wave, Tensor) or wave.dim() != 2 or not wave.is_floating_point():
            desc = f"{wave.dtype} {tuple(wave.shape)}" if isinstance(wave, Tensor) else type(wave).__name__
            raise InputError(f"audio: expected float waveforms (N, {want}), got {desc}")
        if wave.shape != (len(frames), want):
            raise InputError(f"audio: expected (N, samples) = {(len(frames), want)} ({c.frames} frames x "
                             f"{c.samples_per_frame} samples at {c.sample_rate} Hz / {c.fps} fps), got {tuple(wave.shape)}")  # fmt: skip

    def forward(self, frames: Tensor, wave: Tensor, sample_rate: int | None = None) -> ASDOutput:
        self.check_inputs(frames, wave, sample_rate)
        p = self.config.audio_dropout
        if self.training and p:  # modality dropout: these clips are heard as silence, labels unchanged
            wave = wave * (torch.rand(len(wave), 1, device=wave.device) >= p)
        t = frames.shape[1]
        audio = self.audio(self.mel(wave), t)  # (N, D_a, T)
        feats, face_se, face = self._face(frames)  # F (N, K, T, h, w), its SE, the pooled embedding (N, K, T)
        fused, logits, frame_logits = self._fuse(audio, face)
        importances = {"removal": self._removal(frames, wave, audio, face, logits),
                       "se_mean": modality_importance(fused.weights, self.sizes)}  # fmt: skip
        return ASDOutput(
            logits=logits, frame_logits=frame_logits,
            heatmap=self.face_se.maps(feats, face_se),
            se_weights=fused.weights, face_weights=face_se.weights, face_selected=face_se.selected,
            importance=importances[self.config.importance], importances=importances,
        )  # fmt: skip

    def _face(self, frames: Tensor) -> tuple[Tensor, Any, Tensor]:
        feats = self.face(frames)  # (N, K, T, h, w)
        face_se = self.face_se(feats)
        gated = face_se.gated.flatten(-2)
        return feats, face_se, gated.mean(-1) if self.config.face_pool == "mean" else gated.amax(-1)  # (N, K, T)

    def _fuse(self, audio: Tensor, face: Tensor) -> tuple[Any, Tensor, Tensor]:
        """The fusion SE over ``[audio; face]`` and the temporal classifier: (SE output, clip logits, frame logits)."""
        fused = self.fusion_se(torch.cat([audio, face], 1))
        h = self.temporal(fused.gated)  # (N, H, T)
        g = h.mean(2)
        frame_logits = self.frame_fc(torch.cat([h, g[:, :, None].expand_as(h)], 1)).transpose(1, 2)
        return fused, self.clip_fc(g), frame_logits

    def _removal(self, frames: Tensor, wave: Tensor, audio: Tensor, face: Tensor, logits: Tensor) -> dict[str, Tensor]:
        """:func:`removal_importance`: each modality's embedding replaced by that of its absent input (the audio
        by silence's, the face by a blank clip's: zeros in the normalized input, the data's mean colour) and the
        fusion recomputed, as the model would for that input (the encoders are separate, so this is exactly
        ``p(speaking)`` for the clip with that modality removed). No gradient; in training the normalization layers
        run in eval mode for these passes (their statistics are not updated) and the clip's own probability is
        recomputed the same way."""
        with torch.no_grad(), _eval_norms(self) as switched:
            t = frames.shape[1]
            # int(): constant shapes when traced (ONNX export), as log_mel's
            silent = self.audio(self.mel(wave.new_zeros((1, int(wave.shape[1])))), int(t)).expand_as(audio)
            blank = self._face(frames.new_zeros((1, *(int(v) for v in frames.shape[1:]))))[2].expand_as(face)
            prob = self._fuse(audio, face)[1] if switched else logits
            removed = {"audio": self._fuse(silent, face)[1], "face": self._fuse(audio, blank)[1]}
            return removal_importance(prob.softmax(1)[:, 1], {m: v.softmax(1)[:, 1] for m, v in removed.items()})

    def explain(self, frames: Tensor, wave: Tensor, mode: str = "bilinear") -> ASDOutput:
        """Like ``forward`` with the per-frame maps upsampled to ``(N, T, H, W)``."""
        out = self(frames, wave)
        out.heatmap = upsample_clip(out.heatmap, (frames.shape[1], *frames.shape[-2:]), mode, self.face.cell_grid(frames.shape[-2:]))
        return out

    def loss(self, out: ASDOutput, label: Tensor, frame_labels: Tensor) -> Tensor:
        """Cross-entropy on the clip logits plus the mean cross-entropy on the frame logits, plus
        ``gate_l1`` times the mean fusion-SE weight (an open gate has to pay for itself)."""
        loss = F_.cross_entropy(out.logits, label) + F_.cross_entropy(out.frame_logits.flatten(0, 1), frame_labels.flatten())
        return loss + self.config.gate_l1 * out.se_weights.mean() if self.config.gate_l1 else loss


@contextmanager
def _eval_norms(model: nn.Module) -> Iterator[bool]:
    """Normalization layers in eval mode inside (restored after); yields whether any was in training mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase) and m.training]
    for m in norms:
        m.training = False
    try:
        yield bool(norms)
    finally:
        for m in norms:
            m.training = True


# --- evaluation -----------------------------------------------------------------------------


@torch.no_grad()
def predict_asd(model: ASDModel, dataset: Dataset, batch_size: int = 64, silent: bool = False, blank: bool = False) -> dict[str, Any]:
    """Run ``model`` (eval mode) over ``dataset``; with ``silent`` every waveform is replaced by zeros, with ``blank``
    every face frame by a blank one (zeros in the normalized input: the data's mean colour).

    Returns ``score (n,)``, ``frame_score (n, T)``, ``labels (n,)``, ``frame_labels (n, T)``,
    ``importance`` (modality -> ``(n,)``, the model's default definition), ``importances`` (definition ->
    modality -> ``(n,)``, every definition the model gives) and, when the dataset yields mouth boxes,
    ``pointing (n, T)``: 1.0 where the frame's upsampled map peaks inside the mouth box, and
    ``pointing_tol (n, T)``: the same within ``round(15 H / 224)`` pixels of it (Zhang et al.'s
    pointing game allows 15 px at 224 px).
    """
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    keys = ("score", "frame_score", "labels", "frame_labels", "pointing", "pointing_tol")
    acc: dict[str, list[Tensor]] = {k: [] for k in keys}
    imp: dict[str, list[Tensor]] = {m: [] for m in model.sizes}
    imps: dict[str, dict[str, list[Tensor]]] = {}
    face = getattr(model, "face", None)  # the frame backbone's cells place the maps (selfcam.cells)
    for batch in DataLoader(dataset, batch_size):
        frames, wave, y, fy = (b.to(device) for b in batch[:4])
        out = model(torch.zeros_like(frames) if blank else frames, torch.zeros_like(wave) if silent else wave)
        acc["score"].append(out.score.cpu())
        acc["frame_score"].append(out.frame_score.cpu())
        acc["labels"].append(y.cpu())
        acc["frame_labels"].append(fy.cpu())
        for m, v in out.importance.items():
            imp[m].append(v.cpu())
        for d, per in out.importances.items():
            for m, v in per.items():
                imps.setdefault(d, {}).setdefault(m, []).append(v.cpu())
        if len(batch) > 4:
            n, t, _, hh, ww = frames.shape
            cells = face.cell_grid((hh, ww)) if face is not None else None
            maps = upsample_clip(out.heatmap, (t, hh, ww), cells=cells).flatten(0, 1)
            masks = box_mask(batch[4].to(device).flatten(0, 1), (hh, ww))
            acc["pointing"].append(pointing_game(maps, masks).view(n, t).cpu())
            acc["pointing_tol"].append(pointing_game(maps, masks, tolerance=zhang_tolerance(hh)).view(n, t).cpu())
    model.train(was)
    res: dict[str, Any] = {k: torch.cat(v) for k, v in acc.items() if v}
    res["importance"] = {m: torch.cat(v) for m, v in imp.items()}
    res["importances"] = {d: {m: torch.cat(v) for m, v in per.items()} for d, per in imps.items()}
    return res


def _ap(labels: Tensor, scores: Tensor) -> float:
    from sklearn.metrics import average_precision_score  # here, not at import: scikit-learn takes ~1 s to import

    labels = labels.flatten().numpy()
    return float(average_precision_score(labels, scores.flatten().numpy())) if 0 < labels.sum() < len(labels) else float("nan")


def _scores(p: dict[str, Any]) -> dict[str, float]:
    """Detection metrics of one :func:`predict_asd` result."""
    out = {
        "mAP": _ap(p["frame_labels"], p["frame_score"]),
        "clip_AP": _ap(p["labels"], p["score"]),
        "frame_accuracy": float(((p["frame_score"] > 0).long() == p["frame_labels"]).float().mean()),
        "clip_accuracy": float(((p["score"] > 0).long() == p["labels"]).float().mean()),
    }
    if "pointing" in p:
        speaking = (p["frame_labels"] == 1) & (p["labels"] == 1)[:, None]
        clips = (p["labels"] == 1)[:, None].expand_as(speaking)
        for key, hits in (("mouth_pointing_game", p["pointing"]), ("mouth_pointing_game_15px", p["pointing_tol"])):
            out[key] = float(hits[speaking].mean()) if speaking.any() else float("nan")
        out["mouth_pointing_game_all_frames"] = float(p["pointing"][clips].mean()) if clips.any() else float("nan")
    return out


def _checks(real: dict[str, Tensor], silent: dict[str, Tensor], blank: dict[str, Tensor], labels: Tensor,
            definition: str) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """The silence check and the blank-face check of one importance definition (modality -> ``(n,)`` each)."""
    mean = {name: {m: float(v.mean()) for m, v in imp.items()} for name, imp in (("real", real), ("silent", silent), ("blank", blank))}

    def check(altered: dict[str, Tensor], key: str, removed: str, kept: str) -> dict[str, Any]:
        return {
            "definition": definition,
            f"{removed}_importance": mean["real"][removed], f"{removed}_importance_{key}": mean[key][removed],
            f"{kept}_importance": mean["real"][kept], f"{kept}_importance_{key}": mean[key][kept],
            f"{removed}_importance_falls": mean[key][removed] < mean["real"][removed],
            f"{key}_modality_importance": importance_by_class(altered, labels),
        }  # fmt: skip

    return check(silent, "silent", "audio", "face"), check(blank, "blank", "face", "audio")


def evaluate_asd(model: ASDModel, dataset: Dataset, batch_size: int = 64) -> dict[str, Any]:
    """Every ASD metric on ``dataset`` (definitions in docs/asd.md).

    ``mAP``: average precision of the per-frame speaking score over every (clip, frame) pair, as AVA
    ActiveSpeaker scores entity-frames; ``clip_AP`` the same over clips; ``frame_accuracy`` and
    ``clip_accuracy`` at score 0; ``mouth_pointing_game`` over the speaking frames of speaking clips;
    ``modality_importance`` per class (the model's importance definition, ``ASDConfig.importance``);
    ``silence_check``: the same with every waveform replaced by zeros (mean importance over all clips,
    detection metrics, and whether the audio importance falls); ``blank_face_check``: the same with every
    face frame blank (whether the face importance falls); ``se_mean_checks`` (when the model's default is
    another definition): both checks for the paper's mean SE weight, with ``modality_importance`` by class.
    """
    real = predict_asd(model, dataset, batch_size)
    silent = predict_asd(model, dataset, batch_size, silent=True)
    blank = predict_asd(model, dataset, batch_size, blank=True)
    labels = real["labels"]
    default = getattr(getattr(model, "config", None), "importance", "se_mean")
    metrics: dict[str, Any] = _scores(real)
    metrics["modality_importance"] = importance_by_class(real["importance"], labels)
    silence, blank_face = _checks(real["importance"], silent["importance"], blank["importance"], labels, default)
    silence["silent_scores"] = {k: v for k, v in _scores(silent).items() if not k.startswith("mouth")}
    blank_face["blank_scores"] = {k: v for k, v in _scores(blank).items() if not k.startswith("mouth")}
    metrics["silence_check"], metrics["blank_face_check"] = silence, blank_face
    if default != "se_mean" and "se_mean" in real["importances"]:
        se_silence, se_blank = _checks(*(p["importances"]["se_mean"] for p in (real, silent, blank)), labels, "se_mean")
        metrics["se_mean_checks"] = {"modality_importance": importance_by_class(real["importances"]["se_mean"], labels),
                                     "silence_check": se_silence, "blank_face_check": se_blank}  # fmt: skip
    return metrics
