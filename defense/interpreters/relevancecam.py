"""Relevance-CAM (Lee et al., "Relevance-CAM: Your Model Already Knows Where to Look", CVPR 2021).

Grad-CAM's pipeline with other channel weights: α_k^y = Σ_ij R^k_ij, the relevance that
Contrastive LRP (Gu et al., ACCV 2018) carries from the logits down to the activation map A(x) at
the model's ``cam_layer``; the map is ReLU(Σ_k α_k A^k) upsampled (DeepDefense §4.1: the two CAMs
differ only in α). The relevance starts at the logits as +1 on class y and −1/K on every other
class (target minus the dual concept "all other classes", see
:func:`~defense.interpreters.lrp.contrastive_output_relevance`) and walks back through the top
part that the probe traced, one unit at a time, with these rules (:mod:`.lrp`):

===============================================  ===================================================
unit                                              rule
===============================================  ===================================================
``Linear``, ``Conv2d``                            z⁺ (αβ, α = 1, β = 0), bias out of the denominator
``ReLU``, ``Dropout`` (eval), ``Identity``        identity
``MaxPool2d``                                     winner-take-all
``AvgPool2d``, ``AdaptiveAvgPool2d``              z-rule
``BatchNorm2d`` (eval)                            its own linear layer y = s·x + t (s = γ/√(σ²+ε)),
                                                  z-rule with t out of the denominator: relevance
                                                  passes through unchanged (R·sx/(sx ± ε)), as in
                                                  the Relevance-CAM reference code; not folded,
                                                  since WRN's pre-activation BN has no conv before it
``Flatten``, functional reshapes                  relevance reshaped to the unit's input shape; every
                                                  unit first reshapes what it receives to its own
                                                  output shape (ResNet's ``torch.flatten``)
residual block (torchvision ``BasicBlock``,       one unit: R through the ops after the add, split
``models.wide_resnet._Block``)                    at the add between main branch and shortcut in
                                                  proportion to their outputs (z-rule), each share
                                                  propagated back through its branch, and the two
                                                  summed where the branches meet
===============================================  ===================================================

Weights (and batch-norm statistics) are read from ``params`` under the traced module's name,
falling back to the module's own, since the rules run after ``functional_call`` has restored the
model's tensors. Everything is plain tensor maths and ``torch.func.vjp``, so the map is
differentiable with respect to ``params`` and ``vmap``-able over queries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock

from deepdefense.models.wide_resnet import _Block as WideBlock

from ..per_query import conv2d, linear
from .base import CAM
from .lrp import (
    contrastive_output_relevance,
    split_sum,
    winner_take_all,
    z_plus_rule,
    z_rule,
)
from .probe import Probe, TraceEntry

Params = dict[str, Tensor]


@dataclass
class Unit:
    """One step of the backward walk: a leaf module, or a residual block with the leaves it ran."""

    entry: TraceEntry
    children: list[TraceEntry] = field(default_factory=list)


@dataclass(frozen=True)
class BlockLayout:
    """A residual block ``post(main(pre(x)) + shortcut(pre(x) if shortcut_from_pre else x))``;
    an empty ``shortcut`` is the identity on the block input."""

    pre: list[TraceEntry]
    main: list[TraceEntry]
    shortcut: list[TraceEntry]
    shortcut_from_pre: bool
    post: list[TraceEntry]


def _local(block: TraceEntry, child: TraceEntry) -> str:
    return child.name[len(block.name) + 1 :]


def _basic_block_layout(block: TraceEntry, children: list[TraceEntry]) -> BlockLayout:
    """torchvision: relu(bn2(conv2(relu(bn1(conv1(x))))) + downsample(x)); ``relu`` runs twice."""
    shortcut = [c for c in children if _local(block, c).startswith("downsample.")]
    rest = [c for c in children if not _local(block, c).startswith("downsample.")]
    return BlockLayout(pre=[], main=rest[:-1], shortcut=shortcut, shortcut_from_pre=False, post=rest[-1:])


def _wide_block_layout(block: TraceEntry, children: list[TraceEntry]) -> BlockLayout:
    """WRN: pre = relu1(bn1(x)); conv2(relu2(bn2(conv1(pre)))) + (shortcut(pre) or x)."""
    shortcut = [c for c in children if _local(block, c) == "shortcut"]
    rest = [c for c in children if _local(block, c) != "shortcut"]
    return BlockLayout(pre=rest[:2], main=rest[2:], shortcut=shortcut, shortcut_from_pre=bool(shortcut), post=[])


BLOCK_LAYOUTS: dict[type[nn.Module], Callable[[TraceEntry, list[TraceEntry]], BlockLayout]] = {
    BasicBlock: _basic_block_layout,
    WideBlock: _wide_block_layout,
}


def _tensor(entry: TraceEntry, attr: str, params: Params) -> Tensor | None:
    return params.get(f"{entry.name}.{attr}", getattr(entry.module, attr))


def _bn_affine(entry: TraceEntry, params: Params) -> tuple[Tensor, Tensor]:
    """Eval-mode batch norm as y = s·x + t, s and t shaped (C, 1, 1)."""
    m: nn.BatchNorm2d = entry.module
    mean, var = _tensor(entry, "running_mean", params), _tensor(entry, "running_var", params)
    gamma, beta = _tensor(entry, "weight", params), _tensor(entry, "bias", params)
    scale = (var + m.eps).rsqrt() * (gamma if gamma is not None else 1)
    shift = (beta if beta is not None else 0) - mean * scale
    return scale[:, None, None], shift[:, None, None]


def _conv(m: nn.Conv2d) -> Callable[[Tensor, Tensor], Tensor]:
    return lambda t, w: conv2d(t, w, None, m, getattr(m, "conv_impl", "unfold"))


def _linear_rule(entry: TraceEntry, relevance: Tensor, params: Params) -> Tensor:
    return z_plus_rule(lambda t, w: linear(t, w), entry.input, _tensor(entry, "weight", params), relevance)


def _conv_rule(entry: TraceEntry, relevance: Tensor, params: Params) -> Tensor:
    return z_plus_rule(_conv(entry.module), entry.input, _tensor(entry, "weight", params), relevance)


def _batchnorm_rule(entry: TraceEntry, relevance: Tensor, params: Params) -> Tensor:
    scale, _ = _bn_affine(entry, params)
    return z_rule(lambda t: t * scale, entry.input, relevance)


def _maxpool_rule(entry: TraceEntry, relevance: Tensor, params: Params) -> Tensor:
    m: nn.MaxPool2d = entry.module
    pool = partial(
        F.max_pool2d,
        kernel_size=m.kernel_size,
        stride=m.stride,
        padding=m.padding,
        dilation=m.dilation,
        ceil_mode=m.ceil_mode,
    )
    return winner_take_all(pool, entry.input, relevance)


def _avgpool_rule(entry: TraceEntry, relevance: Tensor, params: Params) -> Tensor:
    m: nn.AvgPool2d = entry.module
    pool = partial(
        F.avg_pool2d,
        kernel_size=m.kernel_size,
        stride=m.stride,
        padding=m.padding,
        ceil_mode=m.ceil_mode,
        count_include_pad=m.count_include_pad,
        divisor_override=m.divisor_override,
    )
    return z_rule(pool, entry.input, relevance)


def _adaptive_avgpool_rule(entry: TraceEntry, relevance: Tensor, params: Params) -> Tensor:
    return z_rule(partial(F.adaptive_avg_pool2d, output_size=entry.module.output_size), entry.input, relevance)


def _identity_rule(entry: TraceEntry, relevance: Tensor, params: Params) -> Tensor:
    return relevance


def _reshape_rule(entry: TraceEntry, relevance: Tensor, params: Params) -> Tensor:
    return relevance.reshape(entry.input.shape)


LEAF_RULES: dict[type[nn.Module], Callable[[TraceEntry, Tensor, Params], Tensor]] = {
    nn.Linear: _linear_rule,
    nn.Conv2d: _conv_rule,
    nn.BatchNorm2d: _batchnorm_rule,
    nn.MaxPool2d: _maxpool_rule,
    nn.AvgPool2d: _avgpool_rule,
    nn.AdaptiveAvgPool2d: _adaptive_avgpool_rule,
    nn.ReLU: _identity_rule,
    nn.Dropout: _identity_rule,
    nn.Identity: _identity_rule,
    nn.Flatten: _reshape_rule,
}


def _leaf_rule(entry: TraceEntry, relevance: Tensor, params: Params) -> Tensor:
    rule = next(
        (LEAF_RULES[t] for t in type(entry.module).__mro__ if t in LEAF_RULES), None
    )  # per-query subclasses too
    if rule is None:
        raise TypeError(f"Relevance-CAM has no LRP rule for {entry.name!r} ({type(entry.module).__name__})")
    return rule(entry, relevance, params)


def _recompute(entry: TraceEntry, params: Params) -> Tensor:
    """The output of a branch's last layer, recomputed: the recorded one may have been changed in place."""
    m = entry.module
    if isinstance(m, nn.Conv2d):
        bias = None if m.bias is None else _tensor(entry, "bias", params)
        return conv2d(entry.input, _tensor(entry, "weight", params), bias, m, getattr(m, "conv_impl", "unfold"))
    if isinstance(m, nn.BatchNorm2d):
        scale, shift = _bn_affine(entry, params)
        return entry.input * scale + shift
    raise TypeError(f"Relevance-CAM cannot split a residual add after {entry.name!r} ({type(m).__name__})")


