"""Honest variants of the victim's own training digits: the ways people send digits, made in-domain on purpose.

A domain score fitted only on the victim's training images learns "looks like an MNIST scan": a digit drawn
with a thicker pen, photographed on grey paper or written faintly is then flagged and answered from the
misinformation model although its sender is honest. Each family below is such a variation, as a pure function
of a batch ``x`` (B, C, H, W) in [0, 1] and a ``torch.Generator`` (same state, same images), with its own
random strength per image:

* ``stroke`` — another pen: grey-level dilation or erosion with a random small structuring element, blended
  with the original by a random amount (strokes from about half to about twice as wide);
* ``affine`` — another hand or framing: rotation ±15°, scale 0.8–1.2, shift ±4 pixels;
* ``blur`` — out of focus or resampled: Gaussian blur, σ 0.4–1.6 pixels;
* ``noise`` — a sensor: additive Gaussian noise, σ 0.03–0.3;
* ``faint`` — faint ink: the strokes at 35–90% of their brightness, a random gamma 0.7–1.4;
* ``scan`` — a scanned or photographed page after inversion: a grey background of 0–0.25 with a linear
  gradient of up to 0.25 in a random direction, ink at 0.65–1, mild blur and noise, then JPEG at quality 30–90.

``honest_mix`` composes them the way they occur (pen, then hand, then the camera or scanner): each family is
applied to an image with probability ``P_FAMILY``, at least one per image. These are fitting data of the
defense, with their own parameters; the evaluation's perturbations (``measure.domain.PERTURBATIONS`` and the
formats of ``measure.formats``) are separate code, so a score is never fitted on the images it is measured on.
Only the victim's training split goes in; nothing foreign (Fashion-MNIST or any attacker's set) is used.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

Variation = Callable[[Tensor, torch.Generator], Tensor]

#: The chance that ``honest_mix`` applies each family to an image (at least one family is always applied).
P_FAMILY = 0.35


def _u(shape: Sequence[int], g: torch.Generator, low: float = 0.0, high: float = 1.0) -> Tensor:
    return torch.rand(tuple(shape), generator=g) * (high - low) + low


def _per_image_blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Gaussian blur of each image with its own σ (pixels), a 7×7 kernel."""
    r = torch.arange(-3, 4, dtype=x.dtype)
    k1 = torch.exp(-(r[None, :] ** 2) / (2 * sigma[:, None] ** 2))
    k1 = k1 / k1.sum(1, keepdim=True)  # (B, 7)
    kernel = (k1[:, :, None] * k1[:, None, :])[:, None]  # (B, 1, 7, 7)
    b, c, h, w = x.shape
    flat = F.pad(x.reshape(1, b * c, h, w), (3, 3, 3, 3), mode="replicate")
    return F.conv2d(flat, kernel.repeat_interleave(c, 0), groups=b * c).reshape(b, c, h, w)


