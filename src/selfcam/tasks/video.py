"""The ``video`` task: clips ``(N, T, C, H, W)``, one SE vector per clip, one map per frame."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..video import VideoConfig, VideoSelfExplainer, create_video_model
from .base import MAPS_NOTE, Task, TaskGraph, clip_options, register_task

__all__ = ["CLIP_METRICS", "VideoTask"]

CLIP_METRICS = ("accuracy", "pointing_game", "pointing_game_15px", "energy_pointing_game", "iou", "dice", "temporal_stability")


@register_task("video")
class VideoTask(Task):
    """Clips -> :class:`~selfcam.video.VideoSelfExplainer`; batches ``(clip, label[, boxes (T, 4)])``."""

    config_type: ClassVar[type] = VideoConfig
    dataset_kind: ClassVar[str] = "video"
    default_data: ClassVar[str] = "synthetic-clips"
    graph: ClassVar[TaskGraph] = TaskGraph(("clip",), ("logits", "heatmap"), {"heatmap": "one map per frame, " + MAPS_NOTE})
    metrics: ClassVar[tuple[str, ...]] = CLIP_METRICS

    def build(self, config: VideoConfig) -> nn.Module:
        return VideoSelfExplainer(config)

    def new_model(self, dataset: Any, backbone: str, backbone_kwargs: dict[str, Any], options: dict[str, Any]) -> nn.Module:
        temporal = options.pop("temporal_kernel", 3)
        return create_video_model(backbone, dataset.num_classes, dataset.in_chans, getattr(dataset, "num_frames", None),
                                  temporal, backbone_kwargs, **options)  # fmt: skip

    def describe(self, config: VideoConfig) -> str:
        return f"video SE on {config.backbone}"

    def example_inputs(self, model: nn.Module, batch: int = 2, size: int | None = None) -> tuple[Tensor, ...]:
        c = model.config
        return (torch.randn(batch, c.frames or 4, c.in_chans, size or 32, size or 32),)

    def data_record(self, dataset: Any) -> dict[str, Any]:
        return {**super().data_record(dataset), "frames": dataset.num_frames}

    def data_options(self, record: dict[str, Any]) -> dict[str, Any]:
        options = clip_options(record, ("synthetic-clips",))
        if str(record.get("name")).startswith("videofolder:"):  # its clip length and channels (data/videos.py)
            options.update({"frames": record["frames"]} if record.get("frames") else {})
            options.update({"mode": "L"} if record.get("in_chans") == 1 else {})
        return options

    def evaluate(self, models: dict[str, nn.Module], dataset: Any, cfg: Any, progress: Any = None,
                 devices: int = 1) -> dict[str, Any]:  # fmt: skip
        from ..evaluate import evaluate_clips

        return evaluate_clips(models, dataset, cfg, progress)
