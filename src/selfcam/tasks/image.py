"""The ``image`` task (one label per image) and the ``attributes`` task (multi-label, a map per attribute)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..heads import HEADS, ExplainedOutput, PlainHead
from ..model import ModelConfig, create_model
from .base import MAPS_NOTE, Task, TaskGraph, register_task

__all__ = ["ATTRIBUTE_METRICS", "AttributesTask", "GRID", "IMAGE_METRICS", "ImageTask", "SUPERVISED_MAPS"]

LOCALIZATION = ("pointing_game", "energy_pointing_game", "iou", "dice")
FAITHFULNESS = ("average_drop", "increase_in_confidence", "deletion_auc", "insertion_auc", "road_morf", "road_lerf")
GRID = ("grid_pointing_game",)  # on grids of test images, for the class-specific maps (selfcam.evaluate.grid_scores)
IMAGE_METRICS = ("accuracy", *LOCALIZATION, *FAITHFULNESS, *GRID)
ATTRIBUTE_METRICS = ("accuracy", "pointing_game", "pointing_game_15px", "iou")
SUPERVISED_MAPS = ("self", "class")  # which in-forward map the map loss (TrainConfig.map_loss_weight) supervises


@register_task("image")
class ImageTask(Task):
    """Images ``(N, C, H, W)`` -> :class:`~selfcam.model.SelfExplainer` (backbone + head)."""

    config_type: ClassVar[type] = ModelConfig
    dataset_kind: ClassVar[str] = "multiclass"
    accuracy: ClassVar[str] = "multiclass"
    default_data: ClassVar[str] = "cluttered-digits"
    graph: ClassVar[TaskGraph] = TaskGraph(("image",), ("logits", "heatmap"), {"heatmap": MAPS_NOTE})
    metrics: ClassVar[tuple[str, ...]] = IMAGE_METRICS
    default_metrics: ClassVar[tuple[str, ...] | None] = ("accuracy", "pointing_game", "iou")  # the cheap ones
    shards: ClassVar[bool] = True
    supervises_maps: ClassVar[bool] = True  # items (image, label, box (4,))
    supervised_maps: ClassVar[tuple[str, ...]] = SUPERVISED_MAPS

    @property
    def methods(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(name for name, head in HEADS.items() if head.task == self.name)

    def build(self, config: ModelConfig) -> nn.Module:
        return create_model(config.method, config.backbone, config.num_classes, config.in_chans,
                            config.backbone_kwargs, **config.head_kwargs)  # fmt: skip

    def create(self, dataset: Any, method: str, backbone: str, backbone_kwargs: dict[str, Any],
               head_kwargs: dict[str, Any]) -> nn.Module:  # fmt: skip
        if method in HEADS and method not in self.methods:
            raise ConfigError(f"method {method!r} is a head of the {HEADS[method].task} task, not of {self.name} "
                              f"(its heads: {', '.join(self.methods)})")  # fmt: skip
        return create_model(method, backbone, dataset.num_classes, dataset.in_chans, backbone_kwargs, **head_kwargs)

    def config_from_json(self, d: Any, source: str) -> ModelConfig:
        config = super().config_from_json(d, source)
        head = HEADS.get(config.method)
        if head is not None and head.task != self.name:
            raise ConfigError(f"{source}: method {config.method!r} belongs to the {head.task} task, the run says {self.name}")
        return config

    def describe(self, config: ModelConfig) -> str:
        return f"{config.method} on {config.backbone}"

    def example_inputs(self, model: nn.Module, batch: int = 2, size: int | None = None) -> tuple[Tensor, ...]:
        return (torch.randn(batch, model.config.in_chans, size or 32, size or 32),)

    def map_masks(self, batch: Any) -> Tensor:
        """``(N, H, W)`` bool ground-truth masks of a batch ``(images (N, C, H, W), labels, boxes (N, 4))``:
        True inside each box (:func:`selfcam.data.box_mask`)."""
        from ..data import box_mask

        return box_mask(batch[2], tuple(batch[0].shape[-2:]))

    def supervised_map(self, model: nn.Module, out: ExplainedOutput, target: Tensor, which: str = "self") -> Tensor:
        """``(N, h, w)`` the differentiable in-forward map the map loss supervises, at feature resolution.

        ``"self"``: the head's own map (LFI's and ABN's attention, SE-CAM's map); for ``plain``, whose own map is
        the CAM of the *predicted* class, the CAM of the label ``target (N,)``. ``"class"``: the class-specific map
        of the label (:meth:`selfcam.heads.Head.class_map`, the CAM of the features the classifier pools).
        """
        if which not in SUPERVISED_MAPS:
            raise ConfigError(f"the supervised map must be one of {', '.join(SUPERVISED_MAPS)}, got {which!r}")
        head = model.head  # type: ignore[union-attr]
        if which == "self" and not isinstance(head, PlainHead):
            return out.heatmap
        if out.features is None:
            raise ConfigError(f"the {model.config.method} head has no class-specific map to supervise (no features)")  # type: ignore[union-attr]
        return head.class_map(out.features, target)

    def evaluate(self, models: dict[str, nn.Module], dataset: Any, cfg: Any, progress: Any = None,
                 devices: int = 1) -> dict[str, Any]:  # fmt: skip
        from ..evaluate import evaluate_runs

        return evaluate_runs(models, dataset, cfg, progress, devices)  # type: ignore[arg-type]


@register_task("attributes")
class AttributesTask(ImageTask):
    """Multi-label attributes: float ``{0, 1}`` targets ``(N, A)``, one map per attribute ``(N, A, h, w)``."""

    dataset_kind: ClassVar[str] = "multilabel"
    accuracy: ClassVar[str] = "multilabel"
    default_data: ClassVar[str] = "synthetic-faces"
    graph: ClassVar[TaskGraph] = TaskGraph(("image",), ("logits", "heatmap"), {"heatmap": "one map per attribute, " + MAPS_NOTE})
    metrics: ClassVar[tuple[str, ...]] = ATTRIBUTE_METRICS
    default_metrics: ClassVar[tuple[str, ...] | None] = None
    shards: ClassVar[bool] = False
    supervised_maps: ClassVar[tuple[str, ...]] = ("self",)  # an attribute head has no class map

    def map_present(self, batch: Any) -> Tensor:
        """``(N, A)``: each present attribute's map is scored against its own mask."""
        return batch[1] > 0.5

    def map_masks(self, batch: Any) -> Tensor:
        """``(N, A, H, W)`` bool: the attribute masks of a batch ``(images, attrs (N, A), masks (N, A, H, W))``."""
        masks = batch[2]
        if masks.dim() != 4 or masks.shape[:2] != batch[1].shape:
            raise ConfigError(f"the map loss needs attribute masks (N, A, H, W) matching the labels {tuple(batch[1].shape)}, "
                              f"got {tuple(masks.shape)}")  # fmt: skip
        return masks.bool()

    def supervised_map(self, model: nn.Module, out: ExplainedOutput, target: Tensor, which: str = "self") -> Tensor:
        """``(N, A, h, w)`` the head's own map per attribute (``"self"`` only: an attribute head has no class map)."""
        if which not in self.supervised_maps:
            raise ConfigError(f"the attributes task supervises the head's own maps (map_loss_map 'self'), got {which!r}")
        return out.heatmap

    def evaluate(self, models: dict[str, nn.Module], dataset: Any, cfg: Any, progress: Any = None,
                 devices: int = 1) -> dict[str, Any]:  # fmt: skip
        """Per attribute (:func:`selfcam.faces.evaluate_attributes`); the run's entry adds ``"attributes"``."""
        from ..evaluate import evaluate_per_run
        from ..faces import evaluate_attributes

        def score(model: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
            doc = evaluate_attributes(model, dataset, cfg.batch_size, cfg.threshold, cfg.tolerance)
            return doc["mean"], {"attributes": doc["attributes"]}

        return evaluate_per_run(self.name, models, dataset, cfg, score)

    def data_options(self, record: dict[str, Any]) -> dict[str, Any]:
        names, spec = record.get("class_names") or record.get("attributes"), str(record.get("name"))
        return {"attributes": list(names)} if names and (spec == "synthetic-faces" or spec.startswith("celeba:")) else {}
