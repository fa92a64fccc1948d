"""The ``selfcam`` command line (typer + rich).

Every command turns selfcam's own errors (and unreadable files) into one line on
stderr and exit code 2; ``selfcam --debug ...`` shows the traceback instead.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from .errors import CheckpointError, ConfigError, SelfcamError

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
            from .train import is_global_zero

            if not is_global_zero():  # the other processes of a DDP run: rank 0 says it once
                raise typer.Exit(2) from None
            err_console.print(f"[bold red]error:[/] {escape(_one_line(str(e)))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None


def _one_line(text: str) -> str:
    """``text`` with control characters (a newline in a file name...) and undecodable bytes escaped as ``repr`` does."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


app = typer.Typer(cls=_FriendlyGroup, add_completion=False, no_args_is_help=True,
                  help="Classifiers that explain themselves: train, evaluate, demo, inspect.")  # fmt: skip
console = Console()
_FACTORY_HELP = ("For a run of your own model class: module:function returning the bare model (typed here only; "
                 "selfcam never imports a name read from a file).")
_DATA_HELP = ("cluttered-digits, mnist, fashion-mnist, or KIND:PATH with KIND one of imagefolder, cifar10, "
              "cifar100, stl10, celeba, idx (see docs/data.md).")  # fmt: skip


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    _state["debug"] = debug


