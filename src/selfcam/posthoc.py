"""Post-hoc maps on a trained model, with the same output convention as the heads.

``posthoc_map(model, x, "gradcam")`` returns ``(N, H, W)`` maps in ``[0, 1]`` at
input size, on the input's device and in its dtype. Grad-CAM, Grad-CAM++ and
Score-CAM come from the ``grad-cam`` package and LIME from Captum (not
rewritten); ``cam`` is the classic CAM of a ``plain`` model; RISE is ours (no
maintained library has it). The model is a :class:`SelfExplainer` or any module
returning logits. Hooks never outlive the call, and the model's train/eval mode
and ``requires_grad`` flags are restored, also when the call raises.

Grad-CAM and Grad-CAM++ also explain clips: for a video model (input ``(N, T, C, H, W)``)
grad-cam runs on the 3-D feature volume ``(N, K, T, h, w)`` and the maps are ``(N, T, H, W)``,
each frame min-max scaled as the model's own per-frame maps are. :data:`METHOD_TASKS` says
which tasks' models each method explains.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F_
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, ScoreCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import Tensor, nn

from .errors import ConfigError, InputError, require_int
from .cells import CellGrid, measure_cells
from .heads import PlainHead, minmax, upsample
from .metrics import all_finite, check_class_indices, logits_of
from .model import SelfExplainer
from .video import VideoSelfExplainer, check_clip, upsample_clip

__all__ = ["METHOD_TASKS", "POSTHOC_METHODS", "posthoc_map", "preserved_state"]


class _Logits(nn.Module):
    """Presents any model (a :class:`SelfExplainer` too) as a plain ``x -> logits`` module."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return logits_of(self.model, x)


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
            if p.requires_grad != flag:
                p.requires_grad_(flag)


# --- the methods: each is (model, x, target (N,), *, options) -> (N, H, W) ------------


