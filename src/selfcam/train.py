"""Training through PyTorch Lightning: one module for every head, one ``fit`` function.

``fit(model, train_set, val_set, TrainConfig(...), run_dir)`` trains a model of any task
(:mod:`selfcam.tasks`: image, attributes, video, asd) with a Rich progress bar, writes
``history.json`` (per-epoch metrics) and the checkpoint (``model.safetensors`` + ``config.json``,
with what it trained on) into ``run_dir``. The model's task says how a batch unpacks into inputs
and targets; the boxes of a batch are used only by the optional map loss (``map_loss_weight``:
explanation-supervised training, docs/training.md), else ignored.

Crash safety: after every epoch (and at the end of a batch when asked with
:func:`request_checkpoint` or ``SIGUSR1``) the whole training state goes into
``run_dir/checkpoints/step-NNNNNNNNN/`` (``state.safetensors`` for every tensor,
``state.json`` for the rest), written under a temporary name, fsynced and renamed,
so a directory with that name is always complete. ``fit(..., resume=True)``
continues from the newest one; the data order is a pure function of (seed, epoch),
so a resumed run repeats an uninterrupted one bit for bit on the CPU.
Lightning's own checkpoints are pickles and stay off. docs/training.md has the layout.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from .cells import CellGrid
from .checkpoint import CONFIG, check_own_output, load_checkpoint, read_config, read_safetensors, save_checkpoint, write_json
from .errors import CheckpointError, ConfigError, DivergenceError, OutputError, SelfcamError, check_accelerator, require_int
from .heads import upsample
from .metrics import energy_pointing_game
from .safeio import read_json
from .tasks import Task, get_task, task_of

__all__ = [
    "DivergenceError",
    "EpochSampler",
    "SelfcamModule",
    "TrainConfig",
    "TrainState",
    "backbone_of",
    "epoch_seed",
    "fit",
    "is_global_zero",
    "latest_state",
    "map_dice_loss",
    "map_outside_share",
    "mask_flags",
    "request_checkpoint",
    "seed_all",
    "steps_per_epoch",
]

log = logging.getLogger(__name__)

STATE_DIR, STATE_TENSORS, STATE_JSON, HISTORY = "checkpoints", "state.safetensors", "state.json", "history.json"
STATE_FORMAT, STATE_VERSION = "selfcam-train-state", 2  # version 1: image runs, no "task" field
PRECISIONS = ("32", "bf16-mixed", "16-mixed")  # Lightning's: full float32, or mixed with bfloat16 / float16 autocast
RUNTIME_FIELDS = ("accelerator", "num_workers")  # may differ when a run is resumed; every other field must not
_REQUESTED = threading.Event()
MAP_LOSSES = ("outside", "dice")  # TrainConfig.map_loss: map_outside_share, map_dice_loss


@dataclass
class TrainConfig:
    """The training recipe (stored in ``config.json`` under ``"train"``).

    ``batch_size`` is per process: with ``devices * num_nodes`` processes a step sees
    ``batch_size * devices * num_nodes`` images.

    Fine-tuning (docs/training.md): ``freeze_backbone`` trains the head alone for the whole run;
    ``head_epochs`` trains it alone for the first N epochs, then everything. A frozen backbone gets no
    gradient and runs in eval mode (its BatchNorm statistics and dropout stay as they are).
    ``backbone_lr_scale`` gives the backbone's parameters ``lr * scale`` (a second parameter group).

    ``precision``: Lightning's ``"32"``, ``"bf16-mixed"`` or ``"16-mixed"`` (autocast; float16 also scales
    the loss; the weights stay float32). ``num_workers``: DataLoader worker processes (a runtime field).
    ``compile``: the module trains ``torch.compile(model)`` (the same parameters; the first steps compile).

    Explanation-supervised training (image task, data with boxes; attributes task, data with attribute masks:
    each present attribute's map against its own mask; asd task, data with mouth boxes: each speaking frame's
    map against its mouth box): ``map_loss_weight > 0`` adds
    ``map_loss_weight`` times the mean, over the batch's items that carry a mask, of the share of the
    supervised map's mass outside the item's box (:func:`map_outside_share`). ``mask_fraction``: the share
    of training items that carry one (:func:`mask_flags`, seeded by ``seed``); ``map_loss_map``: ``"self"``
    (the head's own map; plain: the CAM of the label) or ``"class"`` (the class map of the label), see
    :meth:`selfcam.tasks.ImageTask.supervised_map`. ``map_loss``: ``"outside"`` (that share) or ``"dice"``
    (one minus the soft Dice of map and mask, :func:`map_dice_loss`: it also asks the map to cover the box).
    """

    epochs: int = 10
    batch_size: int = 64
    optimizer: str = "adamw"
    lr: float = 3e-3
    weight_decay: float = 5e-4
    momentum: float = 0.9
    seed: int = 0
    num_workers: int = 0
    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    freeze_backbone: bool = False
    head_epochs: int = 0
    backbone_lr_scale: float = 1.0
    precision: str = "32"
    compile: bool = False
    map_loss_weight: float = 0.0
    mask_fraction: float = 1.0
    map_loss_map: str = "self"
    map_loss: str = "outside"

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(f"epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ConfigError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)) or not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ConfigError(f"lr must be > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}")
        if self.accelerator not in ("auto", "cpu", "gpu", "cuda", "mps"):
            raise ConfigError(f"accelerator must be auto, cpu, gpu, cuda or mps, got {self.accelerator!r}")
        require_int("devices", self.devices)
        require_int("num_nodes", self.num_nodes)
        require_int("head_epochs", self.head_epochs, 0)
        if self.head_epochs and (self.freeze_backbone or self.head_epochs >= self.epochs):
            raise ConfigError(f"head_epochs ({self.head_epochs}) trains the head alone before unfreezing the backbone: it must be "
                              f"below epochs ({self.epochs}) and not combined with freeze_backbone (frozen throughout)")  # fmt: skip
        if self.head_epochs and self.world_size > 1:  # DDP fixes the parameters it reduces when it starts
            raise ConfigError("head_epochs unfreezes the backbone during the run, which DDP does not allow: train on one "
                              "process, or use freeze_backbone (frozen throughout)")  # fmt: skip
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)} (Lightning's names), got {self.precision!r}")
        if not (self.backbone_lr_scale > 0 and math.isfinite(self.backbone_lr_scale)):
            raise ConfigError(f"backbone_lr_scale must be > 0 (freeze_backbone gives no backbone updates), got {self.backbone_lr_scale}")
        if not (self.map_loss_weight >= 0 and math.isfinite(self.map_loss_weight)):
            raise ConfigError(f"map_loss_weight must be a finite number >= 0 (0: no map loss), got {self.map_loss_weight}")
        if not 0 < self.mask_fraction <= 1:
            raise ConfigError(f"mask_fraction must lie in (0, 1], got {self.mask_fraction}")
        if self.mask_fraction != 1 and self.map_loss_weight == 0:
            raise ConfigError(f"mask_fraction ({self.mask_fraction}) says which items the map loss sees: set map_loss_weight > 0")
        if self.map_loss_map not in ("self", "class"):
            raise ConfigError(f"map_loss_map must be 'self' or 'class', got {self.map_loss_map!r}")
        if self.map_loss not in MAP_LOSSES:
            raise ConfigError(f"map_loss must be one of {', '.join(MAP_LOSSES)}, got {self.map_loss!r}")

    def frozen_at(self, epoch: int) -> bool:
        """Whether the backbone is frozen during epoch ``epoch`` (0-based)."""
        return self.freeze_backbone or epoch < self.head_epochs

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes


# ----------------------------------------------------------------------------- data order


def epoch_seed(seed: int, epoch: int, stream: str = "order") -> int:
    """The seed of one epoch's data order (``stream="order"``) or global generators (``"rng"``):
    63 bits of SHA-256 over ``"selfcam-{stream}:{seed}:{epoch}"``."""
    digest = hashlib.sha256(f"selfcam-{stream}:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _seed_globals(seed: int) -> None:
    """Seed torch's (CPU and CUDA), NumPy's and Python's global generators."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def steps_per_epoch(n: int, batch_size: int, world: int = 1) -> int:
    """Optimizer steps per epoch: each of ``world`` processes reads ``n // world`` samples,
    dropping the last incomplete batch when there is more than one."""
    per_rank = n // world
    return per_rank // batch_size if per_rank > batch_size else 1


class EpochSampler(Sampler[int]):
    """The indices one process reads in one epoch: a pure function of the arguments.

    ``shuffle``: a permutation of ``range(n)`` drawn from
    ``torch.Generator().manual_seed(epoch_seed(seed, epoch))``; process ``rank`` of ``world``
    takes every ``world``-th index from ``rank`` on (the first ``n // world`` of them, so every
    process runs as many batches). Without ``shuffle``: the contiguous shard
    ``[rank * n // world, (rank + 1) * n // world)``. The first ``skip`` indices are left
    out (a run resumed in the middle of an epoch).
    """

    def __init__(self, n: int, *, seed: int = 0, epoch: int = 0, shuffle: bool = True,
                 rank: int = 0, world: int = 1, skip: int = 0) -> None:  # fmt: skip
        if not 0 <= rank < world or n < world or skip < 0:
            raise ConfigError(f"cannot share {n} samples among {world} processes (rank {rank}, skip {skip})")
        self.n, self.seed, self.epoch, self.shuffle = n, seed, epoch, shuffle
        self.rank, self.world, self.skip = rank, world, skip

    def indices(self) -> Tensor:
        """``(len(self),)`` int64."""
        if self.shuffle:
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch)))
            mine = perm[self.rank :: self.world][: self.n // self.world]
        else:
            mine = torch.arange(self.rank * self.n // self.world, (self.rank + 1) * self.n // self.world)
        return mine[self.skip :]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        shard = self.n // self.world if self.shuffle else (self.rank + 1) * self.n // self.world - self.rank * self.n // self.world
        return max(0, shard - self.skip)


class _EpochLoader(DataLoader):
    """A DataLoader that seeds the global generators from ``reseed`` each time it is iterated.

    Random augmentation in the dataset, worker seeds and dropout then depend on (seed, epoch)
    only, not on how often Lightning created the iterator before (it does so twice per epoch
    but once in the first epoch of a ``fit``, which a resumed run would otherwise notice).
    """

    reseed: int | None = None

    def __iter__(self) -> Any:
        if self.reseed is not None:
            _seed_globals(self.reseed)
        return super().__iter__()


@dataclass(frozen=True)
class _Start:
    """Where a run starts: epochs done, batches of the next epoch done, optimizer steps, seconds."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    seconds: float = 0.0


class _RunData(L.LightningDataModule):
    """Loaders rebuilt every epoch: train order from :class:`EpochSampler`, validation sharded over processes."""

    def __init__(self, train_set: Dataset, val_set: Dataset | None, cfg: TrainConfig, start: _Start) -> None:
        super().__init__()
        self.train_set, self.val_set, self.cfg, self.start = train_set, val_set, cfg, start

    def _world(self) -> tuple[int, int]:
        t = self.trainer
        if t.world_size != self.cfg.world_size:
            raise ConfigError(f"running {t.world_size} processes but the recipe says devices * num_nodes = {self.cfg.world_size}")
        return t.global_rank, t.world_size

    def train_dataloader(self) -> DataLoader:
        rank, world = self._world()
        e, c, n = self.start.epoch + self.trainer.current_epoch, self.cfg, len(self.train_set)  # type: ignore[arg-type]
        skip = self.start.batch * c.batch_size if e == self.start.epoch else 0
        sampler = EpochSampler(n, seed=c.seed, epoch=e, rank=rank, world=world, skip=skip)
        loader = _EpochLoader(self.train_set, c.batch_size, sampler=sampler, num_workers=c.num_workers, drop_last=n // world > c.batch_size)  # fmt: skip
        # mid-epoch resume: the generators continue from the state saved with it instead
        loader.reseed = epoch_seed(c.seed, e, "rng") + rank if skip == 0 else None
        return loader

    def val_dataloader(self) -> DataLoader:
        rank, world = self._world()
        val = self.val_set if self.val_set is not None else self.train_set  # no val set: limit_val_batches=0 skips it
        sampler = EpochSampler(len(val), shuffle=False, rank=rank, world=world)  # type: ignore[arg-type]
        return DataLoader(val, 256, sampler=sampler, num_workers=self.cfg.num_workers)


# ----------------------------------------------------------------------------- explanation supervision


def mask_flags(n: int, fraction: float, seed: int) -> Tensor:
    """``(n,)`` bool: which of ``n`` training items carry their mask for the map loss.

    The first ``round(fraction * n)`` items of a permutation of ``range(n)`` drawn from
    ``torch.Generator().manual_seed(epoch_seed(seed, 0, "masks"))``: a pure function of the arguments, so a
    resumed run sees the same items. :class:`ConfigError` when that count is 0.
    """
    k = round(fraction * n)
    if k < 1:
        raise ConfigError(f"mask_fraction {fraction} of {n} training items gives no item with a mask")
    flags = torch.zeros(n, dtype=torch.bool)
    flags[torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(seed, 0, "masks")))[:k]] = True
    return flags


class _MaskFlags(Dataset):
    """``dataset``'s items with one more entry at the end: ``flags[i]``, whether the map loss sees its mask."""

    def __init__(self, dataset: Dataset, flags: Tensor) -> None:
        self.dataset, self.flags = dataset, flags

    def __len__(self) -> int:
        return len(self.flags)

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        return (*self.dataset[i], self.flags[i])


def map_outside_share(maps: Tensor, masks: Tensor, cells: CellGrid | None = None) -> Tensor:
    """``(N,)`` the share of each map's mass outside its mask, in ``[0, 1]``, differentiable in ``maps``.

    ``maps (N, h, w)`` in ``[0, 1]`` at feature resolution go to the masks' size ``(N, H, W)`` through
    :func:`selfcam.heads.upsample` (with the backbone's ``cells``, as the metrics see them), then
    ``1 - energy_pointing_game(map, mask)`` (:func:`selfcam.metrics.energy_pointing_game`; an all-zero map gives 1).
    """
    return 1 - energy_pointing_game(upsample(maps, tuple(masks.shape[-2:]), "bilinear", cells), masks)


def map_dice_loss(maps: Tensor, masks: Tensor, cells: CellGrid | None = None) -> Tensor:
    """``(N,)`` one minus the soft Dice ``2 sum(M m) / (sum(M) + sum(m))`` of each upsampled map ``M`` (as in
    :func:`map_outside_share`) and its mask ``m``, in ``[0, 1]``: 0 only for a map that is 1 on the mask and 0 off it."""
    up = upsample(maps, tuple(masks.shape[-2:]), "bilinear", cells).flatten(1)
    m = masks.flatten(1).to(up.dtype)
    return 1 - 2 * (up * m).sum(1) / (up.sum(1) + m.sum(1)).clamp(min=torch.finfo(up.dtype).tiny)


def correct_count(logits: Tensor, target: Tensor, kind: str = "multiclass") -> tuple[Tensor, int]:
    """``(correct, scored)``: a float scalar on the logits' device and an int. ``"multiclass"``: logits ``(N, C)``,
    labels ``(N,)``, the argmax against the label, ``N`` scored. ``"multilabel"``: logits and ``{0, 1}`` targets
    ``(N, A)``, each logit ``> 0`` (probability above 0.5) against its target, ``N * A`` scored (torchmetrics'
    multilabel accuracy, whose per-label mean is the same number: every label is scored on every item)."""
    hits = (logits > 0) == (target > 0.5) if kind == "multilabel" else logits.argmax(1) == target
    return hits.sum().float(), hits.numel()


# ----------------------------------------------------------------------------- the module

Objective = Callable[[Any, tuple[Tensor, ...]], tuple[Tensor, Tensor]]  # (model output, batch) -> (loss, accuracy target)


def backbone_of(model: torch.nn.Module) -> torch.nn.Module:
    """``model.backbone``, the part the fine-tuning recipes freeze or train at a lower rate."""
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, torch.nn.Module) or next(backbone.parameters(), None) is None:
        raise ConfigError(f"{type(model).__name__} has no backbone with weights (model.backbone) to freeze or to train "
                          "at another learning rate")  # fmt: skip
    return backbone



class SelfcamModule(L.LightningModule):
    """Lightning wrapper for a model of any task: the model's own loss on the batch as its task unpacks it,
    AdamW or SGD with a one-cycle schedule, accuracy (multi-class, or multi-label for attributes).

    ``total_steps``: the one-cycle length (the whole run's, also when resumed); ``restore``:
    the optimizer and scheduler state of a resumed run (see :func:`fit`); ``objective``: the loss
    instead of the model's own (see :func:`fit`). The recipe's ``freeze_backbone`` / ``head_epochs``
    freeze ``model.backbone`` at the start of the epochs they name.

    With ``cfg.map_loss_weight > 0`` the loss adds the map loss (:class:`TrainConfig`); a training batch then
    ends with the items' mask flags (:func:`fit` appends them), validation batches score every item's mask.
    ``map_cells``: the backbone's cell grid at the training size, for :func:`map_outside_share`.
    """

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, total_steps: int | None = None,
                 restore: tuple[TrainState, dict[str, Tensor]] | None = None, objective: Objective | None = None,
                 map_cells: CellGrid | None = None) -> None:  # fmt: skip
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.map_cells = map_cells
        self.total_steps, self.restore = total_steps, restore
        self.step_offset, self.epoch_offset = (restore[0].global_step, restore[0].epoch) if restore is not None else (0, 0)
        self.task: Task = task_of(model)
        self.objective = objective
        self._sums: dict[str, Any] = {}  # per stage: the epoch's (loss x items, correct) on the device, (scored, items)
        self.__dict__["run_model"] = _compiled(model) if cfg.compile else model  # not a submodule: the same parameters
        self._compiling = cfg.compile  # until its first step has run
        tunes = cfg.freeze_backbone or cfg.head_epochs > 0 or cfg.backbone_lr_scale != 1.0
        self.__dict__["backbone"] = backbone_of(model) if tunes else None  # not a submodule of this one: it is the model's
        self._grads = {p: p.requires_grad for p in self.backbone.parameters()} if self.backbone is not None else {}
        self.frozen = False
        if self.backbone is not None:  # before DDP wraps the module: it reduces only what requires a gradient
            self.set_frozen(cfg.frozen_at(self.epoch_offset))

    def set_frozen(self, frozen: bool) -> None:
        """Freeze the backbone (no gradient, eval mode) or give it back its own ``requires_grad`` and train mode."""
        if self.backbone is None or frozen == self.frozen:
            return
        for p, grad in self._grads.items():
            p.requires_grad_(grad and not frozen)
        self.backbone.train(not frozen and self.model.training)
        self.frozen = frozen

    def on_train_epoch_start(self) -> None:
        if self.backbone is not None:
            self.set_frozen(self.cfg.frozen_at(self.epoch_offset + self.current_epoch))
            if self.frozen:
                self.backbone.eval()  # also when the model arrived in train mode

    def forward_loss(self, batch: tuple[Tensor, ...], stage: str) -> tuple[Tensor, Tensor, Tensor]:
        """``(logits, loss, targets)`` of one batch, unpacked by the model's task (or by ``objective``),
        plus the map loss when the recipe asks for it."""
        flags = None
        if self.cfg.map_loss_weight > 0 and stage == "train":
            *rest, flags = batch  # appended by _MaskFlags
            batch = tuple(rest)
        inputs, targets = self.task.split_batch(batch)
        out = self._run(*inputs)
        if self.objective is not None:
            loss, target = self.objective(out, batch)
        else:
            loss, target = self.model.loss(out, *targets), targets[0]
        if self.cfg.map_loss_weight > 0 and len(batch) > self.task.mask_item:  # validation without boxes: no map loss to log
            loss = loss + self.cfg.map_loss_weight * self._map_loss(out, batch, targets[0], flags, stage)
        return out.logits, loss, target

    def _run(self, *inputs: Tensor) -> Any:
        """The model's output; with ``compile``, a compiler failure on the first call is one ConfigError."""
        if not self._compiling:
            return self.run_model(*inputs)
        from torch._dynamo.exc import TorchDynamoException

        try:
            out = self.run_model(*inputs)
        except TorchDynamoException as e:
            raise ConfigError(f"compile: torch.compile could not compile the model here ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0][:300]}); train without --compile") from e  # fmt: skip
        self._compiling = False
        return out

    def _map_loss(self, out: Any, batch: tuple[Tensor, ...], target: Tensor, flags: Tensor | None, stage: str) -> Tensor:
        """The mean map loss (:func:`map_outside_share` or :func:`map_dice_loss`) over the batch's items with ``flags``
        (all when None) and, where the task says which (:meth:`selfcam.tasks.Task.map_present`), over those items'
        present attributes (maps ``(N, A, h, w)``) or speaking frames (``(N, T, h, w)``); 0 when none."""
        maps = self.task.supervised_map(self.model, out, target, self.cfg.map_loss_map)  # type: ignore[attr-defined]
        masks = self.task.map_masks(batch)  # type: ignore[attr-defined]
        present = self.task.map_present(batch)  # None: every map; else which (attributes present, frames speaking)
        if flags is not None:
            maps, masks = maps[flags], masks[flags]
            present = present[flags] if present is not None else None
        if present is not None:
            maps, masks = maps[present], masks[present]
        if len(maps) == 0:
            return maps.sum()  # 0, in the graph
        loss = map_dice_loss if self.cfg.map_loss == "dice" else map_outside_share
        share = loss(maps, masks, self.map_cells).mean()
        self.log(f"{stage}_map_loss", share, on_step=False, on_epoch=True, batch_size=len(maps))
        return share

    def _step(self, batch: tuple[Tensor, ...], stage: str) -> Tensor:
        logits, loss, y = self.forward_loss(batch, stage)
        bad = not torch.isfinite(loss)
        if stage == "train":  # every process runs as many training steps: when one diverges, all stop
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            step, epoch = self.step_offset + self.global_step, self.epoch_offset + self.current_epoch
            value = loss.item() if not torch.isfinite(loss) else "not finite in another process"
            raise DivergenceError(f"{stage} loss is {value} at step {step} (epoch {epoch}); lower the learning rate")
        with torch.no_grad():
            correct, scored = correct_count(logits, y, self.task.accuracy)
            sums = torch.stack([loss.detach().float() * len(y), correct])  # on the device: no host sync per step
        before, counts = self._sums.get(stage, (0.0, (0, 0)))
        self._sums[stage] = (before + sums, (counts[0] + scored, counts[1] + len(y)))
        return loss

    def _log_epoch(self, stage: str) -> None:
        """Log the epoch's mean loss and accuracy once, on its last batch, from the sums of every process (one
        all-reduce): per-step ``self.log`` calls and torchmetrics' per-step work were a quarter of a ResNet-8 step's
        CPU time. Loss: the mean over items; accuracy: the share of correct predictions (labels for attributes)."""
        sums, counts = self._sums.pop(stage)
        both = torch.cat([sums, sums.new_tensor(counts)])
        total, correct, scored, count = self.trainer.strategy.reduce(both, reduce_op="sum").tolist()
        self.log(f"{stage}_loss", total / count, prog_bar=True, on_step=False, on_epoch=True, batch_size=int(count))
        self.log(f"{stage}_acc", correct / scored, prog_bar=True, on_step=False, on_epoch=True, batch_size=int(count))

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        loss = self._step(batch, "train")
        if batch_idx + 1 == self.trainer.num_training_batches:
            self._log_epoch("train")
        return loss

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        self._step(batch, "val")
        if batch_idx + 1 == sum(self.trainer.num_val_batches):
            self._log_epoch("val")

    def configure_optimizers(self) -> Any:
        c = self.cfg
        params: Any = self.model.parameters()
        max_lr: float | list[float] = c.lr
        if c.backbone_lr_scale != 1.0:  # two groups: the rest at lr, the backbone at lr * scale
            assert self.backbone is not None
            ours = {id(p) for p in self.backbone.parameters()}
            rest = [p for p in self.model.parameters() if id(p) not in ours]
            max_lr = [c.lr, c.lr * c.backbone_lr_scale]
            params = [{"params": rest}, {"params": list(self.backbone.parameters()), "lr": max_lr[1]}]
        if c.optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(params, c.lr, momentum=c.momentum, weight_decay=c.weight_decay, nesterov=True)
        else:
            opt = torch.optim.AdamW(params, c.lr, weight_decay=c.weight_decay)
        total = self.total_steps or self.trainer.estimated_stepping_batches
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=total)
        if self.restore is not None:
            _load_optimizer(opt, sched, *self.restore)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


