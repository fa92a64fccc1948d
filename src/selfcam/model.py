"""The self-explaining model (backbone + head), its config, and checkpoints.

``create_model(method, backbone, num_classes, in_chans)`` is the one door. A run
directory holds ``model.safetensors`` (weights) and ``config.json`` (what built
them); nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, load_file, save_file
from torch import Tensor, nn

from . import __version__
from .backbones import Backbone, create_backbone
from .errors import CheckpointError, ConfigError, InputError, check_options
from .heads import HEADS, ABNHead, ExplainedOutput, Head, upsample

__all__ = ["ModelConfig", "SelfExplainer", "create_model", "list_methods", "save_checkpoint", "load_checkpoint",
           "read_safetensors"]

WEIGHTS, CONFIG = "model.safetensors", "config.json"


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
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: 'model' must be an object, got {type(d).__name__}")
        types = {"method": str, "backbone": str, "num_classes": int, "in_chans": int, "head_kwargs": dict, "backbone_kwargs": dict}
        missing = {"method", "backbone", "num_classes"} - d.keys()
        extra = d.keys() - types.keys()
        if missing or extra:
            raise ConfigError(f"{source}: model config has missing fields {sorted(missing)} / unknown fields {sorted(extra)}")
        for key, value in d.items():
            if not isinstance(value, types[key]) or isinstance(value, bool):
                raise ConfigError(f"{source}: model.{key} must be {types[key].__name__}, got {value!r}")
        return cls(**d)


class SelfExplainer(nn.Module):
    """A backbone and an explanation head: ``forward(x)`` gives logits and heatmap in one pass.

    ``x``: ``(N, in_chans, H, W)``, normalized. Output: :class:`ExplainedOutput`
    with ``heatmap`` at feature resolution ``(N, h, w)``; :meth:`explain` resizes it
    to ``(N, H, W)``.
    """

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
        if not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).sum())
            raise InputError(f"input has {bad} NaN or infinite value(s) of {x.numel()} (shape {tuple(x.shape)})")

    def forward(self, x: Tensor) -> ExplainedOutput:
        self.check_input(x)
        pre, feats = self.backbone.forward_split(x)
        return self.head(feats, x, pre)

    def explain(self, x: Tensor, mode: str = "bilinear") -> ExplainedOutput:
        """Like ``forward`` but with the heatmap upsampled to the input size: ``(N, H, W)``
        (``(N, A, H, W)`` for a multi-label head's one map per attribute)."""
        out = self(x)
        heat, size = out.heatmap, tuple(x.shape[-2:])
        out.heatmap = upsample(heat.flatten(0, -3), size, mode).view(*heat.shape[:-2], *size)
        return out

    def forward_features(self, x: Tensor) -> Tensor:
        """The backbone's feature map ``(N, K, h, w)``."""
        return self.backbone.forward_features(x)

    def loss(self, out: ExplainedOutput, target: Tensor) -> Tensor:
        return self.head.loss(out, target)


def list_methods() -> list[str]:
    """The head names :func:`create_model` accepts."""
    return list(HEADS)


def create_model(
    method: str,
    backbone: str,
    num_classes: int,
    in_chans: int = 3,
    backbone_kwargs: dict[str, Any] | None = None,
    **head_kwargs: Any,
) -> SelfExplainer:
    """Build ``backbone`` (see :func:`selfcam.backbones.create_backbone`) with the ``method`` head.

    ``backbone_kwargs`` go to the backbone builder (``stem_stride`` for the CIFAR
    ResNets...), ``head_kwargs`` to the head (``reduction``/``factor`` for ``se``,
    ``fin_width`` for ``lfi-light``...).
    """
    if method not in HEADS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(HEADS)}")
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    backbone_kwargs = dict(backbone_kwargs or {})
    bb = create_backbone(backbone, in_chans, **backbone_kwargs)
    head_cls = HEADS[method]
    check_options(head_cls.__init__, head_kwargs, f"method {method!r}")
    extra: dict[str, Any] = {}
    if head_cls is ABNHead and bb.splittable:
        extra["attention_stage"] = bb.last
    try:
        head = head_cls(bb.out_channels, num_classes, **head_kwargs, **extra)
    except TypeError as e:
        raise ConfigError(f"bad option for method {method!r}: {e}") from e
    return SelfExplainer(bb, head, ModelConfig(method, backbone, num_classes, in_chans, dict(head_kwargs), backbone_kwargs))


