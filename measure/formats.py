"""Honest digits in the formats people make them, through the server's own input path, and what the
misinformation gate makes of them (``deepdefense formats``, docs/results/format-variants.md).

Each variant starts from the victim's *test* digits (never seen by the victim, the domain score or its
threshold) and ends as what an honest user would send: the 28×28 pixels as they are, or a 200×200 PNG/JPEG
— white on black, or black on white (ink on paper) sent with the request's ``invert`` option — possibly
after a perturbation that a pen, a scanner or a camera makes (``measure.domain.PERTURBATIONS``: blurred,
noisy, off-centre, thicker and thinner strokes) or a photograph's grey, unevenly lit paper and sensor noise.
What is sent is decoded by ``server.images.instances_to_tensor``, the function ``/predict`` calls, with the
server's default image limits; the shipped domain score then says which queries the gate would answer from
the misinformation model. Per variant: the share flagged (with a 95% Wilson interval), the victim's accuracy
on the decoded digits, and the share of right labels an honest user gets through the gate (the victim's
label where not flagged — DeepDefense keeps the top-1 — and the misinformation model's where flagged), sent
anonymously and sent by one API key, 16 per request, to the default server, whose extraction monitor stops
misinforming a key's flagged queries once the key is trusted and misinforms all of them once it is escalated
(``MonitorPolicy.misinformed``, its domain-flag rules replayed).

Nothing here is fitted or tuned; Fashion-MNIST is not read.
"""

from __future__ import annotations

import base64
import io
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from deepdefense.defense.domain import DomainScore, victim_outputs
from deepdefense.server.images import ImageLimits, instances_to_tensor
from deepdefense.server.monitor import MonitorPolicy
from deepdefense.server.schemas import Instance
from deepdefense.server.settings import ServerSettings

from .domain import PERTURBATIONS

#: The side of the images an honest user sends (as in the issue's experiment: 200×200 PNGs).
SENT_SIZE = 200
#: The server's default image limits: the variants are decoded as a default server decodes them.
DEFAULT_LIMITS = ImageLimits(
    max_bytes=ServerSettings.model_fields["max_image_bytes"].default,
    max_pixels=ServerSettings.model_fields["max_image_pixels"].default,
)
JPEG_QUALITY = 75
#: Queries per request of a key's replay and of the check over HTTP.
PER_REQUEST = 16
#: A photographed page: paper brightness from PAPER_DARK to PAPER_LIGHT across the image, ink at INK.
PAPER_LIGHT, PAPER_DARK, INK = 0.95, 0.70, 0.12
#: Sensor noise of a photo, per pixel of the 200×200 image (σ, in [0, 1] units).
SENSOR_SIGMA = 0.2


# --- what an honest user sends ---------------------------------------------------------------------------------


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Values in [0, 1] → 8-bit grey levels (rounded)."""
    return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def upscaled(digit: Tensor, size: int = SENT_SIZE) -> np.ndarray:
    """A (1, 28, 28) digit in [0, 1] as a size×size float image (Pillow's bilinear upscale of its 8-bit form)."""
    img = Image.fromarray(to_uint8(digit[0].numpy())).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.float64) / 255.0


def encode(array: np.ndarray, fmt: str = "PNG") -> str:
    """An (H, W) float image in [0, 1] as base64 of an 8-bit grayscale PNG or JPEG."""
    buf = io.BytesIO()
    options = {"quality": JPEG_QUALITY} if fmt == "JPEG" else {}
    Image.fromarray(to_uint8(array)).save(buf, format=fmt, **options)
    return base64.b64encode(buf.getvalue()).decode()


def photographed(ink_on_paper: np.ndarray, g: torch.Generator) -> np.ndarray:
    """Black-on-white ``ink_on_paper`` as a phone photo of a page: grey paper lit unevenly (brightness falling
    from PAPER_LIGHT to PAPER_DARK in a random direction), ink at INK, sensor noise of σ SENSOR_SIGMA."""
    h, w = ink_on_paper.shape
    angle = float(torch.rand((), generator=g)) * 2 * math.pi
    yy, xx = np.mgrid[0:h, 0:w] / max(h - 1, 1)
    ramp = (math.cos(angle) * (xx - 0.5) + math.sin(angle) * (yy - 0.5)) / math.sqrt(0.5) + 0.5  # 0..1 (about)
    paper = PAPER_LIGHT - (PAPER_LIGHT - PAPER_DARK) * np.clip(ramp, 0.0, 1.0)
    ink = 1.0 - ink_on_paper  # 1 where the pen was
    image = paper * (1.0 - ink) + INK * ink
    return image + SENSOR_SIGMA * torch.randn((h, w), generator=g, dtype=torch.float64).numpy()


