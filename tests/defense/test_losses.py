"""Equations (5)–(8) and (9) on hand-made tensors with values worked out by hand."""

from __future__ import annotations

import pytest
import torch

from deepdefense.defense.losses import (
    abs_cosine,
    attribution_order,
    average_ranks,
    dd_loss,
    huber,
    int_loss,
    orth_loss,
    pred_loss,
    spearman,
    topk_preserved,
)
from deepdefense.defense.sensitivity import select_layers


def test_eq6_zero_when_topk_order_holds() -> None:
    probs = torch.tensor([0.1, 0.5, 0.3, 0.1])
    assert pred_loss(probs, torch.tensor([1])) == 0
    assert pred_loss(probs, torch.tensor([1, 2])) == 0


def test_eq6_top1_violation_is_the_margin() -> None:
    probs = torch.tensor([0.1, 0.3, 0.5, 0.1])  # victim's top-1 was class 1, class 2 now leads by 0.2
    assert pred_loss(probs, torch.tensor([1])).item() == pytest.approx(0.2)


def test_eq6_topk_order_and_rest_terms_add_up() -> None:
    # victim order s = (0, 1, 2); clone: p1 > p0 by 0.1, p2 > p1 by 0.05, class 3 beats s_3 = 2 by 0.05
    probs = torch.tensor([0.2, 0.3, 0.35, 0.4]) / 1.25
    s = torch.tensor([0, 1, 2])
    expected = ((0.3 - 0.2) + (0.35 - 0.3) + (0.4 - 0.35)) / 1.25
    assert pred_loss(probs, s).item() == pytest.approx(expected, rel=1e-6)


def test_huber_matches_its_definition() -> None:
    a = torch.tensor([0.0, 0.1, 0.3, 0.5, -0.5])
    expected = torch.tensor([0.0, 0.005, 0.045, 0.3 * (0.5 - 0.15), 0.3 * (0.5 - 0.15)])
    torch.testing.assert_close(huber(a, 0.3), expected)


def test_eq7_sums_huber_of_adjacent_order_violations() -> None:
    victim = torch.tensor([[0.9, 0.1], [0.5, 0.0]])  # order a = (0, 2, 1, 3), no ties
    order, groups, gaps = attribution_order(victim)
    assert order.tolist() == [0, 2, 1, 3] and groups.tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(gaps, torch.tensor([0.4, 0.4, 0.1]))
    clone = torch.tensor([[0.2, 0.8], [0.3, 0.0]])  # along a: 0.2, 0.3, 0.8, 0.0 → violations 0.1 and 0.5
    expected = 0.5 * 0.1**2 + 0.3 * (0.5 - 0.15)
    assert int_loss(clone, order, groups, gaps, 0.3).item() == pytest.approx(expected, rel=1e-6)
    assert int_loss(victim, order, groups, gaps, 0.3).item() == 0.0


def test_eq7_margin_keeps_a_share_of_each_victim_gap() -> None:
    victim = torch.tensor([1.0, 0.6, 0.0])
    order, groups, gaps = attribution_order(victim)
    flat = torch.zeros(3)  # a collapsed map keeps the order only in the paper's non-strict sense
    assert int_loss(flat, order, groups, gaps, 0.3).item() == 0.0
    expected = 0.5 * 0.2**2 + 0.5 * 0.3**2  # margin 0.5 asks for gaps ≥ 0.2 and ≥ 0.3
    assert int_loss(flat, order, groups, gaps, 0.3, margin=0.5).item() == pytest.approx(expected, rel=1e-6)
    assert int_loss(victim, order, groups, gaps, 0.3, margin=0.5).item() == 0.0


def test_eq7_orders_tie_groups_not_pixels() -> None:
    victim = torch.tensor([1.0, 0.5, 0.0, 0.0])  # groups {0}, {1}, {2, 3}
    order, groups, gaps = attribution_order(victim)
    assert groups.tolist() == [0, 1, 2, 2]
    torch.testing.assert_close(gaps, torch.tensor([0.5, 0.5, 0.0]))
    tied = torch.tensor([1.0, 0.5, 0.2, 0.2])  # the tie is kept (at another value): no loss
    assert int_loss(tied, order, groups, gaps, 0.3).item() == 0.0
    spread = torch.tensor([1.0, 0.5, 0.1, 0.3])  # the tie is broken by 0.2
    assert int_loss(spread, order, groups, gaps, 0.3).item() == pytest.approx(0.5 * 0.2**2, rel=1e-6)
    above = torch.tensor([1.0, 0.5, 0.7, 0.7])  # the tied group rises above group {1} by 0.2
    assert int_loss(above, order, groups, gaps, 0.3).item() == pytest.approx(0.5 * 0.2**2, rel=1e-6)


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return abs_cosine((a * b).sum(), a.norm(), b.norm())


def test_eq5_weights_the_two_cosines() -> None:
    g = torch.tensor([1.0, 0.0])
    assert _cos(g, torch.tensor([0.0, 2.0])).item() == pytest.approx(0.0)
    assert _cos(g, torch.tensor([-3.0, 0.0])).item() == pytest.approx(1.0)
    assert _cos(g, torch.zeros(2)).item() == 0.0
    cos_bottom, cos_top = _cos(g, torch.tensor([1.0, 1.0])), _cos(g, torch.tensor([0.0, 1.0]))
    assert orth_loss(cos_bottom, cos_top, alpha=0.25).item() == pytest.approx(0.25 * 2**-0.5)


def test_eq8_combines_the_terms() -> None:
    assert dd_loss(torch.tensor(0.5), torch.tensor(0.1), torch.tensor(0.2), 10.0, 2.0).item() == pytest.approx(1.9)


def test_constraint3_is_strict() -> None:
    assert bool(topk_preserved(torch.tensor([0.2, 0.5, 0.3]), torch.tensor([1, 2])))
    assert not bool(topk_preserved(torch.tensor([0.4, 0.4, 0.2]), torch.tensor([1])))


def test_eq9_smallest_set_reaching_the_cumulative_share() -> None:
    scores = {"a": 10.0, "b": 50.0, "c": 30.0, "d": 10.0}
    assert select_layers(scores, 50) == ["b"]
    assert select_layers(scores, 80) == ["b", "c"]
    assert select_layers(scores, 90) == ["b", "c", "a"]
    with pytest.raises(ValueError):
        select_layers(scores, 0)


def test_average_ranks_count_smaller_and_not_larger_values_row_by_row() -> None:
    """Constraint (4)'s ranks: a value's rank is (#smaller + #not larger − 1) / 2 within its own row, ties sharing
    their average, on many seeded rows with and without ties (the definition, by brute force)."""
    g = torch.Generator().manual_seed(0)
    for shape in [(1,), (7,), (3, 64), (16, 784)]:
        for values in (torch.randn(shape, generator=g), torch.randint(0, 4, shape, generator=g).float()):
            rows = values.reshape(-1, shape[-1])
            smaller = (rows[:, None, :] < rows[:, :, None]).sum(-1)
            not_larger = (rows[:, None, :] <= rows[:, :, None]).sum(-1)
            expected = ((smaller + not_larger - 1).double() / 2).reshape(shape)
            assert torch.equal(average_ranks(values), expected), shape  # half-integers: exact on any CPU
    assert average_ranks(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist() == [2.5, 0.0, 2.5, 1.0]
    a, b = torch.tensor([[1.0, 2.0], [3.0, 3.0]]), torch.tensor([[5.0, 6.0], [7.0, 7.0]])
    assert float(spearman(a, b)) == pytest.approx(1.0), "a map's ranks are over the whole map, not per row"
