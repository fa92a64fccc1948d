"""selfcam: classifiers that explain themselves in their own forward pass.

    model = selfcam.create_model("lfi", "resnet50", num_classes=10)
    model = selfcam.wrap(torchvision_or_timm_or_your_model, "se")   # any classifier, its predictions kept by "plain"
    result = selfcam.distill(your_model, "se", images)   # a head that reproduces your frozen model's outputs
    out = model(x)            # out.logits (N, classes), out.heatmap (N, h, w) in [0, 1]

Every public name is imported on first use (PEP 562 ``__getattr__``): ``import selfcam`` and the
``selfcam`` command's start stay cheap (no torch before a command needs it, no Lightning or grad-cam
before training or a post-hoc map). ``from selfcam import X``, ``selfcam.X``, ``dir(selfcam)`` and
``__all__`` behave as with eager imports.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the submodule that defines it
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("CheckpointError", "ConfigError", "DataError", "DivergenceError", "InputError", "SelfcamError"), "errors"),
    **dict.fromkeys(("HEADS", "ExplainedOutput", "minmax", "register_head", "upsample"), "heads"),
    **dict.fromkeys(("ModelConfig", "SelfExplainer", "create_model", "list_methods"), "model"),
    **dict.fromkeys(("load_checkpoint", "save_checkpoint"), "checkpoint"),
    **dict.fromkeys(("PretrainedReport", "load_pretrained"), "pretrained"),
    **dict.fromkeys(("WrapInfo", "wrap"), "wrap"),
    **dict.fromkeys(("TASKS", "get_task", "list_tasks", "register_task"), "tasks"),
    **dict.fromkeys(("TrainConfig", "fit"), "train"),  # Lightning
    **dict.fromkeys(("DistillResult", "distill"), "distill"),
    "load_dataset": "data",
    "posthoc_map": "posthoc",  # grad-cam
}

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DistillResult",
    "DivergenceError",
    "ExplainedOutput",
    "HEADS",
    "InputError",
    "TASKS",
    "ModelConfig",
    "PretrainedReport",
    "SelfExplainer",
    "SelfcamError",
    "TrainConfig",
    "create_model",
    "distill",
    "fit",
    "get_task",
    "load_dataset",
    "list_methods",
    "list_tasks",
    "load_checkpoint",
    "load_pretrained",
    "minmax",
    "posthoc_map",
    "register_head",
    "register_task",
    "save_checkpoint",
    "upsample",
    "WrapInfo",
    "wrap",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'selfcam' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(types.ModuleType):
    """Keeps ``selfcam.wrap`` the function, as the eager ``from .wrap import wrap`` did: importing the
    submodule ``selfcam.wrap`` binds the package attribute to the module, which would shadow it."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name and value.__name__ == f"{__name__}.{name}":
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:  # what type checkers and IDEs see: the eager imports
    from .checkpoint import load_checkpoint, save_checkpoint
    from .data import load_dataset
    from .distill import DistillResult, distill
    from .errors import CheckpointError, ConfigError, DataError, DivergenceError, InputError, SelfcamError
    from .heads import HEADS, ExplainedOutput, minmax, register_head, upsample
    from .model import ModelConfig, SelfExplainer, create_model, list_methods
    from .posthoc import posthoc_map
    from .pretrained import PretrainedReport, load_pretrained
    from .tasks import TASKS, get_task, list_tasks, register_task
    from .train import TrainConfig, fit
    from .wrap import WrapInfo, wrap
