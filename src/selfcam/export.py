"""Export a self-explaining model of any task to ONNX: one graph, the prediction and the heatmap(s).

The model's task (:func:`selfcam.tasks.task_of`) decides the graph (its :attr:`~selfcam.tasks.Task.graph`): its input
names, in the order ``model.explain`` takes them, and its output names, each an attribute of what
``explain`` returns (or derived from it, :attr:`TaskGraph.derived`). Every input and output has a
dynamic batch axis ``N``; the other axes are fixed at export (the image side, the clip length ``T``,
the number of audio samples). The heatmaps are at input resolution and in [0, 1], exactly what
``explain`` returns:

========== ================================ ============================================================
task       inputs                           outputs
========== ================================ ============================================================
image      ``image (N, C, H, W)``           ``logits (N, classes)``, ``heatmap (N, H, W)``
attributes ``image (N, C, H, W)``           ``logits (N, A)``, ``heatmap (N, A, H, W)``
video      ``clip (N, T, C, H, W)``         ``logits (N, classes)``, ``heatmap (N, T, H, W)``
asd        ``frames (N, T, 3, H, W)``,      ``logits (N, 2)``, ``frame_logits (N, T, 2)``, ``heatmap (N, T, H, W)``,
           ``audio (N, S)``                 ``modality_importance (N, 2)`` (columns: :data:`selfcam.asd.MODALITIES`)
========== ================================ ============================================================

The exporter is torch's TorchScript-based one (``torch.onnx.export(..., dynamo=False)``): it
writes opsets 11 to 20 (default 17) in about a second per model. The ``torch.export``-based
exporter (``dynamo=True``) gives the same numbers but only from opset 18 and takes 5-20 s per
model (docs/export.md). ASD's log-mel spectrogram is computed inside ``torch.onnx.export`` as a
``conv1d`` with the windowed DFT basis instead of ``torch.stft`` (:func:`selfcam.asd.log_mel`,
``dft``). The task, the input and output names and shapes, the model config and the caller's
``metadata`` (the run's preprocessing, class names) are stored in ``metadata_props`` as JSON strings.
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
from .tasks import TaskGraph, task_of

__all__ = [
    "DEFAULT_OPSET",
    "MIN_OPSET",
    "example_inputs",
    "export_onnx",
    "graph_of",
    "max_opset",
    "onnx_parity",
]

DEFAULT_OPSET = 17
MIN_OPSET = 11  # Resize with half-pixel bilinear sampling


def max_opset() -> int:
    """The highest opset torch's TorchScript-based exporter writes (20 in torch 2.14)."""
    from torch.onnx import _constants  # private, hence the fallback

    return int(getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 20))


def graph_of(model: nn.Module) -> TaskGraph:
    """The :class:`~selfcam.tasks.TaskGraph` of ``model``'s task; :class:`ConfigError` for a task with none."""
    task = task_of(model)
    if task.graph is None:
        raise ConfigError(f"the {task.name} task does not say how its models export to ONNX (Task.graph)")
    return task.graph


class _Explained(nn.Module):
    """``model.explain(*inputs)`` as the tuple of the task's outputs, as ONNX wants."""

    def __init__(self, model: nn.Module, graph: TaskGraph) -> None:
        super().__init__()
        self.model, self.graph = model, graph

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, ...]:
        # named parameters, not *inputs: torch.export (dynamo=True) matches the dynamic axes to them
        out = self.model.explain(x) if y is None else self.model.explain(x, y)
        derived = self.graph.derived
        return tuple(derived[name](out) if name in derived else getattr(out, name) for name in self.graph.outputs)


def _require_onnx() -> Any:
    try:
        import onnx
    except ImportError as e:
        raise ConfigError("ONNX export needs the onnx package: pip install 'selfcam[export]'") from e
    return onnx


def _side(size: int | tuple[int, int]) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else size
    require_int("size", h)
    require_int("size", w)
    return h, w


def example_inputs(model: nn.Module, size: int | tuple[int, int], frames: int | None = None, batch: int = 2) -> tuple[Tensor, ...]:
    """Random CPU inputs of the graph :func:`export_onnx` writes for these arguments, in the graph's order.

    The task's :meth:`~selfcam.tasks.Task.example_inputs` at ``size``; inputs of rank 5 are clips
    ``(N, T, C, H, W)``, whose ``T`` is the model's ``config.frames`` or else ``frames``.
    """
    task, (h, w) = task_of(model), _side(size)
    require_int("batch", batch)
    xs = task.example_inputs(model, batch=batch, size=h)
    fixed = getattr(model.config, "frames", None)
    if not any(x.dim() == 5 for x in xs):
        if frames is not None:
            raise ConfigError(f"frames={frames!r}: {task.describe(model.config)} takes no clips")
        t = None
    elif fixed is not None and frames is not None and frames != fixed:
        raise ConfigError(f"frames={frames!r}: {task.describe(model.config)} is built for clips of {fixed} frames")
    elif fixed is None and frames is None:
        raise ConfigError(f"{task.describe(model.config)} takes clips of any length: give the length T to export "
                          "(frames=T; a run records it as data.frames)")  # fmt: skip
    else:
        t = fixed if fixed is not None else frames
        require_int("frames", t)

    def fit(x: Tensor) -> Tensor:
        shape = list(x.shape)
        if x.dim() == 5:
            shape[1] = t
        if x.dim() >= 4:
            shape[-1] = w
        return x if shape == list(x.shape) else torch.randn(shape)

    return tuple(fit(x.cpu()) for x in xs)


