"""Backbones: CNNs cut at their last convolutional stage.

Every backbone is a :class:`Backbone` with two parts, ``trunk`` (everything before
the last stage) and ``last`` (the last stage), so ``F = last(trunk(x))`` has shape
``(N, K, h, w)`` with ``K = out_channels``. Heads see only ``F``; ABN also copies
``last``. Names:

- CIFAR-style ResNets (He et al. 2016, section 4.2): ``resnet8/20/32/44/56/110``
  (basic blocks, depth 6n+2) and ``resnet20-bottleneck`` ... (bottleneck blocks,
  depth 9n+2, widths 16/32/64 x4), any number of input channels;
- any torchvision classification CNN by its name (``resnet18``, ``resnet50``,
  ``vgg16``, ``mobilenet_v3_small``, ...), randomly initialised (nothing is
  downloaded), first conv rebuilt for ``in_chans``;
- any timm model as ``timm:NAME`` through ``forward_features`` (timm installed).
"""

from __future__ import annotations

import re
from typing import Any
import torch
from torch import Tensor, nn

from .cells import CellGrid, measure_cells
from .errors import ConfigError, check_options
from .safeio import check_depth

__all__ = ["TIMM_OPTIONS", "TORCHVISION_OPTIONS", "Backbone", "build_backbone", "create_backbone", "list_backbones", "timm_model", "torchvision_model", "CIFAR_DEPTHS"]

CIFAR_DEPTHS = (8, 20, 32, 44, 56, 110)


