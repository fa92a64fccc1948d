"""The bad-input corpus (issue 8, part 1): one table of bad inputs, each written by the test itself.

Every case goes through the Python API and, where one exists, the command line:

- an input selfcam refuses must raise one specific :class:`~selfcam.errors.SelfcamError` subclass
  whose message names the file and the problem, and the command must exit 2 with exactly one line
  on stderr, ``error: ...``, naming the file, and no traceback (``--debug`` raises it instead);
- an input selfcam tolerates (converted, skipped with a warning that lists it) must give the result
  checked by hand below, and the command must succeed;
- a command given an ``--out`` leaves nothing half-written there after a failure, no call may hang
  (each runs under a deadline), and no pickle is ever executed (its payload would create a marker).

docs/bad-inputs.md is the same table in prose; a test keeps the two in step.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import traceback
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import Result
from PIL import Image
from typer.testing import CliRunner

from selfcam import metrics
from selfcam.cli import app
from selfcam.data import load_dataset
from selfcam.errors import CheckpointError, ConfigError, DataError, InputError, OutputError, SelfcamError
from selfcam.evaluate import EvalConfig, evaluate_runs
from selfcam.explain import Preprocess, explain_files, find_images
from selfcam.model import create_model
from selfcam.checkpoint import load_checkpoint, save_checkpoint
from selfcam.train import latest_state

runner = CliRunner()
SIZE = 16  # the runs' image side: 16 x 16 files are fed as they are, so pixel values can be checked by hand
DEADLINE_S = 30  # any call running longer is taken for a hang (a followed link loop...)
DOC = Path(__file__).resolve().parents[1] / "docs" / "bad-inputs.md"


# ---------------------------------------------------------------------------------------------- fixtures


@dataclass(frozen=True)
class Env:
    """What the cases share, built once per module: two untrained runs and a crashed training run."""

    run: Path  # se on resnet8, 1 channel, 10 classes, 16 px
    rgb: Path  # plain on resnet8, 3 channels, 2 classes, 16 px
    crashed: Path  # `selfcam train` that saved its state after epoch 0 and crashed in epoch 1
    crashed2: Path  # a 3-epoch `selfcam train` that saved its states after epochs 0 and 1 and crashed in epoch 2


def _crashed_run(run: Path, epochs: int = 2, at: int = 1) -> Path:
    from selfcam import train as T

    original = T.SelfcamModule.training_step

    def crash_in_epoch_1(self: Any, batch: Any, batch_idx: int) -> Any:
        if self.step_offset + self.global_step >= at:
            raise RuntimeError("simulated crash")
        return original(self, batch, batch_idx)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(T.SelfcamModule, "training_step", crash_in_epoch_1)
        result = runner.invoke(app, ["train", "--method", "se", "--backbone", "resnet8", "--epochs", str(epochs), "--train-size", "8",
                                     "--val-size", "4", "--image-size", str(SIZE), "--batch-size", "8", "--out", str(run),
                                     "--quiet"])  # fmt: skip
    assert isinstance(result.exception, RuntimeError), result.output
    assert latest_state(run) is not None
    return run


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    root = tmp_path_factory.mktemp("corpus")
    torch.manual_seed(0)
    data = {"name": "idx", "size": SIZE, "mean": [0.5], "std": [0.5], "class_names": [f"c{k}" for k in range(10)]}
    run = save_checkpoint(create_model("se", "resnet8", 10, 1), root / "run", data=data)
    rgb = save_checkpoint(create_model("plain", "resnet8", 2, 3), root / "rgb", data={"size": SIZE})
    return Env(run, rgb, _crashed_run(root / "crashed"), _crashed_run(root / "crashed2", epochs=3, at=2))


# ---------------------------------------------------------------------------------------------- writers


def _png(path: Path, pixels: np.ndarray, **save: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, **save)
    return path


def _noise(seed: int, shape: tuple[int, ...] = (SIZE, SIZE, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _cut(path: Path, fraction: float = 0.5) -> Path:
    blob = path.read_bytes()
    path.write_bytes(blob[: int(len(blob) * fraction)])
    return path


def _broken_images(folder: Path) -> list[Path]:
    """An empty PNG, a PNG cut in half and random bytes named .jpg in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    empty = folder / "empty.png"
    empty.write_bytes(b"")
    truncated = _cut(_png(folder / "truncated.png", _noise(1, (64, 64, 3))))
    corrupt = folder / "corrupt.jpg"
    corrupt.write_bytes(np.random.default_rng(2).bytes(300))
    return [empty, truncated, corrupt]


def _idx(array: np.ndarray) -> bytes:
    """An idx file of a uint8 array: magic 0x0000 08 <ndim>, big-endian dims, the bytes."""
    return struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def _write_idx(folder: Path, train_labels: list[int], test_labels: list[int]) -> Path:
    folder.mkdir(parents=True)
    for part, labels in (("train", train_labels), ("t10k", test_labels)):
        (folder / f"{part}-images-idx3-ubyte").write_bytes(_idx(_noise(len(labels), (len(labels), 8, 8))))
        (folder / f"{part}-labels-idx1-ubyte").write_bytes(_idx(np.array(labels, np.uint8)))
    return folder


def _write_cifar10(folder: Path, test_labels: list[int]) -> Path:
    """CIFAR-10 binary: 5 training batches of labels 0..9 and a test batch of ``test_labels`` (byte + 3072 pixels)."""
    folder.mkdir(parents=True)
    for name, labels in [(f"data_batch_{k}.bin", list(range(10))) for k in range(1, 6)] + [("test_batch.bin", test_labels)]:
        records = np.zeros((len(labels), 3073), np.uint8)
        records[:, 0] = labels
        (folder / name).write_bytes(records.tobytes())
    return folder


def _image_tree(root: Path, classes: dict[str, dict[str, int]]) -> Path:
    """``root/SPLIT/CLASS/k.png`` with ``classes[split][class]`` noise images each."""
    for split, counts in classes.items():
        for name, count in counts.items():
            for k in range(count):
                _png(root / split / name / f"{k}.png", _noise(100 + k))
    return root


def _payload(marker: Path) -> bytes:
    """Pickle bytes, written opcode by opcode, that create ``marker`` when unpickled: ``open(marker, "w")``."""
    path = str(marker).encode()
    return (b"\x80\x02" + b"cbuiltins\nopen\n" + b"X" + struct.pack("<I", len(path)) + path
            + b"X\x01\x00\x00\x00w" + b"\x86" + b"R" + b".")  # fmt: skip