#: How a digit (white on black, 28×28, already perturbed) is drawn to be sent: a 200×200 image in [0, 1].
Drawing = Callable[[Tensor, torch.Generator], np.ndarray]


def white_on_black(digit: Tensor, g: torch.Generator) -> np.ndarray:
    return upscaled(digit)


def ink_on_paper(digit: Tensor, g: torch.Generator) -> np.ndarray:
    return 1.0 - upscaled(digit)


def with_sensor_noise(digit: Tensor, g: torch.Generator) -> np.ndarray:
    noise = SENSOR_SIGMA * torch.randn((SENT_SIZE, SENT_SIZE), generator=g, dtype=torch.float64).numpy()
    return 1.0 - upscaled(digit) + noise


def photographed_page(digit: Tensor, g: torch.Generator) -> np.ndarray:
    return photographed(1.0 - upscaled(digit), g)


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    perturbation: str | None  # a key of measure.domain.PERTURBATIONS, applied to the 28×28 digit first
    drawing: Drawing | None  # None: the 28×28 pixels are sent as they are
    invert: bool = False  # the request's invert option
    fmt: str = "PNG"

    def send(self, digit: Tensor, g: torch.Generator) -> Instance:
        """How one digit reaches the server: its pixels, or its drawing as a base64 PNG or JPEG."""
        if self.drawing is None:
            return Instance(pixels=digit.clamp(0.0, 1.0).tolist())  # a blur's float error may pass 1 by 1e-7
        return Instance(image_b64=encode(self.drawing(digit, g), self.fmt))


INK_ON_PAPER = "black on white 200×200 PNG, invert: true"
NOT_INVERTED = "black on white 200×200 PNG sent WITHOUT invert (the mistake the option is for)"
JPEG = f"black on white 200×200 JPEG (quality {JPEG_QUALITY}), invert: true"
SENSOR = f"{INK_ON_PAPER}, with Gaussian noise σ {SENSOR_SIGMA} per 200×200 pixel"
PHOTO = (
    f"black on white 200×200 JPEG of a photographed page: grey paper lit unevenly ({PAPER_LIGHT} to {PAPER_DARK}), "
    f"ink {INK}, sensor noise σ {SENSOR_SIGMA}; invert: true (a case the model card says it is not meant for)"
)


def _perturbed(name: str, on_paper: bool) -> Variant:
    doc = (PERTURBATIONS[name].__doc__ or "").split(":")[0].split(" (")[0].rstrip(".")
    what = f"{name} ({doc[:1].lower() + doc[1:]})"
    if on_paper:
        return Variant(f"{name}, ink on paper, invert", f"{what}, then {INK_ON_PAPER}", name, ink_on_paper, True)
    return Variant(f"{name}, pixels", f"{what}, sent as 28×28 pixels", name, None)


VARIANTS: tuple[Variant, ...] = (
    Variant("clean pixels", "the test digits as 28×28 pixels, white on black (the baseline)", None, None),
    Variant("clean white-on-black PNG", "white on black, upscaled to a 200×200 PNG", None, white_on_black),
    Variant("clean ink on paper, invert", INK_ON_PAPER, None, ink_on_paper, invert=True),
    Variant("clean ink on paper, no invert", NOT_INVERTED, None, ink_on_paper),
    Variant("ink on paper, JPEG, invert", JPEG, None, ink_on_paper, invert=True, fmt="JPEG"),
    *(_perturbed(name, on_paper=False) for name in PERTURBATIONS),
    *(_perturbed(name, on_paper=True) for name in PERTURBATIONS),
    Variant("sensor noise, ink on paper, invert", SENSOR, None, with_sensor_noise, invert=True),
    Variant("photographed page, invert", PHOTO, None, photographed_page, invert=True, fmt="JPEG"),
)


