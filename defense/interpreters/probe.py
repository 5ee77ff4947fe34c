"""Reading the activation map A(x) out of a forward pass, differentiably and thread-safely.

``probe(model, layer, delta)`` adds ``delta`` (zeros) to the output of ``layer`` during the
forward passes run inside the ``with`` block and records that output. The gradient of a class
score with respect to ``delta`` is then ∂f_y/∂A: this works under plain autograd and under
``torch.func`` transforms alike, and needs no per-model code. When ``trace=True`` the probe also
records, in execution order, every leaf module that runs after ``layer`` with its input and
output (what layer-wise relevance propagation walks back through), and, in ``blocks``, every
composite module (one with children: a residual block, a ``Sequential``) that runs after
``layer``, in the order they finish, so that a rule can treat a residual block as one unit.
Recorded tensors are the objects the modules saw: a later in-place op (torchvision's
``out += identity``, ``ReLU(inplace=True)``) changes their values, so rules should recompute what
they need from recorded inputs.

``taps`` names further layers (``Linear`` ones, for the engine) whose output also gets a zero
``delta`` added and whose input is recorded: the gradient with respect to that delta and the
recorded input are the two factors of the layer's weight gradient ∂f/∂W = (∂f/∂z) ⊗ input, which
then never has to be formed. ``grad_taps`` names layers whose *input* passes through
:class:`GradientTap`: the gradient that flows back into the layer's input during an explanation
gets the tap's zero tensor added, so that an outer derivative with respect to that tensor is the
derivative with respect to the explanation's gradient there (what :mod:`defense.low_rank` needs).

The hooks are active only for the context that opened the probe (a ``ContextVar``), so
concurrent requests on the shared model never see each other's probes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn


class GradientTap(torch.autograd.Function):
    """Identity on x; in the backward pass adds ``delta`` to the gradient flowing through it.

    Differentiable to any order under ``torch.func``: the backward is plain tensor maths.
    """

    @staticmethod
    def forward(x: Tensor, delta: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor], output: Tensor) -> None:
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (delta,) = ctx.saved_tensors
        return grad + delta, None


@dataclass
class TraceEntry:
    name: str
    module: nn.Module
    input: Tensor
    output: Tensor


@dataclass
class Probe:
    delta: Tensor | None
    trace_enabled: bool
    activation: Tensor | None = None
    trace: list[TraceEntry] = field(default_factory=list)
    blocks: list[TraceEntry] = field(default_factory=list)
    tap_inputs: dict[str, Tensor] = field(default_factory=dict)


_ACTIVE: ContextVar[Probe | None] = ContextVar("deepdefense_probe", default=None)


@contextmanager
def probe(
    model: nn.Module,
    layer: str | None,
    delta: Tensor | None = None,
    *,
    trace: bool = False,
    taps: Mapping[str, Tensor] | None = None,
    grad_taps: Mapping[str, Tensor] | None = None,
) -> Iterator[Probe]:
    record = Probe(delta=delta, trace_enabled=trace)
    target = None if layer is None else model.get_submodule(layer)

    def on_layer(_module: nn.Module, _inputs: tuple, output: Tensor) -> Tensor | None:
        if _ACTIVE.get() is not record:
            return None
        if record.delta is not None:
            output = output + record.delta
        record.activation = output
        return output

    def on_module(name: str, into: list[TraceEntry]):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            if _ACTIVE.get() is record and record.activation is not None:
                into.append(TraceEntry(name, module, inputs[0], output))

        return hook

    def after_layer(name: str) -> bool:
        """Runs wholly after ``layer``: not ``layer``, inside it, or one of its ancestors (the root included)."""
        inside = name == layer or name.startswith(layer + ".")
        ancestor = name == "" or layer.startswith(name + ".")
        return not inside and not ancestor

    def on_tap(name: str, tap_delta: Tensor):
        def hook(_module: nn.Module, inputs: tuple, output: Tensor) -> Tensor | None:
            if _ACTIVE.get() is not record:
                return None
            record.tap_inputs[name] = inputs[0]
            return output + tap_delta

        return hook

    def on_grad_tap(tap_delta: Tensor):
        def pre_hook(_module: nn.Module, inputs: tuple) -> tuple | None:
            if _ACTIVE.get() is not record:
                return None
            return (GradientTap.apply(inputs[0], tap_delta), *inputs[1:])

        return pre_hook

    handles = [] if target is None else [target.register_forward_hook(on_layer)]
    handles += [model.get_submodule(n).register_forward_pre_hook(on_grad_tap(d)) for n, d in (grad_taps or {}).items()]
    handles += [model.get_submodule(n).register_forward_hook(on_tap(n, d)) for n, d in (taps or {}).items()]
    if trace:
        handles += [
            m.register_forward_hook(on_module(n, record.blocks if list(m.children()) else record.trace))
            for n, m in model.named_modules()
            if after_layer(n)
        ]
    token = _ACTIVE.set(record)
    try:
        yield record
    finally:
        _ACTIVE.reset(token)
        for h in handles:
            h.remove()
