"""The attacker's training losses on a transfer set.

* ``explanations`` — DeepDefense eq. (1), after Milli et al., "Model Reconstruction from Model
  Explanations", FAT* 2019: cross-entropy on the returned probabilities plus
  λ‖I(x) − I_A(x; w_A)‖²_F, where I_A is the attacker's own interpreter (of the server's kind) on
  the attack model, differentiated through with respect to w_A.
* ``probabilities`` — Knockoff Nets (Orekondy et al., CVPR 2019): cross-entropy on the returned
  probabilities used as soft labels.
* ``labels`` — cross-entropy on the returned top-1 label only: the adaptive attacker that ignores
  perturbed probabilities (and JBDA's oracle labels, Papernot et al., AsiaCCS 2017).

Two attackers that know about a misinformation gate (defense/gate.py) and drop the answers they suspect,
then train like ``labels`` on the rest (:func:`kept_answers`):

* ``confident`` keeps the answers whose top probability is at least ``TRUST`` — misinformation, it
  guesses, hedges;
* ``doubtful`` keeps those below ``TRUST`` — the misinformation model, it guesses, is trained to be
  confidently wrong (ours is: docs/results/misinformation.md), so the confident answers are the lies.

And one that asks twice (``clients/adaptive.py``: the ``twins`` and ``adaptive`` query sets, where every
query is followed by its twin, the same image with one pixel moved by 1/255):

* ``twin`` keeps a query's answer when it moved between the twins by more than ``MOVED`` — DeepDefense
  misdirects each query afresh, so honest answers move, while an answer drawn from one fixed network would
  stand still — and never trains on the twins themselves.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepdefense.defense.interpreters import Interpreter

AttackLoss = Literal["explanations", "probabilities", "labels", "confident", "doubtful", "twin"]
#: The paper's attackers (eq. 1, Knockoff Nets) and the label-only one.
PAPER_LOSSES: tuple[AttackLoss, ...] = ("explanations", "probabilities", "labels")
#: And the three that filter suspected misinformation (``twin`` only on query sets of twins).
ATTACK_LOSSES: tuple[AttackLoss, ...] = (*PAPER_LOSSES, "confident", "doubtful", "twin")
TRUST = 0.99  # the gate-aware attackers' line between a confident and a doubtful answer (their guess, not fitted)
#: ``twin``'s line: an answer whose probabilities moved by more than this between twins is believed honest (the
#: answers are sent to 6 significant digits, so a fixed network's answers to twins differ by far less).
MOVED = 1e-4


def kept_answers(kind: AttackLoss, probabilities: Tensor) -> Tensor | None:
    """Which answers of a transfer set the attacker ``kind`` trains on (a (N,) mask); None: all of them."""
    top = probabilities.max(-1).values
    if kind == "twin":
        return twin_moved(probabilities)
    if kind == "confident":
        return top >= TRUST
    if kind == "doubtful":
        return top < TRUST
    return None


def twin_moved(probabilities: Tensor) -> Tensor:
    """For a transfer set of (query, twin) pairs in consecutive rows: the first row of each pair whose answer
    moved by more than ``MOVED`` between the twins; never a twin's own row."""
    pairs = len(probabilities) // 2
    moved = (probabilities[0 : 2 * pairs : 2] - probabilities[1 : 2 * pairs : 2]).abs().amax(-1) > MOVED
    mask = torch.zeros(len(probabilities), dtype=torch.bool, device=probabilities.device)
    mask[0 : 2 * pairs : 2] = moved
    return mask


def soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean over the batch of −Σ_k p_k log softmax(logits)_k for target probabilities p."""
    return -(target * logits.log_softmax(-1)).sum(-1).mean()


def map_distance(attribution: Tensor, target: Tensor) -> Tensor:
    """Mean over the batch of the squared Frobenius distance ‖I − I_A‖²_F of (B, H, W) maps."""
    return (attribution - target).pow(2).flatten(1).sum(1).mean()


def explain_batch(interpreter: Interpreter, model: nn.Module, x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Logits (B, K) and maps (B, H, W) of the attack model for classes ``labels``, differentiable
    with respect to the model's parameters.

    One batched pass: the interpreter differentiates the class scores summed over the batch, which
    is each query's own derivative because no layer of the attack model mixes queries (no batch
    norm in the registered grey-image models; with batch norm in training mode the batch statistics
    couple the maps as they couple the logits). The model's own parameters are used (``params={}``),
    so no per-query weight gradient is formed; the map still depends on them through the graph.
    """
    e = interpreter.explain({}, x, labels)
    return e.logits, e.attribution


def attack_loss(
    kind: AttackLoss,
    model: nn.Module,
    interpreter: Interpreter,
    x: Tensor,
    labels: Tensor,
    probabilities: Tensor,
    attributions: Tensor | None,
    lam: float,
) -> Tensor:
    """The loss ``kind`` of the attack model on one batch of the transfer set."""
    if kind in ("labels", "confident", "doubtful", "twin"):  # the filters act on the transfer set (kept_answers)
        return F.cross_entropy(model(x), labels)
    if kind == "probabilities":
        return soft_cross_entropy(model(x), probabilities)
    if kind == "explanations":
        if attributions is None:
            raise ValueError("the explanations loss needs a transfer set with attribution maps")
        logits, maps = explain_batch(interpreter, model, x, labels)
        return soft_cross_entropy(logits, probabilities) + lam * map_distance(maps, attributions)
    raise ValueError(f"unknown attack loss {kind!r}; known losses: {', '.join(ATTACK_LOSSES)}")
