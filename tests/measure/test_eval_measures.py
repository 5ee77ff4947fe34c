"""The evaluation's measures on hand-made inputs: Average Drop (masking, drops, the paired t-test),
R_test / R_unif, the batched attacker's maps of eq. (1), and how the harness plans its arms."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats
from support.numerics import PATH_ATOL
from torch import nn

from deepdefense.clients.attack_losses import explain_batch, map_distance
from deepdefense.clients.attack_model import build_attack_model
from deepdefense.defense.interpreters import create_interpreter
from deepdefense.measure import agreement, average_drop
from deepdefense.measure.evaluate import EvalConfig, key_role, plan_arms


def test_top_p_mask_keeps_round_p_percent_with_ties_broken_by_index() -> None:
    maps = torch.zeros(2, 28, 28)
    maps[0].view(-1)[torch.arange(200)] = torch.linspace(1.0, 0.5, 200)  # 200 distinct leading values
    mask = average_drop.top_p_mask(maps, 15.0)
    assert mask.shape == (2, 28, 28) and mask.dtype == torch.bool
    assert mask.view(2, -1).sum(1).tolist() == [118, 118]  # round(0.15 · 784)
    assert bool(mask[0].view(-1)[:118].all()) and not bool(mask[0].view(-1)[118:].any())
    assert bool(mask[1].view(-1)[:118].all())  # an all-tied map keeps its first pixels in row-major order
    assert average_drop.keep_count(784, 100) == 784 and average_drop.keep_count(10, 1) == 1
    with pytest.raises(ValueError):
        average_drop.keep_count(784, 0)


def test_masked_images_are_zero_outside_the_top_pixels() -> None:
    images = torch.rand(3, 2, 4, 4) + 0.1
    maps = torch.rand(3, 4, 4)
    masked = average_drop.mask_images(images, maps, 25.0)  # 4 of 16 pixels kept
    kept = average_drop.top_p_mask(maps, 25.0)
    for channel in (0, 1):
        # exact: the kept pixels are copied, not computed
        assert torch.equal(masked[:, channel][kept], images[:, channel][kept]), (
            "identity is the property: a kept pixel is multiplied by exactly 1"
        )
    assert bool((masked.permute(1, 0, 2, 3)[:, ~kept] == 0).all())
    with pytest.raises(ValueError):
        average_drop.mask_images(images, maps[:2], 25.0)


def test_drops_follow_grad_cam_plus_plus() -> None:
    full = torch.tensor([0.8, 0.5, 0.9, 0.4])
    masked = torch.tensor([0.2, 0.5, 1.0, 0.1])
    # (0.8−0.2)/0.8, 0, an increase counts as 0, (0.4−0.1)/0.4
    assert torch.allclose(average_drop.drops(full, masked), torch.tensor([0.75, 0.0, 0.0, 0.75]))
    s = average_drop.summary(average_drop.drops(full, masked))
    assert s["mean"] == pytest.approx(0.375) and s["std"] == pytest.approx(
        float(torch.tensor([0.75, 0, 0, 0.75]).std())
    )


class Pixels(nn.Module):
    """Logit of class 0 = sum of the left half, class 1 = sum of the right half."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # where the model lives, for class_scores

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.shape[-1] // 2
        return torch.stack([x[..., :w].sum((1, 2, 3)), x[..., w:].sum((1, 2, 3))], 1) + self.anchor


def test_image_drops_score_the_masked_image_with_the_model() -> None:
    images = torch.ones(1, 1, 2, 2)
    left = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])  # the map points at the left half: 50% kept = the left column
    model = Pixels()
    full = torch.softmax(torch.tensor([2.0, 2.0]), 0)[0]  # 0.5
    masked = torch.softmax(torch.tensor([2.0, 0.0]), 0)[0]  # the class-0 evidence survives: no drop
    assert float(average_drop.image_drops(model, images, left, torch.tensor([0]), 50.0)) == pytest.approx(
        max(0.0, float(full - masked)) / float(full)
    )
    right_class = average_drop.image_drops(model, images, left, torch.tensor([1]), 50.0)
    expected = (0.5 - float(torch.softmax(torch.tensor([2.0, 0.0]), 0)[1])) / 0.5
    assert float(right_class) == pytest.approx(expected)


def test_paired_ttest_is_scipys_ttest_rel() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(50, generator=g), torch.rand(50, generator=g)
    got = average_drop.paired_ttest(a, b)
    want = stats.ttest_rel(a.double().numpy(), b.double().numpy())
    assert got.n == 50 and got.t == pytest.approx(want.statistic) and got.p_value == pytest.approx(want.pvalue)
    assert got.mean_difference == pytest.approx(float((a - b).double().mean()))
    same = average_drop.paired_ttest(a, a.clone())  # the victim's own maps: no difference at all
    assert math.isnan(same.p_value) and same.as_dict()["p_value"] is None and same.as_dict()["mean_difference"] == 0.0
    with pytest.raises(ValueError):
        average_drop.paired_ttest(a, b[:10])