def _back(units: list[Unit], relevance: Tensor, params: Params) -> Tensor:
    """Relevance at the input of the first unit, from the relevance at the output of the last."""
    for unit in reversed(units):
        relevance = relevance.reshape(unit.entry.output.shape)
        relevance = (
            _residual_rule(unit, relevance, params) if unit.children else _leaf_rule(unit.entry, relevance, params)
        )
    return relevance


def _leaves(entries: list[TraceEntry]) -> list[Unit]:
    return [Unit(e) for e in entries]


def _residual_rule(unit: Unit, relevance: Tensor, params: Params) -> Tensor:
    layout = BLOCK_LAYOUTS[type(unit.entry.module)](unit.entry, unit.children)
    at_sum = _back(_leaves(layout.post), relevance, params)
    main_out = _recompute(layout.main[-1], params)
    skip_out = _recompute(layout.shortcut[-1], params) if layout.shortcut else unit.entry.input
    r_main, r_skip = split_sum(main_out, skip_out, at_sum.reshape(main_out.shape))
    r_main = _back(_leaves(layout.main), r_main, params)
    r_skip = _back(_leaves(layout.shortcut), r_skip, params)
    if layout.shortcut_from_pre:
        return _back(_leaves(layout.pre), r_main + r_skip, params)
    return _back(_leaves(layout.pre), r_main, params) + r_skip