def _torch_zip(path: Path, marker: Path) -> Path:
    """A file laid out as torch.save writes it (a zip whose data.pkl is the payload)."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", _payload(marker))
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
    return path


def _copy_run(src: Path, dst: Path, config: Callable[[dict], Any] | None = None, config_bytes: bytes | None = None,
              weights: bytes | None = None) -> Path:  # fmt: skip
    """A copy of run ``src`` at ``dst`` with its config edited or replaced, or its weights replaced."""
    shutil.copytree(src, dst)
    if config is not None:
        doc = json.loads((dst / "config.json").read_text())
        config(doc)
        (dst / "config.json").write_text(json.dumps(doc))
    if config_bytes is not None:
        (dst / "config.json").write_bytes(config_bytes)
    if weights is not None:
        (dst / "model.safetensors").write_bytes(weights)
    return dst


# ---------------------------------------------------------------------------------------------- the table


@dataclass
class Bad:
    """One bad input, written to disk: how to feed it to the API and the CLI, and what to check after."""

    api: Callable[[], Any] | None = None
    cli: list[list[str]] = field(default_factory=list)  # one or more command lines, each must behave the same
    names: str | None = None  # the path the error message must name
    shown: str | None = None  # how the one-line CLI error shows it (default: as ``names``)
    fresh: list[Path] = field(default_factory=list)  # --out paths given fresh: absent or empty after a failure
    run: Path | None = None  # a run directory that must hold nothing half-written after a failure
    marker: Path | None = None  # created if a pickle payload were ever executed
    check: Callable[[Any, list[str]], None] | None = None  # tolerated inputs: (API result, warnings) by hand
    cli_check: Callable[[Result, list[str]], None] | None = None  # tolerated inputs: (CLI result, warnings)
    file_limit: int | None = None  # RLIMIT_FSIZE while the call runs: writes past it fail, as on a full disk
    kept: list[Path] = field(default_factory=list)  # files that must still hold, after a failure, the bytes they held
    listing: Path | None = None  # a folder that must hold, after a failure, exactly the files it held (nothing added)

    def __post_init__(self) -> None:
        self.snapshot = {p: p.read_bytes() for p in self.kept}
        self.before = sorted(self.listing.rglob("*")) if self.listing is not None else []


@dataclass(frozen=True)
class Case:
    id: str
    via: str  # "api", "cli" or "api+cli"
    error: type[SelfcamError] | None  # None: the input is tolerated
    match: str  # regex the error message must match
    build: Callable[[Env, Path], Bad]


def _explain_cmd(run: Path, out: Path, *files: Path | str, extra: tuple[str, ...] = ()) -> list[str]:
    return ["explain", "--checkpoint", str(run), *map(str, files), "--out", str(out), "--quiet", *extra]


def _evaluate_cmd(run: Path, data: str, out: Path, *extra: str) -> list[str]:
    return ["evaluate", "--checkpoint", str(run), "--data", data, "--out", str(out), "--metrics", "accuracy", *extra]


def _every_command(run: Path, tmp: Path) -> list[list[str]]:
    """info, evaluate, export and explain of ``run``: every command that opens a checkpoint."""
    image = _png(tmp / "ok.png", _noise(0, (SIZE, SIZE)))
    return [["info", str(run)], _evaluate_cmd(run, "cluttered-digits", tmp / "eval", "--n", "4"),
            ["export", "--checkpoint", str(run), "--out", str(tmp / "model.onnx")], _explain_cmd(run, tmp / "explained", image)]  # fmt: skip


def _checkpoint_fresh(tmp: Path) -> list[Path]:
    return [tmp / "eval", tmp / "model.onnx", tmp / "explained"]


def _train_cmd(tmp: Path, *options: str) -> list[str]:
    return ["train", "--method", "se", "--backbone", "resnet8", "--data", "cluttered-digits", "--train-size", "8",
            "--val-size", "4", "--image-size", str(SIZE), "--epochs", "1", "--quiet", "--out", str(tmp / "trained"), *options]  # fmt: skip


# --- 1. empty, truncated and corrupt image files


def _explain_file(env: Env, tmp: Path, make: Callable[[Path], Path]) -> Bad:
    f = make(tmp)
    return Bad(api=lambda: find_images([f]), cli=[_explain_cmd(env.run, tmp / "out", f)], names=str(f), fresh=[tmp / "out"])


def _truncated_jpeg_second_batch(env: Env, tmp: Path) -> Bad:
    good = _png(tmp / "a-good.png", _noise(3, (SIZE, SIZE)))
    jpeg = _cut(_png(tmp / "b-cut.jpg", _noise(4, (64, 64, 3)), quality=95), 0.6)

    def api() -> Any:
        model, doc = load_checkpoint(env.run)
        return explain_files(model, doc, [good, jpeg], tmp / "api-out", batch_size=1)

    return Bad(api=api, cli=[_explain_cmd(env.run, tmp / "out", good, jpeg, extra=("--batch-size", "1"))], names=str(jpeg),
               fresh=[tmp / "out", tmp / "api-out"])  # fmt: skip


def _imagefolder_broken(env: Env, tmp: Path) -> Bad:
    root = _image_tree(tmp / "tree", {"train": {"a": 2, "b": 2}, "test": {"a": 1, "b": 1}})
    broken = _broken_images(root / "test" / "a")

    def check(ds: Any, warned: list[str]) -> None:
        assert sorted(ds.paths) == [str(root / "test" / "a" / "0.png"), str(root / "test" / "b" / "0.png")]
        assert {p: why.split(":")[0] for p, why in ds.skipped} == {str(b): "unreadable image" for b in broken}
        assert len(warned) == 1 and "skipped 3 file(s)" in warned[0] and all(str(b) in warned[0] for b in broken)

    def cli_check(result: Result, warned: list[str]) -> None:
        assert any("skipped 3 file(s)" in w and all(str(b) in w for b in broken) for w in warned), warned
        assert json.loads((tmp / "eval" / "evaluation.json").read_text())["n_items"] == 2

    return Bad(api=lambda: load_dataset(f"imagefolder:{root}", "test", size=SIZE), check=check,
               cli=[_evaluate_cmd(env.rgb, f"imagefolder:{root}", tmp / "eval", "--split", "test")], cli_check=cli_check)  # fmt: skip


def _explain_dir_broken(env: Env, tmp: Path) -> Bad:
    folder = tmp / "imgs"
    good = _png(folder / "good.png", _noise(5, (SIZE, SIZE)))
    broken = _broken_images(folder)
    (folder / "notes.txt").write_text("not an image")
    expected_skipped = sorted([*broken, folder / "notes.txt"])

    def check(found: Any, warned: list[str]) -> None:
        assert found == ([good], expected_skipped)

    def cli_check(result: Result, warned: list[str]) -> None:
        assert result.stderr.startswith("warning: skipped 4 non-image file(s): ")
        assert all(str(p) in result.stderr for p in expected_skipped)
        assert [r["output"] for r in json.loads((tmp / "out" / "predictions.json").read_text())] == ["good.png"]

    return Bad(api=lambda: find_images([folder]), check=check, cli=[_explain_cmd(env.run, tmp / "out", folder)], cli_check=cli_check)


# --- 2. NaN / inf pixels


def _model_input(values: dict[tuple[int, ...], float] | None = None, shape: tuple[int, ...] = (2, 1, SIZE, SIZE),
                 explain: bool = False) -> Callable[[Env, Path], Bad]:  # fmt: skip
    def build(env: Env, tmp: Path) -> Bad:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        for where, v in (values or {}).items():
            x[where] = v

        def api() -> Any:
            model, _ = load_checkpoint(env.run)
            with torch.no_grad():
                return model.explain(x) if explain else model(x)

        return Bad(api=api)

    return build


def _metrics_nan(env: Env, tmp: Path) -> Bad:
    maps, masks = torch.rand(2, SIZE, SIZE), torch.ones(2, SIZE, SIZE)
    maps[1, 3, 4] = float("nan")
    return Bad(api=lambda: metrics.iou(maps, masks))


def _float_tiff(values: np.ndarray) -> Callable[[Env, Path], Bad]:
    def build(env: Env, tmp: Path) -> Bad:
        f = tmp / "float.tif"
        Image.fromarray(values.astype(np.float32)).save(f)
        assert Image.open(f).mode == "F"

        def api() -> Any:
            return Preprocess.from_config(load_checkpoint(env.run)[1]).load(f)

        return Bad(api=api, cli=[_explain_cmd(env.run, tmp / "out", f)], names=str(f), fresh=[tmp / "out"])

    return build


_NAN_IMAGE = np.full((SIZE, SIZE), 0.5)
_NAN_IMAGE[2, 3] = np.nan
_BIG_IMAGE = np.linspace(0, 255, SIZE * SIZE).reshape(SIZE, SIZE)


# --- 3. other image modes, converted by hand


def _converted(run_of: Callable[[Env], Path], pixels: Callable[[Path], Path], expected: np.ndarray) -> Callable[[Env, Path], Bad]:
    """A file in another mode, fed to a run: ``Preprocess.load`` must give ``expected`` (C, H, W) * 255."""

    def build(env: Env, tmp: Path) -> Bad:
        f = pixels(tmp)

        def check(x: torch.Tensor, warned: list[str]) -> None:
            np.testing.assert_allclose(x.numpy() * 255, expected, atol=1e-3)

        def cli_check(result: Result, warned: list[str]) -> None:
            assert [r["output"] for r in json.loads((tmp / "out" / "predictions.json").read_text())] == [f"{f.stem}.png"]

        return Bad(api=lambda: Preprocess.from_config(load_checkpoint(run_of(env))[1]).load(f), check=check,
                   cli=[_explain_cmd(run_of(env), tmp / "out", f)], cli_check=cli_check)  # fmt: skip

    return build


def _halves(left: Any, right: Any, dtype: Any, channels: int | None = None) -> np.ndarray:
    """A SIZE x SIZE image, ``left`` in the left half and ``right`` in the right half."""
    shape = (SIZE, SIZE) if channels is None else (SIZE, SIZE, channels)
    a = np.empty(shape, dtype)
    a[:, : SIZE // 2], a[:, SIZE // 2 :] = left, right
    return a


def _rgba(tmp: Path) -> Path:  # red, fully opaque | blue, fully transparent
    return _png(tmp / "rgba.png", _halves((255, 0, 0, 255), (0, 0, 255, 0), np.uint8, 4))


def _cmyk(tmp: Path) -> Path:  # no ink (white) | magenta + yellow (red)
    f = tmp / "cmyk.tif"
    Image.fromarray(_halves((0, 0, 0, 0), (0, 255, 255, 0), np.uint8, 4), "CMYK").save(f)
    return f


def _sixteen_bit(tmp: Path) -> Path:  # 65535 | 257 * 100
    f = _png(tmp / "sixteen.png", _halves(65535, 25700, np.uint16))
    assert Image.open(f).mode.startswith("I;16")
    return f


# ITU-R 601 luma, Pillow's L: 299 R + 587 G + 114 B over 1000; alpha is dropped
_RGBA_L = _halves(round(0.299 * 255), round(0.114 * 255), np.float64)[None]
_CMYK_RGB = np.moveaxis(_halves((255, 255, 255), (255, 0, 0), np.float64, 3), -1, 0)
_SIXTEEN_L = _halves(255, 100, np.float64)[None]


# --- 4. and 5. labels out of range, class counts that do not fit


def _idx_label_12(env: Env, tmp: Path) -> Bad:
    d = _write_idx(tmp / "idx", list(range(10)) * 2, [0, 1, 12, 3])
    return Bad(api=lambda: load_dataset(f"idx:{d}", "test"), cli=[_evaluate_cmd(env.run, f"idx:{d}", tmp / "eval")],
               names=str(d / "t10k-labels-idx1-ubyte"), fresh=[tmp / "eval"])  # fmt: skip


def _cifar_label_200(env: Env, tmp: Path) -> Bad:
    d = _write_cifar10(tmp / "cifar", [3, 200, 1])
    return Bad(api=lambda: load_dataset(f"cifar10:{d}", "test"), cli=[_evaluate_cmd(env.rgb, f"cifar10:{d}", tmp / "eval")],
               names=str(d / "test_batch.bin"), fresh=[tmp / "eval"])  # fmt: skip


def _imagefolder_unknown_class(env: Env, tmp: Path) -> Bad:
    root = _image_tree(tmp / "tree", {"train": {"a": 2, "b": 2}, "test": {"a": 1, "b": 1, "c": 2}})

    def check(ds: Any, warned: list[str]) -> None:
        assert ds.class_names == ["a", "b"] and sorted(ds.labels.tolist()) == [0, 1]
        assert ds.skipped == ((str(root / "test" / "c"), "folder of a class the training folder does not have"),)
        assert len(warned) == 1 and str(root / "test" / "c") in warned[0]

    def cli_check(result: Result, warned: list[str]) -> None:
        assert any(str(root / "test" / "c") in w for w in warned), warned

    return Bad(api=lambda: load_dataset(f"imagefolder:{root}", "test", size=SIZE), check=check,
               cli=[_evaluate_cmd(env.rgb, f"imagefolder:{root}", tmp / "eval", "--split", "test")], cli_check=cli_check)  # fmt: skip


def _class_mismatch(env: Env, tmp: Path) -> Bad:
    d = _write_idx(tmp / "idx3", [0, 1, 2] * 4, [0, 1, 2, 1])

    def api() -> Any:
        model, _ = load_checkpoint(env.run)
        return evaluate_runs({"run": model}, load_dataset(f"idx:{d}", "test", size=SIZE), EvalConfig(metrics=("accuracy",)))

    return Bad(api=api, cli=[_evaluate_cmd(env.run, f"idx:{d}", tmp / "eval")], names=str(d), fresh=[tmp / "eval"])


# --- 6. odd file and directory names

_ODD_NAMES = [b"caf\xe9.png", b"with space.png", "ünï©ødé.png".encode(), b"-dash.png", b"new\nline.png"]


def _odd_names(env: Env, tmp: Path) -> Bad:
    folder = tmp / "odd"
    folder.mkdir()
    for k, name in enumerate(_ODD_NAMES):
        Image.fromarray(_noise(10 + k, (SIZE, SIZE))).save(os.fsdecode(os.path.join(os.fsencode(folder), name)))
    files = sorted(folder / os.fsdecode(n) for n in _ODD_NAMES)
    # one panel per file, <stem>.png, the name kept byte for byte (the non-UTF-8 byte 0xe9 included)
    expected = sorted(["caf\udce9.png", "with space.png", "ünï©ødé.png", "-dash.png", "new\nline.png"])

    def api() -> Any:
        model, doc = load_checkpoint(env.run)
        return explain_files(model, doc, find_images([folder])[0], tmp / "api-out")

    def check(records: Any, warned: list[str]) -> None:
        assert sorted(r["file"] for r in records) == sorted(map(str, files))
        assert sorted(r["output"] for r in records) == expected
        assert sorted(p.name for p in (tmp / "api-out").iterdir()) == sorted([*expected, "predictions.json"])

    def cli_check(result: Result, warned: list[str]) -> None:
        out = tmp / "out"
        assert sorted(p.name for p in out.iterdir()) == sorted([*expected, "predictions.json"])
        assert sorted(r["file"] for r in json.loads((out / "predictions.json").read_text())) == sorted(map(str, files))

    # the folder, and each odd file given by name (absolute paths: a relative "-dash.png" needs "--" before it)
    return Bad(api=api, check=check, cli=[_explain_cmd(env.run, tmp / "out", folder), _explain_cmd(env.run, tmp / "out", *files)],
               cli_check=cli_check)  # fmt: skip


def _odd_run_dir(tmp: Path, env: Env) -> Path:
    return _copy_run(env.run, Path(os.fsdecode(os.path.join(os.fsencode(tmp), b"r\xe9n\nx"))))


def _odd_run(env: Env, tmp: Path) -> Bad:
    run = _odd_run_dir(tmp, env)

    def check(loaded: Any, warned: list[str]) -> None:
        assert loaded[1]["model"].num_classes == 10

    def cli_check(result: Result, warned: list[str]) -> None:
        assert json.loads(result.stdout)["model"]["num_classes"] == 10

    return Bad(api=lambda: load_checkpoint(run), check=check, cli=[["info", str(run)]], cli_check=cli_check)


def _odd_run_broken(env: Env, tmp: Path) -> Bad:
    run = _odd_run_dir(tmp, env)
    (run / "model.safetensors").write_bytes(b"")
    return Bad(api=lambda: load_checkpoint(run), cli=[["info", str(run)]], names=str(run / "model.safetensors"),
               shown=f"{tmp}/r\\udce9n\\nx/model.safetensors")  # fmt: skip


# --- 7. config files


def _config(edit: Callable[[dict], Any] | None = None, raw: bytes | None = None) -> Callable[[Env, Path], Bad]:
    def build(env: Env, tmp: Path) -> Bad:
        run = _copy_run(env.run, tmp / "run", config=edit, config_bytes=raw)
        return Bad(api=lambda: load_checkpoint(run), cli=_every_command(run, tmp), names=str(run / "config.json"),
                   fresh=_checkpoint_fresh(tmp))  # fmt: skip

    return build


def _train_options(api: Callable[[], Any] | None, *options: str) -> Callable[[Env, Path], Bad]:
    def build(env: Env, tmp: Path) -> Bad:
        return Bad(api=api, cli=[_train_cmd(tmp, *options)], fresh=[tmp / "trained"])

    return build


# --- 8. and 9. weights files: truncated, wrong shape, empty, pickles


def _weights(make: Callable[[Env, Path], bytes], command: str = "info") -> Callable[[Env, Path], Bad]:
    def build(env: Env, tmp: Path) -> Bad:
        run = _copy_run(env.run, tmp / "run", weights=make(env, tmp))
        cli = {c[0]: c for c in _every_command(run, tmp)}[command]
        return Bad(api=lambda: load_checkpoint(run), cli=[cli], names=str(run / "model.safetensors"),
                   fresh=_checkpoint_fresh(tmp), marker=tmp / "PWNED")  # fmt: skip

    return build


def _half_weights(env: Env, tmp: Path) -> bytes:
    blob = (env.run / "model.safetensors").read_bytes()
    return blob[: len(blob) // 2]


def _wrong_shape_weights(env: Env, tmp: Path) -> bytes:
    from safetensors.torch import save

    model, _ = load_checkpoint(env.run)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["head.fc.weight"] = torch.zeros(7, state["head.fc.weight"].shape[1])
    return save(state)


def _checkpoint_file(name: str, make: Callable[[Path, Path], Any], command: str) -> Callable[[Env, Path], Bad]:
    """--checkpoint given a file (``name``) instead of a run directory."""

    def build(env: Env, tmp: Path) -> Bad:
        f = tmp / name
        make(f, tmp / "PWNED")
        cli = {c[0]: c for c in _every_command(f, tmp)}[command]
        return Bad(api=lambda: load_checkpoint(f), cli=[cli], names=str(f), fresh=_checkpoint_fresh(tmp), marker=tmp / "PWNED")

    return build


# --- 10. symbolic-link loops


def _imagefolder_loop(env: Env, tmp: Path) -> Bad:
    root = _image_tree(tmp, {"tree": {"a": 3, "b": 3}}) / "tree"
    os.symlink(root, root / "loop")  # among the class folders
    os.symlink(root, root / "a" / "sub")  # inside a class folder

    def check(ds: Any, warned: list[str]) -> None:
        assert ds.class_names == ["a", "b"]
        assert not any("loop" in p or "sub" in p for p in ds.paths)
        assert set(ds.skipped) == {(str(root / "loop"), "symbolic link loop, not followed"),
                                   (str(root / "a" / "sub"), "symbolic link to a folder, not followed")}  # fmt: skip

    return Bad(api=lambda: load_dataset(f"imagefolder:{root}", "train", size=SIZE), check=check)


def _explain_loop(env: Env, tmp: Path) -> Bad:
    folder = tmp / "imgs"
    images = [_png(folder / "a.png", _noise(20, (SIZE, SIZE))), _png(folder / "sub" / "b.png", _noise(21, (SIZE, SIZE)))]
    os.symlink(folder, folder / "sub" / "loop")

    def check(found: Any, warned: list[str]) -> None:
        assert found == (images, [])

    def cli_check(result: Result, warned: list[str]) -> None:
        assert [r["output"] for r in json.loads((tmp / "out" / "predictions.json").read_text())] == ["a.png", "b.png"]

    return Bad(api=lambda: find_images([folder]), check=check, cli=[_explain_cmd(env.run, tmp / "out", folder)], cli_check=cli_check)


# --- 11. a damaged training state


def _resume(damage: str) -> Callable[[Env, Path], Bad]:
    def build(env: Env, tmp: Path) -> Bad:
        run = Path(shutil.copytree(env.crashed, tmp / "run"))
        (state,) = (run / "checkpoints").glob("step-*")
        damaged = _cut(state / damage)
        return Bad(api=(lambda: latest_state(run)) if damage == "state.json" else None, cli=[["train", "--resume", str(run)]],
                   names=str(damaged), run=run)  # fmt: skip

    return build


# --- 12. missing paths


def _missing_data(kind: str) -> Callable[[Env, Path], Bad]:
    def build(env: Env, tmp: Path) -> Bad:
        spec = f"{kind}:{tmp / 'missing'}"
        return Bad(api=lambda: load_dataset(spec, "test"), cli=[_evaluate_cmd(env.run, spec, tmp / "eval")],
                   names=str(tmp / "missing"), fresh=[tmp / "eval"])  # fmt: skip

    return build


def _missing_checkpoint(env: Env, tmp: Path) -> Bad:
    run = tmp / "no-such-run"
    return Bad(api=lambda: load_checkpoint(run), cli=_every_command(run, tmp), names=str(run), fresh=_checkpoint_fresh(tmp))


def _missing_image(env: Env, tmp: Path) -> Bad:
    f = tmp / "no-such.png"
    return Bad(api=lambda: find_images([f]), cli=[_explain_cmd(env.run, tmp / "out", f)], names=str(f), fresh=[tmp / "out"])


# --- 13. export of a config that does not match its weights


def _export_mismatch(env: Env, tmp: Path) -> Bad:
    run = _copy_run(env.run, tmp / "run", config=lambda d: d["model"].update(method="lfi"))
    return Bad(api=lambda: load_checkpoint(run), cli=[["export", "--checkpoint", str(run), "--out", str(tmp / "m.onnx")]],
               names=str(run / "model.safetensors"), fresh=[tmp / "m.onnx"])  # fmt: skip


# ---------------------------------------------------------------------------------------------- issue 18
# Families 3-6 of issue 18: special files, amplification, absurd sizes, silent differences, config-to-loader
# paths and the tracebacks that remained. A FIFO stands in for "a file that must never be opened": opening
# one for reading blocks until a writer comes, so a reader that opens it runs into the deadline.


def _fifo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


FIFO = r"a FIFO \(named pipe\), not a regular file; selfcam reads only regular files"


# --- 14. special files anywhere selfcam reads


def _imagefolder_fifo(env: Env, tmp: Path) -> Bad:
    root = _image_tree(tmp / "tree", {"train": {"a": 2, "b": 2}, "test": {"a": 1, "b": 1}})
    fifo = _fifo(root / "test" / "a" / "pipe.png")

    def check(ds: Any, warned: list[str]) -> None:
        assert len(ds) == 2 and dict(ds.skipped)[str(fifo)].startswith("unreadable image: a FIFO (named pipe)")
        assert len(warned) == 1 and str(fifo) in warned[0]

    def cli_check(result: Result, warned: list[str]) -> None:
        assert json.loads((tmp / "eval" / "evaluation.json").read_text())["n_items"] == 2

    return Bad(api=lambda: load_dataset(f"imagefolder:{root}", "test", size=SIZE), check=check,
               cli=[_evaluate_cmd(env.rgb, f"imagefolder:{root}", tmp / "eval", "--split", "test")], cli_check=cli_check)  # fmt: skip


def _explain_fifo(env: Env, tmp: Path) -> Bad:
    fifo = _fifo(tmp / "pipe.png")
    return Bad(api=lambda: find_images([fifo]), cli=[_explain_cmd(env.run, tmp / "out", fifo)], names=str(fifo), fresh=[tmp / "out"])


def _explain_dir_fifo(env: Env, tmp: Path) -> Bad:
    folder = tmp / "imgs"
    good = _png(folder / "good.png", _noise(5, (SIZE, SIZE)))
    fifo = _fifo(folder / "pipe.png")

    def check(found: Any, warned: list[str]) -> None:
        assert found == ([good], [fifo])

    def cli_check(result: Result, warned: list[str]) -> None:
        assert str(fifo) in result.stderr
        assert [r["output"] for r in json.loads((tmp / "out" / "predictions.json").read_text())] == ["good.png"]

    return Bad(api=lambda: find_images([folder]), check=check, cli=[_explain_cmd(env.run, tmp / "out", folder)], cli_check=cli_check)


def _run_file_fifo(name: str, every: bool) -> Callable[[Env, Path], Bad]:
    def build(env: Env, tmp: Path) -> Bad:
        run = _copy_run(env.run, tmp / "run")
        (run / name).unlink()
        _fifo(run / name)
        cli = _every_command(run, tmp) if every else [["info", str(run)]]
        return Bad(api=lambda: load_checkpoint(run), cli=cli, names=str(run / name), fresh=_checkpoint_fresh(tmp))

    return build


def _resume_state_replaced(make: Callable[[Path], Any]) -> Callable[[Env, Path], Bad]:
    """The crashed run with its state.json replaced by ``make(path)``."""

    def build(env: Env, tmp: Path) -> Bad:
        run = Path(shutil.copytree(env.crashed, tmp / "run"))
        (state,) = (run / "checkpoints").glob("step-*")
        (state / "state.json").unlink()
        make(state / "state.json")
        return Bad(api=lambda: latest_state(run), cli=[["train", "--resume", str(run)]], names=str(state / "state.json"), run=run)

    return build


def _idx_replaced(name: str, make: Callable[[Path], Any]) -> Callable[[Env, Path], Bad]:
    """idx data (10 classes) whose file ``name`` is replaced by ``make(path)`` (the raw twin removed)."""

    def build(env: Env, tmp: Path) -> Bad:
        d = _write_idx(tmp / "idx", list(range(10)) * 2, [0, 1, 2, 3])
        for twin in (d / name.removesuffix(".gz"), d / name):
            twin.unlink(missing_ok=True)
        make(d / name)
        return Bad(api=lambda: load_dataset(f"idx:{d}", "test"), cli=[_evaluate_cmd(env.run, f"idx:{d}", tmp / "eval")],
                   names=str(d / name), fresh=[tmp / "eval"])  # fmt: skip

    return build


# --- 15. amplification: compressed inputs, pixel budgets, absurd models and tensors


def _zeros_gz(megabytes: int) -> bytes:
    """gzip members (concatenated, as gzip allows) of ``megabytes`` MB of zeros, compressed once."""
    member = gzip.compress(bytes(2**20), compresslevel=1)
    return member * megabytes


def _gz_longer_than_header(path: Path) -> None:  # a 12-byte labels file, then 64 MB more
    path.write_bytes(gzip.compress(_idx(np.array([0, 1, 2, 3], np.uint8))) + _zeros_gz(64))


def _gz_header_too_large(path: Path) -> None:  # (100000, 200, 200) images: 4 GB, the stream a few bytes
    path.write_bytes(gzip.compress(struct.pack(">BBBBIII", 0, 0, 8, 3, 100_000, 200, 200)))


def _float_tiff_header(path: Path, side: int) -> Path:
    """A little-endian TIFF whose header says ``side x side`` 32-bit float pixels (mode F), strips absent."""
    entries = [(256, 4, side), (257, 4, side), (258, 3, 32), (259, 3, 1), (262, 3, 1), (273, 4, 8 + 2 + 12 * 10 + 4),
               (277, 3, 1), (278, 4, side), (279, 4, side * side * 4), (339, 3, 3)]  # fmt: skip
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", tag, kind, 1, value) for tag, kind, value in entries)
    path.write_bytes(b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + bytes(64))
    return path


def _over_pixel_budget(env: Env, tmp: Path) -> Bad:
    f = _float_tiff_header(tmp / "huge.tif", 9000)  # 81 M pixels (under Pillow's own limit of 89 M) x 4 bytes
    with Image.open(f) as im:
        assert im.mode == "F" and im.size == (9000, 9000)

    def api() -> Any:
        return Preprocess.from_config(load_checkpoint(env.run)[1]).load(f)

    return Bad(api=api, cli=[_explain_cmd(env.run, tmp / "out", f)], names=str(f), fresh=[tmp / "out"])


def _api_and_train(api: Callable[[], Any] | None, *options: str, names: Callable[[Path], str] | None = None,
                   shown: str | None = None) -> Callable[[Env, Path], Bad]:  # fmt: skip
    def build(env: Env, tmp: Path) -> Bad:
        return Bad(api=api, cli=[_train_cmd(tmp, *options)], fresh=[tmp / "trained"], names=names(tmp) if names else None,
                   shown=shown)  # fmt: skip

    return build


def _deep(levels: int) -> str:
    return "[" * levels + "]" * levels


# --- 16. silent wrong answers: one image loader, finite weights, empty class folders


def _nan_weights(env: Env, tmp: Path) -> bytes:
    from safetensors.torch import save

    model, _ = load_checkpoint(env.run)
    state = {k: v.contiguous().clone() for k, v in model.state_dict().items()}
    state["head.fc.weight"][0, 0] = float("nan")
    state["head.fc.bias"][1] = float("inf")
    return save(state)


def _empty_class_folders(env: Env, tmp: Path) -> Bad:
    root = _image_tree(tmp / "tree", {"train": {"a": 2, "b": 2}})
    for k in range(9998):
        (root / "train" / f"e{k:04d}").mkdir()
    return Bad(api=lambda: load_dataset(f"imagefolder:{root}", "train", size=SIZE),
               cli=[_train_cmd(tmp, "--data", f"imagefolder:{root}", "--train-size", "2", "--val-size", "1")],
               names=str(root / "train"), fresh=[tmp / "trained"])  # fmt: skip


def _exif_jpeg(path: Path, pixels: np.ndarray, orientation: int) -> Path:
    exif = Image.Exif()
    exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=90, exif=exif.tobytes())
    return path


def _one_loader(env: Env, tmp: Path) -> Bad:
    """A 96 x 48 JPEG with EXIF orientation 6 (rotate 90) in an ImageFolder tree: the dataset item, the file
    through `explain`'s Preprocess, and `evaluate` / `explain` on it must all see the same upright pixels."""
    root = tmp / "tree"
    pixels = _noise(7, (48, 96, 3))
    pixels[:, :48] //= 4  # a dark left half: rotation moves it to the top
    f = _exif_jpeg(root / "a" / "x.jpg", pixels, 6)
    _exif_jpeg(root / "b" / "y.jpg", _noise(8, (48, 96, 3)), 1)

    def api() -> Any:
        ds = load_dataset(f"imagefolder:{root}", "train", size=SIZE)
        i = ds.paths.index(str(f)) if str(f) in ds.paths else None
        return ds, i

    def check(value: Any, warned: list[str]) -> None:
        ds, i = value
        prep = Preprocess.from_config(load_checkpoint(env.rgb)[1])
        by_explain = prep.load(f)
        assert by_explain.shape == (3, SIZE, SIZE)
        assert by_explain[:, : SIZE // 2].mean() < 0.6 * by_explain[:, SIZE // 2 :].mean()  # upright: dark half on top
        if i is not None:  # the training split holds it: the dataset's item is the same tensor
            torch.testing.assert_close(ds.raw(i), by_explain, atol=0, rtol=0)
        for item in range(len(ds)):
            path = ds.paths[item]
            torch.testing.assert_close(ds.raw(item), prep.load(path), atol=0, rtol=0)

    def cli_check(result: Result, warned: list[str]) -> None:
        assert [r["output"] for r in json.loads((tmp / "out" / "predictions.json").read_text())] == ["x.png"]

    return Bad(api=api, check=check, cli=[_explain_cmd(env.rgb, tmp / "out", f)], cli_check=cli_check)


# --- 17. config files that would make timm or torchvision open a file or reach the network


def _config_loader(model: dict[str, Any]) -> Callable[[Env, Path], Bad]:
    def build(env: Env, tmp: Path) -> Bad:
        fifo = _fifo(tmp / "never-opened")  # a loader that opened it would hang on it
        text = json.dumps(model).replace("FIFO", str(fifo))
        run = _copy_run(env.run, tmp / "run", config=lambda d: d["model"].update(json.loads(text)))
        return Bad(api=lambda: load_checkpoint(run), cli=[["info", str(run)], ["export", "--checkpoint", str(run), "--out", str(tmp / "m.onnx")]],
                   names=str(run / "config.json"), fresh=[tmp / "m.onnx"])  # fmt: skip

    return build


def _train_loader_option(env: Env, tmp: Path) -> Bad:
    fifo = _fifo(tmp / "never-opened")
    return Bad(api=lambda: create_model("se", "timm:resnet10t", 10, 1, {"checkpoint_path": str(fifo)}),
               cli=[_train_cmd(tmp, "--backbone", "timm:resnet10t", "--backbone-kwargs", json.dumps({"checkpoint_path": str(fifo)}))],
               fresh=[tmp / "trained"])  # fmt: skip


# --- 18. tracebacks that remained: one-class data, idx dims, options torch or Lightning reject, disk full


def _one_class(env: Env, tmp: Path) -> Bad:
    root = _image_tree(tmp / "tree", {"train": {"a": 3}, "test": {"a": 1}})
    return Bad(api=lambda: load_dataset(f"imagefolder:{root}", "train", size=SIZE),
               cli=[_train_cmd(tmp, "--data", f"imagefolder:{root}", "--train-size", "2", "--val-size", "1")],
               names=str(root), fresh=[tmp / "trained"])  # fmt: skip


def _gpu_without_gpu(env: Env, tmp: Path) -> Bad:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from selfcam.train import TrainConfig, fit

    def api() -> Any:
        data = load_dataset("cluttered-digits", "train", 8, size=SIZE)
        return fit(create_model("se", "resnet8", 10, 1), data, None, TrainConfig(epochs=1, batch_size=8, accelerator="gpu"),
                   tmp / "api-run", progress=False)  # fmt: skip

    return Bad(api=api, cli=[_train_cmd(tmp, "--accelerator", "gpu"), _evaluate_cmd(env.run, "cluttered-digits", tmp / "eval", "--n", "4",
                                                                               "--accelerator", "gpu")],
               fresh=[tmp / "trained", tmp / "eval", tmp / "api-run"])  # fmt: skip


def _disk_full(env: Env, tmp: Path) -> Bad:
    model, doc = load_checkpoint(env.run)
    return Bad(api=lambda: save_checkpoint(model, tmp / "saved", data=doc["data"]), cli=[_train_cmd(tmp)],
               run=tmp / "trained", file_limit=64 * 1024)  # fmt: skip



# --- 19. outputs: selfcam writes only into what it created, never onto a run's own files (family 1)


def _foreign_out(env: Env, tmp: Path) -> Bad:
    out = tmp / "trained"
    keep = [out / "checkpoints" / "important.ckpt", out / "config.json"]
    keep[0].parent.mkdir(parents=True)
    keep[0].write_bytes(b"someone else's checkpoint")
    keep[1].write_text('{"lr": 0.1}')
    from selfcam.train import TrainConfig, fit

    def api() -> Any:
        data = load_dataset("cluttered-digits", "train", 8, size=SIZE)
        return fit(create_model("se", "resnet8", 10, 1), data, None, TrainConfig(epochs=1, batch_size=8), out, progress=False)

    return Bad(api=api, cli=[_train_cmd(tmp)], names=str(out), kept=keep)


def _out_onto_run(command: str) -> Callable[[Env, Path], Bad]:
    def build(env: Env, tmp: Path) -> Bad:
        run = _copy_run(env.run, tmp / "run")
        target = run / ("model.safetensors" if command == "export" else "config.json")
        args = (["export", "--checkpoint", str(run), "--out", str(target)] if command == "export"
                else ["report", str(run), "--out", str(target)])  # fmt: skip
        from selfcam.checkpoint import refuse_run_file

        return Bad(api=lambda: refuse_run_file(target, [run]), cli=[args], names=str(target), run=run,
                   kept=[run / "model.safetensors", run / "config.json"])  # fmt: skip

    return build


def _explain_into_inputs(env: Env, tmp: Path) -> Bad:
    imgs = tmp / "imgs"
    a = _png(imgs / "a.png", _noise(20, (SIZE, SIZE)))
    model, doc = load_checkpoint(env.run)
    return Bad(api=lambda: explain_files(model, doc, [a], imgs), cli=[_explain_cmd(env.run, imgs, imgs), _explain_cmd(env.run, imgs, a)],
               names=str(imgs), kept=[a], listing=imgs)  # fmt: skip


def _explain_foreign_out(env: Env, tmp: Path) -> Bad:
    out = tmp / "mine"
    keep = [_png(out / "a.png", _noise(21, (SIZE, SIZE))), out / "notes.txt"]
    keep[1].write_text("not selfcam's")
    image = _png(tmp / "in" / "a.png", _noise(22, (SIZE, SIZE)))
    model, doc = load_checkpoint(env.run)
    return Bad(api=lambda: explain_files(model, doc, [image], out), cli=[_explain_cmd(env.run, out, image)], names=str(out),
               kept=keep, listing=out)  # fmt: skip


def _explain_failed_rerun(env: Env, tmp: Path) -> Bad:
    good = _png(tmp / "in" / "a-good.png", _noise(23, (SIZE, SIZE)))
    jpeg = _cut(_png(tmp / "in" / "b-cut.jpg", _noise(4, (64, 64, 3)), quality=95), 0.6)
    out = tmp / "explained"
    assert runner.invoke(app, _explain_cmd(env.run, out, good)).exit_code == 0  # the earlier run: a-good.png, predictions.json
    model, doc = load_checkpoint(env.run)
    return Bad(api=lambda: explain_files(model, doc, [good, jpeg], out, batch_size=1),
               cli=[_explain_cmd(env.run, out, good, jpeg, extra=("--batch-size", "1"))], names=str(jpeg),
               kept=sorted(p for p in out.iterdir()), listing=out)  # fmt: skip


def _same_names(env: Env, tmp: Path) -> Bad:
    files = [_png(tmp / d / n, _noise(30 + i, (SIZE, SIZE))) for i, (d, n) in
             enumerate([("x", "a.png"), ("y", "a.png"), ("z", "a-2.png"), ("w", "a.jpg"), ("v", "A.png")])]  # fmt: skip

    def outputs(out: Path, records: list[dict[str, Any]]) -> None:
        assert [r["file"] for r in records] == [str(f) for f in files]
        names = [r["output"] for r in records]
        assert names == ["a.png", "a-2.png", "a-2-2.png", "a-3.png", "A-4.png"], names  # distinct, case-insensitively too
        assert json.loads((out / "predictions.json").read_text()) == records
        assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted([*names, "predictions.json"])

    model, doc = load_checkpoint(env.run)
    return Bad(api=lambda: explain_files(model, doc, files, tmp / "api-out"), cli=[_explain_cmd(env.run, tmp / "out", *files)],
               check=lambda value, warned: outputs(tmp / "api-out", value),
               cli_check=lambda result, warned: outputs(tmp / "out", json.loads((tmp / "out" / "predictions.json").read_text())))  # fmt: skip


def _pretrained_fifo(env: Env, tmp: Path) -> Bad:
    fifo = _fifo(tmp / "weights.safetensors")
    return Bad(api=lambda: create_model("se", "resnet8", 10, 1, pretrained=fifo), names=str(fifo),
               cli=[_train_cmd(tmp, "--pretrained", str(fifo))], fresh=[tmp / "trained"])  # fmt: skip


# --- issue 14: your own model class and pretrained weights on the command line


def _factory_train(tmp: Path, spec: str) -> list[str]:
    """`selfcam train --model-factory SPEC` (no --backbone: the factory builds the whole classifier)."""
    cmd = _train_cmd(tmp, "--model-factory", spec)
    i = cmd.index("--backbone")
    return cmd[:i] + cmd[i + 2 :]


def _bad_factory(spec: str) -> Callable[[Env, Path], Bad]:
    def build(env: Env, tmp: Path) -> Bad:
        from selfcam.wrap import model_factory

        return Bad(api=lambda: model_factory(spec), cli=[_factory_train(tmp, spec)], names=spec, fresh=[tmp / "trained"])

    return build


def _pretrained_other_architecture(env: Env, tmp: Path) -> Bad:
    """A .pth state dict of a tiny conv + linear net given to a CIFAR ResNet: the key report, nothing loaded."""
    pth = tmp / "tiny.pth"
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8, 10)).state_dict(), pth)
    return Bad(api=lambda: create_model("se", "resnet8", 10, 1, pretrained=pth), cli=[_train_cmd(tmp, "--pretrained", str(pth))],
               names=str(pth), fresh=[tmp / "trained"])  # fmt: skip


