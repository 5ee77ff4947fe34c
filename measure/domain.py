"""Measuring a domain score (``defense.domain``): AUROC, the images it is measured on, and the candidate
comparison behind ``deepdefense domain``.

Two stages, kept apart so that the choice never sees the evaluation's data:

1. **Selection** (``compare_candidates``, ``select_method``) uses only the victim's training split: a
   held-out part of it (threshold and false-positive rate), synthetic outliers made from that part
   (detection; a fitted detector is measured on each kind with a copy fitted without that kind), and
   a handwriting-like elastic variation of it (``handwriting_elastic``: honest digits the threshold
   never saw, to count false flags).
2. **Evaluation** (``evaluate_candidates``) on data no score saw and the selection did not use: the
   victim's test split (in-domain), foreign test images (Fashion-MNIST), rendered letters and symbols
   and drawn geometric shapes (``render_symbols``, ``draw_shapes``: kinds unlike any fitting outlier),
   and honest-but-perturbed test digits (``PERTURBATIONS``).

AUROC (``auroc``) treats in-domain images as positives: the chance that an in-domain image scores
higher than an out-of-domain one, ties counting one half (Mann–Whitney U).
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor, nn
from torchvision.transforms.functional import gaussian_blur
from tqdm import tqdm

from clients.jbda import jacobian_augmentation
from defense.domain import FitFeatures, fit_scorer, honest_threshold, victim_outputs

# --- AUROC ---------------------------------------------------------------------------------------------------


def average_ranks(values: Tensor) -> Tensor:
    """1-based ranks of ``values``, tied values sharing the mean of their ranks."""
    _, inverse, counts = torch.unique(values.double(), return_inverse=True, return_counts=True)
    before = torch.cumsum(counts, 0) - counts  # how many values are smaller than each distinct value
    return (before + (counts + 1) / 2.0).double()[inverse]


def auroc(pos: Tensor, neg: Tensor) -> float:
    """P(a positive scores above a negative) + ½ P(tie), from the Mann–Whitney U of the pooled ranks."""
    n_pos, n_neg = len(pos), len(neg)
    if not n_pos or not n_neg:
        raise ValueError("AUROC needs at least one positive and one negative score")
    ranks = average_ranks(torch.cat([pos.flatten(), neg.flatten()]))
    u = float(ranks[:n_pos].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def flagged(scores: Tensor, threshold: float) -> float:
    """The share of ``scores`` below ``threshold`` (what the score flags)."""
    return float((scores < threshold).double().mean())


# --- honest variation and perturbations ------------------------------------------------------------------------


def _grid(b: int, h: int, w: int) -> Tensor:
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    return torch.stack((xs, ys), dim=-1).expand(b, h, w, 2)


def handwriting_elastic(x: Tensor, g: torch.Generator, alpha: float = 1.0, cells: int = 4) -> Tensor:
    """A smooth elastic deformation of about ``alpha`` pixels (Simard et al. 2003's handwriting variation):
    honest digits unlike any image the victim or a score was fitted on (the victim stays 98.9% accurate on
    held-out training digits). Used by the selection only."""
    b, _, h, w = x.shape
    coarse = torch.randn((b, 2, cells, cells), generator=g)
    field_ = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    return F.grid_sample(x, _grid(b, h, w) + alpha * 2.0 / (w - 1) * field_, align_corners=True).clamp(0.0, 1.0)


def blurred(x: Tensor, g: torch.Generator) -> Tensor:
    """Gaussian blur, σ = 1 pixel."""
    return gaussian_blur(x, kernel_size=[5, 5], sigma=[1.0, 1.0])


def noisy(x: Tensor, g: torch.Generator) -> Tensor:
    """Additive Gaussian noise, σ = 0.2, clipped to [0, 1]."""
    return (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(0.0, 1.0)


def shifted(x: Tensor, g: torch.Generator, max_shift: int = 4) -> Tensor:
    """Translated by an integer offset in [−4, 4]² (twice the victim's training shift), zero-filled."""
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b), generator=g)
    out = torch.empty_like(x)
    for i in range(b):
        out[i] = padded[i, :, int(dy[i]) : int(dy[i]) + h, int(dx[i]) : int(dx[i]) + w]
    return out


