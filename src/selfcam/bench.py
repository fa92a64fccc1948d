"""Benchmarks: map latency of the heads against post-hoc CAMs, and our metrics against peers.

Two plain functions return JSON-ready dicts (tests call them directly) and two thin
typer commands under ``bench_app`` write them to a file and print a rich table:

- :func:`latency` times one map per image (batch 1) for the plain model, every head
  and grad-cam's Grad-CAM, Grad-CAM++ and Score-CAM on the plain model, all on one
  backbone, interleaved across repeats so that clock or thermal drift hits all alike.
- :func:`metric_agreement` runs :mod:`selfcam.metrics` and the peer implementation
  (Quantus, grad-cam) of the same metric on the same images, maps and model, and
  reports both wall times and the largest absolute difference of the values.

The peers are imported inside :func:`metric_agreement` only: the metric code itself
never uses them. See ``docs/benchmarks.md`` for how to run both and what we measured.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import typer
from rich.console import Console
from rich.table import Table
from torch import Tensor

from .errors import ConfigError, InputError, require_int
from .model import SelfExplainer, create_model

__all__ = [
    "bench_app",
    "latency",
    "metric_agreement",
    "latency_table",
    "agreement_table",
    "HEAD_METHODS",
    "POSTHOC_LATENCY",
    "LATENCY_METHODS",
    "METRIC_NAMES",
]

HEAD_METHODS = ("plain", "lfi", "lfi-light", "se", "abn")
POSTHOC_LATENCY = ("gradcam", "gradcam++", "scorecam")
LATENCY_METHODS = HEAD_METHODS + POSTHOC_LATENCY
SLOW = ("scorecam",)  # one map is hundreds of forward passes: timed ``scorecam_repeats`` times, no warm-up

bench_app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Benchmarks: map latency, and our metrics against Quantus and grad-cam."
)
console = Console()


# --- shared helpers ---------------------------------------------------------------


def _device(name: str | torch.device | None) -> torch.device:
    """``None`` picks CUDA when available, else the CPU."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"unknown device {name!r}: {e}") from e


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Run with ``torch.set_num_threads(n)`` (``None``: leave it), restoring the old count on exit."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    threads = torch.get_num_threads()
    return f"{device.type} ({threads} thread{'s' if threads > 1 else ''})"


def sync(device: torch.device) -> None:
    """Wait for the device's queue, so wall times include the work (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _time_ms(fn: Callable[[Tensor], Any], x: Tensor) -> float:
    """Wall time of ``fn(x)`` in milliseconds, with the device's queue drained on both sides."""
    sync(x.device)
    t0 = time.perf_counter()
    fn(x)
    sync(x.device)
    return 1000 * (time.perf_counter() - t0)


def _methods(methods: Sequence[str] | str | None, known: Sequence[str], option: str) -> list[str]:
    """Validate a method list (a sequence or a comma-separated string); keeps ``known``'s order."""
    if methods is None:
        return list(known)
    chosen = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else list(methods)
    chosen = [m for m in chosen if m]
    unknown = [m for m in chosen if m not in known]
    if unknown or not chosen:
        what = f"unknown name(s) {', '.join(unknown)}" if unknown else "nothing chosen"
        raise ConfigError(f"{option}: {what}; choose from {', '.join(known)}")
    return [m for m in known if m in chosen]


def _positive(**values: int) -> None:
    for name, value in values.items():
        require_int(name, value)


def _json_target(path: Path) -> Path:
    """Fail before a long run, not after it, when the JSON file cannot be written."""
    if not path.parent.is_dir():
        raise ConfigError(f"--json {path}: directory {path.parent} does not exist")
    return path


def _show(table: Table) -> None:
    """Print a table at least 150 columns wide (a pipe or a test runner would get 80 and truncate the cells)."""
    Console(width=max(console.width, 150)).print(table)


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


# --- latency -----------------------------------------------------------------------


def _rounds(repeats: int, k: int) -> set[int]:
    """``k`` of the ``repeats`` rounds, spread evenly (where the slow methods are timed)."""
    k = min(k, repeats)
    return {round(i * repeats / k) for i in range(k)}


def _interleaved(
    runners: dict[str, Callable[[Tensor], Any]], x: Tensor, repeats: int, warmup: int, slow_rounds: set[int]
) -> dict[str, list[float]]:
    """Milliseconds of each runner per timed round; round ``r`` starts at runner ``r mod len``.

    ``warmup`` untimed rounds come first; the :data:`SLOW` runners run only in ``slow_rounds``.
    """
    names = list(runners)
    times: dict[str, list[float]] = {m: [] for m in names}
    for r in range(-warmup, repeats):
        k = r % len(names)
        for m in names[k:] + names[:k]:
            if m in SLOW and r not in slow_rounds:
                continue
            t = _time_ms(runners[m], x)
            if r >= 0:
                times[m].append(t)
    return times


def _compile_ratios(
    models: dict[str, SelfExplainer], x: Tensor, repeats: int, warmup: int, eager_ms: dict[str, float]
) -> dict[str, dict[str, Any]]:
    """Per head: ``{"ms", "speedup" = eager / compiled}``, or ``{"unavailable": reason}``.

    Any failure of ``torch.compile`` (no C++ compiler, an unsupported op...) is caught:
    compiling is optional, and the reason is what the user needs to see.
    """
    compiled: dict[str, Callable[[Tensor], Any]] = {}
    out: dict[str, dict[str, Any]] = {}
    for name, model in models.items():
        try:
            fn = torch.compile(model.explain)
            with torch.inference_mode():
                for _ in range(max(1, warmup)):  # the first call compiles
                    fn(x)
            compiled[name] = fn
        except Exception as e:  # noqa: BLE001 - reported, never fatal
            reason = (str(e).strip().splitlines() or [""])[0][:200]
            out[name] = {"unavailable": f"{type(e).__name__}: {reason}"}
    times: dict[str, list[float]] = {name: [] for name in compiled}
    with torch.inference_mode():
        for _ in range(repeats):
            for name, fn in compiled.items():
                times[name].append(_time_ms(fn, x))
    for name, ts in times.items():
        ms = statistics.median(ts)
        out[name] = {"ms": ms, "speedup": eager_ms[name] / ms}
    return {name: out[name] for name in models}


def latency(
    backbone: str = "resnet18",
    size: int = 224,
    repeats: int = 20,
    methods: Sequence[str] | str | None = None,
    scorecam_repeats: int = 3,
    warmup: int = 3,
    compile: bool = False,
    device: str | torch.device | None = None,
    num_classes: int = 1000,
    in_chans: int = 3,
    backbone_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
    threads: int | None = None,
    pretrained: str | None = None,
) -> dict[str, Any]:
    """Median milliseconds per map (batch 1, ``size x size`` input) for each method.

    ``backbone`` may be ``wrap:timm:NAME`` / ``wrap:torchvision:NAME``: every model is then that classifier
    wrapped by :func:`selfcam.wrap`, and the unwrapped classifier's own forward pass is timed as well
    (``"original"``; ``ratio_to_original``), the reference of "a head adds at most x %". ``pretrained``:
    weights (a file or a known name, e.g. ``efficientnet-lite0``) loaded into every model first.

    Heads and ``plain``: ``model.explain(x)`` under ``torch.inference_mode`` (logits and
    the map at input size from one forward pass). ``gradcam``, ``gradcam++``,
    ``scorecam``: :func:`selfcam.posthoc.posthoc_map` on the plain model (its forward
    for the predicted class, then grad-cam's map). All models share ``backbone`` with
    random weights, in eval mode. Each round times every method once, starting at a
    different method each round; ``warmup`` untimed rounds come first. Score-CAM
    runs one forward pass per feature channel (512 for ResNet-18), so it is timed in
    only ``scorecam_repeats`` rounds spread over the run and skips the warm-up (the
    plain model it runs is already warm). ``plain`` is always measured: it is the
    reference of ``ratio_to_plain``. With ``compile=True`` each head is also timed
    after ``torch.compile``; failures are reported, not raised. ``threads`` sets
    torch's CPU thread count for the run (restored after).

    Returns ``{"backbone", "size", "device", "repeats", "scorecam_repeats", "ms",
    "ratio_to_plain", "speedup_vs", "goals"[, "compile"]}`` (``speedup_vs[head]`` holds
    the post-hoc method's time over the head's; ``goals`` the issue's targets met or not).
    """
    from .posthoc import posthoc_map

    _positive(size=size, repeats=repeats, scorecam_repeats=scorecam_repeats, num_classes=num_classes, in_chans=in_chans)
    if threads is not None:
        _positive(threads=threads)
    if not isinstance(warmup, int) or warmup < 0:
        raise ConfigError(f"warmup must be an integer >= 0, got {warmup!r}")
    chosen = _methods(methods, LATENCY_METHODS, "--methods")
    if "plain" not in chosen:
        chosen.insert(0, "plain")
    dev = _device(device)
    with torch.random.fork_rng():  # seeded weights and input; the caller's RNG state is left alone
        torch.manual_seed(seed)
        models = {m: create_model(m, backbone, num_classes, in_chans, backbone_kwargs, pretrained=pretrained).to(dev).eval()
                  for m in chosen if m in HEAD_METHODS}  # fmt: skip
        x = torch.randn(1, in_chans, size, size).to(dev)
    plain = models["plain"]
    original = _original(backbone, backbone_kwargs, pretrained, dev) if backbone.startswith("wrap:") else None

    def head_fn(model: SelfExplainer) -> Callable[[Tensor], Any]:
        def run(inp: Tensor) -> Any:
            with torch.inference_mode():
                return model.explain(inp)

        return run

    def posthoc_fn(method: str) -> Callable[[Tensor], Any]:
        def run(inp: Tensor) -> Any:
            with contextlib.redirect_stderr(io.StringIO()):  # Score-CAM's tqdm bar
                return posthoc_map(plain, inp, method)

        return run

    runners = {m: head_fn(models[m]) if m in models else posthoc_fn(m) for m in chosen}
    if original is not None:
        runners = {"original": _forward_fn(original), **runners}
    with _threads(threads):
        described = _describe(dev)
        times = _interleaved(runners, x, repeats, warmup, _rounds(repeats, scorecam_repeats))
        ms = {m: statistics.median(ts) for m, ts in times.items()}
        compiled = _compile_ratios(models, x, repeats, warmup, ms) if compile else None
    heads = [m for m in chosen if m in HEAD_METHODS and m != "plain"]
    doc: dict[str, Any] = {
        "backbone": backbone,
        "size": size,
        "device": described,
        "torch": torch.__version__,
        "repeats": repeats,
        "scorecam_repeats": min(scorecam_repeats, repeats),
        "samples": {m: len(ts) for m, ts in times.items()},
        "ms": ms,
        "ratio_to_plain": {m: t / ms["plain"] for m, t in ms.items()},
        "speedup_vs": {h: {p: ms[p] / ms[h] for p in POSTHOC_LATENCY if p in ms} for h in heads},
        "params": {m: count_params(models[m]) for m in models},
        "params_added_pct": {m: 100 * (count_params(models[m]) / count_params(models["plain"]) - 1) for m in models},
    }
    if original is not None:
        doc["ratio_to_original"] = {m: t / ms["original"] for m, t in ms.items()}
        doc["params"]["original"] = count_params(original)
    doc["goals"] = _latency_goals(doc)
    if compiled is not None:
        doc["compile"] = compiled
    return doc


