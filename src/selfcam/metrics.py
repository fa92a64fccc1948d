"""Explanation metrics (docs/design.md section 3). Exact definitions and peer comparisons: docs/metrics.md.

Conventions: ``x`` ``(N, C, H, W)`` is the model's normalized input, ``maps``
``(N, H, W)`` in ``[0, 1]`` at input size, ``target`` ``(N,)`` int class indices,
``masks`` ``(N, H, W)`` bool ground truth. ``model`` is a
:class:`~selfcam.model.SelfExplainer` or any module returning logits; put it in
eval mode first (the metrics never change its mode).

Each function returns one value per sample (``(N,)``, or ``(N, P)`` for curves)
so callers can stream over a data loader and average at the end. Metrics that
call the model run under ``torch.no_grad`` and evaluate one batch per step.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F_
from torch import Tensor, nn

from .errors import ConfigError, InputError

__all__ = [
    "accuracy",
    "check_class_indices",
    "pointing_game",
    "zhang_tolerance",
    "iou",
    "dice",
    "energy_pointing_game",
    "confident_correct",
    "make_grids",
    "tile_grid",
    "grid_cell_masks",
    "grid_pointing_game",
    "logits_of",
    "check_maps",
    "average_drop",
    "increase_in_confidence",
    "confidence_change",
    "make_baseline",
    "deletion_curve",
    "insertion_curve",
    "deletion_auc",
    "insertion_auc",
    "noisy_linear_imputation",
    "road",
    "stability",
    "temporal_stability",
    "spearman",
    "cascading_randomization",
    "BASELINES",
    "ROAD_PERCENTILES",
]

BASELINES = ("zero", "blur", "mean")
ROAD_PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)


# --- checks and shared helpers ------------------------------------------------------


def all_finite(t: Tensor) -> bool:
    """Whether ``t`` holds no NaN or infinity: one sum (a NaN or infinity anywhere makes it non-finite), and the
    exact elementwise test only when the sum is not finite (it also overflows on huge finite values). One host
    sync on CUDA, as ``bool(torch.isfinite(t).all())``; a fraction of its cost on the CPU."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _check_finite(t: Tensor, what: str) -> None:
    if t.is_floating_point() and not all_finite(t):
        bad = int((~torch.isfinite(t)).sum())
        raise InputError(f"NaN or inf values in {what} ({bad} of {t.numel()})")


def _check_pair(maps: Tensor, masks: Tensor) -> None:
    """Shape (and finiteness) check shared by the map-vs-mask metrics."""
    if maps.dim() != 3 or maps.shape != masks.shape:
        raise InputError(f"maps and masks must both be (N, H, W), got {tuple(maps.shape)} and {tuple(masks.shape)}")
    _check_finite(maps, "maps")


