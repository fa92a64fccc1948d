from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from selfcam.render import Gallery, overlay, png_data_uri, write_report

PREFIX = "data:image/png;base64,"


class _Imgs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[dict[str, str | None]] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.imgs.append(dict(attrs))


def _imgs(html: str) -> list[dict[str, str | None]]:
    p = _Imgs()
    p.feed(html)
    p.close()
    return p.imgs


def _decode(src: str) -> np.ndarray:
    assert src.startswith(PREFIX)
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src[len(PREFIX):]))).convert("RGB"))


def _gallery(g: int = 16, methods=("cam", "gradcam", "lfi"), size: int = 8) -> Gallery:
    gen = torch.Generator().manual_seed(0)
    return Gallery(
        images=torch.rand(g, 3, size, size, generator=gen),
        labels=torch.arange(g) % 4,
        maps={m: torch.rand(g, size, size, generator=gen) for m in methods},
        predictions={m: (torch.arange(g) + k) % 4 for k, m in enumerate(methods)},
        boxes=torch.tensor([[1, 1, 6, 7]] * g),
        class_names=["cat", "dog", "bird", "fish"],
    )


METRICS = {"dataset": "toy", "models": {
    "lfi": {"accuracy": 0.91234, "pointing_game": 0.5, "iou": 0.25, "map_ms_per_image": 1.5, "params": 1234567},
    "abn": {"accuracy": 0.8, "params": 42},
}}
HISTORY = {m: [{"epoch": e, "train_loss": 1.0 / (e + 1), "train_acc": 0.5, "val_acc": 0.1 * e} for e in range(3)]
           for m in ("lfi", "abn")}


def test_overlay_zero_heatmap_matches_hand_computation():
    assert matplotlib.colormaps["jet"](0)[:3] == (0.0, 0.0, 0.5)  # jet at 0 is half-intensity blue
    out = overlay(np.full((4, 5), 0.4), np.zeros((4, 5)))
    assert out.dtype == np.uint8 and out.shape == (4, 5, 3)
    # cam = 0.5*(0,0,0.5) + 0.5*0.4 = (0.2,0.2,0.45); /max -> (0.444,0.444,1) -> floor(255*x)
    assert (out == np.array([113, 113, 255], np.uint8)).all()


def test_overlay_layouts_and_resize():
    img = torch.rand(3, 6, 6)
    heat = torch.rand(3, 3)
    a = overlay(img, heat, alpha=0.3)
    b = overlay(img.permute(1, 2, 0).numpy(), heat.numpy(), alpha=0.3)
    assert a.shape == (6, 6, 3) and np.array_equal(a, b)
    assert overlay(torch.rand(1, 6, 6), torch.rand(6, 6)).shape == (6, 6, 3)
    with pytest.raises(ValueError):
        overlay(torch.rand(6, 6) * 255, torch.rand(6, 6))


def test_png_data_uri_round_trip():
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    assert np.array_equal(_decode(png_data_uri(rgb)), rgb)


@pytest.mark.parametrize("history", [None, HISTORY])
def test_write_report_self_contained(tmp_path, history):
    out = write_report(tmp_path / "sub" / "report.html", title="Toy <run>", metrics=METRICS, gallery=_gallery(),
                       config={"lr": 0.0003, "model": {"name": "lfi"}}, history=history)
    assert out.exists() and [p.name for p in out.parent.iterdir()] == ["report.html"]
    html = out.read_text(encoding="utf-8")
    assert "http://" not in html and "https://" not in html
    imgs = _imgs(html)
    assert len(imgs) == 16 * (1 + 3) + (history is not None)
    assert sum("curves" in (i.get("class") or "") for i in imgs) == (history is not None)
    for img in imgs:
        assert img.get("alt")
        assert _decode(img["src"]).size > 0
    for text in ("0.912", "0.500", "1,234,567", "42", "–", "toy", "0.0003", "model.name",
                 "pred: dog (true: cat)", "Toy &lt;run&gt;"):
        assert text in html
    assert "Toy <run>" not in html


