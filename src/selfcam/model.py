"""The self-explaining model (backbone + head), its config, and checkpoints.

``create_model(method, backbone, num_classes, in_chans)`` is the one door; a model's
``config`` rebuilds it (:mod:`selfcam.checkpoint` saves and loads runs of every task).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Union

import torch
from torch import Tensor, nn

from .backbones import Backbone, build_backbone
from .errors import ConfigError, InputError, check_options
from .heads import HEADS, ExplainedOutput, Head, upsample
from .safeio import check_model_limits

__all__ = ["ModelConfig", "SelfExplainer", "check_target", "create_model", "init_classifier", "list_methods", "make_head"]


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model: the JSON ``"model"`` entry of ``config.json``."""

    method: str
    backbone: str
    num_classes: int
    in_chans: int = 3
    head_kwargs: dict[str, Any] = field(default_factory=dict)
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Any, source: str = "config") -> "ModelConfig":
        """Validate a parsed JSON object field by field (missing, extra, wrongly typed)."""
        from .checkpoint import dataclass_from_json

        return dataclass_from_json(cls, d, source)


Target = Union[int, Tensor, Literal["predicted"], None]  # the class of a class-specific map


class SelfExplainer(nn.Module):
    """A backbone and an explanation head: ``forward(x)`` gives logits and heatmap in one pass.

    ``x``: ``(N, in_chans, H, W)``, normalized. Output: :class:`ExplainedOutput`
    with ``heatmap`` at feature resolution ``(N, h, w)``; :meth:`explain` resizes it
    to ``(N, H, W)``.

    ``wrap_info``: what :func:`selfcam.wrap` found (a :class:`selfcam.wrap.WrapInfo`, None for other
    models); ``pretrained_report``: the key report of the weights file it started from, if any.
    """

    wrap_info: Any = None
    pretrained_report: Any = None

    def __init__(self, backbone: Backbone, head: Head, config: ModelConfig) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.config = config

    def check_input(self, x: Tensor) -> None:
        """Raise :class:`InputError` naming the problem when ``x`` cannot be fed to the model."""
        if not isinstance(x, Tensor):
            raise InputError(f"expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise InputError(f"expected input of shape (N, C, H, W), got rank {x.dim()} shape {tuple(x.shape)}")
        if x.shape[1] != self.config.in_chans:
            raise InputError(f"model takes {self.config.in_chans} input channel(s), got {x.shape[1]} (shape {tuple(x.shape)})")
        if not x.is_floating_point():
            raise InputError(f"expected a floating-point image tensor, got {x.dtype}")
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            return  # the value check below would be data-dependent control flow in an exported graph
        from .metrics import all_finite

        if not all_finite(x):
            bad = int((~torch.isfinite(x)).sum())
            raise InputError(f"input has {bad} NaN or infinite value(s) of {x.numel()} (shape {tuple(x.shape)})")

    def forward(self, x: Tensor, *, target: Target = None) -> ExplainedOutput:
        """Logits and maps of ``x``. With ``target`` (heads that give ``features``), also ``class_heatmap``, the
        class-specific map of class ``target``: an int for every image, ``(N,)`` class indices, or ``"predicted"``
        (each image's predicted class). Without it no class map is computed (it costs a CAM per call)."""
        self.check_input(x)
        pre, feats = self.backbone.forward_split(x)
        out = self.head(feats, x, pre)
        if target is None:
            return out
        if out.features is None:
            raise ConfigError(f"the {self.config.method} head has no class-specific map (its output has no features)")
        chosen = out.logits.argmax(dim=1) if isinstance(target, str) and target == "predicted" else check_target(target, out.logits)
        out.class_heatmap = self.head.class_map(out.features, chosen)
        return out

    def explain(self, x: Tensor, mode: str = "bilinear", *, target: Target = None) -> ExplainedOutput:
        """Like ``forward`` but with the maps upsampled to the input size: ``heatmap`` ``(N, H, W)``
        (``(N, A, H, W)`` for a multi-label head's one map per attribute) and, with ``target``,
        ``class_heatmap`` ``(N, H, W)`` of that class (``"predicted"``: each image's predicted class)."""
        out = self(x, target=target)
        heat, size = out.heatmap, tuple(x.shape[-2:])
        cells = self.backbone.cell_grid(size)  # where the backbone centres its cells (selfcam.cells)
        out.heatmap = upsample(heat.flatten(0, -3), size, mode, cells).view(*heat.shape[:-2], *size)
        if out.class_heatmap is not None:
            out.class_heatmap = upsample(out.class_heatmap, size, mode, cells)
        return out

    def forward_features(self, x: Tensor) -> Tensor:
        """The backbone's feature map ``(N, K, h, w)``."""
        return self.backbone.forward_features(x)

    def forward_head(self, features: Tensor, x: Tensor, pre_features: Tensor | None = None) -> ExplainedOutput:
        """The head on backbone features (timm's split): ``F (N, K, h, w)`` and the input ``x``."""
        return self.head(features, x, pre_features)

    def loss(self, out: ExplainedOutput, target: Tensor) -> Tensor:
        return self.head.loss(out, target)

    @property
    def task(self) -> str:
        """The task of this model: ``"image"``, or ``"attributes"`` for a multi-label head."""
        return self.head.task

    def get_classifier(self) -> nn.Module:
        """The final linear layer (timm's convention)."""
        return self.head.fc

    def reset_classifier(self, num_classes: int) -> None:
        """A new classifier for ``num_classes`` outputs; ``config`` follows, so a saved model loads again."""
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ConfigError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        self.head.reset_classifier(num_classes)
        self.config = replace(self.config, num_classes=num_classes)


def check_target(target: int | Tensor, logits: Tensor) -> Tensor:
    """``target`` (an int, a 0-d or ``(N,)`` integer tensor) as ``(N,)`` class indices on the logits' device;
    :class:`InputError` naming the problem otherwise (wrong type, shape or range: :func:`~selfcam.metrics.check_class_indices`)."""
    from .metrics import check_class_indices

    n, classes = logits.shape
    if isinstance(target, bool) or not isinstance(target, (int, Tensor)):
        raise InputError(f"target must be an int, an (N,) tensor of class indices or \"predicted\", got {target!r}"[:200])
    t = torch.as_tensor(target, device=logits.device)
    t = t.expand(n) if t.dim() == 0 else t
    check_class_indices(t, n, classes)
    return t.long()


def list_methods() -> list[str]:
    """The head names :func:`create_model` accepts."""
    return list(HEADS)


def make_head(method: str, backbone: Backbone, num_classes: int, head_kwargs: dict[str, Any]) -> Head:
    """The ``method`` head for ``backbone``'s features (ABN gets a copy of its last stage when it has one)."""
    if method not in HEADS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(HEADS)}")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    head_cls = HEADS[method]
    check_options(head_cls.__init__, head_kwargs, f"method {method!r}")
    extra: dict[str, Any] = {}
    if head_cls.needs_last_stage and backbone.splittable:  # the head copies the backbone's last stage (ABN)
        extra["attention_stage"] = backbone.last
    try:
        return head_cls(backbone.out_channels, num_classes, **head_kwargs, **extra)
    except TypeError as e:
        raise ConfigError(f"bad option for method {method!r}: {e}") from e


