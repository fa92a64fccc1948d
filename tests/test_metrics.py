"""Explanation metrics: hand-computed values on tiny inputs, then grad-cam / Quantus / scipy as oracles."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from scipy import ndimage, stats
from torch import Tensor, nn

from selfcam.errors import ConfigError, InputError
from selfcam.heads import upsample
from selfcam.metrics import (
    average_drop,
    cascading_randomization,
    check_maps,
    confidence_change,
    deletion_auc,
    deletion_curve,
    dice,
    energy_pointing_game,
    increase_in_confidence,
    insertion_auc,
    insertion_curve,
    iou,
    logits_of,
    make_baseline,
    noisy_linear_imputation,
    pointing_game,
    road,
    spearman,
    stability,
)
from selfcam.model import SelfExplainer, create_model


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """The tiny models here run faster on one thread (and the CI box has two busy cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def sigmoid(v: float) -> float:
    return 1 / (1 + math.exp(-v))


# A 1x2x2 "image" and a linear model with logits [w . x, 0]: p(class 0) = sigmoid(w . x).
W = [1.0, 2.0, 3.0, 4.0]
X = [0.4, 0.3, 0.2, 0.1]  # row-major pixels p0 p1 / p2 p3
MAP = [1.0, 0.5, 0.0, 0.25]  # ranking p0 > p1 > p3 > p2


def linear_model() -> nn.Module:
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([W, [0.0] * 4]))
    return model.eval()


def tiny(x: list[float] = X, m: list[float] = MAP) -> tuple[Tensor, Tensor, Tensor]:
    return torch.tensor(x).view(1, 1, 2, 2), torch.tensor(m).view(1, 2, 2), torch.tensor([0])


def dot(a: list[float], b: list[float]) -> float:
    return sum(u * v for u, v in zip(a, b))


def resnet(in_chans: int = 3) -> SelfExplainer:
    torch.manual_seed(0)
    return create_model("plain", "resnet8", 3, in_chans=in_chans).eval()


class Logits(nn.Module):
    """``x -> logits`` view of a SelfExplainer, for peers that expect a plain classifier."""

    def __init__(self, model: SelfExplainer) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x).logits


def cam(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """Classic CAM of a plain model at input size: the explain function of the sanity check."""
    with torch.no_grad():
        return upsample(model.head.cam(model.forward_features(x), target), tuple(x.shape[-2:]))


# --- input checks ----------------------------------------------------------------------


def test_check_maps_names_the_problem() -> None:
    x, maps, t = torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, 4), torch.tensor([0, 1])
    check_maps(x, maps, t, num_classes=2)
    with pytest.raises(InputError, match="maps shape mismatch"):
        check_maps(x, torch.zeros(2, 4, 5))
    with pytest.raises(InputError, match="NaN or inf values in maps \\(1 of 32\\)"):
        bad = maps.clone()
        bad[1, 2, 2] = float("nan")
        check_maps(x, bad)
    with pytest.raises(InputError, match="NaN or inf values in x"):
        check_maps(torch.full((2, 3, 4, 4), float("inf")), maps)
    with pytest.raises(InputError, match="empty batch"):
        check_maps(torch.zeros(0, 3, 4, 4), torch.zeros(0, 4, 4))
    with pytest.raises(InputError, match="target out of range.*\\[0, 2\\).*max 5"):
        check_maps(x, maps, torch.tensor([0, 5]), num_classes=2)
    with pytest.raises(InputError, match="target out of range"):
        check_maps(x, maps, torch.tensor([-1, 0]))
    with pytest.raises(InputError, match="target must be \\(N,\\)"):
        check_maps(x, maps, torch.tensor([0]))
    with pytest.raises(InputError, match="integer class indices"):
        check_maps(x, maps, torch.tensor([0.0, 1.0]))
    with pytest.raises(InputError, match="float tensor \\(N, C, H, W\\)"):
        check_maps(torch.zeros(3, 4, 4), maps)


