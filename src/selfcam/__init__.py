"""selfcam: classifiers that explain themselves in their own forward pass.

    model = selfcam.create_model("lfi", "resnet50", num_classes=10)
    model = selfcam.wrap(torchvision_or_timm_or_your_model, "se")   # any classifier, its predictions kept by "plain"
    out = model(x)            # out.logits (N, classes), out.heatmap (N, h, w) in [0, 1]
"""

__version__ = "0.1.0"

from .errors import CheckpointError, ConfigError, DataError, DivergenceError, InputError, SelfcamError
from .heads import HEADS, ExplainedOutput, minmax, register_head, upsample
from .model import ModelConfig, SelfExplainer, create_model, list_methods
from .checkpoint import load_checkpoint, save_checkpoint
from .pretrained import PretrainedReport, load_pretrained
from .wrap import WrapInfo, wrap
from .tasks import TASKS, get_task, list_tasks, register_task

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
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


def __getattr__(name: str):  # heavy imports (Lightning, grad-cam) only when asked for
    if name == "load_dataset":
        from .data import load_dataset

        return load_dataset
    if name in ("TrainConfig", "fit"):
        from . import train

        return getattr(train, name)
    if name == "posthoc_map":
        from .posthoc import posthoc_map

        return posthoc_map
    raise AttributeError(f"module 'selfcam' has no attribute {name!r}")
