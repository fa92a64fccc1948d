"""The task registry: what differs between image, attribute, video and audio-visual runs.

A :class:`Task` says which config type builds its models, how a batch unpacks into model inputs
and targets, what accuracy means, which built-in data it trains on by default, which inputs
trace its model (export, tests), and what of a dataset its runs record. Everything else (``fit``,
checkpoints, the CLI) is shared and asks the task. A new task is one file: a subclass with
``@register_task("name")``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, ClassVar

from torch import Tensor, nn
from torch.utils.data import Dataset

from ..checkpoint import dataclass_from_json
from ..errors import ConfigError

__all__ = ["MAPS_NOTE", "TASKS", "Task", "TaskGraph", "clip_options", "get_task", "register_task", "task_of"]

TASKS: dict[str, "Task"] = {}
MAPS_NOTE = "in [0, 1], at input resolution"


@dataclass(frozen=True)
class TaskGraph:
    """How a task's models look as an ONNX graph (:mod:`selfcam.export`).

    ``inputs``: the graph's input names, in the order ``model.explain`` takes them. ``outputs``: its
    output names; each is the attribute of that name of ``explain``'s result unless ``derived`` maps it
    to a function of the result. ``notes``: text stored after an output's shape in the metadata.
    ``metadata``: more entries for ``metadata_props``.
    """

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    notes: dict[str, str] = field(default_factory=dict)
    derived: dict[str, Callable[[Any], Tensor]] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 1 <= len(self.inputs) <= 2 or not self.outputs:  # the export wrapper takes one or two tensors
            raise ConfigError(f"an ONNX graph has one or two inputs and at least one output, got {self.inputs} -> {self.outputs}")


def clip_options(record: dict[str, Any], generators: tuple[str, ...]) -> dict[str, Any]:
    """``{"frames": T}`` when a run records its clip length and its data takes one (the clip generators
    named, or ``ava:DIR``); ``{}`` otherwise."""
    name, frames = str(record.get("name")), record.get("frames")
    return {"frames": frames} if frames and (name in generators or name.startswith("ava:")) else {}


def register_task(name: str) -> Callable[[type["Task"]], type["Task"]]:
    """Class decorator: register one instance of the task under ``name``."""

    def deco(cls: type[Task]) -> type[Task]:
        cls.name = name
        TASKS[name] = cls()
        return cls

    return deco


def get_task(name: str) -> "Task":
    """The registered task ``name``; :class:`ConfigError` listing the known ones otherwise."""
    from . import _load

    _load(name)
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]


def task_of(model: nn.Module) -> "Task":
    """The task of a model built by selfcam (its ``task`` attribute names it)."""
    name = getattr(model, "task", None)
    if not isinstance(name, str) or not hasattr(model, "config"):
        raise ConfigError(f"{type(model).__name__} is not a selfcam model (it needs .task and .config)")
    return get_task(name)


class Task:
    """One kind of run. Subclasses set the class attributes and :meth:`build`; the rest has defaults.

    ``dataset_kind``: the ``task`` attribute of the datasets it trains on; ``accuracy``: the kind of the
    training accuracy (``"multiclass"`` or ``"multilabel"``, :func:`selfcam.train.correct_count`); ``default_data``: the built-in source used when no data is given;
    ``graph``: its models' ONNX inputs and outputs (``None``: not exportable); ``metrics``: what
    :meth:`evaluate` scores.
    """

    name: ClassVar[str] = "task"
    config_type: ClassVar[type]
    dataset_kind: ClassVar[str] = "multiclass"
    accuracy: ClassVar[str] = "multiclass"
    default_data: ClassVar[str] = ""
    methods: ClassVar[tuple[str, ...]] = ("se",)  # heads a model of this task may have
    graph: ClassVar[TaskGraph | None] = None
    metrics: ClassVar[tuple[str, ...]] = ()  # what :meth:`evaluate` can compute
    default_metrics: ClassVar[tuple[str, ...] | None] = None  # what it computes when none are named (None: all)
    shards: ClassVar[bool] = False  # whether :meth:`evaluate` can share the items between processes
    # the map loss (selfcam.train, TrainConfig.map_loss_weight): whether it applies, the maps it may
    # supervise (TrainConfig.map_loss_map), the place of the ground truth in an item (boxes or masks)
    supervises_maps: ClassVar[bool] = False
    supervised_maps: ClassVar[tuple[str, ...]] = ("self",)
    mask_item: ClassVar[int] = 2

    def has_masks(self, dataset: Any) -> bool:
        """Whether the items of ``dataset`` carry the ground truth of the map loss (at :attr:`mask_item`)."""
        item = dataset[0]
        return isinstance(item, (tuple, list)) and len(item) > self.mask_item

    def map_present(self, batch: Any) -> Tensor | None:
        """Which maps of :meth:`supervised_map` the map loss scores: a bool tensor over its leading dimensions
        (``(N, A)`` present attributes, ``(N, T)`` speaking frames), or None for all of them."""
        return None

    def map_cells(self, model: nn.Module, size: tuple[int, int]) -> Any:
        """Where the cells of the supervised maps sit in an input of ``size`` (:mod:`selfcam.cells`; None:
        upsampled as ``F.interpolate`` does): the backbone's cell grid."""
        backbone = getattr(model, "backbone", None)
        return backbone.cell_grid(size) if hasattr(backbone, "cell_grid") else None

    def build(self, config: Any) -> nn.Module:
        """The model ``config`` describes (random weights)."""
        raise NotImplementedError

    def create(self, dataset: Any, method: str, backbone: str, backbone_kwargs: dict[str, Any],
               head_kwargs: dict[str, Any]) -> nn.Module:  # fmt: skip
        """A new model for ``dataset`` (its classes, channels and clip length) from CLI-style options."""
        if method not in self.methods:
            raise ConfigError(f"the {self.name} task has the head(s) {', '.join(self.methods)}, got {method!r}")
        try:
            return self.new_model(dataset, backbone, dict(backbone_kwargs), dict(head_kwargs))
        except TypeError as e:
            raise ConfigError(f"bad option for the {self.name} model: {e}") from e

    def new_model(self, dataset: Any, backbone: str, backbone_kwargs: dict[str, Any], options: dict[str, Any]) -> nn.Module:
        """:meth:`create` once the head is known to be this task's: ``options`` are the head's (or model's) options."""
        raise NotImplementedError

    def evaluate(self, models: dict[str, nn.Module], dataset: Dataset, cfg: Any, progress: Any = None,
                 devices: int = 1) -> dict[str, Any]:  # fmt: skip
        """Score runs of this task on ``dataset`` with ``cfg`` (:class:`selfcam.evaluate.EvalConfig`, its metrics
        already chosen and checked): the metrics document family (:func:`selfcam.evaluate.evaluate_task`)."""
        raise ConfigError(f"the {self.name} task defines no evaluation")

    def config_from_json(self, d: Any, source: str) -> Any:
        """Validate the ``"model"`` entry of a config read from JSON."""
        return dataclass_from_json(self.config_type, d, source)

    def config_to_json(self, config: Any) -> dict[str, Any]:
        return asdict(config)

    def describe(self, config: Any) -> str:
        """A few words for messages: ``"se on resnet8"``."""
        method = getattr(config, "method", "se")
        return f"{self.name} model, {method} on {config.backbone}"

    def split_batch(self, batch: Any) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """``(model inputs, loss targets)`` of a batch; the first target is what accuracy compares the logits with."""
        return (batch[0],), (batch[1],)

    def example_inputs(self, model: nn.Module, batch: int = 2, size: int | None = None) -> tuple[Tensor, ...]:
        """Random inputs of the model's shape (``size``: the image side), to trace or test it."""
        raise NotImplementedError

    def check_dataset(self, dataset: Dataset, what: str = "data") -> None:
        """:class:`ConfigError` unless ``dataset`` is data of this task."""
        kind = getattr(dataset, "task", None)  # datasets that do not say (a TensorDataset) are taken as they are
        if kind is not None and kind != self.dataset_kind:
            source = getattr(dataset, "spec", None) or type(dataset).__name__
            raise ConfigError(f"{what} {source} holds {kind} data; the {self.name} task trains on {self.dataset_kind} data")

    def data_record(self, dataset: Any) -> dict[str, Any]:
        """What a run records of its training data: the preprocessing (input size, channels, mean / std,
        class names) and, where the dataset has them, its name and seed."""
        record: dict[str, Any] = {}
        for key, attr in (("name", "spec"), ("seed", "seed"), ("size", "size"), ("in_chans", "in_chans")):
            value = getattr(dataset, attr, None)
            if value is not None:
                record[key] = value
        for key in ("mean", "std"):
            if getattr(dataset, key, None) is not None:
                record[key] = [float(v) for v in getattr(dataset, key)]
        if getattr(dataset, "class_names", None) is not None:
            record["class_names"] = [str(c) for c in dataset.class_names]
        return record

    def data_options(self, record: dict[str, Any]) -> dict[str, Any]:
        """The :func:`selfcam.data.load_dataset` options that rebuild the data a run recorded
        (``record``: its config's ``"data"``) as it was trained on: clip length, sample rate,
        attribute names. Options only for the recorded source itself."""
        return {}

    def run_data(self, doc: dict[str, Any], split: str = "test", n: int | None = None, *, spec: str | None = None,
                 seed: int | None = None) -> tuple[str, Dataset]:  # fmt: skip
        """``(spec, dataset)``: ``split`` of the data a run was trained on, or of ``spec``, at the run's
        input size; a generator gets the run's data seed unless ``seed`` is given. ``doc``: a config as
        :func:`selfcam.load_checkpoint` returns it. :class:`ConfigError` when no data is named."""
        from ..data import load_dataset

        record = doc.get("data") if isinstance(doc.get("data"), dict) else {}
        recorded = record.get("name")
        spec = spec or recorded
        if not spec:
            raise ConfigError("the run records no dataset name (config.json data.name); name the data (--data)")
        if seed is None:
            seed = record.get("seed", (doc.get("train") or {}).get("seed", 0))
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ConfigError(f"the run's data seed must be an integer, got {seed!r}")
        options = self.data_options(record) if spec == recorded else {}
        return spec, load_dataset(spec, split, n, seed=seed, size=record.get("size"), **options)
