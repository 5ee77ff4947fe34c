"""What a defense costs benign users and how far it moves the gradients, measured on real images.

For each image: top-1 agreement with the victim, the L_orth the engine reached (eq. 5; 1 at the
victim), Spearman's rank correlation between the victim's and the answered attribution maps,
the L1 change of the probabilities, fallbacks, optimisation steps and milliseconds per query.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass

from torch import Tensor
from tqdm import tqdm

from deepdefense.defense.api import Defense, NoDefense
from deepdefense.defense.losses import spearman as rank_correlation


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's ρ, NaN when a map is constant (so that it is left out of the median)."""
    constant = bool(a.reshape(-1).min() == a.reshape(-1).max()) or bool(b.reshape(-1).min() == b.reshape(-1).max())
    return math.nan if constant else float(rank_correlation(a, b))


@dataclass
class Fidelity:
    n: int
    top1_agreement: float  # percent of queries whose answered top-1 is the victim's
    mean_l_orth: float  # mean L_orth reached (eq. 5); 1.0 means no misdirection
    median_spearman: float
    mean_l1_probabilities: float
    fallbacks: int
    ms_per_query: float
    mean_steps: float  # optimisation steps per query (below the cap when the engine stops early)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def measure_fidelity(defense: Defense, images: Tensor, batch_size: int = 1, progress: bool = True) -> Fidelity:
    victim = NoDefense(defense.model, defense.interpreter)
    agree, l_orth, rho, l1, steps, fallbacks, seconds = 0, [], [], [], [], 0, 0.0
    batches = range(0, len(images), batch_size)
    for start in tqdm(batches, desc=f"fidelity {defense.name}", unit="batch", disable=not progress):
        x = images[start : start + batch_size]
        reference = victim.answer(x)
        began = time.perf_counter()
        answers = defense.answer(x)
        seconds += time.perf_counter() - began
        for ref, ans in zip(reference, answers, strict=True):
            agree += int(ans.probabilities.argmax()) == ref.label == ans.label
            l_orth.append(ans.stats.get("l_orth", 1.0))
            steps.append(ans.stats.get("steps", 0.0))
            rho.append(spearman(ref.attribution, ans.attribution))
            l1.append(float((ans.probabilities - ref.probabilities).abs().sum()))
            fallbacks += int(ans.fallback)
    finite_rho = [r for r in rho if not math.isnan(r)]
    return Fidelity(
        n=len(images),
        top1_agreement=100.0 * agree / len(images),
        mean_l_orth=statistics.fmean(l_orth),
        median_spearman=statistics.median(finite_rho) if finite_rho else math.nan,
        mean_l1_probabilities=statistics.fmean(l1),
        fallbacks=fallbacks,
        ms_per_query=1000.0 * seconds / len(images),
        mean_steps=statistics.fmean(steps),
    )
