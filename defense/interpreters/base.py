"""The shared interpreter pipeline: one forward with the activation probe, one differentiable
gradient of the class score, a map, one normalisation. Subclasses say only what differs.

Every interpreter is bound to a model and works on a batch of queries ``x`` of shape (B, C, H, W)
with the parameters ``params`` overriding the model's own (``torch.func.functional_call``), so the
same code explains the victim (its own weights) and misdirection models (clones of some layers;
with a model from :func:`defense.per_query.per_query_view` each query may have its own clone).
All derivatives are taken with ``torch.func.grad`` of the class scores summed over the batch:
queries do not interact (models run in eval mode), so that is each query's own derivative. The map
is differentiable with respect to ``params``, and the computation can also be ``vmap``-ed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad

from .probe import Probe, probe

_EPS = 1e-8


@dataclass
class Explanation:
    """What the defense needs from one explained query."""

    logits: Tensor  # (B, K)
    param_grads: dict[
        str, Tensor
    ]  # ∇_w Σ_b f(x_b)_{y_b} for every entry of ``params`` (per query for per-query weights)
    attribution: Tensor  # (B, H, W) at the input's resolution, each map min-max normalised to [0, 1]
    factors: dict[str, tuple[Tensor, Tensor]] = field(
        default_factory=dict
    )  # factored weight gradients, see ``explain``


def class_targets(logits: Tensor, y: Tensor | int) -> Tensor:
    """The class of each row of (B, K) logits as a (B,) index: one class for all, or one per query."""
    return torch.as_tensor(y, device=logits.device).reshape(-1).expand(logits.shape[0])


def _class_score(logits: Tensor, y: Tensor | int) -> Tensor:
    """Σ_b f(x_b)_{y_b}; ``gather`` keeps it valid under ``vmap`` with a batched y."""
    return logits.gather(1, class_targets(logits, y).unsqueeze(1)).sum()


def normalise(attribution: Tensor) -> Tensor:
    """Min-max scaling of each (H, W) map to [0, 1] (as pytorch-grad-cam does): the same rule for victim and clone."""
    low = attribution.amin(dim=(-2, -1), keepdim=True)
    return (attribution - low) / (attribution.amax(dim=(-2, -1), keepdim=True) - low + _EPS)


class Interpreter(ABC):
    """Base class; ``explain`` is the whole pipeline, subclasses override ``_map``."""

    name: ClassVar[str]
    #: True when h(x) = A(x) (the bottom part ends at the model's ``cam_layer``); False when h(x) = x.
    uses_activation: ClassVar[bool] = True
    #: True when ``_map`` needs the leaf modules run after the activation (relevance propagation).
    needs_trace: ClassVar[bool] = False
    #: True when the map uses every weight only linearly (W a forward, Wᵀ g backward), as gradient
    #: methods do; relevance rules that clamp weights (z⁺) do not (see defense/low_rank.py).
    linear_in_weights: ClassVar[bool] = True
    #: True when ``_map`` reads ∂f_y/∂x (``grad_x``); otherwise that gradient is not computed (it costs a
    #: backward pass through the first layer, and through the engine's differentiation of it, per step).
    needs_input_gradient: ClassVar[bool] = False

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...]) -> None:
        self.model = model
        self.input_shape = tuple(input_shape)
        self.layer = model.cam_layer if self.uses_activation else None
        self.activation_shape, self.bottom = self._inspect()

    def _inspect(self) -> tuple[tuple[int, ...] | None, frozenset[str]]:
        """Shape of A(x) and the names of the bottom part's parameters (those A(x) depends on)."""
        if self.layer is None:
            return None, frozenset()
        params = {n: p.detach().requires_grad_(True) for n, p in self.model.named_parameters()}
        x = torch.zeros((1, *self.input_shape), device=next(iter(params.values())).device)
        with torch.enable_grad(), probe(self.model, self.layer) as rec:
            functional_call(self.model, params, (x,))
        activation = rec.activation
        grads = torch.autograd.grad(activation.sum(), list(params.values()), allow_unused=True)
        bottom = frozenset(n for n, g in zip(params, grads, strict=True) if g is not None)
        return tuple(activation.shape), bottom

    def explain(
        self,
        params: dict[str, Tensor],
        x: Tensor,
        y: Tensor | int,
        *,
        factored: Sequence[str] = (),
        constants: Mapping[str, Tensor] | None = None,
        grad_taps: Mapping[str, Tensor] | None = None,
    ) -> Explanation:
        """Logits, ∇_params f_y and the attribution maps of class ``y`` (one, or one per query) for queries ``x``.

        ``factored`` names ``Linear`` layers whose weight gradient comes back as its two factors in
        ``Explanation.factors`` rather than in ``param_grads``: ∂f_y/∂W = g ⊗ a with g = ∂f_y/∂z the
        gradient at the layer's output (B, out) and a its input (B, in) — a rank-one matrix per query
        that is never formed (for LeNet's fc1 that is 400,000 numbers per query, per step).
        ``constants`` are further tensors for ``functional_call`` (parameters or buffers) that are
        not differentiated here; ``grad_taps`` are passed to :func:`~.probe.probe`.
        """
        fixed = {f"{n}.weight": params[f"{n}.weight"] for n in factored if f"{n}.weight" in params}
        fixed.update(constants or {})
        free = {n: t for n, t in params.items() if n not in fixed}
        delta = x.new_zeros((x.shape[0], *self.activation_shape[1:])) if self.layer is not None else x.new_zeros(())
        taps = {n: x.new_zeros(x.shape[0], self.model.get_submodule(n).out_features) for n in factored}

        def score(p: dict[str, Tensor], d: Tensor, t: dict[str, Tensor], xx: Tensor) -> tuple[Tensor, tuple]:
            p = {**p, **fixed}
            with probe(
                self.model,
                self.layer,
                d if self.layer is not None else None,
                trace=self.needs_trace,
                taps=t,
                grad_taps=grad_taps,
            ) as rec:
                logits = functional_call(self.model, p, (xx,), strict=False)
            activation = rec.activation if rec.activation is not None else logits.new_zeros(())  # aux: tensors only
            return _class_score(logits, y), (logits, activation, self._from_forward(rec, p, logits, y), rec.tap_inputs)

        argnums = (0, 1, 2, 3) if self.needs_input_gradient else (0, 1, 2)
        grads, (logits, activation, extra, inputs) = grad(score, argnums=argnums, has_aux=True)(free, delta, taps, x)
        g_params, g_act, g_taps = grads[:3]
        g_x = grads[3] if self.needs_input_gradient else None
        if any(inputs[n].dim() != 2 for n in factored):
            raise ValueError("only Linear layers with (batch, features) inputs have rank-one weight gradients")
        attribution = self._map(x=x, grad_x=g_x, activation=activation, grad_activation=g_act, extra=extra)
        return Explanation(
            logits=logits,
            param_grads=g_params,
            attribution=normalise(attribution),
            factors={n: (g_taps[n], inputs[n]) for n in factored},
        )

    def _from_forward(self, rec: Probe, params: dict[str, Tensor], logits: Tensor, y: Tensor | int) -> Tensor:
        """Hook for quantities read off the forward pass (Relevance-CAM's relevance); default none."""
        return logits.new_zeros(())

    @abstractmethod
    def _map(
        self, *, x: Tensor, grad_x: Tensor | None, activation: Tensor, grad_activation: Tensor, extra: Tensor
    ) -> Tensor:
        """The (B, H, W) maps before normalisation."""


class CAM(Interpreter):
    """Class activation maps: ReLU(Σ_k α_k A^k), upsampled to the input size. Subclasses give α."""

    @abstractmethod
    def channel_weights(self, activation: Tensor, grad_activation: Tensor, extra: Tensor) -> Tensor:
        """α, shape (B, channels)."""

    def _map(
        self, *, x: Tensor, grad_x: Tensor | None, activation: Tensor, grad_activation: Tensor, extra: Tensor
    ) -> Tensor:
        alpha = self.channel_weights(activation, grad_activation, extra)
        cam = F.relu((alpha[:, :, None, None] * activation).sum(1, keepdim=True))
        return F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
