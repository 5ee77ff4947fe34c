"""``measure/thief_spread.py compare``: how far two transfer sets' answers to the same queries are apart."""

from __future__ import annotations

import pytest
import torch

from deepdefense.clients.transfer import TransferSet
from deepdefense.measure.thief_spread import compare


def _set(probabilities: torch.Tensor, images: torch.Tensor) -> TransferSet:
    n = len(probabilities)
    maps = torch.zeros(n, 4, 4)
    return TransferSet(images, probabilities.argmax(1), probabilities, maps, torch.zeros(n, dtype=torch.long))


def test_compare_counts_the_answers_that_moved_and_refuses_other_queries() -> None:
    images = torch.rand(5, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    p = torch.full((5, 3), 0.1).index_fill(1, torch.tensor([0]), 0.8)
    q = p.clone()
    q[1, :2] += torch.tensor([-1e-5, 1e-5])  # moved by rounding: same label
    q[3] = torch.tensor([0.1, 0.8, 0.1])  # another label
    out = compare(_set(p, images), _set(q, images))
    assert out["answers"] == 5 and out["same_labels"] == 4
    assert out["over"] == {"1e-06": 2, "0.0001": 1, "0.01": 1}
    assert out["max_abs_probability"] == pytest.approx(0.7)
    with pytest.raises(AssertionError, match="different queries"):
        compare(_set(p, images), _set(q, images + 1))
