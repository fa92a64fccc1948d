"""Run directories, one format for every task: ``model.safetensors`` + ``config.json``.

``config.json`` (``format_version`` 2) holds::

    {"format": "selfcam-run", "format_version": 2, "selfcam_version": "...",
     "task": "image" | "attributes" | "video" | "asd",
     "model": {... the task's model config ...},
     "train": {... the recipe, when fit wrote the run ...},
     "data":  {... provenance and preprocessing, recorded by fit: name, seed, sizes,
               input size, channels, mean / std, class or attribute names, frames ...}}

Runs written before format 2 keep loading: an image or attribute run (no ``task``, its head names it)
and an ASD run (``"kind": "asd"`` with its config under ``"asd"``) are read as the same document.
Nothing is ever unpickled: weights are safetensors, configs JSON. :func:`atomic_write` is the one
writer of every file selfcam keeps (temporary file, rename), :func:`dataclass_from_json` the one
validator of a config object read from JSON.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
import tempfile
import types
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import MISSING, asdict, fields
from pathlib import Path
from typing import Any, Callable, TypeVar, Union, get_args, get_origin, get_type_hints

import torch
from safetensors import safe_open
from safetensors.torch import load, load_file, save_file
from torch import Tensor, nn

from . import __version__
from .errors import CheckpointError, ConfigError, OutputError, SelfcamError, check_options
from .safeio import MAX_FRAMES, MAX_IMAGE_SIZE, MAX_IN_CHANS, check_model_limits, check_regular, read_json

__all__ = ["CONFIG", "FORMAT", "FORMAT_VERSION", "WEIGHTS", "atomic_write", "check_own_output", "refuse_run_file", "dataclass_from_json", "load_checkpoint",
           "read_config", "read_safetensors", "run_info", "save_checkpoint", "user_model", "write_json"]  # fmt: skip

WEIGHTS, CONFIG = "model.safetensors", "config.json"
FORMAT, FORMAT_VERSION = "selfcam-run", 2
C = TypeVar("C")


def command_line() -> str:
    """The ``selfcam ...`` command line of this process, for the documents that record how they were made;
    empty when it is not the CLI (a Python call)."""
    return shlex.join(["selfcam", *sys.argv[1:]]) if Path(sys.argv[0]).name in ("selfcam", "__main__.py") else ""


def atomic_write(path: str | Path, write: Callable[[str], Any]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path`` (mode 0644)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, (KeyboardInterrupt, SystemExit, SelfcamError, MemoryError)) or not isinstance(e, Exception):
            raise
        if isinstance(e, OSError) or type(e).__name__ == "SafetensorError":  # disk full, quota, file too large
            raise OutputError(f"{path}: cannot write: {_why(e)}; nothing was written") from e
        raise


def _why(e: BaseException) -> str:
    """An OSError's strerror ("No space left on device"), else the message."""
    return getattr(e, "strerror", None) or str(e)


