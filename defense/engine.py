"""The DeepDefense engine (Lee, Han, Lee, IJCAI-22, §4): one misdirection model per query.

For a query x_q the engine clones the weights of the selected layers (eq. 9), then runs SGD with
momentum on L_DD (eq. 8) = L_orth (eq. 5) + λ1 L_pred (eq. 6) + λ2 L_int (eq. 7), and answers
from the clone. The shared victim model is only read.

Fail closed: every iterate after the first step whose probabilities keep the victim's top-k
order exactly (constraint (3), strict) is a candidate, and the one with the lowest L_DD is
returned. If no iterate qualifies (or the optimisation produces NaN/Inf), the answer is the
documented safe answer (``safe_answer``), which reveals only the top-k order and the attribution
order — never the victim's raw outputs.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import grad

from .api import Answer, Defense
from .interpreters import Interpreter
from .losses import abs_cosine, attribution_order, dd_loss, int_loss, orth_loss, pred_loss, topk_preserved
from .sensitivity import layer_params, select_layers

Mode = Literal["deepdefense", "dd-s", "dd-i"]


@dataclass(frozen=True)
class DeepDefenseConfig:
    """Hyperparameters; defaults tuned on lenet-mnist with Grad-CAM (docs/tuning.md)."""

    alpha: float = 0.5  # eq. (5): weight of the bottom part's cosine
    lambda1: float = 10.0  # eq. (8): weight of L_pred
    lambda2: float = 1.0  # eq. (8): weight of L_int
    huber_delta: float = 0.3  # eq. (7), the paper's δ
    int_margin: float = 0.5  # eq. (7) with a margin: keep this share of each victim gap (0: the paper's form)
    top_k: int = 1  # eq. (3): k = 1 keeps the predicted class
    pred_margin: float = 0.0  # eq. (6) margin, in log-probability units
    steps: int = 20
    lr: float = 0.01
    momentum: float = 0.9
    cs: float = 90.0  # eq. (9): cumulative sensitivity threshold in percent
    init_noise: float = 0.01  # start: w̃ = w + init_noise·std(w_ℓ)·N(0, 1), since eq. (5) is stationary at w̃ = w
    seed: int = 0  # keys the per-query noise: the same query always gets the same answer


@dataclass
class Reference:
    """The victim's side of one query: what the misdirection model is compared against."""

    label: Tensor  # y, 0-d long
    top_k: Tensor  # s_1..s_k
    order: Tensor  # a_1..a_{HW}
    gaps: Tensor  # I_{a_i} − I_{a_{i+1}} in the victim's map (0 for ties)
    grad_bottom: Tensor
    grad_top: Tensor
    probs: Tensor
    attribution: Tensor


