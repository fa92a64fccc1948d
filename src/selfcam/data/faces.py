"""Synthetic faces with localized attributes and one ground-truth mask per attribute.

Each sample is a ``size x size`` RGB picture of a cartoon face: neck and shoulders, ears,
an elliptical head, optional hair, eyes, eyebrows, nose and a closed mouth, on a coloured,
striped background, under a random brightness and a linear lighting gradient, plus a little
Gaussian noise. What varies per face: position, scale, head aspect, skin tone, hair (colour,
hairline, present or not), background colour and stripes, clothes, lighting, and the colours
of every attribute.

Attributes (:data:`ATTRIBUTES`, each present independently with probability ``p = 0.5``):
``Eyeglasses`` (two rings, bridge, temples, tinted lenses), ``Smiling`` (an open smiling
mouth with teeth, drawn over the closed mouth), ``Beard`` (a textured region round the
chin that leaves the mouth free), ``Wearing_Hat`` (crown, band, brim over the top of the
head) and ``Wearing_Earrings`` (a hook and a disc under each ear).

Mask rule: an attribute's mask holds the pixels where the attribute is visible in the final
picture (its drawn pixels minus those covered by attributes drawn after it, in the order of
:data:`ATTRIBUTES`); an absent attribute's mask is empty. Shapes are drawn with hard edges,
so toggling an attribute on the same parameters changes pixels inside its mask only.
Localization metrics are scored on the images where the attribute is present.

Generation is vectorized over faces (NumPy, in chunks), all randomness comes from one
generator seeded by ``(seed, split)``. :func:`write_celeba` writes a dataset in the CelebA
on-disk layout (plus the masks as a ``.npy`` bit field), :func:`read_masks` reads the masks back.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from numbers import Integral
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..errors import DataError
from ..safeio import read_bytes

__all__ = [
    "ATTRIBUTES",
    "FACES_MEAN",
    "FACES_STD",
    "FaceParams",
    "SyntheticFaces",
    "read_masks",
    "render_faces",
    "sample_face_params",
    "write_celeba",
]

ATTRIBUTES: tuple[str, ...] = ("Beard", "Smiling", "Eyeglasses", "Wearing_Earrings", "Wearing_Hat")  # draw order
FACES_MEAN: tuple[float, float, float] = (0.48, 0.46, 0.45)  # measured on SyntheticFaces("train", 4000), rounded
FACES_STD: tuple[float, float, float] = (0.26, 0.26, 0.26)
SPLITS: tuple[str, ...] = ("train", "val", "test")
PARTITION: dict[str, int] = {"train": 0, "val": 1, "test": 2}  # list_eval_partition.txt codes
IMAGE_DIR, ATTR_FILE, PARTITION_FILE, MASK_FILE = (
    "img_align_celeba", "list_attr_celeba.txt", "list_eval_partition.txt", "attribute_masks.npy",
)  # fmt: skip
_STREAM = 0xFACE  # keeps face streams apart from other generators seeded with (seed, split)
_CHUNK = 512  # faces rendered per vectorized step

_HAIR = np.array([[0.08, 0.06, 0.05], [0.30, 0.18, 0.10], [0.55, 0.38, 0.20], [0.85, 0.72, 0.45], [0.60, 0.60, 0.60]])
_SKIN_LIGHT, _SKIN_DARK = np.array([0.97, 0.82, 0.70]), np.array([0.34, 0.21, 0.14])


@dataclass(frozen=True)
class FaceParams:
    """Everything random about ``n`` faces; every field is an array with leading dimension ``n``.

    ``center`` (n, 2) x, y and ``radius`` (n,) in pixels (``radius`` is the head's half-width);
    colours are RGB in [0, 1]; ``present`` (n, len(ATTRIBUTES)) bool.
    """

    center: np.ndarray
    radius: np.ndarray
    aspect: np.ndarray
    skin: np.ndarray
    hair: np.ndarray
    has_hair: np.ndarray
    hairline: np.ndarray
    background: np.ndarray
    stripes: np.ndarray  # (n, 4): amplitude, frequency (cycles per image), angle, phase
    stripe_colour: np.ndarray
    clothes: np.ndarray
    light: np.ndarray  # (n, 3): brightness, gradient strength, gradient angle
    frame: np.ndarray
    lens: np.ndarray
    lens_alpha: np.ndarray
    hat: np.ndarray
    earring: np.ndarray
    present: np.ndarray

    def __len__(self) -> int:
        return len(self.radius)

    def take(self, idx: slice | np.ndarray) -> "FaceParams":
        """The parameters of faces ``idx``."""
        return FaceParams(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})


def sample_face_params(rng: np.random.Generator, n: int, size: int, p: float = 0.5) -> FaceParams:
    """Draw the parameters of ``n`` faces on a ``size`` canvas; each attribute present with probability ``p``."""
    u = rng.uniform
    radius = u(0.17, 0.23, n) * size
    # the hat reaches 1.9 r above the centre, the chin 1.25 r below, brim and earrings 1.3 r aside
    cx = u(1.35 * radius, size - 1.35 * radius)
    cy = u(1.95 * radius, size - 1.3 * radius)
    tone = u(0, 1, (n, 1))
    skin = (1 - tone) * _SKIN_LIGHT + tone * _SKIN_DARK + u(-0.04, 0.04, (n, 3))
    hair = _HAIR[rng.integers(0, len(_HAIR), n)] + u(-0.04, 0.04, (n, 3))
    bright = rng.random(n) < 0.5  # frames and hats: dark or any colour
    return FaceParams(
        center=np.stack([cx, cy], 1), radius=radius, aspect=u(1.15, 1.35, n), skin=skin.clip(0, 1),
        hair=hair.clip(0, 1), has_hair=rng.random(n) < 0.7, hairline=u(-0.95, -0.6, n),
        background=u(0.05, 0.95, (n, 3)),
        stripes=np.stack([u(0, 0.15, n), u(2, 8, n), u(0, np.pi, n), u(0, 2 * np.pi, n)], 1),
        stripe_colour=u(-1, 1, (n, 3)), clothes=u(0.05, 0.95, (n, 3)),
        light=np.stack([u(0.75, 1.15, n), u(0, 0.4, n), u(0, 2 * np.pi, n)], 1),
        frame=np.where(bright[:, None], u(0, 1, (n, 3)), u(0.02, 0.25, (n, 1))), lens=u(0.2, 0.6, (n, 3)),
        lens_alpha=u(0.2, 0.5, n), hat=np.where(bright[:, None], u(0, 1, (n, 3)), u(0.05, 0.3, (n, 1))),
        earring=np.where(rng.random((n, 1)) < 0.5, [[0.95, 0.78, 0.2]], [[0.85, 0.87, 0.92]]) + u(-0.05, 0.05, (n, 3)),
        present=rng.random((n, len(ATTRIBUTES))) < p,
    )  # fmt: skip


def _ellipse(u: np.ndarray, v: np.ndarray, cu: float, cv: float, au: float | np.ndarray, av: float | np.ndarray) -> np.ndarray:
    """Inside the ellipse centred at (cu, cv) with half-axes (au, av), in face units: (m, S, S) bool."""
    return ((u - cu) / au) ** 2 + ((v - cv) / av) ** 2 <= 1


def _rect(u: np.ndarray, v: np.ndarray, u0: float, u1: float, v0: float, v1: float) -> np.ndarray:
    return (u >= u0) & (u <= u1) & (v >= v0) & (v <= v1)


def _pair(shape: Callable[..., np.ndarray], u: np.ndarray, v: np.ndarray, cu: float, *args: float) -> np.ndarray:
    """A shape and its mirror image about the face's vertical axis (eyes, ears, earrings...)."""
    return shape(u, v, cu, *args) | shape(u, v, -cu, *args)


def _attribute_shapes(u: np.ndarray, v: np.ndarray) -> dict[str, np.ndarray]:
    """Where each attribute is drawn when present, face coordinates ``u, v`` (m, S, S) -> (m, S, S) bool."""
    mouth_zone = _ellipse(u, v, 0, 0.55, 0.48, 0.32)
    arms = _rect(u, v, 0.6, 0.98, -0.25, -0.15) | _rect(u, v, -0.98, -0.6, -0.25, -0.15)
    return {
        "Beard": _ellipse(u, v, 0, 0.1, 0.95, 1.38) & (v > 0.45) & ~mouth_zone,
        "Smiling": _ellipse(u, v, 0, 0.48, 0.4, 0.3) & (v >= 0.48),
        "Eyeglasses": _pair(_ellipse, u, v, 0.38, -0.2, 0.3, 0.3) | _rect(u, v, -0.13, 0.13, -0.25, -0.15) | arms,
        "Wearing_Earrings": _pair(_ellipse, u, v, 1.05, 0.5, 0.24, 0.24)
        | _rect(u, v, 0.99, 1.07, 0.2, 0.3) | _rect(u, v, -1.07, -0.99, 0.2, 0.3),
        "Wearing_Hat": _rect(u, v, -0.82, 0.82, -1.9, -0.95) | _rect(u, v, -1.3, 1.3, -1.05, -0.85),
    }


def render_faces(params: FaceParams, size: int, noise: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw faces: ``params`` of ``m`` faces -> (RGB uint8 (m, 3, S, S), visible masks bool (m, len(ATTRIBUTES), S, S)).

    ``rng`` supplies the pixel noise and the beard's texture only (the same ``rng`` state and
    ``params`` give the same picture, whatever attributes are present).
    """
    m = len(params)
    col = lambda c: np.asarray(c, np.float32).reshape(m, 3, 1, 1)  # noqa: E731  (m, 3) colours -> broadcastable
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    r = params.radius.astype(np.float32)[:, None, None]
    u = (xs - params.center[:, 0, None, None].astype(np.float32)) / r
    v = (ys - params.center[:, 1, None, None].astype(np.float32)) / r
    amp, freq, angle, phase = (params.stripes[:, i, None, None].astype(np.float32) for i in range(4))
    wave = amp * np.sin(2 * np.pi * freq * (xs * np.cos(angle) + ys * np.sin(angle)) / size + phase)
    img = col(params.background) + wave[:, None] * col(params.stripe_colour)
    texture = rng.uniform(0.7, 1.25, (m, 1, size, size)).astype(np.float32)
    noise_field = rng.standard_normal((m, 3, size, size), dtype=np.float32) * np.float32(noise)

    def paint(mask: np.ndarray, colour: np.ndarray) -> None:
        nonlocal img
        img = np.where(mask[:, None], colour, img)

    skin = col(params.skin)
    aspect = params.aspect.astype(np.float32)[:, None, None]
    paint(v > 1.6, col(params.clothes))
    paint(_rect(u, v, -0.42, 0.42, 0.8, 1.6), skin * 0.88)
    paint(_pair(_ellipse, u, v, 1.0, 0.0, 0.16, 0.3), skin * 0.92)
    paint(_ellipse(u, v, 0, 0, 1, aspect), skin)
    hair = params.has_hair[:, None, None] & _ellipse(u, v, 0, 0, 1.05, aspect + 0.07)
    paint(hair & (v < params.hairline[:, None, None]), col(params.hair))
    paint(_pair(_ellipse, u, v, 0.38, -0.2, 0.15, 0.09), col(np.full((m, 3), 0.95)))
    paint(_pair(_ellipse, u, v, 0.38, -0.2, 0.075, 0.075), col(np.full((m, 3), 0.08)))
    paint(_rect(u, v, 0.22, 0.55, -0.42, -0.36) | _rect(u, v, -0.55, -0.22, -0.42, -0.36), col(params.hair) * 0.8)
    paint(_ellipse(u, v, 0, 0.12, 0.09, 0.16), skin * 0.8)
    paint(_rect(u, v, -0.26, 0.26, 0.54, 0.59), col(np.tile([[0.45, 0.12, 0.12]], (m, 1))))

    shapes = _attribute_shapes(u, v)
    drawn = [shapes[name] & params.present[:, a, None, None] for a, name in enumerate(ATTRIBUTES)]
    paint(drawn[0], col(params.hair) * texture)
    paint(drawn[1], col(np.tile([[0.35, 0.04, 0.07]], (m, 1))))
    paint(drawn[1] & (v <= 0.57), col(np.full((m, 3), 0.97)))
    lenses = _pair(_ellipse, u, v, 0.38, -0.2, 0.19, 0.19)
    alpha = params.lens_alpha.astype(np.float32)[:, None, None, None]
    paint(drawn[2] & lenses, (1 - alpha) * img + alpha * col(params.lens))
    paint(drawn[2] & ~lenses, col(params.frame))
    paint(drawn[3], col(params.earring))
    paint(drawn[4], col(params.hat))
    paint(drawn[4] & _rect(u, v, -0.82, 0.82, -1.2, -1.05), col(params.hat) * 0.55)

    xc, yc = (xs / size - 0.5) * 2, (ys / size - 0.5) * 2
    bright, grad, ang = (params.light[:, i, None, None].astype(np.float32) for i in range(3))
    img = img * (bright * (1 + grad * (xc * np.cos(ang) + yc * np.sin(ang))))[:, None] + noise_field
    covered = np.zeros_like(drawn[0])
    visible = []
    for mask in reversed(drawn):  # later layers cover earlier ones
        visible.append(mask & ~covered)
        covered = covered | mask
    pixels = np.rint(np.clip(img, 0, 1) * 255).astype(np.uint8)
    return pixels, np.stack(visible[::-1], 1)


def _check_int(name: str, value: object, low: int) -> int:
    if not isinstance(value, Integral) or isinstance(value, bool) or value < low:
        raise DataError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


class SyntheticFaces(torch.utils.data.Dataset):
    """``n`` synthetic faces of one split with multi-label attributes; see the module docstring.

    Items: ``(normalized image (3, S, S) float32, attrs (A,) float32 in {0, 1}, masks (A, S, S) bool)``
    for the ``A`` chosen ``attributes`` (a subset of :data:`ATTRIBUTES`; the others are never drawn).
    """

    task: str = "multilabel"
    spec: str = "synthetic-faces"
    in_chans: int = 3
    mean: tuple[float, float, float] = FACES_MEAN
    std: tuple[float, float, float] = FACES_STD

    def __init__(self, split: Literal["train", "val", "test"], n: int, *, size: int = 64, seed: int = 0,
                 attributes: Sequence[str] = ATTRIBUTES, p: float = 0.5, noise: float = 0.02) -> None:  # fmt: skip
        n, size, seed = _check_int("n", n, 1), _check_int("size", size, 32), _check_int("seed", seed, 0)
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        unknown = [a for a in attributes if a not in ATTRIBUTES]
        if unknown or not attributes or len(set(attributes)) != len(attributes):
            raise DataError(f"attributes must be distinct names from {', '.join(ATTRIBUTES)}, got {list(attributes)}")
        if not (0 <= p <= 1 and noise >= 0):
            raise DataError(f"p must lie in [0, 1] and noise be >= 0, got p={p!r}, noise={noise!r}")
        self.split, self.size, self.seed = split, size, seed
        self.class_names: list[str] = list(attributes)
        self.num_classes: int = len(attributes)
        keep = [ATTRIBUTES.index(a) for a in attributes]
        rng = np.random.default_rng([seed, SPLITS.index(split), _STREAM])
        params = sample_face_params(rng, n, size, p)
        present = np.zeros_like(params.present)
        present[:, keep] = params.present[:, keep]
        self.params: FaceParams = replace(params, present=present)
        pixels, bits = [], []
        weights = (1 << np.arange(len(keep), dtype=np.uint8))[None, :, None, None]
        for start in range(0, n, _CHUNK):
            rgb, masks = render_faces(self.params.take(slice(start, start + _CHUNK)), size, noise, rng)
            pixels.append(rgb)
            bits.append((masks[:, keep] * weights).sum(1, dtype=np.uint8))
        self.pixels: Tensor = torch.from_numpy(np.concatenate(pixels))  # (n, 3, S, S) uint8
        self.mask_bits: Tensor = torch.from_numpy(np.concatenate(bits))  # (n, S, S) uint8, bit a = attribute a
        self.labels: Tensor = torch.from_numpy(present[:, keep].astype(np.float32))  # (n, A)
        self._mean = torch.tensor(self.mean).view(3, 1, 1)
        self._std = torch.tensor(self.std).view(3, 1, 1)

    def raw_images(self, idx: slice | Tensor | int = slice(None)) -> Tensor:
        """Pictures in [0, 1]: ``(k, 3, S, S)`` float32 (``(3, S, S)`` for an int index)."""
        return self.pixels[idx].float() / 255

    def attribute_masks(self, idx: slice | Tensor | int = slice(None)) -> Tensor:
        """Visible attribute masks: ``(k, A, S, S)`` bool (``(A, S, S)`` for an int index)."""
        bits = self.mask_bits[idx].unsqueeze(-3)
        shifts = torch.arange(self.num_classes, dtype=torch.uint8).view(-1, 1, 1)
        return (bits >> shifts) & 1 == 1

    def normalize(self, images: Tensor) -> Tensor:
        """``(x - mean) / std`` per channel: ``(..., 3, S, S)`` in [0, 1] -> same shape."""
        return (images - self._mean) / self._std

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        """(normalized image (3, S, S) float32, attrs (A,) float32, masks (A, S, S) bool)."""
        return self.normalize(self.raw_images(i)), self.labels[i], self.attribute_masks(i)


def write_celeba(data: SyntheticFaces | Mapping[str, SyntheticFaces], out_dir: str | Path, quality: int = 95) -> Path:
    """Write faces in the CelebA layout under ``out_dir``; returns ``out_dir``.

    ``data`` is one dataset (its own split) or ``{split: dataset}``; images are numbered
    ``000001.jpg``... over the splits in train, val, test order. Files: ``img_align_celeba/*.jpg``
    (JPEG, ``quality``, no chroma subsampling), ``list_attr_celeba.txt`` (count, attribute names,
    then ``name v1 .. vA`` with -1 / 1), ``list_eval_partition.txt`` (``name 0|1|2``) and
    ``attribute_masks.npy``: uint8 ``(N, S, S)``, bit ``a`` set where attribute ``a`` (in the
    attribute file's order) is visible, rows in the attribute file's order (read by :func:`read_masks`).
    """
    sets = {data.split: data} if isinstance(data, SyntheticFaces) else dict(data)
    unknown = [s for s in sets if s not in SPLITS]
    if not sets or unknown:
        raise DataError(f"write_celeba needs datasets keyed by split ({', '.join(SPLITS)}), got {list(sets)}")
    ordered = [(s, sets[s]) for s in SPLITS if s in sets]
    first = ordered[0][1]
    for split, ds in ordered:
        if ds.class_names != first.class_names or ds.size != first.size:
            raise DataError(f"write_celeba: split {split!r} has attributes {ds.class_names} at size {ds.size}, "
                            f"expected {first.class_names} at size {first.size}")  # fmt: skip
    root = Path(out_dir)
    (root / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    names, attr_lines, part_lines, bits = [], [], [], []
    for split, ds in ordered:
        hwc = ds.pixels.permute(0, 2, 3, 1).numpy()
        for i in range(len(ds)):
            name = f"{len(names) + 1:06d}.jpg"
            Image.fromarray(hwc[i]).save(root / IMAGE_DIR / name, quality=quality, subsampling=0)
            names.append(name)
            attr_lines.append(" ".join([name, *("1" if v else "-1" for v in ds.labels[i].tolist())]))
            part_lines.append(f"{name} {PARTITION[split]}")
        bits.append(ds.mask_bits.numpy())
    header = [str(len(names)), " ".join(first.class_names)]
    (root / ATTR_FILE).write_text("\n".join(header + attr_lines) + "\n")
    (root / PARTITION_FILE).write_text("\n".join(part_lines) + "\n")
    np.save(root / MASK_FILE, np.concatenate(bits), allow_pickle=False)
    return root


def read_masks(celeba_dir: str | Path) -> tuple[list[str], Tensor]:
    """Read the masks :func:`write_celeba` wrote: (attribute names, ``(N, A, S, S)`` bool), rows as in the attribute file."""
    root = Path(celeba_dir)
    attr_path, mask_path = root / ATTR_FILE, root / MASK_FILE
    for path in (attr_path, mask_path):
        if not path.is_file():
            raise DataError(f"{path}: file not found")
    lines = read_bytes(attr_path, 1 << 30, DataError, "attribute list").decode().splitlines()
    if len(lines) < 2 or not lines[0].strip().isdigit():
        raise DataError(f"{attr_path}: expected the image count on line 1 and attribute names on line 2")
    count, names = int(lines[0]), lines[1].split()
    try:
        bits = np.load(mask_path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise DataError(f"{mask_path}: not a readable .npy array ({e})") from e
    if bits.dtype != np.uint8 or bits.ndim != 3 or len(bits) != count:
        raise DataError(f"{mask_path}: expected uint8 (N={count}, S, S), got {bits.dtype} {bits.shape}")
    if len(names) > 8 or int(bits.max(initial=0)) >= 1 << len(names):
        raise DataError(f"{mask_path}: bits set beyond the {len(names)} attributes of {attr_path}")
    shifts = np.arange(len(names), dtype=np.uint8)[:, None, None]
    return names, torch.from_numpy((bits[:, None] >> shifts) & 1 == 1)