# ----------------------------------------------------------------------------- training state on disk


@dataclass
class TrainState:
    """One saved training state (the JSON half; :func:`_read_tensors` gives the tensors).

    ``epoch``: epochs completed; ``batch``: batches of epoch ``epoch`` already done
    (0 at an epoch boundary); ``global_step``: optimizer steps so far.
    """

    path: Path
    epoch: int
    batch: int
    global_step: int
    seconds: float
    n_train: int
    task: str
    model: Any  # the task's config dataclass
    train: TrainConfig
    extra: dict[str, Any]
    history: list[dict[str, float]]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]
    tensors_sha256: str

    @property
    def finished(self) -> bool:
        return self.epoch >= self.train.epochs


_STATE_SPEC: dict[str, Any] = {
    "format": str, "version": int, "epoch": int, "batch": int, "global_step": int, "seconds": float, "n_train": int,
    "task": str, "model": dict, "train": dict, "extra": dict, "history": list, "optimizer": dict, "scheduler": dict, "rng": dict,
    "tensors_sha256": str,
}  # fmt: skip
_RNG_SPEC: dict[str, Any] = {"numpy": dict, "python": dict, "cuda": int}
_NUMPY_RNG_SPEC: dict[str, Any] = {"pos": int, "has_gauss": int, "cached_gaussian": float}
_PYTHON_RNG_SPEC: dict[str, Any] = {"version": int, "gauss_next": (float, type(None))}


