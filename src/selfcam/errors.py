"""Exceptions with messages meant for people: the CLI prints them as one line."""

from __future__ import annotations


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


class DivergenceError(ConfigError, FloatingPointError):
    """Training stopped: the loss or the weights stopped being finite (usually: the learning rate is too high)."""


def require_int(name: str, value: object, low: int = 1) -> None:
    """Raise :class:`ConfigError` unless ``value`` is an ``int`` (not a bool) ``>= low``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