class Backbone(nn.Module):
    """A CNN split as ``trunk -> last``; ``forward_features(x)`` gives ``(N, K, h, w)``.

    ``splittable`` is False when the last stage could not be isolated (``last`` is
    then the identity and the whole network sits in ``trunk``).
    """

    def __init__(self, trunk: nn.Module, last: nn.Module, out_channels: int, in_chans: int, splittable: bool = True) -> None:
        super().__init__()
        self.trunk = trunk
        self.last = last
        self.out_channels = out_channels
        self.in_chans = in_chans
        self.splittable = splittable

    def forward_split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(N, C, H, W) -> (features entering the last stage, F)``."""
        pre = self.trunk(x)
        return pre, self.last(pre)

    def forward_features(self, x: Tensor) -> Tensor:
        """``(N, C, H, W) -> F (N, K, h, w)``."""
        return self.forward_split(x)[1]

    forward = forward_features

    def cell_grid(self, size: tuple[int, int]) -> CellGrid | None:
        """Where the cells of ``F`` sit in an input of ``size`` (:func:`selfcam.cells.measure_cells`, by impulse
        response; measured once per size and kept). ``None`` when every cell sees the whole image (a backbone with
        global pooling or attention inside): maps are then upsampled as ``F.interpolate`` does."""
        key = tuple(int(v) for v in size)
        cache = self.__dict__.setdefault("_cell_grids", {})
        if key not in cache:
            param = next(self.parameters(), None)
            device, dtype = (None, torch.float32) if param is None else (param.device, param.dtype)
            cache[key] = measure_cells(self.forward_features, self.in_chans, key, device=device, dtype=dtype, module=self)
        return cache[key]


# --- CIFAR-style ResNets --------------------------------------------------------


class _Basic(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, dilation: int = 1, first_dilation: int = 1) -> None:
        super().__init__()
        d, d1 = dilation, first_dilation
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, d1, d1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, d, d, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(cin, planes * self.expansion, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, dilation: int = 1, first_dilation: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.body = nn.Sequential(
            nn.Conv2d(cin, planes, 1, bias=False), nn.BatchNorm2d(planes), nn.ReLU(),
            nn.Conv2d(planes, planes, 3, stride, first_dilation, first_dilation, bias=False), nn.BatchNorm2d(planes), nn.ReLU(),
            nn.Conv2d(planes, out, 1, bias=False), nn.BatchNorm2d(out),
        )  # fmt: skip
        self.shortcut = _shortcut(cin, out, stride)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    """Identity, or a 1x1 projection (the paper's option B) when the shape changes."""
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


def cifar_resnet(depth: int, in_chans: int = 3, bottleneck: bool = False, stem_stride: int = 1,
                 output_stride: int | None = None) -> Backbone:  # fmt: skip
    """CIFAR ResNet: 3x3 stem (16), three stages of widths 16/32/64 (x4 for bottleneck), strides 1/2/2.

    ``stem_stride=2`` halves the input in the stem (our option, not the paper's): a
    64 px canvas then costs what a 32 px CIFAR image costs, with an 8x8 feature map.
    ``output_stride`` (default ``4 * stem_stride``; ``stem_stride`` or ``2 * stem_stride``) gives
    a finer feature map: the stages past it keep stride 1 and dilate their 3x3 convolutions
    instead (as timm's ``output_stride``): the weights are the same, and the map at every other
    pixel is exactly the default one.
    """
    if stem_stride not in (1, 2):
        raise ConfigError(f"stem_stride must be 1 or 2, got {stem_stride}")
    total = 4 * stem_stride if output_stride is None else output_stride
    if total not in (stem_stride, 2 * stem_stride, 4 * stem_stride):
        raise ConfigError(f"output_stride must be {stem_stride}, {2 * stem_stride} or {4 * stem_stride} "
                          f"with stem_stride={stem_stride}, got {output_stride}")  # fmt: skip
    per = 9 if bottleneck else 6
    if (depth - 2) % per or depth < per + 2:
        raise ConfigError(f"CIFAR ResNet depth must be {per}n+2 for {'bottleneck' if bottleneck else 'basic'} blocks, got {depth}")
    n = (depth - 2) // per
    block = _Bottleneck if bottleneck else _Basic
    stem = nn.Sequential(nn.Conv2d(in_chans, 16, 3, stem_stride, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
    stages, cin, reached, dilation = [], 16, stem_stride, 1
    for planes, stride in ((16, 1), (32, 2), (64, 2)):
        first_dilation = dilation  # the stage's first conv sees what the strided one saw (timm's first_dilation)
        if reached * stride > total:
            stride, dilation = 1, dilation * stride
        reached *= stride
        blocks = []
        for i in range(n):
            blocks.append(block(cin, planes, stride if i == 0 else 1, dilation, first_dilation if i == 0 else dilation))
            cin = planes * block.expansion
        stages.append(nn.Sequential(*blocks))
    for m in [stem, *stages]:
        for mod in m.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
    return Backbone(nn.Sequential(stem, stages[0], stages[1]), stages[2], cin, in_chans)


# --- torchvision and timm ---------------------------------------------------------


def _rebuild_first_conv(model: nn.Module, in_chans: int) -> None:
    """Replace the first ``Conv2d`` by one with ``in_chans`` inputs (same geometry)."""
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                if child.in_channels != in_chans:
                    new = nn.Conv2d(in_chans, child.out_channels, child.kernel_size, child.stride,
                                    child.padding, child.dilation, bias=child.bias is not None)  # fmt: skip
                    setattr(parent, name, new)
                return


def _infer_channels(backbone: nn.Module, in_chans: int) -> int:
    was = backbone.training
    backbone.eval()
    with torch.no_grad():
        out = backbone(torch.zeros(1, in_chans, 64, 64))
    backbone.train(was)
    if out.dim() != 4:
        raise ConfigError(f"backbone gives features of shape {tuple(out.shape)}; selfcam needs a CNN map (N, K, h, w)")
    return int(out.shape[1])


# The options selfcam passes on to timm.create_model and torchvision's builders, from any source (a
# config.json, --backbone-kwargs, wrap's model_kwargs): an allow-list, so nothing in a run's files can
# make them open a file or reach the network (timm's checkpoint_path, pretrained_cfg, pretrained_cfg_overlay,
# cache_dir; torchvision's weights, weights_backbone, progress). num_classes and in_chans are set by selfcam.
TIMM_OPTIONS = frozenset({"num_classes", "in_chans", "drop_rate", "drop_path_rate", "drop_block_rate", "output_stride",
                          "global_pool", "img_size", "patch_size", "dynamic_img_size", "class_token", "reg_tokens",
                          "act_layer", "scriptable", "exportable", "no_jit"})  # fmt: skip
TORCHVISION_OPTIONS = frozenset({"num_classes", "dropout", "attention_dropout", "stochastic_depth_prob", "zero_init_residual",
                                 "width_per_group", "groups", "replace_stride_with_dilation", "init_weights", "aux_logits",
                                 "transform_input", "image_size"})  # fmt: skip
_TIMM_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)?")  # an architecture, optionally .tag; no hub, dir or URL prefix


def _allowed(kwargs: dict[str, Any], allowed: frozenset[str], what: str) -> None:
    refused = sorted(set(kwargs) - allowed)
    if refused:
        raise ConfigError(f"{what}: option(s) {', '.join(map(repr, refused))} refused: selfcam passes only "
                          f"{', '.join(sorted(allowed))} to this library (options that load weights, read files or "
                          "reach the network, such as checkpoint_path, pretrained_cfg_overlay or weights, never come "
                          "from a config)")  # fmt: skip


def torchvision_model(name: str, **kwargs: Any) -> nn.Module:
    """The whole torchvision classifier ``name`` with random weights (nothing is downloaded); ``kwargs``
    from :data:`TORCHVISION_OPTIONS` only."""
    import torchvision.models as tvm

    if name not in tvm.list_models(module=tvm):
        raise ConfigError(f"unknown backbone {name!r}; see `selfcam models` for the names")
    _allowed(kwargs, TORCHVISION_OPTIONS, f"torchvision model {name!r}")
    return tvm.get_model(name, weights=None, **kwargs)


def _torchvision_classifier(model: nn.Module) -> tuple[str, nn.Module | None]:
    """The key prefix of a torchvision CNN's classifier and its last linear layer."""
    if hasattr(model, "layer4"):
        return "fc.", getattr(model, "fc", None)
    head = getattr(model, "classifier", None)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)] if isinstance(head, nn.Module) else []
    return "classifier.", linears[-1] if linears else None


