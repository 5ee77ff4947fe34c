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
flagged or not — goes through the wrapped defense and the misinformation model both, so a flagged
answer costs what any other costs (its latency does not tell: ``docs/results/gate-latency.md``).
``Answer.misinformed`` is for the server's metrics only; it is never sent.
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
    True where the score is below its threshold).

    ``equal_cost`` (the server's setting) sends every query through ``inner`` and the misinformation model,
    so that a flagged answer costs what any other costs; the evaluation harness turns it off to skip the
    work whose answers it would throw away: the answers are the same either way.
    """

    def __init__(
        self,
        inner: Defense,
        flags: Callable[[Tensor], Tensor],
        misinformation: nn.Module,
        misinformation_interpreter: Interpreter,
        *,
        equal_cost: bool = True,
    ) -> None:
        super().__init__(inner.model, inner.interpreter)
        self.inner, self.flags, self.equal_cost = inner, flags, equal_cost
        self.misinformation, self.misinformation_interpreter = misinformation, misinformation_interpreter
        self.name = inner.name  # the gate is a setting of the defense, not another defense

    def public_settings(self) -> dict[str, Any]:
        return {**self.inner.public_settings(), "gate": "misinform"}

    def answer(self, x: Tensor, *, explain: bool = True) -> list[Answer]:
        with torch.no_grad():
            flagged = self.flags(x).reshape(-1).cpu()
        rows, kept = flagged.nonzero().flatten().tolist(), (~flagged).nonzero().flatten().tolist()
        answers: list[Answer | None] = [None] * len(x)
        if self.equal_cost:  # every query pays both paths, so that its latency does not tell whether it was flagged
            answers = list(self.inner.answer(x, explain=explain))
            misinformation = self.misinform(x, explain=explain)
            for i in rows:
                answers[i] = replace(answers[i], **_answered(misinformation[i]))  # type: ignore[arg-type]
            return answers  # type: ignore[return-value]
        if kept:
            for i, a in zip(kept, self.inner.answer(x[kept], explain=explain), strict=True):
                answers[i] = a
        for i, a in zip(rows, self.misinform(x[rows], explain=explain) if rows else [], strict=True):
            answers[i] = a
        return answers  # type: ignore[return-value]  # every row is answered above

    def misinform(self, x: Tensor, *, explain: bool = True) -> list[Answer]:
        """The misinformation model's answers for every query of ``x`` (flagged queries; and every query of a
        key the server's extraction monitor has escalated): its label, its probabilities and its own map
        for that label through the same interpreter, so label and map agree."""
        with torch.no_grad():
            p = self.misinformation(x).softmax(-1)
        labels = p.argmax(1)
        maps: list[Tensor | None] = [None] * len(x)
        if explain:
            maps = list(self.misinformation_interpreter.explain({}, x, labels).attribution.detach())
        return [
            Answer(label=int(labels[j]), probabilities=p[j], attribution=maps[j], misinformed=True)
            for j in range(len(x))
        ]


def _answered(a: Answer) -> dict[str, Any]:
    """What a misinformation answer replaces in a wrapped defense's answer (its stats stay: they are not sent)."""
    return {"label": a.label, "probabilities": a.probabilities, "attribution": a.attribution, "misinformed": True}
