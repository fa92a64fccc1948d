"""Tasks: ``image``, ``attributes``, ``video``, ``asd``; see :mod:`selfcam.tasks.base`."""

from __future__ import annotations

from .base import TASKS, Task, TaskGraph, get_task, register_task, task_of

__all__ = ["TASKS", "Task", "TaskGraph", "get_task", "list_tasks", "register_task", "task_of"]


_MODULES = {"image": "image", "attributes": "image", "video": "video", "asd": "asd"}  # built-in task -> module, list order


def _load(name: str | None = None) -> None:
    """Import the module of the built-in task ``name`` (every built-in task for ``None`` or another name); the
    modules register their tasks; cheap after the first call. One task's module only: ``selfcam info`` of an
    image run does not import the ASD model and its data."""
    from importlib import import_module

    for module in [_MODULES[name]] if name in _MODULES else dict.fromkeys(_MODULES.values()):
        import_module(f"{__name__}.{module}")


def list_tasks() -> list[str]:
    """The names of the registered tasks, the built-in ones first (image, attributes, video, asd)."""
    _load()
    order = list(_MODULES)
    return sorted(TASKS, key=lambda n: order.index(n) if n in order else len(order))
