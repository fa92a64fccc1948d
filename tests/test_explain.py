"""`selfcam explain`: finding images, preprocessing, batched maps, the panels and predictions.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pytorch_grad_cam.utils.image import show_cam_on_image
from typer.testing import CliRunner

from selfcam.cli import app
from selfcam.errors import ConfigError, InputError
from selfcam.explain import Preprocess, explain_images, find_images
from selfcam.model import create_model
from selfcam.checkpoint import load_checkpoint, save_checkpoint
from selfcam.posthoc import posthoc_map
from selfcam.render import overlay, panel

runner = CliRunner()
SIZE = 24


def _run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output  # click >= 8.2: stdout and stderr together


def _png(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


def _checkpoint(tmp_path: Path, method: str = "plain", in_chans: int = 1, **data) -> Path:
    torch.manual_seed(0)
    run = tmp_path / f"run-{method}"
    save_checkpoint(create_model(method, "resnet8", 3, in_chans), run, data={"size": SIZE, **data})
    return run


# --- finding images -------------------------------------------------------------------


def test_find_images_recursive_sorted_and_skipped(tmp_path: Path) -> None:
    rgb = np.zeros((5, 5, 3))
    b = _png(tmp_path / "d" / "b.png", rgb)
    a = _png(tmp_path / "d" / "sub" / "a.jpg", rgb)
    c = _png(tmp_path / "d" / "c.PNG", rgb)
    (tmp_path / "d" / "notes.txt").write_text("not an image")
    (tmp_path / "d" / "broken.png").write_bytes(b"\x89PNG garbage")
    extra = _png(tmp_path / "x.bmp", rgb)
    images, skipped = find_images([tmp_path / "d", extra])
    assert images == [b, c, a, extra]  # sorted by path inside the directory, then the explicit file
    assert skipped == [tmp_path / "d" / "broken.png", tmp_path / "d" / "notes.txt"]


@pytest.mark.parametrize("make", ["text", "empty_dir", "missing"])
def test_find_images_errors_name_the_path(tmp_path: Path, make: str) -> None:
    path = tmp_path / "thing"
    if make == "text":
        path.write_text("hello")
    elif make == "empty_dir":
        path.mkdir()
        (path / "readme.md").write_text("no images here")
    with pytest.raises(InputError, match=str(path)):
        find_images([path])


# --- preprocessing --------------------------------------------------------------------


def _doc(in_chans: int, **data) -> dict:
    return {"model": create_model("plain", "resnet8", 3, in_chans).config, "data": data}


def test_normalization_statistics_in_order_of_preference() -> None:
    assert Preprocess.from_config(_doc(3, size=8, mean=[0.1, 0.2, 0.3], std=[1, 2, 3])).std == (1.0, 2.0, 3.0)
    assert Preprocess.from_config(_doc(1, size=8, mean=0.4, std=0.2)).mean == (0.4,)
    digits = Preprocess.from_config(_doc(1, size=8, name="cluttered-digits"))
    assert (digits.mean, digits.std) == ((0.15,), (0.26,))
    assert Preprocess.from_config(_doc(3, size=8, name="imagefolder:/x")).mean == (0.485, 0.456, 0.406)
    assert Preprocess.from_config(_doc(1, size=8)).std == (0.5,)
    assert Preprocess.from_config(_doc(1), size=12).size == 12
    with pytest.raises(ConfigError, match="pass --size"):
        Preprocess.from_config(_doc(1))
    with pytest.raises(ConfigError, match="data.mean"):
        Preprocess.from_config(_doc(3, size=8, mean="big", std=1))
    with pytest.raises(ConfigError, match="std > 0"):
        Preprocess.from_config(_doc(1, size=8, mean=0.0, std=0.0))


def test_load_converts_channels_crops_the_centre_and_normalizes(tmp_path: Path) -> None:
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, :10] = 255  # the left quarter: cut away by the centred 20x20 crop
    img[:, 10:30] = (200, 100, 50)
    path = _png(tmp_path / "wide.png", img)
    gray = Preprocess(1, 20, (0.5,), (0.25,)).load(path)
    want = (200 * 299 + 100 * 587 + 50 * 114 + 500) // 1000  # Pillow's ITU-R 601-2 luma, rounded
    assert gray.shape == (1, 20, 20) and torch.allclose(gray, torch.full_like(gray, want / 255))
    rgb = Preprocess(3, 20, (0.5,), (0.25,)).load(path)
    assert torch.allclose(rgb[:, 0, 0], torch.tensor([200, 100, 50]) / 255)
    assert torch.allclose(Preprocess(1, 20, (0.5,), (0.25,)).normalize(gray), (gray - 0.5) / 0.25)
    small = Preprocess(1, 10, (0.5,), (0.25,)).load(path)  # 20 -> 10: antialiased, still a flat colour
    assert small.shape == (1, 10, 10) and torch.allclose(small, torch.full_like(small, want / 255), atol=1e-6)


# --- maps and the panel ------------------------------------------------------------------


def test_explain_images_batches_and_matches_the_model_and_posthoc() -> None:
    torch.manual_seed(0)
    model = create_model("plain", "resnet8", 3, 1).eval()
    x = torch.randn(5, 1, SIZE, SIZE)
    a = explain_images(model, x, ("gradcam",), batch_size=2)
    b = explain_images(model, x, ("gradcam",), batch_size=5)
    with torch.no_grad():
        out = model.explain(x)
    probs = torch.softmax(out.logits, dim=1)
    assert torch.equal(a.pred, probs.argmax(1)) and torch.allclose(a.score, probs.max(1).values)
    assert torch.allclose(a.maps["self"], out.heatmap, atol=1e-6)
    assert torch.allclose(a.maps["gradcam"], posthoc_map(model, x, "gradcam", probs.argmax(1)), atol=1e-5)
    for k in a.maps:
        assert torch.allclose(a.maps[k], b.maps[k], atol=1e-5)
    with pytest.raises(ConfigError, match="unknown post-hoc"):
        explain_images(model, x, ("gradcan",))
    with pytest.raises(ConfigError, match="'plain' model"):
        explain_images(create_model("se", "resnet8", 3, 1), x, ("cam",))


def test_overlay_is_grad_cams_show_cam_on_image() -> None:
    rng = np.random.default_rng(0)
    for alpha in (0.5, 0.3, 0.0, 1.0):
        img = rng.random((9, 11, 3), dtype=np.float32)
        heat = rng.random((9, 11), dtype=np.float32)
        theirs = show_cam_on_image(img, heat, use_rgb=True, image_weight=alpha)
        assert np.array_equal(overlay(img, heat, alpha), theirs)
        gray = img[..., :1]
        assert np.array_equal(overlay(gray[..., 0], heat, alpha),
                              show_cam_on_image(np.repeat(gray, 3, -1), heat, use_rgb=True, image_weight=alpha))


def test_panel_places_input_and_overlays_side_by_side() -> None:
    gen = torch.Generator().manual_seed(0)
    image, m1, m2 = torch.rand(1, 16, 16, generator=gen), torch.rand(16, 16, generator=gen), torch.rand(16, 16, generator=gen)
    row = panel(image, {"self": m1, "gradcam": m2}, "caption", alpha=0.4)
    tiles = [np.repeat(np.round(255 * image[0].numpy()).astype(np.uint8)[..., None], 3, -1),
             overlay(image, m1, 0.4), overlay(image, m2, 0.4)]  # fmt: skip
    k = 8  # 16 px tiles are upscaled 8x to 128
    found = 0
    for tile in tiles:
        big = tile.repeat(k, 0).repeat(k, 1)
        # locate the tile by its top-left pixel run, then compare the whole block
        for y in range(row.shape[0] - 128 + 1):
            xs = [x for x in range(row.shape[1] - 128 + 1) if np.array_equal(row[y, x : x + 128], big[0])]
            if xs and np.array_equal(row[y : y + 128, xs[0] : xs[0] + 128], big):
                found += 1
                break
    assert found == 3


# --- the command ------------------------------------------------------------------------


def test_cli_explain_folder_writes_panels_and_predictions(tmp_path: Path) -> None:
    run = _checkpoint(tmp_path, "se", in_chans=1, name="cluttered-digits", class_names=["zero", "one", "two"])
    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    for rel in ("a.png", "sub/a.png", "sub/b.jpg"):
        _png(folder / rel, rng.integers(0, 256, (30, 30, 3)))
    (folder / "labels.csv").write_text("a,1")
    code, out = _run("explain", "--checkpoint", str(run), str(folder), "--out", str(tmp_path / "out"),
                     "--methods", "gradcam", "--batch-size", "2", "--quiet")  # fmt: skip
    assert code == 0, out
    assert "warning: skipped 1 non-image file(s)" in out and "labels.csv" in out
    records = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert [r["output"] for r in records] == ["a.png", "a-2.png", "b.png"]
    assert [Path(r["file"]).name for r in records] == ["a.png", "a.png", "b.jpg"]
    model, doc = load_checkpoint(run)
    prep = Preprocess.from_config(doc)
    x = torch.stack([prep.normalize(prep.load(r["file"])) for r in records])
    with torch.no_grad():
        probs = torch.softmax(model(x).logits, dim=1)
    for r, p in zip(records, probs):
        assert r["class"] == int(p.argmax()) and r["class_name"] == ["zero", "one", "two"][r["class"]]
        assert r["score"] == pytest.approx(float(p.max()), abs=1e-6)
    panel = Image.open(tmp_path / "out" / "a.png")
    assert panel.mode == "RGB" and panel.width >= 3 * 144  # input, self, gradcam tiles of 144 px (24 x 6)


def test_cli_explain_errors_are_one_line(tmp_path: Path) -> None:
    run = _checkpoint(tmp_path)
    text = tmp_path / "notes.txt"
    text.write_text("hi")
    code, out = _run("explain", "--checkpoint", str(run), str(text), "--out", str(tmp_path / "o"))
    assert code == 2 and f"{text}: not an image file" in out and "Traceback" not in out
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out = _run("explain", "--checkpoint", str(run), str(empty), "--out", str(tmp_path / "o"))
    assert code == 2 and f"{empty}: directory holds no images" in out
    img = _png(tmp_path / "i.png", np.zeros((8, 8)))
    code, out = _run("explain", "--checkpoint", str(run), str(img), "--out", str(tmp_path / "o"), "--methods", "cam,foo")
    assert code == 2 and "unknown post-hoc method(s) foo" in out
    code, out = _run("explain", "--checkpoint", str(tmp_path / "nope"), str(img), "--out", str(tmp_path / "o"))
    assert code == 2 and "checkpoint directory not found" in out


# --- every task: attribute panels from files, dataset items of image, attribute, video and ASD runs ---


def _task_run(tmp_path: Path, task: str) -> Path:
    """A random-weight run of ``task`` whose config records its built-in data as ``fit`` would (32 px, short clips)."""
    from selfcam.asd import ASDConfig, ASDModel
    from selfcam.data import load_dataset
    from selfcam.tasks import get_task
    from selfcam.video import create_video_model

    torch.manual_seed(0)
    t = get_task(task)
    options = {"frames": 4} if task in ("video", "asd") else {}
    data = load_dataset(t.default_data, "train", 8, size=32, **options)
    model = {"image": lambda: create_model("se", "resnet8", 10, 1),
             "attributes": lambda: create_model("se-multilabel", "resnet8", 5, 3),
             "video": lambda: create_video_model("resnet8", 10, 1, frames=4),
             "asd": lambda: ASDModel(ASDConfig(frames=4))}[task]()  # fmt: skip
    run = tmp_path / f"{task}-run"
    save_checkpoint(model, run, data={**t.data_record(data), "seed": 0})
    return run


def test_attribute_run_explains_files_with_a_map_per_attribute(tmp_path: Path) -> None:
    run = _task_run(tmp_path, "attributes")
    model, doc = load_checkpoint(run)
    img = _png(tmp_path / "in" / "face.png", np.random.default_rng(0).integers(0, 255, (40, 40, 3)))
    code, output = _run("explain", str(img), "--checkpoint", str(run), "--out", str(tmp_path / "o"))
    assert code == 0, output
    (record,) = json.loads((tmp_path / "o" / "predictions.json").read_text())
    names = doc["data"]["class_names"]
    assert list(record["attributes"]) == names and len(names) == 5
    x = Preprocess.from_config(doc).load(img)
    with torch.no_grad():
        probs = torch.sigmoid(model.explain(Preprocess.from_config(doc).normalize(x)[None]).logits)[0]
    assert record["attributes"] == pytest.approx(dict(zip(names, probs.tolist())), abs=1e-4)
    assert record["present"] == [n for n, p in zip(names, probs) if p > 0.5]
    picture = np.asarray(Image.open(tmp_path / "o" / "face.png"))
    one = panel(x, {f"a{i}": torch.zeros(32, 32) for i in range(5)}, "caption")
    assert picture.shape[0] == one.shape[0] and picture.shape[1] >= one.shape[1]  # input + 5 attribute tiles


@pytest.mark.parametrize("task", ["image", "attributes"])
def test_explain_items_of_the_runs_own_data(tmp_path: Path, task: str) -> None:
    from selfcam.explain import explain_items
    from selfcam.tasks import get_task

    run = _task_run(tmp_path, task)
    model, doc = load_checkpoint(run)
    model.eval()
    records = explain_items(model, doc, tmp_path / "o", n=4)
    assert [r["output"] for r in records] == [f"item-{r['item']}.png" for r in records] and len(records) == 4
    spec, data = get_task(task).run_data(doc, "test", None if task == "image" else 64)
    for r in records:
        x = data[r["item"]][0]
        with torch.no_grad():
            logits = model.explain(x[None]).logits[0]
        if task == "image":
            assert r["class"] == int(logits.argmax()) and r["true"] == doc["data"]["class_names"][int(data[r["item"]][1])]
        else:
            assert list(r["attributes"].values()) == pytest.approx(torch.sigmoid(logits).tolist(), abs=1e-4)
        assert (tmp_path / "o" / r["output"]).is_file()
    if task == "image":  # spread over the classes: four different true digits
        assert len({r["true"] for r in records}) == 4


@pytest.mark.parametrize("task", ["video", "asd"])
def test_cli_explain_clips_writes_strips_gifs_and_predictions(tmp_path: Path, task: str) -> None:
    from selfcam.render import frame_strip, importance_rows

    run = _task_run(tmp_path, task)
    code, output = _run("explain", "--checkpoint", str(run), "--out", str(tmp_path / "o"), "--n", "2")
    assert code == 0, output
    records = json.loads((tmp_path / "o" / "predictions.json").read_text())
    assert len(records) == 2 and len({r["true"] for r in records}) == 2  # one clip of each of two classes
    model, doc = load_checkpoint(run)
    model.eval()
    from selfcam.tasks import get_task

    _, data = get_task(task).run_data(doc, "test", 32)
    for r in records:
        item = data[r["item"]]
        with torch.no_grad():
            out = model.explain(item[0][None], item[1][None]) if task == "asd" else model.explain(item[0][None])
        strip = np.asarray(Image.open(tmp_path / "o" / r["output"]).convert("RGB"))
        from selfcam.explain import raw_item

        boxes = item[4] if task == "asd" else item[2]
        want = frame_strip(raw_item(data, r["item"], item), out.heatmap[0], boxes)  # batched there, one clip here
        if task == "asd":  # the modality bars under the strip
            rows = importance_rows({k: float(v[0]) for k, v in out.importance.items()}, want.shape[1])
            assert np.abs(strip[want.shape[0]:].astype(int) - rows.astype(int)).mean() < 1
            strip = strip[: want.shape[0]]
        diff = np.abs(strip.astype(int) - want.astype(int))
        assert strip.shape == want.shape and diff.max() <= 3 and diff.mean() < 0.01
        with Image.open(tmp_path / "o" / r["gif"]) as gif:
            assert gif.n_frames == 4
        if task == "asd":
            assert r["importance"]["audio"] == pytest.approx(float(out.importance["audio"][0]), abs=1e-4)
        else:
            assert r["class"] == int(out.logits[0].argmax())


def test_clip_runs_refuse_image_files_in_one_line(tmp_path: Path) -> None:
    run = _task_run(tmp_path, "video")
    img = _png(tmp_path / "a.png", np.zeros((8, 8)))
    code, output = _run("explain", str(img), "--checkpoint", str(run), "--out", str(tmp_path / "o"))
    assert code == 2 and "error:" in output and "video run" in output and len(output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_evaluate_rebuilds_the_runs_clip_length(tmp_path: Path) -> None:
    """A 4-frame video run is scored on 4-frame clips of its data (the generator's default is 8)."""
    run = _task_run(tmp_path, "video")
    code, output = _run("evaluate", "--checkpoint", str(run), "--n", "4", "--out", str(tmp_path / "e"))
    assert code == 0, output
    doc = json.loads((tmp_path / "e" / "evaluation.json").read_text())
    assert doc["task"] == "video" and doc["n_items"] == 4 and doc["n_frames"] == 16


def test_importance_rows_draw_bars_in_proportion() -> None:
    from selfcam.render import importance_rows

    rows = importance_rows({"audio": 1.0, "face": 0.25}, 400)
    blue = (rows == (70, 110, 200)).all(-1)
    h = rows.shape[0] // 2
    a, f = blue[:h].any(0).sum(), blue[h:].any(0).sum()
    assert rows.shape[1] == 400 and a > 0 and abs(f / a - 0.25) < 0.02
    with pytest.raises(InputError, match="face"):
        importance_rows({"face": float("nan")}, 100)
