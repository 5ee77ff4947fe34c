"""What an Ensemble of Diverse Models (defense/baselines/edm.py) answers: in domain, where its members should
agree with each other and with the victim, and out of domain, where they should not agree with each other.

The served answer of a query is its hashed member's (``member_index``), exactly as the server answers it;
coherence is max_{a≠b} CS of the members' probability vectors (1: they all point the same way).

Coherence is the worst pair of N(N−1)/2, so it rises with N by itself and does not compare ensembles of
different sizes. What does is the *served similarity*: the expected CS between the answers a query gets
from two independent hash draws, 1/N · 1 + (1 − 1/N) · mean_{a≠b} CS(p_a, p_b) — two queries that land on
the same member (chance 1/N) get proportional answers, two that land on different members get that pair's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from deepdefense.defense.baselines.edm import coherence, member_index, pairwise_cosine
from deepdefense.defense.fitting.edm import HeldOut
from deepdefense.measure.agreement import percent, probabilities


def member_probabilities(members: Sequence[nn.Module], images: Tensor, batch_size: int = 1000) -> Tensor:
    """Every member's softmax outputs (N, B, K), on the CPU."""
    return torch.stack([probabilities(m, images, batch_size) for m in members])


def served(p: Tensor, images: Tensor) -> Tensor:
    """The served probabilities (B, K): for each query, the row of the member its hash picks."""
    picks = member_index(images, p.shape[0])
    return p[picks, torch.arange(p.shape[1])]


def _mean(values: Tensor) -> float:
    return round(float(values.double().mean()), 4)


def served_similarity(p: Tensor) -> Tensor:
    """1/N + (1 − 1/N) · mean_{a≠b} CS(p_a, p_b) per query for the members' probabilities ``p`` (N, B, K): the
    expected CS of the answers two independent member draws give the same query; shape (B,)."""
    n = p.shape[0]
    return 1.0 / n + (1.0 - 1.0 / n) * pairwise_cosine(p).mean(0)


def spread(p: Tensor) -> dict[str, float]:
    """How far the members are apart on a set of queries: mean and median coherence, the mean served
    similarity (comparable across N), and the share (percent) of queries whose members do not all give the
    same top-1."""
    c = coherence(p)
    top1 = p.argmax(-1)
    return {
        "coherence_mean": _mean(c),
        "coherence_median": round(float(c.double().median()), 4),
        "served_similarity_mean": _mean(served_similarity(p)),
        "members_disagree_top1_pct": percent((top1 != top1[0]).any(0)),
    }


def measure_held_out(members: Sequence[nn.Module], held: HeldOut) -> dict[str, Any]:
    """The figures N and λ_D are chosen on (training images never fitted, outliers made from them): the
    members' and the served ensemble's accuracy, and how the members spread in domain and on the outliers."""
    p_in, p_out = member_probabilities(members, held.x), member_probabilities(members, held.outliers)
    c_out = coherence(p_out)
    return {
        "n": len(held.x),
        "member_accuracy": [percent(p.argmax(-1) == held.y) for p in p_in],
        "served_accuracy": percent(served(p_in, held.x).argmax(-1) == held.y),
        "in_domain": spread(p_in),
        "outliers": spread(p_out),
        "outliers_coherence_by_kind": {k: _mean(c_out[held.kind == i]) for i, k in enumerate(held.kinds)},
    }


def measure_test(victim: nn.Module, members: Sequence[nn.Module], x: Tensor, y: Tensor) -> dict[str, Any]:
    """On the victim's test split: each member's and the served ensemble's accuracy, the served answers'
    top-1 agreement with the victim's, the members' spread and how many queries each member answers."""
    p = member_probabilities(members, x)
    answer = served(p, x)
    p_victim = probabilities(victim, x)
    counts = torch.bincount(member_index(x, len(members)), minlength=len(members))
    return {
        "n": len(x),
        "victim_accuracy": percent(p_victim.argmax(-1) == y),
        "member_accuracy": [percent(q.argmax(-1) == y) for q in p],
        "served_accuracy": percent(answer.argmax(-1) == y),
        "served_agreement_with_victim": percent(answer.argmax(-1) == p_victim.argmax(-1)),
        **spread(p),
        "answered_by_member": counts.tolist(),
    }


def measure_foreign(victim: nn.Module, members: Sequence[nn.Module], x: Tensor, dataset: str) -> dict[str, Any]:
    """On a foreign data set's images (measured only, after N and λ_D were chosen; never trained on): the
    members' spread and the served answers' top-1 agreement with the victim's."""
    p = member_probabilities(members, x)
    return {
        "dataset": dataset,
        "n": len(x),
        **spread(p),
        "served_agreement_with_victim": percent(served(p, x).argmax(-1) == probabilities(victim, x).argmax(-1)),
    }
