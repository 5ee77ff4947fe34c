"""The thief who asks twice: every query is followed by its twin (the same image with one pixel moved by
1/255), so that answers which stand still between twins — drawn from a fixed network, as a misinformation
gate's used to be — can be told from DeepDefense's, which misdirects every query afresh.

* ``twin_of`` makes the twins; ``with_twins`` interleaves queries and twins (query, twin, query, twin, …),
  the order the ``twin`` attacker (``clients/attack_losses.py``) reads the transfer set in.
* ``collect_adaptive`` is JBDA (``clients/jbda.py``) grown only from what the thief believes honest: each
  round's substitute is trained on the answers that moved between their twins, and the next round's
  queries are Jacobian steps from those queries alone, each sent with its twin. The budget counts twins.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from deepdefense.clients.attack_losses import twin_moved
from deepdefense.clients.jbda import collect_rounds, jacobian_augmentation
from deepdefense.clients.oracle import Oracle
from deepdefense.clients.transfer import TransferSet, TransferStore

#: The pixel a twin moves (row, column of the first channel).
PIXEL = (14, 14)
#: How far: one step of an 8-bit image.
STEP = 1 / 255


def twin_of(x: Tensor) -> Tensor:
    """``x`` with the pixel ``PIXEL`` of every image moved by ``STEP`` (up when below ½, else down)."""
    twin = x.clone()
    v = twin[:, 0, PIXEL[0], PIXEL[1]]
    twin[:, 0, PIXEL[0], PIXEL[1]] = torch.where(v < 0.5, v + STEP, v - STEP)
    return twin


def with_twins(x: Tensor) -> Tensor:
    """(N, C, H, W) → (2N, C, H, W): each query followed by its twin."""
    return torch.stack([x, twin_of(x)], 1).reshape(-1, *x.shape[1:])


def believed_honest(data: TransferSet) -> TransferSet:
    """The queries of a (query, twin) transfer set whose answers moved between their twins."""
    return data.select(twin_moved(data.probabilities))


def collect_adaptive(
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
    """JBDA rounds into ``store`` up to ``budget`` queries (twins included), grown from the answers believed
    honest; returns the queries sent. Each round's queries are stored before they are sent (resumable)."""

    def grow(data: TransferSet) -> Tensor:
        kept = believed_honest(data)
        if len(kept) == 0:  # nothing believed: the thief grows from everything he asked
            kept = data.select(slice(0, None, 2))
        return with_twins(jacobian_augmentation(train(kept), kept.images, kept.labels, step))

    return collect_rounds(
        oracle,
        store,
        with_twins(seed_set),
        grow,
        budget=budget,
        rounds=rounds,
        batch_size=batch_size,
        progress=progress,
    )
