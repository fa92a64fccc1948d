"""The AVA-ActiveSpeaker-style loader (selfcam.data.ava) on fixtures written in that exact layout."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfcam.data.ava import AVAActiveSpeaker, read_ava_csv, write_ava
from selfcam.data.speakers import FRAME_MEAN, FRAME_STD, SpeakerClips
from selfcam.errors import DataError

SPF = 640  # samples per frame at 16 kHz, 25 fps


def _wav(path: Path, samples: np.ndarray, rate: int = 16000, width: int = 2, channels: int = 1) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = {1: np.uint8, 2: "<i2", 4: "<i4"}[width]
    scale = {1: 127, 2: 32767, 4: 2**31 - 1}[width]
    pcm = np.round(np.clip(samples, -1, 1) * scale + (128 if width == 1 else 0)).astype(dtype)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())


def _jpeg(path: Path, colour: tuple[int, int, int], box_px: tuple[int, int, int, int], size: tuple[int, int] = (80, 40)) -> None:
    """A grey ``size`` (W, H) frame with a flat ``colour`` rectangle at ``box_px`` (x0, y0, x1, y1)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.full((size[1], size[0], 3), 100, np.uint8)
    x0, y0, x1, y1 = box_px
    img[y0:y1, x0:x1] = colour
    Image.fromarray(img).save(path, quality=98, subsampling=0)  # 4:4:4: no chroma bleed at the edges


def _hand_fixture(root: Path, rows: list[str] | None = None) -> Path:
    """Video v1 (80x40 frames), entity e1 at box x 0.25-0.5, y 0.25-0.75 (pixels 20-40, 10-30), 4 frames
    at 2.00 .. 2.12 (the first written "2" in the CSV, "2.00.jpg" on disk); red while speaking, blue
    otherwise; a 3.1 s wav."""
    lines = rows or [
        "v1,2,0.25,0.25,0.5,0.75,NOT_SPEAKING,v1:e1",
        "v1,2.04,0.25,0.25,0.5,0.75,SPEAKING_AUDIBLE,v1:e1",
        "v1,2.08,0.25,0.25,0.5,0.75,SPEAKING_AUDIBLE,v1:e1",
        "v1,2.12,0.25,0.25,0.5,0.75,SPEAKING_NOT_AUDIBLE,v1:e1",
    ]
    for name, colour in (("2.00", (0, 0, 255)), ("2.04", (255, 0, 0)), ("2.08", (255, 0, 0)), ("2.12", (0, 0, 255))):
        _jpeg(root / "frames" / "v1" / f"{name}.jpg", colour, (20, 10, 40, 30))
    t = np.arange(3 * 16000 + 3 * SPF) / 16000
    _wav(root / "audio" / "v1.wav", 0.5 * np.sin(2 * np.pi * 440 * t))
    (root / "annotations.csv").write_text("\n".join(lines) + "\n")
    return root / "annotations.csv"


def test_hand_fixture_is_read_back(tmp_path: Path) -> None:
    _hand_fixture(tmp_path)
    ds = AVAActiveSpeaker(tmp_path, frames=4, size=8)
    assert len(ds) == 1
    frames, audio, label, frame_labels = ds[0]
    assert frames.shape == (4, 3, 8, 8) and audio.shape == (4 * SPF,)
    assert frame_labels.tolist() == [0, 1, 1, 0]  # only SPEAKING_AUDIBLE is positive
    assert int(label) == 1
    rgb = frames * FRAME_STD + FRAME_MEAN  # the crop holds only the flat rectangle
    red, blue = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0])
    for t, colour in enumerate((blue, red, red, blue)):
        assert (rgb[t] - colour[:, None, None]).abs().max() < 0.05
    t0 = 2 * 16000  # audio from the first timestamp
    expected = 0.5 * np.sin(2 * np.pi * 440 * np.arange(t0, t0 + 4 * SPF) / 16000)
    np.testing.assert_allclose(audio.numpy(), expected, atol=2e-4)