def thicker(x: Tensor, g: torch.Generator) -> Tensor:
    """Grey-level dilation with a 3×3 square: strokes one pixel wider on each side."""
    return F.max_pool2d(x, 3, stride=1, padding=1)


def thinner(x: Tensor, g: torch.Generator) -> Tensor:
    """Grey-level erosion with a 2×2 square: strokes one pixel narrower, about half the ink gone."""
    padded = F.pad(x, (0, 1, 0, 1), value=0.0)
    h, w = x.shape[-2:]
    return torch.stack([padded[..., dy : dy + h, dx : dx + w] for dy in (0, 1) for dx in (0, 1)]).amin(0)


#: Honest-but-perturbed digits: an honest user's image after a camera, a scanner or another pen.
PERTURBATIONS: dict[str, Callable[[Tensor, torch.Generator], Tensor]] = {
    "blurred": blurred,
    "noisy": noisy,
    "shifted": shifted,
    "thicker": thicker,
    "thinner": thinner,
}


# --- constructed out-of-domain sets ----------------------------------------------------------------------------

SYMBOLS = string.ascii_letters + "#$%&@?!+*=<>/\\{}[]~^"


def render_symbols(n: int, g: torch.Generator, size: int = 28) -> Tensor:
    """``n`` letters and symbols in PIL's default font (``ImageFont.load_default``), white on black, at a
    random font size (16–26), centred by their bounding box with up to 2 pixels of jitter."""
    out = torch.empty((n, 1, size, size))
    chars = torch.randint(0, len(SYMBOLS), (n,), generator=g)
    sizes = torch.randint(16, 27, (n,), generator=g)
    jitter = torch.randint(-2, 3, (n, 2), generator=g)
    fonts: dict[int, Any] = {}
    for i in range(n):
        s = int(sizes[i])
        font = fonts.setdefault(s, ImageFont.load_default(size=s))
        char = SYMBOLS[int(chars[i])]
        img = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(img)
        left, top, right, bottom = draw.textbbox((0, 0), char, font=font)
        x0 = (size - (right - left)) / 2 - left + int(jitter[i, 0])
        y0 = (size - (bottom - top)) / 2 - top + int(jitter[i, 1])
        draw.text((x0, y0), char, fill=255, font=font)
        out[i, 0] = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size).float() / 255.0
    return out


SHAPES = ("ellipse", "rectangle", "triangle", "star", "cross")


def draw_shapes(n: int, g: torch.Generator, size: int = 28, scale: int = 4) -> Tensor:
    """``n`` geometric shapes (ellipses, rectangles, triangles, stars, crosses), outlined or filled, of random
    size and place, drawn white on black at ``scale``× and downsampled (anti-aliased like a digit)."""
    big = size * scale
    out = torch.empty((n, 1, size, size))

    def r(low: float, high: float) -> float:
        return float(torch.rand((), generator=g)) * (high - low) + low

    for i in range(n):
        img = Image.new("L", (big, big), 0)
        draw = ImageDraw.Draw(img)
        kind = SHAPES[int(torch.randint(0, len(SHAPES), (), generator=g))]
        cx, cy, rad = r(0.35, 0.65) * big, r(0.35, 0.65) * big, r(0.2, 0.4) * big
        filled = bool(torch.rand((), generator=g) < 0.4)
        width = int(r(1.5, 3.5) * scale)
        rot = r(0, 2 * math.pi)
        fill, outline = (255, None) if filled else (None, 255)
        if kind == "ellipse":
            box = [cx - rad, cy - rad * r(0.5, 1.0), cx + rad, cy + rad * r(0.5, 1.0)]
            draw.ellipse(box, fill=fill, outline=outline, width=width)
        elif kind == "rectangle":
            box = [cx - rad, cy - rad * r(0.4, 1.0), cx + rad, cy + rad * r(0.4, 1.0)]
            draw.rectangle(box, fill=fill, outline=outline, width=width)
        elif kind in ("triangle", "star"):
            corners = 3 if kind == "triangle" else 10
            pts = []
            for k in range(corners):
                rr = rad if kind == "triangle" or k % 2 == 0 else rad * 0.45
                a = rot + 2 * math.pi * k / corners
                pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
            draw.polygon(pts, fill=fill, outline=outline, width=width)
        else:
            for a in (rot, rot + math.pi / 2):
                dx, dy = rad * math.cos(a), rad * math.sin(a)
                draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=255, width=width)
        small = img.resize((size, size), Image.Resampling.BOX)
        out[i, 0] = torch.frombuffer(bytearray(small.tobytes()), dtype=torch.uint8).view(size, size).float() / 255.0
    return out