def _cut_torchvision(model: nn.Module, name: str, in_chans: int) -> Backbone:
    if hasattr(model, "layer4"):  # ResNet, ResNeXt, Wide ResNet
        trunk = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool, model.layer1, model.layer2, model.layer3)
        last: nn.Module = model.layer4
    elif isinstance(getattr(model, "features", None), nn.Sequential):  # VGG, MobileNet, EfficientNet, ConvNeXt, DenseNet
        feats = model.features
        trunk, last = feats[:-1], feats[-1]
        if name.startswith("densenet"):  # torchvision applies this ReLU in DenseNet.forward
            last = nn.Sequential(last, nn.ReLU())
    else:
        raise ConfigError(f"torchvision model {name!r} has no layer4 or features stage selfcam knows how to cut")
    bb = Backbone(trunk, last, 0, in_chans)
    bb.out_channels = _infer_channels(bb, in_chans)
    return bb


def _load_whole(model: nn.Module, pretrained: Any, classifier_prefix: str) -> Any:
    """Load a weights file into a whole classifier; its classifier may be of another class count."""
    from .pretrained import load_pretrained

    return load_pretrained(model, pretrained, tolerate=(classifier_prefix,), adapt_first_conv=True)


def torchvision_backbone(name: str, in_chans: int = 3, **kwargs: Any) -> Backbone:
    """A torchvision CNN (random weights; ``kwargs`` go to its builder) cut at its last conv stage."""
    return build_backbone(name, in_chans, None, kwargs)[0]