def test_header_is_skipped_and_tracks_are_cut_into_clips(tmp_path: Path) -> None:
    rows = ["video_id,frame_timestamp,entity_box_x1,entity_box_y1,entity_box_x2,entity_box_y2,label,entity_id"]
    rows += [f"v1,{t},0.25,0.25,0.5,0.75,NOT_SPEAKING,v1:e1" for t in ("2.08", "2", "2.04", "2.12")]
    _hand_fixture(tmp_path, rows)
    ds = AVAActiveSpeaker(tmp_path, frames=2, size=8)
    assert [[r.timestamp for r in c] for c in ds.clips] == [["2", "2.04"], ["2.08", "2.12"]]  # sorted by time
    assert ds.labels.tolist() == [0, 0]
    assert len(AVAActiveSpeaker(tmp_path, frames=3, size=8)) == 1  # the tail is dropped


def test_gap_splits_a_track(tmp_path: Path) -> None:
    rows = [f"v1,{t},0.25,0.25,0.5,0.75,NOT_SPEAKING,v1:e1" for t in ("2", "2.04", "2.12")]
    _hand_fixture(tmp_path, rows)
    assert len(AVAActiveSpeaker(tmp_path, frames=2, size=8)) == 1
    with pytest.raises(DataError, match="no track has 2 consecutive rows"):
        AVAActiveSpeaker(tmp_path, frames=2, size=8, max_gap=0.03)


def test_missing_frame_names_line_and_file(tmp_path: Path) -> None:
    _hand_fixture(tmp_path)
    (tmp_path / "frames" / "v1" / "2.08.jpg").unlink()
    with pytest.raises(DataError, match=r"annotations\.csv, line 3: frame file .*frames/v1/2\.08\.jpg not found"):
        AVAActiveSpeaker(tmp_path, frames=4, size=8)


def test_missing_frames_and_video_names_both(tmp_path: Path) -> None:
    _hand_fixture(tmp_path, ["v2,1.0,0.1,0.1,0.9,0.9,NOT_SPEAKING,v2:a"])
    with pytest.raises(DataError, match=r"line 1: neither .*frames/v2/ nor .*videos/v2\.mp4 exists"):
        AVAActiveSpeaker(tmp_path, frames=1, size=8)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("v1,2.16,0.25,0.25,0.5,0.75,SPEAKING_AUDIBLE", "line 5: expected 8 columns"),
        ("v1,2.16,0.25,0.25,0.5,0.75,TALKING,v1:e1", "line 5: unknown label 'TALKING'"),
        ("v1,2.16,0.5,0.25,0.25,0.75,NOT_SPEAKING,v1:e1", "line 5: box must be"),
        ("v1,abc,0.25,0.25,0.5,0.75,NOT_SPEAKING,v1:e1", "line 5: timestamp and box must be numbers"),
        ("v1,2.16,0.25,0.25,0.5,1.5,NOT_SPEAKING,v1:e1", "line 5: box must be"),
    ],
)
def test_malformed_rows_name_the_line(tmp_path: Path, row: str, message: str) -> None:
    csv = _hand_fixture(tmp_path)
    csv.write_text(csv.read_text() + row + "\n")
    with pytest.raises(DataError, match=message):
        read_ava_csv(csv)
    with pytest.raises(DataError, match=message):
        AVAActiveSpeaker(tmp_path, frames=4, size=8)


def test_wav_of_wrong_rate_or_too_short_names_the_file(tmp_path: Path) -> None:
    _hand_fixture(tmp_path)
    _wav(tmp_path / "audio" / "v1.wav", np.zeros(3 * 44100), rate=44100)
    with pytest.raises(DataError, match=r"audio/v1\.wav: sample rate 44100 Hz, expected 16000 Hz"):
        AVAActiveSpeaker(tmp_path, frames=4, size=8)
    _wav(tmp_path / "audio" / "v1.wav", np.zeros(2 * 16000 + 100))
    with pytest.raises(DataError, match=r"audio/v1\.wav: 32100 samples .* too short for the clip at 2 s \(line 1\)"):
        AVAActiveSpeaker(tmp_path, frames=4, size=8)
    (tmp_path / "audio" / "v1.wav").write_bytes(b"RIFF....not a wav")
    with pytest.raises(DataError, match=r"audio/v1\.wav: not a PCM wav file"):
        AVAActiveSpeaker(tmp_path, frames=4, size=8)
    (tmp_path / "audio" / "v1.wav").unlink()
    with pytest.raises(DataError, match=r"line 1: audio file .*audio/v1\.wav not found"):
        AVAActiveSpeaker(tmp_path, frames=4, size=8)


