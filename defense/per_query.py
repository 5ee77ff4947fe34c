"""Per-query weights: one forward pass in which each query of a batch has its own copy of some layers.

The engine optimises a separate misdirection model for every query of a micro-batch. Only the
selected layers (eq. 9) differ between the copies, so the batch runs through one shared model in
which those layers take weights with a leading query dimension: a ``Linear`` weight (B, out, in)
becomes a batched matrix product, a ``Conv2d`` weight (B, out, in/groups, kh, kw) becomes either
``unfold`` + batched matrix product (im2col; fast on CPU, whose grouped-convolution backward is
slow) or one grouped convolution with B·groups groups (cuDNN's strength). Everything is plain
tensor maths, so ``torch.func.grad`` differentiates through it twice (the map's gradient, then the
engine's) and the gradient of a sum over queries is each query's own gradient.

``per_query_view(model, layers)`` builds such a view of a model: a structural copy that shares every
parameter and buffer with the original (nothing is copied, nothing of the victim is ever written)
and whose selected layers are :class:`PerQueryLinear` / :class:`PerQueryConv2d`. With ordinary
(unbatched) weights those layers compute exactly what ``nn.Linear`` / ``nn.Conv2d`` compute.
"""

from __future__ import annotations

import copy
import functools
import itertools
import math
import time
import typing
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ConvImpl = Literal["unfold", "grouped"]


class _MatVec(torch.autograd.Function):
    """z_b = W_b x_b for x (B, in), W (B, out, in); its backward is :class:`_MatTVec` and an outer product.

    Autograd's own derivative of a batched matrix product hands back the weight's gradient
    transposed; summing that with the contiguous one (the engine differentiates twice, so both
    appear) costs a strided pass over B·out·in numbers. These two functions keep every gradient of
    W contiguous and build outer products by broadcasting, to any order of differentiation.
    """

    @staticmethod
    def forward(x: Tensor, w: Tensor) -> Tensor:
        return torch.bmm(w, x.unsqueeze(-1)).squeeze(-1)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor], output: Tensor) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, Tensor]:
        x, w = ctx.saved_tensors
        return _MatTVec.apply(g, w), g.unsqueeze(2) * x.unsqueeze(1)


class _MatTVec(torch.autograd.Function):
    """u_b = W_bᵀ g_b for g (B, out), W (B, out, in); the partner of :class:`_MatVec`."""

    @staticmethod
    def forward(g: Tensor, w: Tensor) -> Tensor:
        return torch.bmm(g.unsqueeze(1), w).squeeze(1)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor], output: Tensor) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx: Any, gu: Tensor) -> tuple[Tensor, Tensor]:
        g, w = ctx.saved_tensors
        return _MatVec.apply(gu, w), g.unsqueeze(2) * gu.unsqueeze(1)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear`` where ``weight`` (and ``bias``) may carry a leading query dimension B matching x's."""
    if weight.dim() == 2:
        return F.linear(x, weight, bias)
    if x.dim() == 2:
        out = _MatVec.apply(x, weight)
        return out if bias is None else out + bias
    out = torch.bmm(x.reshape(x.shape[0], -1, x.shape[-1]), weight.transpose(1, 2))
    if bias is not None:
        out = out + bias.unsqueeze(1)
    return out.reshape(*x.shape[:-1], weight.shape[1])


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, module: nn.Conv2d, impl: ConvImpl = "unfold") -> Tensor:
    """``module``'s convolution of x with ``weight``, which may carry a leading query dimension B."""
    if weight.dim() == 4:
        return F.conv2d(x, weight, bias, module.stride, module.padding, module.dilation, module.groups)
    if isinstance(module.padding, str):
        raise TypeError(f"per-query convolution needs numeric padding, got {module.padding!r}")
    b, c, h, w = x.shape
    if impl == "grouped":
        out = F.conv2d(
            x.reshape(1, b * c, h, w),
            weight.flatten(0, 1),
            None if bias is None else bias.flatten(),
            module.stride,
            module.padding,
            module.dilation,
            module.groups * b,
        )
        return out.view(b, weight.shape[1], *out.shape[-2:])
    return _conv2d_unfold(x, weight, bias, module)


