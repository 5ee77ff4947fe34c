"""The misinformation gate: out-of-domain queries are answered from a misinformation model.

Adaptive Misinformation (Kariyappa & Qureshi, CVPR 2020) in front of any defense. A domain score
(``defense/domain.py``, fit on the victim's training split and synthetic outliers only) flags the
queries an honest user would not send; they are answered from a misinformation model trained to put
little mass on the true class (``defense/misinformation.py``). Queries the score does not flag get the
wrapped defense's answer unchanged. AM blends the two models with α = sigmoid(ν·(τ − score)); both of
ours are confident, so a blend with α near ½ answers with whichever is surer
(docs/results/misinformation.md) and leaks the true label: a flagged query gets α = 1.

What a flagged answer must not give away, to a thief who knows the gate is there:

* **Its shape.** A flagged query is answered by the *same defense* run on the misinformation model
  (``misinformer``: for DeepDefense, the per-query engine with the same settings, step count and
  query-keyed seeding, on a misinformation model whose logits were scaled at training to spread like the
  victim's), so its probabilities and map move with the query exactly as honest answers do: asking
  twice with one pixel moved does not tell (``docs/results/below-label-line.md``, "Telling
  misinformed answers apart").
* **Its cost.** Both paths are the same computation on a network of the same architecture, so a flagged
  answer costs what any other costs (``docs/results/gate-latency.md``).
* **Its schema.** ``Answer.misinformed`` is for the server's metrics and monitor only; it is never sent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from .api import Answer, Defense


class MisinformationGate(Defense):
    """``inner``'s answers, except for the queries ``flags`` marks as out of domain (``DomainScore.flags``:
    True where the score is below its threshold) and those the caller asks to misinform (an escalated
    key's): those are ``misinformer``'s, the same defense on the misinformation model."""

    def __init__(self, inner: Defense, flags: Callable[[Tensor], Tensor], misinformer: Defense) -> None:
        super().__init__(inner.model, inner.interpreter)
        self.inner, self.flags, self.misinformer = inner, flags, misinformer
        self.name = inner.name  # the gate is a setting of the defense, not another defense

    def public_settings(self) -> dict[str, Any]:
        return {**self.inner.public_settings(), "gate": "misinform", "misinformer": self.misinformer.name}

    def answer(self, x: Tensor, *, explain: bool = True, misinform: Tensor | None = None) -> list[Answer]:
        """Answers for ``x``; ``misinform`` (B,) bool marks queries answered from the misinformation path
        whatever the domain score says (the extraction monitor's escalated keys)."""
        with torch.no_grad():
            flagged = self.flags(x).reshape(-1).cpu()
        if misinform is not None:
            flagged = flagged | misinform.reshape(-1).cpu().bool()
        rows, kept = flagged.nonzero().flatten().tolist(), (~flagged).nonzero().flatten().tolist()
        answers: list[Answer | None] = [None] * len(x)
        if kept:
            for i, a in zip(kept, self.inner.answer(x[kept], explain=explain), strict=True):
                answers[i] = a
        if rows:
            for i, a in zip(rows, self.misinformer.answer(x[rows], explain=explain), strict=True):
                answers[i] = replace(a, misinformed=True)
        return answers  # type: ignore[return-value]  # every row is answered above