def _atomic_write(path: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(model: SelfExplainer, run_dir: str | Path, **extra: Any) -> Path:
    """Write ``model.safetensors`` and ``config.json`` (``extra`` entries are stored beside ``model``)."""
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    _atomic_write(run / WEIGHTS, lambda p: save_file(state, p))
    doc = {"selfcam_version": __version__, "model": asdict(model.config), **extra}
    _atomic_write(run / CONFIG, lambda p: Path(p).write_text(json.dumps(doc, indent=2)))
    return run


def read_config(run_dir: str | Path) -> dict[str, Any]:
    """Parse and validate ``run_dir/config.json``; ``"model"`` becomes a :class:`ModelConfig`."""
    path = Path(run_dir) / CONFIG
    if Path(run_dir).is_file():
        raise CheckpointError(f"{run_dir}: a file, not a run directory (a directory holding {CONFIG} and {WEIGHTS})"
                              f"{_format_hint(Path(run_dir))}")  # fmt: skip
    if not Path(run_dir).is_dir():
        raise CheckpointError(f"{run_dir}: checkpoint directory not found")
    if not path.is_file():
        raise CheckpointError(f"{path}: config file not found")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(doc, dict) or "model" not in doc:
        raise CheckpointError(f"{path}: no 'model' entry")
    try:
        doc["model"] = ModelConfig.from_dict(doc["model"], str(path))
    except ConfigError as e:
        raise CheckpointError(str(e)) from e
    if "data" in doc:
        _check_data(doc["data"], path)
    return doc


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _count(low: int) -> Callable[[Any], bool]:
    return lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= low)


def _stats(v: Any) -> bool:
    return _number(v) or (isinstance(v, list) and len(v) > 0 and all(map(_number, v)))


_DATA_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {  # known fields of config.json's optional "data" entry
    "name": (lambda v: isinstance(v, str), "a string"),
    "size": (_count(1), "an integer >= 1 (or null)"),
    "seed": (_count(0), "an integer >= 0 (or null)"),
    "train_size": (_count(0), "an integer >= 0 (or null)"),
    "val_size": (_count(0), "an integer >= 0 (or null)"),
    "mean": (_stats, "a number or a non-empty list of numbers"),
    "std": (_stats, "a number or a non-empty list of numbers"),
    "class_names": (lambda v: isinstance(v, list) and all(isinstance(c, str) for c in v), "a list of strings"),
}


def _check_data(data: Any, path: Path) -> None:
    """``data`` must be an object whose known fields have their JSON types; other fields are kept as they are."""
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: 'data' must be an object, got {type(data).__name__}")
    for key, (ok, what) in _DATA_FIELDS.items():
        if key in data and not ok(data[key]):
            raise CheckpointError(f"{path}: data.{key} must be {what}, got {data[key]!r}")


def _format_hint(path: Path) -> str:
    """``"; it is a Python pickle..."`` when the first bytes of ``path`` show a pickle or a torch.save zip, else ``""``."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        return ""
    if head == b"PK":
        what = "a zip archive, as torch.save writes"
    elif head[:1] == b"\x80" and head[1:] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        what = "a Python pickle"
    else:
        return ""
    return f"; it is {what}, and selfcam never unpickles files: save the weights with safetensors"


def read_safetensors(path: str | Path, device: str = "cpu") -> dict[str, Tensor]:
    """Every tensor of the safetensors file ``path``; :class:`CheckpointError` naming it when it is not one."""
    path = Path(path)
    try:
        try:
            os.fsencode(path).decode("utf-8")
        except UnicodeDecodeError:  # safetensors opens UTF-8 paths only: hand it the bytes instead
            return {k: v.to(device) for k, v in load(path.read_bytes()).items()}
        return load_file(str(path), device=device)
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}){_format_hint(path)}") from e


def load_checkpoint(run_dir: str | Path, map_location: str | torch.device = "cpu") -> tuple[SelfExplainer, dict[str, Any]]:
    """Rebuild the model saved in ``run_dir``; returns ``(model in eval mode, config dict)``."""
    doc = read_config(run_dir)
    cfg: ModelConfig = doc["model"]
    weights = Path(run_dir) / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{weights}: weights file not found")
    state = read_safetensors(weights, str(map_location))
    try:
        model = create_model(cfg.method, cfg.backbone, cfg.num_classes, cfg.in_chans, cfg.backbone_kwargs, **cfg.head_kwargs)
    except ConfigError as e:
        raise CheckpointError(f"{Path(run_dir) / CONFIG}: {e}") from e
    expected = model.state_dict()
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{weights}: weights do not match config ({cfg.method} on {cfg.backbone}): {len(missing)} missing "
            f"{missing[:2]}, {len(unexpected)} unexpected {unexpected[:2]}, {len(wrong)} of another shape {wrong[:2]}"
        )
    model.load_state_dict(state, strict=True)
    return model.to(map_location).eval(), doc
