"""Explanation heads: each turns a feature map into logits and a heatmap in one pass.

Every head takes the backbone's last-stage feature map ``F`` of shape ``(N, K, h, w)``
(and the normalized input ``x`` of shape ``(N, C, H, W)``) and returns an
:class:`ExplainedOutput` whose ``heatmap`` has shape ``(N, h, w)`` with values in
``[0, 1]``. The shared mechanics (min-max, classifier, loss, registry) live in
:class:`Head`; each method is a short subclass. See docs/design.md section 2.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F_
from torch import Tensor, nn

from .cells import CellGrid, resample
from .errors import ConfigError

__all__ = [
    "ExplainedOutput",
    "Head",
    "PlainHead",
    "LFIHead",
    "SEHead",
    "ABNHead",
    "HEADS",
    "minmax",
    "upsample",
    "weighted_map",
    "se_select",
    "MultiLabelSEHead",
    "register_head",
]


@dataclass
class ExplainedOutput:
    """What every head returns.

    logits: ``(N, num_classes)``. heatmap: ``(N, h, w)`` in ``[0, 1]``.
    channel_weights: ``(N, K)`` LFI importance ``w`` or SE vector ``s``.
    selected: ``(N, K)`` bool, the SE channels that built the map.
    aux_logits: ``(N, num_classes)``, ABN's attention-branch logits.
    features: ``(N, K, h, w)``, what the classifier pools: ``F`` (plain), ``(1 + A) F`` (LFI),
    ``s F`` (SE), ``(1 + M) F`` (ABN); ``None`` for heads whose logits are not ``fc(GAP(features))``.
    class_heatmap: ``(N, h, w)`` in ``[0, 1]``, the class-specific map (:meth:`Head.class_map`) of the
    target class; set by :class:`~selfcam.model.SelfExplainer` only when asked for with ``target=``
    (a class, ``(N,)`` classes or ``"predicted"``) and the head gives ``features``; else ``None``.
    """

    logits: Tensor
    heatmap: Tensor
    channel_weights: Tensor | None = None
    selected: Tensor | None = None
    aux_logits: Tensor | None = None
    features: Tensor | None = None
    class_heatmap: Tensor | None = None


def minmax(t: Tensor, dims: tuple[int, ...] = (-2, -1)) -> Tensor:
    """Min-max scale ``t`` to ``[0, 1]`` over ``dims`` (per sample, per channel...).

    A constant slice (its span at most the dtype's ``tiny``) maps to 0 if its value
    is 0 and to 1 otherwise (docs/design.md 2.1 step 2); nothing is ever divided by
    zero, so the result never holds NaN unless ``t`` does. Elsewhere the result is
    ``(t - lo) / span`` bit for bit; only slice-sized ops tell the two cases apart.
    """
    lo = t.amin(dim=dims, keepdim=True)
    span = t.amax(dim=dims, keepdim=True) - lo
    flat = span <= torch.finfo(t.dtype).tiny
    # constant slices: (t - lo) / inf = 0 exactly, plus 1 where the constant is not 0
    fill = torch.where(flat, (lo != 0).to(t.dtype), torch.zeros_like(span))
    return (t - lo) / torch.where(flat, torch.full_like(span, math.inf), span) + fill


def upsample(heatmap: Tensor, size: tuple[int, int] | int, mode: str = "bilinear", cells: CellGrid | None = None) -> Tensor:
    """Resize maps ``(N, h, w)`` to ``(N, H, W)`` and re-normalize them to ``[0, 1]``: the one door every map
    (the heads', the post-hoc methods', per frame of a clip) takes to image size.

    ``cells``: where the backbone centres its feature cells in the image (:class:`~selfcam.cells.CellGrid`, measured
    by :meth:`selfcam.backbones.Backbone.cell_grid`); each cell's value lands on its centre. Without it, the cells are
    assumed where bilinear upsampling with ``align_corners=False`` puts them (``F.interpolate``'s result exactly).
    ``mode`` is ``"bilinear"`` or ``"bicubic"`` (bicubic can overshoot, so the result is min-max scaled again, as
    docs/design.md 2.2 step 3 says).
    """
    if heatmap.dim() != 3:
        raise ValueError(f"upsample expects heatmaps of shape (N, h, w), got {tuple(heatmap.shape)}")
    if mode not in ("bilinear", "bicubic"):
        raise ConfigError(f"upsample mode must be 'bilinear' or 'bicubic', got {mode!r}")
    size = (size, size) if isinstance(size, int) else tuple(size)
    return minmax(resample(heatmap, size, mode, cells))


def weighted_map(weights: Tensor, features: Tensor, *, relu: bool = False, count: Tensor | None = None) -> Tensor:
    """The map of every CAM-like method: ``minmax(sum_k w_k F_k)`` per frame, for any number of map axes.

    ``weights (N, K)`` or ``(N, A, K)`` (one weight vector per attribute); ``features (N, K, *rest)``
    with ``rest`` ``(h, w)`` for images or ``(T, h, w)`` for clips. ``relu`` clips negative sums to 0
    (CAM, LFI-CAM, Grad-CAM); ``count (N,)`` or ``(N, A)`` divides each sum (SE-CAM's mean over its
    selected channels). The result, ``(N, *rest)`` or ``(N, A, *rest)``, is min-max scaled over its
    last two axes (each frame on its own).
    """
    spec = "nk,nkr->nr" if weights.dim() == 2 else "nak,nkr->nar"
    heat = torch.einsum(spec, weights, features.flatten(2))
    if count is not None:
        heat = heat / count.to(heat.dtype).unsqueeze(-1)
    if relu:
        heat = F_.relu(heat)
    return minmax(heat.reshape(*heat.shape[:-1], *features.shape[2:]))


HEADS: dict[str, type["Head"]] = {}


def register_head(name: str) -> Callable[[type["Head"]], type["Head"]]:
    """Class decorator: make a head available to :func:`selfcam.create_model` by ``name``."""

    def deco(cls: type[Head]) -> type[Head]:
        cls.name = name
        HEADS[name] = cls
        return cls

    return deco


class Head(nn.Module):
    """Shared mechanics: GAP + linear classifier, the loss, the output type.

    Subclasses implement :meth:`forward` and keep ``self.fc`` as their classifier. ``task`` names the
    task whose models the head makes (:mod:`selfcam.tasks`); a head with ``needs_last_stage`` is given a
    copy of the backbone's last stage as ``attention_stage`` (ABN's branch) when the backbone has one.
    """

    name: ClassVar[str] = "head"
    task: ClassVar[str] = "image"
    needs_last_stage: ClassVar[bool] = False

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        if in_channels < 1 or num_classes < 1:
            raise ConfigError(f"in_channels and num_classes must be positive, got {in_channels}, {num_classes}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.fc = nn.Linear(in_channels, num_classes)

    def classify(self, features: Tensor) -> Tensor:
        """Global average pool and the linear classifier: ``(N, K, h, w) -> (N, classes)``."""
        return self.fc(features.mean(dim=(-2, -1)))

    def class_map(self, features: Tensor, target: Tensor) -> Tensor:
        """The class-specific map of the features the classifier pools (``ExplainedOutput.features``):
        ``minmax(ReLU(sum_k W[c, k] G_k))`` for class ``c = target[n]`` of each sample, ``(N, h, w)``.

        Every head's logits are ``fc(GAP(G))``, so this is the classic CAM (Zhou et al. 2016) of ``G``:
        the part of logit ``c`` (less the bias) that each cell adds, up to the ``1 / (h w)`` of the pool.
        For ``plain`` (``G = F``) it is :meth:`PlainHead.cam`.
        """
        return weighted_map(self.fc.weight[target], features, relu=True)

    def forward(self, features: Tensor, image: Tensor, pre_features: Tensor | None = None) -> ExplainedOutput:
        raise NotImplementedError

    def loss(self, out: ExplainedOutput, target: Tensor) -> Tensor:
        """Cross-entropy on the logits (one loss, as LFI-CAM and SE-CAM train)."""
        return F_.cross_entropy(out.logits, target)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier for ``num_classes`` outputs (timm's convention)."""
        self.num_classes = num_classes
        self.fc = nn.Linear(self.in_channels, num_classes).to(self.fc.weight.device)


@register_head("plain")
class PlainHead(Head):
    """GAP + FC; its heatmap is the classic CAM (Zhou et al. 2016) of the predicted class."""

    def forward(self, features: Tensor, image: Tensor, pre_features: Tensor | None = None) -> ExplainedOutput:
        logits = self.classify(features)
        return ExplainedOutput(logits=logits, heatmap=self.cam(features, logits.argmax(dim=1)), features=features)

    def cam(self, features: Tensor, target: Tensor) -> Tensor:
        """``ReLU(sum_k W[c, k] F_k)`` for class ``target[n]`` of each sample, min-max scaled."""
        return self.class_map(features, target)


def _conv_bn(cin: int, cout: int, kernel: int, relu: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout)]
    return layers + [nn.ReLU()] if relu else layers


