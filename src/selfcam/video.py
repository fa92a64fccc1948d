"""Video SE-CAM (docs/design.md 2.2 step 4): one SE vector per clip, one heatmap per frame.

A clip is ``(N, T, C, H, W)``. :class:`VideoBackbone` runs a 2D CNN from
:func:`~selfcam.backbones.create_backbone` on every frame and a temporal convolution over
time, giving ``F (N, K, T, h, w)``. :class:`SqueezeExcite` squeezes ``F`` over every axis after
the channel one (time and space: one vector ``s (N, K)`` per clip), gates ``F * s`` and selects
channels with :func:`~selfcam.heads.se_select` exactly as :class:`~selfcam.heads.SEHead` does
(on the pre-sigmoid excitation by default, docs/methods.md says why); the mean of ``s_c F_c``
over the selected channels, min-max scaled per frame, is the map of each frame
``(N, T, h, w)``. :class:`VideoSelfExplainer` puts a classifier on top; ``explain`` upsamples
the maps to ``(N, T, H, W)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F_
from torch import Tensor, nn

from .backbones import create_backbone
from .cells import CellGrid
from .errors import ConfigError, InputError
from .heads import ExplainedOutput, check_se_options, se_select, upsample, weighted_map

__all__ = [
    "SEOutput",
    "SqueezeExcite",
    "VideoBackbone",
    "VideoConfig",
    "VideoSEHead",
    "VideoSelfExplainer",
    "check_clip",
    "create_video_model",
    "upsample_clip",
]


def check_clip(x: Any, in_chans: int, frames: int | None = None, what: str = "clip") -> None:
    """Raise :class:`InputError` unless ``x`` is a float ``(N, T, C, H, W)`` tensor with ``C == in_chans``
    (and ``T == frames`` when the model is built for a fixed clip length)."""
    if not isinstance(x, Tensor):
        raise InputError(f"{what}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 5:
        raise InputError(f"{what}: expected a clip of shape (N, T, C, H, W), got rank {x.dim()} shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise InputError(f"{what}: expected floating-point frames, got {x.dtype}")
    if x.shape[2] != in_chans:
        raise InputError(f"{what}: the model takes {in_chans} channel(s) per frame, got {x.shape[2]} (shape {tuple(x.shape)})")
    if frames is not None and x.shape[1] != frames:
        raise InputError(f"{what}: the model is built for clips of {frames} frames, got {x.shape[1]} (shape {tuple(x.shape)})")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise InputError(f"{what}: empty batch or clip, shape {tuple(x.shape)}")


def upsample_clip(maps: Tensor, size: tuple[int, int, int], mode: str = "bilinear", cells: CellGrid | None = None) -> Tensor:
    """Per-frame maps ``(N, T', h, w)`` -> ``(N, T, H, W)``, each frame min-max scaled to [0, 1].

    Time is resized linearly first when ``T' != T`` (a backbone that strides over time); each frame then goes
    through :func:`~selfcam.heads.upsample` with ``cells``, where the frame backbone centres its cells.
    """
    if maps.dim() != 4:
        raise InputError(f"upsample_clip expects maps of shape (N, T, h, w), got {tuple(maps.shape)}")
    t, h, w = size
    if maps.shape[1] != t:
        maps = F_.interpolate(maps.unsqueeze(1), size=(t, *maps.shape[-2:]), mode="trilinear", align_corners=False).squeeze(1)
    return upsample(maps.flatten(0, 1), (h, w), mode, cells).view(maps.shape[0], t, h, w)


@dataclass
class SEOutput:
    """What :class:`SqueezeExcite` returns for ``x (N, K, *rest)``.

    gated: ``x * s`` (same shape as ``x``); weights: ``s (N, K)`` in (0, 1); excitation: the
    pre-sigmoid ``e (N, K)``; selected: ``(N, K)`` bool, the channels that build the map.
    """

    gated: Tensor
    weights: Tensor
    excitation: Tensor
    selected: Tensor


class SqueezeExcite(nn.Module):
    """SE over every axis after the channel one: ``x (N, K, *rest)``, e.g. ``(N, K, T, h, w)`` or ``(N, D, T)``.

    ``s = sigmoid(W2 ReLU(W1 mean(x)))`` with no biases, as :class:`~selfcam.heads.SEHead` (``bias=True``:
    ``W1 z + b1`` and ``W2 h + b2``, as torchvision's and timm's SE), hidden width ``max(1, K // reduction)``;
    the selection rule runs on ``e`` (``space="logit"``) or on ``s`` (``"sigmoid"``, docs/design.md's literal rule) with ``factor`` (1.282: about the top 10 %).
    """

    def __init__(self, channels: int, reduction: int = 16, factor: float = 1.282, space: str = "logit", bias: bool = False) -> None:
        super().__init__()
        if channels < 1:
            raise ConfigError(f"SE channels must be >= 1, got {channels}")
        check_se_options(reduction, space)
        hidden = max(1, channels // reduction)
        self.excite = nn.Sequential(nn.Linear(channels, hidden, bias=bias), nn.ReLU(), nn.Linear(hidden, channels, bias=bias))
        self.channels, self.factor, self.space = channels, factor, space

    def forward(self, x: Tensor) -> SEOutput:
        if x.dim() < 3 or x.shape[1] != self.channels:
            raise InputError(f"SE block expects (N, {self.channels}, ...), got {tuple(x.shape)}")
        e = self.excite(x.flatten(2).mean(2))
        s = torch.sigmoid(e)
        selected = se_select((e if self.space == "logit" else s).detach(), self.factor)
        return SEOutput(gated=x * s.view(*s.shape, *[1] * (x.dim() - 2)), weights=s, excitation=e, selected=selected)

    @staticmethod
    def maps(x: Tensor, out: SEOutput) -> Tensor:
        """Mean over the selected channels of ``s_c x_c``, min-max scaled per frame: ``(N, K, *rest) -> (N, *rest)``."""
        return weighted_map(out.weights * out.selected, x, count=out.selected.sum(1))


class VideoBackbone(nn.Module):
    """A 2D CNN per frame and a residual temporal convolution: ``(N, T, C, H, W) -> F (N, K, T, h, w)``.

    ``F = ReLU(G + BN(Conv3d_{k x 1 x 1}(G)))`` where ``G`` stacks the per-frame maps; the
    temporal kernel ``k`` (odd) mixes neighbouring frames and keeps ``T' = T``.
    """

    def __init__(self, name: str = "resnet8", in_chans: int = 3, temporal_kernel: int = 3, **backbone_kwargs: Any) -> None:
        super().__init__()
        if temporal_kernel < 1 or temporal_kernel % 2 == 0:
            raise ConfigError(f"temporal_kernel must be an odd integer >= 1, got {temporal_kernel}")
        self.frame = create_backbone(name, in_chans, **backbone_kwargs)
        k = self.out_channels = self.frame.out_channels
        self.in_chans = in_chans
        self.temporal = nn.Sequential(
            nn.Conv3d(k, k, (temporal_kernel, 1, 1), padding=(temporal_kernel // 2, 0, 0), bias=False), nn.BatchNorm3d(k)
        )

    def cell_grid(self, size: tuple[int, int]) -> CellGrid | None:
        """Where the cells of ``F`` sit in a frame of ``size``: the frame backbone's (the temporal convolution is 1x1 in space)."""
        return self.frame.cell_grid(size)

    def forward(self, x: Tensor) -> Tensor:
        n, t = x.shape[:2]
        g = self.frame.forward_features(x.flatten(0, 1))  # (N*T, K, h, w)
        g = g.view(n, t, *g.shape[1:]).transpose(1, 2)  # (N, K, T, h, w)
        return torch.relu(g + self.temporal(g))


class VideoSEHead(nn.Module):
    """SE-CAM for clips: ``F (N, K, T, h, w)`` -> logits from the mean of ``F * s`` over time and
    space, and per-frame maps ``(N, T, h, w)`` in [0, 1]."""

    def __init__(self, in_channels: int, num_classes: int, reduction: int = 16, factor: float = 1.282, space: str = "logit") -> None:
        super().__init__()
        if num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
        self.se = SqueezeExcite(in_channels, reduction, factor, space)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, features: Tensor) -> ExplainedOutput:
        out = self.se(features)
        logits = self.fc(out.gated.flatten(2).mean(2))
        heat = self.se.maps(features, out)
        return ExplainedOutput(logits=logits, heatmap=heat, channel_weights=out.weights, selected=out.selected)


@dataclass(frozen=True)
class VideoConfig:
    """What builds a :class:`VideoSelfExplainer`; ``frames=None`` accepts clips of any length."""

    backbone: str = "resnet8"
    num_classes: int = 2
    in_chans: int = 3
    frames: int | None = None
    temporal_kernel: int = 3
    head_kwargs: dict[str, Any] = field(default_factory=dict)
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)


class VideoSelfExplainer(nn.Module):
    """Video backbone + :class:`VideoSEHead`: ``forward(x (N, T, C, H, W))`` gives logits ``(N, classes)``
    and per-frame maps ``(N, T, h, w)`` (``heatmap`` of an :class:`~selfcam.heads.ExplainedOutput`)."""

    task = "video"

    def __init__(self, config: VideoConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = VideoBackbone(config.backbone, config.in_chans, config.temporal_kernel, **config.backbone_kwargs)
        try:
            self.head = VideoSEHead(self.backbone.out_channels, config.num_classes, **config.head_kwargs)
        except TypeError as e:
            raise ConfigError(f"bad option for the video SE head: {e}") from e

    def forward(self, x: Tensor) -> ExplainedOutput:
        check_clip(x, self.config.in_chans, self.config.frames)
        return self.head(self.backbone(x))

    def explain(self, x: Tensor, mode: str = "bilinear") -> ExplainedOutput:
        """Like ``forward`` with the maps upsampled to the clip's size ``(N, T, H, W)``."""
        out = self(x)
        out.heatmap = upsample_clip(out.heatmap, (x.shape[1], *x.shape[-2:]), mode, self.backbone.cell_grid(x.shape[-2:]))
        return out

    def loss(self, out: ExplainedOutput, target: Tensor) -> Tensor:
        """Cross-entropy on the clip logits."""
        return F_.cross_entropy(out.logits, target)


def create_video_model(
    backbone: str = "resnet8",
    num_classes: int = 2,
    in_chans: int = 3,
    frames: int | None = None,
    temporal_kernel: int = 3,
    backbone_kwargs: dict[str, Any] | None = None,
    **head_kwargs: Any,
) -> VideoSelfExplainer:
    """Build a video SE-CAM model; ``head_kwargs`` (``reduction``, ``factor``, ``space``) go to :class:`VideoSEHead`."""
    if frames is not None and frames < 1:
        raise ConfigError(f"frames must be >= 1 or None, got {frames}")
    cfg = VideoConfig(backbone, num_classes, in_chans, frames, temporal_kernel, dict(head_kwargs), dict(backbone_kwargs or {}))
    return VideoSelfExplainer(cfg)
