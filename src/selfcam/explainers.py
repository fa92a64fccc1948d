"""One interface for every map: the model's own (``self``) and the post-hoc ones.

Every method is an :class:`Explainer` in :data:`EXPLAINERS`. It says which models it applies to
(:meth:`Explainer.unsupported` gives the reason it does not, or ``None``) and turns a batch of
model inputs into an :class:`Explanation`: the logits and the maps in ``[0, 1]`` at input
resolution, one map per image ``(N, H, W)``, per attribute ``(N, A, H, W)`` or per frame
``(N, T, H, W)``.

- ``self``: what the model's forward pass returns (``model.explain``), for every task; free.
- ``self-class``: the class-specific map of the same forward pass (``model.explain(x, target=c)``,
  ``class_heatmap``): the CAM of the features the head's classifier pools; image models.
- ``cam``, ``gradcam``, ``gradcam++``, ``scorecam``, ``rise``, ``lime``: :func:`selfcam.posthoc.posthoc_map`
  for the class ``target`` (default: the predicted one), on the tasks of
  :data:`selfcam.posthoc.METHOD_TASKS` (Grad-CAM and Grad-CAM++ also on clips).

``explain(model, x, method="gradcam")`` runs one; ``check_methods(model, methods)`` refuses, in one
line, a method that does not apply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch
from torch import Tensor, nn

from .errors import ConfigError
from .posthoc import METHOD_TASKS, POSTHOC_METHODS, posthoc_map

__all__ = ["EXPLAINERS", "Explainer", "Explanation", "check_methods", "explain", "get_explainer"]


@dataclass
class Explanation:
    """What an :class:`Explainer` returns: ``logits (N, classes)`` and ``maps`` in [0, 1] at input
    resolution (``(N, H, W)``, ``(N, A, H, W)`` for attributes, ``(N, T, H, W)`` for clips)."""

    logits: Tensor
    maps: Tensor


def _task(model: nn.Module) -> str:
    """The task of a selfcam model; any other module is taken as an image classifier."""
    task = getattr(model, "task", "image")
    return task if isinstance(task, str) else "image"


class Explainer:
    """One method. Subclasses set ``name`` and ``tasks`` (``None``: every task) and implement :meth:`__call__`."""

    name: ClassVar[str] = "explainer"
    tasks: ClassVar[tuple[str, ...] | None] = None
    class_specific: ClassVar[bool] = True  # the map depends on ``target`` (the grid pointing game needs it)

    def unsupported(self, model: nn.Module) -> str | None:
        """Why this method cannot explain ``model`` (one phrase), or ``None`` when it can."""
        task = _task(model)
        if self.tasks is not None and task not in self.tasks:
            return f"{self.name} explains {' and '.join(self.tasks)} models; this is a {task} model"
        return None

    def __call__(self, model: nn.Module, *inputs: Tensor, target: Tensor | None = None, **options: Any) -> Explanation:
        raise NotImplementedError


class OwnMap(Explainer):
    """The model's own map, from the same forward pass as its prediction (``model.explain``).

    ``target`` is not used: the LFI, SE and ABN maps do not depend on a class, and a plain model's
    map is the CAM of its predicted class.
    """

    name = "self"
    class_specific = False

    def __call__(self, model: nn.Module, *inputs: Tensor, target: Tensor | None = None, **options: Any) -> Explanation:
        if options:
            raise ConfigError(f"the self map takes no options, got {', '.join(options)}")
        with torch.no_grad():
            out = model.explain(*inputs)
        return Explanation(out.logits, out.heatmap)


class OwnClassMap(Explainer):
    """The class-specific map of the model's own forward pass (``class_heatmap`` of ``model.explain``)
    for class ``target`` (default: the predicted one); for heads whose classifier pools ``features``."""

    name = "self-class"
    tasks = ("image",)

    def unsupported(self, model: nn.Module) -> str | None:
        reason = super().unsupported(model)
        head = getattr(model, "head", None)
        if reason is None and not callable(getattr(head, "class_map", None)):
            return "self-class needs a selfcam image model (a head with class_map)"
        return reason

    def __call__(self, model: nn.Module, *inputs: Tensor, target: Tensor | None = None, **options: Any) -> Explanation:
        if options:
            raise ConfigError(f"the self-class map takes no options, got {', '.join(options)}")
        with torch.no_grad():
            out = model.explain(*inputs, target="predicted" if target is None else target)
        if out.class_heatmap is None:
            raise ConfigError(f"the {model.config.method} head gives no class-specific map")
        return Explanation(out.logits, out.class_heatmap)


class PostHoc(Explainer):
    """A post-hoc method of :mod:`selfcam.posthoc` (one input tensor: an image batch or a clip batch)."""

    def __init__(self, name: str) -> None:
        self.name = name  # type: ignore[misc]
        self.tasks = METHOD_TASKS[name]  # type: ignore[misc]

    def unsupported(self, model: nn.Module) -> str | None:
        reason = super().unsupported(model)
        if reason is None and self.name == "cam" and getattr(getattr(model, "config", None), "method", None) != "plain":
            return "the classic CAM needs a 'plain' model (GAP + linear classifier)"
        return reason

    def __call__(self, model: nn.Module, *inputs: Tensor, target: Tensor | None = None, **options: Any) -> Explanation:
        (x,) = inputs
        with torch.no_grad():
            out = model(x)
        logits = getattr(out, "logits", out)
        maps = posthoc_map(model, x, self.name, target=logits.argmax(dim=1) if target is None else target, **options)
        return Explanation(logits, maps)


EXPLAINERS: dict[str, Explainer] = {"self": OwnMap(), "self-class": OwnClassMap(), **{m: PostHoc(m) for m in POSTHOC_METHODS}}


def get_explainer(name: str) -> Explainer:
    """The explainer ``name``; :class:`ConfigError` listing the known ones otherwise."""
    if name not in EXPLAINERS:
        raise ConfigError(f"unknown method {name!r}; choose from {', '.join(EXPLAINERS)}")
    return EXPLAINERS[name]


def check_methods(model: nn.Module, methods: Sequence[str]) -> tuple[str, ...]:
    """``methods`` as a tuple once each is known and applies to ``model``; one :class:`ConfigError` otherwise."""
    problems = [f"{m}: {why}" for m in methods if (why := get_explainer(m).unsupported(model))]
    if problems:
        raise ConfigError("; ".join(problems))
    return tuple(methods)


def explain(model: nn.Module, *inputs: Tensor, method: str = "self", target: Tensor | None = None, **options: Any) -> Explanation:
    """Explain one batch with ``method``: ``inputs`` as ``model.explain`` takes them (an image batch
    ``(N, C, H, W)``, a clip batch ``(N, T, C, H, W)``, or face clips and waveforms for ASD)."""
    explainer = get_explainer(method)
    why = explainer.unsupported(model)
    if why:
        raise ConfigError(why)
    return explainer(model, *inputs, target=target, **options)