def test_gallery_tile_draws_clipped_green_box(tmp_path):
    g = _gallery(g=1, methods=("cam",))
    g.images = torch.zeros(1, 1, 8, 8)
    g.boxes = torch.tensor([[2, 3, 20, 6]])  # x1 beyond the image: clipped to column 7
    html = write_report(tmp_path / "r.html", title="t", metrics={}, gallery=g).read_text()
    tile = _decode(_imgs(html)[0]["src"])
    k = tile.shape[0] // 8
    assert tile.shape == (8 * k, 8 * k, 3) and 8 * k >= 128
    green, black = [0, 255, 0], [0, 0, 0]
    assert (tile[3 * k, 2 * k] == green).all() and (tile[5 * k, 7 * k] == green).all()
    assert (tile[4 * k, 4 * k] == black).all() and (tile[0, 0] == black).all()


@pytest.mark.parametrize("break_it", [
    lambda g: setattr(g, "labels", g.labels[:15]),
    lambda g: g.maps.__setitem__("cam", g.maps["cam"][:, :4, :4]),
    lambda g: g.predictions.__setitem__("lfi", g.predictions["lfi"][:3]),
    lambda g: g.predictions.pop("gradcam"),
    lambda g: setattr(g, "boxes", g.boxes[:, :3]),
])
def test_inconsistent_gallery_raises(tmp_path, break_it):
    g = _gallery()
    break_it(g)
    with pytest.raises(ValueError):
        write_report(tmp_path / "r.html", title="t", metrics=METRICS, gallery=g)
    assert not any(tmp_path.iterdir())


# --- write_report: per-class gallery, extra tables and notes ---------------------------------


def test_gallery_is_grouped_by_true_class_in_order(tmp_path):
    g = _gallery(g=5, methods=("cam",))
    g.labels = torch.tensor([2, 0, 2, 1, 0])
    html = write_report(tmp_path / "r.html", title="t", metrics={}, gallery=g,
                        tables=[("Extra table", {"row": {"x": 1.5}})], notes=["a note"]).read_text()
    headings = [line for line in html.splitlines() if line.startswith("<h3>")]
    assert headings == ["<h3>class cat</h3>", "<h3>class dog</h3>", "<h3>class bird</h3>"]
    inputs = [i["alt"] for i in _imgs(html) if i["alt"].startswith("image ")]
    assert inputs == ["image 1, true class cat", "image 4, true class cat", "image 3, true class dog",
                      "image 0, true class bird", "image 2, true class bird"]
    assert "<h2>Extra table</h2>" in html and "1.500" in html and "a note" in html


# --- build_report from run, evaluation and demo directories -----------------------------------


def _run_dir(path, method, seed=0):
    from selfcam.model import create_model
    from selfcam.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    model = create_model(method, "resnet8", 10, 1, {"stem_stride": 2})
    save_checkpoint(model, path, data={"name": "cluttered-digits", "size": 32}, train={"seed": 0, "epochs": 2})
    (path / "history.json").write_text(json.dumps(
        [{"epoch": 0, "train_loss": 2.0, "val_acc": 0.25}, {"epoch": 1, "train_loss": 1.5, "val_acc": 0.5}]))
    return path


def _evaluation_dir(path, with_extras=True):
    doc = {"dataset": "cluttered-digits", "split": "test", "n_images": 8,
           "config": {"stability_threshold": 100 / 255},
           "runs": {"a": {"params": 10, "results": {"self": {"accuracy": 0.75, "deletion_auc": 0.123}}},
                    "b": {"params": 12, "results": {"self": {"accuracy": 0.5, "deletion_auc": 0.2}}}},
           "stability": {"self": {"iou": 0.625, "dice": 0.75}}}
    if with_extras:
        doc["stability"]["self"].update(iou_matrix=[[1, 0.625], [0.625, 1]], dice_matrix=[[1, 0.75], [0.75, 1]])
        doc["curves"] = {r: {"self": {"deletion": [0.9, 0.5, 0.1], "insertion": [0.1, 0.6, 0.9]}} for r in "ab"}
        doc["sanity"] = {"a": {"self": [["fc", 0.5], ["conv", 0.1]]}}
    path.mkdir(parents=True)
    (path / "evaluation.json").write_text(json.dumps(doc))
    return path