def _pretrained_pickle(env: Env, tmp: Path) -> Bad:
    """A torch.save zip and a raw pickle named .pth whose payload would create a marker: refused by weights_only."""
    zipped = _torch_zip(tmp / "resnet8.pth", tmp / "PWNED")
    raw = tmp / "raw.pth"
    raw.write_bytes(_payload(tmp / "PWNED"))
    return Bad(api=lambda: create_model("se", "resnet8", 10, 1, pretrained=zipped),
               cli=[_train_cmd(tmp, "--pretrained", str(zipped)), _train_cmd(tmp, "--pretrained", str(raw))],
               shown=str(tmp), fresh=[tmp / "trained"], marker=tmp / "PWNED")  # fmt: skip


def _explain_sigterm(env: Env, tmp: Path) -> Bad:
    """SIGTERM between two batches of a rerun: KeyboardInterrupt, as for Ctrl-C; --out keeps the earlier run as it was."""
    import selfcam.explain as E

    files = [_png(tmp / "in" / f"{k}.png", _noise(40 + k, (SIZE, SIZE))) for k in range(3)]
    out = tmp / "explained"
    model, doc = load_checkpoint(env.run)
    explain_files(model, doc, files[:1], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def api() -> Any:
        def terminate(it: Any, total: int) -> Any:
            for k, i in enumerate(it):
                if k == 1:
                    os.kill(os.getpid(), signal.SIGTERM)  # the handler raises at once
                yield i

        try:
            E.explain_files(model, doc, files, out, batch_size=1, progress=terminate)
        except KeyboardInterrupt as e:
            return e
        return None

    def check(value: Any, warned: list[str]) -> None:
        assert isinstance(value, KeyboardInterrupt), value
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no new panel without its predictions.json
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored

    return Bad(api=api, check=check)


# --- family 2: interrupted commands


def _newest_state_corrupt(env: Env, tmp: Path) -> Bad:
    run = Path(shutil.copytree(env.crashed2, tmp / "run"))
    states = sorted((run / "checkpoints").glob("step-*"))
    assert [p.name for p in states] == ["step-000000001", "step-000000002"]  # the last two states are kept
    _cut(states[1] / "state.safetensors")

    def check(state: Any, warned: list[str]) -> None:
        assert state.path == states[0] and state.epoch == 1 and state.global_step == 1

    def cli_check(result: Result, warned: list[str]) -> None:
        assert (run / "config.json").is_file() and not (run / "checkpoints").exists()
        history = json.loads((run / "history.json").read_text())
        assert [row["epoch"] for row in history] == [0, 1, 2], history  # epochs 1 and 2 trained again from step-1

    return Bad(api=lambda: latest_state(run), cli=[["train", "--resume", str(run), "--quiet"]], check=check, cli_check=cli_check)


def _train_sigterm(env: Env, tmp: Path) -> Bad:
    """SIGTERM in the second epoch's step: Lightning's KeyboardInterrupt shutdown (exit status 1), as for Ctrl-C;
    the first epoch's state is resumable."""
    from selfcam import train as T

    def api() -> Any:
        original = T.SelfcamModule.training_step

        def terminate(self: Any, batch: Any, batch_idx: int) -> Any:
            if self.step_offset + self.global_step >= 1:
                os.kill(os.getpid(), signal.SIGTERM)
            return original(self, batch, batch_idx)

        data = load_dataset("cluttered-digits", "train", 8, size=SIZE)
        cfg = T.TrainConfig(epochs=2, batch_size=8)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(T.SelfcamModule, "training_step", terminate)
            try:
                T.fit(create_model("se", "resnet8", 10, 1), data, None, cfg, tmp / "run", progress=False)
            except BaseException as e:  # noqa: BLE001 -- what SIGTERM became is the point
                return e
        return None

    def check(value: Any, warned: list[str]) -> None:
        assert type(value) is SystemExit and value.code == 1, repr(value)  # Lightning's answer to KeyboardInterrupt
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        state = latest_state(tmp / "run")
        assert state is not None and state.epoch == 1 and not (tmp / "run" / "model.safetensors").exists()

    return Bad(api=api, check=check)


def _killed_while_dropping_states(env: Env, tmp: Path) -> Bad:
    """A run killed in its final save after the weights and config are written, while removing checkpoints/
    (one file of it gone): --resume recognises it as finished."""
    from selfcam import train as T

    run = tmp / "run"
    data = load_dataset("cluttered-digits", "train", 8, size=SIZE)
    cfg = T.TrainConfig(epochs=1, batch_size=8)
    real_save, real_rmtree = T.save_checkpoint, shutil.rmtree

    def killed_rmtree(path: Any, *args: Any, **kwargs: Any) -> None:
        first = sorted(p for p in Path(path).rglob("*") if p.is_file())[:1]
        for f in first:
            f.unlink()
        raise KeyboardInterrupt("killed while removing the training states")

    def save_then_arm(*args: Any, **kwargs: Any) -> Any:
        done = real_save(*args, **kwargs)
        shutil.rmtree = killed_rmtree
        return done

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(T, "save_checkpoint", save_then_arm)
        try:
            with pytest.raises(KeyboardInterrupt):
                T.fit(create_model("se", "resnet8", 10, 1), data, None, cfg, run, progress=False)
        finally:
            shutil.rmtree = real_rmtree
    assert (run / "config.json").is_file() and (run / "checkpoints").is_dir()

    def check(history: Any, warned: list[str]) -> None:
        assert [row["epoch"] for row in history] == [0]

    def cli_check(result: Result, warned: list[str]) -> None:
        assert (run / "config.json").is_file()

    return Bad(api=lambda: T.fit(create_model("se", "resnet8", 10, 1), data, None, cfg, run, progress=False, resume=True),
               cli=[["train", "--resume", str(run), "--quiet"]], check=check, cli_check=cli_check)  # fmt: skip


UNREADABLE = r"not an image file Pillow can read \(.+\)"
CASES = [
    # 1. empty, truncated, corrupt image files
    Case("explain-empty-file", "api+cli", InputError, UNREADABLE,
         lambda env, tmp: _explain_file(env, tmp, lambda t: _broken_images(t)[0])),
    Case("explain-truncated-png", "api+cli", InputError, UNREADABLE,
         lambda env, tmp: _explain_file(env, tmp, lambda t: _broken_images(t)[1])),
    Case("explain-corrupt-jpg", "api+cli", InputError, UNREADABLE,
         lambda env, tmp: _explain_file(env, tmp, lambda t: _broken_images(t)[2])),
    Case("explain-truncated-jpg-in-second-batch", "api+cli", InputError, r"cannot decode image \(image file is truncated",
         _truncated_jpeg_second_batch),
    Case("imagefolder-broken-files", "api+cli", None, "", _imagefolder_broken),
    Case("explain-folder-with-broken-files", "api+cli", None, "", _explain_dir_broken),
    # 2. NaN / inf
    Case("model-nan-input", "api", InputError, r"input has 1 NaN or infinite value\(s\) of 512",
         _model_input({(1, 0, 2, 3): float("nan")})),
    Case("model-explain-inf-input", "api", InputError, r"input has 2 NaN or infinite value\(s\) of 512",
         _model_input({(0, 0, 0, 0): float("inf"), (1, 0, 5, 5): -float("inf")}, explain=True)),
    Case("metrics-nan-maps", "api", InputError, r"NaN or inf values in maps \(1 of 512\)", _metrics_nan),
    Case("explain-float-tiff-nan", "api+cli", InputError, r"cannot decode image \(float image with 1 NaN or infinite pixel",
         _float_tiff(_NAN_IMAGE)),
    Case("explain-float-tiff-out-of-range", "api+cli", InputError, r"float image with values in \[0, 255\]",
         _float_tiff(_BIG_IMAGE)),
    # 3. ranks, channel counts, image modes
    Case("model-rank-3", "api", InputError, r"expected input of shape \(N, C, H, W\), got rank 3",
         _model_input(shape=(1, SIZE, SIZE))),
    Case("model-rank-5", "api", InputError, r"got rank 5", _model_input(shape=(1, 1, 1, SIZE, SIZE))),
    Case("model-3-channels-to-1", "api", InputError, r"model takes 1 input channel\(s\), got 3",
         _model_input(shape=(2, 3, SIZE, SIZE))),
    Case("explain-rgba-png-1-channel", "api+cli", None, "", _converted(lambda e: e.run, _rgba, _RGBA_L)),
    Case("explain-cmyk-tiff-3-channels", "api+cli", None, "", _converted(lambda e: e.rgb, _cmyk, _CMYK_RGB)),
    Case("explain-16-bit-png", "api+cli", None, "", _converted(lambda e: e.run, _sixteen_bit, _SIXTEEN_L)),
    # 4. labels out of range
    Case("idx-label-12-of-10", "api+cli", DataError, r"labels must lie in 0\.\.9, found 0\.\.12", _idx_label_12),
    Case("cifar10-label-200", "api+cli", DataError, r"labels must lie in 0\.\.9, found 1\.\.200", _cifar_label_200),
    Case("imagefolder-test-class-not-in-train", "api+cli", None, "", _imagefolder_unknown_class),
    # 5. class count of the data vs the checkpoint
    Case("evaluate-class-count-mismatch", "api+cli", ConfigError,
         r"run \S+ has 10 classes / 1 input channel\(s\) but dataset \S+idx3 has 3 / 1", _class_mismatch),
    # 6. odd names
    Case("explain-odd-file-names", "api+cli", None, "", _odd_names),
    Case("run-dir-odd-name", "api+cli", None, "", _odd_run),
    Case("run-dir-odd-name-broken-weights", "api+cli", CheckpointError, r"not a readable safetensors file", _odd_run_broken),
    # 7. config.json, --head-kwargs, --backbone-kwargs
    Case("config-missing-field", "api+cli", CheckpointError, r"missing fields \['num_classes'\]",
         _config(lambda d: d["model"].pop("num_classes"))),
    Case("config-extra-field", "api+cli", CheckpointError, r"unknown fields \['colour'\]",
         _config(lambda d: d["model"].update(colour="red"))),
    Case("config-wrong-type", "api+cli", CheckpointError, r"model\.num_classes must be int, got '10'",
         _config(lambda d: d["model"].update(num_classes="10"))),
    Case("config-head-kwargs-wrong-type", "api+cli", CheckpointError, r"method 'se' option 'reduction' must be int, got 'x'",
         _config(lambda d: d["model"].update(head_kwargs={"reduction": "x"}))),
    Case("config-data-size-wrong-type", "api+cli", CheckpointError, r"data\.size must be an integer >= 1 \(or null\), got '16'",
         _config(lambda d: d["data"].update(size="16"))),
    Case("config-data-not-an-object", "api+cli", CheckpointError, r"'data' must be an object, got list",
         _config(lambda d: d.update(data=[SIZE]))),
    Case("config-invalid-json", "api+cli", CheckpointError, r"not valid JSON \(Expecting", _config(raw=b'{"model": {"method": ')),
    Case("config-non-utf8", "api+cli", CheckpointError, r"not valid JSON \('utf-8' codec can't decode byte 0xe9",
         _config(raw=b'{"model": {"method": "caf\xe9"}}')),
    Case("config-not-an-object", "api+cli", CheckpointError, r"no 'model' entry", _config(raw=b"[1, 2, 3]")),
    Case("train-head-kwargs-unknown", "api+cli", ConfigError, r"bad option for method 'se': .*unexpected keyword argument 'bogus'",
         _train_options(lambda: create_model("se", "resnet8", 10, 1, bogus=1), "--head-kwargs", '{"bogus": 1}')),
    Case("train-head-kwargs-wrong-type", "api+cli", ConfigError, r"method 'se' option 'reduction' must be int, got 'x'",
         _train_options(lambda: create_model("se", "resnet8", 10, 1, reduction="x"), "--head-kwargs", '{"reduction": "x"}')),
    Case("train-backbone-kwargs-unknown", "api+cli", ConfigError, r"bad option for backbone 'resnet8': .*unexpected keyword argument 'bogus'",
         _train_options(lambda: create_model("se", "resnet8", 10, 1, {"bogus": 1}), "--backbone-kwargs", '{"bogus": 1}')),
    Case("train-backbone-kwargs-wrong-type", "api+cli", ConfigError, r"backbone 'resnet8' option 'stem_stride' must be int, got '2'",
         _train_options(lambda: create_model("se", "resnet8", 10, 1, {"stem_stride": "2"}), "--backbone-kwargs", '{"stem_stride": "2"}')),
    Case("train-kwargs-not-json", "cli", ConfigError, r"--head-kwargs: not valid JSON \(Expecting",
         _train_options(None, "--head-kwargs", "{reduction: 2")),
    # 8. weights files
    Case("weights-truncated", "api+cli", CheckpointError, r"not a readable safetensors file \(.+\)$", _weights(_half_weights)),
    Case("weights-empty", "api+cli", CheckpointError, r"not a readable safetensors file \(.+\)$",
         _weights(lambda env, tmp: b"", "evaluate")),
    Case("weights-wrong-shape", "api+cli", CheckpointError, r"weights do not match config .*head\.fc\.weight \(7, 64\) vs \(10, 64\)",
         _weights(_wrong_shape_weights, "explain")),
    # 9. pickles where safetensors or a run directory belongs; the payload must never run
    Case("weights-are-a-pickle", "api+cli", CheckpointError,
         r"not a readable safetensors file .*it is a Python pickle, and selfcam never unpickles files",
         _weights(lambda env, tmp: _payload(tmp / "PWNED"), "explain")),
    Case("weights-are-a-torch-save-zip", "api+cli", CheckpointError,
         r"not a readable safetensors file .*it is a zip archive, as torch.save writes, and selfcam never unpickles",
         _weights(lambda env, tmp: _torch_zip(tmp / "w.zip", tmp / "PWNED").read_bytes(), "export")),
    Case("checkpoint-is-a-model-pt-file", "api+cli", CheckpointError, r"a file, not a run directory .*zip archive",
         _checkpoint_file("model.pt", _torch_zip, "explain")),
    Case("checkpoint-is-a-ckpt-pickle", "api+cli", CheckpointError, r"a file, not a run directory .*Python pickle",
         _checkpoint_file("last.ckpt", lambda f, marker: f.write_bytes(_payload(marker)), "evaluate")),
    # 10. symbolic-link loops
    Case("imagefolder-symlink-loop", "api", None, "", _imagefolder_loop),
    Case("explain-symlink-loop", "api+cli", None, "", _explain_loop),
    # 11. a damaged training state
    Case("resume-truncated-state-json", "api+cli", CheckpointError, r"not valid JSON", _resume("state.json")),
    Case("resume-truncated-state-tensors", "cli", CheckpointError, r"does not match the checksum", _resume("state.safetensors")),
    # 12. missing paths
    Case("data-idx-missing-path", "api+cli", DataError, r"does not exist", _missing_data("idx")),
    Case("data-cifar10-missing-path", "api+cli", DataError, r"does not exist", _missing_data("cifar10")),
    Case("checkpoint-missing", "api+cli", CheckpointError, r"checkpoint directory not found", _missing_checkpoint),
    Case("explain-missing-file", "api+cli", InputError, r"no such file or directory", _missing_image),
    # 13. export
    Case("export-config-does-not-match-weights", "api+cli", CheckpointError, r"weights do not match config \(lfi on resnet8\)",
         _export_mismatch),
    # issue 18, family 3: special files are refused unopened, wherever selfcam reads
    Case("imagefolder-fifo-image", "api+cli", None, "", _imagefolder_fifo),
    Case("explain-fifo-given", "api+cli", InputError, FIFO, _explain_fifo),
    Case("explain-folder-with-fifo", "api+cli", None, "", _explain_dir_fifo),
    Case("config-is-a-fifo", "api+cli", CheckpointError, FIFO, _run_file_fifo("config.json", every=True)),
    Case("weights-are-a-fifo", "api+cli", CheckpointError, FIFO, _run_file_fifo("model.safetensors", every=False)),
    Case("resume-state-json-fifo", "api+cli", CheckpointError, FIFO, _resume_state_replaced(_fifo)),
    Case("idx-file-is-a-fifo", "api+cli", DataError, FIFO, _idx_replaced("t10k-images-idx3-ubyte", _fifo)),
    # family 3: amplification (compressed inputs, pixel budgets, absurd models and tensors), refused with the limit named
    Case("idx-gz-longer-than-its-header", "api+cli", DataError, r"decompresses to more than the 12 bytes its header's shape \(4,\) needs",
         _idx_replaced("t10k-labels-idx1-ubyte.gz", _gz_longer_than_header)),
    Case("idx-gz-header-over-limit", "api+cli", DataError, r"needs 4,000,000,000 bytes, over selfcam's limit of 2,147,483,648",
         _idx_replaced("t10k-images-idx3-ubyte.gz", _gz_header_too_large)),
    Case("explain-float-tiff-over-pixel-budget", "api+cli", InputError,
         r"9000 x 9000 pixels of mode F decode to 324,000,000 bytes, over selfcam's pixel budget of 268,435,456", _over_pixel_budget),
    Case("config-num-classes-1e9", "api+cli", CheckpointError, r"model\.num_classes = 1000000000 is over selfcam's limit of 100,000",
         _config(lambda d: d["model"].update(num_classes=10**9))),
    Case("train-depth-200000", "api+cli", ConfigError, r"depth 200000 is over selfcam's limit of 1202",
         _api_and_train(lambda: create_model("se", "resnet200000-bottleneck", 10, 1), "--backbone", "resnet200000-bottleneck")),
    Case("train-image-size-100000", "api+cli", ConfigError, r"size = 100000 is over selfcam's limit of 4,096",
         _api_and_train(lambda: load_dataset("cluttered-digits", "train", 8, size=100_000), "--image-size", "100000")),
    # family 4: silent wrong answers
    Case("train-image-size-0", "api+cli", ConfigError, r"size must be an integer >= 1, got 0",
         _api_and_train(lambda: load_dataset("cluttered-digits", "train", 8, size=0), "--image-size", "0")),
    Case("weights-nan-and-inf", "api+cli", CheckpointError, r"NaN or infinite weights in 2 tensor\(s\): head\.fc\.(bias|weight)",
         _weights(_nan_weights, "explain")),
    Case("imagefolder-9998-empty-class-folders", "api+cli", DataError, r"9998 of its 10000 class folders hold no image files",
         _empty_class_folders),
    Case("exif-jpeg-one-loader", "api+cli", None, "", _one_loader),
    # family 5: nothing in a run's files reaches a loader that reads files
    Case("config-timm-checkpoint-path", "api+cli", CheckpointError, r"option\(s\) 'checkpoint_path' refused",
         _config_loader({"backbone": "timm:resnet10t", "backbone_kwargs": {"checkpoint_path": "FIFO"}})),
    Case("config-timm-pretrained-cfg-overlay", "api+cli", CheckpointError, r"option\(s\) 'pretrained_cfg_overlay' refused",
         _config_loader({"backbone": "timm:resnet10t", "backbone_kwargs": {"pretrained_cfg_overlay": {"file": "FIFO"}}})),
    Case("config-timm-hub-name", "api+cli", CheckpointError, r"timm model name 'hf-hub:timm/resnet10t\.a1_in1k' refused",
         _config_loader({"backbone": "timm:hf-hub:timm/resnet10t.a1_in1k"})),
    Case("config-wrapped-model-kwargs-checkpoint-path", "api+cli", CheckpointError, r"option\(s\) 'checkpoint_path' refused",
         _config_loader({"method": "plain", "backbone": "wrap:timm:resnet10t", "backbone_kwargs": {"model_kwargs": {"checkpoint_path": "FIFO"}}})),
    Case("train-backbone-kwargs-checkpoint-path", "api+cli", ConfigError, r"option\(s\) 'checkpoint_path' refused", _train_loader_option),
    # family 6: tracebacks that remained
    Case("config-json-nested-too-deep", "api+cli", CheckpointError, r"refused: JSON nested deeper than 64 levels",
         _config(raw=b'{"model": {"method": "se", "head_kwargs": {"x": ' + _deep(100_000).encode() + b"}}}")),
    Case("config-json-huge-integer", "api+cli", CheckpointError, r"refused: an integer of 5001 digits",
         _config(raw=b'{"model": {"method": "se", "backbone": "resnet8", "num_classes": 1' + b"0" * 5000 + b"}}")),
    Case("resume-state-json-nested-too-deep", "api+cli", CheckpointError, r"refused: JSON nested deeper than 64 levels",
         _resume_state_replaced(lambda p: p.write_text('{"history": ' + _deep(5000) + "}"))),
    Case("train-head-kwargs-nested-too-deep", "cli", ConfigError, r"--head-kwargs: refused: JSON nested deeper than 64 levels",
         _train_options(None, "--head-kwargs", '{"reduction": ' + _deep(100_000) + "}")),
    Case("train-head-kwargs-huge-integer", "cli", ConfigError, r"--head-kwargs: refused: an integer of 5000 digits",
         _train_options(None, "--head-kwargs", '{"reduction": ' + "9" * 5000 + "}")),
    Case("imagefolder-one-class", "api+cli", DataError, r"only 1 class \('a'\); a classifier needs at least two classes", _one_class),
    Case("idx-zero-sized-dims", "api+cli", DataError, r"the header's shape \(0, 8, 8\) has a dimension of 0",
         _idx_replaced("t10k-images-idx3-ubyte", lambda p: p.write_bytes(_idx(np.zeros((0, 8, 8), np.uint8))))),
    Case("idx-dims-overflow", "api+cli", DataError, r"the header's shape \(2097152, 2097152, 4194304\) of uint8 needs 18,446,744,073,709,551,616 bytes",
         _idx_replaced("t10k-images-idx3-ubyte", lambda p: p.write_bytes(struct.pack(">BBBBIII", 0, 0, 8, 3, 2**21, 2**21, 2**22)))),
    Case("train-weight-decay-nan", "api+cli", ConfigError, r"weight_decay >= 0, got 0\.003, nan|--weight-decay must be a finite number >= 0, got nan",
         _api_and_train(lambda: __import__("selfcam.train").train.TrainConfig(weight_decay=float("nan")), "--weight-decay", "nan",
                        shown="--weight-decay must be")),  # the CLI names the option as typed
    Case("train-accelerator-gpu-without-gpu", "api+cli", ConfigError, r"accelerator gpu: no GPU is available here", _gpu_without_gpu),
    Case("disk-full", "api+cli", OutputError, r"cannot write.*File too large", _disk_full),
    # family 1: outputs
    Case("train-out-foreign-folder", "api+cli", OutputError, r"is a folder selfcam did not create .*refused, nothing in it is changed",
         _foreign_out),
    Case("export-out-onto-the-runs-weights", "api+cli", OutputError, r"points at a file of the run .*would destroy the run",
         _out_onto_run("export")),
    Case("report-out-onto-the-runs-config", "api+cli", OutputError, r"points at a file of the run .*would destroy the run",
         _out_onto_run("report")),
    Case("explain-out-is-the-input-folder", "api+cli", OutputError, r"--out (is|holds) the input .*would overwrite their inputs",
         _explain_into_inputs),
    Case("explain-out-foreign-folder", "api+cli", OutputError, r"is a folder selfcam explain did not create .*nothing in it is changed",
         _explain_foreign_out),
    Case("explain-failed-rerun-keeps-the-earlier-run", "api+cli", InputError, r"cannot decode image \(image file is truncated",
         _explain_failed_rerun),
    Case("explain-same-name-in-two-folders", "api+cli", None, "", _same_names),
    Case("pretrained-weights-fifo", "api+cli", InputError, FIFO, _pretrained_fifo),
    Case("explain-sigterm-between-batches", "api", None, "", _explain_sigterm),
    # family 2: interrupted commands
    Case("resume-newest-state-corrupt", "api+cli", None, "", _newest_state_corrupt),
    Case("train-sigterm-in-an-epoch", "api", None, "", _train_sigterm),
    Case("train-killed-while-removing-its-states", "api+cli", None, "", _killed_while_dropping_states),
    # issue 14: your own model and pretrained weights
    Case("model-factory-not-importable", "api+cli", ConfigError,
         r"--model-factory 'selfcam_no_such_module:build': cannot import 'selfcam_no_such_module': no module named "
         r"'selfcam_no_such_module' \(not in the current directory nor on PYTHONPATH\)", _bad_factory("selfcam_no_such_module:build")),
    Case("model-factory-not-callable", "api+cli", ConfigError, r"--model-factory 'math:pi': pi is a float, not a function or class",
         _bad_factory("math:pi")),
    Case("pretrained-weights-of-another-architecture", "api+cli", ConfigError,
         r"weights do not match Backbone \(nothing fits: weights of another architecture\?\): .*tiny\.pth: 0 tensors fit, "
         r"\d+ missing .*, 4 unexpected \['0\.weight', '0\.bias', '2\.weight'\] \.\.\., 0 of another shape", _pretrained_other_architecture),
    Case("pretrained-pth-pickle-runs-code", "api+cli", InputError,
         r"\.pth: refused: loading it would import open\. selfcam reads \.pth files only through "
         r"torch\.load\(weights_only=True\), which never runs code from a file", _pretrained_pickle),
]  # fmt: skip


# ---------------------------------------------------------------------------------------------- the checks


@contextlib.contextmanager
def _deadline(seconds: float = DEADLINE_S) -> Iterator[None]:
    """Raise TimeoutError in the main thread when the block runs longer than ``seconds`` (no hang)."""

    def fail(signum: int, frame: Any) -> None:
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def _warnings() -> Iterator[list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        messages: list[str] = []
        yield messages
    messages += [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def _leftovers(bad: Bad) -> list[Path]:
    """Files a failed call left behind: anything in a fresh --out; temporary or orphaned files in a run;
    a file that had to be kept, missing or changed."""
    left = [p for p in bad.kept if not p.is_file() or p.read_bytes() != bad.snapshot[p]]
    if bad.listing is not None:
        left += sorted(set(bad.listing.rglob("*")) ^ set(bad.before))
    for out in bad.fresh:
        left += [out] if out.is_file() else sorted(out.rglob("*")) if out.is_dir() else []
    if bad.run is not None:
        left += [p for p in bad.run.rglob("*") if p.name.startswith(".") or ".tmp" in p.name]
        left += [p for p in bad.run.rglob("model.safetensors") if not (p.parent / "config.json").is_file()]
    return left


def _by_via(kind: str) -> list[Any]:
    return [pytest.param(c, id=c.id) for c in CASES if kind in c.via.split("+")]


@contextlib.contextmanager
def _file_limit(limit: int | None) -> Iterator[None]:
    """Writes of files past ``limit`` bytes fail (EFBIG; Python ignores SIGXFSZ), as writes on a full disk do."""
    if limit is None:
        yield
        return
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def _invoke(args: list[str], file_limit: int | None = None) -> tuple[Result, list[str]]:
    with _warnings() as warned, _deadline(), _file_limit(file_limit):
        result = runner.invoke(app, args)
    return result, warned


def test_the_table_is_sound() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and all(re.fullmatch(r"[a-z0-9-]+", i) for i in ids)
    for c in CASES:
        assert c.via in ("api", "cli", "api+cli")
        assert c.error is None or (issubclass(c.error, SelfcamError) and c.match), c.id


@pytest.mark.parametrize("case", _by_via("api"))
def test_api(case: Case, env: Env, tmp_path: Path) -> None:
    bad = case.build(env, tmp_path)
    assert bad.api is not None
    with _warnings() as warned, _deadline(), _file_limit(bad.file_limit):
        if case.error is None:
            value = bad.api()
        else:
            with pytest.raises(SelfcamError) as e:
                bad.api()
    if case.error is None:
        assert bad.check is not None
        bad.check(value, warned)
    else:
        assert type(e.value) is case.error, f"{type(e.value).__name__}: {e.value}"
        message = str(e.value)
        assert re.search(case.match, message), message
        assert bad.names is None or bad.names in message, message
    assert _leftovers(bad) == []
    assert bad.marker is None or not bad.marker.exists(), "a pickle payload was executed"


@pytest.mark.parametrize("case", _by_via("cli"))
def test_cli(case: Case, env: Env, tmp_path: Path) -> None:
    bad = case.build(env, tmp_path)
    assert bad.cli
    for args in bad.cli:
        result, warned = _invoke(args, bad.file_limit)
        if case.error is None:
            assert result.exit_code == 0, (args, result.output, result.exception)
            assert bad.cli_check is not None
            bad.cli_check(result, warned)
            continue
        assert result.exit_code == 2, (args, result.output, result.exception)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, result.stderr)
        assert re.search(case.match, lines[0]), lines[0]
        shown = bad.shown or bad.names
        assert shown is None or shown in lines[0], (shown, lines[0])
        assert "Traceback" not in result.output
        assert _leftovers(bad) == [], args
    assert bad.marker is None or not bad.marker.exists(), "a pickle payload was executed"


@pytest.mark.parametrize("case", [p for p in _by_via("cli") if p.values[0].error is not None])
def test_cli_debug_raises_instead(case: Case, env: Env, tmp_path: Path) -> None:
    bad = case.build(env, tmp_path)
    result, _ = _invoke(["--debug", *bad.cli[0]], bad.file_limit)
    assert result.exit_code == 1 and type(result.exception) is case.error, (result.output, result.exception)
    assert re.search(case.match, str(result.exception))
    trace = "".join(traceback.format_exception(*result.exc_info))  # what the terminal shows
    assert trace.startswith("Traceback") and f"selfcam.errors.{case.error.__name__}: " in trace


# ---------------------------------------------------------------------------------------------- beyond the table


def test_the_pickle_payloads_are_live(tmp_path: Path) -> None:
    """The payloads of the pickle rows do run when unpickled: the rows' 'no marker' checks can fail."""
    import pickle

    marker = tmp_path / "ran-raw"
    pickle.loads(_payload(marker)).close()  # noqa: S301 -- the point of this test
    assert marker.exists()
    zipped = _torch_zip(tmp_path / "model.pt", tmp_path / "ran-zip")
    with contextlib.suppress(Exception):  # what the payload returns is no tensor; it has run by then
        torch.load(zipped, weights_only=False)  # noqa: S614
    assert (tmp_path / "ran-zip").exists()


@pytest.mark.slow
def test_real_console_script_in_the_c_locale(env: Env, tmp_path: Path) -> None:
    """``python -m selfcam`` with ASCII stdio: the broken run with a non-UTF-8 and newline name is one escaped line."""
    bad = _odd_run_broken(env, tmp_path)
    environ = {**os.environ, "LC_ALL": "C", "LANG": "C", "OMP_NUM_THREADS": "1"}
    environ.pop("PYTHONUTF8", None)
    environ.pop("PYTHONIOENCODING", None)
    proc = subprocess.run([sys.executable, "-m", "selfcam", *bad.cli[0]], capture_output=True, env=environ, timeout=300)
    lines = [line for line in proc.stderr.decode("utf-8", "replace").splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and bad.shown in lines[0] and "not a readable safetensors file" in lines[0], lines[0]


def test_every_case_is_in_the_doc() -> None:
    text = DOC.read_text(encoding="utf-8")
    rows = set(re.findall(r"^\| `([a-z0-9-]+)` \|", text, flags=re.M))
    assert rows == {c.id for c in CASES}, f"missing: {sorted({c.id for c in CASES} - rows)}, stale: {sorted(rows - {c.id for c in CASES})}"
    assert f"**{len(CASES)} bad inputs**" in text


_SIGTERM_SCRIPT = """
import os, signal, sys
which = sys.argv[1]
if which == "explain":
    import selfcam.explain as E
    original, calls = E._panels, []

    def patched(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second batch
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    E._panels = patched
else:
    import selfcam.train as T
    original = T.SelfcamModule.training_step

    def patched(self, batch, batch_idx):
        if self.step_offset + self.global_step >= 1:  # in the second epoch
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, batch, batch_idx)

    T.SelfcamModule.training_step = patched
from selfcam.cli import app
app(sys.argv[2:], prog_name="selfcam")
"""


@pytest.mark.parametrize("command", ["explain", "train"])
def test_sigterm_through_the_cli_is_handled_as_sigint(command: str, env: Env, tmp_path: Path) -> None:
    """A real SIGTERM to a real `selfcam explain` / `selfcam train` process (corpus rows explain-sigterm-between-batches,
    train-sigterm-in-an-epoch, through the command line): it is not killed by the signal but shuts down as for Ctrl-C
    (exit status 130 for explain, 1 for train); explain's --out keeps the earlier run's files exactly, train's first epoch is resumable."""
    out = tmp_path / ("explained" if command == "explain" else "trained")
    if command == "explain":
        files = [_png(tmp_path / "in" / f"{k}.png", _noise(50 + k, (SIZE, SIZE))) for k in range(3)]
        assert runner.invoke(app, _explain_cmd(env.run, out, files[0])).exit_code == 0
        before = {p: p.read_bytes() for p in out.rglob("*")}
        args = _explain_cmd(env.run, out, *files, extra=("--batch-size", "1"))
    else:
        args = [*_train_cmd(tmp_path, "--batch-size", "8"), "--epochs", "2"]
    environ = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _SIGTERM_SCRIPT, command, *args], capture_output=True, env=environ, timeout=300)
    # shut down as for Ctrl-C: explain exits 130 (interrupted), train 1 (Lightning's graceful stop); -15 would be: killed
    assert proc.returncode == (130 if command == "explain" else 1), (proc.returncode, proc.stderr[-2000:])
    if command == "explain":
        assert {p: p.read_bytes() for p in out.rglob("*")} == before  # no panel without its predictions.json, nothing hidden
    else:
        state = latest_state(out)
        assert state is not None and state.epoch == 1 and not (out / "model.safetensors").exists()
        assert runner.invoke(app, ["train", "--resume", str(out), "--quiet"]).exit_code == 0
        assert (out / "config.json").is_file() and not (out / "checkpoints").exists()