def check_own_output(out: str | Path, what: str = "--out") -> None:
    """OutputError unless ``out`` is absent, an empty folder, or a run folder selfcam wrote: its
    ``config.json`` is a selfcam run config, or its ``checkpoints/`` holds only selfcam training states
    (``step-N`` / ``.tmp-*``). selfcam writes (and deletes its own ``checkpoints/``) only there."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputError(f"{out}: {what} is a file, not a run folder; refused (nothing was written)")
    if not any(out.iterdir()):
        return
    with_config = (out / CONFIG).is_file()
    if with_config:
        try:
            doc = read_json(out / CONFIG, CheckpointError)
        except (CheckpointError, OSError):
            doc = None
        if isinstance(doc, dict) and (doc.get("format") == FORMAT or ("model" in doc and "format" not in doc)):
            return
    states = out / "checkpoints"
    entries = list(states.iterdir()) if states.is_dir() else []
    if entries and all(re.fullmatch(r"step-\d+|\.tmp-.*", e.name) for e in entries):
        return
    raise OutputError(f"{out}: {what} is a folder selfcam did not create (no selfcam {CONFIG}, no selfcam training "
                      "states in checkpoints/); refused, nothing in it is changed: choose a new or empty folder")  # fmt: skip


def write_json(path: str | Path, doc: Any) -> None:
    """Write ``doc`` as indented JSON to ``path`` atomically."""
    atomic_write(path, lambda p: Path(p).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8"))


def dataclass_from_json(cls: type[C], d: Any, source: str, what: str = "model") -> C:
    """Build dataclass ``cls`` from a parsed JSON object, checking it field by field.

    Missing required fields, unknown fields and values of the wrong JSON type (``int`` / ``float`` /
    ``str`` / ``bool`` / ``null`` and objects, as annotated) raise :class:`ConfigError` naming
    ``source`` and the field as ``what.FIELD``; the dataclass's own checks run after.
    """
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: {what!r} must be an object, got {type(d).__name__}")
    known = {f.name: f for f in fields(cls) if f.init}  # type: ignore[arg-type]
    required = {n for n, f in known.items() if f.default is MISSING and f.default_factory is MISSING}
    missing, extra = required - d.keys(), d.keys() - known.keys()
    if missing or extra:
        raise ConfigError(f"{source}: {what} config has missing fields {sorted(missing)} / unknown fields {sorted(extra)}")
    hints = get_type_hints(cls)
    for key, value in d.items():
        hint = hints[key]
        kinds = get_args(hint) if isinstance(hint, types.UnionType) or get_origin(hint) is Union else (hint,)
        if any(get_origin(k) is dict or k is dict for k in kinds) and not isinstance(value, dict):
            raise ConfigError(f"{source}: {what}.{key} must be an object, got {value!r}")
        try:
            check_options(cls, {key: value}, "")  # the JSON scalar types
        except ConfigError as e:
            raise ConfigError(f"{source}: {what}.{key} must be {str(e).split(' must be ', 1)[1]}") from None
    check_model_limits(d, source, f"{what}.")  # before anything is built
    return cls(**d)


def save_checkpoint(model: nn.Module, run_dir: str | Path, **extra: Any) -> Path:
    """Write ``model.safetensors`` and ``config.json`` for a model of any task (``extra`` entries,
    e.g. ``train`` and ``data``, are stored beside ``model``)."""
    from .tasks import task_of

    task = task_of(model)
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(run / WEIGHTS, lambda p: save_file(state, p))
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "selfcam_version": __version__, "task": task.name,
           "model": asdict(model.config), **extra}  # type: ignore[call-overload]  # fmt: skip
    write_json(run / CONFIG, doc)
    return run


def refuse_run_file(out: str | Path, runs: list[str | Path] | tuple[str | Path, ...], what: str = "--out") -> None:
    """OutputError when the output file ``out`` is one of the files of a run directory in ``runs`` (its
    weights, config, history or training states): writing it would destroy the run."""
    target = Path(out).resolve()
    for run in map(Path, runs):
        root = run.resolve()
        if target == root or root in target.parents and target.name in (WEIGHTS, CONFIG, "history.json", "evaluation.json",
                                                                            "metrics.json") or root / "checkpoints" in target.parents:  # fmt: skip
            raise OutputError(f"{out}: {what} points at a file of the run {run}; writing it would destroy the run: "
                              "choose another path (nothing was written)")  # fmt: skip


def _upgrade(doc: dict[str, Any], path: Path) -> dict[str, Any]:
    """A config of any format version as a format-2 document (in memory; the file is left as it is)."""
    from .heads import HEADS

    if "format_version" in doc:
        if doc.get("format") != FORMAT or doc["format_version"] != FORMAT_VERSION:
            raise CheckpointError(f"{path}: run format {doc.get('format')!r} version {doc['format_version']!r}; this "
                                  f"selfcam ({__version__}) reads version {FORMAT_VERSION} and older runs")  # fmt: skip
        return doc
    if doc.get("kind") == "asd" and "asd" in doc:  # ASD runs of selfcam before format 2
        rest = {k: v for k, v in doc.items() if k not in ("kind", "asd")}
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **rest, "task": "asd", "model": doc["asd"]}
    if "model" not in doc:
        raise CheckpointError(f"{path}: no 'model' entry")
    method = doc["model"].get("method") if isinstance(doc["model"], dict) else None
    head = HEADS.get(method) if isinstance(method, str) else None
    return {"format": FORMAT, "format_version": FORMAT_VERSION, **doc, "task": head.task if head else "image"}


def read_config(run_dir: str | Path) -> dict[str, Any]:
    """Parse and validate ``run_dir/config.json``: ``"task"`` is the task's name and ``"model"`` its
    config dataclass (e.g. :class:`~selfcam.model.ModelConfig`); older formats are upgraded."""
    from .tasks import get_task

    run = Path(run_dir)
    path = run / CONFIG
    if run.is_file():
        raise CheckpointError(f"{run_dir}: a file, not a run directory (a directory holding {CONFIG} and {WEIGHTS})"
                              f"{_format_hint(run)}")  # fmt: skip
    if not run.is_dir():
        raise CheckpointError(f"{run_dir}: checkpoint directory not found")
    try:
        doc = read_json(path, CheckpointError)  # regular files only; bounded size, nesting and integers
    except FileNotFoundError:
        raise CheckpointError(f"{path}: config file not found") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path}: no 'model' entry (the file holds a {type(doc).__name__}, not an object)")
    doc = _upgrade(doc, path)
    if "model" not in doc:
        raise CheckpointError(f"{path}: no 'model' entry")
    try:
        task = get_task(doc["task"]) if isinstance(doc["task"], str) else None
        if task is None:
            raise ConfigError(f"task must be a string, got {doc['task']!r}")
        doc["model"] = task.config_from_json(doc["model"], str(path))
        if "data" in doc:
            check_data(doc["data"], str(path))
    except ConfigError as e:
        raise CheckpointError(str(e) if str(e).startswith(str(path)) else f"{path}: {e}") from e
    return doc


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _count(low: int) -> Callable[[Any], bool]:
    return lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= low)


def _stats(v: Any) -> bool:
    return _number(v) or (isinstance(v, list) and len(v) > 0 and all(map(_number, v)))


DATA_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {  # known fields of config.json's "data" entry
    "name": (lambda v: isinstance(v, str), "a string"),
    "size": (_count(1), "an integer >= 1 (or null)"),
    "seed": (_count(0), "an integer >= 0 (or null)"),
    "train_size": (_count(0), "an integer >= 0 (or null)"),
    "val_size": (_count(0), "an integer >= 0 (or null)"),
    "in_chans": (_count(1), "an integer >= 1 (or null)"),
    "frames": (_count(1), "an integer >= 1 (or null)"),
    "mean": (_stats, "a number or a non-empty list of numbers"),
    "std": (_stats, "a number or a non-empty list of numbers"),
    "class_names": (lambda v: isinstance(v, list) and all(isinstance(c, str) for c in v), "a list of strings"),
}


def check_data(data: Any, source: str) -> None:
    """``data`` must be an object whose known fields have their JSON types; other fields are kept as they are."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: 'data' must be an object, got {type(data).__name__}")
    for key, (ok, what) in DATA_FIELDS.items():
        if key in data and not ok(data[key]):
            raise ConfigError(f"{source}: data.{key} must be {what}, got {data[key]!r}")
    for key, limit in (("size", MAX_IMAGE_SIZE), ("in_chans", MAX_IN_CHANS), ("frames", MAX_FRAMES)):
        if isinstance(data.get(key), int) and data[key] > limit:
            raise ConfigError(f"{source}: data.{key} = {data[key]} is over selfcam's limit of {limit:,}; refused")


