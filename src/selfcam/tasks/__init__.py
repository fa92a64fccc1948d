"""Tasks: ``image``, ``attributes``, ``video``, ``asd``; see :mod:`selfcam.tasks.base`."""

from __future__ import annotations

from .base import TASKS, Task, TaskGraph, get_task, register_task, task_of

__all__ = ["TASKS", "Task", "TaskGraph", "get_task", "list_tasks", "register_task", "task_of"]


def _load_all() -> None:
    """Import the built-in tasks (they register themselves); cheap after the first call."""
    from . import image, video, asd  # noqa: F401  (this order is the order of list_tasks)


def list_tasks() -> list[str]:
    """The names of the registered tasks."""
    _load_all()
    return list(TASKS)
