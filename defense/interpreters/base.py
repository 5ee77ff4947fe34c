"""The shared interpreter pipeline: one forward with the activation probe, one differentiable
gradient of the class score, a map, one normalisation. Subclasses say only what differs.

Every interpreter is bound to a model and works on one query ``x`` of shape (1, C, H, W) with
the parameters ``params`` overriding the model's own (``torch.func.functional_call``), so the
same code explains the victim (its own weights) and a misdirection model (a clone of some
layers). All derivatives are taken with ``torch.func.grad``: the map is differentiable with
respect to ``params``, and the whole computation can be ``vmap``-ed over queries.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
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

    logits: Tensor  # (1, K)
    param_grads: dict[str, Tensor]  # ∇_w f(x)_y for every entry of ``params``
    attribution: Tensor  # (H, W) at the input's resolution, min-max normalised to [0, 1]


def _class_score(logits: Tensor, y: Tensor | int) -> Tensor:
    """f(x)_y for a (1, K) logit row; ``gather`` keeps it valid under ``vmap`` with a batched y."""
    return logits[0].gather(0, torch.as_tensor(y, device=logits.device).view(1))[0]


def normalise(attribution: Tensor) -> Tensor:
    """Min-max scaling to [0, 1] (as pytorch-grad-cam does): the same rule for victim and clone."""
    low = attribution.amin()
    return (attribution - low) / (attribution.amax() - low + _EPS)


class Interpreter(ABC):
    """Base class; ``explain`` is the whole pipeline, subclasses override ``_map``."""

    name: ClassVar[str]
    #: True when h(x) = A(x) (the bottom part ends at the model's ``cam_layer``); False when h(x) = x.
    uses_activation: ClassVar[bool] = True
    #: True when ``_map`` needs the leaf modules run after the activation (relevance propagation).
    needs_trace: ClassVar[bool] = False

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
        bottom = frozenset(n for n, g in zip(params, grads) if g is not None)
        return tuple(activation.shape), bottom

    def explain(self, params: dict[str, Tensor], x: Tensor, y: Tensor | int) -> Explanation:
        """Logits, ∇_params f_y and the attribution map of class ``y`` for one query ``x``."""
        delta = x.new_zeros(self.activation_shape) if self.layer is not None else x.new_zeros(())

        def score(p: dict[str, Tensor], d: Tensor, xx: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
            if self.layer is None:
                logits = functional_call(self.model, p, (xx,), strict=False)
                none = logits.new_zeros(())  # aux must hold tensors only
                return _class_score(logits, y), (logits, none, none)
            with probe(self.model, self.layer, d, trace=self.needs_trace) as rec:
                logits = functional_call(self.model, p, (xx,), strict=False)
            return _class_score(logits, y), (logits, rec.activation, self._from_forward(rec, p, logits, y))

        (g_params, g_act, g_x), (logits, activation, extra) = grad(score, argnums=(0, 1, 2), has_aux=True)(
            params, delta, x
        )
        attribution = self._map(x=x, grad_x=g_x, activation=activation, grad_activation=g_act, extra=extra)
        return Explanation(logits=logits, param_grads=g_params, attribution=normalise(attribution))

    def _from_forward(self, rec: Probe, params: dict[str, Tensor], logits: Tensor, y: Tensor | int) -> Tensor:
        """Hook for quantities read off the forward pass (Relevance-CAM's relevance); default none."""
        return logits.new_zeros(())

    @abstractmethod
    def _map(self, *, x: Tensor, grad_x: Tensor, activation: Tensor, grad_activation: Tensor,
             extra: Tensor) -> Tensor:
        """The (H, W) map before normalisation."""


class CAM(Interpreter):
    """Class activation maps: ReLU(Σ_k α_k A^k), upsampled to the input size. Subclasses give α."""

    @abstractmethod
    def channel_weights(self, activation: Tensor, grad_activation: Tensor, extra: Tensor) -> Tensor:
        """α, shape (1, channels)."""

    def _map(self, *, x: Tensor, grad_x: Tensor, activation: Tensor, grad_activation: Tensor,
             extra: Tensor) -> Tensor:
        alpha = self.channel_weights(activation, grad_activation, extra)
        cam = F.relu((alpha[:, :, None, None] * activation).sum(1, keepdim=True))
        return F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
