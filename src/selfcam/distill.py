"""Explain a model without changing it (docs/distill.md).

``distill(teacher, method, train_set, ...)`` puts the ``method`` head (``se``, ``lfi``, ``lfi-light``,
``abn``...) on the teacher's own backbone, with the teacher's weights, frozen (no gradient, eval-mode
BatchNorm: weights and running statistics stay as they are), and trains only the head to reproduce
the teacher's outputs: ``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` on the logits (and
on ABN's auxiliary logits), the teacher's logits computed on the fly in eval mode. No labels are used:
any image data will do, the labels of a selfcam dataset are ignored. The teacher is never changed.

The teacher is a selfcam model (a :class:`~selfcam.model.SelfExplainer`, e.g. a ``plain`` run), a run
directory, or any classifier module (torchvision, timm, your own), which :func:`selfcam.wrap` cuts
as usual. The result is a normal run (``config.json`` + ``model.safetensors``, through
:func:`selfcam.fit`) whose config records under ``"distill"`` what it was distilled from.
``wrap(model, "plain")`` keeps the predictions of a GAP + linear classifier exactly, with no training
(its map is the CAM); distilling gives the other heads' maps with the model's predictions.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .checkpoint import check_own_output, load_checkpoint, write_json
from .errors import CheckpointError, ConfigError
from .heads import HEADS
from .model import SelfExplainer, init_classifier, make_head

__all__ = ["DISTILL_JSON", "DistillResult", "agreement", "compare", "distill", "distill_loss", "load_teacher", "model_name",
           "student_for", "teacher_logits"]

DISTILL_JSON = "distill.json"  # the held-out agreement, written beside the run's config
OBJECTIVE = "T^2 * KL(softmax(teacher/T) || softmax(student/T)) on the logits (and ABN's auxiliary logits); no labels"


@dataclass
class DistillResult:
    """What :func:`distill` returns: the trained ``model`` (eval mode), the per-epoch ``history`` (its
    ``*_acc`` columns are agreement with the teacher) and ``metrics``: :func:`compare` on the held-out
    data, with its ``split`` and ``data`` name and ``agreement_at_start`` (the new head before training)."""

    model: SelfExplainer
    history: list[dict[str, float]]
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def agreement(self) -> float | None:
        """Top-1 agreement with the teacher on the held-out data, in [0, 1] (None without held-out data)."""
        return self.metrics.get("agreement")


def distill_loss(student: Tensor, teacher: Tensor, temperature: float = 2.0) -> Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, mean over the batch: logits ``(N, C)`` -> scalar."""
    t = float(temperature)
    log_s, log_t = F.log_softmax(student / t, dim=1), F.log_softmax(teacher.detach() / t, dim=1)
    return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * (t * t)