def init_classifier(head: Head, classifier: nn.Module | None) -> bool:
    """Copy a linear ``classifier``'s weights into ``head.fc`` when the shapes agree; True when it did."""
    fc = getattr(head, "fc", None)
    if not isinstance(classifier, nn.Linear) or not isinstance(fc, nn.Linear) or fc.weight.shape != classifier.weight.shape:
        return False
    with torch.no_grad():
        fc.weight.copy_(classifier.weight)
        if fc.bias is not None:
            fc.bias.copy_(classifier.bias if classifier.bias is not None else torch.zeros_like(fc.bias))
    return True


def create_model(
    method: str,
    backbone: str,
    num_classes: int,
    in_chans: int = 3,
    backbone_kwargs: dict[str, Any] | None = None,
    *,
    pretrained: str | Path | None = None,
    **head_kwargs: Any,
) -> SelfExplainer:
    """Build ``backbone`` (see :func:`selfcam.backbones.create_backbone`) with the ``method`` head.

    ``backbone_kwargs`` go to the backbone builder (``stem_stride`` for the CIFAR
    ResNets...), ``head_kwargs`` to the head (``reduction``/``factor`` for ``se``,
    ``fin_width`` for ``lfi-light``...).

    ``pretrained``: a weights file (safetensors, a ``torch.save`` state dict or a timm / Lightning
    checkpoint; :func:`selfcam.load_pretrained`) or a known name (``"efficientnet-lite0"`` with
    ``backbone="timm:efficientnet_lite0"``), loaded strictly into the whole torchvision / timm network
    before it is cut (a first conv of another channel count is adapted). The file's classifier
    initialises the head's linear layer when its shape is ``(num_classes, K)``, and is otherwise left
    out. The run records the architecture, not the file: its weights are in the run. Backbones
    ``wrap:...`` are models made by :func:`selfcam.wrap`, rebuilt from their recorded options.
    """
    backbone_kwargs = dict(backbone_kwargs or {})
    check_model_limits({"backbone": backbone, "num_classes": num_classes, "in_chans": in_chans, "backbone_kwargs": backbone_kwargs,
                        "head_kwargs": head_kwargs}, f"model {method} on {backbone}")  # fmt: skip
    if backbone.startswith("wrap:"):
        from .wrap import rebuild

        return rebuild(ModelConfig(method, backbone, num_classes, in_chans, dict(head_kwargs), backbone_kwargs),
                       pretrained=pretrained)  # fmt: skip
    if method not in HEADS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(HEADS)}")
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    bb, classifier, report = build_backbone(backbone, in_chans, pretrained, backbone_kwargs)
    head = make_head(method, bb, num_classes, head_kwargs)
    if not init_classifier(head, classifier) and report is not None and isinstance(classifier, nn.Linear):
        report.notes.append(f"the file's classifier ({classifier.in_features} -> {classifier.out_features}) is not used: "
                            f"the head is {bb.out_channels} -> {num_classes}")  # fmt: skip
    model = SelfExplainer(bb, head, ModelConfig(method, backbone, num_classes, in_chans, dict(head_kwargs), backbone_kwargs))
    if report is not None:
        model.pretrained_report = report
    return model