def test_every_model_metric_rejects_bad_input() -> None:
    model, (x, maps, t) = linear_model(), tiny()
    metrics = [average_drop, increase_in_confidence, confidence_change, deletion_auc, insertion_auc, road]
    for metric in metrics:
        with pytest.raises(InputError, match="maps shape mismatch"):
            metric(model, x, maps[:, :1], t)
        with pytest.raises(InputError, match="NaN or inf values in maps"):
            metric(model, x, torch.full_like(maps, float("nan")), t)
        with pytest.raises(InputError, match="empty batch"):
            metric(model, x[:0], maps[:0], t[:0])
        with pytest.raises(InputError, match="target out of range.*\\[0, 2\\)"):  # the model has 2 classes
            metric(model, x, maps, torch.tensor([2]))
    for metric in (energy_pointing_game, dice, iou, pointing_game):
        with pytest.raises(InputError, match="maps and masks"):
            metric(maps, torch.zeros(1, 2, 3, dtype=torch.bool))
        with pytest.raises(InputError, match="NaN or inf values in maps"):
            metric(torch.full_like(maps, float("nan")), torch.ones(1, 2, 2, dtype=torch.bool))


def test_logits_of_accepts_both_model_kinds() -> None:
    x = torch.randn(2, 1, 16, 16)
    model = resnet(1)
    assert torch.equal(logits_of(model, x), model(x).logits)
    assert torch.equal(logits_of(Logits(model), x), model(x).logits)
    with pytest.raises(InputError, match="logits"):
        logits_of(lambda t: t.sum(), x)


# --- localization ----------------------------------------------------------------------