def _kind_ok(value: Any, kind: Any) -> bool:
    """JSON type check: bool is not a number, an int is a valid float."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool):
        return bool in kinds
    return isinstance(value, kinds) or (float in kinds and isinstance(value, int))


def _expect(doc: Any, spec: dict[str, Any], where: str) -> dict[str, Any]:
    """``doc`` must be an object with exactly ``spec``'s keys, each of its type; else CheckpointError."""
    if not isinstance(doc, dict):
        raise CheckpointError(f"{where}: expected an object, got {type(doc).__name__}")
    missing, extra = sorted(spec.keys() - doc.keys()), sorted(doc.keys() - spec.keys())
    if missing or extra:
        raise CheckpointError(f"{where}: missing fields {missing} / unknown fields {extra}")
    for key, kind in spec.items():
        if not _kind_ok(doc[key], kind):
            names = "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise CheckpointError(f"{where}: field {key!r} must be {names}, got {doc[key]!r}")
    return doc


_ADDED_FIELDS = {"freeze_backbone": False, "head_epochs": 0, "backbone_lr_scale": 1.0, "precision": "32", "compile": False,
                 "map_loss_weight": 0.0, "mask_fraction": 1.0, "map_loss_map": "self", "map_loss": "outside"}  # states written before them lack them


