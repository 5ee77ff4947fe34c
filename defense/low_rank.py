"""Per-query ``Linear`` weights kept as the victim's weight plus a sum of rank-two steps.

For one query, every gradient of L_DD (eq. 8) with respect to a ``Linear`` weight W̃ that the
interpreter uses only linearly (Grad-CAM, Gradient⊙Input: W̃ a forward, W̃ᵀ g backward) has rank
two:

    ∇_W̃ L = (∂L/∂z) ⊗ a + g_z ⊗ (∂L/∂g_a),

z = W̃a + b the layer's output, a its input, g_z = ∂f_y/∂z the map's gradient at the output and
g_a = W̃ᵀ g_z the one at the input. ∂L/∂z is the gradient of the per-query bias, ∂L/∂g_a the
gradient of a zero tap added to g_a (:class:`~defense.interpreters.probe.GradientTap`). SGD with
momentum from W̃_0 = W therefore stays in W + Σ_j c_j G_j with G_j = P_j Q_jᵀ the step-j gradient
(P_j = [∂L/∂z, g_z], Q_j = [a, ∂L/∂g_a]); only the factors and the coefficients are stored, and the
layer computes W a + Σ_j c_j P_j (Q_jᵀ a) with the shared W. The iterates are exactly those of the
dense solver; what is saved is forming, adding and updating B × out × in numbers every step (for
LeNet's fc1, 400,000 per query).

Norms for the relative step (‖W̃‖ / ‖G_t‖, as :func:`defense.engine.relative_steps`) come from
small Gram matrices: ‖G_t‖² = Σ_ik (P_i·P_k)(Q_i·Q_k) and ‖W̃‖² = ‖W‖² + 2 Σ_j c_j ⟨W, G_j⟩ +
Σ_jj' c_j c_j' ⟨G_j, G_j'⟩.
"""

from __future__ import annotations

import torch
from torch import Tensor


class LowRankWeight:
    """The per-query weights W + Σ_j c_j P_j Q_jᵀ of one ``Linear`` layer for B queries, with their solver state."""

    def __init__(self, weight: Tensor, batch: int, steps: int) -> None:
        """``steps``: how many rank-two terms the weight may hold (solver steps, plus a warm start's terms)."""
        out_features, in_features = weight.shape
        self.weight = weight.detach()
        self.norm2 = float(self.weight.pow(2).sum())
        new = self.weight.new_zeros
        self.p = new(batch, out_features, 2 * steps)  # columns 2j, 2j+1: ∂L/∂z and g_z of step j
        self.q = new(batch, in_features, 2 * steps)  # columns 2j, 2j+1: a and ∂L/∂g_a of step j
        self.gram = new(batch, steps, steps)  # ⟨G_j, G_j'⟩
        self.cross = new(batch, steps)  # ⟨W, G_j⟩
        self.coef = new(batch, steps)  # c_j: the current iterate
        self.anchor = new(batch, steps)  # c_j of the last feasible iterate
        self.velocity = new(batch, steps)  # the momentum buffer in the same coordinates
        self.used = 0  # steps recorded so far

    def factors(self, anchor: bool = False) -> tuple[Tensor, Tensor]:
        """(U, V) with W̃ = W + U Vᵀ: U (B, out, 2·used), V (B, in, 2·used); of the current iterate, or of the
        last feasible one with ``anchor``."""
        n, coef = 2 * self.used, self.anchor if anchor else self.coef
        return self.p[:, :, :n] * coef[:, : self.used].repeat_interleave(2, dim=1).unsqueeze(1), self.q[:, :, :n]

    def norm(self) -> Tensor:
        """‖W̃‖ per query, (B,)."""
        c = self.coef[:, : self.used]
        quadratic = torch.einsum("bj,bjk,bk->b", c, self.gram[:, : self.used, : self.used], c)
        return (self.norm2 + 2 * (c * self.cross[:, : self.used]).sum(1) + quadratic).clamp_min(0).sqrt()

    def record(self, grad_out: Tensor, inputs: Tensor, map_grad_out: Tensor, grad_map_in: Tensor) -> Tensor:
        """Store this step's gradient G_t = [∂L/∂z, g_z] [a, ∂L/∂g_a]ᵀ; returns ‖G_t‖ per query."""
        t, w = self.used, self.weight
        p_t = torch.stack([grad_out, map_grad_out], dim=2)  # (B, out, 2)
        q_t = torch.stack([inputs, grad_map_in], dim=2)  # (B, in, 2)
        self.p[:, :, 2 * t : 2 * t + 2], self.q[:, :, 2 * t : 2 * t + 2] = p_t, q_t
        pp = torch.bmm(p_t.transpose(1, 2), self.p[:, :, : 2 * t + 2])  # (B, 2, 2t+2)
        qq = torch.bmm(q_t.transpose(1, 2), self.q[:, :, : 2 * t + 2])
        row = (pp * qq).view(len(p_t), 2, t + 1, 2).sum(dim=(1, 3))  # ⟨G_t, G_j⟩, j ≤ t
        self.gram[:, t, : t + 1], self.gram[:, : t + 1, t] = row, row
        w_q = (q_t.transpose(1, 2).reshape(-1, w.shape[1]) @ w.T).view(len(q_t), 2, -1)  # W q, both columns: one GEMM
        self.cross[:, t] = (w_q * p_t.transpose(1, 2)).sum(dim=(1, 2))
        self.used = t + 1
        return row[:, t].clamp_min(0).sqrt()

    def preset(self, u: Tensor, v: Tensor) -> None:
        """Start from W + U Vᵀ instead of W (a warm start, ``defense/warm_start.py``): U (B, out, 2r), V (B, in, 2r)
        become r rank-two terms with coefficient 1, which the solver's momentum never moves (it only steps
        along the gradients it records after them). Call before the first step."""
        if self.used:
            raise RuntimeError("a warm start is set before the solver's first step")
        for j in range(u.shape[2] // 2):
            self.record(u[:, :, 2 * j], v[:, :, 2 * j], u[:, :, 2 * j + 1], v[:, :, 2 * j + 1])
        self.coef[:, : self.used] = 1.0
        self.anchor = self.coef.clone()

    def reset(self, rows: Tensor) -> None:
        """Back to W for the queries ``rows`` (a boolean mask): their preset terms' coefficients become 0."""
        self.coef = torch.where(rows.unsqueeze(1), 0.0, self.coef)
        self.anchor = torch.where(rows.unsqueeze(1), 0.0, self.anchor)

    def step(self, ok: Tensor, lr: Tensor, momentum: float, scale: Tensor) -> None:
        """The solver's move for the step just recorded: where ``ok``, anchor here, v ← m·v + scale·G_t and
        c ← c − lr·v; elsewhere back to the anchor with the momentum dropped (the new gradient unused)."""
        t = self.used - 1
        okc = ok.unsqueeze(1)
        self.anchor = torch.where(okc, self.coef, self.anchor)
        velocity = momentum * self.velocity
        velocity[:, t] += scale
        self.velocity = torch.where(okc, velocity, 0.0)
        self.coef = torch.where(okc, self.anchor - lr.unsqueeze(1) * self.velocity, self.anchor)

    def select(self, keep: Tensor) -> None:
        """Keep only the queries ``keep`` (a boolean mask), as the engine drops finished ones."""
        for name in ("p", "q", "gram", "cross", "coef", "anchor", "velocity"):
            setattr(self, name, getattr(self, name)[keep])
