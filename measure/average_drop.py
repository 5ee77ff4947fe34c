"""Average Drop of attribution maps (Chattopadhyay et al., "Grad-CAM++: Generalized Gradient-based
Visual Explanations for Deep Convolutional Networks", WACV 2018), as DeepDefense §5 / Table 2 uses it.

For image i explained for class c (the victim's top-1), Y_c is the victim's softmax probability of
c on the image and O_c its probability of c on the masked image, in which every pixel outside the
top p% of the map is set to 0 (p = 15, after Selvaraju et al.'s Grad-CAM evaluation):

    Average Drop = (1/N) Σ_i max(0, Y_c − O_c) / Y_c          (lower is better; × 100 for percent)

Masking, exactly: the map (H, W) is at the image's resolution; its H·W values are ranked in
decreasing order with ties broken by the pixel's row-major index (a stable sort), and the first
round(p/100 · H·W) pixels are kept (118 of 784 for MNIST at p = 15). Kept pixels keep their value
in every channel; all others are set to 0 in the [0, 1] pixel space the model takes (black, the
MNIST background), before the model's own normalisation. Both maps — the victim's I and the
misdirection model's Ĩ — are scored by the same victim model, so the difference measures the map
alone. The two per-image drop vectors are compared with a paired t-test (scipy.stats.ttest_rel).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from scipy import stats
from torch import Tensor, nn

from deepdefense.measure.agreement import probabilities


def keep_count(pixels: int, p: float) -> int:
    """Pixels kept for the top p% of a map of ``pixels`` values: round(p/100 · pixels), at least 1."""
    if not 0 < p <= 100:
        raise ValueError(f"p must be in (0, 100], got {p}")
    return max(1, round(p / 100 * pixels))


def top_p_mask(maps: Tensor, p: float) -> Tensor:
    """Boolean masks (N, H, W) of the top p% values of each map (N, H, W); ties broken by row-major index."""
    flat = maps.reshape(len(maps), -1)
    k = keep_count(flat.shape[1], p)
    order = torch.argsort(flat, dim=1, descending=True, stable=True)[:, :k]
    mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, order, True)
    return mask.view_as(maps)


def mask_images(images: Tensor, maps: Tensor, p: float) -> Tensor:
    """Images (N, C, H, W) with every pixel outside the top p% of its map (N, H, W) set to 0."""
    if images.shape[0] != maps.shape[0] or images.shape[-2:] != maps.shape[-2:]:
        raise ValueError(f"images {list(images.shape)} and maps {list(maps.shape)} do not match")
    return images * top_p_mask(maps, p).unsqueeze(1).to(images.dtype)


def drops(full: Tensor, masked: Tensor) -> Tensor:
    """Per-image drop max(0, Y_c − O_c) / Y_c for scores Y_c (N,) on the images and O_c (N,) on the masked ones."""
    return (full - masked).clamp_min(0) / full


def class_scores(model: nn.Module, images: Tensor, classes: Tensor, batch_size: int = 1000) -> Tensor:
    """Softmax probability of class ``classes[i]`` for each image (N,)."""
    return probabilities(model, images, batch_size).gather(1, classes.cpu()[:, None])[:, 0]


def image_drops(model: nn.Module, images: Tensor, maps: Tensor, classes: Tensor, p: float = 15.0) -> Tensor:
    """Per-image drops (N,) of ``model`` for class ``classes`` when only the top p% of ``maps`` is kept."""
    return drops(class_scores(model, images, classes), class_scores(model, mask_images(images, maps, p), classes))


@dataclass
class PairedTest:
    """Paired t-test of two per-image measurements (scipy.stats.ttest_rel); NaN statistic and p-value
    (written as null) when every difference is zero, e.g. when a defense returns the victim's maps."""

    n: int
    mean_difference: float  # mean of a − b
    t: float
    p_value: float

    def as_dict(self) -> dict[str, float | int | None]:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def paired_ttest(a: Tensor, b: Tensor) -> PairedTest:
    """Paired two-sided t-test of a against b (same images, same order)."""
    if a.shape != b.shape or a.dim() != 1 or len(a) < 2:
        raise ValueError("paired_ttest needs two 1-D samples of the same length ≥ 2")
    diff = (a - b).double()
    if bool((diff == 0).all()):
        return PairedTest(n=len(a), mean_difference=0.0, t=math.nan, p_value=math.nan)
    result = stats.ttest_rel(a.double().numpy(), b.double().numpy())
    return PairedTest(len(a), float(diff.mean()), t=float(result.statistic), p_value=float(result.pvalue))


def summary(values: Tensor) -> dict[str, float]:
    """Mean and (sample) standard deviation, as Table 2 reports them (mean ± std, fractions)."""
    return {"mean": float(values.double().mean()), "std": float(values.double().std()) if len(values) > 1 else 0.0}
