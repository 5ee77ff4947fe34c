"""The misinformation gate: out-of-domain queries are answered from a misinformation model.

Adaptive Misinformation (Kariyappa & Qureshi, CVPR 2020) in front of any defense. A domain score
(``defense/domain.py``, fit on the victim's training split and synthetic outliers only) flags the
queries an honest user would not send; their probabilities come from a misinformation model trained to
put little mass on the true class (``defense/misinformation.py``) and their map is that model's own map
for the label it answers, through the same interpreter, so label and map agree. Queries the score does
not flag get the wrapped defense's answer unchanged. AM blends the two models with α = sigmoid(ν·(τ −
score)); both of ours are confident, so a blend with α near ½ answers with whichever is surer
(docs/results/misinformation.md) and leaks the true label: a flagged query gets α = 1.

What a flagged answer must not give away: it has the schema of any other answer, and every query —
flagged or not — goes through the wrapped defense first, so a flagged answer costs what any other
costs (its latency does not tell). ``Answer.misinformed`` is for the server's metrics only; it is
never sent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from .api import Answer, Defense
from .interpreters import Interpreter


class MisinformationGate(Defense):
    """``inner``'s answers, except for the queries ``flags`` marks as out of domain (``DomainScore.flags``:
    True where the score is below its threshold)."""

    def __init__(
        self,
        inner: Defense,
        flags: Callable[[Tensor], Tensor],
        misinformation: nn.Module,
        misinformation_interpreter: Interpreter,
    ) -> None:
        super().__init__(inner.model, inner.interpreter)
        self.inner, self.flags = inner, flags
        self.misinformation, self.misinformation_interpreter = misinformation, misinformation_interpreter
        self.name = inner.name  # the gate is a setting of the defense, not another defense

    def public_settings(self) -> dict[str, Any]:
        return {**self.inner.public_settings(), "gate": "misinform"}

    def answer(self, x: Tensor, *, explain: bool = True) -> list[Answer]:
        answers = self.inner.answer(x, explain=explain)  # every query pays the same path first
        with torch.no_grad():
            rows = self.flags(x).reshape(-1).nonzero().flatten().tolist()
        if not rows:
            return answers
        xf = x[rows]
        with torch.no_grad():
            p = self.misinformation(xf).softmax(-1)
        labels = p.argmax(1)
        maps: list[Tensor | None] = [None] * len(rows)
        if explain:  # the misinformation model's own map for the label it answers: label and map agree
            maps = list(self.misinformation_interpreter.explain({}, xf, labels).attribution.detach())
        for j, i in enumerate(rows):
            answers[i] = replace(
                answers[i], label=int(labels[j]), probabilities=p[j], attribution=maps[j], misinformed=True
            )
        return answers
