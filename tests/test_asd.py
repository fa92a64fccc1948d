"""Audio-visual SE-CAM (selfcam.asd) and the synthetic speaker clips (selfcam.data.speakers)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from selfcam.asd import (
    AUDIO_SCALE,
    LOG_EPS,
    ASDConfig,
    ASDModel,
    evaluate_asd,
    importance_by_class,
    log_mel,
    mel_filterbank,
    modality_importance,
)
from selfcam.checkpoint import load_checkpoint, save_checkpoint
from selfcam.data.digits import box_mask
from selfcam.data.speakers import KINDS, SpeakerClips, draw_faces
from selfcam.errors import CheckpointError, ConfigError, DataError, InputError
from selfcam.train import TrainConfig, fit

SMALL = dict(frames=4, backbone_kwargs={"stem_stride": 2})


@pytest.fixture(scope="module")
def clips() -> SpeakerClips:
    return SpeakerClips("train", 60, frames=8, size=48, seed=5)


# --- the generator ----------------------------------------------------------------------------


def test_shapes_labels_and_determinism(clips: SpeakerClips) -> None:
    assert clips.frames.shape == (60, 8, 3, 48, 48) and clips.frames.dtype == torch.uint8
    assert clips.waves.shape == (60, 8 * 640) and clips.waves.dtype == torch.float32
    assert clips.mouth_boxes.shape == (60, 8, 4) and clips.frame_labels.shape == (60, 8)
    assert set(clips.kinds.tolist()) == set(range(len(KINDS)))
    speaking = clips.kinds == KINDS.index("speaking")
    assert torch.equal(clips.labels, speaking.long())
    assert (clips.frame_labels[~speaking] == 0).all()
    assert (clips.frame_labels[speaking].sum(1) >= 4).all()  # at least ceil(T / 2) speaking frames
    frames, wave, label, frame_labels, boxes = clips[3]
    assert frames.shape == (8, 3, 48, 48) and frames.dtype == torch.float32 and wave.shape == (5120,)
    again = SpeakerClips("train", 60, frames=8, size=48, seed=5)
    assert torch.equal(again.frames, clips.frames) and torch.equal(again.waves, clips.waves)
    assert not torch.equal(SpeakerClips("val", 60, frames=8, size=48, seed=5).waves, clips.waves)


def test_generator_rejects_bad_arguments() -> None:
    with pytest.raises(DataError, match="split"):
        SpeakerClips("dev", 4)  # type: ignore[arg-type]
    with pytest.raises(DataError, match="frames must be an integer >= 2"):
        SpeakerClips("train", 4, frames=1)
    with pytest.raises(DataError, match="multiple of fps"):
        SpeakerClips("train", 4, sample_rate=16001)


def test_mouth_box_covers_the_drawn_mouth_in_every_frame(clips: SpeakerClips) -> None:
    _, mouth = draw_faces(clips.params, 48, torch.Generator().manual_seed(0))
    inside = box_mask(clips.mouth_boxes.flatten(0, 1), 48)
    drawn = mouth > 0
    assert drawn.flatten(1).any(1).all()  # a mouth in every frame
    assert not (drawn & ~inside).any()
    # and the box is not the whole face: at most a fifth of the frame
    assert (inside.flatten(1).float().mean(1) < 0.2).all()


def _per_frame(x: Tensor, frames: int) -> Tensor:
    return x.view(len(x), frames, -1)


def _corr(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation per row, 0 where a row is constant."""
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    den = (a.norm(dim=1) * b.norm(dim=1)).clamp(min=1e-12)
    return torch.where((a.norm(dim=1) > 1e-6) & (b.norm(dim=1) > 1e-6), (a * b).sum(1) / den, torch.zeros(len(a)))