def _train_config(d: Any, where: str) -> TrainConfig:
    spec = {f.name: {"int": int, "float": float, "str": str, "bool": bool}[str(f.type)] for f in fields(TrainConfig)}
    if isinstance(d, dict):
        d = {**_ADDED_FIELDS, **d}
    try:
        return TrainConfig(**_expect(d, spec, where))
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from e


def _read_state(path: Path) -> TrainState:
    """Parse and validate ``path/state.json``."""
    file = path / STATE_JSON
    try:
        doc = read_json(file, CheckpointError)  # regular files only; bounded size, nesting and integers
    except FileNotFoundError as e:
        raise CheckpointError(f"{file}: state file not found") from e
    if isinstance(doc, dict) and doc.get("version") == 1 and "task" not in doc:  # written before tasks: an image run
        doc["task"], doc["version"] = _v1_task(doc.get("model")), STATE_VERSION
    _expect(doc, _STATE_SPEC, str(file))
    if doc.pop("format") != STATE_FORMAT or doc.pop("version") != STATE_VERSION:
        raise CheckpointError(f"{file}: not a selfcam training state of version {STATE_VERSION}")
    try:
        doc["model"] = get_task(doc["task"]).config_from_json(doc["model"], str(file))
    except ConfigError as e:
        raise CheckpointError(str(e) if str(e).startswith(str(file)) else f"{file}: {e}") from e
    doc["train"] = _train_config(doc["train"], f"{file}: train")
    for i, row in enumerate(doc["history"]):
        if not isinstance(row, dict) or not all(_kind_ok(v, float) for v in row.values()):
            raise CheckpointError(f"{file}: history[{i}] must be an object of numbers, got {row!r}")
    _expect(doc["optimizer"], {"param_groups": list, "state": dict}, f"{file}: optimizer")
    rng = _expect(doc["rng"], _RNG_SPEC, f"{file}: rng")
    _expect(rng["numpy"], _NUMPY_RNG_SPEC, f"{file}: rng.numpy")
    _expect(rng["python"], _PYTHON_RNG_SPEC, f"{file}: rng.python")
    if min(doc["epoch"], doc["batch"], doc["global_step"], doc["n_train"]) < 0:
        raise CheckpointError(f"{file}: negative epoch, batch, step or size")
    return TrainState(path=path, **doc)