def _json_object(text: str, option: str) -> dict[str, Any]:
    from .safeio import loads_json

    value = loads_json(text, option)  # bounded nesting and integers: one error line, never a traceback
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
    out: Path = typer.Option(Path("demo-out"), "--out", help="Directory for metrics.json, report.html and the runs."),
    task: str = typer.Option("digits", help="digits (every head on cluttered digits), faces (SE-CAM per attribute), video "
                             "(SE-CAM per frame of moving digits) or asd (audio-visual active speaker detection)."),
    epochs: Optional[int] = typer.Option(None, help="Epochs per model (default: the demo's recipe)."),
    backbone: Optional[str] = typer.Option(None, help="Backbone for every model (default: the demo's recipe)."),
    train_size: Optional[int] = typer.Option(None, help="Training samples (default: the demo's recipe)."),
    test_size: Optional[int] = typer.Option(None, help="Test samples (default: the demo's recipe)."),
    seed: int = typer.Option(0, help="Seed for data, initialisation and order."),
    methods: Optional[str] = typer.Option(None, help="Comma-separated heads to train (default: the demo's; digits: "
                                          "plain,lfi,lfi-light,se,abn)."),
    map_loss_weight: Optional[float] = typer.Option(None, "--map-loss-weight", help="Weight of the map loss on the "
                                                    "ground-truth boxes (default: the demo's; faces and asd 0.3, others "
                                                    "0; 0: none, the papers' unsupervised training)."),
    mask_fraction: Optional[float] = typer.Option(None, "--mask-fraction", help="Share of training samples whose box "
                                                  "the map loss sees (default: the demo's; faces and asd 0.1)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Train on built-in data with ground truth, score the maps, write metrics.json and report.html."""
    from .demo import run_demo
    from .recipes import DEMOS, demo_recipe

    if task not in DEMOS:
        raise typer.BadParameter(f"unknown demo {task!r}; choose from {', '.join(DEMOS)}", param_hint="--task")
    if map_loss_weight == 0 and mask_fraction is not None:
        raise typer.BadParameter("says which samples the map loss sees: give --map-loss-weight > 0", param_hint="--mask-fraction")
    recipe = demo_recipe(task, epochs=epochs, backbone=backbone, train_size=train_size, test_size=test_size, seed=seed,
                         methods=_names(methods) if methods else None, map_loss_weight=map_loss_weight,
                         mask_fraction=mask_fraction)  # fmt: skip
    from .tasks import get_task

    heads = get_task(recipe.task).methods
    unknown = [m for m in recipe.methods if m not in heads]
    if unknown:
        raise typer.BadParameter(f"unknown method(s) {unknown} for the {task} demo; choose from {', '.join(heads)}", param_hint="--methods")
    t0 = time.perf_counter()
    metrics = run_demo(out, recipe, progress=not quiet, log=lambda s: console.print(s, markup=False, highlight=False))
    rows = {f"{run}/{m}": r for run, v in metrics["runs"].items() for m, r in v["results"].items()}
    console.print(_table(f"{recipe.data}, test split ({metrics['n_items']} items)", rows))
    for run, v in metrics["runs"].items():
        for cls, imp in (v.get("modality_importance") or {}).items():
            console.print(f"{run}: modality importance, {cls}: " + ", ".join(f"{k} {x:.3f}" for k, x in imp.items()))
    console.print(f"wall time {time.perf_counter() - t0:.0f} s; wrote {out / 'metrics.json'} and {out / 'report.html'}")


@app.command()
def train(
    ctx: typer.Context,
    task: str = typer.Option("image", "--task", help="image, attributes, video or asd (see `selfcam models`)."),
    method: Optional[str] = typer.Option(None, "--method", help="Head: plain, lfi, lfi-light, se, abn for images (required "
                                         "unless --resume); attributes, video and asd have one head each, the default."),
    backbone: str = typer.Option("resnet20", "--backbone", help="Backbone name (see `selfcam models`)."),
    data: Optional[str] = typer.Option(None, "--data", help=_DATA_HELP + " Default: the task's built-in data "
                                       "(cluttered-digits, synthetic-faces, synthetic-clips, speaker-clips)."),
    epochs: int = typer.Option(10, help="Epochs."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory for the checkpoint and history (required unless --resume)."),
    batch_size: int = typer.Option(64, help="Batch size (per process)."),
    optimizer: str = typer.Option("adamw", help="adamw or sgd (one-cycle schedule either way)."),
    lr: float = typer.Option(3e-3, help="Peak learning rate."),
    weight_decay: float = typer.Option(5e-4, help="Weight decay."),
    backbone_kwargs: str = typer.Option("{}", help='Backbone options as JSON, e.g. \'{"stem_stride": 2}\'.'),
    head_kwargs: str = typer.Option("{}", help='Head options as JSON, e.g. \'{"reduction": 8}\'.'),
    seed: int = typer.Option(0, help="Seed."),
    train_size: Optional[int] = typer.Option(None, help="Training samples (dataset default if unset)."),
    val_size: Optional[int] = typer.Option(None, help="Validation samples (dataset default if unset)."),
    image_size: Optional[int] = typer.Option(None, help="Image side in pixels (the dataset's own size if unset)."),
    devices: int = typer.Option(1, help="Processes per machine; more than one trains with DDP (see docs/training.md)."),
    num_nodes: int = typer.Option(1, "--num-nodes", help="Machines, each running --devices processes."),
    accelerator: str = typer.Option("auto", help="cpu, gpu or auto."),
    precision: str = typer.Option("32", "--precision", help="32, bf16-mixed or 16-mixed (Lightning's autocast; 16-mixed needs a GPU)."),
    num_workers: int = typer.Option(0, "--num-workers", help="DataLoader worker processes (may differ on --resume)."),
    compile: bool = typer.Option(False, "--compile", help="Train torch.compile(model) (recorded; the first steps compile)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this directory from its last saved state, with its stored recipe."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
    freeze_backbone: bool = typer.Option(False, "--freeze-backbone", help="Train the head alone, the backbone frozen "
                                         "(no gradient, BatchNorm statistics and dropout as they are) for the whole run."),
    head_epochs: int = typer.Option(0, "--head-epochs", help="Train the head alone for the first N epochs, then everything."),
    backbone_lr_scale: float = typer.Option(1.0, "--backbone-lr-scale", help="The backbone's learning rate is --lr times this."),
    map_loss_weight: float = typer.Option(0.0, "--map-loss-weight", help="Explanation-supervised training: add this times the "
                                          "share of the map's mass outside the ground-truth box (data with boxes: "
                                          "cluttered-digits, shortcut-digits; 0: off)."),
    mask_fraction: float = typer.Option(1.0, "--mask-fraction", help="The share of training images whose box the map loss "
                                        "sees (seeded by --seed, recorded)."),
    map_loss_map: str = typer.Option("self", "--map-loss-map", help="The map the map loss supervises: self (the head's own; "
                                     "plain: the CAM of the label) or class (the class map of the label)."),
    map_loss: str = typer.Option("outside", "--map-loss", help="outside (the share of the map's mass outside the box) "
                                 "or dice (one minus the soft Dice of map and box: also covers the box)."),
    pretrained: Optional[str] = typer.Option(None, "--pretrained", help="Start from these weights: a file (torchvision "
                                             ".pth, read only with weights_only; safetensors; a timm or Lightning checkpoint) "
                                             "or a known name (efficientnet-lite0, with --backbone timm:efficientnet_lite0)."),
    model_factory: Optional[str] = typer.Option(None, "--model-factory", help="module:function returning your own bare "
                                                "classifier (an nn.Module) to wrap with --method; typed here only, never "
                                                "read from a file; give it again with --resume."),
    features: Optional[str] = typer.Option(None, "--features", help="Wrap the model: the module whose output is the feature map (e.g. layer4)."),
    classifier: Optional[str] = typer.Option(None, "--classifier", help="Wrap the model: its classifier module (e.g. fc)."),
    tokens: Optional[str] = typer.Option(None, "--tokens", help='Wrap a token model: the prefix tokens to drop, or JSON '
                                         '\'{"prefix": 1, "grid": [14, 14]}\'.'),
) -> None:
    """Train one model of any task and write RUN_DIR/model.safetensors, config.json and history.json.

    --backbone takes selfcam's backbones and any torchvision (torchvision:NAME) or timm (timm:NAME)
    classifier; with --model-factory, --features, --classifier or --tokens (or --backbone wrap:NAME)
    the classifier is wrapped whole by selfcam.wrap (docs/own-model.md).

    The training state is saved in RUN_DIR/checkpoints/ after every epoch and on SIGUSR1;
    `--resume RUN_DIR` continues from it.
    """
    from .data import load_dataset
    from .tasks import get_task
    from .train import TrainConfig, fit, is_global_zero, latest_state, seed_all

    o = dict(ctx.params)
    if resume is None and out is not None:  # selfcam writes only into what it created
        from .checkpoint import check_own_output

        check_own_output(out)
    if resume is not None:
        state = latest_state(resume)
        if state is None:
            if not (resume / "config.json").is_file():
                raise CheckpointError(f"{resume}: nothing to resume (no checkpoints/ and no finished run)")
            console.print(f"{resume}: training already finished; nothing to resume")
            return
        o.update(_resumed_options(ctx, state))
    t = get_task(o["task"])
    if o["method"] is None and len(t.methods) == 1:
        o["method"] = t.methods[0]
    if resume is None and (o["method"] is None or out is None):
        raise typer.BadParameter("--method and --out are required unless you --resume a run")
    o["data"] = o["data"] or t.default_data
    from .errors import check_accelerator, require_int
    from .train import PRECISIONS

    if o["image_size"] is not None:  # 0 is refused, not taken for the dataset's default
        from .safeio import MAX_IMAGE_SIZE

        require_int("--image-size", o["image_size"], 1, MAX_IMAGE_SIZE)
    check_accelerator(accelerator)
    numbers = (("--lr", "lr", "> 0"), ("--weight-decay", "weight_decay", ">= 0"), ("--backbone-lr-scale", "backbone_lr_scale", "> 0"),
               ("--map-loss-weight", "map_loss_weight", ">= 0"))
    for option, key, low in numbers:  # named as typed, not as fields
        value = o[key]
        if not (math.isfinite(value) and (value > 0 if low == "> 0" else value >= 0)):
            raise ConfigError(f"{option} must be a finite number {low}, got {value}")
    if o["precision"] not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {o['precision']!r}")
    require_int("--num-workers", o["num_workers"], 0, 256)
    if o["model_factory"] is not None and getattr(ctx.get_parameter_source("backbone"), "name", "") == "COMMANDLINE":
        raise ConfigError("give --backbone or --model-factory, not both (--model-factory builds the whole classifier)")
    cfg = TrainConfig(epochs=o["epochs"], batch_size=o["batch_size"], optimizer=o["optimizer"], lr=o["lr"], weight_decay=o["weight_decay"],
                      seed=o["seed"], accelerator=accelerator, devices=o["devices"], num_nodes=o["num_nodes"],
                      freeze_backbone=o["freeze_backbone"], head_epochs=o["head_epochs"], backbone_lr_scale=o["backbone_lr_scale"],
                      precision=o["precision"], num_workers=o["num_workers"], compile=o["compile"], map_loss_weight=o["map_loss_weight"],
                      mask_fraction=o["mask_fraction"], map_loss_map=o["map_loss_map"], map_loss=o["map_loss"])  # fmt: skip
    bb_kw, head_kw = _json_object(o["backbone_kwargs"], "--backbone-kwargs"), _json_object(o["head_kwargs"], "--head-kwargs")
    factory = _user_factory(o["model_factory"])
    train_set = load_dataset(o["data"], "train", o["train_size"], seed=cfg.seed, size=o["image_size"])
    val_set = load_dataset(o["data"], "val", o["val_size"], seed=cfg.seed, size=o["image_size"])
    t.check_dataset(train_set, "--data")
    seed_all(cfg.seed)
    if resume is not None:
        model = _rebuilt(t, state.model, factory, resume)
    else:
        model = _new_model(t, train_set, o, bb_kw, head_kw, factory)
    extra: dict[str, Any] = {"data": {"seed": cfg.seed}}  # fit records the rest of what the model is trained on
    if o["pretrained"] is not None:  # the weights it started from (they are in the run; never read again)
        extra["pretrained"] = o["pretrained"]
    report = getattr(model, "pretrained_report", None)
    if report is not None and is_global_zero():
        console.print(f"pretrained: {report.summary()}", markup=False, highlight=False, soft_wrap=True)
    history = fit(model, train_set, val_set, cfg, o["out"], progress=not quiet, extra_config=extra, resume=resume is not None)
    last = history[-1] if history else {}
    if is_global_zero():
        console.print(f"{t.describe(model.config)}: val_acc {last.get('val_acc', float('nan')):.3f}; wrote {o['out']}")


_RECIPE = ("epochs", "batch_size", "optimizer", "lr", "weight_decay", "seed", "devices", "num_nodes", "freeze_backbone",
           "head_epochs", "backbone_lr_scale", "precision", "compile", "map_loss_weight", "mask_fraction", "map_loss_map",
           "map_loss")  # the train options stored in TrainConfig under the same names


def _resumed_options(ctx: typer.Context, state: Any) -> dict[str, Any]:
    """The stored recipe of a resumed run as `train` options; options given on the command line must agree."""
    m, t, d = state.model, state.train, state.extra.get("data", {})
    stored = {"task": state.task, "backbone": m.backbone, "data": d.get("name"), "image_size": d.get("size"),
              "train_size": d.get("train_size"), "val_size": d.get("val_size"), "out": ctx.params["resume"],
              "pretrained": state.extra.get("pretrained"), **{k: getattr(t, k) for k in _RECIPE}}  # fmt: skip
    if hasattr(m, "method"):  # image and attribute models: the head and both option sets are in the config
        stored.update(method=m.method, backbone_kwargs=json.dumps(m.backbone_kwargs), head_kwargs=json.dumps(m.head_kwargs))
    wrapped = m.backbone.startswith("wrap:")
    stored.update(features=None, classifier=None, tokens=None)  # a run that was not wrapped has none
    if wrapped:  # what selfcam.wrap recorded; the backbone_kwargs of a wrapped model are wrap's options, not the user's
        stored.update(features=m.backbone_kwargs.get("features"), classifier=m.backbone_kwargs.get("classifier"),
                      tokens=m.backbone_kwargs.get("tokens"), backbone_kwargs=json.dumps(m.backbone_kwargs.get("model_kwargs") or {}))  # fmt: skip

    def same(key: str, given: Any) -> bool:
        if key.endswith("_kwargs"):
            return _json_object(given, f"--{key.replace('_', '-')}") == json.loads(stored[key])
        if key == "tokens":
            from .wrap import tokens_spec

            return tokens_spec(_tokens_option(given)) == stored[key]
        if key == "backbone" and wrapped:  # --backbone timm:NAME --features ... names the run wrap:timm:NAME
            from .wrap import source_name

            return stored[key] in (given, f"wrap:{source_name(given.removeprefix('wrap:'))}")
        return Path(given).resolve() == Path(stored[key]).resolve() if key == "out" else given == stored[key]

    clash = [f"--{k.replace('_', '-')} {v} (the run has {stored[k]})" for k, v in ctx.params.items()
             if k in stored and getattr(ctx.get_parameter_source(k), "name", "") == "COMMANDLINE" and not same(k, v)]  # fmt: skip
    if clash:
        raise ConfigError(f"--resume {ctx.params['resume']} continues the stored recipe; these options differ: {', '.join(clash)}")
    if stored["data"] is None:
        raise ConfigError(f"{ctx.params['resume']}: no data entry in its state (not started by `selfcam train`); resume it with selfcam.fit(..., resume=True)")
    return stored


def _tokens_option(text: str) -> Any:
    """--tokens as typed: a count of prefix tokens, or a JSON object."""
    from .safeio import loads_json

    return int(text) if text.strip().isdigit() else loads_json(text, "--tokens")


def _user_factory(spec: Optional[str]) -> Any:
    """The callable --model-factory names (imported now, from what was typed), or None."""
    if spec is None:
        return None
    from .wrap import model_factory

    return model_factory(spec)


def _rebuilt(t: Any, config: Any, factory: Any, run: Path) -> Any:
    """The model of a resumed run, fresh weights: wrapped runs through selfcam.wrap.rebuild (your own class: --model-factory)."""
    from .wrap import rebuild

    if not str(getattr(config, "backbone", "")).startswith("wrap:"):
        if factory is not None:
            raise ConfigError(f"--model-factory is for runs of your own model class; {run} rebuilds itself ({t.describe(config)})")
        return t.build(config)
    return rebuild(config, model=factory)


def _new_model(t: Any, train_set: Any, o: dict[str, Any], bb_kw: dict[str, Any], head_kw: dict[str, Any], factory: Any) -> Any:
    """The model a new `train` run starts from: the task's own, a named backbone from pretrained weights, or a wrapped classifier."""
    from .model import ModelConfig, create_model

    wrap_options = {k: o[k] for k in ("features", "classifier", "tokens") if o[k] is not None}
    wrapping = factory is not None or bool(wrap_options) or o["backbone"].startswith("wrap:")
    if not (wrapping or o["pretrained"] is not None):
        return t.create(train_set, o["method"], o["backbone"], bb_kw, head_kw)
    used = [f"--{k.replace('_', '-')}" for k in ("pretrained", "model_factory", *wrap_options) if o[k] is not None]
    if t.config_type is not ModelConfig:
        raise ConfigError(f"{', '.join(used) or '--backbone wrap:...'}: for image and attribute models; the {t.name} task builds its own")
    if o["method"] not in t.methods:
        raise ConfigError(f"the {t.name} task has the head(s) {', '.join(t.methods)}, got {o['method']!r}")
    if not wrapping:  # a named backbone: the whole network gets the weights, the first conv fits the data's channels
        return create_model(o["method"], o["backbone"], train_set.num_classes, train_set.in_chans, bb_kw,
                            pretrained=o["pretrained"], **head_kw)  # fmt: skip
    from .wrap import build_user_model, wrap

    if "tokens" in wrap_options:
        wrap_options["tokens"] = _tokens_option(wrap_options["tokens"])
    source = build_user_model(factory, "--model-factory") if factory is not None else o["backbone"].removeprefix("wrap:")
    size = tuple(train_set[0][0].shape[-2:])  # the probe sees inputs of the data's size
    model = wrap(source, o["method"], num_classes=train_set.num_classes, pretrained=o["pretrained"], input_size=size,
                 model_kwargs=bb_kw or None, **wrap_options, **head_kw)  # fmt: skip
    if model.config.in_chans != train_set.in_chans:
        raise ConfigError(f"the wrapped model takes {model.config.in_chans} input channel(s), --data {o['data']} has "
                          f"{train_set.in_chans}: use data with as many channels, or a selfcam backbone "
                          "(--backbone torchvision:NAME / timm:NAME without wrap options adapts the first convolution)")  # fmt: skip
    return model


@app.command()
def evaluate(
    checkpoint: list[Path] = typer.Option(..., "--checkpoint", help="Run directory; repeat for several runs."),
    data: Optional[str] = typer.Option(None, "--data", help=_DATA_HELP + " Default: the data the first run was trained on (cluttered-digits if it does not say)."),
    split: str = typer.Option("test", help="Dataset split: train, val or test."),
    n: Optional[int] = typer.Option(None, "--n", help="Number of images (dataset default if unset)."),
    methods: str = typer.Option("self", help="Comma-separated: self, self-class, cam, gradcam, gradcam++, scorecam, rise, lime "
                                "(each on the runs it applies to; video runs: self, gradcam, gradcam++; attribute and asd runs: self)."),
    metrics: str = typer.Option("all", help="Comma-separated metric names, or 'all' (the runs' task's metrics, docs/metrics.md)."),
    batch_size: int = typer.Option(50, help="Images per batch."),
    steps: int = typer.Option(20, help="Deletion / insertion steps."),
    sanity_images: int = typer.Option(0, help="Images for the cascading-randomization check (0: skip)."),
    grid_size: int = typer.Option(2, "--grid-size", help="Grid pointing game: a grid of N x N images of distinct classes."),
    grid_count: int = typer.Option(100, "--grid-count", help="Grid pointing game: grids per run."),
    grid_confidence: float = typer.Option(0.9, "--grid-confidence", help="Grid pointing game: the softmax probability "
                                          "(of a correct prediction) an image needs to enter a grid."),
    grid_seed: int = typer.Option(0, "--grid-seed", help="Grid pointing game: seed of the grids."),
    seed: int = typer.Option(0, help="Seed of the generated data."),
    out: Path = typer.Option(..., "--out", help="Directory for evaluation.json."),
    devices: int = typer.Option(1, help="Processes to share the images (contiguous shards; same numbers as one)."),
    accelerator: str = typer.Option("cpu", help="cpu, gpu or auto (gpu with --devices N: one GPU per process)."),
    model_factory: Optional[str] = typer.Option(None, "--model-factory", help=_FACTORY_HELP),
) -> None:
    """Score the maps of one or more trained runs (one task) with every metric; write OUT/evaluation.json."""
    from dataclasses import asdict

    import torch
    from rich.progress import track

    from .checkpoint import load_checkpoint, user_model
    from .evaluate import EvalConfig, evaluate_task, task_metrics
    from .wrap import user_class
    from .tasks import get_task

    if accelerator not in ("cpu", "gpu", "auto"):
        raise ConfigError(f"--accelerator must be cpu, gpu or auto, got {accelerator!r}")
    from .errors import check_accelerator

    check_accelerator(accelerator)
    device = "cuda" if accelerator == "gpu" or (accelerator == "auto" and torch.cuda.is_available()) else "cpu"
    runs, first, docs = {}, None, []
    with user_model(_user_factory(model_factory)):  # runs of your own class are built by it, the others rebuild themselves
        for path in checkpoint:
            model, doc = load_checkpoint(path, device)
            name = path.name if path.name not in runs else str(path)
            runs[name] = model
            first = first or doc
            docs.append(doc)
    if model_factory is not None and not any(user_class(d["model"]) for d in docs):
        raise ConfigError(f"--model-factory {model_factory}: none of the runs wraps your own model class (they rebuild "
                          "themselves); leave it out")  # fmt: skip
    task = get_task(first["task"])
    data = data or (first.get("data") or {}).get("name") or task.default_data
    cfg = EvalConfig(methods=_names(methods), metrics=task_metrics(task.name) if metrics == "all" else _names(metrics),
                     batch_size=batch_size, steps=steps, sanity_images=sanity_images, grid_size=grid_size,
                     grid_count=grid_count, grid_confidence=grid_confidence, grid_seed=grid_seed)  # fmt: skip
    _, dataset = task.run_data(first, split, n, spec=data, seed=seed)  # at the first run's size, with its data's options
    result = evaluate_task(runs, dataset, cfg, progress=lambda it, total: track(it, total=total, description="evaluating"), devices=devices)
    from .checkpoint import command_line

    doc = {"dataset": data, "split": split, "config": asdict(cfg), **result, "command": command_line()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.json").write_text(json.dumps(doc, indent=2, default=list))
    rows = {f"{run}/{m}": r for run, v in result["runs"].items() for m, r in v["results"].items()}
    console.print(_table(f"{data} ({split}, {result['n_items']} items)", rows))
    console.print(f"wrote {out / 'evaluation.json'}")


@app.command()
def explain(
    images: Optional[list[Path]] = typer.Argument(None, help="Image files (image and attribute runs) or video "
                                                  "files .mp4 .avi .mov .mkv .webm (video and ASD runs), or directories "
                                                  "searched recursively. Without them: items of --data."),
    checkpoint: Path = typer.Option(..., "--checkpoint", help="Run directory written by `selfcam train`."),
    out: Path = typer.Option(..., "--out", help="Directory for one PNG per image (clips: PNG strip + GIF) and predictions.json."),
    methods: str = typer.Option("", "--methods", help="Comma-separated post-hoc maps to add: cam, gradcam, gradcam++, scorecam, rise, lime."),
    data: Optional[str] = typer.Option(None, "--data", help="Without files: the dataset whose items to explain "
                                       "(default: the run's own data, as it was trained). " + _DATA_HELP),
    split: str = typer.Option("test", "--split", help="Without files: the split of --data."),
    n: int = typer.Option(8, "--n", help="Without files: how many items, spread over the classes."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per batch."),
    alpha: float = typer.Option(0.5, "--alpha", help="Weight of the image in the overlay (grad-cam's image_weight)."),
    size: Optional[int] = typer.Option(None, "--size", help="Input side in pixels of image files (default: the run's training size)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
    model_factory: Optional[str] = typer.Option(None, "--model-factory", help=_FACTORY_HELP),
) -> None:
    """Explain image files, or items of a dataset (any task): the input, the model's own map and post-hoc
    maps side by side (attribute runs: one map per attribute; video and ASD runs: per-frame strips and GIFs)."""
    from rich.progress import track

    from .explain import explain_files, explain_items, find_images
    from .checkpoint import CONFIG, load_checkpoint

    model, doc = load_checkpoint(checkpoint, model=_user_factory(model_factory))
    if not images:
        records = explain_items(model, doc, out, data=data, split=split, n=n, methods=_names(methods), batch_size=batch_size, alpha=alpha)
        console.print(f"explained {len(records)} item(s) of {data or doc.get('data', {}).get('name')} ({split}); wrote "
                      f"{out}/*.png and {out / 'predictions.json'}", markup=False, highlight=False, soft_wrap=True)  # fmt: skip
        return
    if data is not None:
        raise typer.BadParameter("give image files or --data, not both")
    if getattr(model, "task", None) in ("video", "asd"):  # video files: selfcam.explain.explain_videos
        records = explain_files(model, doc, images, out, _names(methods), alpha=alpha, size=size, source=str(checkpoint / CONFIG))
        console.print(f"explained {len(records)} video file(s); wrote {out}/NAME-explained.mp4, NAME.gif, NAME.maps.safetensors "
                      f"and {out / 'predictions.json'}", markup=False, highlight=False, soft_wrap=True)  # fmt: skip
        return
    files, skipped = find_images(images)
    if skipped:
        shown = ", ".join(str(p) for p in skipped[:10]) + (f" and {len(skipped) - 10} more" if len(skipped) > 10 else "")
        err_console.print(f"warning: skipped {len(skipped)} non-image file(s): {shown}", markup=False, highlight=False,
                          soft_wrap=True)  # fmt: skip
    bar = None if quiet or not any(p.is_dir() for p in images) else (
        lambda it, total: track(it, total=total, description="explaining", console=err_console))  # fmt: skip
    records = explain_files(model, doc, files, out, _names(methods), batch_size=batch_size, alpha=alpha, size=size,
                            progress=bar, source=str(checkpoint / CONFIG))  # fmt: skip
    console.print(f"explained {len(records)} image(s); wrote {out}/*.png and {out / 'predictions.json'}",
                  markup=False, highlight=False, soft_wrap=True)  # fmt: skip


@app.command()
def report(
    sources: list[Path] = typer.Argument(..., help="Run (config.json), evaluation (evaluation.json) or demo (metrics.json + runs/) directories."),
    out: Path = typer.Option(Path("report.html"), "--out", help="The HTML file to write."),
    title: Optional[str] = typer.Option(None, "--title", help="Page title."),
    per_class: int = typer.Option(2, "--per-class", help="Gallery images per class (0: no gallery)."),
    methods: str = typer.Option("", "--methods", help="Post-hoc maps added to the gallery for plain runs, e.g. gradcam."),
    model_factory: Optional[str] = typer.Option(None, "--model-factory", help=_FACTORY_HELP),
) -> None:
    """One self-contained HTML page (images embedded) from runs, evaluations and demos."""
    from .errors import require_int
    from .posthoc import POSTHOC_METHODS
    from .report import build_report

    require_int("--per-class", per_class, 0)
    from .checkpoint import refuse_run_file

    refuse_run_file(out, sources)  # never onto a run's own files
    unknown = [m for m in _names(methods) if m not in POSTHOC_METHODS]
    if unknown:
        raise ConfigError(f"--methods: unknown post-hoc method(s) {', '.join(unknown)}; choose from {', '.join(POSTHOC_METHODS)}")
    from .checkpoint import user_model

    with user_model(_user_factory(model_factory)):  # the gallery's runs of your own class
        path = build_report(sources, out, title=title, per_class=per_class, methods=_names(methods))
    console.print(f"wrote {path}", markup=False, highlight=False, soft_wrap=True)


@app.command()
def export(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="Run directory written by `selfcam train`."),
    out: Path = typer.Option(..., "--out", help="The model file to write, e.g. model.onnx."),
    format: str = typer.Option("onnx", "--format", help="Export format (onnx)."),
    opset: int = typer.Option(17, "--opset", help="ONNX opset, 11 to 20."),
    size: Optional[int] = typer.Option(None, "--size", help="Input side in pixels (default: the run's training size)."),
    frames: Optional[int] = typer.Option(None, "--frames", help="Clip length of the graph, for a video run built for "
                                         "clips of any length (default: the run's training clips)."),
    model_factory: Optional[str] = typer.Option(None, "--model-factory", help=_FACTORY_HELP),
) -> None:
    """Export a run of any task to ONNX: the task's inputs and outputs (docs/export.md), dynamic batch, maps at input size."""
    import importlib.util

    from .explain import Preprocess
    from .export import example_inputs, export_onnx, graph_of, onnx_parity
    from .checkpoint import CONFIG, load_checkpoint

    if format != "onnx":
        raise ConfigError(f"--format: unknown export format {format!r}; choose onnx")
    from .checkpoint import refuse_run_file

    refuse_run_file(out, [checkpoint])  # never onto the run's own files
    model, doc = load_checkpoint(checkpoint, model=_user_factory(model_factory))
    data = doc.get("data") if isinstance(doc.get("data"), dict) else {}
    graph = graph_of(model)
    if graph.inputs == ("image",):  # image and attributes runs: the preprocessing of `selfcam explain`
        prep = Preprocess.from_config(doc, size, str(checkpoint / CONFIG))
        size = prep.size
        pre: dict[str, Any] = {"size": prep.size, "channels": prep.in_chans, "mean": prep.mean, "std": prep.std}
    else:  # clips (video, asd): what the run recorded of its data, clip length and sample rate else from the model
        size = data.get("size") if size is None else size
        if size is None:
            raise ConfigError(f"{checkpoint / CONFIG}: the run does not record its image size (data.size); pass --size")
        pre = {"size": size, "channels": model.config.in_chans}
        for key in ("frames", "sample_rate", "mean", "std"):
            value = data.get(key, getattr(model.config, key, None))
            if value is not None:
                pre[key] = value
    meta: dict[str, Any] = {"preprocess": pre}
    if isinstance(data.get("class_names"), list):
        meta["class_names"] = data["class_names"]
    frames = frames or data.get("frames")  # the clip length, for a video model built for any length; checked by export_onnx
    path = export_onnx(model, out, size, frames=frames, opset=opset, metadata=meta)
    xs = example_inputs(model, size, frames)
    shapes = ", ".join(f"{name} (N, {', '.join(map(str, x.shape[1:]))})" for name, x in zip(graph.inputs, xs))
    line = f"wrote {path} (opset {opset}, input{'s' if len(graph.inputs) > 1 else ''} {shapes})"
    if importlib.util.find_spec("onnxruntime") is None:  # the file is written and checked, just not compared
        line += "; onnxruntime not installed, parity not checked"
    else:
        diff = onnx_parity(model, path, *example_inputs(model, size, frames, batch=3))  # batch 3: exported at 2
        line += "; onnxruntime vs PyTorch max |diff|: " + ", ".join(f"{name} {d:.1e}" for name, d in diff.items())
    console.print(line, markup=False, highlight=False, soft_wrap=True)


def _names(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


@app.command()
def models() -> None:
    """List the tasks, heads and backbones create_model accepts."""
    from .backbones import list_backbones
    from .tasks import TASKS, list_tasks

    for name in list_tasks():
        t = TASKS[name]
        console.print(f"[bold]task {name}:[/] methods {', '.join(t.methods)}; default data {t.default_data}", highlight=False)
    names = list_backbones()
    console.print("[bold]backbones:[/] " + ", ".join(names))
    console.print("[bold]wrapped whole by selfcam.wrap (image and attribute tasks):[/] wrap:torchvision:<name>, wrap:timm:<name>, "
                  "or your own class with `selfcam train --model-factory module:function` (docs/own-model.md)", highlight=False)  # fmt: skip


@app.command()
def info(
    checkpoint: Path = typer.Argument(..., help="A run directory written by `selfcam train`."),
    model_factory: Optional[str] = typer.Option(None, "--model-factory", help=_FACTORY_HELP),
) -> None:
    """Check a run (config, tensor names and shapes) and print its config and parameter count; no tensor is read."""
    from .checkpoint import run_info

    console.print_json(json.dumps(run_info(checkpoint, model=_user_factory(model_factory))))


experiment_app = typer.Typer(cls=_FriendlyGroup, no_args_is_help=True,
                             help="Experiments behind the papers' claims (resumable; JSON under results/).")  # fmt: skip
app.add_typer(experiment_app, name="experiment")
_EXP_HELP = {
    "recipe": "A named recipe of selfcam.experiment.RECIPES (mnist, mnist-full, fashion-mnist, fashion-mnist-full, "
              "cluttered-digits; docs/RESULTS.md); default: the one named like --data.",
    "epochs": "Epochs (default: the dataset's recipe, see docs/RESULTS.md).",
    "train_size": "Training images (default: the dataset's recipe).",
    "test_size": "Test images (default: the dataset's recipe).",
}


def _recipe(data: Optional[str], name: Optional[str], backbone: Optional[str], epochs: Optional[int],
            train_size: Optional[int], test_size: Optional[int]) -> tuple[str, Any]:  # fmt: skip
    """The dataset spec and the recipe of an experiment: ``--recipe`` by name (its data unless ``--data``
    names another spec), else the recipe of ``--data``; the size and epoch options applied."""
    from .experiment import named_recipe, recipe_for

    if data is None and name is None:
        raise ConfigError("give --data or --recipe")
    overrides = {"backbone": backbone, "epochs": epochs, "train_size": train_size, "test_size": test_size}
    recipe = named_recipe(name, **overrides) if name else recipe_for(data, **overrides)
    return data or recipe.data, recipe


def _experiment_command(kind: str, methods: str, count: tuple[str, int, str], columns: tuple[str, ...], what: str,
                        doc: str) -> None:  # fmt: skip
    """Register ``selfcam experiment KIND``: both experiments take the same options but their count."""
    count_option, count_default, count_help = count

    def command(
        data: Optional[str] = typer.Option(None, "--data", help="Dataset: a name or KIND:PATH (see docs/data.md); "
                                           "default: the recipe's."),
        recipe_name: Optional[str] = typer.Option(None, "--recipe", help=_EXP_HELP["recipe"]),
        methods: str = typer.Option(methods, help="Comma-separated heads."),
        count: int = typer.Option(count_default, count_option, help=count_help),
        out: Path = typer.Option(..., "--out", help="JSON file; checkpoints go beside it in OUT.runs/."),
        backbone: Optional[str] = typer.Option(None, help="Backbone (default: the dataset's recipe)."),
        epochs: Optional[int] = typer.Option(None, help=_EXP_HELP["epochs"]),
        train_size: Optional[int] = typer.Option(None, help=_EXP_HELP["train_size"]),
        test_size: Optional[int] = typer.Option(None, help=_EXP_HELP["test_size"]),
        quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    ) -> None:
        from . import experiment

        data, recipe = _recipe(data, recipe_name, backbone, epochs, train_size, test_size)
        log = lambda text: console.print(text, markup=False, highlight=False)  # noqa: E731
        result = getattr(experiment, f"{kind}_experiment")(data, _names(methods), count, out, recipe, progress=not quiet, log=log)
        rows = {m: {k: v[k] for k in columns} for m, v in result["methods"].items()}
        console.print(_table(f"{data}: {what} over {count} {count_option[2:]}", rows, first="method"))
        console.print(f"wall time {result['wall_seconds']:.0f} s in all; wrote {out}")

    command.__doc__ = doc
    experiment_app.command(kind)(command)


_experiment_command("accuracy", "plain,lfi,lfi-light,se,abn", ("--seeds", 3, "Seeds 0..N-1 per method."), ("mean", "std"),
                    "test accuracy", "Test accuracy of every method over several seeds, same backbone and recipe; resumable.")  # fmt: skip
_experiment_command("stability", "lfi,lfi-light,se,abn", ("--settings", 5, "Hyper-parameter settings (2-5; listed in docs/RESULTS.md)."),
                    ("iou", "dice"), "map stability",
                    "Map stability (mean pairwise IoU / Dice) of every method across settings; resumable.")  # fmt: skip


@experiment_app.command("grid")
def experiment_grid(
    evaluation: Path = typer.Option(..., "--evaluation", help="evaluation.json of `selfcam evaluate --metrics "
                                    "grid-pointing-game` (or its folder)."),
    out: Path = typer.Option(Path("results/grid-pointing-game.json"), "--out", help="Results JSON to write."),
) -> None:
    """The grid pointing game of an evaluation as results/grid-pointing-game.json (for `experiment results`)."""
    from .experiment import command_line, write_grid_results

    path = evaluation / "evaluation.json" if evaluation.is_dir() else evaluation
    if not path.is_file():
        raise ConfigError(f"--evaluation: {path} not found (the evaluation.json that `selfcam evaluate --out` writes)")
    doc = write_grid_results(path, out, command_line())
    rows = {name: {"score": m["score"]} for name, m in doc["methods"].items()}
    console.print(_table(f"{doc['dataset']}: grid pointing game, {doc['grid']}", rows, first="run/method"))
    console.print(f"wrote {out}")


@experiment_app.command("shortcut")
def experiment_shortcut(
    runs: list[str] = typer.Option(..., "--run", help="NAME=RUN_DIR of a run trained on shortcut-digits (repeat it)."),
    methods: str = typer.Option("self,self-class,cam,gradcam,gradcam++", help="Comma-separated map methods."),
    out: Path = typer.Option(Path("results/shortcut.json"), "--out", help="Results JSON to write."),
    n: int = typer.Option(1000, "--n", help="Test images per set (correlated, decorrelated)."),
    seed: int = typer.Option(0, "--seed", help="Data seed of the two test sets."),
    batch_size: int = typer.Option(50, "--batch-size", help="Images per batch."),
    tolerance: Optional[int] = typer.Option(None, "--tolerance", help="Pixels a map's maximum may lie off the "
                                            "mark or the digit (default: one feature cell of the first run)."),
    merge: bool = typer.Option(False, "--merge", help="Add these runs to the document already in --out (same --n, "
                               "--seed, --tolerance) instead of replacing it."),
) -> None:
    """The shortcut benchmark on trained runs: accuracy with the mark correlated / decorrelated, map energy on the mark."""
    from .errors import require_int
    from .experiment import command_line, shortcut_experiment

    require_int("--n", n, 1)
    require_int("--batch-size", batch_size, 1)
    if tolerance is not None:
        require_int("--tolerance", tolerance, 0)
    named = {}
    for item in runs:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--run takes NAME=RUN_DIR, got {item!r}")
        if name in named:
            raise ConfigError(f"--run: the name {name!r} is given twice")
        named[name] = Path(path)
    doc = shortcut_experiment(named, _names(methods), out, n=n, seed=seed, batch_size=batch_size, tolerance=tolerance,
                              command=command_line(), merge=merge)  # fmt: skip
    keys = ("acc_correlated", "acc_decorrelated", "mark_energy")
    console.print(_table("shortcut-digits: shortcut benchmark", {k: {c: m[c] for c in keys} for k, m in doc["methods"].items()},
                         first="run/method"))  # fmt: skip
    console.print(f"wall time {doc['wall_seconds']:.0f} s; wrote {out}")


@experiment_app.command("results")
def experiment_results(
    results: Path = typer.Option(Path("results"), "--results", help="Folder of experiment JSON files."),
    out: Path = typer.Option(Path("docs/RESULTS.md"), "--out", help="Markdown file to write (plots beside it)."),
) -> None:
    """Regenerate docs/RESULTS.md (tables, commands, wall times, plots) from results/*.json."""
    from .experiment import write_results_markdown

    write_results_markdown(results, out)
    console.print(f"wrote {out}")


@app.command()
def distill(
    teacher: str = typer.Option(..., "--teacher", help="The model to explain: a run directory, or torchvision:NAME / "
                                "timm:NAME with its trained weights (--pretrained)."),
    method: str = typer.Option(..., "--method", help="The head to train on the teacher's frozen backbone: se, lfi, lfi-light, abn (or plain)."),
    out: Path = typer.Option(..., "--out", help="Run directory to write (config.json, model.safetensors, history.json, distill.json)."),
    data: Optional[str] = typer.Option(None, "--data", help="Images to distill on; their labels are not used. Default: the "
                                       "teacher run's own data. " + _DATA_HELP),
    epochs: int = typer.Option(3, help="Epochs."),
    temperature: float = typer.Option(2.0, "--temperature", help="T of the loss T^2 * KL(softmax(teacher/T) || softmax(student/T))."),
    batch_size: int = typer.Option(64, help="Batch size."),
    lr: float = typer.Option(3e-3, help="Peak learning rate (one-cycle)."),
    weight_decay: float = typer.Option(5e-4, help="Weight decay."),
    head_kwargs: str = typer.Option("{}", help='Head options as JSON, e.g. \'{"reduction": 4}\'.'),
    seed: int = typer.Option(0, help="Seed of the head's initial weights and of the data order."),
    train_size: Optional[int] = typer.Option(None, help="Training images (dataset default if unset)."),
    val_size: Optional[int] = typer.Option(None, help="Validation images (dataset default if unset)."),
    test_size: Optional[int] = typer.Option(None, help="Held-out images for the reported agreement (dataset default if unset)."),
    image_size: Optional[int] = typer.Option(None, help="Image side in pixels (default: the teacher run's, else the dataset's)."),
    pretrained: Optional[str] = typer.Option(None, "--pretrained", help="The trained weights of a teacher given by name."),
    model_kwargs: str = typer.Option("{}", help='Options of a teacher given by name, as JSON, e.g. \'{"num_classes": 10}\'.'),
    model_factory: Optional[str] = typer.Option(None, "--model-factory", help="module:function returning the bare model "
                                                "of a teacher run of your own class (typed here only, never read from a file)."),
    accelerator: str = typer.Option("auto", help="cpu, gpu or auto."),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run in --out from its last saved "
                                "state: give the same options again (the teacher is checked by its weights' hash)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Explain a model without changing it: train a self-explaining head on the teacher's frozen backbone
    to reproduce the teacher's outputs (no labels); print the top-1 agreement on held-out images."""
    from .checkpoint import check_own_output
    from .data import load_dataset
    from .distill import DISTILL_JSON, distill as run_distill, load_teacher, model_name
    from .errors import check_accelerator, require_int
    from .tasks import get_task
    from .train import TrainConfig

    if not resume:
        check_own_output(out)
    check_accelerator(accelerator)
    if image_size is not None:
        from .safeio import MAX_IMAGE_SIZE

        require_int("--image-size", image_size, 1, MAX_IMAGE_SIZE)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ConfigError(f"--temperature must be a finite number > 0, got {temperature}")
    head_kw, model_kw = _json_object(head_kwargs, "--head-kwargs"), _json_object(model_kwargs, "--model-kwargs")
    factory = _user_factory(model_factory)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed, accelerator=accelerator)
    doc: dict[str, Any] | None = None
    named, given, source = model_name(teacher), teacher, None
    if named is None:  # a run: loaded once, here
        given, source, doc = load_teacher(teacher, model=factory, pretrained=pretrained, model_kwargs=model_kw or None)
    sizes = {"train": train_size, "val": val_size, "test": test_size}
    recorded = (doc.get("data") or {}).get("name") if doc is not None else None
    if doc is not None and image_size is None:  # the teacher run's data (or --data) at the run's input size
        sets = [get_task(doc["task"]).run_data(doc, split, n, spec=data)[1] for split, n in sizes.items()]
    elif data is None and recorded is None:
        raise ConfigError("--data: the teacher records no data; name the images to distill on")
    else:
        sets = [load_dataset(data or recorded, split, n, seed=seed, size=image_size) for split, n in sizes.items()]
    result = run_distill(given, method, *sets, cfg, temperature=temperature, run_dir=out, progress=not quiet, head_kwargs=head_kw,
                         source=source, pretrained=pretrained if named else None,
                         model_kwargs=(model_kw or None) if named else None, resume=resume)  # fmt: skip
    m = result.metrics
    console.print(f"{method} distilled from {teacher}: top-1 agreement {m['agreement']:.4f} on {m['n']} held-out images "
                  f"({m['data']}, {m['split']}; {m['agreement_at_start']:.4f} before training); wrote {out} and "
                  f"{out / DISTILL_JSON}", markup=False, highlight=False, soft_wrap=True)  # fmt: skip


def _add_bench() -> None:
    from .bench import bench_app

    app.add_typer(bench_app, name="bench")


_add_bench()


def main() -> None:
    app()
