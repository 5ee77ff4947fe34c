"""Per-instance fault isolation around ``Defense.answer``, run on a model worker.

A micro-batch holds queries of unrelated requests, so one query that makes the defense raise, or
whose answer is not a finite, well-formed distribution, must not cost the others their answers:

* the defense is called once for the whole batch;
* if that call raises (or returns the wrong number of answers), every instance is answered again
  alone, so only the instance that fails alone is lost;
* every answer is checked (:func:`answer_problem`); a bad one is lost alone, never sent.

A lost instance becomes a :class:`Failure`, which the request turns into a 500 ``defense_failed``
that carries nothing the defense computed (no probabilities, no map, no exception text). Defenses
are expected to fail closed themselves (``Answer.fallback``, DeepDefense's safe answer); this is the
server's second line for a defense that does not.
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from deepdefense.defense import Answer, Defense
from deepdefense.defense.gate import MISINFORM, MisinformationGate

logger = logging.getLogger("deepdefense.server")

Reason = Literal["exception", "invalid_answer"]


@dataclass(frozen=True)
class Failure:
    """An instance the defense could not answer, and why (a metric label, never shown to users)."""

    reason: Reason


def answer_rows(defense: Defense, x: Tensor, *, explain: bool, override: Tensor | None = None) -> list[Answer]:
    """``defense.answer(x)``, with each row's override of the gate's domain score (``defense/gate.py``: the score,
    misinform, trust; the monitor needs the gate, so a defense without one is never asked to misinform)."""
    if not isinstance(defense, MisinformationGate):
        if override is not None and bool((override == MISINFORM).any()):
            raise TypeError(f"defense {defense.name!r} has no misinformation gate to answer escalated keys")
        return defense.answer(x, explain=explain)
    return defense.answer(x, explain=explain, override=override)


def answer_isolated(
    defense: Defense,
    x: Tensor,
    *,
    explain: bool,
    num_classes: int,
    on_retry: Callable[[], None] = lambda: None,
    override: Tensor | None = None,
) -> list[Answer | Failure]:
    """One result per row of ``x``: the defense's answer, or a :class:`Failure` for that row alone (maps are
    checked against the queries' height and width). ``override`` (B,): each row's override of the gate's domain
    score (``defense/gate.py``: an escalated key's rows misinformed, a trusted key's answered by the defense)."""
    try:
        answers = answer_rows(defense, x, explain=explain, override=override)
        if not isinstance(answers, list) or len(answers) != len(x):
            raise TypeError(f"defense.answer returned {type(answers).__name__} for a batch of {len(x)}")
    except Exception:
        if len(x) == 1:
            logger.exception("defense %r failed on one instance; it is answered 500 defense_failed", defense.name)
            return [Failure("exception")]
        logger.warning(
            "defense %r failed on a micro-batch of %d; answering its instances one by one",
            defense.name,
            len(x),
            exc_info=True,
        )
        on_retry()
        return [
            r
            for i in range(len(x))
            for r in answer_isolated(
                defense,
                x[i : i + 1],
                explain=explain,
                num_classes=num_classes,
                override=None if override is None else override[i : i + 1],
            )
        ]
    results: list[Answer | Failure] = []
    for answer in answers:
        problem = answer_problem(answer, explain=explain, num_classes=num_classes, map_shape=tuple(x.shape[-2:]))
        if problem is not None:
            logger.error("defense %r gave an answer that is not sent (%s)", defense.name, problem)
            results.append(Failure("invalid_answer"))
        else:
            results.append(answer)
    return results


def answer_problem(
    answer: object, *, explain: bool, num_classes: int, map_shape: tuple[int, ...] | None = None
) -> str | None:
    """What is wrong with an answer, or None when it may be sent: a label among the classes, finite
    probabilities that form a distribution over them, and a finite 2-D map (of ``map_shape``, the query's
    height and width, when given) when one was asked for."""
    if not isinstance(answer, Answer):
        return f"not an Answer but {type(answer).__name__}"
    try:
        label = operator.index(answer.label)
    except TypeError:
        return "label is not an integer"
    if isinstance(answer.label, bool) or not 0 <= label < num_classes:
        return "label is not a class index"
    p = answer.probabilities
    if not isinstance(p, Tensor) or p.shape != (num_classes,) or not p.is_floating_point():
        return "probabilities are not a vector over the classes"
    p = p.detach().double()
    if not bool(torch.isfinite(p).all()):
        return "probabilities are not finite"
    if bool((p < -1e-6).any()) or not math.isclose(float(p.sum()), 1.0, abs_tol=1e-3):
        return "probabilities do not form a distribution"
    a = answer.attribution
    if not explain:
        return None  # a map that was not asked for is not sent
    if not isinstance(a, Tensor) or a.dim() != 2 or not a.is_floating_point():
        return "the map is not a 2-D float tensor"
    if map_shape is not None and tuple(a.shape) != tuple(map_shape):
        return "the map is not the size of the image"
    if not bool(torch.isfinite(a.detach()).all()):
        return "the map is not finite"
    return None