def _v1_task(model: Any) -> str:
    from .heads import HEADS

    head = HEADS.get(model.get("method")) if isinstance(model, dict) and isinstance(model.get("method"), str) else None
    return head.task if head is not None else "image"


def _state_dirs(root: Path) -> list[tuple[int, Path]]:
    """``(step, directory)`` of the complete states under ``root``, newest first."""
    if not root.is_dir():
        return []
    found = [(int(m[1]), p) for p in root.iterdir() if (m := re.fullmatch(r"step-(\d+)", p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


def latest_state(run_dir: str | Path) -> TrainState | None:
    """The newest complete training state of ``run_dir`` (validated, its tensors' checksum checked), or
    ``None`` when there is none.

    Directories named ``step-N`` are only ever created by an atomic rename, so a
    half-written state is never picked; temporary ``.tmp-*`` directories are ignored.
    The last two states are kept: when the newest is corrupt, the one before it is used (with a
    warning); when that one is corrupt too, or there is none, the newest one's error is raised.
    """
    root = Path(run_dir) / STATE_DIR
    for _ in range(5):
        dirs = _state_dirs(root)
        if not dirs:
            return None
        try:
            return _checked_state(dirs[0][1])
        except CheckpointError as e:
            if not dirs[0][1].exists():
                continue  # pruned by a training process that wrote a newer state meanwhile: look again
            if len(dirs) < 2:
                raise
            try:
                state = _checked_state(dirs[1][1])
            except CheckpointError:
                raise e from None
            log.warning("%s; resuming from the state before it, %s", e, dirs[1][1])
            return state
    raise CheckpointError(f"{root}: the training state keeps changing while being read")


def _checked_state(path: Path) -> TrainState:
    state = _read_state(path)
    file = path / STATE_TENSORS
    if not file.is_file():
        raise CheckpointError(f"{file}: state tensors not found")
    if _sha256(file) != state.tensors_sha256:
        raise CheckpointError(f"{file}: does not match the checksum in {STATE_JSON} (corrupt or replaced)")
    return state


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_tensors(state: TrainState) -> dict[str, Tensor]:
    """The tensors of ``state`` after checking they are the ones its JSON was written with."""
    file = state.path / STATE_TENSORS
    if not file.is_file():
        raise CheckpointError(f"{file}: state tensors not found")
    if _sha256(file) != state.tensors_sha256:
        raise CheckpointError(f"{file}: does not match the checksum in {STATE_JSON} (corrupt or replaced)")
    tensors = read_safetensors(file)
    needed = {"rng.torch", "rng.numpy", "rng.python", *(f"rng.cuda.{i}" for i in range(state.rng["cuda"]))}
    unknown = [k for k in tensors if k not in needed and not k.startswith(("model.", "optimizer."))]
    if needed - tensors.keys() or unknown:
        raise CheckpointError(f"{file}: missing tensors {sorted(needed - tensors.keys())} / unknown tensors {unknown[:3]}")
    return tensors


def _fsync(path: Path) -> None:
    if path.is_dir() and os.name != "posix":
        return  # directories cannot be opened for fsync on Windows
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_state(run_dir: Path, tensors: dict[str, Tensor], doc: dict[str, Any]) -> Path:
    """Write ``checkpoints/step-N/`` atomically (temp dir, fsync, rename, fsync); keep the state before it
    (the fallback of :func:`latest_state`), drop older ones."""
    root = run_dir / STATE_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{doc['global_step']:09d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    try:
        save_file(tensors, str(tmp / STATE_TENSORS))
        doc = {"format": STATE_FORMAT, "version": STATE_VERSION, **doc, "tensors_sha256": _sha256(tmp / STATE_TENSORS)}
        (tmp / STATE_JSON).write_text(json.dumps(doc, indent=1))
        for path in (tmp / STATE_TENSORS, tmp / STATE_JSON, tmp):
            _fsync(path)
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(root)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, SelfcamError) or type(e).__name__ == "SafetensorError":  # disk full
            raise OutputError(f"{final}: cannot write the training state: {getattr(e, 'strerror', None) or e}; the "
                              "states written before are kept") from e  # fmt: skip
        raise
    previous = [p for _, p in _state_dirs(root) if p != final][:1]
    for path in root.iterdir():
        if path != final and path not in previous and (path.name.startswith(".tmp-") or path.name.startswith("step-")):
            shutil.rmtree(path, ignore_errors=True)
    return final


def _drop_states(run_dir: Path) -> None:
    """Remove ``checkpoints/`` of a finished run so that a kill at any point leaves either whole states
    (resumed: recognised as finished) or none (the finished run): each ``step-N`` is renamed out of
    the way (atomically) before anything in it is deleted."""
    root = run_dir / STATE_DIR
    for _, path in _state_dirs(root):
        os.replace(path, root / f".tmp-done-{path.name}")
    shutil.rmtree(root, ignore_errors=True)


def _rng_capture() -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Python, NumPy, torch CPU (and CUDA) generator states as (tensors, JSON)."""
    tensors = {"rng.torch": torch.get_rng_state()}
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(cuda)})
    _, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    tensors["rng.numpy"] = torch.from_numpy(keys.astype(np.int64))
    version, internal, gauss_next = random.getstate()
    tensors["rng.python"] = torch.tensor(internal, dtype=torch.int64)
    meta = {"numpy": {"pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": {"version": version, "gauss_next": gauss_next}, "cuda": len(cuda)}  # fmt: skip
    return tensors, meta


def _rng_restore(tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if meta["cuda"] and torch.cuda.is_available():
        if torch.cuda.device_count() == meta["cuda"]:
            torch.cuda.set_rng_state_all([tensors[f"rng.cuda.{i}"] for i in range(meta["cuda"])])
        else:
            log.warning("state holds %d CUDA generator states for %d devices: not restored", meta["cuda"], torch.cuda.device_count())
    n = meta["numpy"]
    np.random.set_state(("MT19937", tensors["rng.numpy"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = meta["python"]
    random.setstate((p["version"], tuple(tensors["rng.python"].tolist()), p["gauss_next"]))


def _optimizer_capture(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Moment buffers (and step counts) as tensors ``optimizer.{param}.{name}``, the rest as JSON."""
    sd = opt.state_dict()
    tensors: dict[str, Tensor] = {}
    state: dict[str, dict[str, Any]] = {}
    for idx, entry in sd["state"].items():
        state[str(idx)] = {}
        for name, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer.{idx}.{name}"] = value
            else:
                state[str(idx)][name] = value
    return tensors, {"param_groups": sd["param_groups"], "state": state}


def _same_structure(saved: Any, fresh: Any, where: str) -> Any:
    """Check ``saved`` (from JSON) has ``fresh``'s keys, lengths and value kinds; returns it with tuples restored."""
    if isinstance(fresh, dict):
        if not isinstance(saved, dict) or saved.keys() != fresh.keys():
            got = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
            raise CheckpointError(f"{where}: expected fields {sorted(fresh)}, got {got}")
        return {k: _same_structure(saved[k], fresh[k], f"{where}.{k}") for k in fresh}
    if isinstance(fresh, (list, tuple)):
        if not isinstance(saved, list) or len(saved) != len(fresh):
            raise CheckpointError(f"{where}: expected a list of {len(fresh)}, got {saved!r}")
        items = [_same_structure(s, f, f"{where}[{i}]") for i, (s, f) in enumerate(zip(saved, fresh))]
        return tuple(items) if isinstance(fresh, tuple) else items
    numbers = (int, float)
    kind = bool if isinstance(fresh, bool) else numbers if isinstance(fresh, numbers) else type(fresh)
    if not _kind_ok(saved, kind):
        raise CheckpointError(f"{where}: expected a {type(fresh).__name__}, got {saved!r}")
    return saved


def _load_optimizer(opt: torch.optim.Optimizer, sched: Any, state: TrainState, tensors: dict[str, Tensor]) -> None:
    """Validate the saved optimizer / scheduler state against fresh ones and load it."""
    file = state.path / STATE_JSON
    groups = _same_structure(state.optimizer["param_groups"], opt.state_dict()["param_groups"], f"{file}: optimizer.param_groups")
    params = [p for g in opt.param_groups for p in g["params"]]
    per_param: dict[int, dict[str, Any]] = {}
    for key, value in state.optimizer["state"].items():
        if not key.isdigit() or int(key) >= len(params) or not isinstance(value, dict):
            raise CheckpointError(f"{file}: optimizer.state has an entry {key!r} for no parameter")
        per_param[int(key)] = dict(value)
    for key, t in tensors.items():
        if not key.startswith("optimizer."):
            continue
        idx, _, name = key.removeprefix("optimizer.").partition(".")
        if not idx.isdigit() or int(idx) not in per_param or (t.dim() > 0 and t.shape != params[int(idx)].shape):
            raise CheckpointError(f"{state.path / STATE_TENSORS}: {key} {tuple(t.shape)} fits no parameter of the model")
        per_param[int(idx)][name] = t
    opt.load_state_dict({"state": per_param, "param_groups": groups})
    fresh = sched.state_dict()
    saved = _same_structure(state.scheduler, fresh, f"{file}: scheduler")
    if saved["total_steps"] != fresh["total_steps"]:
        raise CheckpointError(f"{file}: schedule of {saved['total_steps']} steps, this run has {fresh['total_steps']}")
    sched.load_state_dict(saved)


def _not_finite(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    """Names of the weights / optimizer tensors holding NaN or infinity."""
    tensors = {**model.state_dict(), **{f"optimizer.{k}": v for k, v in _optimizer_capture(opt)[0].items()}}
    return [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]


# ----------------------------------------------------------------------------- callbacks


class _History(L.Callback):
    """Collects the epoch-level metrics Lightning logged, one dict per epoch."""

    def __init__(self, start: _Start, rows: list[dict[str, float]] | None = None) -> None:
        self.rows: list[dict[str, float]] = list(rows or [])
        self.start = start
        self._t0 = time.perf_counter() - start.seconds

    def seconds(self) -> float:
        return round(time.perf_counter() - self._t0, 2)

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        row = {"epoch": self.start.epoch + trainer.current_epoch, "seconds": self.seconds()}
        row.update({k: round(float(v), 6) for k, v in trainer.callback_metrics.items()})
        self.rows.append(row)


class _StateWriter(L.Callback):
    """Rank 0 writes the training state after every epoch and, when asked, after a batch."""

    def __init__(self, run_dir: Path, history: _History, meta: dict[str, Any], start: _Start, fresh: bool) -> None:
        self.run_dir, self.history, self.meta, self.start, self.fresh = run_dir, history, meta, start, fresh

    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        if self.fresh and trainer.is_global_zero and (self.run_dir / STATE_DIR).exists():
            log.warning("%s: starting over; the training state of the earlier run there is discarded", self.run_dir)
            shutil.rmtree(self.run_dir / STATE_DIR, ignore_errors=True)  # it must not be resumed into this run

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if _REQUESTED.is_set() and batch_idx + 1 < trainer.num_training_batches:  # on the last batch: the epoch's own save
            _REQUESTED.clear()
            skip = self.start.batch if trainer.current_epoch == 0 else 0
            self.save(trainer, module, self.start.epoch + trainer.current_epoch, skip + batch_idx + 1)

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        _REQUESTED.clear()
        self.save(trainer, module, self.start.epoch + trainer.current_epoch + 1, 0)

    def save(self, trainer: L.Trainer, module: L.LightningModule, epoch: int, batch: int) -> None:
        model: torch.nn.Module = module.model
        step = self.start.step + trainer.global_step
        bad = _not_finite(model, trainer.optimizers[0])  # every process checks its copy, so all stop together
        if bad:
            raise DivergenceError(f"{len(bad)} weight tensor(s) are not finite after step {step} ({bad[0]}, ...); lower the learning rate")
        if not trainer.is_global_zero:
            return
        tensors = {f"model.{k}": v.detach().cpu().clone() for k, v in model.state_dict().items()}
        opt_tensors, opt_json = _optimizer_capture(trainer.optimizers[0])
        tensors.update({k: v.detach().cpu().clone() for k, v in opt_tensors.items()})
        rng_tensors, rng_json = _rng_capture()
        tensors.update(rng_tensors)
        doc = {"epoch": epoch, "batch": batch, "global_step": step, "seconds": self.history.seconds(), **self.meta,
               "history": self.history.rows, "optimizer": opt_json,
               "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict(), "rng": rng_json}  # fmt: skip
        _write_state(self.run_dir, tensors, doc)
        write_json(self.run_dir / HISTORY, self.history.rows)


# ----------------------------------------------------------------------------- entry points


def request_checkpoint() -> None:
    """Ask a running :func:`fit` (this process) to write its state at the end of the current batch.

    ``kill -USR1 PID`` does the same from outside. Within the last batch of an epoch the
    request is served by that epoch's own state.
    """
    _REQUESTED.set()


@contextmanager
def _checkpoint_signal() -> Iterator[None]:
    """While training, SIGUSR1 calls :func:`request_checkpoint` and SIGTERM raises KeyboardInterrupt as
    SIGINT does (Lightning's graceful shutdown, exit status 1; POSIX, main thread only)."""
    from .safeio import sigterm_as_interrupt

    if not hasattr(signal, "SIGUSR1") or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: _REQUESTED.set())
    try:
        with sigterm_as_interrupt():  # before Lightning's own SIGTERM handler, which calls it
            yield
    finally:
        signal.signal(signal.SIGUSR1, previous if previous is not None else signal.SIG_DFL)


def is_global_zero() -> bool:
    """Whether this process is rank 0 of a multi-process run (True when alone): the one that writes files."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    for var in ("RANK", "SLURM_PROCID"):  # torchrun, SLURM
        if var in os.environ:
            return int(os.environ[var]) == 0
    return os.environ.get("NODE_RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"  # Lightning's launcher


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch: call it before ``create_model`` so the initial weights repeat."""
    L.seed_everything(seed, workers=True, verbose=False)


def _quiet_lightning() -> None:
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated.*")


def _as_json(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(value))


def _check_same_run(where: Path, stored: tuple[str, Any, TrainConfig], model: torch.nn.Module, cfg: TrainConfig) -> None:
    """ConfigError unless ``model`` and ``cfg`` are the run's stored task, model and recipe (runtime fields aside)."""
    task, config = task_of(model).name, model.config  # type: ignore[union-attr]
    if stored[0] != task or _as_json(asdict(stored[1])) != _as_json(asdict(config)):
        raise ConfigError(f"{where}: the run was trained as {stored[0]} {stored[1]}, the model given is {task} {config}")
    old, new = asdict(stored[2]), asdict(cfg)
    diff = [f"{k}: {old[k]!r} stored, {new[k]!r} given" for k in old if k not in RUNTIME_FIELDS and old[k] != new[k]]
    if diff:
        raise ConfigError(f"{where}: the resumed run's recipe differs ({'; '.join(diff)})")


def _finished(model: torch.nn.Module, cfg: TrainConfig, run: Path) -> list[dict[str, float]]:
    """``resume=True`` on a run with no state left: it finished; load its weights and history."""
    if not (run / CONFIG).is_file():
        raise CheckpointError(f"{run}: nothing to resume (no {STATE_DIR}/ and no finished run)")
    doc = read_config(run)
    if not isinstance(doc.get("train"), dict):
        raise CheckpointError(f"{run / CONFIG}: no 'train' entry: not a run written by fit")
    defaults = asdict(TrainConfig())
    _check_same_run(run / CONFIG, (doc["task"], doc["model"], TrainConfig(**{**defaults, **doc["train"]})), model, cfg)
    trained, _ = load_checkpoint(run)
    model.load_state_dict(trained.state_dict())
    log.info("%s: training already finished (%d epochs); nothing to resume", run, cfg.epochs)
    path = run / HISTORY
    return json.loads(path.read_text()) if path.is_file() else []


def _load_model(model: torch.nn.Module, tensors: dict[str, Tensor], state: TrainState) -> None:
    weights = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    expected = model.state_dict()
    wrong = sorted(expected.keys() ^ weights.keys()) + [k for k in expected if k in weights and weights[k].shape != expected[k].shape]
    if wrong:
        raise CheckpointError(f"{state.path / STATE_TENSORS}: weights do not fit the model ({len(wrong)} differ, e.g. {wrong[:2]})")
    model.load_state_dict(weights)


def fit(
    model: torch.nn.Module,
    train_set: Dataset,
    val_set: Dataset | None,
    cfg: TrainConfig,
    run_dir: str | Path | None = None,
    progress: bool = True,
    extra_config: dict[str, Any] | None = None,
    resume: bool = False,
    objective: Objective | None = None,
) -> list[dict[str, float]]:
    """Train ``model`` (of any task) in place; returns the per-epoch history.

    With ``run_dir`` it writes the training state after every epoch (``checkpoints/``),
    ``history.json``, and at the end ``model.safetensors`` and ``config.json``, then removes the state.
    ``config.json`` records the task, the model, the recipe (``"train"``) and what the model was trained
    on (``"data"``: the training set's name, seed and preprocessing, see :meth:`Task.data_record`, with
    the split sizes); entries of ``extra_config`` are stored beside them (its ``"data"`` is merged in).
    ``resume=True`` continues the run in ``run_dir`` from its newest state; ``model``,
    ``cfg`` (but ``accelerator`` and ``num_workers``), the training set's size and
    ``extra_config`` (when given) must be the run's, else :class:`ConfigError`. A finished
    run is loaded into ``model`` and not trained again. With ``devices * num_nodes > 1``
    Lightning runs DDP; only rank 0 writes files.

    ``objective(out, batch) -> (loss, target)`` replaces the model's own loss: ``out`` is the model's
    output on the batch's inputs, ``target`` what the logged accuracy compares the logits with
    (:func:`selfcam.distill.distill` trains on another model's logits this way). It is not recorded:
    say what it was in ``extra_config``, and give the same one when resuming.

    With ``cfg.map_loss_weight > 0`` (a task whose training items carry boxes or masks, ``Task.has_masks``; else
    :class:`ConfigError`) the items that carry a mask are :func:`mask_flags` and their count is recorded as
    ``"data"["masked_items"]``; the task's cell grid for the map loss (``Task.map_cells``) is measured on ``model`` as given,
    before a resumed run's weights are loaded, so that a resumed run uses the same one.
    """
    _quiet_lightning()
    run = Path(run_dir) if run_dir is not None else None
    if resume and run is None:
        raise ConfigError("resume=True needs the run_dir to resume from")
    check_accelerator(cfg.accelerator, "accelerator")  # Lightning's own refusal is a traceback
    if run_dir is not None and not resume:
        check_own_output(run_dir, "run_dir")  # selfcam writes (and prunes checkpoints/) only in what it created
    task = task_of(model)
    task.check_dataset(train_set, "training data")
    record = {**task.data_record(train_set), "train_size": len(train_set), "val_size": len(val_set) if val_set is not None else 0}  # type: ignore[arg-type]
    cells = None
    if cfg.map_loss_weight > 0:
        cells = _map_supervision(task, model, train_set, cfg.map_loss_map)
        record["masked_items"] = int(mask_flags(len(train_set), cfg.mask_fraction, cfg.seed).sum())  # type: ignore[arg-type]
    given = dict(extra_config or {})
    extra = _as_json({**given, "data": {**record, **given.get("data", {})}})
    seed_all(cfg.seed)
    state = latest_state(run) if resume and run is not None else None
    if resume and run is not None and state is None:
        return _finished(model, cfg, run)
    tensors: dict[str, Tensor] = {}
    if state is not None:
        _check_same_run(state.path / STATE_JSON, (state.task, state.model, state.train), model, cfg)
        n_train = len(train_set)  # type: ignore[arg-type]
        if state.n_train != n_train or (extra_config is not None and extra != state.extra):
            raise ConfigError(f"{state.path / STATE_JSON}: the run had {state.n_train} training samples and extra config "
                              f"{state.extra}; given {n_train} and {extra}")  # fmt: skip
        extra = state.extra
        tensors = _read_tensors(state)
        _load_model(model, tensors, state)
    start = _Start(state.epoch, state.batch, state.global_step, state.seconds) if state else _Start()
    history = _History(start, state.history if state else None)
    writer = is_global_zero()
    if state is None or not state.finished:
        with _kernel_flags():
            writer = _train(model, train_set, val_set, cfg, run, progress, extra, start, history, state, tensors, objective, cells)
    model.eval()
    if run is not None and writer:
        from .safeio import held_signals

        with held_signals():  # SIGINT / SIGTERM wait for the final save; SIGKILL: still resumable (_drop_states)
            write_json(run / HISTORY, history.rows)
            save_checkpoint(model, run, train=asdict(cfg), **extra)
            _drop_states(run)
    return history.rows


def _compiled(model: torch.nn.Module) -> Any:
    """``torch.compile(model)``; ConfigError when this torch cannot compile at all (e.g. an unsupported Python)."""
    try:
        return torch.compile(model)
    except RuntimeError as e:
        raise ConfigError(f"compile: torch.compile is unavailable here ({e}); train without --compile") from e


@contextmanager
def _kernel_flags() -> Iterator[None]:
    """While training: the deterministic kernels Lightning's ``deterministic=True`` asks for, without PyTorch's NaN fill
    of every new tensor that comes with them (``torch.utils.deterministic.fill_uninitialized_memory``: a debugging aid
    that writes each allocation once more and changes no result of code that reads only what it wrote). The caller's
    settings come back afterwards: Lightning leaves deterministic algorithms switched on for the rest of the process."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.utils.deterministic.fill_uninitialized_memory, torch.backends.cudnn.benchmark)  # fmt: skip
    torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.utils.deterministic.fill_uninitialized_memory = saved[2]  # type: ignore[attr-defined]
        torch.backends.cudnn.benchmark = saved[3]


def _map_supervision(task: Task, model: torch.nn.Module, train_set: Dataset, which: str = "self") -> CellGrid | None:
    """:class:`ConfigError` unless the map loss applies to ``task``, its map ``which`` and ``train_set`` has boxes
    (or masks); the backbone's cell grid at the training images' size (None: the maps are upsampled as ``F.interpolate`` does)."""
    if not task.supervises_maps:
        raise ConfigError(f"map_loss_weight supervises image, attribute and active-speaker maps; the {task.name} task has none to supervise")
    kinds = task.supervised_maps
    if which not in kinds:
        raise ConfigError(f"map_loss_map {which!r}: the {task.name} task supervises {', '.join(kinds)} only")
    if not task.has_masks(train_set):
        source = getattr(train_set, "spec", None) or type(train_set).__name__
        raise ConfigError(f"map_loss_weight needs training data with ground-truth boxes (cluttered-digits, shortcut-digits), "
                          f"attribute masks (synthetic-faces) or mouth boxes (speaker-clips); "
                          f"{source} has none")  # fmt: skip
    return task.map_cells(model, tuple(train_set[0][0].shape[-2:]))


def _train(model: torch.nn.Module, train_set: Dataset, val_set: Dataset | None, cfg: TrainConfig, run: Path | None,
           progress: bool, extra: dict[str, Any], start: _Start, history: _History, state: TrainState | None,
           tensors: dict[str, Tensor], objective: Objective | None = None, cells: CellGrid | None = None) -> bool:  # fmt: skip
    """Run Lightning from ``start`` to the last epoch; ``state``/``tensors``: what a resumed run restores;
    ``cells``: the cell grid of the map loss. Returns whether this process is rank 0."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    n_train = len(train_set)  # type: ignore[arg-type]
    if cfg.map_loss_weight > 0:
        train_set = _MaskFlags(train_set, mask_flags(n_train, cfg.mask_fraction, cfg.seed))
    total = cfg.epochs * steps_per_epoch(n_train, cfg.batch_size, cfg.world_size)
    callbacks: list[L.Callback] = [history]
    if run is not None:
        meta = {"n_train": n_train, "task": task_of(model).name, "model": asdict(model.config), "train": asdict(cfg), "extra": extra}  # type: ignore[call-overload]
        callbacks.append(_StateWriter(run, history, meta, start, fresh=state is None))
    if progress:
        callbacks.append(L.pytorch.callbacks.RichProgressBar(leave=True))
    trainer = L.Trainer(
        max_epochs=cfg.epochs - start.epoch, accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes,
        strategy="ddp" if cfg.world_size > 1 else "auto", use_distributed_sampler=False, reload_dataloaders_every_n_epochs=1,
        limit_val_batches=1.0 if val_set is not None else 0, logger=False, enable_checkpointing=False,
        enable_progress_bar=progress, enable_model_summary=False, deterministic=True, callbacks=callbacks,
        num_sanity_val_steps=0, default_root_dir=run, precision=cfg.precision,  # type: ignore[arg-type]
        # Lightning's SLURM auto-requeue saves pickled checkpoints on SIGUSR1: ours handles SIGUSR1 instead
        plugins=[SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else None,
    )  # fmt: skip
    if cfg.frozen_at(start.epoch):  # the frozen backbone is in eval mode on purpose
        warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode at the start of training.*")
    if state is not None:
        _rng_restore(tensors, state.rng)
    _REQUESTED.clear()
    restore = (state, tensors) if state is not None else None
    module = SelfcamModule(model, cfg, total, restore, objective, cells)
    try:
        with _checkpoint_signal():
            trainer.fit(module, datamodule=_RunData(train_set, val_set, cfg, start))
    except DivergenceError as e:
        last = _state_dirs(run / STATE_DIR) if run is not None else []
        where = f"; the last good state is {last[0][1]}" if last else ""
        raise DivergenceError(f"{e}{where}") from None
    finally:
        module.set_frozen(False)  # the model goes back with its own requires_grad
    return trainer.is_global_zero