def _cam(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """Classic CAM (Zhou et al. 2016) of a ``plain`` model, upsampled to the input size."""
    if not isinstance(model, SelfExplainer) or not isinstance(model.head, PlainHead):
        raise ConfigError("the classic CAM needs a 'plain' model (GAP + linear classifier)")
    size = tuple(x.shape[-2:])
    with torch.no_grad():
        return upsample(model.head.cam(model.forward_features(x), target), size, cells=model.backbone.cell_grid(size))


class _ChannelsFirstClip(nn.Module):
    """A video model fed as grad-cam feeds 3-D inputs: ``(N, C, T, H, W) -> logits``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return logits_of(self.model, x.transpose(1, 2))


class _Captured(Exception):
    """Raised by the hook of :func:`_layer_cells` once it holds the layer's output (the rest of the forward is skipped)."""


def _layer_cells(model: nn.Module, layer: nn.Module, x: Tensor) -> CellGrid | None:
    """Where ``layer``'s output cells sit in ``x``'s frames (:func:`selfcam.cells.measure_cells` through a forward
    hook); kept on the layer per input size. A clip model is fed clips of the measured frame repeated."""
    size = tuple(int(v) for v in x.shape[-2:])
    cache = layer.__dict__.setdefault("_cell_grids", {})
    if size in cache:
        return cache[size]
    clip = x.dim() == 5

    def features(inp: Tensor) -> Tensor:
        captured: list[Tensor] = []

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            captured.append(output)
            raise _Captured

        handle = layer.register_forward_hook(hook)
        try:
            logits_of(model, inp.unsqueeze(1).expand(-1, x.shape[1], *inp.shape[1:]) if clip else inp)
        except _Captured:
            pass
        finally:
            handle.remove()
        out = captured[0]
        return out[:, :, 0] if out.dim() == 5 else out  # (N, K, T, h, w): its first frame

    cache[size] = measure_cells(features, x.shape[-3], size, device=x.device, dtype=x.dtype, module=model)
    return cache[size]


def _target_cells(model: nn.Module, layer: nn.Module, default: bool, x: Tensor) -> CellGrid | None:
    """The cell grid of grad-cam's target layer: the backbone's for the default layer, else measured on the layer."""
    if default and isinstance(model, (SelfExplainer, VideoSelfExplainer)):
        return model.backbone.cell_grid(tuple(x.shape[-2:]))
    return _layer_cells(model, layer, x)


def _feature_resolution(cam_class: type) -> type:
    """``cam_class`` returning its maps at the target layer's resolution (min-max scaled by grad-cam), so that
    they reach image size through :func:`~selfcam.heads.upsample` as every map does, not through ``cv2.resize``
    or ``scipy.ndimage.zoom`` (whose cells sit half a feature pixel off the backbone's, docs/methods.md)."""

    class AtFeatures(cam_class):  # type: ignore[misc, valid-type]
        def get_target_width_height(self, input_tensor: Tensor) -> None:
            return None

    AtFeatures.__name__ = AtFeatures.__qualname__ = f"{cam_class.__name__}AtFeatures"
    return AtFeatures


def _gradcam(cam_class: type, model: nn.Module, x: Tensor, target: Tensor, *, target_layer: nn.Module | None = None) -> Tensor:
    """grad-cam's ``cam_class`` at ``target_layer`` (default: a SelfExplainer's last backbone stage, a
    video model's backbone output ``F (N, K, T, h, w)``). Clips ``(N, T, C, H, W)`` give ``(N, T, H, W)``.
    grad-cam computes the map at the layer's resolution; :func:`~selfcam.heads.upsample` takes it to image size
    with the layer's cells where the network centres them."""
    clip = isinstance(model, VideoSelfExplainer)
    default = target_layer is None
    if target_layer is None:
        if clip:
            target_layer = model.backbone
        elif isinstance(model, SelfExplainer):
            target_layer = model.backbone.last if model.backbone.splittable else model.backbone.trunk
        else:
            raise ConfigError("option target_layer is required for a model that is not a SelfExplainer")
    elif not any(m is target_layer for m in model.modules()):
        raise ConfigError(f"option target_layer must be a submodule of the model, got {type(target_layer).__name__}")
    cells = _target_cells(model, target_layer, default, x)
    # not grad-cam's `with` block: its __exit__ swallows exceptions; we release the hooks ourselves
    extractor = _feature_resolution(cam_class)(model=_ChannelsFirstClip(model) if clip else _Logits(model), target_layers=[target_layer])
    try:
        maps = extractor(input_tensor=x.transpose(1, 2) if clip else x, targets=[ClassifierOutputTarget(int(c)) for c in target])
    finally:
        extractor.activations_and_grads.release()
    maps = torch.from_numpy(maps)  # (N, h, w), or (N, T', h, w) for a clip
    if clip:  # per frame, as the self maps
        return upsample_clip(maps, (x.shape[1], *x.shape[-2:]), cells=cells)
    return upsample(maps, tuple(x.shape[-2:]), cells=cells)


def _rise_grids(n: int, s: int, p: float, size: tuple[int, int], generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """The random draws of ``n`` RISE masks: binary grids ``(n, 1, s, s)`` float and crop offsets ``(n, 2)``.

    Offsets are uniform in ``[0, ceil(H / s)) x [0, ceil(W / s))`` (one grid cell).
    """
    dev = generator.device
    grids = (torch.rand(n, 1, s, s, generator=generator, device=dev) < p).float()
    dy = torch.randint(0, math.ceil(size[0] / s), (n,), generator=generator, device=dev)
    dx = torch.randint(0, math.ceil(size[1] / s), (n,), generator=generator, device=dev)
    return grids, torch.stack([dy, dx], dim=1)


def _rise_crop(grids: Tensor, offsets: Tensor, size: tuple[int, int]) -> Tensor:
    """Upsample grids ``(n, 1, s, s)`` bilinearly to ``ceil((s + 1) H / s)`` and crop ``H x W``: ``(n, H, W)``.

    The up-sampled size leaves room for any offset drawn by :func:`_rise_grids`
    (it is ``H + ceil(H / s)``); it equals the authors' code's ``(s + 1) ceil(H / s)``
    when ``s`` divides ``H``. Borders are clamped (torch's bilinear) where the authors'
    code mirrors (scikit-image ``mode='reflect'``): only the outer half cell differs.
    """
    (h, w), s = size, grids.shape[-1]
    up = F_.interpolate(grids, size=(math.ceil((s + 1) * h / s), math.ceil((s + 1) * w / s)), mode="bilinear")
    rows = offsets[:, :1] + torch.arange(h, device=grids.device)  # (n, H)
    cols = offsets[:, 1:] + torch.arange(w, device=grids.device)  # (n, W)
    idx = torch.arange(len(grids), device=grids.device)[:, None, None]
    return up[:, 0][idx, rows[:, :, None], cols[:, None, :]]


def _rise_masks(n: int, s: int, p: float, size: tuple[int, int], generator: torch.Generator) -> Tensor:
    """``n`` RISE masks ``(n, H, W)`` in ``[0, 1]`` on the generator's device (Petsiuk et al. 2018, 3.2)."""
    return _rise_crop(*_rise_grids(n, s, p, size, generator), size)


def _rise(
    model: nn.Module, x: Tensor, target: Tensor, *, n_masks: int = 2000, s: int = 8, p: float = 0.5, batch_size: int = 100, seed: int = 0
) -> Tensor:
    """RISE (Petsiuk et al. 2018): ``minmax(sum_i P_c(x * M_i) M_i / (n_masks p))`` with ``P = softmax``.

    All images share the ``n_masks`` masks (``s x s`` grids, keep probability ``p``),
    drawn from a CPU generator seeded with ``seed``: the result repeats exactly, does
    not depend on ``batch_size`` and is the same on every device. Masks multiply
    ``x`` in the model's input space. ``batch_size`` bounds the masked images per
    forward pass (at least one mask for all ``N`` images).
    """
    for name, value in (("n_masks", n_masks), ("s", s), ("batch_size", batch_size)):
        require_int(f"option {name}", value)
    require_int("option seed", seed, 0)
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 < p <= 1:
        raise ConfigError(f"option p must be a probability in (0, 1], got {p!r}")
    n, size = len(x), (x.shape[-2], x.shape[-1])
    grids, offsets = _rise_grids(n_masks, s, p, size, torch.Generator().manual_seed(seed))
    grids, offsets = grids.to(device=x.device, dtype=x.dtype), offsets.to(x.device)
    step = max(1, batch_size // n)
    saliency = x.new_zeros(n, *size)
    rows = torch.arange(n, device=x.device)
    with torch.no_grad():
        for start in range(0, n_masks, step):
            masks = _rise_crop(grids[start : start + step], offsets[start : start + step], size)  # (b, H, W)
            masked = (x[:, None] * masks[None, :, None]).flatten(0, 1)  # (N b, C, H, W), image-major
            probs = logits_of(model, masked).softmax(dim=1).view(n, len(masks), -1)
            saliency += torch.einsum("nb,bhw->nhw", probs[rows, :, target], masks)
    return minmax(saliency / (n_masks * p))


def _grid_cells(segments: int, size: tuple[int, int], device: torch.device) -> Tensor:
    """Cell index ``(H, W)`` long in ``[0, segments^2)`` of a regular ``segments x segments`` grid."""
    rows = torch.arange(size[0], device=device) * segments // size[0]
    cols = torch.arange(size[1], device=device) * segments // size[1]
    return rows[:, None] * segments + cols[None, :]


def _lime(
    model: nn.Module, x: Tensor, target: Tensor, *, n_samples: int = 200, segments: int = 8, batch_size: int = 100, seed: int = 0
) -> Tensor:
    """LIME (Ribeiro et al. 2016) by Captum on the logit of ``target``.

    Superpixels are the cells of a regular ``segments x segments`` grid (not SLIC:
    it is model- and data-agnostic and needs no image statistics). ``n_samples``
    perturbations per image, off cells set to 0 in the model's input space, fitted
    by Captum's default surrogate (``SkLearnLasso(alpha=0.01)``) with its cosine
    kernel; ``batch_size`` perturbations per forward pass. The logit, as the
    grad-cam methods explain, not the probability: that Lasso shrinks the small
    per-cell changes of a softmax probability to exactly 0. The cell coefficients
    are broadcast to their pixels, negatives clipped to 0, then min-max scaled.
    Sampling is seeded with ``seed`` on a forked CPU RNG (Captum draws there), so
    the call repeats exactly and leaves the global RNG state as it was.
    """
    from captum.attr import Lime  # imported here: Captum is only needed for this method

    for name, value in (("n_samples", n_samples), ("segments", segments), ("batch_size", batch_size)):
        require_int(f"option {name}", value)
    require_int("option seed", seed, 0)
    if segments > min(x.shape[-2:]):
        raise ConfigError(f"option segments={segments} exceeds the image size {tuple(x.shape[-2:])}")
    cells = _grid_cells(segments, (x.shape[-2], x.shape[-1]), x.device)
    lime = Lime(partial(logits_of, model))
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings(), torch.no_grad():
        torch.default_generator.manual_seed(seed)
        warnings.filterwarnings("ignore", message="You are providing multiple inputs")
        coefs = lime.attribute(
            x,
            baselines=0.0,
            target=target,
            feature_mask=cells.expand(len(x), 1, -1, -1),
            n_samples=n_samples,
            perturbations_per_eval=min(batch_size, n_samples),
            return_input_shape=False,
        )
    coefs = coefs.to(device=x.device, dtype=x.dtype).reshape(len(x), -1)  # (N, cells); Captum fits on the CPU
    return minmax(coefs[:, cells].clamp(min=0))  # -> (N, H, W)


_GRADCAM = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "scorecam": ScoreCAM}
_METHODS: dict[str, Callable[..., Tensor]] = {
    "cam": _cam,
    **{name: partial(_gradcam, cls) for name, cls in _GRADCAM.items()},
    "rise": _rise,
    "lime": _lime,
}
POSTHOC_METHODS = tuple(_METHODS)
# the tasks whose models each method explains: grad-cam's 3-D support gives Grad-CAM and Grad-CAM++ on clips;
# its Score-CAM, RISE and LIME perturb images; the classic CAM reads a plain image model's classifier
METHOD_TASKS: dict[str, tuple[str, ...]] = {m: ("image", "video") if m in ("gradcam", "gradcam++") else ("image",) for m in _METHODS}


def _options(method: str) -> list[str]:
    """The keyword options ``method`` accepts (its runner's keyword-only parameters)."""
    params = inspect.signature(_METHODS[method]).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


def _check_input(model: nn.Module, x: Tensor) -> None:
    if isinstance(model, SelfExplainer):
        model.check_input(x)  # finite values included
    elif isinstance(model, VideoSelfExplainer):
        check_clip(x, model.config.in_chans, model.config.frames)
    elif not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise InputError(f"expected a floating-point image tensor of shape (N, C, H, W), got {shape}")
    if len(x) == 0:
        raise InputError("the input batch is empty (N = 0)")
    if not isinstance(model, SelfExplainer) and not all_finite(x):
        raise InputError("the input holds NaN or infinite values")


def _target(model: nn.Module, x: Tensor, target: Tensor | None) -> Tensor:
    """``target`` checked as ``(N,)`` class indices on ``x``'s device; by default the predicted class."""
    if target is None or not isinstance(model, (SelfExplainer, VideoSelfExplainer)):
        with torch.no_grad():
            logits = logits_of(model, x)  # checks the (N, classes) shape
        if target is None:
            return logits.argmax(dim=1)
        classes = logits.shape[1]
    else:
        classes = model.config.num_classes
    target = torch.as_tensor(target, device=x.device)
    check_class_indices(target, len(x), classes)
    return target


def posthoc_map(model: nn.Module, x: Tensor, method: str = "gradcam", target: Tensor | None = None, **options: Any) -> Tensor:
    """Maps ``(N, H, W)`` in ``[0, 1]`` for class ``target`` ``(N,)`` (default: the predicted class).

    ``x``: ``(N, C, H, W)``, or a clip ``(N, T, C, H, W)`` for a video model and the methods of
    :data:`METHOD_TASKS` that take one (maps ``(N, T, H, W)``). ``options`` go to the method: ``target_layer`` for the
    grad-cam methods (default: a SelfExplainer's last backbone stage; required for
    other models); ``n_masks=2000, s=8, p=0.5, batch_size=100, seed=0`` for
    ``"rise"``; ``n_samples=200, segments=8, batch_size=100, seed=0`` for ``"lime"``.
    Every map is min-max scaled per image with :func:`selfcam.heads.minmax`, whose
    rule for a constant map is: all 0 if it is 0, all 1 otherwise (e.g. a LIME map
    whose attributions are all negative is all 0). Raises :class:`ConfigError` for
    an unknown method or option, :class:`InputError` for a bad ``x`` or ``target``,
    or when the model's outputs make the map NaN or infinite.
    """
    if method not in _METHODS:
        raise ConfigError(f"unknown post-hoc method {method!r}; choose one of {', '.join(POSTHOC_METHODS)}")
    unknown = sorted(set(options) - set(_options(method)))
    if unknown:
        accepted = ", ".join(_options(method)) or "none"
        raise ConfigError(f"unknown option(s) {', '.join(unknown)} for post-hoc method {method!r} (accepted: {accepted})")
    task = getattr(model, "task", "image")
    if task not in METHOD_TASKS[method]:
        raise ConfigError(f"{method} explains {' and '.join(METHOD_TASKS[method])} models; this is a {task} model")
    _check_input(model, x)
    with preserved_state(model):
        model.eval()
        maps = _METHODS[method](model, x, _target(model, x, target), **options)
    maps = maps.to(device=x.device, dtype=x.dtype)
    if not all_finite(maps):
        raise InputError(f"{method} map holds NaN or infinite values: the model's outputs are not finite for this input")
    return maps
