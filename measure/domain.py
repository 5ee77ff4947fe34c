"""Measuring a domain score (``defense.domain``) after the choice: the images it is measured on and the evaluation
behind ``deepdefense domain``.

Two stages, kept apart so that the choice never sees the evaluation's data:

1. **Selection** (``defense/fitting/domain_choice.py``: ``compare_candidates``, ``select_method``) uses only the
   victim's training split.
2. **Evaluation** (``evaluate_candidates``, here) on data no score saw and the selection did not use: the
   victim's test split (in-domain), foreign test images (Fashion-MNIST), rendered letters and symbols
   and drawn geometric shapes (``render_symbols``, ``draw_shapes``: kinds unlike any fitting outlier),
   and honest-but-perturbed test digits (``PERTURBATIONS``); AUROC as the selection's
   (``defense.fitting.domain_choice.auroc``).
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor, nn
from torchvision.transforms.functional import gaussian_blur

from deepdefense.clients.jbda import jacobian_augmentation
from deepdefense.defense.domain import victim_outputs
from deepdefense.defense.fitting.domain_choice import Candidate, auroc, flagged
from deepdefense.models.checkpoint import CheckpointMeta
from deepdefense.models.data import load_split

# --- perturbations ---------------------------------------------------------------------------------------------


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
    f.__name__: f for f in (blurred, noisy, shifted, thicker, thinner)
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
        out[i, 0] = _pixels(img)
    return out


def _pixels(img: Image.Image) -> Tensor:
    """A square 8-bit image as a float tensor in [0, 1]."""
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(img.height, img.width).float() / 255.0


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
        out[i, 0] = _pixels(img.resize((size, size), Image.Resampling.BOX))
    return out


def jbda_like(model: nn.Module, x: Tensor, step: float = 0.1) -> Tensor:
    """One Jacobian-augmentation step from digits ``x`` (Papernot et al. 2017, as ``clients.jbda``), with the victim
    as the substitute and its own labels: x + λ·sgn(∂F(x)_y/∂x), what a JBDA thief's first round sends."""
    with torch.no_grad():
        labels = model(x).argmax(1).cpu()
    with torch.enable_grad():
        return jacobian_augmentation(model, x, labels, step)


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


def evaluate_domain(
    model: nn.Module,
    victim: CheckpointMeta,
    candidates: Mapping[str, Candidate],
    jbda_seeds: Tensor,
    *,
    data_root: Any,
    ood_dataset: str,
    n_constructed: int,
    seed: int,
    progress: bool = False,
) -> dict[str, Any]:
    """``deepdefense domain``'s stage 2, after the choice is made: ``evaluate_candidates`` on the victim's test split,
    foreign test images (``ood_dataset``), ``n_constructed`` rendered symbols and drawn shapes, JBDA-like steps from
    ``jbda_seeds`` (held-out training digits) and perturbed test digits."""
    test_x, test_y = load_split(victim.dataset, data_root, "test").tensors  # type: ignore[attr-defined]
    foreign = load_split(ood_dataset, data_root, "test").tensors[0]  # type: ignore[attr-defined]
    g = torch.Generator().manual_seed(seed + 4)
    ood = {
        f"{ood_dataset} test": foreign,
        "symbols (PIL font)": render_symbols(n_constructed, g),
        "shapes (PIL draw)": draw_shapes(n_constructed, g),
        "JBDA-like (held-out train + 0.1·sign ∇)": jbda_like(model, jbda_seeds),
    }
    perturbed = {name: fn(test_x, g) for name, fn in PERTURBATIONS.items()}
    return evaluate_candidates(model, candidates, test_x, test_y, ood, perturbed, progress=progress)