def _format_hint(path: Path) -> str:
    """``"; it is a Python pickle..."`` when the first bytes of ``path`` show a pickle or a torch.save zip, else ``""``."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        return ""
    if head == b"PK":
        what = "a zip archive, as torch.save writes"
    elif head[:1] == b"\x80" and head[1:] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        what = "a Python pickle"
    else:
        return ""
    return f"; it is {what}, and selfcam never unpickles files: save the weights with safetensors"


def read_safetensors(path: str | Path, device: str = "cpu") -> dict[str, Tensor]:
    """Every tensor of the safetensors file ``path``; :class:`CheckpointError` naming it when it is not one."""
    path = _weights_file(path)
    try:
        try:
            os.fsencode(path).decode("utf-8")
        except UnicodeDecodeError:  # safetensors opens UTF-8 paths only: hand it the bytes instead
            return {k: v.to(device) for k, v in load(path.read_bytes()).items()}
        return load_file(str(path), device=device)
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise _unreadable(path, e) from e


def read_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of the safetensors file ``path``, from its header only (no tensor data is read;
    safetensors checks that the header covers the file exactly, so a truncated file is refused)."""
    path = _weights_file(path)
    try:
        name = os.fsencode(path).decode("utf-8")
    except UnicodeDecodeError:  # safe_open takes UTF-8 paths only: read the tensors
        return {k: tuple(v.shape) for k, v in read_safetensors(path).items()}
    try:
        with safe_open(name, "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # SafetensorError: header too small, incomplete, not JSON...
        raise _unreadable(path, e) from e


def _weights_file(path: str | Path) -> Path:
    """``path`` when it is a regular file; CheckpointError when it is missing or a FIFO, a device..."""
    path = Path(path)
    try:
        check_regular(path, CheckpointError)  # a FIFO or a device is never opened
    except FileNotFoundError:
        raise CheckpointError(f"{path}: weights file not found") from None
    return path


def _unreadable(path: Path, e: Exception) -> CheckpointError:
    return CheckpointError(f"{path}: not a readable safetensors file ({e}){_format_hint(path)}")


def check_finite(state: dict[str, Tensor], path: str | Path) -> None:
    """CheckpointError naming ``path`` and the tensors when floating-point weights hold NaN or infinite values."""
    bad = [(k, int((~torch.isfinite(v)).sum())) for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        listed = ", ".join(f"{k} ({n} of {state[k].numel()})" for k, n in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise CheckpointError(f"{path}: NaN or infinite weights in {len(bad)} tensor(s): {listed}; refused (a diverged "
                              "or corrupt run)")  # fmt: skip


def load_state(model: nn.Module, state: dict[str, Tensor], where: str) -> None:
    """Load ``state`` into ``model`` strictly; :class:`CheckpointError` counting missing, unexpected and
    wrongly shaped tensors otherwise."""
    check_shapes(model, {k: tuple(v.shape) for k, v in state.items()}, where)
    model.load_state_dict(state, strict=True)


def check_shapes(model: nn.Module, shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """:class:`CheckpointError` counting missing, unexpected and wrongly shaped tensors unless ``shapes``
    (name -> shape) are those of ``model``'s state dict."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, unexpected = sorted(expected.keys() - shapes.keys()), sorted(shapes.keys() - expected.keys())
    wrong = [f"{k} {shapes[k]} vs {v}" for k, v in expected.items() if k in shapes and shapes[k] != v]
    if missing or unexpected or wrong:
        raise CheckpointError(f"{where}: {len(missing)} missing {missing[:2]}, {len(unexpected)} unexpected "
                              f"{unexpected[:2]}, {len(wrong)} of another shape {wrong[:2]}")  # fmt: skip


_USER_MODEL: ContextVar[Callable[[], nn.Module] | None] = ContextVar("selfcam_user_model", default=None)


@contextmanager
def user_model(factory: Callable[[], nn.Module] | None) -> Iterator[None]:
    """Within the block, :func:`load_checkpoint` builds runs of :func:`selfcam.wrap` on your own model class with
    ``factory`` when it is given no ``model=`` (for code that loads runs itself, as ``build_report`` does)."""
    token = _USER_MODEL.set(factory)
    try:
        yield
    finally:
        _USER_MODEL.reset(token)


def load_checkpoint(run_dir: str | Path, map_location: str | torch.device = "cpu", *,
                    model: nn.Module | Callable[[], nn.Module] | None = None) -> tuple[nn.Module, dict[str, Any]]:  # fmt: skip
    """Rebuild the model saved in ``run_dir`` (any task); returns ``(model in eval mode, config dict)``.

    ``model``: for a run of :func:`selfcam.wrap` on your own model class, a callable returning the bare
    model (or the module itself); the run's config names the class but selfcam never imports it
    (default: the factory of an enclosing :func:`user_model` block).
    """
    doc = read_config(run_dir)
    weights = Path(run_dir) / WEIGHTS
    state = read_safetensors(weights, str(map_location))
    check_finite(state, weights)
    built = _build(doc, run_dir, model)
    load_state(built, state, _mismatch(doc, weights))
    return built.to(map_location).eval(), doc


def run_info(run_dir: str | Path, *, model: nn.Module | Callable[[], nn.Module] | None = None) -> dict[str, Any]:
    """``run_dir``'s config document as JSON (``"model"`` as a dict) and ``"params"``, the model's parameter count.

    Checked as :func:`load_checkpoint` checks a run (config, model options, tensor names and shapes; ``model``
    as there) except the tensors' values: the weights file's header gives the shapes and no tensor is read
    (the model is built with fresh weights to compare them with; on the meta device, its random
    initialisation would import torch._dynamo, seconds).
    """
    doc = read_config(run_dir)
    weights = Path(run_dir) / WEIGHTS
    shapes = read_shapes(weights)
    built = _build(doc, run_dir, model)
    check_shapes(built, shapes, _mismatch(doc, weights))
    return {**doc, "model": asdict(doc["model"]), "params": sum(p.numel() for p in built.parameters())}


def _mismatch(doc: dict[str, Any], weights: Path) -> str:
    from .tasks import get_task

    return f"{weights}: weights do not match config ({get_task(doc['task']).describe(doc['model'])})"


def _build(doc: dict[str, Any], run_dir: str | Path, model: nn.Module | Callable[[], nn.Module] | None) -> nn.Module:
    """The model of the config ``doc`` with fresh weights (``model``: as in :func:`load_checkpoint`)."""
    from .tasks import get_task
    from .wrap import rebuild, user_class

    backbone = getattr(doc["model"], "backbone", None)
    wrapped = isinstance(backbone, str) and backbone.startswith("wrap:")
    if model is None and user_class(doc["model"]) is not None:
        model = _USER_MODEL.get()

    try:
        if model is not None and not wrapped:
            raise ConfigError(f"model= (--model-factory) is for runs of selfcam.wrap on your own model; this run rebuilds "
                              f"itself ({get_task(doc['task']).describe(doc['model'])})")  # fmt: skip
        return rebuild(doc["model"], model=model) if wrapped else get_task(doc["task"]).build(doc["model"])
    except ConfigError as e:
        raise CheckpointError(f"{Path(run_dir) / CONFIG}: {e}") from e