# --- measuring -----------------------------------------------------------------------------------------------


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The 95% Wilson score interval of a share k / n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def decoded_batches(
    variant: Variant, digits: Tensor, g: torch.Generator, limits: ImageLimits, batch: int = 500
) -> Iterator[Tensor]:
    """The variant's digits as the server decodes them (``instances_to_tensor``, as ``/predict``), in batches."""
    shape: tuple[int, int, int] = tuple(digits.shape[1:])  # type: ignore[assignment]
    for chunk in digits.split(batch):
        instances, invert = sent_instances(variant, chunk, g)
        yield instances_to_tensor(instances, shape, limits, invert=invert)


@torch.no_grad()
def measure_variant(
    variant: Variant,
    digits: Tensor,
    labels: Tensor,
    score: DomainScore,
    misinformation: nn.Module,
    g: torch.Generator,
    limits: ImageLimits = DEFAULT_LIMITS,
) -> dict[str, Any]:
    """Flag rate, victim accuracy and right labels through the gate for one variant of ``digits``."""
    flags, victim_labels, misinformed_labels = [], [], []
    for x in decoded_batches(variant, digits, g, limits):
        feats, logits = victim_outputs(score.model, x)
        flags.append((score.score_outputs(feats, logits).cpu() < score.threshold).cpu())
        victim_labels.append(logits.argmax(1))
        device = next(misinformation.parameters()).device
        misinformed_labels.append(misinformation(x.to(device)).argmax(1).cpu())
    flagged, victim, wrong = torch.cat(flags), torch.cat(victim_labels), torch.cat(misinformed_labels)
    answered = torch.where(flagged, wrong, victim)
    keyed = torch.tensor(MonitorPolicy().misinformed(flagged.tolist(), PER_REQUEST))
    n, k = len(flagged), int(flagged.sum())
    result = {"name": variant.name, "description": variant.description, "n": n, "flagged": k, "flag_rate": k / n}
    return result | {
        "flag_rate_ci95": list(wilson(k, n)),
        "victim_accuracy": float((victim == labels).double().mean()),
        "right_through_gate": float((answered == labels).double().mean()),
        "misinformed_with_key": int(keyed.sum()),
        "right_with_key": float((torch.where(keyed, wrong, victim) == labels).double().mean()),
    }


def sample_test_digits(images: Tensor, labels: Tensor, n: int, seed: int) -> tuple[Tensor, Tensor]:
    """``n`` test digits drawn without replacement by ``seed`` (all of them, in order, when n ≥ their count)."""
    if n >= len(images):
        return images, labels
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
    return images[idx], labels[idx]


def sent_instances(variant: Variant, digits: Tensor, g: torch.Generator) -> tuple[list[Instance], bool]:
    """What an honest user sends for ``digits`` in ``variant``'s format: the instances and the invert option."""
    x = PERTURBATIONS[variant.perturbation](digits, g) if variant.perturbation else digits
    return [variant.send(d, g) for d in x], variant.invert


def check_over_http(
    variant: Variant,
    digits: Tensor,
    score: DomainScore,
    checkpoint: str,
    g: torch.Generator,
    per_request: int = PER_REQUEST,
) -> dict[str, Any]:
    """The same queries counted twice: flagged offline (``instances_to_tensor`` and the domain score, as above, and
    which of them the monitor's replay misinforms for one key) and answered from the misinformation model by a real
    server on loopback (``--defense none --gate misinform``, one API key, so the monitor on as by default;
    ``dd_misinformed_answers_total`` of its /metrics), each sent as ``/predict`` requests with the invert option."""
    import httpx

    from .launcher import served

    instances, invert = sent_instances(variant, digits, g)
    shape: tuple[int, int, int] = tuple(digits.shape[1:])  # type: ignore[assignment]
    x = instances_to_tensor(instances, shape, DEFAULT_LIMITS, invert=invert)
    flags = score.flags(x).cpu()
    replayed = sum(MonitorPolicy().misinformed(flags.tolist(), per_request))
    with served(checkpoint, "none", "gradcam", gate="misinform") as (url, key), httpx.Client(timeout=120) as client:
        headers = {"Authorization": f"Bearer {key}"}  # an API key, and the operator key /metrics shows the gate to
        before = misinformed_answers(client.get(f"{url}/metrics", headers=headers).text)
        for i in range(0, len(instances), per_request):
            chunk = [inst.model_dump(exclude_none=True) for inst in instances[i : i + per_request]]
            body = {"instances": chunk, "explain": False, "invert": invert}
            client.post(f"{url}/predict", json=body, headers=headers).raise_for_status()
        after = misinformed_answers(client.get(f"{url}/metrics", headers=headers).text)
    checked = {"name": variant.name, "n": len(instances), "flagged_offline": int(flags.sum())}
    return checked | {"misinformed_replayed": replayed, "by_server": after - before}


