"""Reading what users hand selfcam, with limits: the one place every reader goes through.

- :func:`open_regular` opens a path for reading only when it is a regular file: a FIFO, a device
  or a socket is refused *before* anything reads it (opened non-blocking, checked with ``fstat``),
  so ``mkfifo x.png`` in an image folder cannot hang a command;
- :func:`read_bytes` reads at most ``limit`` bytes, :func:`gzip_reader` / :func:`read_gzip`
  decompress with a bound on the output (a 1 MB ``.gz`` of zeros cannot become 4 GB);
- :func:`read_json` / :func:`loads_json` parse JSON of bounded size and nesting with integers of
  at most 64 bits (no ``RecursionError``, no int-conversion ``ValueError``);
- :func:`open_image` and :func:`load_image` are the one image decoder of training, evaluation and
  explanation: a pixel budget counted at the file's bit depth, checked on the header before
  decoding; JPEG drafted to the wanted size; EXIF orientation applied;
- :func:`check_model_limits` refuses a model config that would allocate absurd tensors (10**9
  classes, a depth of 200000, a width of 10**9) before anything is built, naming the limit.

Every refusal is an exception of :mod:`selfcam.errors` (the class the caller asks for) whose
message names the file or option, the problem and the limit.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import signal
import stat
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from .errors import ConfigError, InputError, SelfcamError

__all__ = ["MAX_CIFAR_DEPTH", "MAX_CLASSES", "MAX_DECOMPRESSED_BYTES", "MAX_IMAGE_BYTES", "MAX_IMAGE_SIZE", "MAX_IN_CHANS",
           "MAX_JSON_BYTES", "MAX_JSON_DEPTH", "MAX_OPTION_INT", "check_depth", "check_model_limits", "check_regular",
           "file_kind", "gzip_reader", "held_signals", "image_budget_problem", "load_image", "loads_json", "open_image", "open_regular",
           "read_bytes", "read_gzip", "read_json", "sigterm_as_interrupt"]  # fmt: skip

MAX_JSON_BYTES = 64 * 2**20  # config.json, state.json, evaluation.json: a few kB in practice
MAX_JSON_DEPTH = 64  # selfcam's documents nest 5 levels deep
MAX_JSON_INT = 2**64  # integers of at most 64 bits (seeds included)
MAX_DECOMPRESSED_BYTES = 2 * 2**30  # a .gz input (MNIST's largest file is 47 MB decompressed)
MAX_IMAGE_BYTES = 256 * 2**20  # one decoded image at its own bit depth: Pillow's 89 M pixels at 8-bit RGB, 67 M at 32-bit float
MAX_IMAGE_SIZE = 4096  # a model's input side in pixels (--image-size, --size, data.size)
MAX_CLASSES = 100_000  # ImageNet-21k has 21841
MAX_IN_CHANS = 1024
MAX_FRAMES = 4096
MAX_CIFAR_DEPTH = 1202  # He et al.'s deepest CIFAR ResNet
MAX_OPTION_INT = 65536  # any other integer of a model config or its options (widths, kernels, reductions)


# ---------------------------------------------------------------------------------------------- files


def file_kind(mode: int) -> str:
    """A few words for what ``st_mode`` is: ``"a FIFO"``, ``"a character device"``..."""
    for test, what in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory")):  # fmt: skip
        if test(mode):
            return what
    return "not a regular file"


def _refusal(path: str | Path, mode: int) -> str:
    return f"{path}: {file_kind(mode)}, not a regular file; selfcam reads only regular files (never opened)"


def check_regular(path: str | Path, error: type[SelfcamError] = InputError) -> os.stat_result:
    """``os.stat(path)`` (links followed) when ``path`` is a regular file; ``error`` naming what it is otherwise.

    FileNotFoundError passes through, so callers keep their own 'not found' messages."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise error(_refusal(path, st.st_mode))
    return st


