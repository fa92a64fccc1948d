"""The ``selfcam`` command line (typer + rich).

Every command turns selfcam's own errors (and unreadable files) into one line on
stderr and exit code 2; ``selfcam --debug ...`` shows the traceback instead.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from .errors import ConfigError, SelfcamError

_state = {"debug": False}
err_console = Console(stderr=True)


class _FriendlyGroup(TyperGroup):
    """Every command, sub-commands included: expected failures become ``error: ...`` and exit 2."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (SelfcamError, OSError) as e:
            if _state["debug"]:
                raise
            err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None


app = typer.Typer(cls=_FriendlyGroup, add_completion=False, no_args_is_help=True,
                  help="Classifiers that explain themselves: train, evaluate, demo, inspect.")  # fmt: skip
console = Console()


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    _state["debug"] = debug


def _json_object(text: str, option: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{option} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise ConfigError(f"{option} must be a JSON object like '{{\"key\": 1}}', got {text!r}")
    return value


def _cell(value: Any) -> str:
    return "-" if value is None else f"{value:,}" if isinstance(value, int) else f"{value:.3f}"


def _table(title: str, rows: dict[str, dict[str, Any]], first: str = "model") -> Table:
    """One row per entry of ``rows``; with more than six metrics, one row per metric instead."""
    cols = list(dict.fromkeys(k for r in rows.values() for k in r))
    transpose = len(cols) > 6
    table = Table(title=title)
    table.add_column("metric" if transpose else first)
    for c in rows if transpose else cols:
        table.add_column(c, justify="right")
    if transpose:
        for c in cols:
            table.add_row(c, *[_cell(r.get(c)) for r in rows.values()])
    else:
        for name, row in rows.items():
            table.add_row(name, *[_cell(row.get(c)) for c in cols])
    return table


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", help="Directory for metrics.json, report.html and runs/."),
    epochs: int = typer.Option(5, help="Epochs per model."),
    backbone: str = typer.Option("resnet8", help="Backbone for every model."),
    train_size: int = typer.Option(6000, help="Training canvases."),
    test_size: int = typer.Option(1000, help="Test canvases."),
    seed: int = typer.Option(0, help="Seed for data, initialisation and order."),
    methods: str = typer.Option("plain,lfi,lfi-light,se,abn", help="Comma-separated heads to train."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Train every head on cluttered digits, score maps against the boxes, write a report."""
    from .demo import DemoRecipe, run_demo
    from .heads import HEADS

    chosen = _names(methods)
    unknown = [m for m in chosen if m not in HEADS]
    if unknown:
        raise typer.BadParameter(f"unknown method(s) {unknown}; choose from {', '.join(HEADS)}", param_hint="--methods")
    recipe = DemoRecipe(backbone=backbone, epochs=epochs, train_size=train_size, test_size=test_size, seed=seed)
    t0 = time.perf_counter()
    metrics = run_demo(out, recipe, chosen, progress=not quiet, log=lambda s: console.print(s, markup=False, highlight=False))
    console.print(_table("cluttered digits, test split", metrics["models"]))
    console.print(f"wall time {time.perf_counter() - t0:.0f} s; wrote {out / 'metrics.json'} and {out / 'report.html'}")


@app.command()
def train(
    method: str = typer.Option(..., "--method", help="Head: plain, lfi, lfi-light, se, abn."),
    backbone: str = typer.Option("resnet20", "--backbone", help="Backbone name (see `selfcam models`)."),
    data: str = typer.Option("cluttered-digits", "--data", help="Dataset name."),
    epochs: int = typer.Option(10, help="Epochs."),
    out: Path = typer.Option(..., "--out", help="Run directory for the checkpoint and history."),
    batch_size: int = typer.Option(64, help="Batch size."),
    optimizer: str = typer.Option("adamw", help="adamw or sgd (one-cycle schedule either way)."),
    lr: float = typer.Option(3e-3, help="Peak learning rate."),
    weight_decay: float = typer.Option(5e-4, help="Weight decay."),
    backbone_kwargs: str = typer.Option("{}", help='Backbone options as JSON, e.g. \'{"stem_stride": 2}\'.'),
    head_kwargs: str = typer.Option("{}", help='Head options as JSON, e.g. \'{"reduction": 8}\'.'),
    seed: int = typer.Option(0, help="Seed."),
    train_size: Optional[int] = typer.Option(None, help="Training samples (dataset default if unset)."),
    val_size: Optional[int] = typer.Option(None, help="Validation samples (dataset default if unset)."),
    image_size: int = typer.Option(64, help="Canvas size for generated data."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Train one model and write RUN_DIR/model.safetensors, config.json and history.json."""
    from .data import load_dataset
    from .model import create_model
    from .train import TrainConfig, fit, seed_all

    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr, weight_decay=weight_decay, seed=seed)
    bb_kw, head_kw = _json_object(backbone_kwargs, "--backbone-kwargs"), _json_object(head_kwargs, "--head-kwargs")
    train_set = load_dataset(data, "train", train_size, seed=seed, size=image_size)
    val_set = load_dataset(data, "val", val_size, seed=seed, size=image_size)
    seed_all(seed)
    model = create_model(method, backbone, train_set.num_classes, train_set.in_chans, bb_kw, **head_kw)
    history = fit(model, train_set, val_set, cfg, out, progress=not quiet,
                  extra_config={"data": {"name": data, "size": image_size}})  # fmt: skip
    last = history[-1] if history else {}
    console.print(f"{method} on {backbone}: val_acc {last.get('val_acc', float('nan')):.3f}; wrote {out}")


@app.command()
def evaluate(
    checkpoint: list[Path] = typer.Option(..., "--checkpoint", help="Run directory; repeat for several runs."),
    data: str = typer.Option("cluttered-digits", "--data", help="Dataset name."),
    split: str = typer.Option("test", help="Dataset split."),
    n: Optional[int] = typer.Option(None, "--n", help="Number of images (dataset default if unset)."),
    methods: str = typer.Option("self", help="Comma-separated: self, cam, gradcam, gradcam++, scorecam, rise, lime."),
    metrics: str = typer.Option("all", help="Comma-separated metric names, or 'all'."),
    batch_size: int = typer.Option(50, help="Images per batch."),
    steps: int = typer.Option(20, help="Deletion / insertion steps."),
    sanity_images: int = typer.Option(0, help="Images for the cascading-randomization check (0: skip)."),
    seed: int = typer.Option(0, help="Seed of the generated data."),
    out: Path = typer.Option(..., "--out", help="Directory for evaluation.json."),
) -> None:
    """Score the maps of one or more trained runs with every metric; write OUT/evaluation.json."""
    from dataclasses import asdict

    from rich.progress import track

    from .data import load_dataset
    from .evaluate import METRICS, EvalConfig, evaluate_runs
    from .model import load_checkpoint

    cfg = EvalConfig(methods=_names(methods), metrics=METRICS if metrics == "all" else _names(metrics),
                     batch_size=batch_size, steps=steps, sanity_images=sanity_images)  # fmt: skip
    runs, size = {}, None
    for path in checkpoint:
        model, doc = load_checkpoint(path)
        name = path.name if path.name not in runs else str(path)
        runs[name] = model
        size = size or doc.get("data", {}).get("size")
    dataset = load_dataset(data, split, n, seed=seed, size=size or 64)
    for name, model in runs.items():
        if (model.config.num_classes, model.config.in_chans) != (dataset.num_classes, dataset.in_chans):
            raise ConfigError(
                f"checkpoint {name} has {model.config.num_classes} classes / {model.config.in_chans} channels, "
                f"dataset {data} has {dataset.num_classes} / {dataset.in_chans}"
            )
    result = evaluate_runs(runs, dataset, cfg, progress=lambda it, total: track(it, total=total, description="evaluating"))
    doc = {"dataset": data, "split": split, "config": asdict(cfg), **result}
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.json").write_text(json.dumps(doc, indent=2, default=list))
    rows = {f"{run}/{m}": r for run, v in result["runs"].items() for m, r in v["results"].items()}
    console.print(_table(f"{data} ({split}, {result['n_images']} images)", rows))
    console.print(f"wrote {out / 'evaluation.json'}")


def _names(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


@app.command()
def models() -> None:
    """List the heads and backbones create_model accepts."""
    from .backbones import list_backbones
    from .heads import HEADS

    console.print("[bold]methods:[/] " + ", ".join(HEADS))
    names = list_backbones()
    console.print("[bold]backbones:[/] " + ", ".join(names))


@app.command()
def info(checkpoint: Path = typer.Argument(..., help="A run directory written by `selfcam train`.")) -> None:
    """Load a checkpoint and print its config."""
    from dataclasses import asdict

    from .evaluate import count_params
    from .model import load_checkpoint

    model, doc = load_checkpoint(checkpoint)
    doc["model"] = asdict(doc["model"])
    doc["params"] = count_params(model)
    console.print_json(json.dumps(doc))


experiment_app = typer.Typer(cls=_FriendlyGroup, no_args_is_help=True,
                             help="Experiments behind the papers' claims (resumable; JSON under results/).")  # fmt: skip
app.add_typer(experiment_app, name="experiment")
_EXP_HELP = {
    "epochs": "Epochs (default: the dataset's recipe, see docs/RESULTS.md).",
    "train_size": "Training images (default: the dataset's recipe).",
    "test_size": "Test images (default: the dataset's recipe).",
}


def _recipe(data: str, backbone: Optional[str], epochs: Optional[int], train_size: Optional[int],
            test_size: Optional[int]) -> Any:  # fmt: skip
    from .experiment import recipe_for

    return recipe_for(data, backbone=backbone, epochs=epochs, train_size=train_size, test_size=test_size)


@experiment_app.command("accuracy")
def experiment_accuracy(
    data: str = typer.Option(..., "--data", help="Dataset: a name or KIND:PATH (see docs/data.md)."),
    methods: str = typer.Option("plain,lfi,lfi-light,se,abn", help="Comma-separated heads."),
    seeds: int = typer.Option(3, help="Seeds 0..N-1 per method."),
    out: Path = typer.Option(..., "--out", help="JSON file; checkpoints go beside it in OUT.runs/."),
    backbone: Optional[str] = typer.Option(None, help="Backbone (default: the dataset's recipe)."),
    epochs: Optional[int] = typer.Option(None, help=_EXP_HELP["epochs"]),
    train_size: Optional[int] = typer.Option(None, help=_EXP_HELP["train_size"]),
    test_size: Optional[int] = typer.Option(None, help=_EXP_HELP["test_size"]),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Test accuracy of every method over several seeds, same backbone and recipe; resumable."""
    from .experiment import accuracy_experiment

    doc = accuracy_experiment(data, _names(methods), seeds, out, _recipe(data, backbone, epochs, train_size, test_size),
                              progress=not quiet, log=lambda s: console.print(s, markup=False, highlight=False))  # fmt: skip
    rows = {m: {"mean": v["mean"], "std": v["std"]} for m, v in doc["methods"].items()}
    console.print(_table(f"{data}: test accuracy over {seeds} seeds", rows, first="method"))
    console.print(f"wall time {doc['wall_seconds']:.0f} s in all; wrote {out}")


@experiment_app.command("stability")
def experiment_stability(
    data: str = typer.Option(..., "--data", help="Dataset: a name or KIND:PATH (see docs/data.md)."),
    methods: str = typer.Option("lfi,lfi-light,se,abn", help="Comma-separated heads."),
    settings: int = typer.Option(5, help="Hyper-parameter settings (2-5; listed in docs/RESULTS.md)."),
    out: Path = typer.Option(..., "--out", help="JSON file; checkpoints go beside it in OUT.runs/."),
    backbone: Optional[str] = typer.Option(None, help="Backbone (default: the dataset's recipe)."),
    epochs: Optional[int] = typer.Option(None, help=_EXP_HELP["epochs"]),
    train_size: Optional[int] = typer.Option(None, help=_EXP_HELP["train_size"]),
    test_size: Optional[int] = typer.Option(None, help=_EXP_HELP["test_size"]),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Map stability (mean pairwise IoU / Dice) of every method across settings; resumable."""
    from .experiment import stability_experiment

    doc = stability_experiment(data, _names(methods), settings, out, _recipe(data, backbone, epochs, train_size, test_size),
                               progress=not quiet, log=lambda s: console.print(s, markup=False, highlight=False))  # fmt: skip
    rows = {m: {"iou": v["iou"], "dice": v["dice"]} for m, v in doc["methods"].items()}
    console.print(_table(f"{data}: map stability over {settings} settings", rows, first="method"))
    console.print(f"wall time {doc['wall_seconds']:.0f} s in all; wrote {out}")


@experiment_app.command("results")
def experiment_results(
    results: Path = typer.Option(Path("results"), "--results", help="Folder of experiment JSON files."),
    out: Path = typer.Option(Path("docs/RESULTS.md"), "--out", help="Markdown file to write (plots beside it)."),
) -> None:
    """Regenerate docs/RESULTS.md (tables, commands, wall times, plots) from results/*.json."""
    from .experiment import write_results_markdown

    write_results_markdown(results, out)
    console.print(f"wrote {out}")


def _add_bench() -> None:
    from .bench import bench_app

    app.add_typer(bench_app, name="bench")


_add_bench()


def main() -> None:
    app()
