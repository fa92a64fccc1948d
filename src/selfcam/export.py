"""Export a self-explaining model to ONNX: one graph, two outputs, the logits and the heatmap.

The graph takes ``image`` ``float32 (N, C, H, W)``, normalized as in training, with a dynamic
batch ``N`` and the fixed ``H x W`` it was exported at, and returns ``logits`` ``(N, classes)``
and ``heatmap`` ``(N, H, W)`` in [0, 1]: the head's map upsampled to the input size and min-max
scaled again, exactly what :meth:`selfcam.model.SelfExplainer.explain` returns.

The exporter is torch's TorchScript-based one (``torch.onnx.export(..., dynamo=False)``): it
writes opsets 11 to 20 (default 17) in about a second per model. The ``torch.export``-based
exporter (``dynamo=True``) gives the same numbers but only from opset 18 and takes 5-20 s per
model (docs/export.md). The run's preprocessing (size, mean, std), class names and model
config are stored in the ONNX ``metadata_props`` as JSON strings.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .errors import ConfigError, require_int
from .model import SelfExplainer

__all__ = ["INPUT_NAME", "OUTPUT_NAMES", "DEFAULT_OPSET", "MIN_OPSET", "max_opset", "export_onnx", "onnx_parity"]

INPUT_NAME = "image"
OUTPUT_NAMES = ("logits", "heatmap")
DEFAULT_OPSET = 17
MIN_OPSET = 11  # Resize with half-pixel bilinear sampling


def max_opset() -> int:
    """The highest opset torch's TorchScript-based exporter writes (20 in torch 2.14)."""
    from torch.onnx import _constants  # private, hence the fallback

    return int(getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 20))


class _Explained(nn.Module):
    """``x (N, C, H, W) -> (logits (N, classes), heatmap (N, H, W))``: a tuple, as ONNX wants."""

    def __init__(self, model: SelfExplainer) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = self.model.explain(x)
        return out.logits, out.heatmap


def _require_onnx() -> Any:
    try:
        import onnx
    except ImportError as e:
        raise ConfigError("ONNX export needs the onnx package: pip install 'selfcam[export]'") from e
    return onnx


def export_onnx(
    model: SelfExplainer,
    path: str | Path,
    size: int | tuple[int, int],
    *,
    opset: int = DEFAULT_OPSET,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` as ONNX to ``path`` for ``size x size`` inputs, check it with ``onnx.checker``.

    ``metadata`` entries are stored as JSON strings in the model's ``metadata_props``. The model
    is exported from the CPU in eval mode (its device and train/eval mode are restored).
    Raises :class:`ConfigError` for a bad option, or when the exporter or the checker fails.
    """
    onnx = _require_onnx()
    if not isinstance(opset, int) or isinstance(opset, bool) or not MIN_OPSET <= opset <= max_opset():
        raise ConfigError(f"opset {opset!r}: the export writes integer opsets {MIN_OPSET} to {max_opset()}")
    h, w = (size, size) if isinstance(size, int) else size
    require_int("size", h)
    require_int("size", w)
    path = Path(path)
    if not path.parent.is_dir():
        raise ConfigError(f"{path}: directory {path.parent} does not exist")
    device, training = next(model.parameters()).device, model.training
    wrapper = _Explained(model.cpu().eval()).eval()
    example = torch.rand(2, model.config.in_chans, h, w)  # batch 2: a batch of 1 could be specialised away
    what = f"{model.config.method} on {model.config.backbone}, opset {opset}"
    try:
        with warnings.catch_warnings():
            # shape checks (input channels, ABN's map size) are constants of the traced graph; say nothing
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            batch = {0: "batch"}
            torch.onnx.export(wrapper, (example,), str(path), dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                              dynamic_axes={INPUT_NAME: batch, **{o: batch for o in OUTPUT_NAMES}})  # fmt: skip
    except Exception as e:  # the exporter raises many types; the first line is what a user can act on
        path.unlink(missing_ok=True)
        raise ConfigError(f"ONNX export failed ({what}): {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}") from e
    finally:
        model.to(device).train(training)
    proto = onnx.load(str(path))
    for key, value in {**_metadata(model), **(metadata or {})}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.save(proto, str(path))
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise ConfigError(f"{path}: the exported model does not pass onnx.checker ({what}): {e}") from e
    return path


def _metadata(model: SelfExplainer) -> dict[str, Any]:
    return {"selfcam_model": asdict(model.config), "outputs": {"logits": "(N, classes)", "heatmap": "(N, H, W) in [0, 1]"}}


def onnx_parity(model: SelfExplainer, path: str | Path, x: Tensor) -> dict[str, float]:
    """Largest absolute differences between onnxruntime (CPU) and PyTorch on ``x``: ``{"logits", "heatmap"}``."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ConfigError("checking an ONNX model needs onnxruntime: pip install 'selfcam[export]'") from e
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(list(OUTPUT_NAMES), {INPUT_NAME: x.detach().cpu().float().numpy()})
    with torch.no_grad():
        want = _Explained(model.eval())(x.to(next(model.parameters()).device))
    return {name: float(np.abs(g - w.cpu().numpy()).max()) for name, g, w in zip(OUTPUT_NAMES, got, want)}
