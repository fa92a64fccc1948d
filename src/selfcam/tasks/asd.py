"""The ``asd`` task: audio-visual active speaker detection, face clips + waveforms, modality importance."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..asd import MODALITIES, ASDConfig, ASDModel
from ..errors import ConfigError
from .base import MAPS_NOTE, Task, TaskGraph, clip_options, register_task

__all__ = ["ASDTask", "ASD_METRICS"]

ASD_METRICS = ("mAP", "clip_AP", "frame_accuracy", "clip_accuracy", "mouth_pointing_game", "mouth_pointing_game_15px",
               "mouth_pointing_game_all_frames")  # fmt: skip


def _modality_importance(out: Any) -> Tensor:
    """The importance dict (modality -> ``(N,)``) as ``(N, len(MODALITIES))``, columns in MODALITIES order."""
    return torch.stack([out.importance[m] for m in MODALITIES], 1)


@register_task("asd")
class ASDTask(Task):
    """``(frames (N, T, 3, H, W), wave (N, S))`` -> :class:`~selfcam.asd.ASDModel`; batches
    ``(frames, wave, label, frame_labels[, mouth boxes])``, loss on clip and frame labels."""

    config_type: ClassVar[type] = ASDConfig
    dataset_kind: ClassVar[str] = "asd"
    default_data: ClassVar[str] = "speaker-clips"
    graph: ClassVar[TaskGraph] = TaskGraph(
        ("frames", "audio"),
        ("logits", "frame_logits", "heatmap", "modality_importance"),
        {"heatmap": "one map per frame, " + MAPS_NOTE, "modality_importance": "columns " + ", ".join(MODALITIES)},
        {"modality_importance": _modality_importance},
        {"modalities": list(MODALITIES)},
    )
    metrics: ClassVar[tuple[str, ...]] = ASD_METRICS
    supervises_maps: ClassVar[bool] = True  # each speaking frame's map against its mouth box
    mask_item: ClassVar[int] = 4

    def map_present(self, batch: Any) -> Tensor:
        """``(N, T)``: the speaking frames of speaking clips (those the mouth pointing game scores)."""
        return (batch[3] == 1) & (batch[2] == 1)[:, None]

    def map_masks(self, batch: Any) -> Tensor:
        """``(N, T, H, W)`` bool: True inside each frame's mouth box, batch ``(frames, wave, label, frame_labels, boxes (N, T, 4))``."""
        from ..data import box_mask

        boxes, (n, t) = batch[4], batch[0].shape[:2]
        if boxes.shape != (n, t, 4):
            raise ConfigError(f"the map loss needs one mouth box per frame (N, T, 4) = {(n, t, 4)}, got {tuple(boxes.shape)}")
        return box_mask(boxes.flatten(0, 1), tuple(batch[0].shape[-2:])).view(n, t, *batch[0].shape[-2:])

    def supervised_map(self, model: nn.Module, out: Any, target: Tensor, which: str = "self") -> Tensor:
        """``(N, T, h, w)`` the face SE-CAM map of every frame (``"self"`` only)."""
        if which not in self.supervised_maps:
            raise ConfigError(f"the asd task supervises the model's own frame maps (map_loss_map 'self'), got {which!r}")
        return out.heatmap

    def map_cells(self, model: nn.Module, size: tuple[int, int]) -> Any:
        return model.face.cell_grid(size)  # type: ignore[union-attr,operator]

    def build(self, config: ASDConfig) -> nn.Module:
        return ASDModel(config)

    def new_model(self, dataset: Any, backbone: str, backbone_kwargs: dict[str, Any], options: dict[str, Any]) -> nn.Module:
        return ASDModel(ASDConfig(frames=dataset.num_frames, in_chans=dataset.in_chans, backbone=backbone,
                                  backbone_kwargs=backbone_kwargs, sample_rate=dataset.sample_rate, **options))  # fmt: skip

    def describe(self, config: ASDConfig) -> str:
        return f"audio-visual SE on {config.backbone}"

    def split_batch(self, batch: Any) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        return (batch[0], batch[1]), (batch[2], batch[3])

    def example_inputs(self, model: nn.Module, batch: int = 2, size: int | None = None) -> tuple[Tensor, ...]:
        c = model.config
        frames = torch.randn(batch, c.frames, c.in_chans, size or 32, size or 32)
        return frames, 0.1 * torch.randn(batch, c.frames * c.samples_per_frame)

    def data_record(self, dataset: Any) -> dict[str, Any]:
        frames = getattr(dataset, "num_frames", None) or int(dataset[0][0].shape[0])  # a plain dataset: its clips' length
        return {**super().data_record(dataset), "frames": frames, "sample_rate": getattr(dataset, "sample_rate", None)}

    def data_options(self, record: dict[str, Any]) -> dict[str, Any]:
        options = clip_options(record, ("speaker-clips",))
        if record.get("name") == "speaker-clips" and record.get("sample_rate"):
            options["sample_rate"] = record["sample_rate"]
        return options

    def evaluate(self, models: dict[str, nn.Module], dataset: Any, cfg: Any, progress: Any = None,
                 devices: int = 1) -> dict[str, Any]:  # fmt: skip
        """:func:`selfcam.asd.evaluate_asd`; the run's entry adds ``"modality_importance"`` and ``"silence_check"``."""
        from ..asd import evaluate_asd
        from ..evaluate import evaluate_per_run

        def score(model: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
            doc = evaluate_asd(model, dataset, cfg.batch_size)
            return ({k: v for k, v in doc.items() if not isinstance(v, dict)},
                    {k: v for k, v in doc.items() if isinstance(v, dict)})  # fmt: skip

        return evaluate_per_run(self.name, models, dataset, cfg, score)