def open_regular(path: str | Path, error: type[SelfcamError] = InputError) -> IO[bytes]:
    """``open(path, "rb")`` for a regular file only. The file is opened non-blocking (opening a FIFO
    then returns at once instead of waiting for a writer) and checked with ``fstat`` on the
    descriptor itself, so a path swapped for a FIFO after a check is refused too."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(_refusal(path, st.st_mode))
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path: str | Path, limit: int, error: type[SelfcamError] = InputError, what: str = "file") -> bytes:
    """The bytes of the regular file ``path``; ``error`` when it holds more than ``limit``."""
    with open_regular(path, error) as f:
        blob = f.read(limit + 1)
    if len(blob) > limit:
        raise error(f"{path}: {what} larger than {limit:,} bytes (selfcam's limit for it); refused")
    return blob


def gzip_reader(path: str | Path, error: type[SelfcamError] = InputError) -> gzip.GzipFile:
    """A streaming reader of the regular ``.gz`` file ``path``: ``read(n)`` decompresses at most n bytes."""
    return gzip.GzipFile(fileobj=open_regular(path, error), mode="rb")


def read_gzip(path: str | Path, limit: int = MAX_DECOMPRESSED_BYTES, error: type[SelfcamError] = InputError) -> bytes:
    """The decompressed bytes of the ``.gz`` file ``path``; ``error`` when they would exceed ``limit``
    (checked while decompressing: memory never holds more than ``limit + 1`` bytes)."""
    try:
        with gzip_reader(path, error) as g:
            blob = g.read(limit + 1)
    except (OSError, EOFError, zlib.error) as e:
        raise error(f"{path}: cannot read: {e}") from e
    if len(blob) > limit:
        raise error(f"{path}: decompresses to more than {limit:,} bytes (selfcam's limit for compressed inputs); refused")
    return blob


# ---------------------------------------------------------------------------------------------- JSON


class _HugeInt(ValueError):
    pass


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > 20:
        raise _HugeInt(f"an integer of {len(text.lstrip('-'))} digits")
    value = int(text)
    if abs(value) >= MAX_JSON_INT:
        raise _HugeInt(f"the integer {value}")
    return value


def _depth(doc: Any) -> int:
    """How deep lists and objects nest in ``doc`` (iteratively: no recursion limit to hit)."""
    deepest, stack = 0, [(doc, 1)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, dict):
            value = list(value.values())
        if isinstance(value, list):
            deepest = max(deepest, level)
            if level > MAX_JSON_DEPTH:
                return level
            stack += [(v, level + 1) for v in value if isinstance(v, (dict, list))]
    return deepest


def loads_json(text: str | bytes, where: str, error: type[SelfcamError] = ConfigError) -> Any:
    """Parse JSON ``text`` (from ``where``: a file or an option); ``error`` saying why it is refused:
    not valid JSON or not UTF-8, nested deeper than :data:`MAX_JSON_DEPTH`, or integers of more than 64 bits."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        doc = json.loads(text, parse_int=_parse_int)
    except _HugeInt as e:
        raise error(f"{where}: refused: {e} (selfcam reads integers of at most 64 bits)") from None
    except RecursionError:
        raise error(f"{where}: refused: JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{where}: not valid JSON ({e})") from e
    if _depth(doc) > MAX_JSON_DEPTH:
        raise error(f"{where}: refused: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return doc


def read_json(path: str | Path, error: type[SelfcamError] = ConfigError, limit: int = MAX_JSON_BYTES) -> Any:
    """:func:`loads_json` of the regular file ``path`` (at most ``limit`` bytes); FileNotFoundError passes through."""
    return loads_json(read_bytes(path, limit, error, "JSON file"), str(path), error)


# ---------------------------------------------------------------------------------------------- images


def _decoded_bytes(mode: str, width: int, height: int) -> int:
    """Bytes of a decoded ``mode`` image: width x height x bands x bytes per band (the file's bit depth)."""
    from PIL import Image, ImageMode

    try:
        itemsize = np.dtype(ImageMode.getmode(mode).typestr).itemsize
        bands = Image.getmodebands(mode)
    except (KeyError, TypeError, ValueError):
        itemsize, bands = 4, 4  # a mode Pillow does not describe: count it as the widest common one
    return width * height * bands * itemsize


def image_budget_problem(im: Any, limit: int | None = None) -> str | None:
    """Why the opened Pillow image ``im`` is over the pixel budget (None when it fits)."""
    limit = MAX_IMAGE_BYTES if limit is None else limit
    width, height = im.size
    need = _decoded_bytes(im.mode, width, height)
    if need > limit:
        return (f"{width} x {height} pixels of mode {im.mode} decode to {need:,} bytes, over selfcam's pixel budget "
                f"of {limit:,} bytes (safeio.MAX_IMAGE_BYTES)")  # fmt: skip
    return None


@contextlib.contextmanager
def open_image(path: str | Path, error: type[SelfcamError] = InputError, *, draft: tuple[str, int] | None = None) -> Iterator[Any]:
    """``PIL.Image.open`` of the regular file ``path``, refused with ``error`` when its header says it
    would decode over the pixel budget. ``draft=(mode, size)``: a JPEG is decoded at the smallest
    scale that is still at least ``size`` on both sides (and the budget is checked after that)."""
    from PIL import Image, UnidentifiedImageError

    with open_regular(path, error) as f:
        try:
            with warnings.catch_warnings():  # selfcam's own budget below replaces Pillow's pixel-count warning
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                opened = Image.open(f)
        except UnidentifiedImageError:  # Pillow names the file object; name the path, as Image.open(path) does
            raise UnidentifiedImageError(f"cannot identify image file {str(path)!r}") from None
        except Image.DecompressionBombError as e:  # over twice Pillow's pixel limit: refused from the header too
            raise error(f"{path}: {e}; refused before decoding") from None
        with opened as im:
            if draft is not None:
                im.draft(draft[0], (draft[1], draft[1]))
            problem = image_budget_problem(im)
            if problem is not None:
                raise error(f"{path}: {problem}")
            yield im


def image_pixels(im: Any, mode: str) -> np.ndarray:
    """A Pillow image -> uint8 pixels in ``mode``: ``(h, w)`` for "L", ``(h, w, 3)`` for "RGB".

    Pillow's own conversion clips 16- and 32-bit integer images at 255 and truncates float ones, so
    those are scaled here: integers from 0..65535, floats ("F") from [0, 1]. ValueError says why a
    float image with NaN, infinite or out-of-range values cannot be read.
    """
    from PIL import Image

    if im.mode.startswith("I"):  # I;16, I;16B, I;16L, I;16N, I
        a = np.asarray(im)
        a = np.clip(a, 0, 65535).astype(np.uint32) if a.dtype.kind == "i" else a.astype(np.uint32)
        im = Image.fromarray(((a * 2 + 257) // 514).astype(np.uint8))  # round(a / 257), halves up
    elif im.mode == "F":
        a = np.asarray(im, dtype=np.float32)
        bad = int((~np.isfinite(a)).sum())
        if bad:
            raise ValueError(f"float image with {bad} NaN or infinite pixel(s)")
        if a.size and (a.min() < 0 or a.max() > 1):
            raise ValueError(f"float image with values in [{a.min():.4g}, {a.max():.4g}]; float images must hold "
                             "intensities in [0, 1] (or save it as 8- or 16-bit)")  # fmt: skip
        im = Image.fromarray(np.rint(a.astype(np.float64) * 255).astype(np.uint8))
    return np.array(im.convert(mode))  # a writable copy, as torch.from_numpy wants


def load_image(path: str | Path, mode: str, size: int | None = None, error: type[SelfcamError] = InputError) -> np.ndarray:
    """The one image loader of selfcam (training, evaluation, explanation): ``path`` -> uint8 pixels
    ``(h, w)`` for ``mode="L"`` or ``(h, w, 3)`` for ``"RGB"``.

    Regular files only, within the pixel budget (:func:`open_image`); a JPEG is drafted to ``size``
    when given; EXIF orientation is applied; 16-bit and float images are scaled
    (:func:`image_pixels`). Every failure is ``error``: ``PATH: cannot decode image (why)`` for a file
    Pillow cannot decode, whatever it raised (OSError, SyntaxError, struct.error...); FileNotFoundError
    passes through for the caller's own message.
    """
    from PIL import ImageOps

    try:
        with open_image(path, error, draft=None if size is None else (mode, size)) as im:
            return image_pixels(ImageOps.exif_transpose(im), mode)
    except (SelfcamError, FileNotFoundError, MemoryError):
        raise
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, struct.error... for a broken file
        raise error(f"{path}: cannot decode image ({str(e) or type(e).__name__})") from e


# ---------------------------------------------------------------------------------------------- model configs


def check_depth(backbone: Any, where: str = "backbone") -> None:
    """ConfigError when the CIFAR ResNet name ``backbone`` (``resnetN``, ``resnetN-bottleneck``) is deeper than
    :data:`MAX_CIFAR_DEPTH`."""
    m = re.fullmatch(r"resnet(\d+)(-bottleneck)?", backbone) if isinstance(backbone, str) else None
    if m and m[2] and (len(m[1]) > 6 or int(m[1]) > MAX_CIFAR_DEPTH):
        raise ConfigError(f"{where} {backbone!r}: depth {m[1]} is over selfcam's limit of {MAX_CIFAR_DEPTH} "
                          "(safeio.MAX_CIFAR_DEPTH); refused before building it")  # fmt: skip


_FIELD_LIMITS = {"num_classes": MAX_CLASSES, "in_chans": MAX_IN_CHANS, "frames": MAX_FRAMES, "sample_rate": 1_000_000}


def check_model_limits(fields: dict[str, Any], where: str, prefix: str = "") -> None:
    """ConfigError when a model config (its fields, options included) would build an absurd model:
    ``num_classes`` over :data:`MAX_CLASSES`, ``in_chans`` over :data:`MAX_IN_CHANS`, ``frames``
    over :data:`MAX_FRAMES`, a CIFAR ResNet deeper than :data:`MAX_CIFAR_DEPTH`, any other integer
    (widths, kernels, options) over :data:`MAX_OPTION_INT`. Nothing is allocated before it."""
    check_depth(fields.get("backbone"), f"{where}: {prefix}backbone")
    stack = [(k, v) for k, v in fields.items()]
    while stack:
        key, value = stack.pop()
        if isinstance(value, dict):
            stack += [(f"{key}.{k}", v) for k, v in value.items()]
        elif isinstance(value, list):
            stack += [(f"{key}[{i}]", v) for i, v in enumerate(value)]
        elif isinstance(value, int) and not isinstance(value, bool):
            name = key.rsplit(".", 1)[-1]
            limit = _FIELD_LIMITS.get(name, MAX_OPTION_INT)
            if abs(value) > limit:
                const = {"num_classes": "MAX_CLASSES", "in_chans": "MAX_IN_CHANS", "frames": "MAX_FRAMES"}.get(name, "MAX_OPTION_INT")
                raise ConfigError(f"{where}: {prefix}{key} = {value} is over selfcam's limit of {limit:,} (safeio.{const}); "
                                  "refused before building the model")  # fmt: skip


# -------------------------------------------------------------------------------------------- signals


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While open, SIGTERM (what ``timeout``, SLURM and ``docker stop`` send) raises KeyboardInterrupt, as
    SIGINT does, so what cleans up after Ctrl-C cleans up after it too (main thread, POSIX; else nothing)."""
    import threading

    if not hasattr(signal, "SIGTERM") or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


@contextlib.contextmanager
def held_signals() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block is done (a few renames that must all happen), then arrive."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