def misinformed_answers(metrics: str) -> int:
    """``dd_misinformed_answers_total`` of a /metrics page, summed over its labels."""
    samples = [line for line in metrics.splitlines() if line.startswith("dd_misinformed_answers_total")]
    return round(sum(float(line.rsplit(" ", 1)[1]) for line in samples))


def baseline_of(earlier: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    """What of ``earlier`` (a record of this measurement with another domain score) goes beside ``record`` as its
    "before": its command, gate and per-variant flags. Refused unless both measured the same images (checkpoint,
    victim weights, digits, seed and variants) with different gates."""
    same = ("checkpoint", "victim_sha256", "dataset", "n", "seed")
    differ = [k for k in same if earlier.get(k) != record[k]]
    names = [r["name"] for r in earlier.get("variants", [])]
    if names != [r["name"] for r in record["variants"]]:
        differ.append("variants")
    if differ:
        raise ValueError(f"the baseline measured other images than this run: {', '.join(differ)} differ")
    if earlier["gate"]["sha256"] == record["gate"]["sha256"]:
        raise ValueError("the baseline used the same domain score as this run: nothing to compare")
    keep = ("name", "flag_rate", "flag_rate_ci95", "victim_accuracy", "right_through_gate")
    variants = [{k: r[k] for k in keep} for r in earlier["variants"]]
    return {"command": earlier["command"], "gate": earlier["gate"], "variants": variants}


#: The variants also sent over HTTP by ``deepdefense formats --http-check``.
HTTP_CHECKED = ("clean ink on paper, invert", "thinner, ink on paper, invert")


def run_formats(
    checkpoint: str,
    n: int,
    seed: int,
    http_check: int,
    device: torch.device,
    data_root: str | None = None,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The record of ``deepdefense formats``: ``n`` test digits of ``checkpoint``'s data set in every variant,
    through the server's input path, counted by the shipped domain score; ``http_check`` of them in the variants
    of :data:`HTTP_CHECKED` through a real server on loopback too."""
    from deepdefense.defense.domain import load_domain_score
    from deepdefense.defense.misinformation import load_misinformation
    from deepdefense.models.checkpoint import load_checkpoint
    from deepdefense.models.data import load_split

    started = time.time()
    model, meta = load_checkpoint(checkpoint, device=device)
    model.requires_grad_(False)
    score, score_meta = load_domain_score(checkpoint, model, device)
    misinformation, _ = load_misinformation(checkpoint, device=device)
    misinformation.eval().requires_grad_(False)
    images, labels = load_split(meta.dataset, data_root, "test").tensors  # type: ignore[attr-defined]
    digits, labels = sample_test_digits(images, labels, n, seed)
    results = []
    for i, variant in enumerate(VARIANTS):  # each variant its own generator: the figures do not depend on the order
        g = torch.Generator().manual_seed(seed + i)
        r = measure_variant(variant, digits, labels, score, misinformation, g)
        results.append(r)
        progress(f"  {variant.name:38s} flagged {100 * r['flag_rate']:6.2f}%  victim {100 * r['victim_accuracy']:6.2f}%"
                 f"  right through the gate {100 * r['right_through_gate']:6.2f}%")  # fmt: skip
    checks: list[dict[str, Any]] = []
    if http_check:
        for variant in [v for v in VARIANTS if v.name in HTTP_CHECKED]:
            g = torch.Generator().manual_seed(seed + 1000 + len(checks))
            checks.append(check_over_http(variant, digits[:http_check], score, checkpoint, g))
            progress(f"  over HTTP: {checks[-1]}")
    return {
        "seed": seed,
        "checkpoint": checkpoint,
        "victim_sha256": meta.sha256,
        "dataset": meta.dataset,
        "n": len(digits),
        "gate": {"method": score_meta.method, "threshold": score_meta.threshold, "sha256": score_meta.sha256},
        "variants": results,
        "http_check": checks,
        "seconds": round(time.time() - started, 1),
    }