@pytest.mark.slow
def test_build_report_from_runs_evaluation_and_demo(tmp_path):
    from selfcam.data import load_dataset
    from selfcam.checkpoint import load_checkpoint
    from selfcam.report import build_report, gallery_from_runs

    a, b = _run_dir(tmp_path / "a", "plain"), _run_dir(tmp_path / "b", "se", seed=1)
    ev = _evaluation_dir(tmp_path / "ev")
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "metrics.json").write_text(json.dumps({"format": "selfcam-demo", "task": "image", "dataset": "cluttered-digits",
                                                   "runs": {"lfi": {"results": {"self": {"accuracy": 0.875}}}},
                                                   "recipe": {"epochs": 5}}))  # fmt: skip
    _run_dir(demo / "runs" / "lfi", "lfi")
    out = build_report([a, b, ev, demo], tmp_path / "report.html", per_class=1, methods=("gradcam",))
    html = out.read_text(encoding="utf-8")
    assert "http://" not in html and "https://" not in html and 'src="data:' in html
    for text in ("ev/a/self", "0.750", "demo/lfi/self", "0.875", "<h2>Runs</h2>", "best_val_acc", "0.625",
                 "ev: deletion and insertion curves", "ev: stability matrix (IOU)", "ev: stability matrix (DICE)",
                 "ev: sanity check", "demo (demo recipe).epochs", "a.model.method", "<h3>class 9</h3>"):
        assert text in html, text
    imgs = _imgs(html)
    columns = ["a (plain)", "a/gradcam", "b (se)", "lfi"]
    assert all(f"<th>{c}</th>" in html for c in columns)
    assert len(imgs) == 10 * (1 + len(columns)) + 1 + 4  # gallery, training curves, 4 figures
    # the gallery shows the first test image of each class and each run's own map of it
    notes = []
    g = gallery_from_runs({"a": a}, per_class=1, notes=notes)
    data = load_dataset("cluttered-digits", "test", 200, seed=0, size=32)
    first = [int((data.labels == c).nonzero()[0]) for c in range(10)]
    assert notes == [] and g.labels.tolist() == list(range(10))
    assert torch.equal(g.images, data.images[first])
    model, _ = load_checkpoint(a)
    with torch.no_grad():
        want = model.explain(data.normalize(data.images[first]))
    assert torch.allclose(g.maps["a (plain)"], want.heatmap, atol=1e-6)
    assert torch.equal(g.predictions["a (plain)"], want.logits.argmax(1))


def test_build_report_without_gallery_and_old_evaluation_format(tmp_path):
    from selfcam.report import build_report

    ev = _evaluation_dir(tmp_path / "ev", with_extras=False)
    run = tmp_path / "run"
    _run_dir(run, "plain")
    (run / "model.safetensors").unlink()  # no weights: no gallery, a note says why
    html = build_report([ev, run], tmp_path / "r.html").read_text()
    assert "stability across runs" in html and "stability matrix" not in html and "deletion and insertion" not in html
    assert "gallery: run run left out" in html and "weights file not found" in html
    assert "<h2>Gallery</h2>" not in html and "<h2>Training curves</h2>" in html


@pytest.mark.parametrize("setup, message", [
    (lambda p: p.write_text("x"), "not a directory"),
    (lambda p: p.mkdir(), "not a run, evaluation or demo directory"),
    (lambda p: (p.mkdir(), (p / "evaluation.json").write_text("{oops")), "evaluation.json: not valid JSON"),
    (lambda p: (p.mkdir(), (p / "metrics.json").write_text("[]")), "was it written by `selfcam demo`"),
    (lambda p: (p.mkdir(), (p / "metrics.json").write_text('{"note": "no metrics"}')), "was it written by `selfcam demo`"),
    (lambda p: (p.mkdir(), (p / "metrics.json").write_text('{"models": {"se": {"accuracy": 1.0}}}')),
     "written by an older selfcam demo"),
])
def test_report_command_errors_name_the_path(tmp_path, setup, message):
    from typer.testing import CliRunner

    from selfcam.cli import app

    src = tmp_path / "src"
    setup(src)
    result = CliRunner().invoke(app, ["report", str(src), "--out", str(tmp_path / "r.html")])
    assert result.exit_code == 2 and message in result.output and str(src) in result.output
    assert "Traceback" not in result.output and not (tmp_path / "r.html").exists()