def test_8_and_32_bit_stereo_wavs(tmp_path: Path) -> None:
    from selfcam.data.ava import read_wav

    x = np.array([0.5, -0.5, 0.25, 0.0])
    stereo = np.stack([x, -x], 1).reshape(-1)  # channels average to 0
    _wav(tmp_path / "a.wav", stereo, width=4, channels=2)
    got, rate = read_wav(tmp_path / "a.wav")
    assert rate == 16000 and got.shape == (4,)
    np.testing.assert_allclose(got, 0.0, atol=1e-6)
    _wav(tmp_path / "b.wav", x, width=1)
    np.testing.assert_allclose(read_wav(tmp_path / "b.wav")[0], x, atol=1 / 127)


@pytest.fixture(scope="module")
def clips() -> SpeakerClips:
    return SpeakerClips("val", 3, frames=4, size=32, seed=3)


def test_generator_round_trip_through_jpeg_frames(tmp_path: Path, clips: SpeakerClips) -> None:
    csv = write_ava(clips, tmp_path, quality=100)
    assert csv == tmp_path / "annotations.csv"
    assert (tmp_path / "frames" / "val00000" / "0.04.jpg").is_file() and (tmp_path / "audio" / "val00002.wav").is_file()
    first = csv.read_text().splitlines()[0].split(",")
    assert first[0] == "val00000" and first[1] == "0.00" and first[7] == "val00000:0"
    ds = AVAActiveSpeaker(tmp_path, frames=4, size=32)
    assert len(ds) == 3
    assert torch.equal(ds.frame_labels, clips.frame_labels) and torch.equal(ds.labels, clips.labels)
    for i in range(3):
        frames, audio, label, frame_labels = ds[i]
        want = clips[i]
        assert (frames - want[0]).abs().mean() * FRAME_STD * 255 < 2  # JPEG quality 100, 4:4:4; in grey levels
        torch.testing.assert_close(audio, want[1], atol=1 / 32767 + 1e-6, rtol=0)  # 16-bit PCM
        assert torch.equal(frame_labels, want[3])


def test_generator_round_trip_through_mp4(tmp_path: Path, clips: SpeakerClips) -> None:
    pytest.importorskip("av")
    write_ava(clips, tmp_path, video=True)
    assert (tmp_path / "videos" / "val00001.mp4").is_file() and not (tmp_path / "frames").exists()
    ds = AVAActiveSpeaker(tmp_path, frames=4, size=32)
    for i in range(3):
        frames = ds[i][0]
        want = clips[i][0]
        assert frames.shape == want.shape
        assert (frames - want).abs().mean() * FRAME_STD * 255 < 2  # lossless H.264 4:4:4 but for RGB <-> YUV rounding


def test_mp4_fixture_frames_are_picked_by_timestamp(tmp_path: Path) -> None:
    av = pytest.importorskip("av")
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)]
    (tmp_path / "videos").mkdir()
    with av.open(str(tmp_path / "videos" / "v9.mp4"), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        for c in colours:
            img = np.full((32, 64, 3), 90, np.uint8)
            img[8:24, 16:48] = c
            container.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        container.mux(stream.encode())
    _wav(tmp_path / "audio" / "v9.wav", np.zeros(16000))
    box = "0.25,0.25,0.75,0.75"  # pixels 16-48 x 8-24: the coloured rectangle
    rows = [f"v9,{t},{box},NOT_SPEAKING,v9:a" for t in ("0.04", "0.08", "0.12")]
    (tmp_path / "annotations.csv").write_text("\n".join(rows) + "\n")
    ds = AVAActiveSpeaker(tmp_path, frames=3, size=8)
    rgb = ds[0][0] * FRAME_STD + FRAME_MEAN
    for t, c in enumerate(colours[1:4]):  # frames 1, 2, 3 of the video
        assert (rgb[t].mean((1, 2)) - torch.tensor(c) / 255).abs().max() < 0.1
