"""``measure/step_levers.py``'s predictors of the solver's moves: the R² it reports, the ridge fit, the victim's
hidden features."""

from __future__ import annotations

import pytest
import torch

from deepdefense.measure.step_levers import hidden_features, layer_choice, r_squared, ridge
from deepdefense.models.checkpoint import load_checkpoint


def test_r_squared_is_one_for_the_truth_and_zero_for_the_mean() -> None:
    target = torch.randn(50, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert r_squared(target, target) == 1.0
    assert r_squared(target.mean(0).expand_as(target), target) == pytest.approx(0.0, abs=1e-12)
    assert r_squared(-target, target) < 0, "a prediction worse than the mean must score below 0"


def test_ridge_recovers_a_linear_map_and_shrinks_with_its_penalty() -> None:
    g = torch.Generator().manual_seed(1)
    features = torch.randn(200, 5, generator=g, dtype=torch.float64)
    weights = torch.randn(5, 3, generator=g, dtype=torch.float64)
    target = features @ weights
    assert torch.allclose(ridge(features, target, 1e-9), weights, atol=1e-6)
    assert r_squared(features @ ridge(features, target, 1e-9), target) == pytest.approx(1.0)
    assert ridge(features, target, 1e6).norm() < 0.01 * weights.norm(), "a large penalty keeps the weights small"


def test_hidden_features_are_the_last_linear_layers_input() -> None:
    model, _ = load_checkpoint("lenet-mnist")
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    features = hidden_features(model, x)
    assert features.shape == (3, 500), "LeNet's fc2 reads the 500 hidden units"
    fc2 = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        logits = model(x)
    # fc2 on those features is the model's output (compared with a tolerance: another call, another float path)
    torch.testing.assert_close(fc2(features), logits, rtol=1e-5, atol=1e-5)


def test_layer_choice_times_each_thresholds_own_layers() -> None:
    """eq. (9) at 90% (the default) selects conv1 on lenet-mnist and at 85% does not: the lever timed is that one."""
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    out = layer_choice("lenet-mnist", None, x, [90.0, 85.0], steps=1, repeats=1)
    chosen = out["by_threshold"]
    assert "net.features.conv1" in chosen["90"]["layers"] and "net.features.conv1" not in chosen["85"]["layers"]
    assert set(chosen["85"]["layers"]) < set(chosen["90"]["layers"])
    assert all(t["cpu_ms"] > 0 for t in chosen.values()) and out["batch"] == 2 and out["steps"] == 1
