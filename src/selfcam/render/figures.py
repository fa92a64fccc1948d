"""Matplotlib figures of computed numbers, each returned as a PNG data URI.

Figures are drawn with ``matplotlib.figure.Figure`` and ``FigureCanvasAgg``: no pyplot state is touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .images import png_data_uri

__all__ = ["importance_bars", "line_panels", "matrices", "training_curves"]


def _figure_uri(fig: Figure) -> str:
    """Draw a matplotlib figure (Agg, no pyplot) and encode it as a PNG data URI."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return png_data_uri(np.asarray(canvas.buffer_rgba())[..., :3])


def training_curves(history: dict[str, list[dict]]) -> str | None:
    """Train loss and validation accuracy per epoch, a line per model, in two panels.

    history: model -> list of per-epoch dicts (``epoch``, ``train_loss``, ``val_acc``; missing or
    ``None`` values are skipped). Returns a data URI, or ``None`` when there is nothing to plot.
    """
    fig = Figure(figsize=(10, 3.6), dpi=100, layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, key, label in zip(axes, ("train_loss", "val_acc"), ("train loss", "val accuracy")):
        for model, epochs in history.items():
            pts = [(e.get("epoch", j), e[key]) for j, e in enumerate(epochs) if e.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", markersize=3, label=model)
        ax.set(xlabel="epoch", ylabel=label, title=label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize="small")
    if not any(ax.has_data() for ax in axes):
        return None
    return _figure_uri(fig)


def line_panels(panels: list[tuple[str, str, str, dict[str, list[float]]]], x: Sequence[float] | None = None,
                xticks: Sequence[str] | None = None) -> str:  # fmt: skip
    """Panels of lines side by side, each ``(title, xlabel, ylabel, {label: values})``; a data URI.

    x: the x values of lines that have as many values (others are drawn at 0, 1, ...);
    xticks: tick labels at 0, 1, ... instead.
    """
    fig = Figure(figsize=(5 * len(panels), 3.6), dpi=100, layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (title, xlabel, ylabel, lines) in zip(axes, panels):
        for label, values in lines.items():
            xs = x if x is not None and len(x) == len(values) else range(len(values))
            ax.plot(xs, values, marker="o", markersize=2, label=label)
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        if xticks is not None:
            ax.set_xticks(range(len(xticks)), xticks, rotation=90, fontsize="x-small")
        ax.grid(alpha=0.3)
        if lines:
            ax.legend(fontsize="small")
    return _figure_uri(fig)


def matrices(by_method: dict[str, list[list[float]]], labels: list[str], what: str) -> str:
    """One annotated ``R x R`` matrix per method (values in [0, 1], rows and columns ``labels``,
    titled ``METHOD: pairwise WHAT``), side by side; a data URI."""
    fig = Figure(figsize=(max(3.5, 0.6 * len(labels) + 2) * len(by_method), max(3.2, 0.5 * len(labels) + 2)),
                 dpi=100, layout="constrained")  # fmt: skip
    axes = np.atleast_1d(fig.subplots(1, len(by_method)))
    for ax, (method, m) in zip(axes, by_method.items()):
        values = np.asarray(m, dtype=float)
        im = ax.imshow(values, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize="small")
        ax.set_yticks(range(len(labels)), labels, fontsize="small")
        for (i, j), v in np.ndenumerate(values):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize="x-small", color="white" if v < 0.6 else "black")
        ax.set_title(f"{method}: pairwise {what}")
        fig.colorbar(im, ax=ax, shrink=0.8)
    return _figure_uri(fig)


def importance_bars(metrics: dict[str, Any]) -> str:
    """Grouped bars of the mean SE weight per modality: speaking, not speaking, and both with silent audio.

    metrics: an ASD evaluation (:func:`selfcam.asd.evaluate_asd`, or the ASD demo's ``metrics.json``):
    ``modality_importance`` and ``silence_check.silent_modality_importance``, each
    ``{"speaking" | "not_speaking": {modality: value}}``; the modalities are those of the first group, in
    order. Raises KeyError or TypeError when a value is missing. Returns a data URI.
    """
    groups = {
        "speaking": metrics["modality_importance"]["speaking"],
        "not speaking": metrics["modality_importance"]["not_speaking"],
        "speaking,\nsilent audio": metrics["silence_check"]["silent_modality_importance"]["speaking"],
        "not speaking,\nsilent audio": metrics["silence_check"]["silent_modality_importance"]["not_speaking"],
    }
    fig = Figure(figsize=(7, 3.4), dpi=100, layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(groups))
    for j, m in enumerate(groups["speaking"]):
        vals = [g[m] for g in groups.values()]
        bars = ax.bar(x + (j - 0.5) * 0.38, vals, 0.38, label=m)
        ax.bar_label(bars, fmt="%.3f", fontsize="small")
    ax.set_xticks(x, list(groups))
    ax.set(ylabel="mean SE weight of the modality's slice", title="modality importance (test split)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return _figure_uri(fig)