# the targets: ratio to plain at most this; at least this many times faster than the post-hoc map
_RATIO_GOAL = {"lfi": 1.35, "lfi-light": 1.10, "se": 1.10}
_SPEEDUP_GOAL = {"gradcam": 2.7, "scorecam": 300.0}


def _original(backbone: str, backbone_kwargs: dict[str, Any] | None, pretrained: str | None, dev: torch.device) -> torch.nn.Module:
    """The classifier a ``wrap:NAME`` backbone wraps, as it is (with ``pretrained`` loaded), in eval mode."""
    from .pretrained import load_pretrained
    from .wrap import named_model

    model = named_model(backbone.removeprefix("wrap:"), dict(backbone_kwargs or {}))
    if pretrained is not None:
        load_pretrained(model, pretrained)
    return model.to(dev).eval()


def _forward_fn(model: torch.nn.Module) -> Callable[[Tensor], Any]:
    def run(inp: Tensor) -> Any:
        with torch.inference_mode():
            return model(inp)

    return run


def _latency_goals(doc: dict[str, Any]) -> dict[str, bool]:
    """``{"lfi <= 1.35x plain": True, "se >= 300x faster than scorecam": False, ...}`` for what was measured
    (with a wrapped backbone, the heads against the original classifier's forward pass instead of plain)."""
    goals: dict[str, bool] = {}
    ratios, against = (doc["ratio_to_original"], "the original") if "ratio_to_original" in doc else (doc["ratio_to_plain"], "plain")
    for head, limit in _RATIO_GOAL.items():
        if head in ratios:
            goals[f"{head} <= {limit:g}x {against}"] = ratios[head] <= limit
    for head, speedups in doc["speedup_vs"].items():
        for method, limit in _SPEEDUP_GOAL.items():
            if method in speedups:
                goals[f"{head} >= {limit:g}x faster than {method}"] = speedups[method] >= limit
    return goals


def latency_table(doc: dict[str, Any]) -> Table:
    """The rich table of a :func:`latency` document."""
    posthoc = [p for p in POSTHOC_LATENCY if p in doc["ms"]]
    table = Table(title=f"map latency, {doc['backbone']} at {doc['size']} px, batch 1, {doc['device']}")
    original = "ratio_to_original" in doc
    for col in ["method", "ms / image", "x plain", *(["x original"] if original else []), *(f"speed-up vs {p}" for p in posthoc)]:
        table.add_column(col, justify="left" if col == "method" else "right")
    if "compile" in doc:
        table.add_column("torch.compile", justify="right")
    for m, t in doc["ms"].items():
        row = [m, f"{t:.2f}", f"{doc['ratio_to_plain'][m]:.2f}", *([f"{doc['ratio_to_original'][m]:.2f}"] if original else [])]
        row += [f"{doc['speedup_vs'][m][p]:.1f}x" if m in doc["speedup_vs"] else "" for p in posthoc]
        if "compile" in doc:
            c = doc["compile"].get(m)
            row.append("" if c is None else f"{c['speedup']:.2f}x" if "speedup" in c else "unavailable")
        table.add_row(*row)
    return table