def _shape(x: Tensor) -> str:
    return "(" + ", ".join(["N", *map(str, x.shape[1:])]) + ")"


def export_onnx(
    model: nn.Module,
    path: str | Path,
    size: int | tuple[int, int],
    *,
    frames: int | None = None,
    opset: int = DEFAULT_OPSET,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (any task, :data:`GRAPHS`) as ONNX to ``path`` for ``size x size`` images or frames
    (``frames``: the clip length, for a video model built for any length), check it with ``onnx.checker``.

    ``metadata`` entries are stored as JSON strings in the model's ``metadata_props``, after ``task``,
    ``inputs`` and ``outputs`` (name -> shape) and ``selfcam_model`` (the config). The model is exported
    from the CPU in eval mode (its device and train/eval mode are restored). Raises
    :class:`ConfigError` for a bad option, or when the exporter or the checker fails.
    """
    onnx = _require_onnx()
    if not isinstance(opset, int) or isinstance(opset, bool) or not MIN_OPSET <= opset <= max_opset():
        raise ConfigError(f"opset {opset!r}: the export writes integer opsets {MIN_OPSET} to {max_opset()}")
    task, graph = task_of(model), graph_of(model)
    example = example_inputs(model, size, frames)  # batch 2: a batch of 1 could be specialised away
    path = Path(path)
    if not path.parent.is_dir():
        raise ConfigError(f"{path}: directory {path.parent} does not exist")
    device, training = next(model.parameters()).device, model.training
    wrapper = _Explained(model.cpu().eval(), graph).eval()
    what = f"{task.describe(model.config)}, opset {opset}"
    try:
        with warnings.catch_warnings():
            # shape checks (input channels, ABN's map size, the clip length) are constants of the traced graph; say nothing
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            with torch.no_grad():
                outputs = wrapper(*example)
            batch = {0: "batch"}
            torch.onnx.export(wrapper, example, str(path), dynamo=False, opset_version=opset,
                              input_names=list(graph.inputs), output_names=list(graph.outputs),
                              dynamic_axes={name: batch for name in (*graph.inputs, *graph.outputs)})  # fmt: skip
    except Exception as e:  # the exporter raises many types; the first line is what a user can act on
        path.unlink(missing_ok=True)
        raise ConfigError(f"ONNX export failed ({what}): {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}") from e
    finally:
        model.to(device).train(training)
    shapes = {
        "task": task.name,
        "inputs": {name: _shape(x) for name, x in zip(graph.inputs, example)},
        "outputs": {name: " ".join([_shape(y), graph.notes.get(name, "")]).strip() for name, y in zip(graph.outputs, outputs)},
    }
    proto = onnx.load(str(path))
    for key, value in {**shapes, **graph.metadata, "selfcam_model": asdict(model.config), **(metadata or {})}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.save(proto, str(path))
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise ConfigError(f"{path}: the exported model does not pass onnx.checker ({what}): {e}") from e
    return path


def onnx_parity(model: nn.Module, path: str | Path, *inputs: Tensor) -> dict[str, float]:
    """Largest absolute differences between onnxruntime (CPU) and PyTorch (``model.explain``) on ``inputs``
    (in the graph's order, :func:`example_inputs`): output name -> max |ONNX - PyTorch|."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ConfigError("checking an ONNX model needs onnxruntime: pip install 'selfcam[export]'") from e
    graph = graph_of(model)
    if len(inputs) != len(graph.inputs):
        raise ConfigError(f"the {task_of(model).name} graph takes {len(graph.inputs)} input(s) "
                          f"({', '.join(graph.inputs)}), got {len(inputs)}")  # fmt: skip
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(list(graph.outputs), {name: x.detach().cpu().float().numpy() for name, x in zip(graph.inputs, inputs)})
    device, training = next(model.parameters()).device, model.training
    try:
        with torch.no_grad():
            want = _Explained(model.eval(), graph)(*(x.to(device) for x in inputs))
    finally:
        model.train(training)
    return {name: float(np.abs(g - w.cpu().numpy()).max()) for name, g, w in zip(graph.outputs, got, want)}