def jbda_like(model: nn.Module, x: Tensor, step: float = 0.1) -> Tensor:
    """One Jacobian-augmentation step from digits ``x`` (Papernot et al. 2017, as ``clients.jbda``), with the victim
    as the substitute and its own labels: x + λ·sgn(∂F(x)_y/∂x), what a JBDA thief's first round sends."""
    with torch.no_grad():
        labels = model(x).argmax(1).cpu()
    with torch.enable_grad():
        return jacobian_augmentation(model, x, labels, step)


# --- stage 1: candidates compared on training data only --------------------------------------------------------


@dataclass
class Candidate:
    """One method, fitted, with its threshold and what the selection measured of it."""

    method: str
    scorer: nn.Module
    threshold: float
    fpr_held_out: float
    detection: dict[str, float] = field(default_factory=dict)  # kind → share of held-out outliers flagged
    auroc: dict[str, float] = field(default_factory=dict)  # kind → AUROC against the held-out images
    honest_false_flags: float = 0.0  # share of handwriting-elastic held-out digits flagged
    variant_false_flags: dict[str, float] = field(default_factory=dict)  # honest-variant family → share flagged
    unseen_kinds: bool = False  # detection measured with a copy fitted without each kind

    @property
    def mean_detection(self) -> float:
        return sum(self.detection.values()) / len(self.detection)

    @property
    def utility(self) -> float:
        """The selection's criterion: outliers caught minus honest digits flagged, each counted once."""
        return self.mean_detection - self.honest_false_flags

    def summary(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "threshold": self.threshold,
            "fpr_held_out": self.fpr_held_out,
            "detection": self.detection,
            "auroc": self.auroc,
            "mean_detection": self.mean_detection,
            "honest_false_flags": self.honest_false_flags,
            "variant_false_flags": self.variant_false_flags,
            "utility": self.utility,
            "unseen_kinds": self.unseen_kinds,
        }


@dataclass
class HeldOut:
    """Victim outputs on the held-out training images, on outliers made from them, on an honest variation (the
    selection's check) and on the honest-variant families the threshold is held to (``variants``: family →
    (features, logits), empty when the score is fitted without them)."""

    feats: Tensor
    logits: Tensor
    feats_out: Tensor
    logits_out: Tensor
    kind_out: Tensor
    feats_honest: Tensor
    logits_honest: Tensor
    variants: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)


