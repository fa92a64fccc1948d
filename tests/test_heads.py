"""Heads against hand-computed values and reference loops (DESIGN.md section 2)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from selfcam.heads import ABNHead, LFIHead, PlainHead, SEHead, minmax, se_select, upsample
from selfcam.model import create_model

METHODS = ["plain", "lfi", "lfi-light", "se", "abn"]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# --- min-max -------------------------------------------------------------------


def test_minmax_hand_values() -> None:
    t = torch.tensor([[[1.0, 3.0], [5.0, 2.0]]])
    assert torch.equal(minmax(t), torch.tensor([[[0.0, 0.5], [1.0, 0.25]]]))


def test_minmax_constant_and_all_zero_channels() -> None:
    f = torch.zeros(1, 3, 2, 2)
    f[0, 1] = 7.0  # constant non-zero channel -> 1
    f[0, 2] = torch.tensor([[0.0, 2.0], [4.0, 0.0]])
    out = minmax(f)
    assert torch.equal(out[0, 0], torch.zeros(2, 2))  # all-zero -> 0
    assert torch.equal(out[0, 1], torch.ones(2, 2))
    assert torch.equal(out[0, 2], torch.tensor([[0.0, 0.5], [1.0, 0.0]]))
    assert torch.isfinite(out).all()


def test_minmax_keeps_gradients_finite_on_constant_input() -> None:
    f = torch.zeros(2, 4, 3, 3, requires_grad=True)
    minmax(f).sum().backward()
    assert torch.isfinite(f.grad).all()


def test_upsample_shape_range_and_errors() -> None:
    m = torch.rand(2, 4, 4)
    for mode in ("bilinear", "bicubic"):
        up = upsample(m, (16, 12), mode)
        assert up.shape == (2, 16, 12)
        assert up.min() >= 0 and up.max() <= 1
        assert torch.allclose(up.flatten(1).amax(1), torch.ones(2))
    with pytest.raises(ValueError, match="N, h, w"):
        upsample(torch.rand(2, 1, 4, 4), 8)


# --- every head: shape, range, gradients ----------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_output_shape_range_and_gradients_reach_backbone(method: str) -> None:
    model = create_model(method, "resnet8", num_classes=5, in_chans=1)
    x = torch.randn(3, 1, 32, 32)
    out = model(x)
    assert out.logits.shape == (3, 5)
    assert out.heatmap.shape == (3, 8, 8)
    assert out.heatmap.min() >= 0 and out.heatmap.max() <= 1
    assert torch.isfinite(out.heatmap).all()
    model.loss(out, torch.tensor([0, 1, 2])).backward()
    stem = model.backbone.trunk[0][0].weight
    assert stem.grad is not None and stem.grad.abs().sum() > 0
    explained = model.explain(x)
    assert explained.heatmap.shape == (3, 32, 32)


@pytest.mark.parametrize("method", METHODS)
def test_a_few_steps_lower_the_loss(method: str) -> None:
    model = create_model(method, "resnet8", num_classes=3, in_chans=1)
    x = torch.randn(16, 1, 16, 16)
    y = torch.arange(16) % 3
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model.loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.7


# --- plain: classic CAM -----------------------------------------------------------


def test_plain_cam_equals_hand_computation() -> None:
    head = PlainHead(2, 2)
    with torch.no_grad():
        head.fc.weight.copy_(torch.tensor([[1.0, -1.0], [0.5, 2.0]]))
        head.fc.bias.zero_()
    f = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # (1, 2, 1, 2)
    out = head(f, torch.zeros(1, 1, 4, 4))
    # logits: GAP = (0.5, 0.5) -> class 0: 0.0, class 1: 1.25 -> predicted 1
    assert torch.allclose(out.logits, torch.tensor([[0.0, 1.25]]))
    # CAM of class 1: 0.5 * F0 + 2 * F1 = [0.5, 2] -> min-max [0, 1]
    assert torch.allclose(out.heatmap, torch.tensor([[[0.0, 1.0]]]))


# --- LFI-CAM ----------------------------------------------------------------------


def _reference_lfi(head: LFIHead, feats: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DESIGN.md 2.1 step by step, one channel at a time (as the authors' release does)."""
    n, k, h, w = feats.shape
    guide = F.interpolate(image.mean(1, keepdim=True), size=(h, w), mode="bilinear", align_corners=False)
    scaled = torch.zeros_like(feats)
    for i in range(n):
        for c in range(k):
            ch = feats[i, c]
            span = ch.max() - ch.min()
            scaled[i, c] = (ch - ch.min()) / span if span > 0 else (ch != 0).float()
    weights = torch.softmax(head.fin(scaled * guide).mean(dim=(2, 3)), dim=1)
    att = torch.zeros(n, h, w)
    for i in range(n):
        for c in range(k):
            att[i] += weights[i, c] * feats[i, c]
    att = att.clamp(min=0)
    for i in range(n):
        att[i] = (att[i] - att[i].min()) / (att[i].max() - att[i].min())
    return weights, att


