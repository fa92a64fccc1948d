"""Map alignment (issue 16 item 1): where a backbone centres its cells, and every map upsampled onto them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selfcam import create_model
from selfcam.asd import ASDConfig, ASDModel
from selfcam.backbones import Backbone, create_backbone
from selfcam.cells import CellGrid, measure_cells, resample
from selfcam.heads import PlainHead, upsample
from selfcam.model import ModelConfig, SelfExplainer
from selfcam.posthoc import posthoc_map
from selfcam.video import create_video_model


def _hand_built() -> Backbone:
    """Cells whose centres are known by hand.

    Layer 1, 3x3 stride 2 padding 1: cell ``a`` sees pixels ``2a-1 .. 2a+1``, centre ``2a``.
    Layer 2, kernel 5 (rows) x 3 (columns), stride 2, padding (1, 1): row ``i`` sees layer-1 rows
    ``2i-1 .. 2i+3`` (centre ``2i+1``), i.e. pixels ``4i+2``; column ``j`` sees layer-1 columns
    ``2j-1 .. 2j+1``, i.e. pixels ``4j``. So cell ``(i, j)`` is centred on pixel ``(4i + 2, 4j)``.
    """
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(1, 4, 3, 2, 1), nn.ReLU())
    last = nn.Sequential(nn.Conv2d(4, 8, (5, 3), 2, (1, 1)), nn.ReLU())
    return Backbone(trunk, last, 8, 1)


def test_impulse_response_finds_the_hand_computed_centres() -> None:
    bb = _hand_built()
    assert bb.cell_grid((32, 32)) == CellGrid((4.0, 4.0), (2.0, 0.0))
    # an impulse at pixel (4i + 2, 4j) reaches cell (i, j) through the kernels' centre taps
    x = torch.zeros(1, 1, 32, 32, requires_grad=True)
    f = bb(x)
    (g,) = torch.autograd.grad(f[0, :, 3, 5].sum(), x)
    rows, cols = torch.nonzero(g[0, 0].abs() > 0, as_tuple=True)
    assert (rows.min() + rows.max()) / 2 == 4 * 3 + 2 and (cols.min() + cols.max()) / 2 == 4 * 5


@pytest.mark.parametrize(("kwargs", "stride"), [({"stem_stride": 1}, 4), ({"stem_stride": 2}, 8), ({"stem_stride": 1, "output_stride": 2}, 2)])
def test_cifar_resnets_centre_cell_j_on_pixel_stride_j(kwargs: dict, stride: int) -> None:
    # stride-2 3x3 convolutions with padding 1 centre cell j on 2j: no half-pixel shift
    assert create_backbone("resnet8", 3, **kwargs).cell_grid((64, 64)) == CellGrid((stride, stride), (0.0, 0.0))


def test_max_pooling_centres_cells_where_bilinear_puts_them() -> None:
    # 2x2 pooling with stride 2, twice: cell j covers pixels 4j .. 4j+3, centre 4j + 1.5 = the half-pixel rule
    bb = Backbone(nn.Sequential(nn.Conv2d(1, 4, 1), nn.MaxPool2d(2)), nn.MaxPool2d(2), 4, 1)
    cells = bb.cell_grid((32, 32))
    assert cells == CellGrid.half_pixel((8, 8), (32, 32)) == CellGrid((4.0, 4.0), (1.5, 1.5))
    maps = torch.rand(3, 8, 8)
    assert torch.allclose(upsample(maps, 32, cells=cells), upsample(maps, 32), atol=1e-6)


def test_cells_seeing_the_whole_image_have_no_centre() -> None:
    class Global(nn.Module):  # every cell depends on every pixel (a squeeze inside the network)
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = F.avg_pool2d(x, 4)
            return y * x.mean(dim=(2, 3), keepdim=True)

    assert measure_cells(Global(), 1, (16, 16), max_side=64) is None


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_upsample_puts_each_cell_on_its_centre(mode: str) -> None:
    cells = CellGrid((4.0, 4.0), (2.0, 0.0))
    for i, j in [(1, 1), (3, 5), (6, 2)]:  # away from the border, where the end cells are extended
        one = torch.zeros(1, 8, 8)
        one[0, i, j] = 1
        up = upsample(one, (32, 32), mode, cells)
        assert up[0].argmax() == (4 * i + 2) * 32 + 4 * j
    # without cells: F.interpolate's half-pixel rule, exactly
    maps = torch.rand(2, 8, 6, dtype=torch.float64)
    ref = F.interpolate(maps[:, None], size=(32, 24), mode=mode, align_corners=False)[:, 0]
    assert torch.allclose(resample(maps, (32, 24), mode), ref, atol=1e-12)


def test_explain_uses_the_backbone_cells_also_without_gradients() -> None:
    bb = _hand_built()
    model = SelfExplainer(bb, PlainHead(8, 3), ModelConfig("plain", "hand", 3, 1)).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.inference_mode():
        out = model.explain(x)
        low = model(x).heatmap
    assert torch.allclose(out.heatmap, upsample(low, 32, cells=CellGrid((4.0, 4.0), (2.0, 0.0))), atol=1e-6)
    assert model.training is False and all(p.grad is None for p in model.parameters())


def test_self_cam_and_gradcam_are_upsampled_alike() -> None:
    # on a plain (GAP + linear) model Grad-CAM's weights are the classifier's over h w: the same map as CAM,
    # and so the same picture once both take the one path to image size
    torch.manual_seed(0)
    model = create_model("plain", "resnet8", num_classes=3, in_chans=1).eval()
    x = torch.randn(2, 1, 32, 32)
    target = model(x).logits.argmax(1)
    own = model.explain(x).heatmap
    for method in ("cam", "gradcam"):
        assert torch.allclose(posthoc_map(model, x, method, target), own, atol=1e-4), method
    # a target layer of the user's: its cells are measured through a hook (the stage before the last: stride 2)
    layer = model.backbone.trunk[2]
    maps = posthoc_map(model, x, "gradcam", target, target_layer=layer)
    assert maps.shape == (2, 32, 32) and layer.__dict__["_cell_grids"][(32, 32)] == CellGrid((2.0, 2.0), (0.0, 0.0))


def test_clip_and_asd_maps_use_the_frame_backbone_cells() -> None:
    torch.manual_seed(0)
    video = create_video_model("resnet8", 3, 1, frames=2, backbone_kwargs={"stem_stride": 2}).eval()
    clip = torch.randn(1, 2, 1, 32, 32)
    cells = CellGrid((8.0, 8.0), (0.0, 0.0))
    assert video.backbone.cell_grid((32, 32)) == cells
    with torch.no_grad():
        low, up = video(clip).heatmap, video.explain(clip).heatmap
    assert torch.allclose(up[0], upsample(low[0], 32, cells=cells), atol=1e-6)
    grad = posthoc_map(video, clip, "gradcam")
    assert grad.shape == (1, 2, 32, 32)
    asd = ASDModel(ASDConfig(frames=2, backbone_kwargs={"stem_stride": 2})).eval()
    frames, wave = torch.randn(1, 2, 3, 32, 32), torch.randn(1, 2 * 640)
    with torch.no_grad():
        low, up = asd(frames, wave).heatmap, asd.explain(frames, wave).heatmap
    assert torch.allclose(up[0], upsample(low[0], 32, cells=cells), atol=1e-6)