def test_speaking_mouths_follow_the_audio_and_others_do_not(clips: SpeakerClips) -> None:
    _, mouth = draw_faces(clips.params, 48, torch.Generator().manual_seed(0))
    area = mouth.view(60, 8, -1).sum(2)  # drawn mouth area per frame (pixels)
    rms = _per_frame(clips.waves, 8).square().mean(2).sqrt()  # audio loudness per frame
    r = _corr(area, rms)
    kinds = clips.kinds
    assert r[kinds == KINDS.index("speaking")].min() > 0.8
    desync = r[kinds == KINDS.index("desync")]
    assert desync.max() < 0.5 and desync.mean().abs() < 0.25  # no positive sync (anti-sync is allowed)
    for still in ("still", "silent"):
        a = area[kinds == KINDS.index(still)]
        assert (a.std(1) < 0.01 * a.mean(1)).all()  # the mouth does not move (the head jitters by subpixels)
    a = area[kinds == KINDS.index("speaking")]
    assert (a.std(1) > 0.2 * a.mean(1)).all()
    # the distractor: in some "still" clips the eyes, not the mouth, move with the voice
    eyes = clips.params["eye_open"].view(60, 8)
    synced = clips.eye_sync
    assert synced.any() and (kinds[synced] == KINDS.index("still")).all()
    assert _corr(1 - eyes[synced], rms[synced]).min() > 0.8
    loud = rms > 0.02
    assert (loud[kinds == KINDS.index("silent")] == 0).all()
    speaking = kinds == KINDS.index("speaking")
    assert (clips.frame_labels[speaking][loud[speaking]] == 1).all()  # every voiced frame is labelled speaking


# --- audio features -----------------------------------------------------------------------------


def _mel_reference(n_freqs: int, n_mels: int, rate: int) -> np.ndarray:
    """Loop version of the HTK triangular filterbank, from the definition."""
    to_mel = lambda f: 2595 * math.log10(1 + f / 700)  # noqa: E731
    to_hz = lambda m: 700 * (10 ** (m / 2595) - 1)  # noqa: E731
    pts = [to_hz(to_mel(rate / 2) * i / (n_mels + 1)) for i in range(n_mels + 2)]
    fb = np.zeros((n_freqs, n_mels))
    for k in range(n_freqs):
        f = k * (rate / 2) / (n_freqs - 1)
        for m in range(n_mels):
            lo, c, hi = pts[m], pts[m + 1], pts[m + 2]
            if lo <= f <= c:
                fb[k, m] = (f - lo) / (c - lo)
            elif c < f <= hi:
                fb[k, m] = (hi - f) / (hi - c)
    return fb


def test_mel_filterbank_against_the_definition() -> None:
    fb = mel_filterbank(257, 10, 16000)
    assert fb.shape == (257, 10)
    np.testing.assert_allclose(fb.numpy(), _mel_reference(257, 10, 16000), atol=1e-6)


@pytest.mark.parametrize("band", [3, 12, 25])
def test_a_sine_lands_in_its_mel_bin(band: int) -> None:
    # centre of mel band `band` of 40 on 0..8000 Hz
    mels = np.linspace(0, 2595 * math.log10(1 + 8000 / 700), 42)
    centre = 700 * (10 ** (mels[band + 1] / 2595) - 1)
    t = torch.arange(5120, dtype=torch.float64) / 16000
    wave = (0.5 * torch.sin(2 * math.pi * centre * t)).float()[None]
    m = log_mel(wave)
    assert m.shape == (1, 40, 32)
    assert int(m[0].mean(1).argmax()) == band


def test_silence_gives_a_zero_audio_embedding() -> None:
    model = ASDModel(ASDConfig(**SMALL))
    mel = model.mel(torch.zeros(2, 2560))
    assert torch.equal(mel, torch.zeros(2, 40, 16))
    assert torch.equal(model.audio(mel, 4), torch.zeros(2, 64, 4))
    assert model.audio(model.mel(0.1 * torch.randn(2, 2560)), 4).abs().sum() > 0


def test_log_mel_of_silence_and_bad_input() -> None:
    m = log_mel(torch.zeros(2, 1280))
    assert m.shape == (2, 40, 8)
    torch.testing.assert_close(m, torch.full_like(m, math.log(LOG_EPS)))
    with pytest.raises(InputError, match="float tensor"):
        log_mel(torch.zeros(1280))


# --- importance -------------------------------------------------------------------------------


def test_modality_importance_by_hand() -> None:
    s = torch.tensor([[0.1, 0.2, 0.3, 0.9, 0.5], [1.0, 1.0, 0.4, 0.0, 0.2]])
    imp = modality_importance(s, {"audio": 3, "face": 2})
    torch.testing.assert_close(imp["audio"], torch.tensor([0.2, 0.8]))
    torch.testing.assert_close(imp["face"], torch.tensor([0.7, 0.1]))
    by_class = importance_by_class(imp, torch.tensor([1, 0]))
    assert by_class["speaking"] == pytest.approx({"audio": 0.2, "face": 0.7})
    assert by_class["not_speaking"] == pytest.approx({"audio": 0.8, "face": 0.1})
    with pytest.raises(InputError, match="do not split"):
        modality_importance(s, {"audio": 2, "face": 2})