def safe_answer(probs: Tensor, attribution: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """The fail-closed answer: rank-only probabilities and a rank-only map.

    Probabilities are softmax(k, k−1, …, 1, 0, …, 0) placed on the victim's top-k classes in
    order; the map holds each pixel's normalised rank in the victim's map (ties share a rank).
    Both reveal exactly what DeepDefense promises to keep — the top-k order and the attribution
    order — and none of the victim's values.
    """
    s = probs.topk(top_k).indices
    logits = torch.zeros_like(probs).scatter(0, s, torch.arange(top_k, 0, -1, dtype=probs.dtype, device=probs.device))
    flat = attribution.reshape(-1)
    _, inverse = flat.unique(return_inverse=True)
    ranks = inverse.to(flat.dtype) / max(int(inverse.max()), 1)
    return logits.softmax(0), ranks.view_as(attribution)


class DeepDefense(Defense):
    """DeepDefense and its ablations: ``deepdefense`` (both outputs misdirected), ``dd-s`` (only the
    probabilities; the victim's map is returned) and ``dd-i`` (only the map; the victim's
    probabilities are returned) — Table 5 of the paper."""

    def __init__(
        self,
        model: nn.Module,
        interpreter: Interpreter,
        *,
        sensitivity: Mapping[str, float],
        mode: Mode = "deepdefense",
        config: DeepDefenseConfig | None = None,
        **overrides: Any,
    ) -> None:
        super().__init__(model, interpreter)
        if mode not in ("deepdefense", "dd-s", "dd-i"):
            raise ValueError(f"unknown DeepDefense mode {mode!r}")
        self.name = mode
        self.mode = mode
        self.config = replace(config or DeepDefenseConfig(), **overrides)
        self.layers = select_layers(sensitivity, self.config.cs)
        selected = layer_params(model, self.layers)
        self.bottom_names = [n for n in selected if n in interpreter.bottom]
        self.top_names = [n for n in selected if n not in interpreter.bottom]
        # with one part empty its cosine is undefined: the other part carries the whole weight
        self.alpha = self.config.alpha if self.bottom_names and self.top_names else float(bool(self.bottom_names))

    def public_settings(self) -> dict[str, Any]:
        return {"mode": self.mode, **asdict(self.config), "layers": self.layers}

    # -- one query -------------------------------------------------------------------------------
    def reference(self, x: Tensor) -> Reference:
        """The victim's label, top-k, attribution order and weight gradients for one query (1, C, H, W)."""
        victim = self.victim_params()
        with torch.no_grad():
            label = self.model(x).argmax(1)[0]
        e = self.interpreter.explain(victim, x, label)
        probs = e.logits.detach().softmax(-1)[0]
        attribution = e.attribution.detach()
        order, gaps = attribution_order(attribution)
        return Reference(
            label=label, top_k=probs.topk(self.config.top_k).indices, order=order, gaps=gaps,
            grad_bottom=_flat(e.param_grads, self.bottom_names).detach(),
            grad_top=_flat(e.param_grads, self.top_names).detach(),
            probs=probs, attribution=attribution,
        )

    def objective(self, params: dict[str, Tensor], x: Tensor, ref: Reference) -> tuple[Tensor, dict[str, Tensor]]:
        """L_DD of the misdirection model with weights ``params`` on query ``x`` and its outputs."""
        c = self.config
        e = self.interpreter.explain(params, x, ref.label)
        probs = e.logits.softmax(-1)[0]
        cos_bottom = abs_cosine(ref.grad_bottom, _flat(e.param_grads, self.bottom_names))
        cos_top = abs_cosine(ref.grad_top, _flat(e.param_grads, self.top_names))
        l_orth = orth_loss(cos_bottom, cos_top, self.alpha)
        l_pred = pred_loss(e.logits.log_softmax(-1)[0], ref.top_k, c.pred_margin)
        l_int = int_loss(e.attribution, ref.order, ref.gaps, c.huber_delta, c.int_margin)
        loss = dd_loss(l_orth, l_pred, l_int, c.lambda1, c.lambda2)
        return loss, {"loss": loss, "l_orth": l_orth, "cos_bottom": cos_bottom, "cos_top": cos_top, "l_pred": l_pred, "l_int": l_int,
                      "probs": probs, "attribution": e.attribution}

    def initial_params(self, x: Tensor) -> dict[str, Tensor]:
        """The clone's start: the victim's selected weights plus small noise keyed by the query.

        At w̃ = w the cosines of eq. (5) are at their maximum, so their gradient vanishes and
        gradient descent would never leave the victim; a small perturbation breaks the symmetry.
        The noise is a function of the query's bytes and the engine's seed, so repeating a query
        returns the same answer (no averaging over repeated queries).
        """
        victim = self.victim_params()
        generator = torch.Generator().manual_seed(query_seed(x, self.config.seed))
        params = {}
        for n in (*self.bottom_names, *self.top_names):
            w = victim[n].detach()
            noise = torch.randn(w.shape, generator=generator).to(w.device, w.dtype)
            params[n] = w + self.config.init_noise * w.std() * noise
        return params

    def misdirect(self, x: Tensor, ref: Reference) -> tuple[dict[str, Tensor] | None, int]:
        """Run the optimisation; the best feasible iterate's outputs (None if none) and the steps run."""
        c = self.config
        victim = self.victim_params()
        params = self.initial_params(x)
        velocity = {n: torch.zeros_like(p) for n, p in params.items()}
        step = grad(self.objective, has_aux=True)
        best: dict[str, Tensor] | None = None
        for t in range(c.steps + 1):
            if t < c.steps:
                grads, out = step(params, x, ref)
            else:
                out = self.objective(params, x, ref)[1]
            finite = bool(torch.isfinite(out["loss"]))
            if t > 0 and finite and bool(topk_preserved(out["probs"], ref.top_k)):
                if best is None or out["loss"] < best["loss"]:
                    best = {k: v.detach() for k, v in out.items()}
            if t == c.steps or not finite:
                return best, t
            for n in params:  # SGD with momentum (the talk's solver)
                velocity[n] = c.momentum * velocity[n] + grads[n]
                params[n] = params[n] - c.lr * velocity[n]
        return best, c.steps

    def answer_one(self, x: Tensor, *, explain: bool = True) -> Answer:
        started = time.perf_counter()
        ref = self.reference(x)
        best, steps = self.misdirect(x, ref)
        fallback = best is None
        if fallback:
            probs, attribution = safe_answer(ref.probs, ref.attribution, self.config.top_k)
        else:
            probs, attribution = best["probs"], best["attribution"]
        if self.mode == "dd-s":
            attribution = ref.attribution
        elif self.mode == "dd-i":
            probs = ref.probs
        stats = {"steps": float(steps), "optimisation_seconds": time.perf_counter() - started}
        if best is not None:
            stats.update({k: float(best[k]) for k in ("loss", "l_orth", "cos_bottom", "cos_top", "l_pred", "l_int")})
        return Answer(label=int(ref.top_k[0]), probabilities=probs, attribution=attribution if explain else None,
                      fallback=fallback, stats=stats)

    def answer(self, x: Tensor, *, explain: bool = True) -> list[Answer]:
        return [self.answer_one(xi.unsqueeze(0), explain=explain) for xi in x]


def query_seed(x: Tensor, seed: int) -> int:
    """A 63-bit seed from the query's bytes and the engine's seed."""
    digest = hashlib.blake2b(x.detach().cpu().numpy().tobytes(), digest_size=8, key=seed.to_bytes(8, "little"))
    return int.from_bytes(digest.digest(), "little") >> 1


def _flat(tensors: Mapping[str, Tensor], names: list[str]) -> Tensor:
    if not names:
        return next(iter(tensors.values())).new_zeros(0)
    return torch.cat([tensors[n].reshape(-1) for n in names])
