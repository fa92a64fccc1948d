"""Video SE-CAM (selfcam.video) against hand-computed values (DESIGN.md 2.2 step 4)."""

from __future__ import annotations

import pytest
import torch

from selfcam.errors import ConfigError, InputError
from selfcam.video import SqueezeExcite, VideoBackbone, VideoSEHead, create_video_model, upsample_clip


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _identity_se(channels: int, **kw: object) -> SqueezeExcite:
    """An SE block with W1 = W2 = I, so e = ReLU(z) and s = sigmoid(ReLU(z))."""
    se = SqueezeExcite(channels, reduction=1, **kw)  # type: ignore[arg-type]
    with torch.no_grad():
        se.excite[0].weight.copy_(torch.eye(channels))
        se.excite[2].weight.copy_(torch.eye(channels))
    return se


def test_clip_se_vector_is_pooled_over_time_and_space() -> None:
    # F (N=1, K=2, T=2, h=1, w=2): channel 0 holds 1, 2 | 3, 6 -> mean 3; channel 1 holds 0, 0 | 0, 8 -> mean 2
    f = torch.tensor([[[[[1.0, 2.0]], [[3.0, 6.0]]], [[[0.0, 0.0]], [[0.0, 8.0]]]]])
    assert f.shape == (1, 2, 2, 1, 2)
    out = _identity_se(2)(f)
    torch.testing.assert_close(out.excitation, torch.tensor([[3.0, 2.0]]))
    s = torch.sigmoid(torch.tensor([[3.0, 2.0]]))
    torch.testing.assert_close(out.weights, s)
    torch.testing.assert_close(out.gated, f * s.view(1, 2, 1, 1, 1))
    # one vector per clip: the SE of a clip equals the SE of its frames laid side by side in one image
    side_by_side = f.permute(0, 1, 3, 2, 4).reshape(1, 2, 1, 4)
    torch.testing.assert_close(_identity_se(2)(side_by_side).weights, s)


def test_per_frame_maps_by_hand() -> None:
    # 3 channels; excitation (ReLU(z)) = 1, 1, 10: only channel 2 passes mean + 1.282 std
    f = torch.zeros(1, 3, 2, 1, 3)
    f[0, 0] = 1.0
    f[0, 1] = 1.0
    f[0, 2, 0, 0] = torch.tensor([0.0, 10.0, 20.0])  # frame 0
    f[0, 2, 1, 0] = torch.tensor([30.0, 0.0, 0.0])  # frame 1; channel 2 mean = 60 / 6 = 10
    se = _identity_se(3)
    out = se(f)
    assert out.selected.tolist() == [[False, False, True]]
    s2 = torch.sigmoid(torch.tensor(10.0))
    # the map is s_2 * F_2 (one selected channel), min-max scaled per frame (s_2 > 0 drops out)
    assert s2 > 0
    expected = torch.tensor([[[[0.0, 0.5, 1.0]], [[1.0, 0.0, 0.0]]]])
    torch.testing.assert_close(se.maps(f, out), expected)
    head = VideoSEHead(3, num_classes=2, reduction=1)
    head.se = se
    torch.testing.assert_close(head(f).heatmap, expected)


def test_se_biases_by_hand() -> None:
    # bias=True (torchvision's and timm's SE): e = W2 ReLU(W1 z + b1) + b2; with W1 = W2 = I,
    # b1 = (-1, 1), b2 = (0.5, -2) and z = (3, -4): ReLU(2, -3) = (2, 0), e = (2.5, -2)
    se = SqueezeExcite(2, reduction=1, bias=True)
    assert [p.shape for p in se.parameters()] == [(2, 2), (2,), (2, 2), (2,)]
    with torch.no_grad():
        se.excite[0].weight.copy_(torch.eye(2))
        se.excite[2].weight.copy_(torch.eye(2))
        se.excite[0].bias.copy_(torch.tensor([-1.0, 1.0]))
        se.excite[2].bias.copy_(torch.tensor([0.5, -2.0]))
    x = torch.tensor([3.0, -4.0]).view(1, 2, 1).expand(1, 2, 5)  # (N, D, T) constant over T
    out = se(x)
    torch.testing.assert_close(out.excitation, torch.tensor([[2.5, -2.0]]))
    torch.testing.assert_close(out.weights, torch.sigmoid(torch.tensor([[2.5, -2.0]])))
    assert [p.shape for p in SqueezeExcite(2, reduction=1).parameters()] == [(2, 2), (2, 2)]  # no biases by default


