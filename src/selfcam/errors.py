"""Exceptions with messages meant for people: the CLI prints them as one line."""

from __future__ import annotations

import numbers
import types
from typing import Any, Callable, Union, get_args, get_origin, get_type_hints

# the JSON scalar annotations check_options understands, and the Python types that satisfy each
_SCALARS: dict[Any, Any] = {int: numbers.Integral, float: numbers.Real, str: str, bool: bool, type(None): type(None)}


class SelfcamError(Exception):
    """Base class of every error selfcam raises on purpose."""


class ConfigError(SelfcamError, ValueError):
    """An unknown name, a wrong option or a config that does not validate."""


class InputError(SelfcamError, ValueError):
    """A tensor or image of the wrong shape, rank, channel count or values."""


class CheckpointError(SelfcamError):
    """A run directory whose weights or config are missing, corrupt or inconsistent."""


class DataError(SelfcamError):
    """A dataset that cannot be read or built."""


class OutputError(SelfcamError, OSError):
    """A file selfcam writes could not be written (disk full, quota, file too large), or an output that
    would overwrite what selfcam did not create."""


class DivergenceError(ConfigError, FloatingPointError):
    """Training stopped: the loss or the weights stopped being finite (usually: the learning rate is too high)."""


def check_options(fn: Callable[..., Any], options: dict[str, Any], what: str) -> None:
    """Raise :class:`ConfigError` when an option for ``fn`` has the wrong JSON type.

    Checks each given keyword against ``fn``'s annotation when that is made of ``int``, ``float``,
    ``str``, ``bool`` and ``None`` (an int passes for a float, a bool never for a number); other
    annotations and unknown names are left to ``fn`` itself.
    """
    try:
        hints = get_type_hints(fn)
    except (NameError, TypeError):  # annotations that do not resolve at run time: nothing to check
        return
    for key, value in options.items():
        hint = hints.get(key)
        kinds = get_args(hint) if isinstance(hint, types.UnionType) or get_origin(hint) is Union else (hint,)
        if not kinds or not all(k in _SCALARS for k in kinds):
            continue
        if isinstance(value, bool):
            ok = bool in kinds
        else:
            ok = any(isinstance(value, _SCALARS[k]) for k in kinds)
        if not ok:
            names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
            raise ConfigError(f"{what} option {key!r} must be {names}, got {value!r}")


def require_int(name: str, value: object, low: int = 1, high: int | None = None) -> None:
    """Raise :class:`ConfigError` unless ``value`` is an ``int`` (not a bool) ``>= low`` (and ``<= high``:
    selfcam's limit, named in the message)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    if high is not None and value > high:
        raise ConfigError(f"{name} = {value} is over selfcam's limit of {high:,}; refused before allocating anything")


def check_accelerator(accelerator: str, option: str = "--accelerator") -> None:
    """ConfigError when ``accelerator`` asks for a GPU (gpu, cuda) and torch sees none."""
    if accelerator in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"{option} {accelerator}: no GPU is available here (torch.cuda.is_available() is False); "
                              "use cpu or auto")  # fmt: skip
