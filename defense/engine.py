"""The DeepDefense engine (Lee, Han, Lee, IJCAI-22, §4): one misdirection model per query.

For a query x_q the engine clones the weights of the selected layers (eq. 9), then runs SGD with
momentum on L_DD (eq. 8) = L_orth (eq. 5) + λ1 L_pred (eq. 6) + λ2 L_int (eq. 7), and answers
from the clone. The shared victim model is only read.

Batched: the queries of a micro-batch (up to ``batch_size``) are optimised together as one
computation. Each query has its own copy of only the selected layers' weights, evaluated in one
pass through a per-query view of the model (:mod:`defense.per_query`); the losses are the
per-query equations of :mod:`defense.losses` under ``vmap``; the solver's decisions (undo a step,
halve a step size, keep the best iterate, stop early) are per-query masks. Queries do not interact,
so a query gets the same answer alone (``batch_size=1``, the one-query engine) as in any batch, up
to floating-point reassociation (tests/defense/test_engine_batched.py).

Fail closed: an iterate after the first step is feasible when its probabilities keep the
victim's top-k order exactly (constraint (3), strict) and its map keeps the victim's attribution
order up to a Spearman rank correlation of ``min_spearman`` (constraint (4) made operational);
the feasible iterate with the lowest L_orth is returned. If no iterate qualifies (or the
optimisation produces NaN/Inf, or raises for that query), the answer is the documented safe answer
(``safe_answer``), which reveals only the top-k order and the attribution order — never the
victim's raw outputs.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import grad, vmap
from torch.utils._pytree import tree_map

from .api import Answer, Defense
from .interpreters import Interpreter
from .losses import (
    abs_cosine,
    attribution_order,
    centred_ranks,
    dd_loss,
    int_loss,
    orth_loss,
    pred_loss,
    rank_correlation,
    topk_preserved,
)
from .low_rank import LowRankWeight
from .names import ENGINE_MODES
from .names import EngineMode as Mode
from .per_query import ConvImpl, default_conv_impl, per_query_view, set_conv_impl
from .sensitivity import layer_params, select_layers
from .warm_start import WarmStart
from .weight_gradients import WeightGradient, inner, norm, weight_gradient

logger = logging.getLogger("deepdefense.engine")

#: The per-query outputs of the misdirection model that the solver records for each query's best feasible iterate.
BEST_ITERATE_FIELDS = ("loss", "l_orth", "cos_bottom", "cos_top", "l_pred", "l_int", "probs", "attribution")


@dataclass(frozen=True)
class DeepDefenseConfig:
    """Hyperparameters; defaults tuned on lenet-mnist with Grad-CAM (docs/tuning.md, docs/performance.md)."""

    alpha: float = 0.5  # eq. (5): weight of the bottom part's cosine
    lambda1: float = 10.0  # eq. (8): weight of L_pred
    lambda2: float = 1.0  # eq. (8): weight of L_int
    huber_delta: float = 0.3  # eq. (7), the paper's δ
    int_margin: float = 0.5  # eq. (7) with a margin: keep this share of each victim gap (0: the paper's form)
    top_k: int = 1  # eq. (3): k = 1 keeps the predicted class
    pred_margin: float = 0.0  # eq. (6) margin, in log-probability units
    steps: int | None = None  # the per-query step cap; None: the warm start's serve_steps, or COLD_STEPS (victim)
    warm_start: bool = True  # start from the checkpoint's learnt warm start when there is one (defense/warm_start.py)
    lr: float = 0.05  # relative step size when normalise_steps (see relative_steps)
    momentum: float = 0.9
    normalise_steps: bool = True  # each tensor's step is lr·‖w_ℓ‖ along its gradient's direction (LARS-style)
    min_spearman: float = 0.7  # constraint (4) in practice: an iterate's map must keep this rank correlation
    cs: float = 90.0  # eq. (9): cumulative sensitivity threshold in percent
    init_noise: float = 0.01  # start: w̃ = w + init_noise·std(w_ℓ)·N(0, 1), since eq. (5) is stationary at w̃ = w
    seed: int = 0  # keys the per-query noise: the same query always gets the same answer
    patience: int = 0  # early stopping: a query stops after this many steps without improving its best L_orth by
    min_improvement: float = 1e-3  # ... more than this (0 patience: every query runs all ``steps``)
    batch_size: int = 64  # queries optimised together (1: the one-query engine)
    low_rank: bool = True  # Linear weights as W + rank-two steps where the interpreter allows (defense/low_rank.py)
    conv_impl: Literal["auto", "unfold", "grouped"] = "auto"  # per-query convolutions (defense/per_query.py)


#: The default step cap from the victim; from a warm start, the few steps its metadata names (``serve_steps``,
#: chosen per checkpoint by measurement: docs/performance.md, "Warm starts") enforce the query's own constraints.
COLD_STEPS = 60

#: Defaults that differ per interpreter (docs/tuning.md): Gradient⊙Input's map is x ⊙ ∂f/∂x, tied to
#: every layer's weight gradient, so it optimises fewer layers (CS 50%: conv2, fc1 on lenet-mnist)
#: and holds its map closer.
INTERPRETER_DEFAULTS: dict[str, dict[str, float]] = {"gradinput": {"cs": 50.0, "min_spearman": 0.8, "lambda2": 3.0}}


class Reference(NamedTuple):
    """The victim's side of a batch of B queries, every field with a leading query dimension (a pytree)."""

    label: Tensor  # y, (B,)
    top_k: Tensor  # s_1..s_k, (B, k)
    order: Tensor  # a_1..a_{HW}, (B, HW)
    groups: Tensor  # tie group of each position along a, (B, HW)
    gaps: Tensor  # victim's value of group g minus that of group g+1, (B, HW − 1)
    grad_bottom: WeightGradient  # ∇_{w_B} f_y over the selected bottom layers
    grad_top: WeightGradient  # ∇_{w_T} f_y over the selected top layers
    norm_bottom: Tensor  # ‖∇_{w_B} f_y‖, (B,)
    norm_top: Tensor  # ‖∇_{w_T} f_y‖, (B,)
    ranks: Tensor  # the map's centred tie-averaged ranks, (B, HW): constraint (4)'s Spearman against the victim's
    probs: Tensor  # (B, K)
    attribution: Tensor  # (B, H, W)