def test_model_output_shapes_and_importance_slices() -> None:
    model = ASDModel(ASDConfig(**SMALL)).eval()
    frames, wave = torch.randn(3, 4, 3, 32, 32), 0.1 * torch.randn(3, 4 * 640)
    out = model(frames, wave)
    assert out.logits.shape == (3, 2) and out.frame_logits.shape == (3, 4, 2)
    assert out.heatmap.shape == (3, 4, 4, 4) and out.heatmap.min() >= 0 and out.heatmap.max() <= 1
    assert out.se_weights.shape == (3, 64 + 64) and out.face_weights.shape == (3, 64)
    torch.testing.assert_close(out.importances["se_mean"]["audio"], out.se_weights[:, :64].mean(1))
    torch.testing.assert_close(out.importances["se_mean"]["face"], out.se_weights[:, 64:].mean(1))
    assert out.importance is out.importances["removal"]  # the default definition
    torch.testing.assert_close(out.score, out.logits[:, 1] - out.logits[:, 0])
    assert model.explain(frames, wave).heatmap.shape == (3, 4, 32, 32)


def test_audio_dropout_silences_whole_clips_in_training_only() -> None:
    model = ASDModel(ASDConfig(**SMALL, audio_dropout=0.5))
    seen: list[Tensor] = []
    model.mel.register_forward_pre_hook(lambda module, args: seen.append(args[0]))  # the waveform the model hears
    wave = 0.1 * torch.randn(64, 2560) + 0.5
    frames = torch.randn(64, 4, 3, 32, 32)
    torch.manual_seed(0)
    model.train()(frames, wave)
    heard = seen[0]  # (the removal importance then hears one silent clip: the absent audio)
    silent = (heard == 0).all(1)
    assert 10 < int(silent.sum()) < 54  # about half of the 64 clips
    assert torch.equal(heard[~silent], wave[~silent])  # the others are untouched
    seen.clear()
    model.eval()(frames, wave)
    assert torch.equal(seen[0], wave)  # never at evaluation
    with pytest.raises(ConfigError, match="audio_dropout"):
        ASDConfig(audio_dropout=1.0)


def test_fusion_bias_option() -> None:
    with_bias = ASDModel(ASDConfig(**SMALL, fusion_bias=True)).fusion_se.excite
    assert with_bias[0].bias is not None and with_bias[2].bias is not None
    assert ASDModel(ASDConfig(**SMALL)).fusion_se.excite[0].bias is None


def test_gate_l1_adds_the_mean_fusion_weight() -> None:
    from dataclasses import replace

    model = ASDModel(ASDConfig(**SMALL)).eval()
    out = model(torch.randn(2, 4, 3, 32, 32), 0.1 * torch.randn(2, 2560))
    y, fy = torch.tensor([1, 0]), torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]])
    plain = model.loss(out, y, fy)
    model.config = replace(model.config, gate_l1=0.5)
    torch.testing.assert_close(model.loss(out, y, fy), plain + 0.5 * out.se_weights.mean())
    with pytest.raises(ConfigError, match="gate_l1"):
        ASDConfig(gate_l1=-1.0)


@pytest.mark.parametrize(
    ("frames", "wave", "kw", "message"),
    [
        ((2, 5, 3, 32, 32), (2, 2560), {}, "clips of 4 frames"),
        ((2, 4, 1, 32, 32), (2, 2560), {}, "3 channel"),
        ((2, 3, 32, 32), (2, 2560), {}, "rank 4"),
        ((2, 4, 3, 32, 32), (2, 2000), {}, r"expected \(N, samples\) = \(2, 2560\)"),
        ((2, 4, 3, 32, 32), (2560,), {}, "float waveforms"),
        ((2, 4, 3, 32, 32), (2, 2560), {"sample_rate": 44100}, "16000 Hz audio, got 44100 Hz"),
    ],
)
def test_bad_inputs_raise_clear_errors(frames: tuple[int, ...], wave: tuple[int, ...], kw: dict, message: str) -> None:
    model = ASDModel(ASDConfig(**SMALL))
    with pytest.raises(InputError, match=message):
        model(torch.randn(*frames), torch.randn(*wave), **kw)


# --- the silence check on a model constructed so that it must hold (or must not) ---------------


