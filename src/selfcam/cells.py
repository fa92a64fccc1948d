"""Where a feature map's cells sit in the image, and the one resampling every map takes to image size.

A backbone's feature cell ``(i, j)`` sees a window of input pixels (its receptive field) centred on pixel
``(offset_y + stride_y * i, offset_x + stride_x * j)``: :class:`CellGrid`. :func:`measure_cells` finds that
centre by an impulse response: the gradient of one row (one column) of cells with respect to the input is
non-zero exactly on the pixels the cells see, so the middle of that support is the cells' centre; two
neighbouring rows give the stride. Nothing about the network is assumed, so it works for any backbone
whose cells see a bounded window (a map whose cells see the whole image has no centre: ``None``).

Bilinear upsampling with ``align_corners=False`` (``F.interpolate``, OpenCV's ``cv2.resize``, hence grad-cam)
puts cell ``j`` of a map ``h`` cells tall at pixel ``(j + 0.5) H / h - 0.5``: ``4 j + 1.5`` for a stride-4
map, while the stride-2 3x3 convolutions (padding 1) of a ResNet centre it on ``4 j``. :func:`resample`
puts every cell at its measured centre (the same rule for the self maps and the post-hoc ones); without a
grid it is exactly ``F.interpolate(..., align_corners=False)``, bilinear or bicubic.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from .errors import InputError

__all__ = ["CellGrid", "measure_cells", "resample", "resample_matrix"]


@dataclass(frozen=True)
class CellGrid:
    """Cell ``(i, j)`` of a feature map is centred on input pixel ``(offset[0] + stride[0] i, offset[1] + stride[1] j)``
    (pixel ``p``'s centre at coordinate ``p``)."""

    stride: tuple[float, float]
    offset: tuple[float, float]

    @classmethod
    def half_pixel(cls, cells: tuple[int, int], size: tuple[int, int]) -> "CellGrid":
        """The grid bilinear upsampling with ``align_corners=False`` assumes: stride ``S / s``, offset ``(stride - 1) / 2``."""
        strides = tuple(big / small for big, small in zip(size, cells))
        return cls(strides, tuple((s - 1) / 2 for s in strides))  # type: ignore[arg-type]

    def as_dict(self) -> dict[str, list[float]]:
        return {"stride": list(self.stride), "offset": list(self.offset)}


def _support(profile: Tensor) -> tuple[int, int] | None:
    idx = torch.nonzero(profile > 0).flatten()
    return None if len(idx) == 0 else (int(idx[0]), int(idx[-1]))


def _measure_axis(features: Callable[[Tensor], Tensor], shape: list[int], axis: int, max_side: int,
                  device: torch.device | None, dtype: torch.dtype) -> tuple[float, float] | None:  # fmt: skip
    """Stride and offset along spatial ``axis`` (0: rows, 1: columns) of ``features`` for inputs of ``shape``."""
    dim = 2 + axis
    length = shape[dim]
    gen = torch.Generator().manual_seed(0)
    while length <= max_side:
        size = list(shape)
        size[dim] = length
        x = torch.randn(size, generator=gen).to(device=device, dtype=dtype).requires_grad_()
        try:
            f = features(x)
        except (InputError, RuntimeError, AssertionError, ValueError):  # a model of one input size (a ViT's fixed grid)
            return None
        n = f.shape[dim]
        if n >= 2:
            cells = (n // 2 - 1, n // 2)
            centres = []
            for c in cells:
                (g,) = torch.autograd.grad(f.select(dim, c).sum(), x, retain_graph=c != cells[-1])
                span = _support(g.abs().sum(dim=[d for d in range(g.dim()) if d != dim]))
                if span is None:  # the cells do not depend on the input at all
                    return None
                if span[0] == 0 or span[1] == length - 1:  # the window reaches the border: not its full extent
                    break
                centres.append((span[0] + span[1]) / 2)
            if len(centres) == 2:
                stride = centres[1] - centres[0]
                return stride, centres[0] - stride * cells[0]
        step = max(1, round(length / max(n, 1)))
        length += step * math.ceil(length / step)  # about twice as long, the same length modulo the stride
    return None


def measure_cells(features: Callable[[Tensor], Tensor], in_chans: int, size: tuple[int, int], *,
                  device: torch.device | None = None, dtype: torch.dtype = torch.float32, module: nn.Module | None = None,
                  max_side: int = 2048) -> CellGrid | None:  # fmt: skip
    """The :class:`CellGrid` of ``features`` (``(N, in_chans, H, W) -> (N, K, h, w)``) for inputs of ``size``.

    Each axis is measured on inputs of ``size`` stretched along that axis only (about doubling up to
    ``max_side`` pixels, the length kept modulo the stride) until two neighbouring cells see windows that do
    not touch the border. ``module`` (the network behind ``features``) is put in eval mode meanwhile and
    restored; no parameter gradient is touched. ``None`` when the cells see the whole input at every length,
    or when ``features`` refuses the stretched inputs (a model of one input size, as a ViT's fixed token grid).
    """
    modes = [(m, m.training) for m in module.modules()] if module is not None else []
    tracing = torch._C._get_tracing_state()  # measured eagerly, outside an ONNX / TorchScript trace
    try:
        if module is not None:
            module.eval()
        torch._C._set_tracing_state(None)
        with torch.inference_mode(False), torch.enable_grad():
            axes = [_measure_axis(features, [2, in_chans, *size], a, max(max_side, size[a]), device, dtype) for a in (0, 1)]
    finally:
        torch._C._set_tracing_state(tracing)
        for m, training in modes:
            m.training = training
    if axes[0] is None or axes[1] is None:
        return None
    return CellGrid((axes[0][0], axes[1][0]), (axes[0][1], axes[1][1]))


# a graph break under torch.compile, never traced; torch._disable_dynamo (what torch.optim uses) imports dynamo only when
# first called: torch.compiler.disable would import it (about 1 s) with selfcam.cli
measure_cells = torch._disable_dynamo(measure_cells)


def _taps(u: np.ndarray, n: int, mode: str) -> np.ndarray:
    """Interpolation matrix ``(len(u), n)``: row ``p`` samples a length-``n`` signal at coordinate ``u[p]``
    (cell ``j`` at ``j``), taps past the ends clamped to the end cells (as ``F.interpolate``)."""
    out = np.zeros((len(u), n))
    rows = np.arange(len(u))
    base = np.floor(u)
    t = u - base
    if mode == "bilinear":
        offsets, weights = (0, 1), (1 - t, t)
    else:  # PyTorch's bicubic: Keys' kernel with A = -0.75
        a = -0.75

        def near(d: np.ndarray) -> np.ndarray:
            return ((a + 2) * d - (a + 3)) * d * d + 1

        def far(d: np.ndarray) -> np.ndarray:
            return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

        offsets, weights = (-1, 0, 1, 2), (far(t + 1), near(t), near(1 - t), far(2 - t))
    for off, wt in zip(offsets, weights):
        np.add.at(out, (rows, np.clip(base + off, 0, n - 1).astype(np.int64)), wt)
    return out


@functools.lru_cache(maxsize=256)
def resample_matrix(n: int, size: int, mode: str = "bilinear", stride: float | None = None, offset: float = 0.0) -> np.ndarray:
    """Matrix ``(size, n)`` taking ``n`` cells to ``size`` pixels: pixel ``p`` reads the map at cell coordinate
    ``(p - offset) / stride`` (clamped to ``[0, n - 1]``, the border cells extended), or with ``stride=None`` at
    ``(p + 0.5) n / size - 0.5`` exactly as ``F.interpolate(align_corners=False)`` does."""
    p = np.arange(size, dtype=np.float64)
    if stride is None:
        u = (p + 0.5) * (n / size) - 0.5
        if mode == "bilinear":
            u = np.maximum(u, 0)  # F.interpolate clamps linear source coordinates at 0 (cubic taps are clamped instead)
    else:
        u = np.clip((p - offset) / stride, 0, n - 1)
    return _taps(u, n, mode)


def resample(maps: Tensor, size: tuple[int, int], mode: str = "bilinear", cells: CellGrid | None = None) -> Tensor:
    """Maps ``(..., h, w)`` resampled to ``(..., H, W)`` (not re-normalized): with ``cells`` each cell lands on its
    centre in the image, without them as ``F.interpolate(mode, align_corners=False)``."""
    (h, w), (hh, ww) = (int(v) for v in maps.shape[-2:]), (int(v) for v in size)  # int(): constants when traced
    sy, sx = (None, None) if cells is None else cells.stride
    oy, ox = (0.0, 0.0) if cells is None else cells.offset
    rows = torch.as_tensor(resample_matrix(h, hh, mode, sy, oy), dtype=maps.dtype, device=maps.device)
    cols = torch.as_tensor(resample_matrix(w, ww, mode, sx, ox), dtype=maps.dtype, device=maps.device)
    return rows @ maps @ cols.T