@bench_app.command("latency")
def latency_cmd(
    backbone: str = typer.Option("resnet18", "--backbone", help="Backbone shared by every model; wrap:timm:NAME or "
                                 "wrap:torchvision:NAME wraps that classifier and times its own forward too."),
    size: int = typer.Option(224, "--size", help="Input side in pixels (batch 1)."),
    json_path: Path = typer.Option(..., "--json", help="Where to write the results."),
    repeats: int = typer.Option(20, "--repeats", help="Timed rounds (after the warm-up)."),
    methods: Optional[str] = typer.Option(None, "--methods", help=f"Comma-separated subset of {','.join(LATENCY_METHODS)}."),
    scorecam_repeats: int = typer.Option(3, "--scorecam-repeats", help="Score-CAM is timed in this many rounds only."),
    warmup: int = typer.Option(3, "--warmup", help="Untimed rounds first (Score-CAM skips them)."),
    compile: bool = typer.Option(False, "--compile", help="Also time each head after torch.compile."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1... (default: cuda if available)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads (default: torch's)."),
    pretrained: Optional[str] = typer.Option(None, "--pretrained", help="Weights for every model: a file or a known "
                                             "name (efficientnet-lite0, with --backbone wrap:timm:efficientnet_lite0)."),
) -> None:
    """Median map latency per image: plain model, each head, Grad-CAM, Grad-CAM++, Score-CAM."""
    _json_target(json_path)
    doc = latency(backbone, size, repeats, methods, scorecam_repeats, warmup, compile, device, threads=threads, pretrained=pretrained)
    _write_json(json_path, doc)
    _show(latency_table(doc))
    for goal, met in doc["goals"].items():
        console.print(f"{'met' if met else 'NOT met'}: {goal}", highlight=False)
    for head, c in doc.get("compile", {}).items():
        if "unavailable" in c:
            console.print(f"torch.compile unavailable for {head}: {c['unavailable']}", markup=False, highlight=False)
    console.print(f"wrote {json_path}", markup=False, highlight=False)


# --- metric agreement --------------------------------------------------------------


@dataclass
class _Case:
    """One metric, two implementations of the same work (each returns values of one shape), and its floor.

    ``passes``: forward passes of the ``N`` images the metric needs (0: it calls no model);
    ``sequential``: each pass runs other weights (cascading randomization), so they cannot
    share a batch. ``peer`` is None where no peer computes the same thing (timed for the floor only).
    ``work_floor``: where the metric's unavoidable work is more than forward passes, that work and
    nothing else (ROAD: the forwards and one batched imputation solve; cascading randomization: the
    explain calls), built outside the timing, and ``work_note`` saying what it is.
    """

    peer: str | None
    ours: Callable[[], Any]
    theirs: Callable[[], Any] | None
    note: str
    passes: int = 0
    sequential: bool = False
    work_floor: Callable[[], Any] | None = None
    work_note: str = ""


def _array(values: Any) -> np.ndarray:
    if isinstance(values, Tensor):
        values = values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64)


def _max_abs_diff(a: Any, b: Any) -> float:
    """Largest ``|a - b|``; a NaN on both sides counts as equal, on one side as ``inf``."""
    a, b = _array(a), _array(b)
    if a.shape != b.shape:
        raise ConfigError(f"cannot compare values of shapes {a.shape} and {b.shape}")
    both = np.isnan(a) & np.isnan(b)
    diff = np.where(both, 0.0, np.abs(a - b))
    return float(np.nan_to_num(diff, nan=np.inf).max(initial=0.0))


def _wall_sides(sides: dict[str, Callable[[], Any]], repeats: int, warmup: int,
                device: torch.device) -> tuple[dict[str, float], dict[str, Any]]:  # fmt: skip
    """Median seconds and last values of each side (ours, the peer's, the floor), timed in turn.

    ``warmup`` untimed calls per side first; then ``repeats`` rounds, each timing every
    side, round ``r`` starting at side ``r mod len`` so load changes hit all alike. The
    peers' console notices and numpy warnings are silenced (they are not our output).
    """
    names = list(sides)
    times: dict[str, list[float]] = {m: [] for m in names}
    values: dict[str, Any] = {}
    for r in range(-warmup, repeats):
        k = r % len(names)
        for side in names[k:] + names[:k]:
            fn = sides[side]
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sync(device)
                t0 = time.perf_counter()
                values[side] = fn()
                sync(device)
                elapsed = time.perf_counter() - t0
            if r >= 0:
                times[side].append(elapsed)
    return {m: statistics.median(ts) for m, ts in times.items()}, values


def _tie_free(maps: Tensor, weight: float = 1e-3) -> Tensor:
    """``(1 - weight) maps + weight rank / (HW - 1)``: same order, ties broken row-major first, ``(N, H, W)``.

    A ReLU'd, upsampled CAM has many exactly equal pixels. Quantus orders ties with
    numpy's unstable argsort, grad-cam by percentile thresholds, selfcam by a
    stable sort (row-major first); tie-breaking is a convention, not part of any
    metric, so the comparison runs on maps without ties. Values stay in [0, 1].
    """
    from .metrics import _ranks  # the metrics' own stable ranking, so both orders are one order

    n, h, w = maps.shape
    rank = _ranks(maps, descending=False)  # (N, HW)
    out = (1 - weight) * maps.flatten(1) + weight * rank.to(maps.dtype) / max(h * w - 1, 1)
    ordered = out.sort(dim=1).values
    if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
        raise InputError("maps still hold ties after tie-breaking (images too large for the float precision)")
    return out.view(n, h, w)


def _divisor_steps(pixels: int, most: int = 20) -> int:
    """The largest step count <= ``most`` that splits ``pixels`` evenly (Quantus removes a fixed count per step)."""
    return max(d for d in range(1, most + 1) if pixels % d == 0)


def _agreement_cases(
    model: SelfExplainer, x: Tensor, target: Tensor, maps: Tensor, masks: Tensor, seed: int
) -> dict[str, _Case]:
    """Our metric and the peer's on the same images, maps, masks, targets and model."""
    import quantus
    from pytorch_grad_cam.metrics.cam_mult_image import CamMultImageConfidenceChange, IncreaseInConfidence
    from pytorch_grad_cam.metrics.perturbation_confidence import (
        PerturbationConfidenceMetric,
        RemoveLeastRelevantFirst,
        RemoveMostRelevantFirst,
    )
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    from . import metrics as M
    from .posthoc import _Logits, posthoc_map

    logits_model = _Logits(model).eval()  # the peers want x -> logits
    n, _, h, w = x.shape
    hw = h * w
    dev = str(x.device)
    x_np, y_np = x.cpu().numpy(), target.cpu().numpy()
    a_np, s_np = maps[:, None].cpu().numpy(), masks[:, None].cpu().numpy()
    q_common = {"disable_warnings": True, "display_progressbar": False, "normalise": False, "abs": False}

    def quantus_call(metric: Any, a: np.ndarray = a_np, **kw: Any) -> np.ndarray:
        return np.asarray(metric(model=logits_model, x_batch=x_np, y_batch=y_np, a_batch=a, s_batch=s_np, device=dev, **kw))

    # IoU: Quantus has none; its RelevanceMassAccuracy of the binary map A = maps >= 0.5 is |A & B| / |A|
    binary = (a_np >= 0.5).astype(np.float32)
    size_a, size_b = binary.reshape(n, -1).sum(1), s_np.reshape(n, -1).sum(1)

    def quantus_iou() -> np.ndarray:
        inter = np.nan_to_num(quantus_call(quantus.RelevanceMassAccuracy(**q_common), binary)) * size_a
        union = size_a + size_b - inter
        return np.where(union > 0, inter / np.maximum(union, 1), 0.0)

    steps = _divisor_steps(hw)

    def explain_ours(m: SelfExplainer, inp: Tensor, tgt: Tensor) -> Tensor:
        return posthoc_map(m, inp, "cam", tgt)

    def explain_quantus(model: Any, inputs: np.ndarray, targets: np.ndarray, **kw: Any) -> np.ndarray:
        inp, tgt = torch.from_numpy(inputs).to(x.device), torch.from_numpy(np.asarray(targets)).to(x.device)
        return posthoc_map(model.model, inp, "cam", tgt)[:, None].cpu().numpy()

    with torch.no_grad():  # a second, correlated map: the CAM of each image's runner-up class
        runner_up = M.logits_of(model, x).topk(2, dim=1).indices[:, 1]
    other = posthoc_map(model, x, "cam", runner_up)
    other_np = other.cpu().numpy().reshape(n, -1)
    layer_names: list[str] = []

    def ours_mprt() -> np.ndarray:
        cascade = M.cascading_randomization(model, x, target, explain_ours, seed=seed)
        layer_names[:] = [f"model.{name}" for name, _ in cascade]  # as Quantus names them (through _Logits)
        return np.stack([_array(rho) for _, rho in cascade])

    def quantus_mprt() -> np.ndarray:
        # Quantus seeds every layer's reset with seed + 1, we seed layer i with seed + i: align layer 0
        metric = quantus.MPRT(layer_order="top_down", seed=seed - 1, **q_common)
        scores = metric(model=logits_model, x_batch=x_np, y_batch=y_np, a_batch=None, device=dev,
                        explain_func=explain_quantus)  # fmt: skip
        scores.pop("original")
        if layer_names and list(scores) != layer_names:
            raise ConfigError(f"Quantus randomizes other layers than selfcam: {list(scores)} vs {layer_names}")
        return np.stack([np.asarray(v) for v in scores.values()])

    targets = [ClassifierOutputSoftmaxTarget(int(c)) for c in y_np]
    cams64 = maps.cpu().double().numpy()  # float64: grad-cam's LeRF ranks 1 - map, which float32 would tie
    percentiles = M.ROAD_PERCENTILES

    def gradcam_road(order: str) -> np.ndarray:
        remove = RemoveMostRelevantFirst if order == "morf" else RemoveLeastRelevantFirst
        cols = []
        for p in percentiles:
            k = math.floor(p / 100 * hw + 0.5)  # our count of removed pixels
            q = 100 * (hw - k - 0.5) / (hw - 1)  # grad-cam removes map >= np.percentile(map, q): exactly k pixels
            metric = PerturbationConfidenceMetric(remove(q, NoisyLinearImputer(noise=0.0)))
            cols.append(metric(x, cams64, targets, logits_model, return_diff=False))
        return np.stack(cols, axis=1)

    resettable = sum(1 for m in model.modules()  # the layers cascading_randomization resets, one forward each
                     if any(True for _ in m.parameters(recurse=False)) and callable(getattr(m, "reset_parameters", None)))

    def explain_floor() -> None:  # the explain calls cascading randomization makes, on the model as it is
        for _ in range(resettable + 1):
            explain_ours(model, x, target)

    def road_floor(order: str) -> Callable[[], None]:  # ROAD's forwards plus one solve of all its systems at once
        forwards = _floor_fn(model, x, len(percentiles), sequential=False)
        rank = M._ranks(maps, descending=order == "morf").view(n, h, w)
        counts = torch.tensor([M._count(p / 100, hw) for p in percentiles], device=x.device)
        removed, stacked = (rank < counts[:, None, None, None]).view(-1, h, w), x.repeat(len(percentiles), 1, 1, 1)

        def run() -> None:
            forwards()
            M._linear_imputation(stacked, removed)

        return run

    road_work = (f"{len(percentiles)} x {n} images stacked + one batched imputation solve of the "
                 f"{len(percentiles) * n * x.shape[1]} systems")  # fmt: skip
    road_note = ("grad-cam's ROAD{order} with its NoisyLinearImputer, softmax target, its percentile set so it "
                 "removes our round(p% HW) pixels, and noise 0 on both sides (the 0.01 noise draws differ)")  # fmt: skip
    return {
        "pointing_game": _Case("quantus", lambda: M.pointing_game(maps, masks),
                               lambda: quantus_call(quantus.PointingGame(**q_common)), "same definition"),
        "energy_pointing_game": _Case("quantus", lambda: M.energy_pointing_game(maps, masks),
                                      lambda: quantus_call(quantus.RelevanceMassAccuracy(**q_common)),
                                      "Quantus RelevanceMassAccuracy = sum(map in mask) / sum(map)"),
        "iou": _Case("quantus", lambda: M.iou(maps, masks, 0.5), quantus_iou,
                     "Quantus has no IoU: its RelevanceMassAccuracy of the binary map (maps >= 0.5) gives "
                     "|A & B| / |A|, turned into IoU with the pixel counts"),
        "deletion_curve": _Case("quantus", lambda: M.deletion_curve(model, x, maps, target, steps, "zero")[:, 1:],
                                lambda: quantus_call(quantus.PixelFlipping(features_in_step=hw // steps,
                                                                           perturb_baseline=0.0, **q_common)),
                                f"Quantus PixelFlipping, {steps} steps of {hw // steps} pixels to 0, softmax; "
                                "curve points after each step (Quantus has no step 0)", passes=steps + 1),
        "insertion_curve": _Case(None, lambda: M.insertion_curve(model, x, maps, target, steps, "blur"), None,
                                 f"no peer; {steps} steps from the blurred image, timed against its floor",
                                 passes=steps + 1),
        "spearman": _Case("quantus", lambda: M.spearman(maps, other),
                          lambda: quantus.correlation_spearman(a_np.reshape(n, -1), other_np, batched=True),
                          "Quantus' MPRT similarity (scipy.stats.spearmanr, average ranks for ties) between the "
                          "map of the target and the CAM of the runner-up class"),
        "cascading_randomization": _Case("quantus", ours_mprt, quantus_mprt,
                                         "Quantus MPRT top-down, Spearman of CAM maps per layer; Quantus re-seeds "
                                         "every layer with the same seed, we use seed + i: only the first reset "
                                         "and the deterministic ones (BatchNorm) draw the same weights",
                                         passes=resettable + 1, sequential=True, work_floor=explain_floor,
                                         work_note=f"{resettable + 1} explain calls (post-hoc CAM) of the {n} images"),
        "average_drop": _Case(None, lambda: M.average_drop(model, x, maps, target), None,
                              "no peer (grad-cam's DropInConfidence does not divide by Y); timed against its floor",
                              passes=2),
        "confidence_change": _Case("grad-cam", lambda: M.confidence_change(model, x, maps, target),
                                   lambda: CamMultImageConfidenceChange()(x, maps.cpu().numpy(), targets, logits_model),
                                   "grad-cam CamMultImageConfidenceChange, softmax target", passes=2),
        "increase_in_confidence": _Case("grad-cam", lambda: M.increase_in_confidence(model, x, maps, target),
                                        lambda: IncreaseInConfidence()(x, maps.cpu().numpy(), targets, logits_model),
                                        "grad-cam IncreaseInConfidence, softmax target", passes=2),
        "road_morf": _Case("grad-cam", lambda: M.road(model, x, maps, target, percentiles, "morf", noise=0.0),
                           lambda: gradcam_road("morf"), road_note.format(order="MostRelevantFirst"),
                           passes=len(percentiles), work_floor=road_floor("morf"), work_note=road_work),
        "road_lerf": _Case("grad-cam", lambda: M.road(model, x, maps, target, percentiles, "lerf", noise=0.0),
                           lambda: gradcam_road("lerf"), road_note.format(order="LeastRelevantFirst"),
                           passes=len(percentiles), work_floor=road_floor("lerf"), work_note=road_work),
    }  # fmt: skip


METRIC_NAMES = ("pointing_game", "energy_pointing_game", "iou", "deletion_curve", "insertion_curve", "spearman",
                "cascading_randomization", "average_drop", "confidence_change", "increase_in_confidence", "road_morf",
                "road_lerf")  # fmt: skip
AGREEMENT_TOLERANCE = 1e-4
SPEEDUP_GOAL_QUANTUS = 10.0
FLOOR_GOAL = 1.2  # a forward-bound metric's wall time at most this many times its forward passes'


def _floor_fn(model: Callable[[Tensor], Any], x: Tensor, passes: int, sequential: bool) -> Callable[[], Any]:
    """The forward passes a metric needs and nothing else: ``passes`` times the ``N`` images of ``x``.

    As large batched forwards (copies stacked up to :data:`selfcam.metrics.FORWARD_ELEMENTS` input
    elements per call, the batch itself at least), or, ``sequential``, one forward of ``x`` per pass
    (cascading randomization: each pass runs other weights). The stacked input is built once, outside the timing.
    """
    from .metrics import FORWARD_ELEMENTS

    if sequential:
        chunks = [x] * passes
    else:
        per_call = max(1, FORWARD_ELEMENTS // x.numel()) * len(x)
        chunks = list(x.repeat(passes, *([1] * (x.dim() - 1))).split(per_call))

    def run() -> None:
        with torch.no_grad():
            for chunk in chunks:
                model(chunk)

    return run


def metric_agreement(
    n: int = 16,
    size: int = 32,
    seed: int = 0,
    repeats: int = 3,
    warmup: int = 1,
    metrics: Sequence[str] | str | None = None,
    device: str | torch.device | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Our metrics against Quantus' and grad-cam's on the same work: wall times and largest difference.

    Inputs: ``n`` cluttered-digit test images at ``size`` px; a ``plain`` ResNet-8
    (stem stride 2, random weights from ``seed``, eval mode); its target = predicted
    class; maps = its CAM at input size with ties broken row-major first (see
    :func:`_tie_free`); masks = the digits' boxes. Each metric runs ``warmup`` untimed
    then ``repeats`` timed calls per side; times are medians in seconds. ``threads``
    sets torch's CPU thread count for the run (restored after).

    Each forward-bound metric is also timed against its floor (:func:`_floor_fn`: the
    forward passes it needs, as large batched forwards), in the same rounds; ROAD and cascading
    randomization also against their work floor (``_Case.work_floor``: the forwards and one batched
    imputation solve; the explain calls), a second yardstick, not a redefinition of the first.

    Returns ``{"n", "size", "device", "metrics": {NAME: {"selfcam_s", "peer", "note"[, "peer_s",
    "speedup" (peer_s / selfcam_s), "max_abs_diff", "agrees" (<= 1e-4)][, "floor_s", "x_floor"
    (selfcam_s / floor_s), "floor_forwards"][, "work_floor_s", "x_work_floor", "work_floor"]}}, "goals"}``
    (peer ``None``: no peer, floor only).
    """
    from .data import box_mask, load_dataset

    _positive(n=n, size=size, repeats=repeats)
    if threads is not None:
        _positive(threads=threads)
    chosen = _methods(metrics, METRIC_NAMES, "--metrics")
    if not isinstance(warmup, int) or warmup < 0:
        raise ConfigError(f"warmup must be an integer >= 0, got {warmup!r}")
    try:
        import pytorch_grad_cam  # noqa: F401
        import quantus  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"the metrics bench compares with peers that are not installed: {e}") from e
    dev = _device(device)
    data = load_dataset("cluttered-digits", "test", n, seed=seed, size=size)
    x = data.normalize(data.images).to(dev)
    masks = box_mask(data.boxes, size).to(dev)
    with torch.random.fork_rng():  # our seed and Quantus' MPRT seeding leave the caller's RNG state alone
        torch.manual_seed(seed)
        model = create_model("plain", "resnet8", data.num_classes, data.in_chans, {"stem_stride": 2}).to(dev).eval()
        with torch.no_grad():
            out = model.explain(x)
        target, maps = out.logits.argmax(dim=1), _tie_free(out.heatmap)
        cases = _agreement_cases(model, x, target, maps, masks, seed)
        with _threads(threads):
            described = _describe(dev)
            results = {}
            for name in chosen:
                case = cases[name]
                sides = {"ours": case.ours, **({"theirs": case.theirs} if case.theirs is not None else {}),
                         **({"floor": _floor_fn(model, x, case.passes, case.sequential)} if case.passes else {}),
                         **({"work": case.work_floor} if case.work_floor is not None else {})}
                results[name] = _wall_sides(sides, repeats, warmup, dev)
    rows: dict[str, dict[str, Any]] = {}
    for name, (secs, values) in results.items():
        case = cases[name]
        row: dict[str, Any] = {"selfcam_s": secs["ours"], "peer": case.peer, "note": case.note}
        if case.theirs is not None:
            diff = _max_abs_diff(values["ours"], values["theirs"])
            row.update({"peer_s": secs["theirs"], "speedup": secs["theirs"] / secs["ours"], "max_abs_diff": diff,
                        "agrees": diff <= AGREEMENT_TOLERANCE})  # fmt: skip
        if case.passes:
            row.update({"floor_s": secs["floor"], "x_floor": secs["ours"] / secs["floor"],
                        "floor_forwards": f"{case.passes} x {len(x)} images" + (", one batch of the images per pass" if case.sequential else ", stacked")})  # fmt: skip
        if case.work_floor is not None:
            row.update({"work_floor_s": secs["work"], "x_work_floor": secs["ours"] / secs["work"],
                        "work_floor": case.work_note})  # fmt: skip
        rows[name] = row
        if name == "cascading_randomization" and case.theirs is not None:  # (layers, N): how far the two still agree
            per_layer = [_max_abs_diff(a, b) for a, b in zip(_array(values["ours"]), _array(values["theirs"]))]
            rows[name]["per_layer_max_abs_diff"] = per_layer
            rows[name]["layers_within_tolerance"] = sum(d <= AGREEMENT_TOLERANCE for d in per_layer)
    quantus_rows = {k: r for k, r in rows.items() if r["peer"] == "quantus"}
    goals = {f"{k} within {AGREEMENT_TOLERANCE:g} of {r['peer']}": r["agrees"] for k, r in rows.items() if "agrees" in r}
    goals.update({f"{k} <= {FLOOR_GOAL:g}x its forward floor": r["x_floor"] <= FLOOR_GOAL
                  for k, r in rows.items() if "x_floor" in r})  # fmt: skip
    goals.update({f"{k} >= {SPEEDUP_GOAL_QUANTUS:g}x faster than quantus": r["speedup"] >= SPEEDUP_GOAL_QUANTUS
                  for k, r in quantus_rows.items()})  # fmt: skip
    return {"n": n, "size": size, "device": described, "repeats": repeats, "metrics": rows, "goals": goals}


def agreement_table(doc: dict[str, Any]) -> Table:
    """The rich table of a :func:`metric_agreement` document."""
    table = Table(title=f"selfcam metrics vs peers, {doc['n']} cluttered digits at {doc['size']} px, {doc['device']}")
    for col in ("metric", "peer", "selfcam s", "peer s", "speed-up", "max |diff|", "floor s", "x floor", "x work floor"):
        table.add_column(col, justify="left" if col in ("metric", "peer") else "right", no_wrap=True)
    for name, r in doc["metrics"].items():
        peer = [f"{r['peer_s']:.4f}", f"{r['speedup']:.1f}x", f"{r['max_abs_diff']:.2e}"] if "peer_s" in r else ["-"] * 3
        floor = [f"{r['floor_s']:.4f}", f"{r['x_floor']:.2f}"] if "floor_s" in r else ["-"] * 2
        work = f"{r['x_work_floor']:.2f}" if "x_work_floor" in r else "-"
        table.add_row(name, r["peer"] or "-", f"{r['selfcam_s']:.4f}", *peer, *floor, work)
    return table


@bench_app.command("metrics")
def metrics_cmd(
    json_path: Path = typer.Option(..., "--json", help="Where to write the results."),
    n: int = typer.Option(16, "--n", help="Cluttered-digit test images."),
    size: int = typer.Option(32, "--size", help="Image side in pixels."),
    seed: int = typer.Option(0, "--seed", help="Seed for the data and the model's random weights."),
    repeats: int = typer.Option(3, "--repeats", help="Timed calls per metric and side (median)."),
    metrics: Optional[str] = typer.Option(None, "--metrics", help="Comma-separated subset of the metrics."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda... (default: cuda if available)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads (default: torch's)."),
) -> None:
    """Our metrics against Quantus and grad-cam on the same work: time and largest difference."""
    _json_target(json_path)
    doc = metric_agreement(n, size, seed, repeats, metrics=metrics, device=device, threads=threads)
    _write_json(json_path, doc)
    _show(agreement_table(doc))
    for goal, met in doc["goals"].items():
        console.print(f"{'met' if met else 'NOT met'}: {goal}", highlight=False)
    console.print(f"wrote {json_path}", markup=False, highlight=False)


# --- start-up ----------------------------------------------------------------------

# modules a command that does not need them must not import at start (the start-up test guards this list)
HEAVY_MODULES = ("lightning", "pytorch_lightning", "lightning_fabric", "torchmetrics", "pytorch_grad_cam", "matplotlib",
                 "captum", "timm", "torchvision", "jinja2", "sklearn", "scipy", "quantus", "cv2", "onnx",
                 "onnxruntime", "pandas", "torch._dynamo")  # fmt: skip
STARTUP_GOAL = 1.2  # x the time of `python -c "import torch"`
_MODULES_PROBE = (  # run one CLI command in-process, then write which heavy modules it imported to $SELFCAM_MODULES_OUT
    "import json, os, sys\n"
    "sys.argv = ['selfcam', *json.loads(os.environ['SELFCAM_ARGV'])]\n"
    "from selfcam.cli import main\n"
    "try:\n    main()\nexcept SystemExit:\n    pass\n"
    "heavy = json.loads(os.environ['SELFCAM_HEAVY'])\n"
    "loaded = sorted(h for h in heavy if any(m == h or m.startswith(h + '.') for m in sys.modules))\n"
    "open(os.environ['SELFCAM_MODULES_OUT'], 'w').write(json.dumps(loaded))\n"
)


def heavy_modules_of(args: Sequence[str], heavy: Sequence[str] = HEAVY_MODULES) -> list[str]:
    """The ``heavy`` modules (a package counts when it or a submodule is loaded: ``torch._dynamo``) that
    ``selfcam ARGS`` has imported when it ends (a fresh process)."""
    import os
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "modules.json"
        env = {**os.environ, "SELFCAM_ARGV": json.dumps(list(args)), "SELFCAM_HEAVY": json.dumps(list(heavy)),
               "SELFCAM_MODULES_OUT": str(out)}  # fmt: skip
        subprocess.run([sys.executable, "-c", _MODULES_PROBE], env=env, check=True, capture_output=True)
        return json.loads(out.read_text())


def _selfcam_command() -> list[str]:
    """The ``selfcam`` console script of this interpreter's environment, else ``python -m selfcam``."""
    import sys

    script = Path(sys.executable).with_name("selfcam")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "selfcam"]


def startup(repeats: int = 5, warmup: int = 1) -> dict[str, Any]:
    """Wall time of ``selfcam --help``, ``selfcam models`` and ``selfcam info RUN`` against ``python -c "import torch"``.

    Each is a fresh process. Every round runs all four once, the first one rotating from
    round to round (so load changes hit all alike); ``warmup`` untimed rounds come first
    (they fill the OS file cache). Times are medians in seconds; ``ratio`` is a command's
    median over the median of ``import torch``. RUN is a tiny ``lfi`` ResNet-8 saved in a
    temporary directory. ``heavy_modules`` lists the :data:`HEAVY_MODULES` each command
    had imported when it ended (a separate, untimed run).

    Returns ``{"repeats", "seconds": {NAME: s}, "ratio": {NAME: x}, "samples": {NAME: [s, ...]},
    "heavy_modules": {NAME: [...]}, "goals"}``.
    """
    import subprocess
    import sys
    import tempfile

    from .checkpoint import save_checkpoint

    _positive(repeats=repeats)
    if not isinstance(warmup, int) or warmup < 0:
        raise ConfigError(f"warmup must be an integer >= 0, got {warmup!r}")
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        with torch.random.fork_rng():
            torch.manual_seed(0)
            save_checkpoint(create_model("lfi", "resnet8", 10, 1), run)
        cli = _selfcam_command()
        args = {"selfcam --help": ["--help"], "selfcam models": ["models"], "selfcam info RUN": ["info", str(run)]}
        commands = {'python -c "import torch"': [sys.executable, "-c", "import torch"],
                    **{name: cli + a for name, a in args.items()}}  # fmt: skip
        names = list(commands)
        samples: dict[str, list[float]] = {m: [] for m in names}
        for r in range(-warmup, repeats):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                t0 = time.perf_counter()
                subprocess.run(commands[name], check=True, capture_output=True)
                if r >= 0:
                    samples[name].append(time.perf_counter() - t0)
        heavy = {name: heavy_modules_of(a) for name, a in args.items()}
    seconds = {m: statistics.median(ts) for m, ts in samples.items()}
    base = seconds[names[0]]
    ratio = {m: s / base for m, s in seconds.items()}
    goals = {f"{m} <= {STARTUP_GOAL:g}x import torch": ratio[m] <= STARTUP_GOAL for m in args}
    goals.update({f"{m} imports none of the heavy modules": not heavy[m] for m in args})
    return {"repeats": repeats, "python": sys.version.split()[0], "torch": torch.__version__, "seconds": seconds,
            "ratio": ratio, "samples": samples, "heavy_modules": heavy, "goals": goals}  # fmt: skip


def startup_table(doc: dict[str, Any]) -> Table:
    table = Table(title=f"start-up, fresh processes, median of {doc['repeats']} (interleaved)")
    for col in ("command", "s", "x import torch", "heavy modules imported"):
        table.add_column(col, justify="left" if col in ("command", "heavy modules imported") else "right")
    for m, s in doc["seconds"].items():
        table.add_row(m, f"{s:.2f}", f"{doc['ratio'][m]:.2f}", ", ".join(doc["heavy_modules"].get(m, [])) or "-")
    return table


def _print_goals(doc: dict[str, Any], json_path: Path) -> None:
    for goal, met in doc["goals"].items():
        console.print(f"{'met' if met else 'NOT met'}: {goal}", markup=False, highlight=False)
    console.print(f"wrote {json_path}", markup=False, highlight=False)


@bench_app.command("startup")
def startup_cmd(
    json_path: Path = typer.Option(..., "--json", help="Where to write the results."),
    repeats: int = typer.Option(5, "--repeats", help="Timed rounds (median)."),
    warmup: int = typer.Option(1, "--warmup", help="Untimed rounds first."),
) -> None:
    """Start-up time of selfcam --help, models and info RUN against python -c 'import torch'."""
    _json_target(json_path)
    doc = startup(repeats, warmup)
    _write_json(json_path, doc)
    _show(startup_table(doc))
    _print_goals(doc, json_path)


# --- training throughput -----------------------------------------------------------

TRAIN_GOAL = 0.9  # fit's images/s at least this share of the raw loop's
TRAIN_OPTIONS = {"bf16": {"precision": "bf16-mixed"}, "compile": {"compile": True}, "workers2": {"num_workers": 2}}  # fit plain with these
DATA_SPECS = ("cluttered-digits", "idx", "cifar10", "imagefolder")


def _write_data(kind: str, root: Path, n: int, size: int) -> str:
    """A ``kind`` dataset of ``n`` random training images written under ``root``; returns its ``--data`` spec."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    labels = (np.arange(n) % 10).astype(np.uint8)
    if kind == "idx":
        images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        for name, a, code in (("train-images-idx3-ubyte", images, 3), ("train-labels-idx1-ubyte", labels, 1)):
            head = bytes([0, 0, 8, code]) + b"".join(int(d).to_bytes(4, "big") for d in a.shape)
            (root / name).write_bytes(head + a.tobytes())
        return f"idx:{root}"
    if kind == "cifar10":  # 5 training batches of (label, 3072 pixels) records
        records = np.concatenate([labels[:, None], rng.integers(0, 256, (n, 3072), dtype=np.uint8)], 1)
        for k, chunk in enumerate(np.array_split(records, 5), 1):
            (root / f"data_batch_{k}.bin").write_bytes(chunk.tobytes())
        (root / "test_batch.bin").write_bytes(records[:10].tobytes())
        return f"cifar10:{root}"
    if kind == "imagefolder":  # PNG files, one folder per class
        for i in range(n):
            folder = root / f"class{labels[i]}"
            folder.mkdir(exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        return f"imagefolder:{root}"
    raise ConfigError(f"no writer for {kind!r}")


def _raw_epochs(model: torch.nn.Module, x: Tensor, y: Tensor, batch_size: int, epochs: int, lr: float,
                weight_decay: float, seed: int) -> list[float]:  # fmt: skip
    """The raw PyTorch loop fit is compared with: seconds per epoch over pre-stacked ``x``, ``y``.

    Same as fit's recipe: shuffled batches (the last partial one dropped when there are more
    images than a batch), the model's own loss, AdamW with a one-cycle schedule stepped per batch.
    """
    n = len(x)
    drop = n > batch_size
    steps = n // batch_size if drop else math.ceil(n / batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps)
    model.train()
    gen = torch.Generator().manual_seed(seed)
    seconds = []
    for _ in range(epochs):
        sync(x.device)
        t0 = time.perf_counter()
        perm = torch.randperm(n, generator=gen).to(x.device)
        for b in range(steps):
            idx = perm[b * batch_size : (b + 1) * batch_size]
            out = model(x[idx])
            loss = model.loss(out, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        sync(x.device)
        seconds.append(time.perf_counter() - t0)
    return seconds


def _cpu_seconds(run: Callable[[int], Any], epochs: int) -> float:
    """CPU seconds (user + system, this process and its reaped children) of ``run(epochs)``."""
    import os

    before = os.times()
    run(epochs)
    after = os.times()
    return sum(after[:4]) - sum(before[:4])


def _fit_epochs(model: torch.nn.Module, data: Any, batch_size: int, epochs: int, lr: float, weight_decay: float,
                seed: int, accelerator: str, **options: Any) -> list[float]:  # fmt: skip
    """``selfcam.fit`` on ``data``: seconds per epoch from its history (epoch 0 includes Lightning's set-up);
    ``options``: more :class:`~selfcam.train.TrainConfig` fields (precision, compile, num_workers)."""
    from .train import TrainConfig, fit

    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed, accelerator=accelerator,
                      **options)  # fmt: skip
    rows = fit(model, data, None, cfg, progress=False)
    ends = [r["seconds"] for r in rows]
    return [b - a for a, b in zip([0.0, *ends[:-1]], ends)]


def _feed_seconds(dataset: Any, batch_size: int, num_workers: int = 0, clock: str = "wall") -> float:
    """One epoch of a DataLoader over ``dataset`` as fit builds it (shuffled, ``batch_size``), no model; wall
    seconds, or with ``clock="cpu"`` CPU seconds (:func:`_cpu_seconds`)."""
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size, shuffle=True, num_workers=num_workers, drop_last=len(dataset) > batch_size)

    def epoch(_: int = 1) -> None:
        for _ in loader:
            pass

    if clock == "cpu":
        return _cpu_seconds(epoch, 1)
    t0 = time.perf_counter()
    epoch()
    return time.perf_counter() - t0


def train_throughput(
    methods: Sequence[str] | str | None = None,
    backbone: str = "resnet8",
    n: int = 1024,
    size: int = 32,
    batch_size: int = 64,
    epochs: int = 2,
    repeats: int = 3,
    datasets: Sequence[str] | str | None = None,
    lr: float = 3e-3,
    weight_decay: float = 5e-4,
    seed: int = 0,
    device: str | torch.device | None = None,
    threads: int | None = None,
    options: Sequence[str] | str | None = None,
    clock: str = "wall",
) -> dict[str, Any]:
    """Training images/s of :func:`selfcam.fit` against a raw PyTorch loop, per head, in one run; and the data path.

    Both train the same initial model (``backbone`` with each head, random weights from ``seed``)
    on ``n`` cluttered digits at ``size`` px with the same batch, AdamW and one-cycle schedule,
    ``epochs`` epochs per call; fit reads the dataset object through its DataLoader, the raw loop
    indexes pre-stacked tensors. One untimed call of each side comes first (a process's first
    ``fit`` pays Lightning's one-time set-up), and the first epoch of every call is a warm-up (the
    allocator); images/s come from the later ones, the median over ``repeats`` rounds. Each round
    runs every (head, side) once, starting one further along each round.

    Data path: for each of ``datasets`` (the built-in generator, and idx, CIFAR binary and
    ImageFolder files written to a temporary directory, ``n`` images each), a DataLoader epoch
    as fit builds it, without a model, after one untimed epoch; ``feed_img_s`` is compared with
    what the plain model consumes (the raw loop's images/s on that many channels).

    Training options (``options``, names of :data:`TRAIN_OPTIONS`: ``bf16`` = ``precision="bf16-mixed"``,
    ``compile``, ``workers2`` = ``num_workers=2``): ``fit`` of the plain model with the option, in the
    same rounds; ``vs_default`` = its images/s over plain ``fit``'s (compile's first epoch, which
    compiles, is the warm-up).

    ``clock="cpu"`` (a machine shared with other jobs): a call's images/s are its epochs 2..E over the CPU
    seconds (user + system, this process and its reaped children, data-loader workers included) of a call
    of E epochs less those of a call of one, instead of wall seconds: the work, not the share of the cores
    the other jobs left it. The data path is then timed in CPU seconds too.

    Returns ``{"methods": {NAME: {"fit_img_s", "raw_img_s", "ratio"}}, "data": {SPEC: {"feed_img_s",
    "consume_img_s", "ratio"}}, "options": {NAME: {"fit_img_s", "vs_default", "config"}}, "goals", ...}``.
    """
    import copy
    import tempfile

    from .data import load_dataset

    _positive(n=n, size=size, batch_size=batch_size, repeats=repeats)
    if not isinstance(epochs, int) or epochs < 2:
        raise ConfigError(f"epochs must be an integer >= 2 (the first is a warm-up), got {epochs!r}")
    if threads is not None:
        _positive(threads=threads)
    chosen = _methods(methods, HEAD_METHODS, "--methods")
    kinds = _methods(datasets, DATA_SPECS, "--datasets") if datasets != "" else []
    extras = _methods(options, list(TRAIN_OPTIONS), "--options") if options != "" else []
    dev = _device(device)
    accelerator = "cpu" if dev.type == "cpu" else "gpu"
    data = load_dataset("cluttered-digits", "train", n, seed=seed, size=size)
    x, y = data.normalize(data.images).to(dev), data.labels.to(dev)
    images = (n // batch_size) * batch_size if n > batch_size else n
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        initial = {m: create_model(m, backbone, data.num_classes, 1, {"stem_stride": 2}) for m in chosen}
        if "plain" not in initial:
            initial["plain"] = create_model("plain", backbone, data.num_classes, 1, {"stem_stride": 2})
        plain3 = create_model("plain", backbone, data.num_classes, 3, {"stem_stride": 2})
    x3 = x.repeat(1, 3, 1, 1)
    recipe = (lr, weight_decay, seed)
    if clock not in ("wall", "cpu"):
        raise ConfigError(f"clock must be 'wall' or 'cpu', got {clock!r}")
    runs: dict[str, Callable[[int], list[float]]] = {}  # epochs -> wall seconds per epoch
    for m in chosen:
        runs[f"fit {m}"] = lambda e, m=m: _fit_epochs(copy.deepcopy(initial[m]).to(dev), data, batch_size, e, lr,
                                                      weight_decay, seed, accelerator)  # fmt: skip
        runs[f"raw {m}"] = lambda e, m=m: _raw_epochs(copy.deepcopy(initial[m]).to(dev), x, y, batch_size, e, *recipe)
    for opt in extras + (["default"] if extras and "plain" not in chosen else []):
        runs[f"fit plain {opt}" if opt != "default" else "fit plain"] = lambda e, opt=opt: _fit_epochs(
            copy.deepcopy(initial["plain"]).to(dev), data, batch_size, e, lr, weight_decay, seed, accelerator,
            **TRAIN_OPTIONS.get(opt, {}))  # fmt: skip
    if kinds:
        runs["raw plain"] = lambda e: _raw_epochs(copy.deepcopy(initial["plain"]).to(dev), x, y, batch_size, e, *recipe)
        runs["raw plain, 3 channels"] = lambda e: _raw_epochs(copy.deepcopy(plain3).to(dev), x3, y, batch_size, e, *recipe)
    with tempfile.TemporaryDirectory() as tmp, _threads(threads):
        described = _describe(dev)
        feeds: dict[str, Any] = {}
        for kind in kinds:
            if kind == "cluttered-digits":
                feeds[kind] = data
            else:
                root = Path(tmp) / kind
                root.mkdir()
                written = n + (n // 2 if kind == "imagefolder" else n // 4) + 20  # the val (and test) splits come out of them
                feeds[kind] = load_dataset(_write_data(kind, root, written, size), "train", n, size=size)
            _feed_seconds(feeds[kind], batch_size)  # untimed: the first pass may decode and cache
        for name in (f"fit {chosen[0]}", f"raw {chosen[0]}"):  # untimed: a process's first fit pays Lightning's set-up
            runs[name](1)
        names = list(runs) + [f"feed {k}" for k in kinds]
        samples: dict[str, list[float]] = {name: [] for name in names}
        for r in range(repeats):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                if name.startswith("feed "):
                    samples[name].append(n / _feed_seconds(feeds[name[5:]], batch_size, clock=clock))
                elif clock == "cpu":  # CPU seconds of epochs 2..E: a call of E epochs less a call of one
                    samples[name].append(images * (epochs - 1) / (_cpu_seconds(runs[name], epochs) - _cpu_seconds(runs[name], 1)))
                else:
                    later = runs[name](epochs)[1:]
                    samples[name].append(images * len(later) / sum(later))
    rate = {name: statistics.median(v) for name, v in samples.items()}
    rows = {m: {"fit_img_s": rate[f"fit {m}"], "raw_img_s": rate[f"raw {m}"],
                "ratio": rate[f"fit {m}"] / rate[f"raw {m}"]} for m in chosen}  # fmt: skip
    feed_rows = {}
    for kind in kinds:
        consume = rate["raw plain, 3 channels" if feeds[kind].in_chans == 3 else "raw plain"]
        feed_rows[kind] = {"feed_img_s": rate[f"feed {kind}"], "consume_img_s": consume,
                           "ratio": rate[f"feed {kind}"] / consume, "in_chans": feeds[kind].in_chans,
                           "storage": type(feeds[kind]).__name__}  # fmt: skip
    option_rows = {o: {"fit_img_s": rate[f"fit plain {o}"], "vs_default": rate[f"fit plain {o}"] / rate["fit plain"],
                       "config": TRAIN_OPTIONS[o]} for o in extras}  # fmt: skip
    goals = {f"fit {m} >= {TRAIN_GOAL:g}x raw": r["ratio"] >= TRAIN_GOAL for m, r in rows.items()}
    goals.update({f"{k} feeds >= what the model consumes": r["ratio"] >= 1.0 for k, r in feed_rows.items()})
    return {"backbone": backbone, "size": size, "n": n, "batch_size": batch_size, "epochs": epochs, "repeats": repeats,
            "clock": clock, "device": described, "torch": torch.__version__, "methods": rows, "data": feed_rows, "options": option_rows,
            "samples": samples, "goals": goals}  # fmt: skip


def train_table(doc: dict[str, Any]) -> Table:
    table = Table(title=f"training images/s, {doc['backbone']} at {doc['size']} px, batch {doc['batch_size']}, "
                        f"{doc['device']}, median of {doc['repeats']}")  # fmt: skip
    for col in ("method", "fit img/s", "raw img/s", "fit / raw"):
        table.add_column(col, justify="left" if col == "method" else "right", no_wrap=True)
    for m, r in doc["methods"].items():
        table.add_row(m, f"{r['fit_img_s']:.0f}", f"{r['raw_img_s']:.0f}", f"{r['ratio']:.2f}")
    for k, r in doc["data"].items():
        table.add_row(f"data {k}", f"feeds {r['feed_img_s']:.0f}", f"consumes {r['consume_img_s']:.0f}", f"{r['ratio']:.2f}")
    for k, r in doc.get("options", {}).items():
        table.add_row(f"plain, {k}", f"{r['fit_img_s']:.0f}", "", f"{r['vs_default']:.2f} x fit")
    return table


@bench_app.command("train")
def train_cmd(
    json_path: Path = typer.Option(..., "--json", help="Where to write the results."),
    methods: Optional[str] = typer.Option(None, "--methods", help=f"Comma-separated subset of {','.join(HEAD_METHODS)}."),
    backbone: str = typer.Option("resnet8", "--backbone", help="Backbone of every model."),
    n: int = typer.Option(1024, "--n", help="Training images."),
    size: int = typer.Option(32, "--size", help="Image side in pixels."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per step."),
    epochs: int = typer.Option(2, "--epochs", help="Epochs per call (the first is a warm-up)."),
    repeats: int = typer.Option(3, "--repeats", help="Rounds (median)."),
    datasets: Optional[str] = typer.Option(None, "--datasets", help=f"Data paths to time: subset of {','.join(DATA_SPECS)} ('' for none)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda... (default: cuda if available)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads (default: torch's)."),
    options: Optional[str] = typer.Option(None, "--options", help=f"fit plain also with: subset of {','.join(TRAIN_OPTIONS)} "
                                          "('' for none)."),
    clock: str = typer.Option("wall", "--clock", help="wall, or cpu: CPU seconds of the epochs (a machine shared with other jobs)."),
) -> None:
    """Training throughput of selfcam.fit against a raw PyTorch loop per head, of the data path, and of fit's options."""
    _json_target(json_path)
    doc = train_throughput(methods, backbone, n, size, batch_size, epochs, repeats, datasets, device=device, threads=threads,
                           options=options, clock=clock)  # fmt: skip
    _write_json(json_path, doc)
    _show(train_table(doc))
    _print_goals(doc, json_path)


# --- evaluate's memory -------------------------------------------------------------

MEMORY_GOAL = 1.1  # peak memory on the large set at most this many times that on the small one
_PEAK_PROBE = (  # run the selfcam CLI in-process, then print this process's peak resident memory (KiB on Linux)
    "import json, os, resource, sys\n"
    "sys.argv = ['selfcam', *json.loads(os.environ['SELFCAM_ARGV'])]\n"
    "from selfcam.cli import main\n"
    "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\nelse:\n    code = 0\n"
    "print('SELFCAM_PEAK_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, code)\n"
)


def peak_memory_of(args: Sequence[str]) -> float:
    """Peak resident memory (MiB) of a fresh process running ``selfcam ARGS``; ConfigError if it fails."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "SELFCAM_ARGV": json.dumps(list(args))}
    done = subprocess.run([sys.executable, "-c", _PEAK_PROBE], env=env, capture_output=True, text=True)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("SELFCAM_PEAK_KIB")), None)
    if done.returncode != 0 or line is None or line.split()[2] not in ("0", "None"):
        raise ConfigError(f"selfcam {' '.join(args)} failed: {(done.stderr or done.stdout).strip()[-500:]}")
    return int(line.split()[1]) / 1024


def evaluate_memory(small: int = 1000, large: int = 10000, metrics: str = "pointing_game,energy_pointing_game,iou,average_drop",
                    batch_size: int = 50, size: int = 32, repeats: int = 1) -> dict[str, Any]:  # fmt: skip
    """Peak memory of ``selfcam evaluate`` on ``small`` and ``large`` cluttered-digit test images (fresh processes).

    One ``lfi`` ResNet-8 run (random weights, saved to a temporary directory), ``--methods self``,
    ``--metrics metrics``, ``--batch-size batch_size``; the two sizes alternate over ``repeats``
    rounds and each keeps its largest peak. The generated images themselves are held in memory
    (``size * size`` float32 each), which the ratio includes.

    Two data sources: the built-in generator (``cluttered-digits``, built in memory in one go,
    so its own construction is part of the peak) and an idx file of as many random images
    (``idx``: uint8 pixels in memory, ``--metrics`` without the box metrics), which isolates
    evaluate's own streaming.

    Returns ``{"data": {SOURCE: {"peak_mib": {"small", "large"}, "ratio" (large / small)}}, "goals"}``.
    """
    import tempfile

    from .checkpoint import save_checkpoint

    _positive(small=small, large=large, batch_size=batch_size, size=size, repeats=repeats)
    no_boxes = ",".join(m for m in metrics.split(",") if m.strip() in ("average_drop", "increase_in_confidence",
                                                                        "deletion_auc", "insertion_auc", "road_morf",
                                                                        "road_lerf")) or "average_drop"  # fmt: skip
    peaks: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        with torch.random.fork_rng():
            torch.manual_seed(0)
            save_checkpoint(create_model("lfi", "resnet8", 10, 1, {"stem_stride": 2}), run,
                            data={"name": "cluttered-digits", "size": size})  # fmt: skip
        (Path(tmp) / "idx").mkdir()
        sources = {"cluttered-digits": (["--data", "cluttered-digits", "--split", "test"], metrics),
                   "idx": (["--data", _write_data("idx", Path(tmp) / "idx", large + large // 8, size), "--split", "train"],
                           no_boxes)}  # fmt: skip
        for source, (data_args, chosen) in sources.items():
            peaks[source] = {"small": [], "large": []}
            for r in range(repeats):
                for which in ("small", "large") if r % 2 == 0 else ("large", "small"):
                    count = small if which == "small" else large
                    args = ["evaluate", "--checkpoint", str(run), *data_args, "--n", str(count), "--methods", "self",
                            "--metrics", chosen, "--batch-size", str(batch_size), "--out", str(Path(tmp) / which)]  # fmt: skip
                    peaks[source][which].append(peak_memory_of(args))
    rows = {}
    for source, p in peaks.items():
        peak = {k: max(v) for k, v in p.items()}
        rows[source] = {"peak_mib": peak, "ratio": peak["large"] / peak["small"], "metrics": sources[source][1]}
    goals = {f"evaluate on {source}: peak on {large} <= {MEMORY_GOAL:g}x on {small} images": r["ratio"] <= MEMORY_GOAL
             for source, r in rows.items()}  # fmt: skip
    return {"small": small, "large": large, "batch_size": batch_size, "size": size, "repeats": repeats, "data": rows,
            "goals": goals}


@bench_app.command("memory")
def memory_cmd(
    json_path: Path = typer.Option(..., "--json", help="Where to write the results."),
    small: int = typer.Option(1000, "--small", help="Images of the small run."),
    large: int = typer.Option(10000, "--large", help="Images of the large run."),
    metrics: str = typer.Option("pointing_game,energy_pointing_game,iou,average_drop", "--metrics", help="evaluate's --metrics."),
    batch_size: int = typer.Option(50, "--batch-size", help="evaluate's --batch-size."),
    repeats: int = typer.Option(1, "--repeats", help="Rounds (largest peak of each)."),
) -> None:
    """Peak memory of selfcam evaluate on a small and a large image set: it should stream."""
    _json_target(json_path)
    doc = evaluate_memory(small, large, metrics, batch_size, repeats=repeats)
    _write_json(json_path, doc)
    for source, r in doc["data"].items():
        console.print(f"peak memory of selfcam evaluate on {source}: {r['peak_mib']['small']:.0f} MiB on {small} images, "
                      f"{r['peak_mib']['large']:.0f} MiB on {large} ({r['ratio']:.2f}x)", highlight=False)  # fmt: skip
    _print_goals(doc, json_path)


# --- docs/benchmarks.md from the JSON ----------------------------------------------

RESULTS_DIR = Path("results/bench")
BENCH_COMMANDS = {  # what made each results/bench/*.json (printed above its table)
    "startup": "selfcam bench startup --repeats 7 --json results/bench/startup.json",
    "train": "selfcam bench train --threads 1 --clock cpu --repeats 5 --json results/bench/train.json",
    "metrics": "selfcam bench metrics --threads 1 --repeats 15 --json results/bench/metrics.json",
    "memory": "selfcam bench memory --json results/bench/memory.json",
}


def _goal_lines(doc: dict[str, Any]) -> list[str]:
    return [f"- {'met' if met else '**NOT met**'}: {goal}" for goal, met in doc["goals"].items()]


def _md_startup(doc: dict[str, Any]) -> list[str]:
    lines = [f"Median of {doc['repeats']} fresh processes per command, interleaved (python {doc['python']}, "
             f"torch {doc['torch']}).", "", "| command | s | x `import torch` | heavy modules imported |",
             "|---|---:|---:|---|"]  # fmt: skip
    for m, s in doc["seconds"].items():
        lines.append(f"| `{m}` | {s:.2f} | {doc['ratio'][m]:.2f} | {', '.join(doc['heavy_modules'].get(m, [])) or '-'} |")
    return lines


def _md_train(doc: dict[str, Any]) -> list[str]:
    lines = [f"{doc['backbone']}, {doc['n']} cluttered digits at {doc['size']} px, batch {doc['batch_size']}, AdamW + "
             f"one-cycle, {doc['device']}; images/s of the epochs after the first of each call"
             f"{' over their CPU seconds (`--clock cpu`)' if doc.get('clock') == 'cpu' else ''}, median of "
             f"{doc['repeats']} interleaved rounds.", "", "| method | `fit` img/s | raw loop img/s | fit / raw |",
             "|---|---:|---:|---:|"]  # fmt: skip
    for m, r in doc["methods"].items():
        lines.append(f"| {m} | {r['fit_img_s']:.0f} | {r['raw_img_s']:.0f} | {r['ratio']:.2f} |")
    if doc["data"]:
        lines += ["", "Data path: one DataLoader epoch as `fit` builds it (shuffled, same batch, no workers), no model, "
                  "against what the plain model consumes in the raw loop:", "",
                  "| dataset | storage | feeds img/s | model consumes img/s | ratio |", "|---|---|---:|---:|---:|"]  # fmt: skip
        for k, r in doc["data"].items():
            lines.append(f"| {k} | {r['storage']} | {r['feed_img_s']:.0f} | {r['consume_img_s']:.0f} | {r['ratio']:.1f} |")
    if doc.get("options"):
        lines += ["", "Training options: `fit` of the plain model with each option, in the same rounds, against plain "
                  "`fit` as it is (the first epoch of each call, where `--compile` compiles, is the warm-up):", "",
                  "| option | TrainConfig | `fit` img/s | x default `fit` |", "|---|---|---:|---:|"]  # fmt: skip
        for k, r in doc["options"].items():
            config = ", ".join(f"{f}={v!r}" for f, v in r["config"].items())
            lines.append(f"| {k} | `{config}` | {r['fit_img_s']:.0f} | {r['vs_default']:.2f} |")
    return lines


def _md_metrics(doc: dict[str, Any]) -> list[str]:
    lines = [f"{doc['n']} cluttered digits at {doc['size']} px, {doc['device']}; seconds, medians of {doc['repeats']} "
             "interleaved calls (ours, the peer's, the floor, the work floor).", "",
             "| metric | peer | selfcam s | peer s | speed-up | max abs diff | floor s | x floor | floor forwards |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for name, r in doc["metrics"].items():
        peer = (f"{r['peer_s']:.4f} | {r['speedup']:.1f}x | {r['max_abs_diff']:.1e}" if "peer_s" in r else "- | - | -")
        floor = f"{r['floor_s']:.4f} | {r['x_floor']:.2f} | {r['floor_forwards']}" if "floor_s" in r else "- | - | -"
        lines.append(f"| {name} | {r['peer'] or '-'} | {r['selfcam_s']:.4f} | {peer} | {floor} |")
    work = {k: r for k, r in doc["metrics"].items() if "work_floor_s" in r}
    if work:
        lines += ["", "The work floor: where a metric's unavoidable work is more than forward passes, that work "
                  "alone (a second yardstick; the floor above stays the forward passes):", "",
                  "| metric | selfcam s | work floor s | x work floor | work floor |", "|---|---:|---:|---:|---|"]  # fmt: skip
        lines += [f"| {k} | {r['selfcam_s']:.4f} | {r['work_floor_s']:.4f} | {r['x_work_floor']:.2f} | {r['work_floor']} |"
                  for k, r in work.items()]  # fmt: skip
    return lines


def _md_memory(doc: dict[str, Any]) -> list[str]:
    lines = [f"Peak resident memory of a fresh `selfcam evaluate` process (`--methods self`, batch {doc['batch_size']}, "
             f"{doc['size']} px), largest of {doc['repeats']} run(s) each.", "",
             f"| data | metrics | MiB on {doc['small']} | MiB on {doc['large']} | ratio |", "|---|---|---:|---:|---:|"]  # fmt: skip
    for source, r in doc["data"].items():
        lines.append(f"| {source} | {r['metrics']} | {r['peak_mib']['small']:.0f} | {r['peak_mib']['large']:.0f} | {r['ratio']:.2f} |")
    return lines


_RENDERERS = {"startup": _md_startup, "train": _md_train, "metrics": _md_metrics, "memory": _md_memory}


def render_docs(results: Path = RESULTS_DIR, doc: Path = Path("docs/benchmarks.md")) -> list[str]:
    """Write each ``results/NAME.json`` as markdown between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->``
    in ``doc``: the command that made it, its table and its goals. Returns the names written; a block
    whose JSON is missing is left as it is."""
    import re

    text = doc.read_text(encoding="utf-8")
    written = []
    for name, render in _RENDERERS.items():
        path = results / f"{name}.json"
        begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
        if not path.is_file() or begin not in text:
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        body = ["", "Generated by `selfcam bench render` from " f"`{path}`, made by:", "", "```bash",
                BENCH_COMMANDS[name], "```", "", *render(data), "", "Goals:", "", *_goal_lines(data), ""]  # fmt: skip
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: "\n".join([begin, *body, end]), text, flags=re.S)
        written.append(name)
    doc.write_text(text, encoding="utf-8")
    return written


@bench_app.command("render")
def render_cmd(
    results: Path = typer.Option(RESULTS_DIR, "--results", help="Folder of the bench JSON files."),
    doc: Path = typer.Option(Path("docs/benchmarks.md"), "--doc", help="Markdown file with <!-- bench:NAME --> blocks."),
) -> None:
    """Write the bench JSON files' tables and goals into docs/benchmarks.md (between its markers)."""
    if not doc.is_file():
        raise ConfigError(f"--doc {doc}: file not found")
    names = render_docs(results, doc)
    console.print(f"wrote {', '.join(names) or 'nothing'} into {doc}", markup=False, highlight=False)