def top_units(rec: Probe) -> list[Unit]:
    """The traced top part in execution order, each residual block gathered into one unit."""
    blocks = [b for b in rec.blocks if type(b.module) in BLOCK_LAYOUTS]
    units: list[Unit] = []
    for entry in rec.trace:
        owner = next((b for b in blocks if entry.name.startswith(b.name + ".")), None)
        if owner is None:
            units.append(Unit(entry))
        elif units and units[-1].entry is owner:
            units[-1].children.append(entry)
        else:
            units.append(Unit(owner, [entry]))
    return units


def activation_relevance(rec: Probe, params: Params, logits: Tensor, y: Tensor | int) -> Tensor:
    """Contrastive LRP relevance at A(x), shaped like A(x)."""
    relevance = _back(top_units(rec), contrastive_output_relevance(logits, y), params)
    return relevance.reshape(rec.activation.shape)


def _check_cam_layer(model: nn.Module, layer: str) -> None:
    """A residual block must lie wholly above or below A(x): its add cannot be split otherwise."""
    parts = layer.split(".")
    for prefix in (".".join(parts[:depth]) for depth in range(1, len(parts))):
        if type(model.get_submodule(prefix)) in BLOCK_LAYOUTS:
            raise ValueError(f"Relevance-CAM needs cam_layer {layer!r} outside residual block {prefix!r}")


class RelevanceCAM(CAM):
    name = "relevancecam"
    needs_trace = True
    linear_in_weights = False

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...]) -> None:
        _check_cam_layer(model, model.cam_layer)
        super().__init__(model, input_shape)

    def _from_forward(self, rec: Probe, params: Params, logits: Tensor, y: Tensor | int) -> Tensor:
        return activation_relevance(rec, params, logits, y)

    def channel_weights(self, activation: Tensor, grad_activation: Tensor, extra: Tensor) -> Tensor:
        return extra.sum(dim=(2, 3))