def _conv2d_unfold(x: Tensor, weight: Tensor, bias: Tensor | None, module: nn.Conv2d) -> Tensor:
    """im2col: the patches of each query times that query's (out, in·kh·kw) matrix, per group."""
    b, _, h, w = x.shape
    out_channels, kh, kw = weight.shape[1], weight.shape[-2], weight.shape[-1]
    (sh, sw), (ph, pw), (dh, dw), groups = module.stride, module.padding, module.dilation, module.groups
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    cols = F.unfold(x, (kh, kw), dilation=(dh, dw), padding=(ph, pw), stride=(sh, sw))  # (B, C·kh·kw, L)
    cols = cols.view(b * groups, -1, oh * ow)
    mats = weight.reshape(b * groups, out_channels // groups, -1)
    out = torch.bmm(mats, cols).view(b, out_channels, oh, ow)
    if bias is not None:
        out = out + bias[:, :, None, None]
    return out


class PerQueryLinear(nn.Linear):
    """``nn.Linear`` that also accepts a (B, out, in) weight and (B, out) bias for a batch of B queries,
    or per-query low-rank additions ``delta_u`` (B, out, r), ``delta_v`` (B, in, r) to its shared
    weight: W̃_b = W + U_b V_bᵀ (:mod:`defense.low_rank`)."""

    delta_u: Tensor
    delta_v: Tensor

    def forward(self, x: Tensor) -> Tensor:
        out = linear(x, self.weight, self.bias)
        if self.delta_u.numel():
            out = out + torch.bmm(self.delta_u, torch.bmm(self.delta_v.transpose(1, 2), x.unsqueeze(-1))).squeeze(-1)
        return out


class PerQueryConv2d(nn.Conv2d):
    """``nn.Conv2d`` that also accepts a (B, out, in/groups, kh, kw) weight and (B, out) bias."""

    conv_impl: ConvImpl = "unfold"

    def forward(self, x: Tensor) -> Tensor:
        return conv2d(x, self.weight, self.bias, self, self.conv_impl)


def per_query_view(model: nn.Module, layers: list[str], conv_impl: ConvImpl = "unfold") -> nn.Module:
    """A copy of ``model``'s structure sharing its tensors, whose ``layers`` take per-query weights."""
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    view = copy.deepcopy(model, memo=shared)
    for name in layers:
        module = view.get_submodule(name)
        if type(module) is nn.Linear:
            module.__class__ = PerQueryLinear
            module.register_buffer("delta_u", module.weight.new_zeros(0), persistent=False)
            module.register_buffer("delta_v", module.weight.new_zeros(0), persistent=False)
        elif type(module) is nn.Conv2d:
            module.__class__ = PerQueryConv2d
        else:
            raise TypeError(f"layer {name!r} ({type(module).__name__}) cannot take per-query weights")
    return set_conv_impl(view.eval(), conv_impl)


def set_conv_impl(view: nn.Module, conv_impl: ConvImpl) -> nn.Module:
    """``view`` (a :func:`per_query_view`) with its per-query convolutions computed by ``conv_impl``."""
    for module in view.modules():
        if isinstance(module, PerQueryConv2d):
            module.conv_impl = conv_impl
    return view


def default_conv_impl(view: nn.Module, input_shape: tuple[int, ...]) -> ConvImpl:
    """Grouped convolution on CUDA (cuDNN); on a CPU whichever of the two is faster *here* for the per-query
    convolutions of ``view`` (a :func:`per_query_view`), as the engine uses them: processors differ (an Intel
    Xeon ran im2col 5.4× faster in the first round, this AMD EPYC runs the grouped convolution ~10% faster today:
    docs/performance.md). Measured once per process and shape, so that every engine of a process computes alike."""
    device = next(view.parameters()).device
    if device.type == "cuda":
        return "grouped"
    shapes: dict[str, tuple[int, ...]] = {}  # each per-query convolution's input (C, H, W), from one forward pass
    convs = {n: m for n, m in view.named_modules() if isinstance(m, PerQueryConv2d)}
    hooks = [m.register_forward_hook(partial(_record_input, shapes, n)) for n, m in convs.items()]
    try:
        with torch.no_grad():
            view(torch.zeros((1, *input_shape), device=device))
    finally:
        for hook in hooks:
            hook.remove()
    key = tuple((tuple(m.weight.shape), m.stride, m.padding, m.dilation, m.groups, shapes[n]) for n, m in convs.items())
    return _fastest(key) if key else "unfold"


def _record_input(shapes: dict[str, tuple[int, ...]], name: str, module: nn.Module, args: tuple, out: Tensor) -> None:
    shapes[name] = tuple(args[0].shape[1:])


@functools.cache
def _fastest(convs: tuple[tuple[Any, ...], ...], batch: int = 16, repeats: int = 3) -> ConvImpl:
    """The per-query convolution that runs ``convs`` faster on this CPU: each timed (best of ``repeats``) on a
    forward pass of ``batch`` queries and the gradients of its per-query weights and its input, differentiated
    again (the engine's map and eq. (5) take both through the layers below)."""
    generator = torch.Generator().manual_seed(0)
    cases = []
    for weight, stride, padding, dilation, groups, shape in convs:
        module = nn.Conv2d(shape[0], weight[0], weight[-2:], stride, padding, dilation, groups, bias=False)
        w = torch.randn((batch, *weight), generator=generator)
        cases.append((module, torch.rand((batch, *shape), generator=generator), w))

    def seconds(impl: ConvImpl) -> float:
        best = math.inf
        for _ in range(repeats):
            started = time.perf_counter()
            for module, x, w in cases:
                x, w = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
                out = conv2d(x, w, None, module, impl).square().sum()
                gx, gw = torch.autograd.grad(out, (x, w), create_graph=True)
                (gx.square().sum() + gw.square().sum()).backward()
            best = min(best, time.perf_counter() - started)
        return best

    return min(typing.get_args(ConvImpl), key=seconds)