def test_evaluation_stores_mean_curves_and_stability_matrices():
    from selfcam import metrics as M
    from selfcam.data import load_dataset
    from selfcam.evaluate import EvalConfig, evaluate_runs
    from selfcam.model import create_model

    data = load_dataset("cluttered-digits", "test", 6, size=32)
    torch.manual_seed(0)
    models = {r: create_model("plain", "resnet8", 10, 1, {"stem_stride": 2}).eval() for r in ("a", "b")}
    cfg = EvalConfig(metrics=("deletion_auc", "insertion_auc"), batch_size=4, steps=4)
    result = evaluate_runs(models, data, cfg)
    x = data.normalize(data.images)
    with torch.no_grad():
        out = {r: m.explain(x) for r, m in models.items()}
    for r, m in models.items():
        pred = out[r].logits.argmax(1)
        deletion = M.deletion_curve(m, x, out[r].heatmap, pred, 4, "zero").mean(0)
        insertion = M.insertion_curve(m, x, out[r].heatmap, pred, 4, "blur").mean(0)
        stored = result["curves"][r]["self"]
        assert np.allclose(stored["deletion"], deletion.numpy(), atol=1e-6)
        assert np.allclose(stored["insertion"], insertion.numpy(), atol=1e-6)
        auc = result["runs"][r]["results"]["self"]["deletion_auc"]
        assert auc == pytest.approx(float(torch.trapezoid(deletion, dx=0.25)), abs=1e-6)
        assert "deletion_curve" not in result["runs"][r]["results"]["self"]
    s = M.stability(torch.stack([out["a"].heatmap, out["b"].heatmap]), cfg.stability_threshold)
    assert np.allclose(result["stability"]["self"]["iou_matrix"], s["iou_matrix"].numpy(), atol=1e-6)
    assert result["stability"]["self"]["iou"] == pytest.approx(s["iou"], abs=1e-6)
    json.dumps(result)  # JSON-ready


# --- reports of every task: attribute, ASD and video runs; faces and ASD demo folders ----------
# (build_report regenerates test inputs from what each run recorded: with per_class=P, attribute runs
# show the first 2P test images, video and ASD runs 2P clips picked over the classes among the first 16P)


@pytest.fixture(scope="module")
def faces_run(tmp_path_factory):
    """An attributes run (se-multilabel on synthetic faces, 32 px) trained for one epoch."""
    from selfcam.data.faces import SyntheticFaces
    from selfcam.model import create_model
    from selfcam.train import TrainConfig, fit

    run = tmp_path_factory.mktemp("attributes") / "faces-run"
    torch.manual_seed(0)
    model = create_model("se-multilabel", "resnet8", 5, 3, {"stem_stride": 2})
    fit(model, SyntheticFaces("train", 32, size=32), SyntheticFaces("val", 16, size=32),
        TrainConfig(epochs=1, batch_size=16), run, progress=False)  # fmt: skip
    return run


@pytest.fixture(scope="module")
def asd_run(tmp_path_factory):
    """An ASD run (4-frame, 32 px speaker clips) trained for one epoch."""
    from selfcam.asd import ASDConfig, ASDModel
    from selfcam.data.speakers import SpeakerClips
    from selfcam.train import TrainConfig, fit

    run = tmp_path_factory.mktemp("asd") / "asd-run"
    data = SpeakerClips("train", 16, frames=4, size=32)
    fit(ASDModel(ASDConfig(frames=4, backbone_kwargs={"stem_stride": 2})), data, data,
        TrainConfig(epochs=1, batch_size=8), run, progress=False)  # fmt: skip
    return run


@pytest.fixture(scope="module")
def demo_dirs(tmp_path_factory):
    """(faces demo folder, ASD demo folder), each from a tiny recipe."""
    from selfcam.demo import run_demo
    from selfcam.recipes import demo_recipe

    root = tmp_path_factory.mktemp("demos")
    tiny = dict(epochs=1, train_size=32, val_size=8, test_size=12, batch_size=16, image_size=32)
    run_demo(root / "faces", demo_recipe("faces", backbone_kwargs={"stem_stride": 2}, **tiny), progress=False, log=lambda s: None)
    run_demo(root / "asd", demo_recipe("asd", data_options={"frames": 4}, **{**tiny, "test_size": 16, "batch_size": 8}),
             progress=False, log=lambda s: None)  # fmt: skip
    return root / "faces", root / "asd"


def _figures(html: str) -> dict[str, np.ndarray]:
    """The page's figures (training curves and everything after the gallery), caption -> pixels."""
    return {i["alt"]: _decode(i["src"]) for i in _imgs(html) if "curves" in (i.get("class") or "")}


def _notes(html: str) -> list[str]:
    import re

    return re.findall(r'<p class="note">(.*?)</p>', html)