def test_selection_in_sigmoid_space_falls_back_to_argmax() -> None:
    f = torch.rand(2, 8, 3, 2, 2)
    out = SqueezeExcite(8, reduction=2, space="sigmoid")(f)
    assert out.selected.any(1).all()
    with pytest.raises(ConfigError, match="space"):
        SqueezeExcite(8, space="tanh")


def test_video_model_shapes_ranges_and_gradients() -> None:
    model = create_video_model("resnet8", num_classes=3, frames=4, backbone_kwargs={"stem_stride": 2})
    x = torch.randn(2, 4, 3, 32, 32)
    out = model(x)
    assert out.logits.shape == (2, 3)
    assert out.heatmap.shape == (2, 4, 4, 4)  # T' = T, 32 / 8
    assert out.heatmap.min() >= 0 and out.heatmap.max() <= 1
    assert torch.allclose(out.heatmap.flatten(2).amax(2), torch.ones(2, 4))  # every frame reaches 1
    assert out.channel_weights.shape == (2, 64) and out.selected.shape == (2, 64)
    model.loss(out, torch.tensor([0, 2])).backward()
    assert model.backbone.frame.trunk[0][0].weight.grad.abs().sum() > 0
    assert model.backbone.temporal[0].weight.grad.abs().sum() > 0
    model.eval()
    up = model.explain(x)
    assert up.heatmap.shape == (2, 4, 32, 32)
    torch.testing.assert_close(up.heatmap.flatten(2).amax(2), torch.ones(2, 4))


def test_temporal_layer_mixes_only_neighbouring_frames() -> None:
    bb = VideoBackbone("resnet8", 3, temporal_kernel=3).eval()
    x = torch.randn(1, 6, 3, 16, 16)
    y = x.clone()
    y[:, 0] += 1.0  # change frame 0 only
    with torch.no_grad():
        fx, fy = bb(x), bb(y)
    changed = (fx - fy).abs().flatten(3).amax(3)[0].amax(0)  # per frame
    assert changed[0] > 0 and changed[1] > 0  # frame 0 and its neighbour
    assert (changed[2:] == 0).all()
    with pytest.raises(ConfigError, match="odd"):
        VideoBackbone("resnet8", 3, temporal_kernel=2)


def test_upsample_clip_time_and_space() -> None:
    maps = torch.rand(2, 3, 4, 4)
    up = upsample_clip(maps, (3, 16, 16))
    assert up.shape == (2, 3, 16, 16)
    torch.testing.assert_close(up.flatten(2).amax(2), torch.ones(2, 3))
    torch.testing.assert_close(up.flatten(2).amin(2), torch.zeros(2, 3))
    # a backbone that halves time: frame t of 4 reads the two maps around (t + 0.5) / 2 - 0.5
    two = torch.stack([torch.zeros(4, 4), torch.ones(4, 4)])[None]
    two[0, 0, 0, 0] = 1.0  # so no frame is constant
    assert upsample_clip(two, (4, 4, 4)).shape == (1, 4, 4, 4)
    with pytest.raises(InputError, match="N, T, h, w"):
        upsample_clip(torch.rand(2, 4, 4), (2, 8, 8))


@pytest.mark.parametrize(
    ("shape", "message"),
    [((2, 3, 32, 32), "rank 4"), ((2, 4, 1, 32, 32), "3 channel"), ((2, 5, 3, 32, 32), "clips of 4 frames")],
)
def test_bad_clips_raise_input_error(shape: tuple[int, ...], message: str) -> None:
    model = create_video_model("resnet8", frames=4)
    with pytest.raises(InputError, match=message):
        model(torch.randn(*shape))


def test_non_tensor_and_integer_clips_raise_input_error() -> None:
    model = create_video_model("resnet8")
    with pytest.raises(InputError, match="torch.Tensor"):
        model([[1.0]])  # type: ignore[arg-type]
    with pytest.raises(InputError, match="floating-point"):
        model(torch.zeros(1, 2, 3, 16, 16, dtype=torch.uint8))
    assert model(torch.randn(1, 5, 3, 16, 16)).heatmap.shape[1] == 5  # frames=None: any length
