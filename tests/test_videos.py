"""Video files: the ``videofolder:`` data (mp4 and frame folders), explained video files, temporal stability."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

pytest.importorskip("av")

from selfcam.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from selfcam.cli import app  # noqa: E402
from selfcam.data import load_dataset  # noqa: E402
from selfcam.data.videos import VideoWriter, probe_video, read_audio, sample_indices, video_frames  # noqa: E402
from selfcam.errors import ConfigError, DataError, InputError  # noqa: E402
from selfcam.metrics import temporal_stability  # noqa: E402

runner = CliRunner()
H, W, N_FRAMES = 24, 32, 6  # frames written: 24 x 32 px (cropped to their centred 24 px square), 6 per clip


def _run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def _frames(cls: int, n: int = N_FRAMES) -> list[np.ndarray]:
    """A bright 8 px square moving right (class 0) or left (class 1) on a dark frame; frame t's
    background grey level is (10 + 20 t) mod 200, so each frame is recognisable after decoding."""
    out = []
    for t in range(n):
        a = np.full((H, W, 3), (10 + 20 * t) % 200, np.uint8)
        x = 4 + 2 * t if cls == 0 else 20 - 2 * t
        a[8:16, x : x + 8] = 240
        out.append(a)
    return out


def _mp4(path: Path, frames: list[np.ndarray], fps: int = 10, audio: np.ndarray | None = None, rate: int = 16000) -> Path:
    """A lossless H.264 (4:4:4) mp4, with a mono AAC track of ``audio`` when given."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    if audio is None:
        with VideoWriter(path, fps, crf=0, pix_fmt="yuv444p") as w:
            for f in frames:
                w.write(f)
        return path
    with av.open(str(path), "w") as c:
        v = c.add_stream("libx264", rate=fps, options={"crf": "0"})
        v.height, v.width, v.pix_fmt = *frames[0].shape[:2], "yuv444p"
        a = c.add_stream("aac", rate=rate, layout="mono")
        for f in frames:
            c.mux(v.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(v.encode())
        chunk = 1024
        for i in range(0, len(audio), chunk):
            frame = av.AudioFrame.from_ndarray(audio[None, i : i + chunk].astype(np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = rate, i
            c.mux(a.encode(frame))
        c.mux(a.encode())
    return path


def _frame_folder(path: Path, frames: list[np.ndarray]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for t, f in enumerate(frames):
        Image.fromarray(f).save(path / f"{t:03d}.png")
    return path


def _tree(root: Path, per_class: int = 10) -> Path:
    """videofolder layout, no split folders: classes "left" / "right", even clips mp4, odd clips frame folders."""
    for c, name in enumerate(("right", "left")):
        for k in range(per_class):
            if k % 2 == 0:
                _mp4(root / name / f"c{k}.mp4", _frames(c))
            else:
                _frame_folder(root / name / f"c{k}", _frames(c))
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tree(tmp_path_factory.mktemp("videos") / "clips")


# --- the data ------------------------------------------------------------------------------------


def test_sample_indices_are_segment_centres() -> None:
    assert sample_indices(6, 3) == [1, 3, 5] and sample_indices(8, 4) == [1, 3, 5, 7]
    assert sample_indices(6, 6) == list(range(6)) and sample_indices(3, 6) == [0, 0, 1, 1, 2, 2]
    assert sample_indices(100, 1) == [50]


def test_videofolder_items_protocol_and_fixed_splits(tree: Path) -> None:
    spec = f"videofolder:{tree}"
    train, val, test = (load_dataset(spec, s, frames=3, size=16) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (16, 2, 2)  # 8 / 1 / 1 of each class's 10
    assert not set(train.paths) & set(val.paths) and not set(train.paths) & set(test.paths)
    assert load_dataset(spec, "train", frames=3, size=16).paths == train.paths  # fixed, whatever the seed
    assert load_dataset(spec, "train", 5, seed=7, frames=3, size=16).paths == train.paths[:5]
    assert train.task == "video" and train.num_classes == 2 and train.class_names == ["left", "right"]
    assert train.in_chans == 3 and train.num_frames == train.frames == 3 and train.size == 16 and train.spec == spec
    assert train.mean == (0.485, 0.456, 0.406) and train.std == (0.229, 0.224, 0.225)
    assert train.labels.dtype == torch.int64 and sorted(train.labels.tolist()) == [0] * 8 + [1] * 8
    assert {Path(p).suffix for p in train.paths} == {".mp4", ""} and set(train.counts) == {N_FRAMES}
    x, y = train[0]
    assert x.shape == (3, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64 and y.shape == ()
    raw = train.raw(0)
    assert raw.shape == (3, 3, 16, 16) and 0 <= raw.min() and raw.max() <= 1
    torch.testing.assert_close(train.denormalize(x), raw, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["mp4", "frames"])
def test_frames_sampled_uniformly_cropped_and_decoded_exactly(tmp_path: Path, kind: str) -> None:
    for c, name in enumerate(("a", "b")):
        for k in range(10):
            clip = _frames(c)
            _mp4(tmp_path / name / f"{k}.mp4", clip) if kind == "mp4" else _frame_folder(tmp_path / name / str(k), clip)
    data = load_dataset(f"videofolder:{tmp_path}", "train", 1, frames=3, size=24)
    label = int(data.labels[0])
    want = np.stack([_frames(label)[t][:, 4:28] for t in (1, 3, 5)])  # frames 1, 3, 5 of 6; centred 24 px square
    got = np.round(data.raw(0).permute(0, 2, 3, 1).numpy() * 255)
    assert got.shape == want.shape and np.abs(got - want).max() <= 2  # lossless H.264 4:4:4: RGB <-> YUV rounding only


def test_grey_mode_split_folders_and_val_carved_from_train(tmp_path: Path) -> None:
    for split, count in (("train", 10), ("test", 2)):
        for c, name in enumerate(("a", "b")):
            for k in range(count):
                _frame_folder(tmp_path / split / name / str(k), _frames(c, 4))
    spec = f"videofolder:{tmp_path}"
    train, val, test = (load_dataset(spec, s, frames=2, size=16, mode="L") for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (18, 2, 4) and train.in_chans == 1
    assert train.mean == (pytest.approx(0.449),) and train[0][0].shape == (2, 1, 16, 16)
    assert all("/test/" in p for p in test.paths) and not set(val.paths) & set(train.paths)


def test_bad_trees_and_clips_name_the_file(tmp_path: Path) -> None:
    root = _tree(tmp_path / "t", per_class=2)
    (root / "left" / "notes.txt").write_text("not a clip")
    bad = root / "right" / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video")
    with pytest.raises(DataError, match=str(bad)):
        for split in ("train", "val", "test"):  # the split holding broken.mp4 refuses it when it is built
            with pytest.warns(UserWarning, match="notes.txt"):
                load_dataset(f"videofolder:{root}", split, frames=2, size=16)
    with pytest.raises(DataError, match="cannot read video"):
        probe_video(bad)
    empty = tmp_path / "e"
    (empty / "a" / "clip").mkdir(parents=True)
    (empty / "b").mkdir()
    _mp4(empty / "b" / "x.mp4", _frames(0))
    with pytest.raises(DataError, match=str(empty / "a" / "clip") + ": the clip folder holds no frame images"):
        for split in ("train", "val", "test"):
            load_dataset(f"videofolder:{empty}", split, frames=2, size=16)
    frames = _frame_folder(tmp_path / "f" / "a" / "0", _frames(0, 2))
    _frame_folder(tmp_path / "f" / "b" / "0", _frames(1, 2))
    (frames / "001.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    data = None
    for split in ("train", "val", "test"):
        try:
            data = load_dataset(f"videofolder:{tmp_path / 'f'}", split, frames=2, size=16)
        except DataError:
            continue
        if str(frames) in data.paths:
            break
    assert data is not None and str(frames) in data.paths
    with pytest.raises(DataError, match=str(frames / "001.png")):
        data[data.paths.index(str(frames))]
    with pytest.raises(DataError, match="needs a path"):
        load_dataset("videofolder:", "train")
    with pytest.raises(ConfigError, match="no option"):
        load_dataset(f"videofolder:{root}", "train", fps=3)
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(f"videofolder:{tmp_path / 'nope'}", "train")


def test_audio_track_is_read_resampled_to_the_runs_rate(tmp_path: Path) -> None:
    rate = 8000
    tone = (0.5 * np.sin(2 * np.pi * 440 * np.arange(rate) / rate)).astype(np.float32)  # 1 s of 440 Hz at 8 kHz
    path = _mp4(tmp_path / "s.mp4", _frames(0, 10), audio=tone, rate=rate)
    samples, start = read_audio(path, 16000)
    assert abs(len(samples) - 16000) < 2048 and abs(start) < 0.1
    spectrum = np.abs(np.fft.rfft(samples[2000:14000]))
    assert abs(np.argmax(spectrum) * 16000 / 12000 - 440) < 5  # the same tone, now at 16 kHz
    assert read_audio(_mp4(tmp_path / "silent.mp4", _frames(0, 3)), 16000) is None
    assert [round(t, 3) for _, t in video_frames(path)][:3] == [0.0, 0.1, 0.2]


# --- temporal stability ------------------------------------------------------------------------


def test_temporal_stability_against_a_hand_computation() -> None:
    maps = torch.zeros(3, 3, 2, 3)
    maps[0, 0, 0, :2] = 1  # frame 0: pixels (0,0), (0,1)
    maps[0, 1, 0, 1:] = 0.7  # frame 1: (0,1), (0,2): IoU with frame 0 = 1 / 3
    maps[0, 2, 0, 1:] = 0.5  # frame 2: the same as frame 1 (>= 0.5 counts): IoU 1
    maps[0, 2, 1, 0] = 0.49  # below the threshold
    maps[1, 2, 1, 1] = 0.9  # clip 1: frames 0, 1 empty (IoU 0 by definition), frame 2 one pixel (IoU 0 with empty)
    maps[2, :, 1, :] = 1  # clip 2: the same row of 3 pixels in every frame
    got = temporal_stability(maps, 0.5)
    assert got.dtype == torch.float64 and got.tolist() == pytest.approx([(1 / 3 + 1) / 2, 0, 1])
    assert temporal_stability(maps, 0.8).tolist() == pytest.approx([0, 0, 1])  # clip 0: frames 1 and 2 empty at 0.8
    assert torch.isnan(temporal_stability(maps[:, :1])).all()
    with pytest.raises(InputError, match=r"\(N, T, H, W\)"):
        temporal_stability(maps[0])


def test_evaluate_clips_without_boxes_gives_accuracy_and_temporal_stability(tree: Path) -> None:
    from selfcam.evaluate import EvalConfig, evaluate_clips
    from selfcam.video import create_video_model

    torch.manual_seed(0)
    model = create_video_model("resnet8", 2, 3, frames=3).eval()
    data = load_dataset(f"videofolder:{tree}", "train", 6, frames=3, size=16)
    doc = evaluate_clips({"m": model}, data, EvalConfig(batch_size=4))
    row = doc["runs"]["m"]["results"]["self"]
    assert doc["n_items"] == 6 and doc["n_frames"] == 0
    assert set(row) == {"accuracy", "temporal_stability", "map_ms_per_clip"}
    x = torch.stack([data[i][0] for i in range(6)])
    with torch.no_grad():
        out = model.explain(x)
    assert row["accuracy"] == pytest.approx(float((out.logits.argmax(1) == data.labels).float().mean()))
    assert row["temporal_stability"] == pytest.approx(float(temporal_stability(out.heatmap, 0.5).mean()), abs=1e-6)


# --- end to end: train on a videofolder, evaluate, explain video files --------------------------


def test_cli_train_evaluate_explain_a_videofolder_run(tree: Path, tmp_path: Path) -> None:
    import av
    from safetensors.torch import load_file

    run = tmp_path / "run"
    code, out = _run("train", "--task", "video", "--data", f"videofolder:{tree}", "--backbone", "resnet8", "--epochs", "1",
                     "--batch-size", "8", "--image-size", "16", "--out", str(run), "--quiet")  # fmt: skip
    assert code == 0, out
    doc = json.loads((run / "config.json").read_text())
    assert doc["task"] == "video" and doc["data"]["name"] == f"videofolder:{tree}" and doc["data"]["frames"] == 8
    assert doc["data"]["class_names"] == ["left", "right"] and doc["data"]["size"] == 16
    code, out = _run("evaluate", "--checkpoint", str(run), "--out", str(tmp_path / "e"))
    assert code == 0, out
    ev = json.loads((tmp_path / "e" / "evaluation.json").read_text())
    assert ev["n_items"] == 2 and set(ev["runs"]["run"]["results"]["self"]) == {"accuracy", "temporal_stability", "map_ms_per_clip"}
    code, out = _run("explain", "--checkpoint", str(run), "--out", str(tmp_path / "items"), "--n", "2")  # its own test clips
    assert code == 0 and len(json.loads((tmp_path / "items" / "predictions.json").read_text())) == 2, out

    clip = _mp4(tmp_path / "in" / "clip.mp4", _frames(0, 19), fps=12)  # 19 frames: windows 0-7, 8-15, then 11-18
    code, out = _run("explain", "--checkpoint", str(run), str(clip), "--out", str(tmp_path / "x"))
    assert code == 0, out
    (record,) = json.loads((tmp_path / "x" / "predictions.json").read_text())
    assert record["frames"] == 19 and record["window"] == 8 and record["fps"] == 12
    assert [(w["start"], w["stop"]) for w in record["windows"]] == [(0, 8), (8, 16), (16, 19)]
    assert [f["frame"] for f in record["per_frame"]] == list(range(19))
    assert [f["window"] for f in record["per_frame"]] == [0] * 8 + [1] * 8 + [2] * 3
    with av.open(str(tmp_path / "x" / record["overlay"])) as c:  # every frame of the input, at its rate
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        assert c.streams.video[0].average_rate == 12
    assert len(frames) == 19 and frames[0].shape == (128, 256, 3)
    with Image.open(tmp_path / "x" / record["gif"]) as gif:
        assert gif.n_frames == 19
    maps = load_file(str(tmp_path / "x" / record["maps"]))
    assert maps["maps"].shape == (19, 16, 16) and maps["maps"].dtype == torch.float16 and maps["frame_times"].shape == (19,)

    # the maps and predictions are the model's on those windows of the file as the run's data reads it
    model, doc = load_checkpoint(run)
    from selfcam.explain import Preprocess

    prep = Preprocess.from_config(doc)
    x = torch.stack([prep._transform.prepare(torch.from_numpy(f).permute(2, 0, 1)) for f, _ in video_frames(clip)])
    with torch.no_grad():
        last = model.eval().explain(prep.normalize(x[11:19])[None])
        first = model.explain(prep.normalize(x[:8])[None])
    torch.testing.assert_close(maps["maps"][16:].float(), last.heatmap[0, 5:], atol=1e-3, rtol=0)  # float16
    torch.testing.assert_close(maps["maps"][:8].float(), first.heatmap[0], atol=1e-3, rtol=0)
    p = torch.softmax(last.logits[0], 0)
    assert record["windows"][2]["class"] == int(p.argmax()) and record["windows"][2]["score"] == pytest.approx(float(p.max()), abs=1e-4)

    code, out = _run("explain", "--checkpoint", str(run), str(tmp_path / "in"), "--out", str(tmp_path / "y"))  # a folder
    assert code == 0 and (tmp_path / "y" / "clip-explained.mp4").is_file(), out


def _asd_run(tmp_path: Path) -> Path:
    from selfcam.asd import ASDConfig, ASDModel

    torch.manual_seed(0)
    run = tmp_path / "asd-run"
    save_checkpoint(ASDModel(ASDConfig(frames=4, fps=25, sample_rate=16000)), run,
                    data={"name": "speaker-clips", "size": 16, "in_chans": 3, "mean": [0.5], "std": [0.25], "frames": 4,
                          "sample_rate": 16000, "class_names": ["not_speaking", "speaking"]})  # fmt: skip
    return run


def test_asd_run_explains_a_video_with_sound_and_refuses_one_without(tmp_path: Path) -> None:
    run = _asd_run(tmp_path)
    rate = 16000
    sound = (0.3 * np.sin(2 * np.pi * 300 * np.arange(rate // 2) / rate)).astype(np.float32)  # 0.5 s
    clip = _mp4(tmp_path / "talk.mp4", _frames(0, 10), fps=25, audio=sound, rate=rate)
    code, out = _run("explain", "--checkpoint", str(run), str(clip), "--out", str(tmp_path / "x"))
    assert code == 0, out
    (record,) = json.loads((tmp_path / "x" / "predictions.json").read_text())
    assert record["frames"] == 10 and len(record["windows"]) == 3 and set(record["importance"]) == {"audio", "face"}
    assert all("speaking_score" in f for f in record["per_frame"]) and record["run_fps"] == 25
    assert record["windows"][0]["padded_audio_samples"] < 2048  # the AAC track starts within a frame or so

    mute = _mp4(tmp_path / "mute.mp4", _frames(0, 4), fps=25)
    code, out = _run("explain", "--checkpoint", str(run), str(mute), "--out", str(tmp_path / "m"))
    assert code == 2 and "no audio track" in out and str(mute) in out and len(out.strip().splitlines()) == 1


def test_video_runs_refuse_images_and_non_videos_in_one_line(tmp_path: Path) -> None:
    run = _asd_run(tmp_path)
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(img)
    text = tmp_path / "a.txt"
    text.write_text("hello")
    for path, what in ((img, "an image file, and this is an ASD run"), (text, "not a video file")):
        code, out = _run("explain", "--checkpoint", str(run), str(path), "--out", str(tmp_path / "o"))
        assert code == 2 and what in out and str(path) in out and len(out.strip().splitlines()) == 1, out
    broken = tmp_path / "b.mp4"
    broken.write_bytes(b"nothing here")
    code, out = _run("explain", "--checkpoint", str(run), str(broken), "--out", str(tmp_path / "o"))
    assert code == 2 and f"{broken}: cannot read video" in out and len(out.strip().splitlines()) == 1, out
    assert not any((tmp_path / "o").glob("*"))  # nothing half-written stays