def agreement(a: Tensor, b: Tensor) -> float:
    """Share of rows of two logit tensors ``(N, C)`` whose arg-max (first one on ties) is the same class."""
    if a.shape != b.shape or a.dim() != 2 or len(a) == 0:
        raise ConfigError(f"agreement compares two logit tensors (N, C) of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return float((a.argmax(dim=1) == b.argmax(dim=1)).double().mean())


def teacher_logits(teacher: nn.Module, x: Tensor) -> Tensor:
    """The teacher's logits ``(N, C)`` on ``x``, without gradient: ``.logits`` of a selfcam model, or the
    logits a classifier returns (a tensor, the first tensor of a tuple, a dict's ``"logits"``)."""
    from .wrap import _logits_of

    with torch.no_grad():
        logits, where = _logits_of(teacher(x))
    if logits is None or logits.dim() != 2 or len(logits) != len(x):
        raise ConfigError(f"the teacher must return logits (N, classes); it returned {where}")
    return logits


def _device(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def student_for(teacher: nn.Module | str, method: str, head_kwargs: dict[str, Any] | None = None, **wrap_kwargs: Any) -> SelfExplainer:
    """A ``method`` model on a copy of ``teacher``'s backbone with its weights (the teacher is not changed).

    A selfcam model: its backbone (``teacher.backbone``, BatchNorm statistics included) with a new
    head, its config with the new method, so the run rebuilds as any other; the head's linear layer
    starts as the teacher's classifier. Any other module, or a model name (``"torchvision:resnet18"``
    with ``pretrained=``): ``selfcam.wrap(teacher, method, **wrap_kwargs)``.
    """
    head_kwargs = dict(head_kwargs or {})
    head_cls = HEADS.get(method)
    if head_cls is None:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(m for m, h in HEADS.items() if h.task == 'image')}")
    if head_cls.task != "image":
        raise ConfigError(f"distill trains heads of single-label image classifiers; {method!r} is a head of the {head_cls.task} task")
    if not isinstance(teacher, SelfExplainer):
        from .wrap import wrap

        return wrap(teacher, method, **wrap_kwargs, **head_kwargs)
    if wrap_kwargs:
        raise ConfigError(f"wrap options {sorted(wrap_kwargs)} are for a classifier module; the teacher is already a selfcam model")
    if teacher.task != "image":
        raise ConfigError(f"distill takes single-label image classifiers; the teacher is a model of the {teacher.task} task")
    backbone = copy.deepcopy(teacher.backbone)
    config = replace(teacher.config, method=method, head_kwargs=head_kwargs)
    head = make_head(method, backbone, config.num_classes, head_kwargs).to(_device(backbone))
    init_classifier(head, getattr(teacher.head, "fc", None))
    student = SelfExplainer(backbone, head, config)
    student.wrap_info = teacher.wrap_info
    return student


def model_name(teacher: Any) -> str | None:
    """``teacher`` when it names a torchvision or timm classifier (``"torchvision:resnet18"``) and is no path, else None."""
    text = str(teacher) if isinstance(teacher, (str, Path)) else ""
    return text if text.startswith(("torchvision:", "timm:")) and not Path(text).exists() else None


def load_teacher(teacher: str | Path, *, model: Any = None, pretrained: str | Path | None = None,
                 model_kwargs: dict[str, Any] | None = None) -> tuple[nn.Module, str, dict[str, Any] | None]:  # fmt: skip
    """``(module in eval mode, source, run config or None)`` of a teacher named by text: a run directory
    (``model=``: the constructor of a run of your own class), or ``torchvision:NAME`` / ``timm:NAME``
    built with ``model_kwargs`` and its trained weights ``pretrained`` (a file, loaded strictly)."""
    name = model_name(teacher)
    if name is not None:
        if pretrained is None:
            raise ConfigError(f"teacher {name}: a model given by name has random weights; give its trained weights (pretrained=FILE)")
        from .pretrained import load_pretrained
        from .wrap import named_model

        module = named_model(name, dict(model_kwargs or {}))
        load_pretrained(module, pretrained)
        return module.eval(), f"{name} with weights {pretrained}", None
    if pretrained is not None or model_kwargs:
        raise ConfigError("pretrained= and model_kwargs= build a teacher given by name (torchvision:NAME, timm:NAME); a run has its weights")
    if not Path(teacher).is_dir():
        raise CheckpointError(f"{teacher}: teacher run not found (a run directory, or torchvision:NAME / timm:NAME with its weights)")
    module, doc = load_checkpoint(teacher, model=model)
    return module, str(Path(teacher).resolve()), doc


def _objective(teacher: nn.Module, temperature: float) -> Any:
    """``fit``'s objective: the distillation loss against the teacher on the batch's images, and the
    teacher's classes as the accuracy target (so the logged accuracy is agreement)."""

    def objective(out: Any, batch: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        x = batch[0]
        if _device(teacher) != x.device:  # Lightning moved the student, not the teacher
            teacher.to(x.device)
        t = teacher_logits(teacher, x)
        loss = distill_loss(out.logits, t, temperature)
        if out.aux_logits is not None:  # ABN: both branches, as its own loss trains both
            loss = loss + distill_loss(out.aux_logits, t, temperature)
        return loss, t.argmax(dim=1)

    return objective


def compare(student: nn.Module, teacher: nn.Module, dataset: Dataset, batch_size: int = 256,
            temperature: float = 1.0) -> dict[str, Any]:  # fmt: skip
    """Top-1 agreement of ``student`` with ``teacher`` on ``dataset`` (both in eval mode, on the student's
    device), the mean distillation loss at ``temperature`` and, where the items carry integer labels,
    both models' accuracy. Returns ``{"agreement", "n", "kl", "student_accuracy", "teacher_accuracy"}``."""
    student_mode, teacher_mode = student.training, teacher.training
    student.eval(), teacher.eval()
    device = _device(student)
    teacher.to(device)
    s_all, t_all, y_all = [], [], []
    try:
        with torch.no_grad():
            for batch in DataLoader(dataset, batch_size):
                bare = isinstance(batch, Tensor)  # a dataset of bare images
                x = (batch if bare else batch[0]).to(device)
                s_all.append(teacher_logits(student, x).cpu())
                t_all.append(teacher_logits(teacher, x).cpu())
                y = batch[1] if not bare and len(batch) > 1 else None
                y_all.append(y if isinstance(y, Tensor) and y.dim() == 1 and not y.is_floating_point() else None)
    finally:
        student.train(student_mode), teacher.train(teacher_mode)
    if not s_all:
        raise ConfigError("the held-out data is empty: no agreement to measure")
    s, t = torch.cat(s_all), torch.cat(t_all)
    doc: dict[str, Any] = {"agreement": agreement(s, t), "n": len(s), "kl": float(distill_loss(s, t, temperature) / temperature**2),
                           "student_accuracy": None, "teacher_accuracy": None}  # fmt: skip
    if all(y is not None for y in y_all):
        y = torch.cat(y_all)  # type: ignore[arg-type]
        doc["student_accuracy"] = float((s.argmax(1) == y).double().mean())
        doc["teacher_accuracy"] = float((t.argmax(1) == y).double().mean())
    return doc


class _Unlabelled(Dataset):
    """A dataset of bare images (items ``x`` or ``(x,)``) as items ``(x, -1)``: ``fit`` unpacks a batch into
    inputs and targets before the objective, which ignores the targets. Other attributes (``spec``,
    ``size``, ``mean``... that the run records) are the dataset's."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        item = self.dataset[i]
        return (item[0] if isinstance(item, (tuple, list)) else item), -1

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def _with_targets(dataset: Dataset | None) -> Dataset | None:
    """``dataset``, or :class:`_Unlabelled` around it when its items are bare images."""
    if dataset is None or len(dataset) == 0:  # type: ignore[arg-type]
        return dataset
    item = dataset[0]
    return _Unlabelled(dataset) if isinstance(item, Tensor) or (isinstance(item, (tuple, list)) and len(item) == 1) else dataset


def _state_sha256(module: nn.Module) -> str:
    """SHA-256 over the module's state dict (names, shapes, dtypes, bytes): which weights the teacher had."""
    h = hashlib.sha256()
    for name, value in module.state_dict().items():
        v = value.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{tuple(v.shape)}:{v.dtype};".encode())
        h.update(v.view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def _describe_teacher(teacher: nn.Module, source: str | None) -> dict[str, Any]:
    record: dict[str, Any] = {"source": source or f"user:{type(teacher).__name__}", "sha256": _state_sha256(teacher)}
    if isinstance(teacher, SelfExplainer):
        record["model"] = asdict(teacher.config)
    return record


def _check_data(student: SelfExplainer, dataset: Dataset | None, what: str) -> None:
    """ConfigError when ``dataset`` says it has another class or channel count than the model."""
    if dataset is None:
        return
    have = student.config.num_classes, student.config.in_chans
    want = getattr(dataset, "num_classes", None), getattr(dataset, "in_chans", None)
    source = getattr(dataset, "spec", None) or type(dataset).__name__
    if want[0] is not None and want[0] != have[0]:
        raise ConfigError(f"the teacher has {have[0]} classes but the {what} {source} has {want[0]}: distill on images "
                          f"of the teacher's classes")  # fmt: skip
    if want[1] is not None and want[1] != have[1]:
        raise ConfigError(f"the teacher takes {have[1]} input channel(s) but the {what} {source} has {want[1]}")


def distill(
    teacher: nn.Module | str | Path,
    method: str,
    train_set: Dataset,
    val_set: Dataset | None = None,
    test_set: Dataset | None = None,
    cfg: Any = None,
    *,
    temperature: float = 2.0,
    run_dir: str | Path | None = None,
    progress: bool = True,
    head_kwargs: dict[str, Any] | None = None,
    source: str | None = None,
    model: Any = None,
    pretrained: str | Path | None = None,
    model_kwargs: dict[str, Any] | None = None,
    resume: bool = False,
    **wrap_kwargs: Any,
) -> DistillResult:
    """Train a ``method`` head on ``teacher``'s frozen backbone to reproduce ``teacher``'s outputs.

    ``teacher``: a selfcam model; a run directory (``model=``: the constructor of a run of your own
    class, as for :func:`selfcam.load_checkpoint`); ``"torchvision:NAME"`` / ``"timm:NAME"`` with its
    trained weights ``pretrained=FILE`` (and ``model_kwargs``, e.g. ``{"num_classes": 10}``); or a
    classifier module. The last two are wrapped (:func:`selfcam.wrap`, with ``wrap_kwargs``:
    ``features=``, ``classifier=``, ``input_size=``...). ``train_set`` / ``val_set``:
    images (``(C, H, W)`` first in each item; labels, if any, are not used). ``test_set``: held-out
    images for the reported agreement (default ``val_set``). ``cfg``: a :class:`selfcam.TrainConfig`
    (default: 3 epochs); ``freeze_backbone`` is always on. ``temperature``: ``T`` of the loss.
    ``run_dir``: where the run is written (``config.json`` records ``"distill"``: the teacher's source,
    its weights' SHA-256, the temperature), with ``distill.json`` (the held-out metrics).
    ``source``: how to name the teacher in the record (default: its path, or ``user:ClassName``).
    ``resume=True`` continues an interrupted run in ``run_dir`` from its newest state (:func:`selfcam.fit`'s
    resume): the same teacher (checked by its weights' SHA-256), method, data sizes and ``cfg`` as the run's, else
    :class:`ConfigError`; a finished run is loaded, not trained again, and its ``distill.json`` is kept as it is.

    The teacher's weights, BatchNorm statistics, train/eval mode and device are as before.
    """
    from .train import TrainConfig, fit, seed_all

    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < float("inf"):
        raise ConfigError(f"temperature must be a number > 0, got {temperature!r}")
    if resume and run_dir is None:
        raise ConfigError("resume=True needs the run_dir to resume from")
    if run_dir is not None and not resume:
        check_own_output(run_dir, "run_dir")  # before any work: selfcam writes only into what it created
    name = None  # a teacher given by name: the student is wrapped from the name, so its run rebuilds itself
    if isinstance(teacher, (str, Path)):
        name = model_name(teacher)
        if name is not None:
            wrap_kwargs.update(pretrained=pretrained, model_kwargs=model_kwargs)
        teacher, where, _ = load_teacher(teacher, model=model, pretrained=pretrained, model_kwargs=model_kwargs)
        source = source or where
    elif model is not None or pretrained is not None:
        raise ConfigError("model= and pretrained= build the teacher of a run directory or a model name; the teacher given is a module")
    if not isinstance(teacher, nn.Module):
        raise ConfigError(f"the teacher must be an nn.Module or a run directory, got {type(teacher).__name__}")
    cfg = cfg if cfg is not None else TrainConfig(epochs=3)
    if not isinstance(cfg, TrainConfig):
        raise ConfigError(f"cfg must be a selfcam.TrainConfig, got {type(cfg).__name__}")
    cfg = replace(cfg, freeze_backbone=True, head_epochs=0, backbone_lr_scale=1.0)
    device, mode = _device(teacher), teacher.training
    teacher.eval()
    try:
        seed_all(cfg.seed)  # the new head's initial weights repeat
        student = student_for(name or teacher, method, head_kwargs, **wrap_kwargs)
        for data, what in ((train_set, "training data"), (val_set, "validation data"), (test_set, "held-out data")):
            _check_data(student, data, what)
        train_set, val_set = _with_targets(train_set), _with_targets(val_set)  # type: ignore[assignment]
        record = {"teacher": _describe_teacher(teacher, source), "method": method, "temperature": float(temperature),
                  "objective": OBJECTIVE, "frozen_backbone": True}  # fmt: skip
        held_out = test_set if test_set is not None else val_set
        start = compare(student, teacher, held_out)["agreement"] if held_out is not None else None  # the head as it starts
        finished = resume and (Path(run_dir) / DISTILL_JSON).is_file()  # type: ignore[arg-type]
        history = fit(student, train_set, val_set, cfg, run_dir, progress=progress, extra_config={"distill": record},
                      resume=resume, objective=_objective(teacher, float(temperature)))  # fmt: skip
        metrics: dict[str, Any] = {}
        if held_out is not None:
            metrics = {"split": "test" if test_set is not None else "val", **compare(student, teacher, held_out)}
            metrics.update(agreement_at_start=start, data=getattr(held_out, "spec", None))
        if run_dir is not None and metrics and not finished:
            write_json(Path(run_dir) / DISTILL_JSON, {"distill": record, "held_out": metrics, "history": history})
    finally:
        teacher.to(device).train(mode)
    return DistillResult(student.eval(), history, metrics)

