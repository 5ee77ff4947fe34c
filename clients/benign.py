"""A benign user (``deepdefense client``): in-distribution test images, one request at a time.

Reports what a defense costs honest users: top-1 agreement with the true labels and with the
undefended victim (the checkpoint loaded locally behind ``NoDefense``), the top-1 probability of the
answers beside the victim's (a defense that keeps the label may still lower it), and the latency of each
request as percentiles (p50/p95/p99 by nearest rank, max, mean).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from torch import Tensor
from tqdm import tqdm

from deepdefense.clients.latency import percentiles
from deepdefense.clients.oracle import Oracle
from deepdefense.defense.api import NoDefense


@dataclass
class BenignReport:
    n: int
    requests: int
    batch_size: int
    explain: bool
    accuracy: float  # percent of answers whose label is the true label
    agreement_undefended: float  # percent of answers whose label is the undefended victim's
    latency_ms: dict[str, float]  # p50, p95, p99 (nearest rank), max and mean per request
    top1_probability: dict[str, float]  # the answers' top-1 probability: :func:`low_tail`
    top1_probability_undefended: dict[str, float]  # the victim's on the same images

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def low_tail(values: list[float]) -> dict[str, float]:
    """min, p10, p25 (nearest rank) and median of ``values``, and the percent of them below 0.9 (3 decimals)."""
    ordered = sorted(values)

    def rank(q: float) -> float:
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

    summary = {"min": ordered[0], "p10": rank(0.10), "p25": rank(0.25), "median": rank(0.50)}
    summary["percent_below_0.9"] = 100.0 * sum(v < 0.9 for v in ordered) / len(ordered)
    return {k: round(v, 3) for k, v in summary.items()}


def latency_summary(seconds: list[float]) -> dict[str, float]:
    """:func:`clients.latency.percentiles` of request times, in milliseconds (3 decimals)."""
    return {k: round(v, 3) for k, v in percentiles([1000.0 * s for s in seconds]).items()}


def run_benign(
    oracle: Oracle,
    images: Tensor,
    labels: Tensor,
    undefended: NoDefense,
    *,
    batch_size: int = 1,
    explain: bool = True,
    progress: bool = True,
) -> BenignReport:
    """Query ``images`` in requests of ``batch_size`` and compare the answers with ``labels`` and ``undefended``."""
    device = next(undefended.model.parameters()).device
    correct = agree = 0
    seconds: list[float] = []
    served_p: list[float] = []
    victim_p: list[float] = []
    for start in tqdm(range(0, len(images), batch_size), desc="benign queries", unit="request", disable=not progress):
        x = images[start : start + batch_size]
        began = time.perf_counter()
        reply = oracle.query(x, explain=explain)
        seconds.append(time.perf_counter() - began)
        victim = undefended.answer(x.to(device), explain=False)
        reference = torch.tensor([a.label for a in victim])
        served_p += reply.probabilities.max(dim=1).values.tolist()
        victim_p += [float(a.probabilities.max()) for a in victim]
        correct += int((reply.labels == labels[start : start + batch_size]).sum())
        agree += int((reply.labels == reference).sum())
    return BenignReport(
        n=len(images),
        requests=len(seconds),
        batch_size=batch_size,
        explain=explain,
        accuracy=100.0 * correct / len(images),
        agreement_undefended=100.0 * agree / len(images),
        latency_ms=latency_summary(seconds),
        top1_probability=low_tail(served_p),
        top1_probability_undefended=low_tail(victim_p),
    )