class _Loudness(nn.Module):
    """Stand-in audio encoder: every channel holds ReLU(mean normalized log-mel over the mel axis - 0.001),
    pooled to T; silence (zeros, normalized log-mel 0) gives exactly 0."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, mel: Tensor, frames: int) -> Tensor:
        level = torch.relu(mel.mean(1) - 1e-3)  # (N, A)
        return nn.functional.adaptive_avg_pool1d(level[:, None], frames).expand(-1, self.dim, -1)


def _constructed(sign: float) -> ASDModel:
    """Fusion SE with one hidden unit reading the mean audio embedding; audio gates get ``sign * 5`` of it,
    face gates 0: s_audio = sigmoid(sign * 5 * z_audio), s_face = 0.5."""
    model = ASDModel(ASDConfig(frames=8, audio_dim=16, fusion_reduction=8, importance="se_mean")).eval()
    model.audio = _Loudness(16)
    w1, w2 = model.fusion_se.excite[0].weight, model.fusion_se.excite[2].weight  # (10, 80), (80, 10)
    with torch.no_grad():
        w1.zero_()
        w1[0, :16] = 1 / 16
        w2.zero_()
        w2[:16, 0] = sign * 5
    return model


def test_silence_check_on_a_constructed_model(clips: SpeakerClips) -> None:
    data = torch.utils.data.Subset(clips, range(12))
    # by hand: z_audio = mean over time of the stand-in's level; s_audio = sigmoid(5 z_audio) with sound, 0.5 with silence
    mel = (log_mel(clips.waves[:12]) - math.log(LOG_EPS)) / AUDIO_SCALE
    z = torch.relu(mel.mean(1) - 1e-3).mean(1)
    expected = torch.sigmoid(5 * z).mean().item()
    m = evaluate_asd(_constructed(+1.0), data, batch_size=6)["silence_check"]
    assert m["audio_importance"] == pytest.approx(expected, abs=1e-5)
    assert m["audio_importance_silent"] == pytest.approx(0.5, abs=1e-6)
    assert m["face_importance"] == pytest.approx(0.5) and m["face_importance_silent"] == pytest.approx(0.5)
    assert m["audio_importance_falls"] is True
    flipped = evaluate_asd(_constructed(-1.0), data, batch_size=6)["silence_check"]
    assert flipped["audio_importance"] == pytest.approx(torch.sigmoid(-5 * z).mean().item(), abs=1e-5)
    assert flipped["audio_importance_falls"] is False  # the check can fail


def test_removal_importance_is_the_effect_of_removing_each_modality() -> None:
    torch.manual_seed(0)
    model = ASDModel(ASDConfig(**SMALL)).eval()
    frames, wave = torch.randn(3, 4, 3, 32, 32), 0.1 * torch.randn(3, 2560) + 0.2
    silence, blank = torch.zeros_like(wave), torch.zeros_like(frames)

    def prob(f: Tensor, w: Tensor) -> Tensor:
        return model(f, w).logits.softmax(1)[:, 1]

    with torch.no_grad():
        out = model(frames, wave)
        full = prob(frames, wave)
        # |p(speaking) - p(speaking) with that modality's input removed|, by hand through the whole model
        torch.testing.assert_close(out.importance["audio"], (full - prob(frames, silence)).abs())
        torch.testing.assert_close(out.importance["face"], (full - prob(blank, wave)).abs())
        assert (out.importance["audio"] > 0).all() and (out.importance["face"] > 0).all()
        # a modality that is already absent has nothing to remove
        assert model(frames, silence).importance["audio"].abs().max() < 1e-6
        assert model(blank, wave).importance["face"].abs().max() < 1e-6
    # in training the removal passes leave the normalization statistics alone: one update per forward
    model.train()
    bn = model.temporal[1]
    before = int(bn.num_batches_tracked)
    model(frames, wave)
    assert int(bn.num_batches_tracked) == before + 1 and model.training and bn.training
    with pytest.raises(ConfigError, match="importance must be one of removal, se_mean"):
        ASDConfig(importance="gradient")


class _FixedPeak(nn.Module):
    """A stand-in model whose every frame map peaks at pixel (x, y) of the input; scores are 0."""

    sizes = {"audio": 1, "face": 1}

    def __init__(self, x: int, y: int) -> None:
        super().__init__()
        self.x, self.y = x, y
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, frames: Tensor, wave: Tensor):  # type: ignore[no-untyped-def]
        from selfcam.asd import ASDOutput

        n, t, _, h, w = frames.shape
        heat = torch.zeros(n, t, h, w)
        heat[:, :, self.y, self.x] = 1.0
        half = torch.full((n,), 0.5)
        return ASDOutput(torch.zeros(n, 2), torch.zeros(n, t, 2), heat, torch.zeros(n, 2), torch.zeros(n, 1),
                         torch.zeros(n, 1, dtype=torch.bool), {"audio": half, "face": half})  # fmt: skip


def test_pointing_game_plumbing_against_the_boxes(clips: SpeakerClips) -> None:
    from selfcam.asd import predict_asd

    b = clips.mouth_boxes
    x, y = 24, int(b[..., 3].float().median())  # on the lower edge of about half the boxes
    p = predict_asd(_FixedPeak(x, y), clips, batch_size=7)  # type: ignore[arg-type]
    inside = (b[..., 0] <= x) & (x < b[..., 2]) & (b[..., 1] <= y) & (y < b[..., 3])
    assert inside.any() and not inside.all()
    assert torch.equal(p["pointing"], inside.float())
    tol = round(15 * 48 / 224)  # 3 px: distance from (x, y) to the box
    dx = (b[..., 0] - x).clamp(min=0) + (x - (b[..., 2] - 1)).clamp(min=0)
    dy = (b[..., 1] - y).clamp(min=0) + (y - (b[..., 3] - 1)).clamp(min=0)
    assert torch.equal(p["pointing_tol"], (dx**2 + dy**2 <= tol**2).float())


def test_evaluate_metrics_by_hand_on_a_stub(clips: SpeakerClips) -> None:
    """A model whose frame score is the frame label (perfect) except where told: mAP, accuracy, pointing."""
    from selfcam.asd import _scores

    p = {
        "score": torch.tensor([2.0, -1.0, 0.5]), "labels": torch.tensor([1, 0, 0]),
        "frame_score": torch.tensor([[1.0, 2.0], [-1.0, 3.0], [-2.0, -2.0]]), "frame_labels": torch.tensor([[1, 1], [0, 0], [0, 0]]),
        "pointing": torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]]),
        "pointing_tol": torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]]),
    }  # fmt: skip
    s = _scores(p)
    # frame scores sorted: 3 (neg), 2 (pos), 1 (pos), ... -> precision at the two positives 1/2, 2/3
    assert s["mAP"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert s["clip_AP"] == pytest.approx(1.0)
    assert s["frame_accuracy"] == pytest.approx(5 / 6) and s["clip_accuracy"] == pytest.approx(2 / 3)
    assert s["mouth_pointing_game"] == pytest.approx(0.5)  # speaking frames of speaking clips only
    assert s["mouth_pointing_game_15px"] == pytest.approx(1.0)


# --- training, checkpoints, the demo ------------------------------------------------------------


def test_fit_runs_and_checkpoint_round_trip(tmp_path: Path) -> None:
    data = SpeakerClips("train", 16, frames=4, size=32, seed=1)
    model = ASDModel(ASDConfig(**SMALL))
    history = fit(model, data, data, TrainConfig(epochs=1, batch_size=8, seed=0), tmp_path / "run", progress=False)
    assert len(history) == 1 and {"train_loss", "val_loss", "val_acc"} <= history[0].keys()
    loaded, doc = load_checkpoint(tmp_path / "run")
    assert doc["task"] == "asd" and doc["model"] == model.config and doc["format_version"] == 2
    assert doc["data"]["name"] == "speaker-clips" and doc["data"]["frames"] == 4 and doc["data"]["sample_rate"] == 16000
    frames, wave = torch.stack([data[i][0] for i in range(4)]), data.waves[:4]
    with torch.no_grad():
        torch.testing.assert_close(loaded(frames, wave).logits, model.eval()(frames, wave).logits)
    # the importance checks on this (small, briefly) trained model: the default definition falls under both
    m = evaluate_asd(model, data, batch_size=8)
    assert m["silence_check"]["definition"] == m["blank_face_check"]["definition"] == "removal"
    assert m["silence_check"]["audio_importance_falls"] is True and m["silence_check"]["audio_importance_silent"] < 1e-6
    assert m["blank_face_check"]["face_importance_falls"] is True and m["blank_face_check"]["face_importance_blank"] < 1e-6
    paper = m["se_mean_checks"]
    assert paper["silence_check"]["definition"] == "se_mean" and set(paper) == {"modality_importance", "silence_check", "blank_face_check"}
    assert {"face_importance", "face_importance_blank", "face_importance_falls"} <= paper["blank_face_check"].keys()
    raw = json.loads((tmp_path / "run" / "config.json").read_text())
    (tmp_path / "run" / "config.json").write_text(json.dumps({**raw, "model": {**raw["model"], "frames": 0}}))
    with pytest.raises(CheckpointError, match="config.json.*frames must be an integer >= 1"):
        load_checkpoint(tmp_path / "run")


def test_asd_runs_of_the_format_before_tasks_still_load(tmp_path: Path) -> None:
    """selfcam 0.1 before format 2 wrote ASD runs as {"kind": "asd", "asd": CONFIG}: they load as they are."""
    model = ASDModel(ASDConfig(**SMALL)).eval()
    save_checkpoint(model, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({"selfcam_version": "0.1.0", "kind": "asd", "asd": raw["model"]}))
    loaded, doc = load_checkpoint(tmp_path)
    assert doc["task"] == "asd" and isinstance(loaded, ASDModel) and loaded.config == model.config


# --- the map loss on the mouth boxes ----------------------------------------------------------


def test_map_loss_is_the_outside_share_of_each_speaking_frame(clips: SpeakerClips) -> None:
    """The asd map loss by hand: over the speaking frames of speaking clips (of the flagged clips), one minus
    the share of the frame's upsampled map inside its mouth box; silent frames and clips do not count."""
    from selfcam.heads import upsample
    from selfcam.tasks import get_task
    from selfcam.train import SelfcamModule

    torch.manual_seed(0)
    model = ASDModel(ASDConfig(frames=8, backbone_kwargs={"stem_stride": 2})).eval()
    batch = tuple(torch.stack([clips[i][k] for i in range(16)]) for k in range(5))
    cells = get_task("asd").map_cells(model, (48, 48))
    assert cells == model.face.cell_grid((48, 48))
    module = SelfcamModule(model, TrainConfig(map_loss_weight=1.0), map_cells=cells)
    module.log = lambda *a, **k: None  # type: ignore[method-assign]  # no trainer to log to
    with torch.no_grad():
        out = model(batch[0], batch[1])
    speaking = (batch[3] == 1) & (batch[2] == 1)[:, None]
    assert 0 < speaking.sum() < speaking.numel() and (batch[3][batch[2] == 0] == 0).all()

    def by_hand(rows: Tensor) -> Tensor:
        shares = []
        for n, t in rows.nonzero().tolist():
            up = upsample(out.heatmap[n, t][None], (48, 48), "bilinear", cells)[0]
            inside = box_mask(batch[4][n, t][None], (48, 48))[0]
            shares.append(1 - up[inside].sum() / up.sum())
        return torch.stack(shares).mean()

    torch.testing.assert_close(module._map_loss(out, batch, batch[2], None, "val"), by_hand(speaking))
    flags = torch.arange(16) % 3 == 0
    torch.testing.assert_close(module._map_loss(out, batch, batch[2], flags, "train"), by_hand(speaking & flags[:, None]))
    quiet = tuple(b[batch[2] == 0] for b in batch)  # clips nobody speaks in: nothing to supervise, a 0 in the graph
    assert module._map_loss(model(quiet[0], quiet[1]), quiet, quiet[2], None, "val").item() == 0


def test_fit_with_the_mouth_map_loss_and_its_errors(tmp_path: Path) -> None:
    from torch.utils.data import TensorDataset

    data = SpeakerClips("train", 16, frames=4, size=32, seed=1)
    cfg = TrainConfig(epochs=1, batch_size=8, seed=0, map_loss_weight=0.3, mask_fraction=0.5)
    history = fit(ASDModel(ASDConfig(**SMALL)), data, data, cfg, tmp_path / "run", progress=False)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"]["masked_items"] == 8
    assert 0 <= history[-1]["train_map_loss"] <= 1 and 0 <= history[-1]["val_map_loss"] <= 1
    without = TensorDataset(*(torch.stack([data[i][k] for i in range(8)]) for k in range(4)))  # no mouth boxes
    with pytest.raises(ConfigError, match=r"or mouth boxes \(speaker-clips\); TensorDataset has none"):
        fit(ASDModel(ASDConfig(**SMALL)), without, None, cfg, tmp_path / "r2", progress=False)
    with pytest.raises(ConfigError, match="the asd task supervises self only"):
        fit(ASDModel(ASDConfig(**SMALL)), data, None, TrainConfig(epochs=1, map_loss_weight=0.3, map_loss_map="class"), tmp_path / "r3", progress=False)