def compare_candidates(
    methods: tuple[str, ...] | list[str],
    data: FitFeatures,
    held: HeldOut,
    num_classes: int,
    *,
    fpr: float,
    variant_fpr: float = 0.01,
    seed: int,
    progress: bool = False,
) -> dict[str, Candidate]:
    """Fit every method on ``data``, choose its threshold on the held-out images (at most ``fpr`` of them and
    ``variant_fpr`` of each family of ``held.variants`` flagged), and measure it on the held-out outliers and
    honest variation. A method that sees outliers when fitted (``detector``) is
    measured on each kind by a copy fitted without that kind; the returned scorer is fitted on all kinds."""
    out: dict[str, Candidate] = {}
    for method in methods:
        g = torch.Generator().manual_seed(seed)
        scorer = fit_scorer(method, data, num_classes, g, progress=progress)
        s_held = scorer(held.feats, held.logits)
        threshold = honest_threshold(s_held, fpr, _variant_scores(scorer, held), variant_fpr)
        cand = Candidate(method, scorer, threshold, flagged(s_held, threshold))
        cand.honest_false_flags = flagged(scorer(held.feats_honest, held.logits_honest), threshold)
        cand.variant_false_flags = {k: flagged(s, threshold) for k, s in _variant_scores(scorer, held).items()}
        cand.unseen_kinds = method == "detector"
        bar = tqdm(data.kinds, desc=f"select: {method}", unit="kind", disable=not progress, leave=False)
        for i, kind in enumerate(bar):
            mask = held.kind_out == i
            if cand.unseen_kinds:  # a copy that never saw this kind, thresholded the same way
                copy = fit_scorer(method, data, num_classes, torch.Generator().manual_seed(seed), leave_out=kind)
                s_in = copy(held.feats, held.logits)
                t = honest_threshold(s_in, fpr, _variant_scores(copy, held), variant_fpr)
            else:
                copy, s_in, t = scorer, s_held, threshold
            s_out = copy(held.feats_out[mask], held.logits_out[mask])
            cand.detection[kind] = flagged(s_out, t)
            cand.auroc[kind] = auroc(s_in, s_out)
        out[method] = cand
    return out


def _variant_scores(scorer: nn.Module, held: HeldOut) -> dict[str, Tensor]:
    return {name: scorer(f, lg) for name, (f, lg) in held.variants.items()}


def select_method(candidates: Mapping[str, Candidate]) -> str:
    """The candidate with the highest utility (mean detection of held-out outlier kinds minus the share of
    honest variations flagged); ties go to the earlier, simpler one."""
    return max(candidates, key=lambda m: (round(candidates[m].utility, 6), -list(candidates).index(m)))


# --- stage 2: evaluation on data nothing was fitted or selected on ---------------------------------------------


@torch.no_grad()
def evaluate_candidates(
    model: nn.Module,
    candidates: Mapping[str, Candidate],
    in_domain: Tensor,
    in_labels: Tensor,
    ood: Mapping[str, Tensor],
    perturbed: Mapping[str, Tensor],
    *,
    progress: bool = False,
) -> dict[str, Any]:
    """Per candidate: the false-positive rate on ``in_domain`` at its threshold, AUROC and detection rate
    against each ``ood`` set, and false flags on each ``perturbed`` version of ``in_domain`` (with the
    victim's accuracy on it, to show the digits stay readable)."""
    sets = {"in_domain": in_domain, **{f"ood:{k}": v for k, v in ood.items()}}
    sets |= {f"perturbed:{k}": v for k, v in perturbed.items()}
    outputs = {name: victim_outputs(model, x, progress=progress, desc=f"victim: {name}") for name, x in sets.items()}
    accuracy = {
        name.split(":", 1)[-1]: float((logits.argmax(1) == in_labels).double().mean())
        for name, (_, logits) in outputs.items()
        if name == "in_domain" or name.startswith("perturbed:")
    }
    result: dict[str, Any] = {"victim_accuracy": accuracy, "sizes": {k: len(v) for k, v in sets.items()}, "methods": {}}
    for method, cand in candidates.items():
        scores = {name: cand.scorer(f, lg) for name, (f, lg) in outputs.items()}
        s_in, t = scores["in_domain"], cand.threshold
        result["methods"][method] = {
            "threshold": t,
            "fpr_in_domain": flagged(s_in, t),
            "auroc": {k: auroc(s_in, scores[f"ood:{k}"]) for k in ood},
            "detection": {k: flagged(scores[f"ood:{k}"], t) for k in ood},
            "false_flags": {k: flagged(scores[f"perturbed:{k}"], t) for k in perturbed},
        }
    return result
