"""Prediction Poisoning with the MAD objective (Orekondy, Schiele, Fritz, "Prediction Poisoning:
Towards Defenses against DNN Model Stealing Attacks", ICLR 2020), batched.

For a query x with the victim's probabilities y, and G = ∇_w log F(x; w) the (K × D) Jacobian of
a surrogate's log-probabilities with respect to its last layer's weights w, MAD answers

    ỹ = argmax ‖ G^T ỹ / ‖G^T ỹ‖ − G^T y / ‖G^T y‖ ‖²
        s.t. ỹ ∈ Δ^K, ‖ỹ − y‖₁ ≤ ε, argmax ỹ = argmax y,

(with ``top_k`` = k > 1, the victim's whole top-k order kept instead of the argmax: the paper's
Table 4 compares DeepDefense and PP at k = 1 and more),

i.e. the answer whose gradient signal to a model like the surrogate (G^T ỹ is the negative
cross-entropy gradient at soft label ỹ) points as far as possible from the true one.

As in the reference method the maximiser is searched among the simplex's vertices; here every
vertex e_k is first moved towards y to the largest step α_k that meets the ε budget and keeps the
argmax (ỹ_k = y + α_k (e_k − y)), and the best of those K feasible candidates is answered. All
queries, all K candidates and the per-sample Jacobians are computed in one batched pass
(``vmap(jacrev)``).

Surrogate: by default a randomly initialised model of the victim's architecture with a fixed seed
(Orekondy's reference protocol; the defender does not know the attacker's model). Any other model
may be passed. The victim itself is a poor surrogate: at the victim's own output G^T y = E_y[∇ log F]
= 0 for the victim's G, so the angle is undefined.

PP perturbs probabilities only and has no notion of attribution maps: the map returned is the
victim's own (explanations are left undefended).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from ..api import Answer, Defense, NoDefense
from ..interpreters import Interpreter

_EPS = 1e-12


def last_linear(model: nn.Module) -> str:
    """Name of the model's last ``nn.Linear`` (its output layer)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError("Prediction Poisoning needs a surrogate whose output layer is nn.Linear")
    return names[-1]


def random_surrogate(model: nn.Module, seed: int) -> nn.Module:
    """A copy of ``model``'s architecture with every layer re-initialised from ``seed``, frozen."""
    surrogate = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in surrogate.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return surrogate.requires_grad_(False).eval()


def log_prob_jacobian(model: nn.Module, layer: str, x: Tensor) -> Tensor:
    """G for every query: ∂ log F(x)_k / ∂w of layer ``layer``'s weight and bias, shape (B, K, D)."""
    params = {f"{layer}.{n}": p.detach() for n, p in model.get_submodule(layer).named_parameters()}

    def log_probs(p: dict[str, Tensor], xi: Tensor) -> Tensor:
        return functional_call(model, p, (xi.unsqueeze(0),), strict=False)[0].log_softmax(-1)

    jac = vmap(jacrev(log_probs), in_dims=(None, 0))(params, x)
    return torch.cat([j.flatten(2) for j in jac.values()], dim=2)


def angular_deviation(G: Tensor, y: Tensor, y_tilde: Tensor) -> Tensor:
    """‖â − û‖² = 2(1 − cos∠(G^T ỹ, G^T y)) for G (B, K, D), y (B, K) and candidates ỹ (B, M, K); shape (B, M)."""
    u = torch.einsum("bk,bkd->bd", y, G)
    a = torch.einsum("bmk,bkd->bmd", y_tilde, G)
    u_hat = u / u.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    a_hat = a / a.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    return (a_hat - u_hat[:, None]).pow(2).sum(-1)