@pytest.mark.parametrize("fin", ["full", "light"])
def test_batched_fin_equals_per_channel_loop(fin: str) -> None:
    head = LFIHead(6, 4, fin=fin).eval()
    feats = torch.randn(2, 6, 5, 5).relu()
    feats[0, 3] = 2.0  # a constant channel
    image = torch.randn(2, 3, 20, 20)
    out = head(feats, image)
    w_ref, a_ref = _reference_lfi(head, feats, image)
    assert torch.allclose(out.channel_weights, w_ref, atol=1e-6)
    assert torch.allclose(out.channel_weights.sum(1), torch.ones(2))
    assert torch.allclose(out.heatmap, a_ref, atol=1e-6)


def test_lfi_with_zero_attention_equals_plain_gap_fc() -> None:
    lfi = LFIHead(4, 3).eval()
    plain = PlainHead(4, 3)
    plain.fc.load_state_dict(lfi.fc.state_dict())
    feats = -torch.rand(2, 4, 3, 3)  # all negative: ReLU(sum w F) = 0 -> A = 0
    out = lfi(feats, torch.randn(2, 1, 12, 12))
    assert torch.equal(out.heatmap, torch.zeros(2, 3, 3))
    assert torch.allclose(out.logits, plain(feats, torch.zeros(2, 1, 12, 12)).logits)


def test_lfi_attention_reweights_features() -> None:
    """F' = (1 + A) * F: logits equal GAP + FC of the re-weighted map."""
    lfi = LFIHead(4, 3).eval()
    feats = torch.rand(1, 4, 3, 3)
    out = lfi(feats, torch.randn(1, 1, 9, 9))
    expected = lfi.fc(((1 + out.heatmap[:, None]) * feats).mean(dim=(2, 3)))
    assert torch.allclose(out.logits, expected)


def test_fin_parameter_counts_for_resnet50_width() -> None:
    full = sum(p.numel() for p in LFIHead(2048, 1000, fin="full").fin.parameters())
    light = sum(p.numel() for p in LFIHead(2048, 1000, fin="light").fin.parameters())
    assert full == 4 * 2048 * 2048 * 9 + 4 * 2 * 2048  # about 151 M, as DESIGN.md says
    assert light < 0.05 * 25_557_032  # goal: at most 5 % of ResNet-50's parameters


def test_unknown_fin_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown FIN"):
        LFIHead(4, 2, fin="huge")


# --- SE-CAM -----------------------------------------------------------------------


def test_se_selection_on_hand_made_vectors() -> None:
    s = torch.tensor([[0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.9]])
    # mean 0.18, population std 0.24 -> threshold 0.4877: only the last channel
    assert se_select(s).tolist() == [[False] * 9 + [True]]
    s2 = torch.tensor([[0.0, 0.2, 0.4, 0.6, 0.8, 1.0]])
    # mean 0.5, std 0.3416 -> threshold 0.938 at 1.282: channel 5; at factor 0: channels 3, 4, 5
    assert se_select(s2).tolist() == [[False] * 5 + [True]]
    assert se_select(s2, factor=0.0).tolist() == [[False, False, False, True, True, True]]


def test_se_empty_selection_falls_back_to_argmax() -> None:
    s = torch.full((2, 5), 0.5)  # std 0 -> nothing strictly above the mean
    s[1, 2] = 0.5001
    sel = se_select(s, factor=10.0)
    assert sel.sum(1).tolist() == [1, 1]
    assert sel[0, 0] and sel[1, 2]


