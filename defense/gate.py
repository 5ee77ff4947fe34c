"""The misinformation gate: out-of-domain queries are answered with the classes a misinformation model ranks.

Adaptive Misinformation (Kariyappa & Qureshi, CVPR 2020) in front of any defense. A domain score
(``defense/domain.py``, fit on the victim's training split and synthetic outliers only) flags the
queries an honest user would not send; their classes are ranked by a misinformation model trained to put
little mass on the true class (``defense/misinformation.py``). Queries the score does not flag get the
wrapped defense's answer unchanged. AM blends the two models with α = sigmoid(ν·(τ − score)); both of
ours are confident, so a blend with α near ½ answers with whichever is surer
(docs/results/misinformation.md) and leaks the true label: a flagged query gets α = 1.

What a flagged answer must not give away, to a thief who knows the gate is there
(docs/results/gate-detectors.md):

* **Its shape.** Every query, flagged or not, is answered by the wrapped defense; a flagged answer keeps
  that answer's probability *values* and its map and only gives the values to other classes: the largest
  to the misinformation model's first class, the next to its second, and so on (:func:`rerank`). Its
  confidence, entropy and map are an honest answer's, and they move with the query as honest answers do
  (DeepDefense misdirects every query afresh), so asking twice with one pixel moved does not tell.
* **Its cost.** Every query runs the same computation: the wrapped defense, and one forward pass of the
  misinformation model (for all rows, flagged or not).
* **Its schema.** ``Answer.misinformed`` is for the server's metrics and monitor only; it is never sent.

What it keeps: the map is the wrapped defense's, made for the class the victim would answer; a thief who
could read a class from a map alone would see that it disagrees with the label (docs/design.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from .api import Answer, Defense

#: A query's override of the domain score (``MisinformationGate.answer``): the score decides; misinformed whatever the
#: score (an escalated key's query); answered by the wrapped defense whatever the score (a key in good standing).
SCORE, MISINFORM, TRUST = 0, 1, -1


def rerank(probabilities: Tensor, ranking: Tensor) -> Tensor:
    """``probabilities``' values (…, K), largest first, given to the classes in ``ranking``'s order (…, K):
    the same sorted values — the same confidence and entropy — on other classes."""
    values = probabilities.sort(dim=-1, descending=True).values
    return torch.empty_like(probabilities).scatter_(-1, ranking.to(probabilities.device), values)


class MisinformationGate(Defense):
    """``inner``'s answers, except for the queries ``flags`` marks as out of domain (``DomainScore.flags``:
    True where the score is below its threshold) and those the caller asks to misinform (an escalated
    key's): those get ``inner``'s answer with its classes ranked by ``misinformation``."""

    def __init__(self, inner: Defense, flags: Callable[[Tensor], Tensor], misinformation: nn.Module) -> None:
        super().__init__(inner.model, inner.interpreter)
        self.inner, self.flags, self.misinformation = inner, flags, misinformation
        self.name = inner.name  # the gate is a setting of the defense, not another defense

    def public_settings(self) -> dict[str, Any]:
        return {**self.inner.public_settings(), "gate": "misinform"}

    def answer(self, x: Tensor, *, explain: bool = True, override: Tensor | None = None) -> list[Answer]:
        """Answers for ``x``; ``override`` (B,) holds each query's :data:`SCORE`, :data:`MISINFORM` (the
        extraction monitor's escalated keys) or :data:`TRUST` (its keys in good standing). Every answer says
        whether the score flagged its query (``Answer.flagged``), whatever the override did with it."""
        with torch.no_grad():
            flagged = self.flags(x).reshape(-1).cpu().bool()
            ranking = self.misinformation(x).argsort(dim=1, descending=True).cpu()  # every row: one cost
        misinformed = flagged
        if override is not None:
            o = override.reshape(-1).cpu()
            misinformed = (flagged & (o != TRUST)) | (o == MISINFORM)
        answers = self.inner.answer(x, explain=explain)
        answers = [replace(a, flagged=bool(f)) for a, f in zip(answers, flagged, strict=True)]
        for i in misinformed.nonzero().flatten().tolist():
            p = rerank(answers[i].probabilities, ranking[i])
            answers[i] = replace(answers[i], label=int(ranking[i, 0]), probabilities=p, misinformed=True)
        return answers