def _expected_sheet(run, g: int) -> np.ndarray:
    """The per-attribute sheet of the first ``g`` test faces, computed here from the run and the generator."""
    from selfcam.checkpoint import load_checkpoint
    from selfcam.data.faces import SyntheticFaces
    from selfcam.render import attribute_sheet

    model, doc = load_checkpoint(run)
    data = SyntheticFaces("test", g, size=doc["data"]["size"], seed=doc["data"]["seed"])
    with torch.no_grad():
        out = model.explain(data.normalize(data.raw_images()))
    return attribute_sheet(data.raw_images(), out.heatmap, data.attribute_masks(), torch.sigmoid(out.logits),
                           data.labels, data.class_names)  # fmt: skip


def _check_strips(figures: dict[str, np.ndarray], run_name: str, run, clip_data, frames: int, size: int, call) -> list[int]:
    """Every strip of ``run_name`` is the clip it names, over the map computed here; returns the clip indices."""
    import re

    from selfcam.checkpoint import load_checkpoint
    from selfcam.data.speakers import FRAME_MEAN, FRAME_STD
    from selfcam.render import frame_strip

    model, _ = load_checkpoint(run)
    shown = []
    for caption, strip in figures.items():
        if not caption.startswith(f"Gallery, run {run_name}: test clip "):
            continue
        i = int(re.search(r"test clip (\d+)", caption)[1])
        shown.append(i)
        item = clip_data[i]
        with torch.no_grad():
            heat = call(model, item)[0]
        k = strip.shape[0] // (2 * (size + 2))
        assert strip.shape == (2 * (size + 2) * k, frames * (size + 2) * k, 3) and k * size >= 128
        # the clip's frames in [0, 1]: digit clips undo their own normalization, speaker clips (x - 0.5) / 0.25
        raw = clip_data.denormalize(item[0]) if hasattr(clip_data, "denormalize") else item[0] * FRAME_STD + FRAME_MEAN
        want = frame_strip(raw.clamp(0, 1), heat, item[4] if len(item) > 4 else item[2], scale=1)
        # the map here and the report's come from differently batched forwards: a rounding difference may move a pixel
        # to the neighbouring colour-map entry (a few units), never more, and only for a handful of pixels
        diff = np.abs(strip[::k, ::k].astype(int) - want.astype(int))
        assert diff.max() <= 8 and (diff > 1).mean() < 1e-3, (caption, diff.max(), int((diff > 1).sum()))
    return shown


def test_report_of_an_attributes_run_shows_a_per_attribute_sheet(tmp_path, faces_run):
    from selfcam.data.faces import ATTRIBUTES
    from selfcam.report import build_report

    html = build_report([faces_run], tmp_path / "r.html", per_class=2).read_text()
    assert "<h2>Runs</h2>" in html and "<td>attributes</td>" in html and "<td>se-multilabel</td>" in html
    assert "<h2>Training curves</h2>" in html and "faces-run.data.class_names" in html
    assert _notes(html) == [] and "<h2>Gallery</h2>" not in html  # no per-class gallery: not an image run
    figures = _figures(html)
    sheets = {c: v for c, v in figures.items() if c.startswith("Gallery, run faces-run: per-attribute SE-CAM maps of 4 test")}
    assert len(sheets) == 1 and len(figures) == 2  # the sheet and the training curves
    assert np.array_equal(next(iter(sheets.values())), _expected_sheet(faces_run, 4))
    assert all(a in html for a in ATTRIBUTES)


def test_report_of_an_asd_run_shows_per_frame_strips(tmp_path, asd_run):
    from selfcam.data.speakers import SpeakerClips
    from selfcam.report import build_report

    html = build_report([asd_run], tmp_path / "r.html", per_class=2).read_text()
    assert "<td>asd</td>" in html and "<th>frames</th>" in html and "<h2>Training curves</h2>" in html
    assert _notes(html) == []
    figures = _figures(html)
    data = SpeakerClips("test", 32, frames=4, size=32)  # the run's data seed is 0
    shown = _check_strips(figures, "asd-run", asd_run, data, 4, 32, lambda m, it: m.explain(it[0][None], it[1][None]).heatmap)
    assert len(shown) == 4 and sorted(data.labels[shown].tolist()) == [0, 0, 1, 1]  # two clips of each class
    assert sum("audio/face importance" in c and "true: speaking" in c for c in figures) == 2


