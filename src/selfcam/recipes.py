"""One recipe type for every demo and experiment: the data, the models, the training.

A :class:`Recipe` names a task, its data (a :func:`selfcam.data.load_dataset` spec with split sizes,
image size and the generator's options), the heads to train (one run each, same backbone), their
options, the training settings and the post-hoc methods to score beside the models' own maps.
:data:`DEMOS` holds the built-in demos (``selfcam demo --task NAME``); :mod:`selfcam.experiment`
uses the same type for its recipes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from .errors import ConfigError

__all__ = ["DEMOS", "Recipe", "demo_recipe"]


@dataclass(frozen=True)
class Recipe:
    """What a demo or an experiment trains and on which data (stored in its JSON as ``"recipe"``).

    ``methods``: the heads, one run each (tasks with one head: that head); ``head_kwargs``: options per
    head (for ``asd``, the model's options, :class:`selfcam.asd.ASDConfig`); ``data_options`` go to the
    generator (``frames=8`` for clips); ``posthoc``: post-hoc methods scored on the runs they apply to.
    ``train_size`` ... ``image_size`` of ``None``: the dataset's defaults. ``augment``: the data format's
    random training augmentation (crop, flip; docs/data.md) on the training split of the experiments.
    ``map_loss_weight``, ``mask_fraction``, ``map_loss``: the demo's explanation supervision, the
    :class:`selfcam.train.TrainConfig` fields of the same names (``map_loss_weight=0``: none).
    """

    task: str = "image"
    data: str = "cluttered-digits"
    methods: tuple[str, ...] = ("plain",)
    backbone: str = "resnet8"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    head_kwargs: dict[str, dict[str, Any]] = field(default_factory=lambda: {"se": {"reduction": 4}})
    epochs: int = 3
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 5e-4
    train_size: int | None = None
    val_size: int | None = None
    test_size: int | None = None
    image_size: int | None = None
    augment: bool = False
    map_loss_weight: float = 0.0
    mask_fraction: float = 1.0
    map_loss: str = "outside"
    seed: int = 0
    data_options: dict[str, Any] = field(default_factory=dict)
    posthoc: tuple[str, ...] = ()
    title: str = ""

    def training(self) -> dict[str, Any]:
        """The backbone and training fields (what :mod:`selfcam.experiment` records and compares to resume);
        ``augment`` only when set, so documents written before it existed still resume."""
        keep = ("backbone", "backbone_kwargs", "head_kwargs", "epochs", "batch_size", "lr", "weight_decay",
                "train_size", "val_size", "test_size", "image_size", "augment")  # fmt: skip
        return {k: v for k, v in asdict(self).items() if k in keep and (k != "augment" or v)}

    def with_overrides(self, **overrides: Any) -> "Recipe":
        """This recipe with the given fields replaced (``None`` values are ignored)."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"unknown recipe field(s) {', '.join(unknown)}; a recipe has {', '.join(sorted(known))}")
        given = {k: tuple(v) if k in ("methods", "posthoc") else v for k, v in overrides.items() if v is not None}
        return replace(self, **given)


_DIGITS = Recipe(
    task="image", data="cluttered-digits", methods=("plain", "lfi", "lfi-light", "se", "abn"),
    # SE reduction for the demo's 64-channel map: 16 would leave a 4-unit bottleneck, and its maps
    # varied with the seed (pointing game 0.80-0.94 over seeds 0-2; 0.91-0.94 at 4)
    backbone_kwargs={"stem_stride": 2}, head_kwargs={"se": {"reduction": 4}},
    epochs=5, train_size=6000, val_size=500, test_size=1000, image_size=64, posthoc=("gradcam",),
    title="cluttered digits: every head, and Grad-CAM on the plain model",
)  # fmt: skip
_FACES = Recipe(
    task="attributes", data="synthetic-faces", methods=("se-multilabel",),
    # 64 px faces -> a 16x16 feature map (earrings are a few pixels wide)
    backbone_kwargs={"stem_stride": 1, "output_stride": 4}, head_kwargs={"se-multilabel": {"reduction": 4}},
    epochs=6, train_size=6000, val_size=500, test_size=1000, image_size=64,
    # the map loss on the ground-truth boxes of 10 % of the training faces (docs/faces.md): strict
    # pointing game 0.96-0.97 over seeds 0-2 against 0.56-0.62 unsupervised; --map-loss-weight 0 turns it off
    map_loss_weight=0.3, mask_fraction=0.1,
    title="synthetic faces: one SE-CAM map per attribute",
)  # fmt: skip
_VIDEO = Recipe(
    task="video", data="synthetic-clips", methods=("se",), backbone_kwargs={"stem_stride": 2},
    head_kwargs={"se": {"reduction": 4}}, epochs=6, batch_size=32, train_size=2000, val_size=300, test_size=500,
    image_size=64, data_options={"frames": 8}, posthoc=("gradcam", "gradcam++"),
    title="synthetic clips: a moving digit, one SE-CAM map per frame, Grad-CAM on the same model",
)  # fmt: skip
_ASD = Recipe(
    task="asd", data="speaker-clips", methods=("se",), backbone_kwargs={"stem_stride": 2, "output_stride": 8},
    # measured choices (docs/asd.md): max pooling of the gated face map kept the frame maps on the
    # mouth (pointing game 0.78-0.85 over seeds 0-2); the gate L1 and audio dropout did not make the
    # paper's importance (mean SE weight, importance="se_mean") fall reliably under silence and cost pointing
    # game, so they are off; the default removal importance falls under silence and blank faces (docs/asd.md)
    head_kwargs={"se": {"visual_reduction": 4, "fusion_reduction": 8, "fusion_bias": True, "face_pool": "max",
                        "gate_l1": 0.0, "audio_dropout": 0.0}},
    epochs=6, batch_size=32, train_size=2000, val_size=300, test_size=500, image_size=64, data_options={"frames": 8},
    # the map loss on the mouth boxes of 10 % of the training clips' speaking frames (docs/asd.md): mouth
    # pointing game 1.000 on seeds 0-2 against 0.73-0.93 unsupervised; --map-loss-weight 0 turns it off
    map_loss_weight=0.3, mask_fraction=0.1,
    title="active speaker detection: per-frame maps and modality importance",
)  # fmt: skip

DEMOS: dict[str, Recipe] = {"digits": _DIGITS, "faces": _FACES, "video": _VIDEO, "asd": _ASD}


def demo_recipe(name: str, **overrides: Any) -> Recipe:
    """The built-in demo ``name`` (:data:`DEMOS`) with ``overrides`` (``None`` values ignored)."""
    if name not in DEMOS:
        raise ConfigError(f"unknown demo {name!r}; choose from {', '.join(DEMOS)}")
    return DEMOS[name].with_overrides(**overrides)
