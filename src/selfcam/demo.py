"""The demos: train a recipe's models on built-in data with ground truth, score them, write a report.

``run_demo(out_dir, demo_recipe("digits"))`` runs any :class:`~selfcam.recipes.Recipe` the same way,
whatever its task: it trains one run per head under ``out_dir/runs/<head>/`` (the shared
:func:`selfcam.train.fit`), scores every run's own map and the recipe's post-hoc methods on the test
split (:func:`selfcam.evaluate.evaluate_task`), writes ``out_dir/metrics.json`` (the evaluation
document family plus ``recipe`` and ``train_seconds``; docs/metrics.md) and ``out_dir/report.html``
(:func:`selfcam.report.build_report` on the demo folder, as ``selfcam report out_dir`` would).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from .checkpoint import write_json
from .data import load_dataset
from .evaluate import EvalConfig, evaluate_task
from .recipes import Recipe
from .tasks import get_task
from .train import TrainConfig, fit, seed_all

__all__ = ["DEMO_FORMAT", "run_demo"]

DEMO_FORMAT = "selfcam-demo"


def run_demo(out_dir: str | Path, recipe: Recipe, progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train, evaluate and report ``recipe``; returns the ``metrics.json`` document."""
    task = get_task(recipe.task)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sizes = {"train": recipe.train_size, "val": recipe.val_size, "test": recipe.test_size}
    data = {split: load_dataset(recipe.data, split, n, seed=recipe.seed, size=recipe.image_size, **recipe.data_options)
            for split, n in sizes.items()}  # fmt: skip
    task.check_dataset(data["train"], f"recipe data {recipe.data}")
    log(f"[{recipe.data}] {' / '.join(str(len(d)) for d in data.values())} train / val / test items "  # type: ignore[arg-type]
        f"in {time.perf_counter() - t0:.1f} s")  # fmt: skip
    supervision = {"map_loss_weight": recipe.map_loss_weight, "mask_fraction": recipe.mask_fraction,
                   "map_loss": recipe.map_loss} if recipe.map_loss_weight > 0 else {}  # fmt: skip
    cfg = TrainConfig(epochs=recipe.epochs, batch_size=recipe.batch_size, lr=recipe.lr, weight_decay=recipe.weight_decay,
                      seed=recipe.seed, **supervision)  # fmt: skip
    models, wall = {}, {}
    for method in recipe.methods:
        log(f"[{method}] training {task.name} model on {recipe.backbone} for {recipe.epochs} epochs")
        t1 = time.perf_counter()
        seed_all(recipe.seed)
        model = task.create(data["train"], method, recipe.backbone, recipe.backbone_kwargs, recipe.head_kwargs.get(method, {}))
        fit(model, data["train"], data["val"], cfg, out / "runs" / method, progress)
        models[method] = model.cpu().eval()
        wall[method] = round(time.perf_counter() - t1, 1)
    log(f"[{recipe.data}] scoring {', '.join(('self', *recipe.posthoc))} on {len(data['test'])} test items")  # type: ignore[arg-type]
    result = evaluate_task(models, data["test"], EvalConfig(methods=("self", *recipe.posthoc)))
    metrics = {"format": DEMO_FORMAT, "title": recipe.title, "dataset": recipe.data, "split": "test", **result,
               "recipe": asdict(recipe), "train_seconds": wall}  # fmt: skip
    write_json(out / "metrics.json", metrics)
    from .report import build_report  # the report draws the demo folder as `selfcam report OUT` does

    build_report([out], out / "report.html", title=f"selfcam demo: {recipe.title}", methods=recipe.posthoc)
    return metrics
