"""Fidelity of a stolen model to the victim: R_test and R_unif (Tramèr et al., "Stealing Machine
Learning Models via Prediction APIs", USENIX Security 2016; the measures of the DeepDefense
authors' talk, "Fidelity Measures").

For the victim f and the attack model f̂,

    R_test(f, f̂) = Σ_{(x, y) ∈ D} d(f(x), f̂(x)) / |D|        on the victim's test set D,
    R_unif(f, f̂) = Σ_{x ∈ U} d(f(x), f̂(x)) / |U|             on inputs U drawn uniformly from [0, 1]^{C×H×W},

with d the 0-1 distance of the top-1 decisions (reported in percent: the share of inputs on which
the two models disagree; 100 − R is their agreement) and, for R^TV, the total variation distance
½‖f(x) − f̂(x)‖₁ of the probability vectors. The talk uses |U| = 10,000.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn


def uniform_inputs(n: int, shape: tuple[int, ...], seed: int) -> Tensor:
    """``n`` inputs drawn uniformly from [0, 1]^shape with their own generator (seed ``seed``)."""
    return torch.rand((n, *shape), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def probabilities(model: nn.Module, images: Tensor, batch_size: int = 1000) -> Tensor:
    """Softmax outputs (N, K) of ``model`` in eval mode, on the model's device, returned on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    return torch.cat([model(x.to(device)).softmax(-1).cpu() for x in images.split(batch_size)])


def percent(mask: Tensor) -> float:
    """The share of true entries of ``mask``, in percent with two decimals."""
    return round(100.0 * float(mask.double().mean()), 2)


def disagreement(p: Tensor, q: Tensor) -> float:
    """Percent of rows whose top-1 classes differ (the 0-1 distance averaged)."""
    return 100.0 * float((p.argmax(1) != q.argmax(1)).double().mean())


def total_variation(p: Tensor, q: Tensor) -> float:
    """Mean over rows of ½‖p − q‖₁."""
    return float(0.5 * (p.double() - q.double()).abs().sum(1).mean())


@dataclass
class Fidelity:
    """R_test and R_unif of an attack model against the victim (percent), with their TV variants."""

    r_test: float
    r_test_tv: float
    r_unif: float
    r_unif_tv: float
    n_test: int
    n_unif: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def fidelity(
    victim: nn.Module,
    attack: nn.Module,
    test_images: Tensor,
    n_unif: int = 10_000,
    seed: int = 0,
    victim_test: Tensor | None = None,
    victim_unif: Tensor | None = None,
) -> Fidelity:
    """R_test on ``test_images`` and R_unif on ``n_unif`` uniform inputs drawn from ``seed``. The
    victim's probabilities may be passed in (they do not change between attack models)."""
    unif = uniform_inputs(n_unif, tuple(test_images.shape[1:]), seed)
    f_test = victim_test if victim_test is not None else probabilities(victim, test_images)
    f_unif = victim_unif if victim_unif is not None else probabilities(victim, unif)
    g_test, g_unif = probabilities(attack, test_images), probabilities(attack, unif)
    return Fidelity(
        r_test=disagreement(f_test, g_test),
        r_test_tv=total_variation(f_test, g_test),
        r_unif=disagreement(f_unif, g_unif),
        r_unif_tv=total_variation(f_unif, g_unif),
        n_test=len(test_images),
        n_unif=n_unif,
    )
