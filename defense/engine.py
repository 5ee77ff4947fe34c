"""The DeepDefense engine (Lee, Han, Lee, IJCAI-22, §4): one misdirection model per query.

For a query x_q the engine clones the weights of the selected layers (eq. 9), then runs SGD with
momentum on L_DD (eq. 8) = L_orth (eq. 5) + λ1 L_pred (eq. 6) + λ2 L_int (eq. 7), and answers
from the clone. The shared victim model is only read.

Fail closed: an iterate after the first step is feasible when its probabilities keep the
victim's top-k order exactly (constraint (3), strict) and its map keeps the victim's attribution
order up to a Spearman rank correlation of ``min_spearman`` (constraint (4) made operational);
the feasible iterate with the lowest L_orth is returned. If no iterate qualifies (or the
optimisation produces NaN/Inf), the answer is the documented safe answer (``safe_answer``),
which reveals only the top-k order and the attribution order — never the victim's raw outputs.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal, NamedTuple, get_args

import torch
from torch import Tensor, nn
from torch.func import grad

from .api import Answer, Defense
from .interpreters import Interpreter
from .losses import abs_cosine, attribution_order, dd_loss, int_loss, orth_loss, pred_loss, spearman, topk_preserved
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
    steps: int = 60
    lr: float = 0.05  # relative step size when normalise_steps (see relative_steps)
    momentum: float = 0.9
    normalise_steps: bool = True  # each tensor's step is lr·‖w_ℓ‖ along its gradient's direction (LARS-style)
    min_spearman: float = 0.7  # constraint (4) in practice: an iterate's map must keep this rank correlation
    cs: float = 90.0  # eq. (9): cumulative sensitivity threshold in percent
    init_noise: float = 0.01  # start: w̃ = w + init_noise·std(w_ℓ)·N(0, 1), since eq. (5) is stationary at w̃ = w
    seed: int = 0  # keys the per-query noise: the same query always gets the same answer


#: Defaults that differ per interpreter (docs/tuning.md): Gradient⊙Input's map is x ⊙ ∂f/∂x, tied to
#: every layer's weight gradient, so it optimises fewer layers (CS 50%: conv2, fc1 on lenet-mnist)
#: and holds its map closer.
INTERPRETER_DEFAULTS: dict[str, dict[str, float]] = {"gradinput": {"cs": 50.0, "min_spearman": 0.8, "lambda2": 3.0}}


class Reference(NamedTuple):
    """The victim's side of one query: what the misdirection model is compared against (a pytree)."""

    label: Tensor  # y
    top_k: Tensor  # s_1..s_k
    order: Tensor  # a_1..a_{HW}
    groups: Tensor  # tie group of each position along a
    gaps: Tensor  # victim's value of group g minus that of group g+1
    grad_bottom: Tensor  # ∇_{w_B} f_y over the selected bottom layers, flat
    grad_top: Tensor  # ∇_{w_T} f_y over the selected top layers, flat
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
        if mode not in get_args(Mode):
            raise ValueError(f"unknown DeepDefense mode {mode!r}")
        self.name = mode
        self.mode = mode
        base = config or DeepDefenseConfig(**INTERPRETER_DEFAULTS.get(interpreter.name, {}))
        self.config = replace(base, **overrides)
        self.layers = select_layers(sensitivity, self.config.cs)
        selected = layer_params(model, self.layers)
        self.bottom_names = [n for n in selected if n in interpreter.bottom]
        self.top_names = [n for n in selected if n not in interpreter.bottom]
        # with one part empty its cosine is undefined: the other part carries the whole weight
        self.alpha = self.config.alpha if self.bottom_names and self.top_names else float(bool(self.bottom_names))

    def public_settings(self) -> dict[str, Any]:
        """The configuration users may see; the seed that keys the per-query noise stays private."""
        settings = {k: v for k, v in asdict(self.config).items() if k != "seed"}
        return {"mode": self.mode, **settings, "layers": self.layers}

    # -- the victim's side -----------------------------------------------------------------------
    def reference(self, x: Tensor) -> Reference:
        """Label, top-k, attribution order and weight gradients of the victim for one query (C, H, W)."""
        victim = self.victim_params()
        with torch.no_grad():
            label = self.model(x.unsqueeze(0)).argmax(1)[0]
            e = self.interpreter.explain(victim, x.unsqueeze(0), label)
        probs = e.logits.softmax(-1)[0]
        order, groups, gaps = attribution_order(e.attribution)
        return Reference(label=label, top_k=probs.topk(self.config.top_k).indices, order=order, groups=groups,
                         gaps=gaps, grad_bottom=_flat(e.param_grads, self.bottom_names),
                         grad_top=_flat(e.param_grads, self.top_names), probs=probs, attribution=e.attribution)

    # -- the misdirection model ------------------------------------------------------------------
    def objective(self, params: dict[str, Tensor], x: Tensor, ref: Reference) -> tuple[Tensor, dict[str, Tensor]]:
        """L_DD (eq. 8) of the misdirection model with weights ``params`` on one query x (C, H, W)."""
        c = self.config
        e = self.interpreter.explain(params, x.unsqueeze(0), ref.label)
        log_probs = e.logits.log_softmax(-1)[0]
        cos_bottom = abs_cosine(ref.grad_bottom, _flat(e.param_grads, self.bottom_names))
        cos_top = abs_cosine(ref.grad_top, _flat(e.param_grads, self.top_names))
        l_orth = orth_loss(cos_bottom, cos_top, self.alpha)
        l_pred = pred_loss(log_probs, ref.top_k, c.pred_margin)
        l_int = int_loss(e.attribution, ref.order, ref.groups, ref.gaps, c.huber_delta, c.int_margin)
        loss = dd_loss(l_orth, l_pred, l_int, c.lambda1, c.lambda2)
        feasible = topk_preserved(log_probs, ref.top_k) & torch.isfinite(loss)
        if c.min_spearman > 0:
            feasible = feasible & (spearman(e.attribution, ref.attribution) >= c.min_spearman)
        return loss, {"loss": loss, "l_orth": l_orth, "cos_bottom": cos_bottom, "cos_top": cos_top,
                      "l_pred": l_pred, "l_int": l_int, "probs": log_probs.exp(), "attribution": e.attribution,
                      "feasible": feasible}

    def initial_params(self, x: Tensor) -> dict[str, Tensor]:
        """The clone's start: the victim's selected weights plus small noise keyed by the query (C, H, W).

        At w̃ = w the cosines of eq. (5) are at their maximum, so their gradient vanishes and
        gradient descent would never leave the victim; a small perturbation breaks the symmetry.
        The noise is a function of the query's bytes and the engine's seed, so repeating a query
        returns the same answer (no averaging over repeated queries), whatever batch it arrives in.
        """
        victim = self.victim_params()
        generator = torch.Generator().manual_seed(query_seed(x, self.config.seed))
        params = {}
        for n in (*self.bottom_names, *self.top_names):
            w = victim[n].detach()
            noise = torch.randn(w.shape, generator=generator).to(w.device, w.dtype)
            params[n] = w + self.config.init_noise * w.std() * noise
        return params

    def misdirect(self, x: Tensor, ref: Reference) -> dict[str, Tensor] | None:
        """Optimise the clone for one query; the outputs of its best feasible iterate, None if none.

        SGD with momentum (the talk's solver) that stays in the feasible region: a step that lands
        on an infeasible iterate is undone, the momentum is dropped and the step size halved.
        """
        c = self.config
        params = self.initial_params(x)
        anchor, lr = dict(params), c.lr
        velocity = {n: torch.zeros_like(p) for n, p in params.items()}
        step = grad(self.objective, has_aux=True)
        best: dict[str, Tensor] | None = None
        for t in range(c.steps + 1):
            if t < c.steps:
                grads, out = step(params, x, ref)
            else:
                out = self.objective(params, x, ref)[1]
            if t > 0 and not bool(out["feasible"]):  # back to the last feasible iterate, smaller steps
                params, lr = dict(anchor), lr / 2
                velocity = {n: torch.zeros_like(p) for n, p in params.items()}
                continue
            if t > 0 and (best is None or bool(out["l_orth"] < best["l_orth"])):  # t = 0 is (nearly) the victim
                best = out
            if t == c.steps:
                break
            anchor = dict(params)
            if c.normalise_steps:
                grads = relative_steps(grads, params)
            for n in params:
                velocity[n] = c.momentum * velocity[n] + grads[n]
                params[n] = params[n] - lr * velocity[n]
        return best

    # -- answers -------------------------------------------------------------------------------------
    def answer_one(self, x: Tensor, *, explain: bool = True) -> Answer:
        """The answer to one query (C, H, W) from its misdirection model, or the safe answer."""
        started = time.perf_counter()
        ref = self.reference(x)
        best = self.misdirect(x, ref)
        if best is not None:
            probs, attribution = best["probs"], best["attribution"]
            stats = {k: float(best[k]) for k in ("loss", "l_orth", "cos_bottom", "cos_top", "l_pred", "l_int")}
        else:
            probs, attribution = safe_answer(ref.probs, ref.attribution, self.config.top_k)
            stats = {}
        if self.mode == "dd-s":
            attribution = ref.attribution
        elif self.mode == "dd-i":
            probs = ref.probs
        stats.update({"steps": float(self.config.steps), "optimisation_seconds": time.perf_counter() - started})
        return Answer(label=int(ref.top_k[0]), probabilities=probs, attribution=attribution if explain else None,
                      fallback=best is None, stats=stats)

    def answer(self, x: Tensor, *, explain: bool = True) -> list[Answer]:
        return [self.answer_one(xi, explain=explain) for xi in x]


def relative_steps(grads: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Each gradient rescaled to the norm of its weight tensor, so ``lr`` is a relative step size.

    The map is far more sensitive to some weights than L_orth is, so raw gradients differ by
    orders of magnitude between the loss terms and layers; equal relative steps keep every
    selected layer moving and no single step can wreck the map.
    """
    return {n: g * (params[n].norm() / (g.norm() + 1e-12)) for n, g in grads.items()}


def query_seed(x: Tensor, seed: int) -> int:
    """A 63-bit seed from the query's bytes and the engine's seed."""
    digest = hashlib.blake2b(x.detach().cpu().numpy().tobytes(), digest_size=8, key=seed.to_bytes(8, "little"))
    return int.from_bytes(digest.digest(), "little") >> 1


def _flat(tensors: Mapping[str, Tensor], names: list[str]) -> Tensor:
    if not names:
        return next(iter(tensors.values())).new_zeros(0)
    return torch.cat([tensors[n].reshape(-1) for n in names])
