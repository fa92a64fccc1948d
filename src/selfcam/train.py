"""Training through PyTorch Lightning: one module for every head, one ``fit`` function.

``fit(model, train_set, val_set, TrainConfig(...), run_dir)`` trains with a Rich
progress bar, writes ``history.json`` (per-epoch metrics) and the checkpoint
(``model.safetensors`` + ``config.json``) into ``run_dir``. Datasets yield
``(image, label, ...)``; extra items (boxes) are ignored here.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torchmetrics
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .errors import ConfigError
from .model import SelfExplainer, save_checkpoint

__all__ = ["TrainConfig", "SelfcamModule", "fit", "seed_all"]


@dataclass
class TrainConfig:
    """The training recipe (stored in ``config.json`` under ``"train"``)."""

    epochs: int = 10
    batch_size: int = 64
    optimizer: str = "adamw"
    lr: float = 3e-3
    weight_decay: float = 5e-4
    momentum: float = 0.9
    seed: int = 0
    num_workers: int = 0
    accelerator: str = "auto"

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(f"epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ConfigError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)) or self.weight_decay < 0:
            raise ConfigError(f"lr must be > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}")


class SelfcamModule(L.LightningModule):
    """Lightning wrapper: the head's own loss, AdamW or SGD with a one-cycle schedule, accuracy."""

    def __init__(self, model: SelfExplainer, cfg: TrainConfig) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        n = model.config.num_classes
        self.train_acc = torchmetrics.Accuracy(task="multiclass", num_classes=n)
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=n)

    def _step(self, batch: tuple[Tensor, ...], stage: str) -> Tensor:
        x, y = batch[0], batch[1]
        out = self.model(x)
        loss = self.model.loss(out, y)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{stage} loss is {loss.item()} at step {self.global_step}; lower the learning rate")
        acc = self.train_acc if stage == "train" else self.val_acc
        acc(out.logits, y)
        self.log(f"{stage}_loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=len(x))
        self.log(f"{stage}_acc", acc, prog_bar=True, on_step=False, on_epoch=True, batch_size=len(x))
        return loss

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        self._step(batch, "val")

    def configure_optimizers(self) -> Any:
        params, c = self.model.parameters(), self.cfg
        if c.optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(params, c.lr, momentum=c.momentum, weight_decay=c.weight_decay, nesterov=True)
        else:
            opt = torch.optim.AdamW(params, c.lr, weight_decay=c.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.cfg.lr, total_steps=self.trainer.estimated_stepping_batches)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class _History(L.Callback):
    """Collects the epoch-level metrics Lightning logged, one dict per epoch."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        row = {"epoch": trainer.current_epoch, "seconds": round(time.perf_counter() - self._t0, 2)}
        row.update({k: round(float(v), 6) for k, v in trainer.callback_metrics.items()})
        self.rows.append(row)


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch: call it before ``create_model`` so the initial weights repeat."""
    L.seed_everything(seed, workers=True, verbose=False)


def _quiet_lightning() -> None:
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated.*")


def fit(
    model: SelfExplainer,
    train_set: Dataset,
    val_set: Dataset | None,
    cfg: TrainConfig,
    run_dir: str | Path | None = None,
    progress: bool = True,
    extra_config: dict[str, Any] | None = None,
) -> list[dict[str, float]]:
    """Train ``model`` in place; returns the per-epoch history.

    With ``run_dir`` it also writes ``history.json``, ``model.safetensors`` and
    ``config.json`` (``extra_config`` is stored beside ``"model"`` and ``"train"``).
    """
    _quiet_lightning()
    seed_all(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    train_loader = DataLoader(train_set, cfg.batch_size, shuffle=True, generator=gen, num_workers=cfg.num_workers, drop_last=len(train_set) > cfg.batch_size)  # fmt: skip
    val_loader = DataLoader(val_set, 256, num_workers=cfg.num_workers) if val_set is not None else None
    history = _History()
    callbacks: list[L.Callback] = [history]
    if progress:
        callbacks.append(L.pytorch.callbacks.RichProgressBar(leave=True))
    trainer = L.Trainer(
        max_epochs=cfg.epochs, accelerator=cfg.accelerator, devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=progress, enable_model_summary=False, deterministic=True, callbacks=callbacks,
        num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(SelfcamModule(model, cfg), train_loader, val_loader)
    model.eval()
    if run_dir is not None:
        run = Path(run_dir)
        run.mkdir(parents=True, exist_ok=True)
        (run / "history.json").write_text(json.dumps(history.rows, indent=2))
        save_checkpoint(model, run, train=asdict(cfg), **(extra_config or {}))
    return history.rows