def test_se_heatmap_equals_hand_computation() -> None:
    head = SEHead(3, 2, reduction=1, factor=-1.0, space="sigmoid")
    with torch.no_grad():  # W1 = W2 = I: s = sigmoid(GAP(F)) = sigmoid(0.5, 1, 3)
        for lin in (head.excite[0], head.excite[2]):
            lin.weight.copy_(torch.eye(3))
    feats = torch.tensor([[[[1.0, 0.0]], [[0.0, 2.0]], [[3.0, 3.0]]]])  # (1, 3, 1, 2)
    out = head(feats, torch.zeros(1, 1, 2, 2))
    s = torch.sigmoid(torch.tensor([0.5, 1.0, 3.0]))
    assert torch.allclose(out.channel_weights[0], s)
    # mean(s) - std(s) = 0.6296: channels 1 and 2 selected
    assert out.selected[0].tolist() == [False, True, True]
    raw = (s[1] * torch.tensor([0.0, 2.0]) + s[2] * torch.tensor([3.0, 3.0])) / 2  # [1.43, 2.59]
    assert torch.allclose(out.heatmap[0, 0], (raw - raw.min()) / (raw.max() - raw.min()))
    assert torch.allclose(out.heatmap[0, 0], torch.tensor([0.0, 1.0]))
    # logits from GAP(F * s)
    assert torch.allclose(out.logits, head.fc((feats * s[None, :, None, None]).mean(dim=(2, 3))))