def test_disagreement_and_total_variation() -> None:
    p = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.5, 0.5]])
    q = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.6, 0.4], [0.5, 0.5]])
    assert agreement.disagreement(p, q) == pytest.approx(25.0)  # the second row's top-1 differs
    assert agreement.total_variation(p, q) == pytest.approx((0.2 + 0.4 + 0 + 0) / 4)


def test_r_unif_draws_uniform_inputs_and_is_zero_for_the_victim_itself() -> None:
    u = agreement.uniform_inputs(1000, (1, 28, 28), seed=3)
    assert u.shape == (1000, 1, 28, 28) and float(u.min()) >= 0 and float(u.max()) <= 1
    # exact: the same seeded CPU generator draws the same floats
    assert torch.equal(u, agreement.uniform_inputs(1000, (1, 28, 28), seed=3)), (
        "identity is the property: the same seed draws the same inputs"
    )
    assert 0.45 < float(u.mean()) < 0.55
    victim = build_attack_model("lenet", 10, (1, 28, 28), (0.5,), (0.5,), seed=0).eval()
    other = build_attack_model("lenet", 10, (1, 28, 28), (0.5,), (0.5,), seed=1).eval()
    test = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    same = agreement.fidelity(victim, victim, test, n_unif=200, seed=0)
    # one model, the same batches on both sides: the same computation, so no label can differ
    assert same.r_test == 0 and same.r_unif == 0 and same.r_test_tv == pytest.approx(0, abs=1e-7)
    diff = agreement.fidelity(victim, other, test, n_unif=200, seed=0)
    unif = agreement.uniform_inputs(200, (1, 28, 28), 0)
    want = agreement.disagreement(agreement.probabilities(victim, unif), agreement.probabilities(other, unif))
    assert diff.r_unif == pytest.approx(want) and diff.n_unif == 200 and diff.n_test == 64


def test_the_attackers_maps_are_each_querys_own() -> None:
    """Regression: the batched map of eq. (1) must be (B, H, W) and equal each query explained alone
    (a vmap-ed (B, 1, H, W) map once broadcast against every target in the batch)."""
    model = build_attack_model("lenet", 10, (1, 28, 28), (0.3,), (0.35,), seed=0).eval()
    interpreter = create_interpreter("gradcam", model, (1, 28, 28))
    x = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 3, 3, 7, 9])
    logits, maps = explain_batch(interpreter, model, x, y)
    assert logits.shape == (5, 10) and maps.shape == (5, 28, 28)
    for i in range(5):
        alone = interpreter.explain({}, x[i : i + 1], y[i : i + 1])
        # batch of 5 against one query: another summation order, maps in [0, 1] agree within PATH_ATOL
        torch.testing.assert_close(maps[i], alone.attribution[0], rtol=0, atol=PATH_ATOL)
    targets = torch.rand(5, 28, 28, generator=torch.Generator().manual_seed(3))
    loss = map_distance(maps, targets)
    assert float(loss.detach()) == pytest.approx(float((maps - targets).detach().pow(2).sum((1, 2)).mean()), rel=1e-5)
    grads = torch.autograd.grad(loss, [p for p in model.parameters()], allow_unused=True)
    assert any(g is not None and float(g.abs().sum()) > 0 for g in grads)  # the map term trains the weights


def test_plan_arms() -> None:
    config = EvalConfig(
        defenses=("none", "pp", "deepdefense", "dd-s"),
        budgets=(100, 300),
        cs=(50.0, 90.0),
        top_k=(3,),
        ablation_budget=200,
        engine_options={"steps": 5},
    )
    arms = {a.key: a for a in plan_arms(config)}
    assert list(arms) == [
        "none",
        "pp",
        "deepdefense",
        "dd-s",
        "deepdefense-cs50",
        "deepdefense-cs90",
        "deepdefense-top3",
        "pp-top3",
    ]
    assert arms["none"].options == {} and arms["pp"].options == {} and arms["dd-s"].options == {"steps": 5}
    assert arms["deepdefense"].budget == 300 and arms["deepdefense"].losses == config.losses
    assert arms["deepdefense-cs50"].options == {"steps": 5, "cs": 50.0} and arms["deepdefense-cs50"].budget == 200
    assert arms["deepdefense-top3"].options == {"steps": 5, "top_k": 3}
    assert arms["deepdefense-top3"].losses == ("explanations",)
    # Table 4 runs PP at the same k as DeepDefense, without the engine's options
    assert arms["pp-top3"].options == {"top_k": 3} and arms["pp-top3"].budget == 200
    # each arm carries its role: what the report makes of it, never decoded from the key (key_role: old records)
    assert {k: a.role for k, a in arms.items()} == {k: key_role(k)[0] for k in arms}
    assert [a.role for a in arms.values()].count("main") == 4 and arms["deepdefense-cs50"].role == "cs"
    assert arms["pp-top3"].fields() == {"role": "top-k", "gated": False, "query_set": "random"}
    assert [a.key for a in plan_arms(EvalConfig(defenses=("none", "pp")))] == ["none", "pp", "pp-top1", "pp-top3"]
    assert [a.key for a in plan_arms(EvalConfig(defenses=("none", "pp"), top_k=()))] == ["none", "pp"]
