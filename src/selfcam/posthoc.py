"""Post-hoc maps on a trained model, with the same output convention as the heads.

``posthoc_map(model, x, "gradcam")`` returns ``(N, H, W)`` maps in ``[0, 1]`` at
input size, on the input's device. Grad-CAM, Grad-CAM++ and Score-CAM come from
the ``grad-cam`` package (not rewritten); ``cam`` is the classic CAM of a ``plain``
model. The target layer is the backbone's last stage. Hooks never outlive the
call, and the model's train/eval mode and ``requires_grad`` flags are restored.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, ScoreCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import Tensor, nn

from .errors import ConfigError, InputError
from .heads import PlainHead, upsample
from .model import SelfExplainer

__all__ = ["POSTHOC_METHODS", "posthoc_map", "preserved_state"]

_GRADCAM = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "scorecam": ScoreCAM}
POSTHOC_METHODS = ("cam", *_GRADCAM)


class _Logits(nn.Module):
    """Presents a :class:`SelfExplainer` as a plain ``x -> logits`` module (what grad-cam expects)."""

    def __init__(self, model: SelfExplainer) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x).logits


@contextmanager
def preserved_state(model: nn.Module) -> Iterator[nn.Module]:
    """Restore every submodule's train/eval mode and every parameter's ``requires_grad`` on exit."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training
        for p, flag in flags:
            p.requires_grad_(flag)


def posthoc_map(model: SelfExplainer, x: Tensor, method: str = "gradcam", target: Tensor | None = None) -> Tensor:
    """Maps ``(N, H, W)`` in ``[0, 1]`` for class ``target`` ``(N,)`` (default: the predicted class)."""
    if method not in POSTHOC_METHODS:
        raise ConfigError(f"unknown post-hoc method {method!r}; choose one of {', '.join(POSTHOC_METHODS)}")
    model.check_input(x)
    with preserved_state(model):
        model.eval()
        if target is None:
            with torch.no_grad():
                target = model(x).logits.argmax(dim=1)
        if target.shape != (len(x),) or not 0 <= int(target.min()) <= int(target.max()) < model.config.num_classes:
            raise InputError(f"target must be (N,) class indices in [0, {model.config.num_classes}), got {target.tolist()}")
        if method == "cam":
            if not isinstance(model.head, PlainHead):
                raise ConfigError("the classic CAM needs a 'plain' model (GAP + linear classifier)")
            with torch.no_grad():
                return upsample(model.head.cam(model.forward_features(x), target), tuple(x.shape[-2:]))
        layer = model.backbone.last if model.backbone.splittable else model.backbone.trunk
        # not grad-cam's `with` block: its __exit__ swallows exceptions; we release the hooks ourselves
        extractor = _GRADCAM[method](model=_Logits(model), target_layers=[layer])
        try:
            maps = extractor(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in target])
        finally:
            extractor.activations_and_grads.release()
    return torch.from_numpy(maps).to(device=x.device, dtype=x.dtype)