def test_report_of_faces_and_asd_demo_folders(tmp_path, demo_dirs):
    from typer.testing import CliRunner

    from selfcam.cli import app
    from selfcam.data.speakers import SpeakerClips
    from selfcam.report import build_report, read_sources

    faces, asd = demo_dirs
    assert list(read_sources([faces, asd]).runs) == ["se-multilabel", "se"]
    html = build_report([faces, asd], tmp_path / "r.html", per_class=2).read_text()
    fdoc, adoc = (json.loads((d / "metrics.json").read_text()) for d in demo_dirs)
    frun, arun = fdoc["runs"]["se-multilabel"], adoc["runs"]["se"]
    assert _notes(html) == []
    for text in ("<h2>faces: se-multilabel, per-attribute test metrics", "<td>Wearing_Earrings</td>", "faces/se-multilabel/self",
                 f"<td>{frun['attributes']['Beard']['iou']:.3f}</td>", f"<td>{frun['results']['self']['accuracy']:.3f}</td>",
                 "asd/se/self", "asd/se/self, audio replaced by silence", f"<td>{arun['results']['self']['mAP']:.3f}</td>",
                 "<h2>asd: se, modality importance", "<td>not_speaking, silent audio</td>",
                 f"<td>{arun['modality_importance']['speaking']['audio']:.3f}</td>", "<h2>asd: se, silence check",
                 "faces (demo recipe).train_size", "asd (demo recipe).data_options.frames", "<td>se-multilabel</td>", "<td>se</td>",
                 "dataset: synthetic-faces, speaker-clips"):  # fmt: skip
        assert text in html, text
    figures = _figures(html)
    assert np.array_equal(figures[next(c for c in figures if c.startswith("Gallery, run se-multilabel: per-attribute"))],
                          _expected_sheet(faces / "runs" / "se-multilabel", 4))  # fmt: skip
    shown = _check_strips(figures, "se", asd / "runs" / "se", SpeakerClips("test", 32, frames=4, size=32), 4, 32,
                          lambda m, it: m.explain(it[0][None], it[1][None]).heatmap)  # fmt: skip
    assert len(shown) == 4 and any(c.startswith("asd: se, modality importance") for c in figures)
    result = CliRunner().invoke(app, ["report", str(faces), str(asd), "--out", str(tmp_path / "cli.html"), "--per-class", "1"])
    assert result.exit_code == 0, result.output
    cli = (tmp_path / "cli.html").read_text()
    assert "of 2 test images of synthetic-faces" in cli and cli.count("<h2>Gallery, run se: test clip") == 2


def test_report_of_a_video_run_and_notes_for_galleries_it_cannot_draw(tmp_path, faces_run):
    import shutil

    from selfcam.checkpoint import save_checkpoint
    from selfcam.data import load_dataset
    from selfcam.report import build_report
    from selfcam.video import create_video_model

    torch.manual_seed(0)
    model = create_video_model("resnet8", 10, 1, 4, backbone_kwargs={"stem_stride": 2})
    save_checkpoint(model, tmp_path / "video", data={"name": "synthetic-clips", "size": 32, "frames": 4, "seed": 3})
    save_checkpoint(model, tmp_path / "no-data")  # records no dataset
    shutil.copytree(faces_run, tmp_path / "elsewhere")  # trained on data that is not on this machine
    doc = json.loads((tmp_path / "elsewhere" / "config.json").read_text())
    doc["data"]["name"] = "celeba:/no/such/celeba"
    (tmp_path / "elsewhere" / "config.json").write_text(json.dumps(doc))
    runs = [tmp_path / d for d in ("video", "no-data", "elsewhere")]
    html = build_report(runs, tmp_path / "r.html", per_class=1).read_text()
    notes = _notes(html)
    assert len(notes) == 2 and "gallery: run no-data left out (no dataset name recorded)" in notes
    assert any(n.startswith("gallery: run elsewhere left out (test data of celeba:/no/such/celeba unavailable") for n in notes)
    assert all(f"<td>{r}</td>" in html for r in ("video", "no-data", "elsewhere")) and "<td>celeba:/no/such/celeba</td>" in html
    data = load_dataset("synthetic-clips", "test", 16, seed=3, size=32, frames=4)
    shown = _check_strips(_figures(html), "video", tmp_path / "video", data, 4, 32, lambda m, it: m.explain(it[0][None]).heatmap)
    assert len(shown) == 2 and len(set(data.labels[shown].tolist())) == 2  # clips of two classes
    assert not any(c.startswith(("Gallery, run no-data", "Gallery, run elsewhere")) for c in _figures(html))
