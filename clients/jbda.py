"""Jacobian-based dataset augmentation (JBDA; Papernot et al., "Practical Black-Box Attacks against
Machine Learning", AsiaCCS 2017, Algorithm 1).

From a small seed set S_0, for ρ = 0 … max_ρ − 1: label S_ρ with the oracle, train the substitute F
on everything labelled so far, and augment

    S_{ρ+1} = {x + λ · sgn(J_F[Õ(x)]) : x ∈ S_ρ} ∪ S_ρ,

where J_F[Õ(x)] is the gradient of F's softmax output for the oracle's label. Only the new half of
each S_{ρ+1} is queried, so the budget after ρ rounds is |S_0| · 2^ρ; the last round is cut to
the query budget. Each round's new points are stored (``TransferStore.plan``) before they are
sent, so a resumed attack sends exactly the points the interrupted one would have sent.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from deepdefense.clients.oracle import Oracle
from deepdefense.clients.transfer import TransferSet, TransferStore, collect


def jacobian_augmentation(model: nn.Module, x: Tensor, labels: Tensor, step: float, chunk: int = 256) -> Tensor:
    """x + λ·sgn(∂F(x)_y/∂x) for the substitute's softmax F and the oracle's labels y, kept in [0, 1]."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for xc, yc in zip(x.split(chunk), labels.split(chunk), strict=True):
        xc = xc.to(device).requires_grad_(True)
        score = model(xc).softmax(-1).gather(1, yc.to(device)[:, None]).sum()
        (g,) = torch.autograd.grad(score, xc)
        out.append((xc + step * g.sign()).clamp(0.0, 1.0).detach().cpu())
    return torch.cat(out)


def collect_jbda(
    oracle: Oracle,
    store: TransferStore,
    seed_set: Tensor,
    *,
    budget: int,
    rounds: int,
    step: float,
    train: Callable[[TransferSet], nn.Module],
    batch_size: int = 16,
    progress: bool = True,
) -> int:
    """Run the labelling rounds of JBDA into ``store`` up to ``budget`` queries; returns the queries sent.
    ``train`` fits a substitute on the transfer set so far (it is called only when a round's new
    points are not stored yet)."""

    def grow(data: TransferSet) -> Tensor:
        return jacobian_augmentation(train(data), data.images, data.labels, step)

    return collect_rounds(
        oracle, store, seed_set, grow, budget=budget, rounds=rounds, batch_size=batch_size, progress=progress
    )


def collect_rounds(
    oracle: Oracle,
    store: TransferStore,
    first: Tensor,
    grow: Callable[[TransferSet], Tensor],
    *,
    budget: int,
    rounds: int,
    batch_size: int = 16,
    progress: bool = True,
) -> int:
    """Rounds of queries into ``store`` up to ``budget``: round 0 sends ``first``, each later round
    ``grow(everything stored so far)``; each round's queries are stored before they are sent, so a resumed
    collection sends exactly what the interrupted one would have. Returns the queries sent."""
    sent = 0
    for rho in range(rounds):
        before = sum(store.count(r) for r in range(rho))
        if before >= budget:
            break
        queries = store.plan(f"round-{rho}", lambda rho=rho: first if rho == 0 else grow(store.load()))
        sent += collect(oracle, store, queries[: budget - before], round_=rho, batch_size=batch_size, progress=progress)
    return sent
