"""selfcam.wrap: torchvision, timm and user models with every image head; checkpoints and ONNX of wrapped runs."""

from __future__ import annotations

import copy
import functools
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import selfcam
from selfcam.checkpoint import load_checkpoint, save_checkpoint
from selfcam.errors import CheckpointError, ConfigError
from selfcam.heads import HEADS

IMAGE_HEADS = [name for name, head in HEADS.items() if head.task == "image"]
SIZE = 64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():  # tiny inputs: a 2nd thread gains little, and on a busy 2-core machine costs up to 10x
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TupleNet(nn.Module):
    """A user's classifier that returns ``(logits, embedding)`` and that FX cannot trace (shape-dependent branch)."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.stage1 = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(16, 24, 3, 2, 1), nn.BatchNorm2d(24), nn.ReLU())
        self.head = nn.Linear(24, classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[-1] % 2:  # untraceable by torch.fx: the hooks route cuts it
            x = F.pad(x, (0, 1, 0, 1))
        f = self.stage2(self.stage1(self.stem(x)))
        emb = f.mean(dim=(2, 3))
        return self.head(emb), emb


class DictNet(nn.Module):
    """A traceable user classifier returning a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 12, 3, 2, 1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.fc(self.pool(self.body(x)).flatten(1)), "aux": torch.zeros(1)}


class PooledMLP(nn.Module):
    """No spatial map survives to the classifier: the 4-D output is 1x1 at once."""

    def __init__(self) -> None:
        super().__init__()
        self.squash = nn.Conv2d(3, 16, SIZE)  # (N, 16, 1, 1)
        self.fc1 = nn.Linear(16, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(self.squash(x).flatten(1))))