def test_se_reduction_and_no_bias() -> None:
    head = SEHead(64, 2, reduction=16)
    linears = [m for m in head.excite if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2
    assert [tuple(m.weight.shape) for m in linears] == [(4, 64), (64, 4)]
    assert all(m.bias is None for m in linears)


def test_se_selection_space_saturated_gates() -> None:
    """Saturated gates: the literal rule on s finds nothing above mean + 1.282 std; on logits it does."""
    k = 10
    excitation = torch.tensor([10.0, 10.0, 9.9, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 0.0])
    # with identity excitation weights, the excitation equals GAP(F): use constant channels
    feats = excitation[None, :, None, None].expand(1, k, 2, 2).clone()
    selected = {}
    for space in ("logit", "sigmoid"):
        head = SEHead(k, 2, reduction=1, space=space)
        with torch.no_grad():
            head.excite[0].weight.copy_(torch.eye(k))
            head.excite[2].weight.copy_(torch.eye(k))
        selected[space] = head(feats, torch.zeros(1, 1, 2, 2)).selected[0].tolist()
    # sigmoid: mean 0.855, std 0.146 -> threshold 1.04 > max(s): empty -> arg-max fallback
    assert selected["sigmoid"] == [True] + [False] * 9
    # logit: mean 4.19, std 3.88 -> threshold 9.16: the three open gates
    assert selected["logit"] == [True, True, True] + [False] * 7


def test_se_space_is_validated() -> None:
    with pytest.raises(ValueError, match="selection space"):
        SEHead(8, 2, space="tanh")


# --- ABN --------------------------------------------------------------------------


def test_abn_returns_both_logits_and_both_losses_count() -> None:
    model = create_model("abn", "resnet8", num_classes=4, in_chans=1)
    x, y = torch.randn(2, 1, 32, 32), torch.tensor([1, 3])
    out = model(x)
    assert out.aux_logits is not None and out.aux_logits.shape == (2, 4)
    expected = F.cross_entropy(out.logits, y) + F.cross_entropy(out.aux_logits, y)
    assert torch.allclose(model.loss(out, y), expected)
    # the attention branch gets gradient from the loss
    model.loss(out, y).backward()
    assert model.head.att_logits.weight.grad.abs().sum() > 0


def test_abn_copies_last_stage_and_falls_back_without_one() -> None:
    model = create_model("abn", "resnet8", num_classes=4, in_chans=1)
    assert model.head.uses_pre_features
    assert model.head.att_stage is not model.backbone.last
    head = ABNHead(8, 3)  # no stage to copy: runs its own block on F
    out = head(torch.rand(2, 8, 4, 4), torch.zeros(2, 1, 16, 16))
    assert out.heatmap.shape == (2, 4, 4) and out.aux_logits.shape == (2, 3)


def test_heads_work_on_the_right_device() -> None:
    """No hard-coded device: outputs live where the inputs live (CUDA when present)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for method in METHODS:
        model = create_model(method, "resnet8", num_classes=2, in_chans=1).to(device)
        out = model(torch.randn(2, 1, 16, 16, device=device))
        assert out.heatmap.device.type == device


# --- class-specific maps (issue 15 item 2) -----------------------------------------


def _pooled_by_hand(model, x: torch.Tensor) -> torch.Tensor:
    """What each head's classifier pools, rebuilt from the head's parts (docs/methods.md)."""
    head, method = model.head, model.config.method
    pre, feats = model.backbone.forward_split(x)
    if method == "plain":
        return feats
    if method in ("lfi", "lfi-light"):
        w = head.importance(feats, x)
        att = (w[:, :, None, None] * feats).sum(1).clamp(min=0)
        lo, hi = att.amin(dim=(1, 2), keepdim=True), att.amax(dim=(1, 2), keepdim=True)
        return (1 + ((att - lo) / (hi - lo))[:, None]) * feats
    if method == "se":
        s = torch.sigmoid(head.excite(feats.mean(dim=(2, 3))))
        return feats * s[:, :, None, None]
    m = head.att_map(head.att_conv(head.att_bn(head.att_stage(pre))))
    return (1 + m) * feats


def _class_cam_by_hand(weight: torch.Tensor, pooled: torch.Tensor, target: list[int]) -> torch.Tensor:
    """sum_k W[c, k] G_k, ReLU, (v - min) / (max - min), one image at a time (all-zero after ReLU: zeros)."""
    maps = []
    for g, c in zip(pooled, target):
        raw = torch.zeros(g.shape[1:])
        for k in range(g.shape[0]):
            raw += weight[c, k] * g[k]
        raw = raw.clamp(min=0)
        maps.append((raw - raw.min()) / (raw.max() - raw.min()) if raw.max() > raw.min() else torch.zeros_like(raw))
    return torch.stack(maps)


@pytest.mark.parametrize("method", METHODS)
def test_class_map_equals_hand_computation(method: str) -> None:
    model = create_model(method, "resnet8", num_classes=4, in_chans=1).eval()
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        pooled = _pooled_by_hand(model, x)
        assert model(x).class_heatmap is None  # computed only when asked for
        out = model(x, target="predicted")
        assert torch.allclose(out.features, pooled, atol=1e-5)
        # the classifier pools exactly these features
        assert torch.allclose(out.logits, model.head.fc(pooled.mean(dim=(2, 3))), atol=1e-5)
        pred = out.logits.argmax(1).tolist()
        assert torch.allclose(out.class_heatmap, _class_cam_by_hand(model.head.fc.weight, pooled, pred), atol=1e-5)
        for target in (2, torch.tensor(1), torch.tensor([3, 0, 2])):
            want = [int(target)] * 3 if not isinstance(target, torch.Tensor) or target.dim() == 0 else target.tolist()
            got = model(x, target=target).class_heatmap
            assert torch.allclose(got, _class_cam_by_hand(model.head.fc.weight, pooled, want), atol=1e-5)
        # explain() upsamples it as the other maps, and the paper's map is unchanged by target
        explained = model.explain(x, target=1)
        assert explained.class_heatmap.shape == (3, 32, 32)
        cells = model.backbone.cell_grid((32, 32))
        assert torch.allclose(explained.class_heatmap, upsample(model(x, target=1).class_heatmap, 32, cells=cells))
        assert torch.equal(explained.heatmap, model.explain(x).heatmap)


def test_plain_class_map_is_cam_and_different_classes_give_different_maps() -> None:
    from selfcam.posthoc import posthoc_map

    model = create_model("plain", "resnet8", num_classes=4, in_chans=1).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        out = model.explain(x, target="predicted")
        assert torch.equal(out.class_heatmap, out.heatmap)  # the predicted class: the plain head's own map
        for c in range(4):
            target = torch.full((2,), c)
            assert torch.allclose(model.explain(x, target=c).class_heatmap, posthoc_map(model, x, "cam", target=target))
        assert not torch.allclose(model.explain(x, target=0).class_heatmap, model.explain(x, target=1).class_heatmap)


def test_plain_class_map_hand_values() -> None:
    head = PlainHead(2, 2)
    with torch.no_grad():
        head.fc.weight.copy_(torch.tensor([[1.0, -1.0], [0.5, 2.0]]))
    f = torch.tensor([[[[1.0, 0.0, 3.0]], [[0.0, 1.0, 1.0]]]])  # (1, 2, 1, 3)
    # class 0: F0 - F1 = [1, -1, 2] -> ReLU [1, 0, 2] -> [0.5, 0, 1]; class 1: [0.5, 2, 3.5] -> [0, 0.5, 1]
    assert torch.allclose(head.class_map(f, torch.tensor([0])), torch.tensor([[[0.5, 0.0, 1.0]]]))
    assert torch.allclose(head.class_map(f, torch.tensor([1])), torch.tensor([[[0.0, 0.5, 1.0]]]))


@pytest.mark.parametrize("target", [4, -1, torch.tensor([0, 1, 2]), torch.tensor([0.0, 1.0]), "1", True])
def test_class_map_target_is_checked(target) -> None:
    from selfcam.errors import InputError

    model = create_model("se", "resnet8", num_classes=4, in_chans=1).eval()
    with pytest.raises(InputError, match="target"):
        model.explain(torch.randn(2, 1, 16, 16), target=target)