def stroke(x: Tensor, g: torch.Generator) -> Tensor:
    """Thicker or thinner strokes: per image a dilation (3×3, 2×2, 1×2 or 2×1 maximum) or an erosion (2×2, 1×2
    or 2×1 minimum), mixed with the original at a random weight 0.4–1."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), value=0.0)

    def window(offsets: list[tuple[int, int]]) -> Tensor:
        return torch.stack([padded[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy, dx in offsets])

    square3 = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    shapes = [[(0, 0), (0, 1), (1, 0), (1, 1)], [(0, 0), (0, 1)], [(0, 0), (1, 0)]]
    candidates = [window(square3).amax(0), *(window(s).amax(0) for s in shapes), *(window(s).amin(0) for s in shapes)]
    stacked = torch.stack(candidates)  # (7, B, C, H, W)
    b = x.shape[0]
    which = torch.randint(0, len(candidates), (b,), generator=g)
    chosen = stacked[which, torch.arange(b)]
    weight = _u((b, 1, 1, 1), g, 0.4, 1.0)
    return weight * chosen + (1 - weight) * x


def affine(x: Tensor, g: torch.Generator) -> Tensor:
    """Rotation ±15°, scale 0.8–1.2 and a shift of ±4 pixels, bilinear, zero-filled."""
    b, _, h, w = x.shape
    angle = _u((b,), g, -15.0, 15.0) * math.pi / 180
    scale = _u((b,), g, 0.8, 1.2)
    theta = torch.zeros((b, 2, 3), dtype=x.dtype)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    theta[:, :, 2] = _u((b, 2), g, -4.0, 4.0) * 2.0 / torch.tensor([w, h], dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def blur(x: Tensor, g: torch.Generator) -> Tensor:
    """Gaussian blur with σ 0.4–1.6 pixels per image."""
    return _per_image_blur(x, _u((x.shape[0],), g, 0.4, 1.6))


def noise(x: Tensor, g: torch.Generator) -> Tensor:
    """Additive Gaussian noise with σ 0.03–0.3 per image, clipped to [0, 1]."""
    sigma = _u((x.shape[0], 1, 1, 1), g, 0.03, 0.3)
    return (x + sigma * torch.randn(x.shape, generator=g)).clamp(0.0, 1.0)


def faint(x: Tensor, g: torch.Generator) -> Tensor:
    """Faint ink: the image raised to a gamma of 0.7–1.4, then scaled to 35–90% of its brightness."""
    b = x.shape[0]
    return x.clamp(0.0, 1.0).pow(_u((b, 1, 1, 1), g, 0.7, 1.4)) * _u((b, 1, 1, 1), g, 0.35, 0.9)


def jpeg(x: Tensor, g: torch.Generator, low: int = 30, high: int = 90) -> Tensor:
    """Each image through an 8-bit JPEG of a random quality in [low, high] (Pillow), one channel at a time."""
    quality = torch.randint(low, high + 1, (x.shape[0],), generator=g)
    out = torch.empty_like(x)
    pixels = np.round(x.clamp(0.0, 1.0).numpy() * 255.0).astype(np.uint8)
    for i in range(x.shape[0]):
        for c in range(x.shape[1]):
            buf = io.BytesIO()
            Image.fromarray(pixels[i, c]).save(buf, format="JPEG", quality=int(quality[i]))
            buf.seek(0)
            out[i, c] = torch.from_numpy(np.asarray(Image.open(buf), dtype=np.float32) / 255.0)
    return out


def scan(x: Tensor, g: torch.Generator) -> Tensor:
    """A scanned or photographed page, inverted back to white on black: a grey background (0–0.25) with a linear
    gradient of up to 0.25 across the image, ink at 0.65–1, blur σ 0.3–0.9, noise σ 0–0.08, then a JPEG."""
    b, _, h, w = x.shape
    angle = _u((b, 1, 1, 1), g, 0.0, 2 * math.pi)
    ys, xs = torch.meshgrid(torch.linspace(-0.5, 0.5, h), torch.linspace(-0.5, 0.5, w), indexing="ij")
    ramp = (torch.cos(angle) * xs + torch.sin(angle) * ys) / math.sqrt(0.5) + 0.5  # about 0..1 across the image
    background = _u((b, 1, 1, 1), g, 0.0, 0.25) + _u((b, 1, 1, 1), g, 0.0, 0.25) * ramp.clamp(0.0, 1.0)
    ink = _u((b, 1, 1, 1), g, 0.65, 1.0)
    page = background + (ink - background).clamp_min(0.0) * x
    page = _per_image_blur(page, _u((b,), g, 0.3, 0.9))
    page = page + _u((b, 1, 1, 1), g, 0.0, 0.08) * torch.randn(x.shape, generator=g)
    return jpeg(page, g)


#: The families, in the order ``honest_mix`` applies them (pen, hand, camera or scanner).
FAMILIES: dict[str, Variation] = {
    "stroke": stroke,
    "affine": affine,
    "blur": blur,
    "faint": faint,
    "scan": scan,
    "noise": noise,
}


def honest_mix(x: Tensor, g: torch.Generator, p: float = P_FAMILY) -> Tensor:
    """Each image under a random composition of the families: each applied with probability ``p`` (in the order
    of ``FAMILIES``), at least one per image."""
    b = x.shape[0]
    chosen = torch.rand((b, len(FAMILIES)), generator=g) < p
    none = ~chosen.any(1)
    chosen[none, torch.randint(0, len(FAMILIES), (int(none.sum()),), generator=g)] = True
    out = x.clone()
    for j, fn in enumerate(FAMILIES.values()):
        idx = chosen[:, j].nonzero().flatten()
        if len(idx):
            out[idx] = fn(out[idx], g).clamp(0.0, 1.0)
    return out


def by_family(x: Tensor, g: torch.Generator) -> dict[str, Tensor]:
    """``x`` under each family alone, and under ``honest_mix`` (key ``mix``): the held-out sets a threshold is
    checked on."""
    out = {name: fn(x, g).clamp(0.0, 1.0) for name, fn in FAMILIES.items()}
    out["mix"] = honest_mix(x, g)
    return out