class TokenNet(nn.Module):
    """A user token model: patch embedding, one class token, a transformer layer, class-token head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 32, 16, 16)
        self.cls = nn.Parameter(torch.zeros(1, 1, 32))
        self.blocks = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(32)
        self.fc = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(len(t), -1, -1), t], dim=1)
        return self.fc(self.norm(self.blocks(t))[:, 0])


@functools.cache
def _bare(name: str) -> nn.Module:
    """One random-weight model per name for the whole file (wrap copies it)."""
    torch.manual_seed(0)
    if name == "tuple":
        return TupleNet().eval()
    if name.startswith("timm:"):
        timm = pytest.importorskip("timm")
        kwargs = {"img_size": SIZE} if "vit" in name else {}
        return timm.create_model(name[5:], pretrained=False, **kwargs).eval()
    import torchvision.models as tvm

    return tvm.get_model(name, weights=None).eval()


MODELS = ["tuple", "resnet18", "vgg11", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny", "timm:resnet10t",
          "timm:test_vit"]  # fmt: skip
CNNS = [m for m in MODELS if "vit" not in m]


def _wrap(name: str, method: str, **kwargs: object) -> selfcam.SelfExplainer:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # VGG / MobileNetV3 / ViT under plain: tested below
        return selfcam.wrap(_bare(name), method, input_size=SIZE, **kwargs)


@pytest.mark.parametrize("name", MODELS)
def test_every_image_head_on_every_model_shapes_and_gradients(name: str) -> None:
    x = torch.randn(2, 3, SIZE, SIZE)
    classes = 5 if name == "tuple" else 1000
    for method in IMAGE_HEADS:
        model = _wrap(name, method, num_classes=None if method != "abn" else 7)
        assert isinstance(model, selfcam.SelfExplainer) and model.config.backbone.startswith("wrap:user:")
        model.train()
        out = model(x)
        n = 7 if method == "abn" else classes
        assert out.logits.shape == (2, n), (name, method)
        h, w = out.heatmap.shape[-2:]
        assert out.heatmap.shape == (2, h, w) and h * w > 1
        assert float(out.heatmap.detach().min()) >= 0 and float(out.heatmap.detach().max()) <= 1
        model.loss(out, torch.randint(0, n, (2,))).backward()
        grads = [p.grad for p in model.backbone.parameters() if p.requires_grad]
        assert grads and any(g is not None and float(g.abs().sum()) > 0 for g in grads), (name, method)
        assert all(not p.requires_grad or p.grad is not None for p in model.backbone.trunk.parameters()), \
            (name, method, "parameters left in the trunk that never run")  # fmt: skip
        if method == "abn" and model.wrap_info.route != "timm":  # ABN copies the stage wrap found
            assert model.backbone.splittable and model.head.uses_pre_features
        assert model.explain(x[:1]).heatmap.shape == (1, SIZE, SIZE)
    assert model.wrap_info.route == {"tuple": "hooks", "timm:resnet10t": "timm", "timm:test_vit": "timm"}.get(name, "fx")


@pytest.mark.parametrize(
    ("name", "route", "features", "stage", "classifier", "post", "kept"),
    [
        ("resnet18", "fx", "layer4", "layer4", "fc", None, True),
        ("efficientnet_b0", "fx", "features", "features.8", "classifier.1", None, True),
        ("mobilenet_v2", "fx", "features", "features.18", "classifier.1", None, True),
        ("densenet121", "fx", "features", "features.norm5", "classifier", "relu", True),  # DenseNet's F.relu
        ("convnext_tiny", "fx", "features", "features.7", "classifier.2", "norm:classifier.0", True),
        ("mobilenet_v3_small", "fx", "features", "features.12", "classifier.3", None, False),  # MLP classifier
        ("vgg11", "fx", "features", "features.20", "classifier.6", None, False),  # 7x7 grid + MLP
        ("tuple", "hooks", "stage2", "stage2", "head", None, True),
        ("timm:resnet10t", "timm", None, None, "fc", None, True),
        ("timm:test_convnext", "timm", None, None, "head.fc", "norm:head.norm", True),
        ("timm:test_vit", "timm", None, None, "head", None, False),  # class-token classifier
    ],
)
def test_plain_keeps_the_predictions_where_the_classifier_is_gap_linear(
    name: str, route: str, features: str | None, stage: str | None, classifier: str, post: str | None, kept: bool
) -> None:
    bare = _bare(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = selfcam.wrap(bare, "plain", input_size=SIZE).eval()
    info = model.wrap_info
    assert (info.route, info.features, info.stage, info.classifier, info.post) == (route, features, stage, classifier, post)
    assert info.preserved is kept and info.classifier_copied is (name not in ("mobilenet_v3_small", "vgg11"))
    warned = [str(w.message) for w in caught if issubclass(w.category, UserWarning) and "wrap:" in str(w.message)]
    assert bool(warned) is not kept, warned
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        original = bare(x)
        original = original[0] if isinstance(original, tuple) else original
        got = model(x).logits
    if kept:
        torch.testing.assert_close(got, original, rtol=1e-4, atol=1e-4)
        assert torch.equal(got.argmax(1), original.argmax(1))
    for p_orig, p_now in zip(bare.parameters(), _bare(name).parameters()):  # the user's model is left untouched
        assert p_orig is p_now


def test_vgg_and_mobilenet_v3_warn_that_their_mlp_classifier_cannot_be_kept() -> None:
    with pytest.warns(UserWarning, match="classifier.6 takes 4096 features, the map has 512 channels"):
        selfcam.wrap(_bare("vgg11"), "plain", input_size=SIZE)
    with pytest.warns(UserWarning, match="class token"):
        selfcam.wrap(_bare("timm:test_vit"), "plain", input_size=SIZE)


def test_names_instead_of_the_rules_and_dict_outputs() -> None:
    bare = DictNet().eval()
    model = selfcam.wrap(bare, "se", input_size=SIZE, reduction=4)
    assert (model.wrap_info.features, model.wrap_info.classifier, model.wrap_info.route) == ("body", "fc", "fx")
    named = selfcam.wrap(_bare("resnet18"), "plain", features="layer3", classifier="fc", num_classes=4, input_size=SIZE)
    assert named.backbone.out_channels == 256 and named.config.num_classes == 4
    assert not named.wrap_info.classifier_copied  # 256 -> 4 cannot start from fc (512 -> 1000)
    assert named(torch.randn(1, 3, SIZE, SIZE)).heatmap.shape == (1, 4, 4)
    with pytest.raises(ConfigError, match="features='layer9': no such module; modules seen before the classifier: .*layer4"):
        selfcam.wrap(_bare("resnet18"), "plain", features="layer9", input_size=SIZE)
    with pytest.raises(ConfigError, match="classifier='layer4' must be an nn.Linear"):
        selfcam.wrap(_bare("resnet18"), "plain", classifier="layer4", input_size=SIZE)


def test_user_token_model_through_an_explicit_token_grid() -> None:
    bare = TokenNet().eval()
    with pytest.raises(ConfigError, match=r"last spatial map is embed \(2, 32, 4, 4\), but token outputs follow it: .*blocks \(2, 17, 32\).*tokens=P"):
        selfcam.wrap(bare, "plain", input_size=SIZE)
    with pytest.warns(UserWarning, match="does not keep"):
        model = selfcam.wrap(bare, "se", input_size=SIZE, tokens={"prefix": 1, "grid": [4, 4]}, reduction=4)
        selfcam.wrap(bare, "plain", input_size=SIZE, tokens=1)
    assert model.wrap_info.features == "norm" and model.backbone.out_channels == 32
    assert model(torch.randn(2, 3, SIZE, SIZE)).heatmap.shape == (2, 4, 4)


def test_no_spatial_feature_map_and_no_hint_names_the_candidate_layers() -> None:
    with pytest.raises(ConfigError, match=r"no spatial feature map .* candidate layers squash \(2, 16, 1, 1\)"):
        selfcam.wrap(PooledMLP(), "plain", input_size=SIZE)


def test_wrapping_by_name_records_the_builder(tmp_path: Path) -> None:
    model = selfcam.wrap("timm:test_vit", "lfi-light", model_kwargs={"img_size": SIZE, "num_classes": 6})
    assert model.config.backbone == "wrap:timm:test_vit" and model.config.num_classes == 6
    assert model.config.backbone_kwargs["model_kwargs"] == {"img_size": SIZE, "num_classes": 6}
    assert model.config.backbone_kwargs["tokens"] == {"prefix": 1, "grid": None}  # dynamic_img_size: a square grid
    _round_trip(model, tmp_path / "vit")
    rebuilt = selfcam.create_model("plain", "wrap:torchvision:resnet18", 10, 3, {"input_size": [SIZE, SIZE]})
    assert rebuilt.wrap_info.features == "layer4" and rebuilt.config.num_classes == 10


def _round_trip(wrapped: selfcam.SelfExplainer, run: Path, **load: object) -> selfcam.SelfExplainer:
    wrapped.train()
    wrapped(torch.randn(4, 3, SIZE, SIZE))  # BN statistics that must come back
    wrapped.eval()
    save_checkpoint(wrapped, run)
    loaded, doc = load_checkpoint(run, **load)
    assert doc["model"] == wrapped.config
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        a, b = wrapped(x), loaded(x)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.heatmap, b.heatmap)
    return loaded


@pytest.mark.parametrize("i", range(len(MODELS)))
def test_checkpoint_round_trip_of_wrapped_models(i: int, tmp_path: Path) -> None:
    name, method = MODELS[i], IMAGE_HEADS[i % len(IMAGE_HEADS)]
    model = _wrap(name, method)
    if name == "tuple":
        with pytest.raises(CheckpointError, match="wraps your own model class 'TupleNet'.*load_checkpoint\\(path, model=\\.\\.\\.\\)"):
            save_checkpoint(model, tmp_path / "run")
            load_checkpoint(tmp_path / "run")
        _round_trip(model, tmp_path / "run", model=TupleNet)  # a constructor
        _round_trip(model, tmp_path / "run2", model=TupleNet(classes=5))  # or the module itself
    else:
        _round_trip(model, tmp_path / "run", model=lambda: copy.deepcopy(_bare(name)))


def test_model_argument_only_for_wrapped_runs(tmp_path: Path) -> None:
    save_checkpoint(selfcam.create_model("plain", "resnet8", 3), tmp_path / "run")
    with pytest.raises(CheckpointError, match=r"model= \(--model-factory\) is for runs of selfcam.wrap"):
        load_checkpoint(tmp_path / "run", model=TupleNet)
    save_checkpoint(_wrap("tuple", "plain"), tmp_path / "user")
    with pytest.raises(CheckpointError, match="model= must return an nn.Module"):
        load_checkpoint(tmp_path / "user", model=lambda: "TupleNet")
    with pytest.raises(CheckpointError, match="classifier='head': no such module"):  # another class
        load_checkpoint(tmp_path / "user", model=DictNet)


@pytest.mark.parametrize("i", range(len(CNNS)))
def test_onnx_export_of_wrapped_cnns(i: int, tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from selfcam.export import export_onnx, onnx_parity

    name, method = CNNS[i], IMAGE_HEADS[(i + 2) % len(IMAGE_HEADS)]
    model = _wrap(name, method).eval()
    path = export_onnx(model, tmp_path / "m.onnx", SIZE)
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    diffs = onnx_parity(model, path, x)
    assert max(diffs.values()) <= 1e-4 * max(1.0, float(np.abs(model(x).logits.detach().numpy()).max())), (name, method, diffs)


def _compiles(backend: str) -> str | None:
    """Why ``torch.compile`` with ``backend`` cannot run here, or None."""
    if not hasattr(torch, "compile"):
        return "torch.compile is not in this torch"
    if backend == "inductor":
        import shutil

        if not any(shutil.which(c) for c in ("cc", "gcc", "clang")):
            return "inductor needs a C compiler on the CPU"
        import os

        if not os.environ.get("SELFCAM_TEST_INDUCTOR"):  # a minute of C++ compilation on 2 cores: asked for only
            return "set SELFCAM_TEST_INDUCTOR=1 to compile with inductor (slow)"
    return None


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_of_wrapped_models(backend: str) -> None:
    """A wrapped model compiles (dynamo graph capture, AOT autograd; inductor's C++ on request) and gives the eager
    logits and maps, forward and backward: the hooks route (TupleNet, cut by an exception) and the FX route (DictNet)."""
    why = _compiles(backend)
    if why:
        pytest.skip(why)
    x = torch.randn(2, 3, 32, 32)
    for name in ("tuple", "dict") if backend == "aot_eager" else ("dict",):
        torch.manual_seed(0)
        model = selfcam.wrap(_bare(name) if name == "tuple" else DictNet(), "se", input_size=32, reduction=4).eval()
        want = model(x)
        torch._dynamo.reset()
        try:
            compiled = torch.compile(model, backend=backend)
            got = compiled(x)
        except Exception as e:  # noqa: BLE001 - an unusable compiler is a skip, a wrong answer a failure
            if "Compile" in type(e).__name__ or "compiler" in str(e).lower():
                pytest.skip(f"torch.compile unavailable: {type(e).__name__}: {str(e)[:200]}")
            raise
        torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got.heatmap, want.heatmap, rtol=1e-4, atol=1e-5)
        model.train()
        out = compiled(x)
        model.loss(out, torch.tensor([0, 1])).backward()
        assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in model.backbone.parameters()), name


def test_bench_latency_times_the_original_of_a_wrapped_model() -> None:
    """bench latency on wrap:NAME: the heads on the wrapped classifier, and the unwrapped classifier's own forward
    as the reference of the goals ("se <= 1.1x the original")."""
    from selfcam.bench import latency, latency_table

    doc = latency("wrap:timm:resnet10t", size=32, repeats=1, warmup=0, methods="se", threads=1)
    assert list(doc["ms"]) == ["original", "plain", "se"]
    assert doc["ratio_to_original"]["original"] == 1.0 and doc["params"]["original"] == doc["params"]["plain"]
    assert set(doc["goals"]) == {"se <= 1.1x the original"}
    assert "x original" in [c.header for c in latency_table(doc).columns]