def full_fin(channels: int) -> nn.Sequential:
    """The paper's Feature Importance Network body: four 3x3 convs K->K with BN, ReLU after the 2nd and 4th."""
    return nn.Sequential(
        *_conv_bn(channels, channels, 3, relu=False),
        *_conv_bn(channels, channels, 3, relu=True),
        *_conv_bn(channels, channels, 3, relu=False),
        *_conv_bn(channels, channels, 3, relu=True),
    )


def light_fin(channels: int, width: int | None = None) -> nn.Sequential:
    """A cheap FIN body with the paper's shape (4 conv+BN, ReLU after the 2nd and 4th).

    1x1 K->r, 3x3 r->r, 3x3 r->r, 1x1 r->K with ``r = max(16, K // 32)``: the two
    3x3 convs keep the FIN's spatial context while the 1x1 bottleneck keeps the cost
    near ``2 K r`` weights instead of ``36 K^2`` (ResNet-50: 0.34 M instead of 151 M).
    """
    r = width or max(16, channels // 32)
    return nn.Sequential(
        *_conv_bn(channels, r, 1, relu=False),
        *_conv_bn(r, r, 3, relu=True),
        *_conv_bn(r, r, 3, relu=False),
        *_conv_bn(r, channels, 1, relu=True),
    )


@register_head("lfi")
class LFIHead(Head):
    """LFI-CAM (Lee et al., ICCV 2021), docs/design.md 2.1, with the paper's FIN.

    ``w = softmax(GAP(FIN(s(F) * I')))``, ``A = minmax(ReLU(sum_k w_k F_k))``,
    logits from ``GAP((1 + A) * F)``. All channels go through the FIN in one
    batched pass (the authors' release loops over channels).
    """

    def __init__(self, in_channels: int, num_classes: int, fin: str = "full", fin_width: int | None = None) -> None:
        super().__init__(in_channels, num_classes)
        if fin == "full":
            self.fin = full_fin(in_channels)
        elif fin == "light":
            self.fin = light_fin(in_channels, fin_width)
        else:
            raise ConfigError(f"unknown FIN {fin!r}: choose 'full' or 'light'")
        self.fin_kind = fin

    def importance(self, features: Tensor, image: Tensor) -> Tensor:
        """The FIN's channel importance ``w``: ``(N, K)``, each row sums to 1."""
        # resize each channel, then average: the same guide as averaging first (both are linear), at a fraction of
        # the cost, since bilinear downsampling reads only 4 pixels per cell
        guide = F_.interpolate(image, size=features.shape[-2:], mode="bilinear", align_corners=False).mean(dim=1, keepdim=True)
        return torch.softmax(self.fin(minmax(features) * guide).mean(dim=(-2, -1)), dim=1)

    def forward(self, features: Tensor, image: Tensor, pre_features: Tensor | None = None) -> ExplainedOutput:
        w = self.importance(features, image)
        attention = weighted_map(w, features, relu=True)
        weighted = (1 + attention.unsqueeze(1)) * features
        return ExplainedOutput(logits=self.classify(weighted), heatmap=attention, channel_weights=w, features=weighted)


@register_head("lfi-light")
class LFILightHead(LFIHead):
    """LFI-CAM with :func:`light_fin` (about 1.3 % of ResNet-50's parameters)."""

    def __init__(self, in_channels: int, num_classes: int, fin_width: int | None = None) -> None:
        super().__init__(in_channels, num_classes, fin="light", fin_width=fin_width)


def check_se_options(reduction: int, space: str) -> None:
    """Raise :class:`ConfigError` unless ``reduction >= 1`` and ``space`` is ``"logit"`` or ``"sigmoid"``."""
    if reduction < 1:
        raise ConfigError(f"SE reduction must be >= 1, got {reduction}")
    if space not in ("logit", "sigmoid"):
        raise ConfigError(f"SE selection space must be 'logit' or 'sigmoid', got {space!r}")


def se_select(s: Tensor, factor: float = 1.282) -> Tensor:
    """SE-CAM channel selection: ``s_c > mean(s) + factor * std(s)`` per row of ``s`` ``(N, K)``.

    ``std`` is the population standard deviation (the spec does not say; with
    1.282 it marks about the top 10 % of a normal vector). An empty row falls
    back to its arg-max channel. Returns a bool mask ``(N, K)``.

    The fallback is written with boolean ops, not ``torch.where`` on bool tensors:
    ONNX Runtime has no bool ``Where`` kernel, and this form exports as is.
    """
    threshold = s.mean(dim=1, keepdim=True) + factor * s.std(dim=1, keepdim=True, correction=0)
    mask = s > threshold
    top = F_.one_hot(s.argmax(dim=1), s.shape[1]).bool()
    return mask | (top & ~mask.any(dim=1, keepdim=True))


@register_head("se")
class SEHead(Head):
    """SE-CAM (Roxo et al., 2024), docs/design.md 2.2 steps 1-3.

    ``s = sigmoid(W2 ReLU(W1 GAP(F)))`` (no biases), logits from ``GAP(F * s)``;
    heatmap: mean over the selected channels of ``s_c F_c``, min-max scaled.

    ``space`` says on which values the selection statistic is computed. docs/design.md
    writes it on ``s``; trained SE gates saturate (most ``s_c`` near 1 or 0), and
    then ``mean + 1.282 std`` lies above every ``s_c`` whenever more than 38 % of the
    gates are open, so the rule always falls back to one channel (cluttered digits:
    pointing game 0.62-0.71). ``space="logit"`` (default, our deviation) applies the
    same rule to the pre-sigmoid excitation: same ranking, a scale that does not
    saturate, about the top 10 % as intended. ``space="sigmoid"`` is the literal rule.
    """

    def __init__(
        self, in_channels: int, num_classes: int, reduction: int = 16, factor: float = 1.282, space: str = "logit"
    ) -> None:
        super().__init__(in_channels, num_classes)
        check_se_options(reduction, space)
        hidden = max(1, in_channels // reduction)
        self.excite = nn.Sequential(
            nn.Linear(in_channels, hidden, bias=False), nn.ReLU(), nn.Linear(hidden, in_channels, bias=False)
        )
        self.factor = factor
        self.space = space

    def forward(self, features: Tensor, image: Tensor, pre_features: Tensor | None = None) -> ExplainedOutput:
        excitation = self.excite(features.mean(dim=(-2, -1)))
        s = torch.sigmoid(excitation)
        weighted = features * s[:, :, None, None]
        selected = se_select((excitation if self.space == "logit" else s).detach(), self.factor)
        heat = weighted_map(s * selected, features, count=selected.sum(dim=1))
        return ExplainedOutput(logits=self.classify(weighted), heatmap=heat, channel_weights=s, selected=selected,
                               features=weighted)  # fmt: skip


def _basic_block(channels: int) -> nn.Module:
    """A residual-free stand-in stage for backbones that cannot be split (see :class:`ABNHead`)."""
    return nn.Sequential(*_conv_bn(channels, channels, 3, relu=True), *_conv_bn(channels, channels, 3, relu=True))


@register_head("abn")
class ABNHead(Head):
    """Attention Branch Network (Fukui et al., CVPR 2019), docs/design.md 2.3.

    Attention branch: a copy of the backbone's last stage on the features that
    enter it, BN, 1x1 conv to #classes, BN, ReLU; then (a) 1x1 conv + GAP for the
    auxiliary logits, (b) 1x1 conv to 1 channel, BN, sigmoid for the map ``M``.
    Perception branch: GAP + FC on ``(1 + M) * F``. Loss: ``CE(att) + CE(per)``.

    Following docs/design.md, ``M`` re-weights the last stage's output ``F``; the
    original ABN re-weights the input of the last stage and runs that stage again.
    When the backbone cannot be split (``attention_stage=None``) the branch runs a
    two-conv block on ``F`` itself.
    """

    needs_last_stage: ClassVar[bool] = True

    def __init__(self, in_channels: int, num_classes: int, attention_stage: nn.Module | None = None) -> None:
        super().__init__(in_channels, num_classes)
        self.uses_pre_features = attention_stage is not None
        self.att_stage = copy.deepcopy(attention_stage) if attention_stage is not None else _basic_block(in_channels)
        self.att_bn = nn.BatchNorm2d(in_channels)
        self.att_conv = nn.Sequential(
            nn.Conv2d(in_channels, num_classes, 1, bias=False), nn.BatchNorm2d(num_classes), nn.ReLU()
        )
        self.att_logits = nn.Conv2d(num_classes, num_classes, 1, bias=False)
        self.att_map = nn.Sequential(nn.Conv2d(num_classes, 1, 1, bias=False), nn.BatchNorm2d(1), nn.Sigmoid())

    def forward(self, features: Tensor, image: Tensor, pre_features: Tensor | None = None) -> ExplainedOutput:
        if self.uses_pre_features:
            if pre_features is None:
                raise ValueError("this ABN head copies the backbone's last stage and needs pre_features")
            branch_in = pre_features
        else:
            branch_in = features
        a = self.att_conv(self.att_bn(self.att_stage(branch_in)))
        aux_logits = self.att_logits(a).mean(dim=(-2, -1))
        m = self.att_map(a)  # (N, 1, h, w)
        if m.shape[-2:] != features.shape[-2:]:
            raise ValueError(f"ABN attention map {tuple(m.shape[-2:])} does not match features {tuple(features.shape[-2:])}")
        weighted = (1 + m) * features
        return ExplainedOutput(logits=self.classify(weighted), heatmap=minmax(m.squeeze(1)), aux_logits=aux_logits,
                               features=weighted)  # fmt: skip

    def loss(self, out: ExplainedOutput, target: Tensor) -> Tensor:
        assert out.aux_logits is not None
        return F_.cross_entropy(out.logits, target) + F_.cross_entropy(out.aux_logits, target)

    def reset_classifier(self, num_classes: int) -> None:
        raise ConfigError("ABN's attention branch is built for a fixed class count; create a new model instead")


@register_head("se-multilabel")
class MultiLabelSEHead(Head):
    """SE-CAM for multi-label attributes (docs/design.md 2.2 step 6): one SE block per attribute.

    The A attributes share the backbone and ``F``; attribute ``a`` has its own excitation
    ``e_a = W2_a ReLU(W1_a GAP(F))`` (no biases, as :class:`SEHead`), ``s_a = sigmoid(e_a)`` and
    logit ``fc_a . GAP(F * s_a) + b_a`` (computed as ``fc_a . (s_a * GAP(F))``, the same value).
    Heatmap ``(N, A, h, w)``: for each attribute the :class:`SEHead` map from its own vector,
    ``minmax(mean_{c in S_a} s_ac F_c)`` with ``S_a = se_select(e_a)`` (``space="logit"``) or
    ``se_select(s_a)`` (``"sigmoid"``). ``channel_weights`` and ``selected`` are ``(N, A, K)``.
    Loss: binary cross-entropy with logits on float ``{0, 1}`` targets ``(N, A)``.
    """

    task: ClassVar[str] = "attributes"

    def __init__(
        self, in_channels: int, num_classes: int, reduction: int = 16, factor: float = 1.282, space: str = "logit"
    ) -> None:
        super().__init__(in_channels, num_classes)
        check_se_options(reduction, space)
        self.hidden = max(1, in_channels // reduction)
        self.factor = factor
        self.space = space
        self.w1 = nn.Parameter(torch.empty(num_classes, self.hidden, in_channels))
        self.w2 = nn.Parameter(torch.empty(num_classes, in_channels, self.hidden))
        self.reset_excitation()

    def reset_excitation(self) -> None:
        """Initialise every attribute's SE weights as ``nn.Linear`` does: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
        for w in (self.w1, self.w2):
            nn.init.uniform_(w, -w.shape[-1] ** -0.5, w.shape[-1] ** -0.5)

    def excitation(self, pooled: Tensor) -> Tensor:
        """Pre-sigmoid excitation of every attribute's SE block: ``GAP(F)`` ``(N, K)`` -> ``(N, A, K)``."""
        hidden = F_.relu(torch.einsum("nk,ajk->naj", pooled, self.w1))
        return torch.einsum("naj,akj->nak", hidden, self.w2)

    def forward(self, features: Tensor, image: Tensor, pre_features: Tensor | None = None) -> ExplainedOutput:
        pooled = features.mean(dim=(-2, -1))
        excitation = self.excitation(pooled)
        s = torch.sigmoid(excitation)
        logits = torch.einsum("nak,ak->na", s * pooled[:, None], self.fc.weight) + self.fc.bias
        stat = (excitation if self.space == "logit" else s).detach()
        selected = se_select(stat.flatten(0, 1), self.factor).view_as(s)
        heat = weighted_map(s * selected, features, count=selected.sum(dim=-1))
        return ExplainedOutput(logits=logits, heatmap=heat, channel_weights=s, selected=selected)

    def loss(self, out: ExplainedOutput, target: Tensor) -> Tensor:
        """Mean binary cross-entropy with logits over samples and attributes."""
        return F_.binary_cross_entropy_with_logits(out.logits, target.to(out.logits.dtype))

    def reset_classifier(self, num_classes: int) -> None:
        """New attribute count: a new classifier and new SE blocks (one per attribute)."""
        super().reset_classifier(num_classes)
        device = self.w1.device
        self.w1 = nn.Parameter(torch.empty(num_classes, self.hidden, self.in_channels, device=device))
        self.w2 = nn.Parameter(torch.empty(num_classes, self.in_channels, self.hidden, device=device))
        self.reset_excitation()