class _TimmFeatures(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model.forward_features(x)


def timm_model(name: str, **kwargs: Any) -> nn.Module:
    """The whole timm model ``name`` with random weights (``kwargs`` go to ``timm.create_model``)."""
    if not isinstance(name, str) or not _TIMM_NAME.fullmatch(name):
        raise ConfigError(f"timm model name {name!r} refused: selfcam builds timm's registered architectures by their "
                          "plain names only (hub names such as 'hf-hub:...', 'local-dir:...' or paths would read files "
                          "or reach the network)")  # fmt: skip
    _allowed(kwargs, TIMM_OPTIONS, f"timm model {name!r}")
    try:
        import timm
    except ImportError as e:
        raise ConfigError(f"backbone 'timm:{name}' needs timm: pip install 'selfcam[timm]'") from e
    if not timm.is_model(name.split(".")[0]):
        raise ConfigError(f"unknown timm model {name!r}")
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except RuntimeError as e:  # timm's "Unknown model"
        raise ConfigError(f"unknown timm model {name!r}") from e


def timm_backbone(name: str, in_chans: int = 3, **kwargs: Any) -> Backbone:
    """A timm model (random weights; ``kwargs`` go to ``timm.create_model``) through ``forward_features``."""
    return build_backbone(f"timm:{name}", in_chans, None, kwargs)[0]


def _timm_parts(name: str, in_chans: int, pretrained: Any, kwargs: dict[str, Any]) -> tuple[Backbone, nn.Module | None, Any]:
    if pretrained is None:
        model, classifier, report = timm_model(name, num_classes=0, in_chans=in_chans, **kwargs), None, None
    else:
        model = timm_model(name, in_chans=in_chans, **kwargs)
        prefix = str(model.pretrained_cfg.get("classifier") or "") + "." if hasattr(model, "pretrained_cfg") else ""
        report = _load_whole(model, pretrained, prefix)
        classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
        model.reset_classifier(0)
    trunk = _TimmFeatures(model)
    return Backbone(trunk, nn.Identity(), _infer_channels(trunk, in_chans), in_chans, splittable=False), classifier, report


def build_backbone(name: str, in_chans: int, pretrained: Any, kwargs: dict[str, Any]) -> tuple[Backbone, nn.Module | None, Any]:
    """:func:`create_backbone` with the weights file (or weights name) ``pretrained`` loaded into the whole
    network before it is cut: ``(backbone, the file's classifier or None, PretrainedReport or None)``."""
    if in_chans < 1:
        raise ConfigError(f"in_chans must be >= 1, got {in_chans}")
    from .pretrained import named_weights

    named = named_weights(pretrained)
    if named is not None and name != named.backbone:
        raise ConfigError(f"pretrained {named.name!r} fits backbone {named.backbone!r}, not {name!r}")
    check_depth(name)  # before anything is built
    match = re.fullmatch(r"resnet(\d+)(-bottleneck)?", name)
    try:
        if name.startswith("timm:"):
            return _timm_parts(name[5:], in_chans, pretrained, kwargs)
        if match and (match[2] or int(match[1]) in CIFAR_DEPTHS):
            check_options(cifar_resnet, kwargs, f"backbone {name!r}")
            bb = cifar_resnet(int(match[1]), in_chans, bottleneck=bool(match[2]), **kwargs)
            if pretrained is None:
                return bb, None, None
            from .pretrained import load_pretrained

            return bb, None, load_pretrained(bb, pretrained, adapt_first_conv=True)
        tv = name.removeprefix("torchvision:")
        model = torchvision_model(tv, **kwargs)
        _rebuild_first_conv(model, in_chans)
        report = None if pretrained is None else _load_whole(model, pretrained, _torchvision_classifier(model)[0])
        classifier = None if pretrained is None else _torchvision_classifier(model)[1]
        return _cut_torchvision(model, tv, in_chans), classifier, report
    except TypeError as e:
        raise ConfigError(f"bad option for backbone {name!r}: {e}") from e


def create_backbone(name: str, in_chans: int = 3, *, pretrained: Any = None, **kwargs: Any) -> Backbone:
    """Build a backbone by name (see the module docstring); ``kwargs`` go to its builder.

    ``pretrained``: a weights file (or a name of :data:`selfcam.pretrained.NAMED_WEIGHTS`) loaded into
    the whole torchvision / timm network (its classifier may have another class count) or into the
    CIFAR ResNet, strictly (:func:`selfcam.pretrained.load_pretrained`).
    """
    return build_backbone(name, in_chans, pretrained, kwargs)[0]


def _torchvision_names() -> list[str]:
    """torchvision's classification model names, cached per torchvision version under the user's cache
    directory: importing torchvision.models takes over a second, and ``selfcam models`` should not wait for it."""
    import json
    import os
    from importlib.metadata import PackageNotFoundError, version
    from pathlib import Path

    try:
        tag = version("torchvision")
    except PackageNotFoundError:
        tag = None
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "selfcam" / f"torchvision-{tag}-models.json"
    if tag is not None:
        try:
            names = json.loads(cache.read_text(encoding="utf-8"))
            if isinstance(names, list) and names and all(isinstance(n, str) for n in names):
                return names
        except (OSError, ValueError):
            pass
    import torchvision.models as tvm

    names = sorted(tvm.list_models(module=tvm))
    if tag is not None:
        try:  # best effort: a read-only home only costs the next call the import
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(names), encoding="utf-8")
            tmp.replace(cache)
        except OSError:
            pass
    return names


def list_backbones() -> list[str]:
    """The names :func:`create_backbone` accepts (timm's appear as ``timm:NAME``)."""
    cifar = [f"resnet{d}" for d in CIFAR_DEPTHS] + [f"resnet{d}-bottleneck" for d in (20, 56, 110)]
    return cifar + [f"torchvision:{n}" for n in _torchvision_names()] + ["timm:<name>"]