def test_energy_pointing_game_hand_values() -> None:
    maps = torch.tensor([[[0.5, 0.5], [0.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]])
    masks = torch.tensor([[[True, True], [False, False]]] * 2)
    assert energy_pointing_game(maps, masks).tolist() == [0.5, 0.0]  # 1.0 of 2.0 inside; all-zero map -> 0
    with pytest.raises(InputError, match="non-negative"):
        energy_pointing_game(-maps, masks)


def test_dice_hand_values() -> None:
    maps = torch.tensor([[[0.9, 0.6, 0.1, 0.0]], [[0.0, 0.0, 0.0, 0.0]], [[0.5, 0.0, 0.0, 0.0]]])
    masks = torch.tensor([[[True, False, True, False]], [[False] * 4], [[False, True, False, False]]])
    # |A|=2, |B|=2, |A&B|=1 -> 2/4; both empty -> 0; disjoint -> 0
    assert dice(maps, masks).tolist() == [0.5, 0.0, 0.0]
    assert dice(maps, masks, threshold=0.55).tolist() == [0.5, 0.0, 0.0]
    assert dice(maps, masks, threshold=0.95).tolist() == [0.0, 0.0, 0.0]


def test_stability_hand_values() -> None:
    t = 100 / 255  # 0.392...
    runs = torch.tensor(
        [
            [[[0.4, 1.0, 0.0, 0.39]]],  # A = {0, 1}
            [[[1.0, 0.39, 0.1, 0.2]]],  # B = {0}
            [[[0.0, 0.0, 0.5, 0.6]]],  # C = {2, 3}
        ]
    )  # (R=3, N=1, 1, 4)
    out = stability(runs, threshold=t)
    # IoU(A,B) = 1/2, IoU(A,C) = IoU(B,C) = 0; Dice(A,B) = 2/3, others 0
    assert out["iou"] == pytest.approx(1 / 6)
    assert out["dice"] == pytest.approx(2 / 9)
    expected = torch.tensor([[1, 0.5, 0], [0.5, 1, 0], [0, 0, 1]])
    assert torch.allclose(out["iou_matrix"], expected)
    assert torch.allclose(out["dice_matrix"], torch.tensor([[1, 2 / 3, 0], [2 / 3, 1, 0], [0, 0, 1]]))
    # a second image, identical in every run: each pair's mean over images moves halfway to 1
    two = torch.cat([runs, torch.ones(3, 1, 1, 4)], dim=1)
    assert stability(two, threshold=t)["iou"] == pytest.approx((1 / 6 + 1) / 2)
    with pytest.raises(InputError, match="at least 2 runs"):
        stability(runs[:1])
    with pytest.raises(InputError, match="\\(R, N, H, W\\)"):
        stability(runs[0])


def test_localization_against_quantus() -> None:
    quantus = pytest.importorskip("quantus")
    torch.manual_seed(1)
    maps = torch.rand(2, 32, 32)
    masks = torch.zeros(2, 32, 32, dtype=torch.bool)
    masks[:, 4:20, 8:30] = True
    top = maps.flatten(1).argmax(1)
    masks[0].view(-1)[top[0]] = True  # sample 0: a hit
    masks[1].view(-1)[top[1]] = False  # sample 1: a miss
    a, s = maps[:, None].numpy(), masks[:, None].numpy().astype(np.float32)

    def run(metric: object, i: slice = slice(None)) -> np.ndarray:
        x_batch, y_batch = np.zeros((2, 1, 32, 32), np.float32)[i], np.array([0, 1])[i]
        kw = dict(x_batch=x_batch, y_batch=y_batch, a_batch=a[i], s_batch=s[i])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return np.asarray(metric(model=None, **kw), dtype=np.float64)

    assert pointing_game(maps, masks).tolist() == [1.0, 0.0]
    assert np.array_equal(run(quantus.PointingGame(disable_warnings=True)), [1.0, 0.0])
    mass = run(quantus.RelevanceMassAccuracy(disable_warnings=True))
    assert np.allclose(energy_pointing_game(maps, masks).numpy(), mass, atol=1e-4)
    # no Quantus metric is IoU: TopKIntersection with k = |A|, A = {map >= 0.5}, gives |A & B| / |A|
    a_size = (maps >= 0.5).flatten(1).sum(1).double()
    b_size = masks.flatten(1).sum(1).double()
    tki = [
        run(quantus.TopKIntersection(k=int(a_size[i]), normalise=False, abs=False, disable_warnings=True), slice(i, i + 1))[0]
        for i in range(2)
    ]
    inter = torch.tensor(tki, dtype=torch.float64) * a_size
    assert torch.allclose(iou(maps, masks).double(), inter / (a_size + b_size - inter), atol=1e-4)
    assert torch.allclose(dice(maps, masks).double(), 2 * inter / (a_size + b_size), atol=1e-4)


# --- faithfulness: map as multiplicative mask -----------------------------------------


def test_average_drop_increase_and_change_hand_values() -> None:
    model = linear_model()
    x = torch.tensor([X, [-v for v in X]]).view(2, 1, 2, 2)
    maps = torch.tensor([MAP, MAP]).view(2, 2, 2)
    t = torch.tensor([0, 0])
    masked = [x * m for x, m in zip(X, MAP)]  # [0.4, 0.15, 0, 0.025]
    y = [sigmoid(dot(W, X)), sigmoid(-dot(W, X))]  # w.x = 2.0
    o = [sigmoid(dot(W, masked)), sigmoid(-dot(W, masked))]  # w.(x*map) = 0.8
    assert average_drop(model, x, maps, t).tolist() == pytest.approx([100 * (y[0] - o[0]) / y[0], 0.0], rel=1e-5)
    assert increase_in_confidence(model, x, maps, t).tolist() == [0.0, 1.0]
    assert confidence_change(model, x, maps, t).tolist() == pytest.approx([o[0] - y[0], o[1] - y[1]], rel=1e-5)


def test_confidence_metrics_against_gradcam() -> None:
    pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.metrics.cam_mult_image import (
        CamMultImageConfidenceChange,
        DropInConfidence,
        IncreaseInConfidence,
    )
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    model = resnet()
    torch.manual_seed(2)
    x, maps, t = torch.randn(2, 3, 32, 32), torch.rand(2, 32, 32), torch.tensor([0, 2])
    targets = [ClassifierOutputSoftmaxTarget(int(c)) for c in t]
    args = (x, maps.numpy(), targets, Logits(model))
    change = confidence_change(model, x, maps, t)
    assert np.allclose(change.numpy(), CamMultImageConfidenceChange()(*args), atol=1e-4)
    assert np.array_equal(increase_in_confidence(model, x, maps, t).numpy(), IncreaseInConfidence()(*args))
    # grad-cam's drop is absolute, max(0, Y - O); ours is relative to Y and in percent
    y = torch.softmax(model(x).logits, 1)[torch.arange(2), t].detach()
    assert np.allclose((average_drop(model, x, maps, t) * y / 100).numpy(), DropInConfidence()(*args), atol=1e-4)


# --- deletion / insertion ---------------------------------------------------------------


def test_deletion_curve_hand_values() -> None:
    model, (x, maps, t) = linear_model(), tiny()
    # zero baseline, steps=4: remove p0, then p1, then p3, then p2
    kept = [X, [0, 0.3, 0.2, 0.1], [0, 0, 0.2, 0.1], [0, 0, 0.2, 0], [0, 0, 0, 0]]
    expected = [sigmoid(dot(W, k)) for k in kept]
    curve = deletion_curve(model, x, maps, t, steps=4)
    assert curve.shape == (1, 5)
    assert curve[0].tolist() == pytest.approx(expected, rel=1e-6)
    auc = sum((a + b) / 2 * 0.25 for a, b in zip(expected, expected[1:]))
    assert deletion_auc(model, x, maps, t, steps=4).tolist() == pytest.approx([auc], rel=1e-6)
    # steps=3 over 4 pixels removes round(4 i / 3) = 0, 1, 3, 4 pixels
    assert deletion_curve(model, x, maps, t, steps=3)[0].tolist() == pytest.approx(
        [expected[0], expected[1], expected[3], expected[4]], rel=1e-6
    )
    # steps=8: i * 4 / 8 pixels, halves rounded up (not to even): 0 1 1 2 2 3 3 4 4
    assert deletion_curve(model, x, maps, t, steps=8)[0].tolist() == pytest.approx(
        [expected[k] for k in (0, 1, 1, 2, 2, 3, 3, 4, 4)], rel=1e-6
    )


def test_deletion_ties_follow_row_major_order_and_mean_baseline() -> None:
    model, (x, _, t) = linear_model(), tiny()
    flat = torch.full((1, 2, 2), 0.5)  # all tied: stable sort removes p0, p1, p2, p3
    mean = sum(X) / 4
    kept = [X, [mean, 0.3, 0.2, 0.1], [mean, mean, 0.2, 0.1], [mean, mean, mean, 0.1], [mean] * 4]
    curve = deletion_curve(model, x, flat, t, steps=4, baseline="mean")
    assert curve[0].tolist() == pytest.approx([sigmoid(dot(W, k)) for k in kept], rel=1e-6)


def test_insertion_curve_hand_values_and_blur_baseline() -> None:
    model, (x, maps, t) = linear_model(), tiny()
    shown = [[0] * 4, [0.4, 0, 0, 0], [0.4, 0.3, 0, 0], [0.4, 0.3, 0, 0.1], X]
    expected = [sigmoid(dot(W, s)) for s in shown]
    assert insertion_curve(model, x, maps, t, steps=4, baseline="zero")[0].tolist() == pytest.approx(expected, rel=1e-6)
    auc = sum((a + b) / 2 * 0.25 for a, b in zip(expected, expected[1:]))
    assert insertion_auc(model, x, maps, t, steps=4, baseline="zero").tolist() == pytest.approx([auc], rel=1e-6)
    # blur: 11-tap Gaussian, sigma 5, edge-replicating padding = scipy's gaussian_filter(mode="nearest", radius 5)
    torch.manual_seed(3)
    img = torch.randn(2, 3, 9, 12, dtype=torch.float64)
    oracle = ndimage.gaussian_filter(img.numpy(), sigma=(0, 0, 5, 5), mode="nearest", truncate=1.0)
    assert np.allclose(make_baseline(img, "blur").numpy(), oracle, atol=1e-10)
    blurred = ndimage.gaussian_filter(x.double().numpy(), sigma=(0, 0, 5, 5), mode="nearest", truncate=1.0)
    first = insertion_curve(model, x, maps, t, steps=4)[0, 0].item()  # default baseline: blur
    assert first == pytest.approx(sigmoid(dot(W, blurred.flatten().tolist())), rel=1e-6)
    with pytest.raises(ConfigError, match="unknown baseline 'noise'"):
        deletion_auc(model, x, maps, t, baseline="noise")
    with pytest.raises(ConfigError, match="steps"):
        deletion_auc(model, x, maps, t, steps=0)


def test_deletion_against_quantus_pixel_flipping() -> None:
    quantus = pytest.importorskip("quantus")
    model = resnet(1)
    torch.manual_seed(4)
    x, maps, t = torch.randn(2, 1, 32, 32), torch.rand(2, 32, 32), torch.tensor([0, 2])
    # common ground: black = 0.0 (Quantus' "black" is the image minimum), 16 steps of 64 pixels,
    # softmax outputs; Quantus' curve starts after the first step and its AUC uses dx = 1
    flip = quantus.PixelFlipping(features_in_step=64, perturb_baseline=0.0, disable_warnings=True)
    kw = dict(model=Logits(model).eval(), x_batch=x.numpy(), y_batch=t.numpy(), a_batch=maps[:, None].numpy(), device="cpu")
    curve = deletion_curve(model, x, maps, t, steps=16)
    assert np.allclose(curve[:, 1:].numpy(), np.array(flip(**kw)), atol=1e-4)
    # Quantus' own AUC (calculate_auc) calls np.trapz, gone in NumPy 2: apply its rule (trapezoid, dx=1) here
    flip_auc = np.trapezoid(np.array(flip(**kw)), dx=1, axis=1)
    ours = deletion_auc(model, x, maps, t, steps=16).numpy()
    assert np.allclose(ours, (flip_auc + (curve[:, 0] + curve[:, 1]).numpy() / 2) / 16, atol=1e-4)


# --- ROAD ---------------------------------------------------------------------------------


def test_linear_imputation_hand_values() -> None:
    img = torch.arange(9, dtype=torch.float64).view(1, 1, 3, 3) ** 2  # 0 1 4 / 9 16 25 / 36 49 64
    centre = torch.zeros(1, 3, 3, dtype=torch.bool)
    centre[0, 1, 1] = True
    out = noisy_linear_imputation(img, centre, noise=0)
    want = (1 + 9 + 25 + 49) / 6 + (0 + 4 + 36 + 64) / 12
    assert out[0, 0, 1, 1].item() == pytest.approx(want)
    assert torch.equal(out[centre[:, None].logical_not().expand_as(out)], img[centre[:, None].logical_not().expand_as(img)])
    corner = torch.zeros(1, 3, 3, dtype=torch.bool)
    corner[0, 0, 0] = True  # neighbours (0,1) 1/6, (1,0) 1/6, (1,1) 1/12, renormalized by 5/12
    assert noisy_linear_imputation(img, corner, noise=0)[0, 0, 0, 0].item() == pytest.approx((1 / 6 + 9 / 6 + 16 / 12) / (5 / 12))
    # two adjacent unknowns (0,0), (0,1) couple: solve the 2x2 system by hand
    pair = torch.zeros(1, 3, 3, dtype=torch.bool)
    pair[0, 0, :2] = True
    # (0,0): 5/12 u0 = u1 / 6 + 9 / 6 + 16 / 12
    # (0,1): neighbours (0,0) 1/6 = u0, (0,2) 1/6 = 4, (1,0) 1/12 = 9, (1,1) 1/6 = 16, (1,2) 1/12 = 25 -> 2/3 u1 = ...
    a = np.array([[5 / 12, -1 / 6], [-1 / 6, 2 / 3]])
    b = np.array([9 / 6 + 16 / 12, 4 / 6 + 9 / 12 + 16 / 6 + 25 / 12])
    u = np.linalg.solve(a, b)
    got = noisy_linear_imputation(img, pair, noise=0)[0, 0, 0, :2].numpy()
    assert np.allclose(got, u)
    with pytest.raises(InputError, match="all removed"):
        noisy_linear_imputation(img, torch.ones(1, 3, 3, dtype=torch.bool))


def _exact_imputation(img: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """ROAD's linear imputation of one channel ``(H, W)`` by an exact sparse LU solve, the matrix built pixel by pixel."""
    from scipy.sparse import lil_matrix
    from scipy.sparse.linalg import spsolve

    h, w = img.shape
    unknowns = list(zip(*np.nonzero(removed)))
    index = {pix: k for k, pix in enumerate(unknowns)}
    a, b = lil_matrix((len(unknowns), len(unknowns))), np.zeros(len(unknowns))
    for k, (i, j) in enumerate(unknowns):
        for di in (-1, 0, 1):
            for dj in (-1, 0, 1):
                ni, nj = i + di, j + dj
                if (di, dj) == (0, 0) or not (0 <= ni < h and 0 <= nj < w):
                    continue
                weight = 1 / 12 if di and dj else 1 / 6
                a[k, k] += weight
                if (ni, nj) in index:
                    a[k, index[ni, nj]] -= weight
                else:
                    b[k] += weight * img[ni, nj]
    out = img.astype(np.float64).copy()
    out[removed] = spsolve(a.tocsc(), b)
    return out


@pytest.mark.parametrize("size", [(32, 32), (23, 41)])
def test_linear_imputation_against_exact_solve(size: tuple[int, int]) -> None:
    """Within 1e-9 of an exact sparse LU solve (the docstring's claim), large holes and few kept pixels included."""
    torch.manual_seed(11)
    h, w = size
    x = torch.randn(3, 2, h, w, dtype=torch.float64)
    removed = torch.rand(3, h, w) < torch.tensor([0.1, 0.6, 0.9])[:, None, None]
    removed[1, 4:-4, 2:-2] = True  # one large hole
    removed[2, 0, 0] = False  # image 2 keeps only about 10 % of its pixels
    got = noisy_linear_imputation(x, removed, noise=0)
    for i in range(3):
        for ch in range(2):
            want = _exact_imputation(x[i, ch].numpy(), removed[i].numpy())
            assert np.abs(got[i, ch].numpy() - want).max() < 1e-9, (i, ch)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # NumPy 2 warnings from inside grad-cam's imputer
def test_linear_imputation_against_gradcam() -> None:
    pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer

    torch.manual_seed(5)
    x = torch.randn(2, 3, 10, 12)
    removed = torch.rand(2, 10, 12) < 0.6
    removed[0, 2:8, 3:9] = True  # a large hole: unknowns coupled to unknowns
    ours = noisy_linear_imputation(x, removed, noise=0)
    for i in range(2):  # grad-cam's mask marks the pixels it keeps
        theirs = NoisyLinearImputer(noise=0)(x[i], (~removed[i]).float())
        assert torch.allclose(ours[i], theirs, atol=1e-5)
    noisy = noisy_linear_imputation(x, removed, noise=0.01, generator=torch.Generator().manual_seed(0))
    hole = removed[:, None].expand_as(x)
    assert 0.005 < (noisy - ours)[hole].std().item() < 0.02  # std 0.01 on the imputed pixels only
    assert torch.equal(noisy[~hole], x[~hole])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("order", ["morf", "lerf"])
def test_road_against_gradcam(order: str) -> None:
    pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.metrics.perturbation_confidence import (
        PerturbationConfidenceMetric,
        RemoveLeastRelevantFirst,
        RemoveMostRelevantFirst,
    )
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    model = resnet()
    torch.manual_seed(6)
    x, maps, t = torch.randn(2, 3, 32, 32), torch.rand(2, 32, 32), torch.tensor([1, 2])
    cams = maps.numpy()
    remover = RemoveMostRelevantFirst if order == "morf" else RemoveLeastRelevantFirst
    for q in (10, 50, 80):
        # grad-cam's percentile q removes the map values >= np.percentile(., q): count them (distinct values,
        # the same count in both images) and ask ours for exactly that share of the pixels
        ranked = cams if order == "morf" else 1 - cams
        counts = {int((c >= np.percentile(c, q)).sum()) for c in ranked}
        assert len(counts) == 1
        metric = PerturbationConfidenceMetric(remover(q, NoisyLinearImputer(noise=0)))
        theirs = metric(x, cams, [ClassifierOutputSoftmaxTarget(int(c)) for c in t], Logits(model), return_diff=False)
        ours = road(model, x, maps, t, percentiles=[100 * counts.pop() / 1024], order=order, noise=0)
        assert ours.shape == (2, 1)
        assert np.allclose(ours[:, 0].numpy(), theirs, atol=1e-4)


def test_road_noise_seed_and_errors() -> None:
    model = resnet(1)
    torch.manual_seed(7)
    x, maps, t = torch.randn(2, 1, 16, 16), torch.rand(2, 16, 16), torch.tensor([0, 1])
    a = road(model, x, maps, t, percentiles=(20, 60))
    assert a.shape == (2, 2)
    assert torch.equal(a, road(model, x, maps, t, percentiles=(20, 60)))  # seeded: repeats
    assert not torch.equal(a, road(model, x, maps, t, percentiles=(20, 60), seed=1))
    p0 = torch.softmax(model(x).logits, 1)[torch.arange(2), t]
    assert torch.allclose(road(model, x, maps, t, percentiles=(0,))[:, 0], p0)  # nothing removed
    with pytest.raises(ConfigError, match="morf"):
        road(model, x, maps, t, order="most")
    with pytest.raises(ConfigError, match="percentiles"):
        road(model, x, maps, t, percentiles=(50, 100))


# --- sanity check ------------------------------------------------------------------------------


def test_spearman_matches_scipy_with_ties() -> None:
    torch.manual_seed(8)
    a = torch.randint(0, 5, (4, 6, 7)).float()  # many ties
    b = torch.randint(0, 5, (4, 6, 7)).float() + 0.3 * a
    want = [stats.spearmanr(a[i].flatten().numpy(), b[i].flatten().numpy())[0] for i in range(4)]
    assert np.allclose(spearman(a, b).numpy(), want, atol=1e-6)
    assert spearman(a, a).tolist() == pytest.approx([1.0] * 4)
    assert spearman(a, -a).tolist() == pytest.approx([-1.0] * 4)
    assert torch.isnan(spearman(torch.ones(1, 5), torch.arange(5.0)[None])).all()  # undefined, as scipy
    # float32 / float64 on the CPU are sorted by numpy, other dtypes (and devices) by torch: the same ranks
    from selfcam.metrics import _average_ranks

    assert torch.equal(_average_ranks(a.flatten(1)), _average_ranks(a.flatten(1).to(torch.int32)))  # a: integers
    half = spearman(a.half(), b.half()).numpy()
    assert np.allclose(half, [stats.spearmanr(a[i].flatten().numpy(), b[i].half().flatten().numpy())[0] for i in range(4)], atol=1e-6)


def test_cascading_randomization_hand_oracle() -> None:
    """Two linear layers, explain = input gradient: rebuild the reset weights from the documented seeds."""
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x, t = torch.randn(4, 6), torch.tensor([0, 1, 2, 0])

    def saliency(m: nn.Module, x: Tensor, t: Tensor) -> Tensor:
        x = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(m(x).gather(1, t[:, None]).sum(), x)
        return grad.abs()

    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    result = cascading_randomization(model, x, t, saliency, seed=20)
    assert torch.equal(rng, torch.get_rng_state())  # the caller's RNG is untouched
    assert [name for name, _ in result] == ["2", "0"]  # output side first
    torch.manual_seed(20)
    top = nn.Linear(5, 3)
    torch.manual_seed(21)
    bottom = nn.Linear(6, 5)
    original = saliency(model, x, t).numpy()
    for (name, rho), expected in zip(result, [nn.Sequential(model[0], nn.Tanh(), top), nn.Sequential(bottom, nn.Tanh(), top)]):
        want = [stats.spearmanr(original[i], saliency(expected, x, t)[i].numpy())[0] for i in range(4)]
        assert rho.shape == (4,) and np.allclose(rho.numpy(), want, atol=1e-6), name
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_cascading_randomization_on_a_cnn() -> None:
    model = resnet()
    torch.manual_seed(10)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = cascading_randomization(model, x, t, cam, layers=3)
    assert [name for name, _ in result] == ["head.fc", "backbone.last.0.shortcut.1", "backbone.last.0.shortcut.0"]
    name, rho = result[0]
    assert rho.shape == (2,) and (rho < 0.9).all()  # new classifier weights: a different CAM
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and not model.training
    with pytest.raises(ConfigError, match="layers"):
        cascading_randomization(model, x, t, cam, layers=0)


def test_cascading_randomization_against_quantus_mprt() -> None:
    quantus = pytest.importorskip("quantus")
    model = resnet()
    torch.manual_seed(11)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])

    def q_explain(model: nn.Module, inputs: np.ndarray, targets: np.ndarray, **_: object) -> np.ndarray:
        return cam(model, torch.as_tensor(inputs), torch.as_tensor(targets))[:, None].numpy()

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        theirs = quantus.MPRT(seed=42, layer_order="top_down", disable_warnings=True)(
            model=model, x_batch=x.numpy(), y_batch=t.numpy(), explain_func=q_explain, device="cpu"
        )
    ours = cascading_randomization(model, x, t, cam, seed=43)
    # same layers in the same order; Quantus re-seeds every layer with seed + 1, we use seed + i,
    # so the first (top) step is the common ground
    assert [name for name, _ in ours] == [k for k in theirs if k != "original"]
    assert np.allclose(ours[0][1].numpy(), theirs["head.fc"], atol=1e-4)