class Gradients(NamedTuple):
    """∇ L_DD (eq. 8) at the solver's current iterate, one row per query."""

    params: dict[str, Tensor]  # of the dense per-query copies
    taps: dict[str, Tensor]  # ∂L/∂g_a of each low-rank layer (its gradient tap)
    factors: dict[str, tuple[Tensor, Tensor]]  # (g_z, a) of each low-rank layer: the rest of its rank-two gradient


@dataclass
class SolverState:
    """The misdirection solver's running batch: one row per query still optimising, and the per-query record.

    Rows are queries that have not stopped early; ``rows`` maps them back to the queries of the
    batch, which index ``best``.
    """

    config: DeepDefenseConfig
    x: Tensor  # the rows' queries, (R, C, H, W)
    ref: Reference  # the victim's side of the rows' queries
    rows: Tensor  # the query each row belongs to, (R,)
    params: dict[str, Tensor]  # the current iterate: the dense per-query weights
    anchor: dict[str, Tensor]  # the last feasible iterate, where an infeasible step goes back to
    velocity: dict[str, Tensor]  # the momentum buffers
    lr: Tensor  # each row's step size, (R,)
    stall: Tensor  # steps since each row's best L_orth last improved by ``min_improvement``, (R,)
    low_rank: dict[str, LowRankWeight]  # the low-rank layers' weights, each with its own anchor and momentum
    best: dict[str, Tensor]  # per query: its best feasible iterate's ``BEST_ITERATE_FIELDS``, "l_orth" and "steps"

    def low_rank_factors(self) -> dict[str, Tensor]:
        """The low-rank layers' additions U Vᵀ at the current iterate, keyed as the objective takes them."""
        return {
            f"{m}.{k}": v
            for m, w in self.low_rank.items()
            for k, v in zip(("delta_u", "delta_v"), w.factors(), strict=True)
        }

    def keep_best(self, out: Mapping[str, Tensor]) -> None:
        """Record each query's best feasible iterate (lowest L_orth): the answer comes from it, and early stopping
        counts the steps since it last improved by more than ``min_improvement``."""
        previous = self.best["l_orth"][self.rows]
        better = out["feasible"] & (out["l_orth"] < previous)
        rows = self.rows[better]
        for k in BEST_ITERATE_FIELDS:
            v = out[k][better]
            if k not in self.best:  # allocated on first use: the shapes come from the objective
                self.best[k] = v.new_zeros((len(self.best["steps"]), *v.shape[1:]))
            self.best[k][rows] = v
        improved = out["feasible"] & (out["l_orth"] < previous - self.config.min_improvement)
        self.stall = torch.where(improved, 0, self.stall + 1)

    def take_step(self, grads: Gradients, infeasible: Tensor) -> None:
        """SGD with momentum that stays in the feasible region (constraints (3)–(4)): feasible rows step on from the
        current iterate; infeasible rows go back to their anchor, lose their momentum and halve their step size."""
        c, ok = self.config, ~infeasible
        # low-rank layers: G_t = [∂L/∂z, g_z][a, ∂L/∂g_a]ᵀ, ∂L/∂z the per-query bias's gradient (defense/low_rank.py)
        for m, w in self.low_rank.items():
            map_grad_out, inputs = grads.factors[m]
            g_norm = w.record(grads.params[f"{m}.bias"], inputs, map_grad_out, grads.taps[m])
            scale = w.norm() / (g_norm + 1e-12) if c.normalise_steps else torch.ones_like(g_norm)
            w.step(ok, self.lr, c.momentum, scale)
        steps = relative_steps(grads.params, self.params) if c.normalise_steps else grads.params
        for k, p in self.params.items():
            self.velocity[k] = torch.where(_per_row(ok, p), c.momentum * self.velocity[k] + steps[k], 0.0)
            self.anchor[k] = torch.where(_per_row(ok, p), p, self.anchor[k])
            self.params[k] = self.anchor[k] - _per_row(self.lr, p) * self.velocity[k]
        self.lr = torch.where(infeasible, self.lr / 2, self.lr)

    def retire_finished(self, steps_run: int) -> bool:
        """Early stopping with ``patience``: a query with a feasible iterate whose best L_orth has stalled that many
        steps is finished and leaves the batch, so the rest run on a smaller one. False when no query is left."""
        if not self.config.patience:
            return True
        done = (self.stall >= self.config.patience) & torch.isfinite(self.best["l_orth"][self.rows])
        if not bool(done.any()):
            return True
        self.best["steps"][self.rows[done]] = float(steps_run)
        keep = ~done
        if not bool(keep.any()):
            return False
        self.x, self.rows, self.lr, self.stall = self.x[keep], self.rows[keep], self.lr[keep], self.stall[keep]
        self.ref = tree_map(lambda field: field[keep], self.ref)
        self.params, self.anchor, self.velocity = (
            {k: v[keep] for k, v in d.items()} for d in (self.params, self.anchor, self.velocity)
        )
        for w in self.low_rank.values():
            w.select(keep)
        return True