def order_pairs(y: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """The pairs (a, b) whose order an answer keeps, for each query of ``y`` (B, K): the victim's top-k
    in its order (s_1 > s_2 > … > s_k) and s_k above every class outside the top-k. Both (B, K − 1):
    k − 1 adjacent pairs inside the top-k, then K − k pairs from s_k down."""
    order = y.argsort(-1, descending=True)
    k = max(1, min(top_k, y.shape[-1]))
    upper = torch.cat([order[:, : k - 1], order[:, k - 1 : k].expand(-1, y.shape[-1] - k)], dim=1)
    lower = order[:, 1:]
    return upper, lower


def _at(v: Tensor, idx: Tensor) -> Tensor:
    """``v`` (B, M, K) at each query's class indices ``idx`` (B, P): (B, M, P)."""
    return v.gather(-1, idx[:, None, :].expand(-1, v.shape[1], -1))


def mix_towards(y: Tensor, targets: Tensor, epsilon: float, shrink: float = 1e-3, top_k: int = 1) -> Tensor:
    """ỹ_m = y + α_m (t_m − y) for targets t_m on the simplex (B, M, K), with the largest α_m ≤ 1 such
    that ‖ỹ_m − y‖₁ ≤ ε and the victim's top-``top_k`` order is kept strictly (``top_k`` = 1: the argmax;
    α kept a factor ``shrink`` below the bound).

    Class a stays above class b while (1 − α)(y_a − y_b) + α(t_a − t_b) > 0, which bounds α by
    (y_a − y_b) / ((y_a − y_b) − (t_a − t_b)) whenever t_a − t_b < y_a − y_b; the pairs are
    :func:`order_pairs`.
    """
    upper, lower = order_pairs(y, top_k)
    m = targets.shape[1]
    y = y[:, None, :]
    gap_y = (_at(y, upper) - _at(y, lower)).expand(-1, m, -1)
    gap_t = _at(targets, upper) - _at(targets, lower)
    slack = gap_y - gap_t
    bound = torch.where(slack > 0, gap_y / slack.clamp_min(_EPS), torch.full_like(slack, torch.inf)).amin(-1)
    alpha_eps = epsilon / (targets - y).abs().sum(-1).clamp_min(_EPS)
    alpha = torch.minimum(alpha_eps, bound * (1 - shrink)).clamp(max=1.0)
    return y + alpha[..., None] * (targets - y)


def mad(G: Tensor, y: Tensor, epsilon: float, top_k: int = 1) -> tuple[Tensor, Tensor]:
    """The MAD answer ỹ (B, K) among the K feasible vertex candidates (top-``top_k`` order kept), and its
    angular deviation (B,)."""
    vertices = torch.eye(y.shape[-1], dtype=y.dtype, device=y.device).expand(len(y), -1, -1)
    candidates = mix_towards(y, vertices, epsilon, top_k=top_k)
    deviation = angular_deviation(G, y, candidates)
    best = deviation.argmax(-1)
    rows = torch.arange(len(y), device=y.device)
    return candidates[rows, best], deviation[rows, best]


class PredictionPoisoning(Defense):
    """PP (MAD, argmax kept): perturbed probabilities, the victim's own attribution map."""

    name = "pp"

    def __init__(
        self,
        model: nn.Module,
        interpreter: Interpreter,
        *,
        epsilon: float = 0.5,
        top_k: int = 1,
        surrogate: nn.Module | None = None,
        surrogate_seed: int = 0,
    ) -> None:
        super().__init__(model, interpreter)
        if epsilon < 0:
            raise ValueError("epsilon must be non-negative")
        if top_k < 1:
            raise ValueError("top_k must be at least 1")
        self.epsilon, self.top_k = epsilon, int(top_k)
        self.surrogate_seed = surrogate_seed if surrogate is None else None
        self.surrogate = random_surrogate(model, surrogate_seed) if surrogate is None else surrogate
        self.layer = last_linear(self.surrogate)
        self.victim = NoDefense(model, interpreter)

    def public_settings(self) -> dict[str, Any]:
        surrogate = "given" if self.surrogate_seed is None else f"random init (seed {self.surrogate_seed})"
        settings: dict[str, Any] = {"epsilon": self.epsilon, "surrogate": surrogate, "layer": self.layer}
        if self.top_k != 1:  # MAD as published keeps the argmax; its settings (and stored transfer sets' names) stay
            settings["top_k"] = self.top_k
        return settings

    def answer(self, x: Tensor, *, explain: bool = True) -> list[Answer]:
        truth = self.victim.answer(x, explain=explain)
        y = torch.stack([a.probabilities for a in truth]).double()
        G = log_prob_jacobian(self.surrogate, self.layer, x).double()
        y_tilde, deviation = mad(G, y, self.epsilon, self.top_k)
        l1 = (y_tilde - y).abs().sum(-1)
        return [
            Answer(
                label=a.label,
                probabilities=yt.to(a.probabilities.dtype),
                attribution=a.attribution,
                stats={"angular_deviation": float(dev), "l1": float(d)},
            )
            for a, yt, dev, d in zip(truth, y_tilde, deviation, l1, strict=True)
        ]
