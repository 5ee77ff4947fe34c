"""Synthetic outliers for fitting a domain score without anyone else's data.

A domain score may be fitted only on the victim's own training images and on outliers made from
them or from noise: fitting on a real foreign data set (Fashion-MNIST is the attacker's data in the
evaluation) would tune the score to its test. Each kind below is a pure function of a batch
``x`` (B, C, H, W) in [0, 1] and a ``torch.Generator`` and returns a batch of the same shape in
[0, 1]; the same generator state gives the same outliers.

The kinds destroy what makes a digit a digit (stroke shape, layout, the statistics of a single
pen trace) while keeping, for some, the victim's pixel statistics. None of them is an honest
user's variation: blurred, noisy, shifted, thicker, thinner and inverted digits stay in domain, so
nothing here inverts, mildly blurs or thickens an intact digit. Letters, symbols and geometric shapes
are kept out on purpose, to be used only as unseen out-of-domain sets when measuring.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

Outlier = Callable[[Tensor, torch.Generator], Tensor]


def _u(shape: Sequence[int], g: torch.Generator, low: float = 0.0, high: float = 1.0) -> Tensor:
    return torch.rand(tuple(shape), generator=g) * (high - low) + low


def uniform_noise(x: Tensor, g: torch.Generator) -> Tensor:
    """Independent uniform pixels, each image with its own brightness range."""
    b = x.shape[0]
    high = _u((b, 1, 1, 1), g, 0.3, 1.0)
    return _u(x.shape, g) * high


def gaussian_noise(x: Tensor, g: torch.Generator) -> Tensor:
    """Independent Gaussian pixels with a random mean and spread, clipped to [0, 1]."""
    b = x.shape[0]
    mean, std = _u((b, 1, 1, 1), g, 0.0, 0.6), _u((b, 1, 1, 1), g, 0.1, 0.5)
    return (mean + std * torch.randn(x.shape, generator=g)).clamp(0.0, 1.0)


def smooth_noise(x: Tensor, g: torch.Generator) -> Tensor:
    """Blobs: Gaussian noise on a coarse 3×3…8×8 grid, upsampled smoothly and stretched to [0, 1]."""
    b, c, h, w = x.shape
    out = torch.empty_like(x)
    cells = torch.randint(3, 9, (b,), generator=g)
    for i in range(b):
        n = int(cells[i])
        coarse = torch.randn((1, c, n, n), generator=g)
        fine = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)[0]
        lo, hi = fine.amin(), fine.amax()
        fine = (fine - lo) / (hi - lo + 1e-8)
        gamma = float(_u((1,), g, 0.5, 3.0))  # >1 leaves sparse bright blobs, <1 large filled areas
        out[i] = fine.pow(gamma)
    return out


def patch_shuffle(x: Tensor, g: torch.Generator, grid: int = 4) -> Tensor:
    """The image cut into grid×grid patches, the patches put back in a random order per image."""
    b, c, h, w = x.shape
    ph, pw = h // grid, w // grid
    core = x[:, :, : ph * grid, : pw * grid]
    patches = core.reshape(b, c, grid, ph, grid, pw).permute(0, 2, 4, 1, 3, 5).reshape(b, grid * grid, c, ph, pw)
    order = torch.argsort(torch.rand((b, grid * grid), generator=g), dim=1)
    shuffled = patches[torch.arange(b)[:, None], order]
    shuffled = shuffled.reshape(b, grid, grid, c, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(b, c, ph * grid, pw * grid)
    out = x.clone()
    out[:, :, : ph * grid, : pw * grid] = shuffled
    return out


def pixel_permutation(x: Tensor, g: torch.Generator) -> Tensor:
    """Every image's pixels in a random order: the same histogram as a digit, no strokes."""
    b = x.shape[0]
    flat = x.reshape(b, -1)
    order = torch.argsort(torch.rand(flat.shape, generator=g), dim=1)
    return flat.gather(1, order).reshape(x.shape)


def strong_warp(x: Tensor, g: torch.Generator) -> Tensor:
    """An elastic deformation far beyond handwriting's (displacements of 4–9 pixels on a 7-pixel scale):
    the strokes survive, the digit does not."""
    b, _, h, w = x.shape
    coarse = torch.randn((b, 2, 4, 4), generator=g)
    field = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    alpha = _u((b, 1, 1, 1), g, 4.0, 9.0) * 2.0 / torch.tensor([w, h], dtype=x.dtype)  # pixels → [-1, 1] units
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    base = torch.stack((xs, ys), dim=-1).expand(b, h, w, 2)
    return F.grid_sample(x, base + alpha * field, mode="bilinear", padding_mode="zeros", align_corners=True)


def digit_overlay(x: Tensor, g: torch.Generator) -> Tensor:
    """Two training images on top of each other (pixel-wise maximum), the second shifted by up to 6 pixels."""
    b, _, h, w = x.shape
    other = x[torch.randperm(b, generator=g)]
    shift = torch.randint(-6, 7, (b, 2), generator=g).to(x.dtype) * 2.0 / torch.tensor([w, h], dtype=x.dtype)
    theta = torch.zeros((b, 2, 3), dtype=x.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(other.shape), align_corners=False)
    other = F.grid_sample(other, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return torch.maximum(x, other)


def mild_affine(x: Tensor, g: torch.Generator) -> Tensor:
    """Not an outlier: an honest digit's variation (rotation ±12°, scale 0.9–1.1, shear ±0.15, shift ±2
    pixels). The victim saw every training image, so its features on them are more typical than on any
    new digit; fitting the in-domain side on such variants as well keeps a score from learning "seen
    by the victim" instead of "a digit"."""
    b, _, h, w = x.shape
    angle = (_u((b,), g) * 2 - 1) * (12 * math.pi / 180)
    scale = _u((b,), g, 0.9, 1.1)
    shear = (_u((b,), g) * 2 - 1) * 0.15
    theta = torch.zeros((b, 2, 3), dtype=x.dtype)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, shear - sin, sin, cos
    theta[:, :, 2] = (_u((b, 2), g) * 2 - 1) * 2 * 2.0 / torch.tensor([w, h], dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


#: The kinds of outlier a domain score may be fitted on, by name.
OUTLIERS: dict[str, Outlier] = {
    "uniform_noise": uniform_noise,
    "gaussian_noise": gaussian_noise,
    "smooth_noise": smooth_noise,
    "patch_shuffle": patch_shuffle,
    "pixel_permutation": pixel_permutation,
    "strong_warp": strong_warp,
    "digit_overlay": digit_overlay,
}


def synthesise(x: Tensor, g: torch.Generator, kinds: Sequence[str] = tuple(OUTLIERS)) -> tuple[Tensor, Tensor]:
    """Outliers made from ``x``: the batch is split into equal consecutive parts, one per kind (in the
    order given). Returns the outliers and, per image, the index of its kind in ``kinds``."""
    unknown = [k for k in kinds if k not in OUTLIERS]
    if unknown or not kinds:
        raise ValueError(f"unknown outlier kinds {unknown}; known: {', '.join(OUTLIERS)}")
    parts = torch.tensor_split(torch.arange(x.shape[0]), len(kinds))
    out = torch.empty_like(x)
    kind = torch.empty(x.shape[0], dtype=torch.long)
    for i, (name, idx) in enumerate(zip(kinds, parts, strict=True)):
        if len(idx):
            out[idx] = OUTLIERS[name](x[idx], g).clamp(0.0, 1.0)
            kind[idx] = i
    return out, kind