def safe_answer(probs: Tensor, attribution: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """The fail-closed answer for one query: rank-only probabilities and a rank-only map.

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
        warm: WarmStart | None = None,
        **overrides: Any,
    ) -> None:
        """``warm``: the checkpoint's learnt warm start (``defense/warm_start.py``), used unless the config's
        ``warm_start`` is False; one learnt for other layers or another interpreter is not used (logged)."""
        super().__init__(model, interpreter)
        if mode not in ENGINE_MODES:
            raise ValueError(f"unknown DeepDefense mode {mode!r}")
        self.name = mode
        self.mode = mode
        base = config or DeepDefenseConfig(**INTERPRETER_DEFAULTS.get(interpreter.name, {}))
        self.config = replace(base, **overrides)
        self.sensitivity = dict(sensitivity)  # S_ℓ of eq. (9), kept for an engine on another model of this victim
        self.layers = select_layers(sensitivity, self.config.cs)
        self.warm = warm if self.config.warm_start and warm is not None and self._fits(warm, interpreter) else None
        if self.config.steps is None:
            steps = self.warm.meta.serve_steps if self.warm is not None else COLD_STEPS
            self.config = replace(self.config, steps=steps)
        assert self.config.steps is not None
        if self.config.batch_size < 1 or self.config.steps < 0 or self.config.patience < 0:
            raise ValueError("batch_size must be ≥ 1, steps and patience ≥ 0")
        selected = layer_params(model, self.layers)
        self.bottom_names = [n for n in selected if n in interpreter.bottom]
        self.top_names = [n for n in selected if n not in interpreter.bottom]
        # with one part empty its cosine is undefined: the other part carries the whole weight
        self.alpha = self.config.alpha if self.bottom_names and self.top_names else float(bool(self.bottom_names))
        self.factored = [n for n in self.layers if isinstance(model.get_submodule(n), nn.Linear)]  # rank-one gradients
        self.low_rank = [
            n
            for n in self.factored
            if self.config.low_rank and interpreter.linear_in_weights and f"{n}.bias" in selected
        ]
        # the same interpreter on a view of the victim whose selected layers take per-query weights
        view = per_query_view(model, self.layers)
        auto = self.config.conv_impl == "auto"
        self.conv_impl: ConvImpl = default_conv_impl(view, interpreter.input_shape) if auto else self.config.conv_impl
        self.explainer = type(interpreter)(set_conv_impl(view, self.conv_impl), interpreter.input_shape)

    def _fits(self, warm: WarmStart, interpreter: Interpreter) -> bool:
        """Whether ``warm`` was learnt for this engine's layers and interpreter (otherwise: logged, not used)."""
        if warm.meta.interpreter == interpreter.name and warm.meta.layers == self.layers:
            return True
        logger.warning(
            "the warm start was learnt for %s on %s, this engine explains with %s on %s: starting from the victim",
            warm.meta.interpreter,
            warm.meta.layers,
            interpreter.name,
            self.layers,
        )
        return False

    def public_settings(self) -> dict[str, Any]:
        """The configuration users may see; the seed that keys the per-query noise stays private."""
        settings = {k: v for k, v in asdict(self.config).items() if k != "seed"}
        settings["warm_start"] = self.warm is not None  # whether one is in use, not only allowed
        return {"mode": self.mode, **settings, "layers": self.layers}

    @property
    def param_names(self) -> list[str]:
        """The selected parameters held as dense per-query copies (all but the low-rank weights)."""
        low_rank = {f"{n}.weight" for n in self.low_rank}
        return [n for n in (*self.bottom_names, *self.top_names) if n not in low_rank]

    # -- the victim's side -----------------------------------------------------------------------
    def reference(self, x: Tensor) -> Reference:
        """Label, top-k, attribution order and weight gradients of the victim for queries x (B, C, H, W).

        Probabilities and maps come from the victim itself, exactly as the undefended path computes
        them (``NoDefense``); the per-query weight gradients from the per-query view with the victim's
        weights (for low-rank layers: the shared weight, whose gradient is factored anyway).
        """
        victim = self.victim_params()
        with torch.no_grad():
            label = self.model(x).argmax(1)
        own = self.interpreter.explain({}, x, label)
        copies = {n: victim[n].detach().expand(len(x), *victim[n].shape) for n in self.param_names}
        e = self.explainer.explain(copies, x, label, factored=self.factored)
        probs, attribution = own.logits.detach().softmax(-1), own.attribution.detach()
        order, groups, gaps = vmap(attribution_order)(attribution)
        grad_bottom, grad_top = (
            weight_gradient(e, self.bottom_names, len(x)),
            weight_gradient(e, self.top_names, len(x)),
        )
        return Reference(
            label=label,
            top_k=probs.topk(self.config.top_k, dim=1).indices,
            order=order,
            groups=groups,
            gaps=gaps,
            grad_bottom=grad_bottom,
            grad_top=grad_top,
            norm_bottom=norm(grad_bottom),
            norm_top=norm(grad_top),
            ranks=centred_ranks(attribution.flatten(1)),
            probs=probs,
            attribution=attribution,
        )

    # -- the misdirection models -----------------------------------------------------------------
    def objective(
        self, params: dict[str, Tensor], taps: dict[str, Tensor], x: Tensor, ref: Reference, low_rank: dict[str, Tensor]
    ) -> tuple[Tensor, dict[str, Any]]:
        """Σ over queries of L_DD (eq. 8), each query's misdirection model with its own weights: the dense
        copies ``params`` (leading query dimension) and the low-rank additions ``low_rank`` (constants here;
        ``taps`` are their gradient taps). Per-query values in the second output."""
        c = self.config
        e = self.explainer.explain(params, x, ref.label, factored=self.factored, constants=low_rank, grad_taps=taps)
        log_probs = e.logits.log_softmax(-1)
        bottom, top = weight_gradient(e, self.bottom_names, len(x)), weight_gradient(e, self.top_names, len(x))
        cos_bottom = abs_cosine(inner(ref.grad_bottom, bottom), ref.norm_bottom, norm(bottom))
        cos_top = abs_cosine(inner(ref.grad_top, top), ref.norm_top, norm(top))
        l_orth = orth_loss(cos_bottom, cos_top, self.alpha)
        l_pred = vmap(partial(pred_loss, margin=c.pred_margin))(log_probs, ref.top_k)
        l_int = vmap(partial(int_loss, delta=c.huber_delta, margin=c.int_margin))(
            e.attribution, ref.order, ref.groups, ref.gaps
        )
        loss = dd_loss(l_orth, l_pred, l_int, c.lambda1, c.lambda2)
        finite = (
            torch.isfinite(loss) & torch.isfinite(log_probs).all(1) & torch.isfinite(e.attribution).flatten(1).all(1)
        )
        feasible = vmap(topk_preserved)(log_probs, ref.top_k) & finite
        if c.min_spearman > 0:
            feasible = feasible & (
                rank_correlation(centred_ranks(e.attribution.flatten(1)), ref.ranks) >= c.min_spearman
            )
        return loss.sum(), {
            "loss": loss,
            "l_orth": l_orth,
            "cos_bottom": cos_bottom,
            "cos_top": cos_top,
            "l_pred": l_pred,
            "l_int": l_int,
            "probs": log_probs.exp(),
            "attribution": e.attribution,
            "feasible": feasible,
            "factors": {n: e.factors[n] for n in self.low_rank},
        }

    def initial_params(self, x: Tensor) -> dict[str, Tensor]:
        """Each clone's start: the victim's selected weights plus small noise keyed by its query (B, C, H, W).

        At w̃ = w the cosines of eq. (5) are at their maximum, so their gradient vanishes and
        gradient descent would never leave the victim; a small perturbation breaks the symmetry.
        The noise is a function of the query's bytes and the engine's seed, so repeating a query
        returns the same answer (no averaging over repeated queries), whatever batch it arrives in.
        """
        victim = self.victim_params()
        generators = [torch.Generator().manual_seed(query_seed(xi, self.config.seed)) for xi in x]
        params = {}
        for n in self.param_names:
            w = victim[n].detach()
            noise = torch.stack([torch.randn(w.shape, generator=g) for g in generators]).to(w.device, w.dtype)
            params[n] = w + self.config.init_noise * w.std() * noise
        return params

    def misdirect(self, x: Tensor, ref: Reference) -> dict[str, Tensor]:
        """Optimise every query's clone; the outputs of each one's best feasible iterate (``BEST_ITERATE_FIELDS``),
        with ``found`` False where a query had none, and ``steps``, the steps each query ran.

        SGD with momentum (the talk's solver) that stays in the feasible region: a step that lands
        on an infeasible iterate is undone, that query's momentum is dropped and its step size
        halved. With ``patience`` > 0 a query stops once it has a feasible iterate and its best
        L_orth has not improved by ``min_improvement`` for ``patience`` steps; stopped queries leave
        the batch, so the rest run on a smaller one.
        """
        return self.solve(x, ref).best

    def solve(self, x: Tensor, ref: Reference) -> SolverState:
        """The solver of :meth:`misdirect`, run to its end; the state holds the last iterate and ``best``."""
        steps = self.steps
        state = self._start(x, ref)
        for t in range(steps + 1):
            out, grads = self._evaluate(state, differentiate=t < steps)
            if t == 0:  # the start (the victim plus noise, or a checked warm start): never answered, never undone
                infeasible = torch.zeros_like(out["feasible"])
            else:
                infeasible = ~out["feasible"]
                state.keep_best(out)
            if grads is None:  # the iterate after the last step: recorded, not stepped from
                break
            state.take_step(grads, infeasible)
            if not state.retire_finished(steps_run=t + 1):
                break
        state.best["found"] = torch.isfinite(state.best["l_orth"])
        return state

    @property
    def steps(self) -> int:
        """The per-query step cap, resolved (``config.steps`` is never None after ``__init__``)."""
        assert self.config.steps is not None
        return self.config.steps

    def _start(self, x: Tensor, ref: Reference) -> SolverState:
        """The solver at the clones' start (``initial_params``, moved by the warm start when there is one): no
        momentum, full step size, nothing recorded."""
        c, n = self.config, len(x)
        params = self.initial_params(x)
        victim = self.victim_params()
        terms = self.warm.terms if self.warm is not None else 0
        state = SolverState(
            config=c,
            x=x,
            ref=ref,
            rows=torch.arange(n, device=x.device),
            params=params,
            anchor=dict(params),
            velocity={k: torch.zeros_like(p) for k, p in params.items()},
            lr=x.new_full((n,), c.lr),
            stall=torch.zeros(n, dtype=torch.long, device=x.device),
            low_rank={m: LowRankWeight(victim[f"{m}.weight"], n, self.steps + terms) for m in self.low_rank},
            best={
                "l_orth": x.new_full((n,), torch.inf),
                "steps": x.new_full((n,), float(self.steps)),
                "warm": x.new_zeros(n),
            },
        )
        if self.warm is not None:
            self._warm_start(state)
        return state

    def _warm_start(self, state: SolverState) -> None:
        """Move each clone's start by the warm start of its query's predicted class (the keyed noise stays), then
        check it: a query whose warm start already breaks constraint (3) or (4) starts from the victim instead
        (a warm start it could never step back from to a feasible iterate)."""
        warm, label = self.warm, state.ref.label
        assert warm is not None
        cold = state.params
        state.params = {k: p + warm.dense[k].to(p)[label] for k, p in cold.items()}
        for m, w in state.low_rank.items():
            u, v = warm.factors[m]
            w.preset(u.to(w.weight)[label], v.to(w.weight)[label])
        bad = ~self._evaluate(state, differentiate=False)[0]["feasible"]
        state.params = {k: torch.where(_per_row(bad, p), cold[k], p) for k, p in state.params.items()}
        state.anchor = dict(state.params)
        for w in state.low_rank.values():
            w.reset(bad)
        state.best["warm"] = (~bad).to(state.best["warm"])

    def _evaluate(self, state: SolverState, differentiate: bool) -> tuple[dict[str, Any], Gradients | None]:
        """The objective's per-query outputs at the current iterate, and its gradient when ``differentiate``
        (the solver steps on it; the iterate after the last step is only recorded)."""
        factors = state.low_rank_factors()
        taps = {m: state.x.new_zeros(len(state.x), w.q.shape[1]) for m, w in state.low_rank.items()}
        if not differentiate:
            return self.objective(state.params, taps, state.x, state.ref, factors)[1], None
        gradient = grad(self.objective, argnums=(0, 1), has_aux=True)
        (param_grads, tap_grads), out = gradient(state.params, taps, state.x, state.ref, factors)
        return out, Gradients(param_grads, tap_grads, out["factors"])

    # -- answers -------------------------------------------------------------------------------------
    def answer(self, x: Tensor, *, explain: bool = True) -> list[Answer]:
        """Answers for queries x (B, C, H, W), optimised ``batch_size`` at a time.

        Faults stay with their query: if a batch's optimisation raises, its queries are answered
        one by one, and a query whose own optimisation raises gets the safe answer. A query whose
        victim-side ``reference`` raises has no safe answer (it is made of the victim's top-k and
        map): the call raises, and the server's isolation answers the other queries alone
        (server/isolation.py; that query's request gets a 500 ``defense_failed``).
        """
        return self.answer_modes(x, (self.mode,), explain=explain)[self.mode]

    def answer_modes(self, x: Tensor, modes: tuple[Mode, ...], *, explain: bool = True) -> dict[str, list[Answer]]:
        """The answers of several modes from one optimisation per query: DD-S and DD-I answer from the
        same misdirection model as DeepDefense, each showing one of its outputs (Table 5)."""
        answers: dict[str, list[Answer]] = {m: [] for m in modes}
        for chunk in x.split(self.config.batch_size):
            try:
                parts = [self._answer_batch(chunk, explain, modes)]
            except Exception:
                if len(chunk) == 1:
                    raise
                logger.exception("a batch of %d failed; answering its queries one by one", len(chunk))
                parts = [self._answer_batch(xi.unsqueeze(0), explain, modes) for xi in chunk]
            for part in parts:
                for m in modes:
                    answers[m] += part[m]
        return answers

    def _answer_batch(self, x: Tensor, explain: bool, modes: tuple[Mode, ...]) -> dict[str, list[Answer]]:
        started = time.perf_counter()
        ref = self.reference(x)
        try:
            best: dict[str, Tensor] | None = self.misdirect(x, ref)
        except Exception:
            if len(x) > 1:
                raise
            logger.exception("misdirection failed on one query; answering with the safe answer")
            best = None
        seconds = (time.perf_counter() - started) / len(x)
        return {m: [self._compose(i, ref, best, seconds, explain, m) for i in range(len(x))] for m in modes}

    def _compose(
        self, i: int, ref: Reference, best: dict[str, Tensor] | None, seconds: float, explain: bool, mode: Mode
    ) -> Answer:
        """Query i's answer: its best iterate's outputs, or the safe answer; the mode picks which to show."""
        found = best is not None and bool(best["found"][i])
        if found:
            probs, attribution = best["probs"][i], best["attribution"][i]
            stats = {k: float(best[k][i]) for k in BEST_ITERATE_FIELDS if k not in ("probs", "attribution")}
        else:
            probs, attribution = safe_answer(ref.probs[i], ref.attribution[i], self.config.top_k)
            stats = {}
        if mode == "dd-s":
            attribution = ref.attribution[i]
        elif mode == "dd-i":
            probs = ref.probs[i]
        steps = float(best["steps"][i]) if best is not None else 0.0
        warm = float(best["warm"][i]) if best is not None else 0.0
        stats.update({"steps": steps, "warm_start": warm, "optimisation_seconds": seconds})
        return Answer(
            label=int(ref.top_k[i, 0]),
            probabilities=probs,
            attribution=attribution if explain else None,
            fallback=not found,
            stats=stats,
        )


def _per_row(mask: Tensor, like: Tensor) -> Tensor:
    """A per-row tensor (B,) viewed as (B, 1, …, 1) to broadcast against ``like`` (B, ...)."""
    return mask.view(-1, *([1] * (like.dim() - 1)))


def relative_steps(grads: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Each query's gradient of each tensor rescaled to that query's weight norm: ``lr`` is a relative step size.

    The map is far more sensitive to some weights than L_orth is, so raw gradients differ by
    orders of magnitude between the loss terms and layers; equal relative steps keep every
    selected layer moving and no single step can wreck the map.
    """
    out = {}
    for n, g in grads.items():
        shape = (-1, *([1] * (g.dim() - 1)))
        scale = params[n].flatten(1).norm(dim=1) / (g.flatten(1).norm(dim=1) + 1e-12)
        out[n] = g * scale.view(shape)
    return out


def query_seed(x: Tensor, seed: int) -> int:
    """A 63-bit seed from the query's bytes and the engine's seed."""
    digest = hashlib.blake2b(x.detach().cpu().numpy().tobytes(), digest_size=8, key=seed.to_bytes(8, "little"))
    return int.from_bytes(digest.digest(), "little") >> 1