def check_class_indices(target: Tensor, n: int, num_classes: int | None) -> None:
    """Raise :class:`InputError` unless ``target`` is ``(n,)`` integer class indices in ``[0, num_classes)``
    (the range is not checked on an empty batch, nor while tracing or compiling: data-dependent)."""
    if not isinstance(target, Tensor) or target.shape != (n,):
        shape = tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__
        raise InputError(f"target must be (N,) = ({n},) class indices, got {shape}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise InputError(f"target must hold integer class indices, got dtype {target.dtype}")
    if n == 0 or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return
    lo, hi = int(target.min()), int(target.max())
    if lo < 0 or (num_classes is not None and hi >= num_classes):
        bound = num_classes if num_classes is not None else "num_classes"
        raise InputError(f"target out of range: class indices must lie in [0, {bound}), got min {lo}, max {hi}")


def check_maps(x: Tensor, maps: Tensor, target: Tensor | None = None, num_classes: int | None = None) -> None:
    """Raise :class:`InputError` naming the problem unless ``x``, ``maps`` and ``target`` fit together.

    ``x`` ``(N, C, H, W)`` float, ``maps`` ``(N, H, W)`` on the same device, both
    finite, ``N >= 1``; ``target`` (if given) ``(N,)`` integer in ``[0, num_classes)``.
    """
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
        desc = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise InputError(f"x must be a float tensor (N, C, H, W), got {desc}")
    n, _, h, w = x.shape
    if n == 0:
        raise InputError(f"empty batch: x has N == 0 (shape {tuple(x.shape)})")
    if not isinstance(maps, Tensor) or maps.shape != (n, h, w):
        shape = tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__
        raise InputError(f"maps shape mismatch: expected (N, H, W) = {(n, h, w)} to match x {tuple(x.shape)}, got {shape}")
    if maps.device != x.device:
        raise InputError(f"maps are on {maps.device} but x is on {x.device}")
    _check_finite(x, "x")
    _check_finite(maps, "maps")
    if target is not None:
        check_class_indices(target, n, num_classes)


def logits_of(model: Callable[[Tensor], Any], x: Tensor) -> Tensor:
    """``model(x).logits`` for a :class:`SelfExplainer`, ``model(x)`` for a plain classifier: ``(N, classes)``."""
    out = model(x)
    logits = getattr(out, "logits", out)
    if not isinstance(logits, Tensor) or logits.dim() != 2 or len(logits) != len(x):
        desc = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise InputError(f"the model must return logits (N, classes) or an object with .logits, got {desc}")
    return logits


def _target_prob(model: Callable[[Tensor], Any], x: Tensor, target: Tensor) -> Tensor:
    """Softmax probability of class ``target[n]``: ``(N, C, H, W) -> (N,)``."""
    logits = logits_of(model, x)
    check_class_indices(target, len(x), logits.shape[1])
    return torch.softmax(logits, dim=1).gather(1, target.to(logits.device).long()[:, None]).squeeze(1)


# input elements per forward when a metric stacks several perturbed copies of its batch into one call
# (4M: 4096 images of 32x32x1, 27 of 224x224x3; a batch larger than this still goes whole, one copy per call)
FORWARD_ELEMENTS = 1 << 22


def _target_probs(model: Callable[[Tensor], Any], variants: Sequence[Tensor] | Callable[[int], Tensor], count: int,
                  target: Tensor) -> Tensor:  # fmt: skip
    """``(N, count)``: :func:`_target_prob` of ``variants(i)`` (or ``variants[i]``), each ``(N, C, H, W)``, for
    ``i < count``. Several copies share one forward pass (up to :data:`FORWARD_ELEMENTS` input elements):
    small images are bound by per-call cost, and the model is in eval mode, so batching changes nothing."""
    get = variants.__getitem__ if isinstance(variants, Sequence) else variants
    first = get(0)
    per_call = max(1, FORWARD_ELEMENTS // max(1, first.numel()))
    probs, done = [], 0
    while done < count:
        k = min(per_call, count - done)
        batch = [first if done + j == 0 else get(done + j) for j in range(k)]
        p = _target_prob(model, torch.cat(batch) if k > 1 else batch[0], target.repeat(k) if k > 1 else target)
        probs.append(p.view(k, -1))
        done += k
    return torch.cat(probs).T


def _ranks(maps: Tensor, descending: bool) -> Tensor:
    """Position of every pixel in the map's order: ``(N, H, W) -> (N, H*W)`` long (ties: stable, row-major first)."""
    flat = maps.flatten(1)
    order = torch.argsort(flat, dim=1, descending=descending, stable=True)
    rank = torch.empty_like(order)
    return rank.scatter_(1, order, torch.arange(flat.shape[1], device=maps.device).expand_as(order))


def _count(fraction: float, total: int) -> int:
    """``round(fraction * total)`` with halves rounded up (not Python's round-half-to-even)."""
    return int(math.floor(fraction * total + 0.5))


# --- classification and localization ------------------------------------------------


def accuracy(logits: Tensor, target: Tensor) -> Tensor:
    """Top-1 hit per sample: ``(N, classes), (N,) -> (N,)`` float."""
    return (logits.argmax(dim=1) == target).float()


def pointing_game(maps: Tensor, masks: Tensor, tolerance: int = 0) -> Tensor:
    """Hit (1.0) when the map's maximum lies in the mask, or within ``tolerance`` pixels of it.

    Ties go to the first maximum in row-major order. Returns ``(N,)`` float.
    """
    _check_pair(maps, masks)
    n, h, w = maps.shape
    idx = maps.reshape(n, -1).argmax(dim=1)
    py, px = idx // w, idx % w
    if tolerance <= 0:
        return masks[torch.arange(n, device=maps.device), py, px].float()
    ys = torch.arange(h, device=maps.device).view(1, h, 1)
    xs = torch.arange(w, device=maps.device).view(1, 1, w)
    near = (ys - py.view(n, 1, 1)) ** 2 + (xs - px.view(n, 1, 1)) ** 2 <= tolerance**2
    return (near & masks).flatten(1).any(dim=1).float()


def zhang_tolerance(height: int) -> int:
    """Zhang et al.'s (2016) pointing-game tolerance, 15 px at 224 px, scaled to an image ``height``."""
    return round(15 * height / 224)


def _overlap(maps: Tensor, masks: Tensor, threshold: float) -> tuple[Tensor, Tensor, Tensor]:
    """``|A & B|, |A|, |B|`` per sample for ``A = maps >= threshold``, ``B = masks``: three ``(N,)`` floats."""
    _check_pair(maps, masks)
    pred = maps >= threshold
    masks = masks.bool()
    return (pred & masks).flatten(1).sum(1).float(), pred.flatten(1).sum(1).float(), masks.flatten(1).sum(1).float()


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` with 0 where ``den == 0``."""
    return torch.where(den > 0, num / den.clamp(min=torch.finfo(den.dtype).tiny), torch.zeros_like(num))


def iou(maps: Tensor, masks: Tensor, threshold: float = 0.5) -> Tensor:
    """IoU of ``maps >= threshold`` with the mask; ``(N,)`` float (0 when both are empty)."""
    inter, a, b = _overlap(maps, masks, threshold)
    return _ratio(inter, a + b - inter)


def dice(maps: Tensor, masks: Tensor, threshold: float = 0.5) -> Tensor:
    """Dice ``2 |A & B| / (|A| + |B|)`` of ``A = maps >= threshold`` and the mask; ``(N,)`` (0 when both are empty)."""
    inter, a, b = _overlap(maps, masks, threshold)
    return _ratio(2 * inter, a + b)


def energy_pointing_game(maps: Tensor, masks: Tensor) -> Tensor:
    """Energy-based pointing game (Score-CAM): ``sum(map * mask) / sum(map)`` per sample, ``(N,)``.

    Maps must be non-negative. An all-zero map has no energy to place and scores
    0.0 (Quantus' ``RelevanceMassAccuracy`` gives NaN there).
    """
    _check_pair(maps, masks)
    if bool((maps < 0).any()):
        raise InputError(f"energy pointing game needs non-negative maps, got a minimum of {float(maps.min()):.4g}")
    maps = maps.flatten(1)
    return _ratio((maps * masks.flatten(1).to(maps.dtype)).sum(1), maps.sum(1))


# --- grid pointing game (B-cos, Boehle et al. 2022; CoDA-Nets, Boehle et al. 2021) -----------------


def confident_correct(logits: Tensor, target: Tensor, confidence: float = 0.9) -> Tensor:
    """``(N,)`` bool: the prediction is ``target`` and its softmax probability is ``>= confidence``."""
    if not 0 <= confidence <= 1:
        raise ConfigError(f"confidence must lie in [0, 1], got {confidence!r}")
    prob, pred = torch.softmax(logits.float(), dim=1).max(dim=1)
    return (pred == target) & (prob >= confidence)


def make_grids(labels: Tensor, eligible: Tensor, grid: int = 2, count: int = 100, seed: int = 0) -> Tensor:
    """``(count, grid * grid)`` int64 indices into ``labels``: each row a grid of eligible items of distinct classes.

    For each grid, ``grid * grid`` classes are drawn without replacement among the classes that have an
    eligible item, then one eligible item of each; the order of the draw is the order of the cells
    (row-major), so class and position are both random. All draws come from a ``torch.Generator`` seeded
    with ``seed`` (on the CPU): the same arguments give the same grids. :class:`ConfigError` when fewer
    than ``grid * grid`` classes have an eligible item.
    """
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 2:
        raise ConfigError(f"grid must be an integer >= 2, got {grid!r}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ConfigError(f"count must be an integer >= 1, got {count!r}")
    labels, eligible = labels.cpu().long(), eligible.cpu().bool()
    if labels.shape != eligible.shape or labels.dim() != 1:
        raise InputError(f"labels and eligible must both be (N,), got {tuple(labels.shape)} and {tuple(eligible.shape)}")
    classes = labels[eligible].unique()
    if len(classes) < grid * grid:
        raise ConfigError(f"a {grid}x{grid} grid needs {grid * grid} classes with a correctly and confidently "
                          f"classified image; {len(classes)} have one")  # fmt: skip
    members = [torch.nonzero(eligible & (labels == c)).flatten() for c in classes.tolist()]
    gen = torch.Generator().manual_seed(int(seed))
    rows = []
    for _ in range(count):
        picked = torch.randperm(len(classes), generator=gen)[: grid * grid].tolist()
        rows.append([int(members[c][torch.randint(len(members[c]), (1,), generator=gen)]) for c in picked])
    return torch.tensor(rows, dtype=torch.long)


def tile_grid(images: Tensor, grid: int) -> Tensor:
    """``(M, grid * grid, C, H, W)`` images -> ``(M, C, grid H, grid W)`` grid images, cell ``k`` at row
    ``k // grid``, column ``k % grid``."""
    m, cells, c, h, w = images.shape
    if cells != grid * grid:
        raise InputError(f"a {grid}x{grid} grid takes {grid * grid} images, got {cells}")
    return images.view(m, grid, grid, c, h, w).permute(0, 3, 1, 4, 2, 5).reshape(m, c, grid * h, grid * w)


def grid_cell_masks(cell: Tensor, grid: int, size: tuple[int, int]) -> Tensor:
    """``(N, H, W)`` bool: True in cell ``cell[n]`` (row-major) of a ``grid x grid`` split of an ``H x W`` image.
    ``H`` and ``W`` must be multiples of ``grid`` (grids built by :func:`tile_grid` are)."""
    h, w = size
    if h % grid or w % grid:
        raise InputError(f"a {h}x{w} image does not split into {grid}x{grid} equal cells")
    rows = torch.arange(h, device=cell.device) // (h // grid)
    cols = torch.arange(w, device=cell.device) // (w // grid)
    return (rows[None, :, None] == (cell // grid)[:, None, None]) & (cols[None, None, :] == (cell % grid)[:, None, None])


def grid_pointing_game(maps: Tensor, cell: Tensor, grid: int) -> Tensor:
    """Share of the positive map mass in the right cell: ``sum(relu(map) * cell) / sum(relu(map))``, ``(N,)``.

    ``maps (N, H, W)``: the map of grid image ``n`` for the class of its cell ``cell[n]`` (row-major, of a
    ``grid x grid`` split). An all-zero map scores 0.0. A map that ignores the class (the same for every
    cell of a grid) scores ``1 / grid**2`` on average over a grid's cells, whatever it looks like.
    """
    if maps.dim() != 3 or cell.shape != maps.shape[:1]:
        raise InputError(f"maps must be (N, H, W) and cell (N,), got {tuple(maps.shape)} and {tuple(cell.shape)}")
    _check_finite(maps, "maps")
    if bool(((cell < 0) | (cell >= grid * grid)).any()):
        raise InputError(f"cell indices must lie in [0, {grid * grid}), got {cell.tolist()}")
    inside = grid_cell_masks(cell.to(maps.device), grid, tuple(maps.shape[-2:]))
    return energy_pointing_game(maps.clamp(min=0), inside)  # the energy of the positive part in the cell


# --- faithfulness: the map as a multiplicative mask ---------------------------------


def _confidences(model: Callable[[Tensor], Any], x: Tensor, maps: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """``Y`` = p(target | x) and ``O`` = p(target | x * maps), both ``(N,)``."""
    check_maps(x, maps, target)
    y, o = _target_probs(model, [x, x * maps[:, None].to(x.dtype)], 2, target).unbind(1)
    return y, o


@torch.no_grad()
def average_drop(model: Callable[[Tensor], Any], x: Tensor, maps: Tensor, target: Tensor) -> Tensor:
    """Average Drop (Chattopadhyay et al. 2018), per sample in percent: ``100 max(0, Y - O) / Y``, ``(N,)``.

    ``Y`` is the softmax probability of ``target`` on ``x``, ``O`` on the
    explanation map ``x * maps`` (product in the model's input space). 0 where ``Y == 0``.
    """
    y, o = _confidences(model, x, maps, target)
    return 100 * _ratio((y - o).clamp(min=0), y)


@torch.no_grad()
def increase_in_confidence(model: Callable[[Tensor], Any], x: Tensor, maps: Tensor, target: Tensor) -> Tensor:
    """Increase in Confidence: 1.0 where ``O > Y`` else 0.0 (see :func:`average_drop`), ``(N,)``."""
    y, o = _confidences(model, x, maps, target)
    return (o > y).to(y.dtype)


@torch.no_grad()
def confidence_change(model: Callable[[Tensor], Any], x: Tensor, maps: Tensor, target: Tensor) -> Tensor:
    """``O - Y`` (see :func:`average_drop`), ``(N,)``: grad-cam's ``CamMultImageConfidenceChange`` on probabilities."""
    y, o = _confidences(model, x, maps, target)
    return o - y


# --- faithfulness: deletion / insertion (RISE) --------------------------------------


def _gaussian_blur(x: Tensor, kernel: int = 11, sigma: float = 5.0) -> Tensor:
    """Separable Gaussian blur of ``(N, C, H, W)`` (replicate padding): same shape."""
    r = kernel // 2
    t = torch.arange(kernel, device=x.device, dtype=x.dtype) - r
    g = torch.exp(-(t**2) / (2 * sigma**2))
    g = g / g.sum()
    c = x.shape[1]
    out = F_.conv2d(F_.pad(x, (r, r, 0, 0), mode="replicate"), g.view(1, 1, 1, kernel).expand(c, 1, 1, kernel), groups=c)
    return F_.conv2d(F_.pad(out, (0, 0, r, r), mode="replicate"), g.view(1, 1, kernel, 1).expand(c, 1, kernel, 1), groups=c)


def make_baseline(x: Tensor, kind: str) -> Tensor:
    """The image that replaces removed pixels: ``(N, C, H, W) -> (N, C, H, W)``.

    ``"zero"``: zeros in input space; ``"blur"``: Gaussian blur of ``x`` (kernel 11,
    sigma 5, separable, replicate padding); ``"mean"``: per-image, per-channel mean.
    """
    if kind == "zero":
        return torch.zeros_like(x)
    if kind == "blur":
        return _gaussian_blur(x)
    if kind == "mean":
        return x.mean(dim=(-2, -1), keepdim=True).expand_as(x)
    raise ConfigError(f"unknown baseline {kind!r}; choose one of {', '.join(BASELINES)}")


def _perturbation_curve(
    model: Callable[[Tensor], Any], x: Tensor, maps: Tensor, target: Tensor, steps: int, baseline: str, insert: bool
) -> Tensor:
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be a positive int, got {steps!r}")
    check_maps(x, maps, target)
    base = make_baseline(x, baseline)
    n, _, h, w = x.shape
    rank = _ranks(maps, descending=True).view(n, 1, h, w)

    def step(i: int) -> Tensor:
        top = rank < (2 * i * h * w + steps) // (2 * steps)  # round(i * HW / steps), halves up
        return torch.where(top, x, base) if insert else torch.where(top, base, x)

    return _target_probs(model, step, steps + 1, target)


@torch.no_grad()
def deletion_curve(
    model: Callable[[Tensor], Any], x: Tensor, maps: Tensor, target: Tensor, steps: int = 20, baseline: str = "zero"
) -> Tensor:
    """RISE deletion (Petsiuk et al. 2018): ``(N, steps + 1)`` target probabilities.

    Pixels are ranked by map value (descending, ties by a stable sort, row-major
    first); at step ``i`` the top ``round(i * H * W / steps)`` pixels (all channels)
    are replaced by :func:`make_baseline` ``(x, baseline)``. Column 0 is ``x`` itself.
    """
    return _perturbation_curve(model, x, maps, target, steps, baseline, insert=False)


@torch.no_grad()
def insertion_curve(
    model: Callable[[Tensor], Any], x: Tensor, maps: Tensor, target: Tensor, steps: int = 20, baseline: str = "blur"
) -> Tensor:
    """RISE insertion: start from the baseline and reveal ``x``'s top pixels; ``(N, steps + 1)``.

    Same ranking and counts as :func:`deletion_curve`; column 0 is the baseline, the last column ``x``.
    """
    return _perturbation_curve(model, x, maps, target, steps, baseline, insert=True)


def deletion_auc(
    model: Callable[[Tensor], Any], x: Tensor, maps: Tensor, target: Tensor, steps: int = 20, baseline: str = "zero"
) -> Tensor:
    """Trapezoid area under :func:`deletion_curve` over fractions ``0, 1/steps, ..., 1``: ``(N,)``, lower is better."""
    return torch.trapezoid(deletion_curve(model, x, maps, target, steps, baseline), dx=1 / steps, dim=1)


def insertion_auc(
    model: Callable[[Tensor], Any], x: Tensor, maps: Tensor, target: Tensor, steps: int = 20, baseline: str = "blur"
) -> Tensor:
    """Trapezoid area under :func:`insertion_curve` over fractions ``0..1``: ``(N,)``, higher is better."""
    return torch.trapezoid(insertion_curve(model, x, maps, target, steps, baseline), dx=1 / steps, dim=1)


# --- faithfulness: ROAD --------------------------------------------------------------

# ROAD's linear imputation (Rong et al. 2022) weighs the 8 neighbours 1/6 (direct) and 1/12 (diagonal): as a
# 3x3 stencil this is (outer([1, 2, 1], [1, 2, 1]) - 4 delta) / 12, applied separably by _neighbour_sum
# conjugate gradients stop once every system's residual is below IMPUTATION_RTOL times its right-hand side
# (2-norms, float64); the convergence check (one host sync) runs every _CG_CHECK iterations
IMPUTATION_RTOL = 1e-12
_CG_CHECK = 8


def _neighbour_sum(p: Tensor) -> Tensor:
    """``sum_j w_j p_j`` over the in-image 8 neighbours (zero outside), ``(B, H, W) -> (B, H, W)``, times 12."""
    q = F_.pad(p, (1, 1, 1, 1))
    rows = q[:, :, :-2] + q[:, :, 2:]
    rows.add_(q[:, :, 1:-1], alpha=2)  # horizontal [1, 2, 1]
    out = rows[:, :-2] + rows[:, 2:]
    out.add_(rows[:, 1:-1], alpha=2)  # vertical [1, 2, 1]
    return out.sub_(p, alpha=4)


def _linear_imputation(x: Tensor, removed: Tensor) -> Tensor:
    """Noise-free linear imputation of ``x (B, C, H, W)`` at ``removed (B, H, W)``: float64 ``(B, C, H, W)``.

    Each removed pixel ``i`` satisfies ``d_i u_i - sum_{removed j} w_ij u_j = sum_{kept j} w_ij x_j`` (``d_i``:
    the sum of its in-image neighbour weights), one SPD system per image and channel (a strictly or irreducibly
    diagonally dominant M-matrix, as long as some pixel of the image is kept). All ``B * C`` systems are solved
    together by Jacobi-preconditioned conjugate gradients on the pixel grid, on ``x``'s device, with per-system
    step sizes; systems that have converged (see :data:`IMPUTATION_RTOL`) leave the batch at the next check.
    """
    b_, c, h, w = x.shape
    x64 = x.detach().to(torch.float64).reshape(b_ * c, h, w)
    unknown = removed.detach().to(x.device, torch.bool).repeat_interleave(c, 0)  # (B*C, H, W)
    u_mask = unknown.to(torch.float64)
    diag = _neighbour_sum(torch.ones(1, h, w, dtype=torch.float64, device=x.device)) / 12  # d_i: 1 inside, less at the border
    inv = u_mask / diag  # Jacobi preconditioner, 0 on kept pixels
    rhs = _neighbour_sum(x64 * (1 - u_mask)).mul_(u_mask).div_(12)
    weight = u_mask / 12  # A p = d p - U S p (p is 0 off U, so is A p)

    def apply(p: Tensor, wt: Tensor) -> Tensor:
        return (diag * p).sub_(wt * _neighbour_sum(p))

    out = rhs * inv  # the initial guess (one Jacobi step from 0), then the solution
    rows = torch.arange(b_ * c, device=x.device)  # the systems still iterating
    u, r = out.clone(), rhs - apply(out, weight)
    z = r * inv
    p, rz = z.clone(), (r * z).sum((1, 2))
    limit = IMPUTATION_RTOL**2 * (rhs * rhs).sum((1, 2))
    steps = 0
    while True:
        rr = (r * r).sum((1, 2))
        done = rr <= limit[rows]
        if bool(done.all()) or steps > 10 * h * w:  # CG is exact after (H*W) steps in exact arithmetic
            out[rows] = u
            break
        if bool(done.any()):  # compact: converged systems are written out and dropped
            keep = (~done).nonzero().squeeze(1)
            out[rows[done]] = u[done]
            rows, u, r, p, rz, weight, inv = rows[keep], u[keep], r[keep], p[keep], rz[keep], weight[keep], inv[keep]
        for _ in range(_CG_CHECK):
            ap = apply(p, weight)
            alpha = (rz / (p * ap).sum((1, 2)).clamp_min(1e-300))[:, None, None]
            u.addcmul_(alpha, p)
            r.addcmul_(alpha, ap, value=-1)
            z = r * inv
            rz_new = (r * z).sum((1, 2))
            p.mul_((rz_new / rz.clamp_min(1e-300))[:, None, None]).add_(z)
            rz = rz_new
        steps += _CG_CHECK
    return torch.where(unknown, out, x64).view(b_, c, h, w)


def _add_noise(imputed: Tensor, removed: Tensor, noise: Tensor) -> Tensor:
    """``imputed (B, C, H, W)`` plus ``noise (M, C)`` at the ``M`` removed pixels (row-major over ``B, H, W``)."""
    b_, c, h, w = imputed.shape
    where = removed.to(imputed.device, torch.bool)[..., None].expand(b_, h, w, c)
    full = torch.zeros(b_, h, w, c, dtype=imputed.dtype, device=imputed.device)
    full.masked_scatter_(where, noise.to(imputed.device, imputed.dtype))
    return imputed + full.permute(0, 3, 1, 2)


def noisy_linear_imputation(
    x: Tensor, removed: Tensor, noise: float = 0.01, generator: torch.Generator | None = None
) -> Tensor:
    """ROAD's noisy linear imputation: ``x (N, C, H, W)``, ``removed (N, H, W)`` bool -> imputed ``(N, C, H, W)``.

    Every removed pixel becomes the weighted mean of its in-image 8 neighbours
    (1/6 direct, 1/12 diagonal, weights renormalized at the border), kept pixels
    fixed: one sparse SPD linear system per image and channel, solved in float64 on
    ``x``'s device by batched conjugate gradients to a relative residual of
    :data:`IMPUTATION_RTOL` (imputed pixels within about 1e-9 of the exact solution
    on 32 px images; tests/test_metrics.py compares with an exact sparse LU solve).
    Then Gaussian noise of std ``noise`` (input space; 0.01 as grad-cam's
    ``NoisyLinearImputer``) drawn on the CPU from ``generator`` as an ``(M, C)``
    table (``M`` removed pixels, row-major over ``N, H, W``) is added to the imputed pixels.
    """
    if x.dim() != 4 or not x.is_floating_point():
        raise InputError(f"x must be a float tensor (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
    _check_finite(x, "x")
    n, c, h, w = x.shape
    if removed.shape != (n, h, w):
        raise InputError(f"removed must be (N, H, W) = {(n, h, w)}, got {tuple(removed.shape)}")
    removed = removed.detach().to(x.device, torch.bool)
    if bool(removed.flatten(1).all(dim=1).any()):
        raise InputError("cannot impute an image whose pixels are all removed (nothing to interpolate from)")
    m = int(removed.sum())
    if m == 0:
        return x.clone()
    out = _linear_imputation(x, removed)
    if noise:
        out = _add_noise(out, removed, noise * torch.randn(m, c, generator=generator, dtype=torch.float64))
    return out.to(x.dtype)


@torch.no_grad()
def road(
    model: Callable[[Tensor], Any],
    x: Tensor,
    maps: Tensor,
    target: Tensor,
    percentiles: Sequence[float] = ROAD_PERCENTILES,
    order: str = "morf",
    noise: float = 0.01,
    seed: int = 0,
) -> Tensor:
    """ROAD (Rong et al. 2022): target probability after imputing ``p`` % of the pixels, ``(N, P)``.

    ``order="morf"`` removes the top ``round(p / 100 * H * W)`` pixels by map value
    (lower is better), ``"lerf"`` the bottom ones (higher is better); ties by a
    stable sort. Removed pixels are filled by :func:`noisy_linear_imputation`
    with noise std ``noise`` (grad-cam's default 0.01) from a CPU generator seeded
    with ``seed``, so results repeat. The imputations of several percentiles are
    solved as one batch (as many copies of ``x`` as one forward pass takes).

    Differs from grad-cam's ``ROADMostRelevantFirst(percentile=q)``: there ``q`` is
    the percentile of the map *kept* (it removes pixels ``>= np.percentile(map, q)``,
    i.e. about the top ``100 - q`` %, and all pixels tied at the threshold), and the
    score is whatever its target returns (logits by default). With the same removed
    set, probabilities and ``noise=0`` the two agree to float precision.
    """
    if order not in ("morf", "lerf"):
        raise ConfigError(f"ROAD order must be 'morf' or 'lerf', got {order!r}")
    ps = [float(p) for p in percentiles]
    if not ps or not all(0 <= p < 100 for p in ps):
        raise ConfigError(f"ROAD percentiles must lie in [0, 100), got {list(percentiles)}")
    check_maps(x, maps, target)
    n, c, h, w = x.shape
    rank = _ranks(maps, descending=order == "morf").view(n, h, w)
    generator = torch.Generator().manual_seed(seed)
    counts = [_count(p / 100, h * w) for p in ps]
    for p, k in zip(ps, counts):
        if k >= h * w:
            _target_prob(model, x, target)  # a bad target is the first problem to report, as with one forward per step
            raise ConfigError(f"ROAD percentile {p} removes all {h * w} pixels of a {h}x{w} image")
    per_solve = max(1, FORWARD_ELEMENTS // max(1, x.numel()))
    done: dict[int, Tensor] = {}

    def imputed(i: int) -> Tensor:  # percentiles i.. solved together, their noise drawn in percentile order
        if i not in done:
            chunk = range(i, min(i + per_solve, len(ps)))
            ks = torch.tensor([counts[j] for j in chunk], device=x.device)
            removed = (rank < ks[:, None, None, None]).view(-1, h, w)
            out = _linear_imputation(x.repeat(len(chunk), 1, 1, 1), removed)
            if noise:
                draws = [noise * torch.randn(n * counts[j], c, generator=generator, dtype=torch.float64) for j in chunk]
                out = _add_noise(out, removed, torch.cat(draws))
            done.update(zip(chunk, out.to(x.dtype).split(n)))
        return done.pop(i)

    return _target_probs(model, imputed, len(ps), target)


# --- stability across runs -----------------------------------------------------------


def stability(maps: Tensor, threshold: float = 100 / 255) -> dict[str, Any]:
    """Agreement of maps from ``R`` runs on the same ``N`` images (LFI-CAM's stability experiment).

    ``maps`` ``(R, N, H, W)`` are thresholded (``>= threshold``); for every pair of
    runs and every image, IoU and Dice of the two binary maps (0 when both are
    empty, as :func:`iou`). Returns ``{"iou": float, "dice": float}`` (mean over all
    run pairs ``r < s`` and images) and ``"iou_matrix"``, ``"dice_matrix"``
    ``(R, R)`` (mean over images, diagonal 1 by definition).
    """
    if not isinstance(maps, Tensor) or maps.dim() != 4:
        desc = tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__
        raise InputError(f"stability expects maps of shape (R, N, H, W), got {desc}")
    r, n = maps.shape[:2]
    if r < 2:
        raise InputError(f"stability needs maps from at least 2 runs, got R = {r}")
    if n == 0:
        raise InputError(f"empty batch: maps have N == 0 (shape {tuple(maps.shape)})")
    _check_finite(maps, "maps")
    binary = (maps >= threshold).flatten(2).to(torch.float64)  # (R, N, HW)
    inter = torch.einsum("rnp,snp->rsn", binary, binary)
    size = binary.sum(2)
    total = size[:, None] + size[None, :]
    eye = torch.eye(r, dtype=torch.bool, device=maps.device)
    iou_matrix = torch.where(eye, 1.0, _ratio(inter, total - inter).mean(2))
    dice_matrix = torch.where(eye, 1.0, _ratio(2 * inter, total).mean(2))
    pairs = torch.triu(torch.ones(r, r, dtype=torch.bool, device=maps.device), diagonal=1)
    return {
        "iou": float(iou_matrix[pairs].mean()),
        "dice": float(dice_matrix[pairs].mean()),
        "iou_matrix": iou_matrix.float(),
        "dice_matrix": dice_matrix.float(),
    }


# --- stability over time (clips) ---------------------------------------------------------


def temporal_stability(maps: Tensor, threshold: float = 0.5) -> Tensor:
    """Frame-to-frame agreement of a clip's maps: ``(N, T, H, W) -> (N,)`` float64.

    Each frame's map is thresholded, ``B_t = maps[:, t] >= threshold``; the clip's value is the mean
    over the ``T - 1`` consecutive pairs of ``IoU(B_t, B_{t+1}) = |B_t & B_{t+1}| / |B_t | B_{t+1}|``,
    0 when both are empty (as :func:`iou` and :func:`stability`: a map cannot score by being empty).
    1: the thresholded map does not change between frames; a map that follows a moving object scores
    below 1 by its motion. A clip of one frame has no pair: NaN.
    """
    if not isinstance(maps, Tensor) or maps.dim() != 4:
        desc = tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__
        raise InputError(f"temporal_stability expects maps of shape (N, T, H, W), got {desc}")
    _check_finite(maps, "maps")
    if maps.shape[1] < 2:
        return torch.full((maps.shape[0],), float("nan"), dtype=torch.float64, device=maps.device)
    b = (maps >= threshold).flatten(2)  # (N, T, HW)
    inter = (b[:, 1:] & b[:, :-1]).sum(2).double()
    union = (b[:, 1:] | b[:, :-1]).sum(2).double()
    return _ratio(inter, union).mean(1)


# --- sanity check: cascading randomization -------------------------------------------


def _argsort_rows(t: Tensor) -> Tensor:
    """Argsort along dim 1 of ``(N, D)``, ties in any order: ``(N, D)`` int64. CPU float32 / float64 go through
    numpy's quicksort (SIMD: 3x to 6x faster than torch's CPU sort on 16 x 1024 maps), the rest through torch's."""
    if t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(np.argsort(t.detach().numpy(), axis=1))
    return t.argsort(dim=1)


def _average_ranks(t: Tensor) -> Tensor:
    """1-based ranks along dim 1, ties get their average rank: ``(N, D) -> (N, D)`` float64."""
    n, d = t.shape
    order = _argsort_rows(t)  # the order within a tie does not matter: all its members get the same rank
    values = t.gather(1, order)
    new = torch.ones_like(values, dtype=torch.bool)
    new[:, 1:] = values[:, 1:] != values[:, :-1]
    end = torch.ones_like(new)
    end[:, :-1] = new[:, 1:]
    pos = torch.arange(1, d + 1, device=t.device, dtype=torch.float64).expand(n, d)
    first = torch.where(new, pos, 0.0).cummax(dim=1).values
    last = torch.where(end, pos, float(d + 1)).flip(1).cummin(dim=1).values.flip(1)
    return torch.empty_like(pos).scatter_(1, order, (first + last) / 2)


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample Spearman rank correlation of ``a`` and ``b`` ``(N, ...)``: ``(N,)``.

    Pearson correlation of the average ranks (ties share their mean rank), as
    ``scipy.stats.spearmanr``; NaN where a sample is constant (undefined, as scipy).
    """
    if a.shape != b.shape or a.dim() < 2:
        raise InputError(f"spearman needs two tensors of the same shape (N, ...), got {tuple(a.shape)} and {tuple(b.shape)}")
    _check_finite(a, "maps")
    _check_finite(b, "maps")
    return _spearman_centred(_centred_ranks(a), b)


def _centred_ranks(a: Tensor) -> Tensor:
    ra = _average_ranks(a.flatten(1))
    return ra - ra.mean(1, keepdim=True)


def _spearman_centred(ra: Tensor, b: Tensor) -> Tensor:
    """:func:`spearman` with ``a``'s ranks given (centred, from :func:`_centred_ranks`), ``b`` checked by the caller."""
    rb = _centred_ranks(b)
    rho = (ra * rb).sum(1) / ((ra * ra).sum(1) * (rb * rb).sum(1)).sqrt()
    return rho.to(torch.promote_types(b.dtype, torch.float32) if b.is_floating_point() else torch.float32)


def _rng_devices(module: nn.Module) -> dict[str, Any]:
    """``torch.random.fork_rng``'s arguments for the CPU and the accelerator devices ``module`` lives on."""
    devices = {p.device for p in module.parameters()} - {torch.device("cpu")}
    device_type = next(iter(devices)).type if devices else "cuda"
    return {"devices": sorted({d.index or 0 for d in devices if d.type == device_type}), "device_type": device_type}


def cascading_randomization(
    model: nn.Module,
    x: Tensor,
    target: Tensor,
    explain: Callable[[nn.Module, Tensor, Tensor], Tensor],
    seed: int = 0,
    layers: int | None = None,
) -> list[tuple[str, Tensor]]:
    """Cascading model-parameter randomization (Adebayo et al. 2018): ``[(layer name, rho (N,)), ...]``.

    On a deep copy of ``model`` (the caller's model is never touched), the modules
    that own parameters directly and have ``reset_parameters`` (Linear, Conv,
    BatchNorm...) are re-initialised one by one from the output side to the input
    side (reverse ``named_modules`` order), cumulatively; layer ``i`` (0-based) is
    reset under ``torch.manual_seed(seed + i)`` inside a forked RNG. After each
    reset ``explain(model_copy, x, target)`` gives maps ``(N, ...)``, compared with
    the copy's maps before any reset by :func:`spearman`. ``layers`` keeps only the
    first (top-most) ``layers`` steps. Modules that own parameters but cannot be
    reset are skipped with a warning.
    """
    if not isinstance(x, Tensor) or x.dim() < 2 or len(x) == 0:
        raise InputError(f"x must be a non-empty batch (N, ...), got {tuple(x.shape) if isinstance(x, Tensor) else x!r}")
    check_class_indices(target, len(x), None)
    if layers is not None and layers < 1:
        raise ConfigError(f"layers must be a positive int or None, got {layers!r}")
    clone = copy.deepcopy(model)
    owners = [(name or type(m).__name__, m) for name, m in clone.named_modules() if any(True for _ in m.parameters(recurse=False))]
    skipped = [name for name, m in owners if not callable(getattr(m, "reset_parameters", None))]
    if skipped:
        warnings.warn(f"cascading_randomization cannot re-initialise {skipped} (no reset_parameters); left as trained")
    steps = [(name, m) for name, m in reversed(owners) if name not in skipped][:layers]
    if not steps:
        raise ConfigError("the model has no parameterised module with reset_parameters() to randomize")
    original = explain(clone, x, target)
    _check_finite(original, "maps")
    ranked = _centred_ranks(original)  # once, not once per layer
    on_cpu = all(p.device.type == "cpu" for p in clone.parameters())
    rng_devices = _rng_devices(clone)  # once: walking the parameters per layer cost more than the reset
    result = []
    for i, (name, module) in enumerate(steps):
        with torch.random.fork_rng(**rng_devices):
            if on_cpu:  # what torch.manual_seed does for CPU draws, without queueing lazy CUDA/XPU/MTIA seeding calls
                torch.default_generator.manual_seed(seed + i)
            else:
                torch.manual_seed(seed + i)
            with torch.no_grad():
                module.reset_parameters()
        maps = explain(clone, x, target)
        if maps.shape != original.shape:
            raise InputError(f"explain returned maps of shape {tuple(maps.shape)} after a reset, {tuple(original.shape)} before")
        _check_finite(maps, "maps")
        result.append((name, _spearman_centred(ranked, maps)))
    return result
