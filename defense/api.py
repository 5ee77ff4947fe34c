"""What every defense offers the server and the evaluation harness: answers for a batch of queries."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .interpreters import Interpreter


@dataclass
class Answer:
    """One query's answer as a user receives it."""

    label: int
    probabilities: Tensor  # (K,), sums to 1
    attribution: Tensor | None  # (H, W), None when no explanation was asked for
    fallback: bool = False  # True: the documented safe answer (see docs/design.md, "Fail closed")
    misinformed: bool = False  # True: the misinformation gate answered it (defense/gate.py); counted, never sent
    flagged: bool = False  # True: the gate's domain score flagged the query (the monitor records it); never sent
    stats: dict[str, float] = field(default_factory=dict)


class Defense(ABC):
    """A defense wraps a victim model and its interpreter; ``answer`` never mutates the victim."""

    name: str

    def __init__(self, model: nn.Module, interpreter: Interpreter) -> None:
        self.model = model
        self.interpreter = interpreter

    @abstractmethod
    def answer(self, x: Tensor, *, explain: bool = True) -> list[Answer]:
        """Answers for a batch ``x`` of shape (B, C, H, W) with values in [0, 1]."""

    def public_settings(self) -> dict[str, Any]:
        """Settings that may be shown to users (``GET /v1/models``)."""
        return {}

    def victim_params(self) -> dict[str, Tensor]:
        return dict(self.model.named_parameters())


class NoDefense(Defense):
    """The undefended victim: its own probabilities and attribution map. Only when asked for by name."""

    name = "none"

    def answer(self, x: Tensor, *, explain: bool = True) -> list[Answer]:
        with torch.no_grad():
            logits = self.model(x)
        attributions: Tensor | list[None] = [None] * len(x)
        if explain:
            e = self.interpreter.explain({}, x, logits.argmax(1))  # the model's own weights, no weight gradients
            logits, attributions = e.logits.detach(), e.attribution.detach()
        probs = logits.softmax(-1)
        return [
            Answer(label=int(p.argmax()), probabilities=p, attribution=a)
            for p, a in zip(probs, attributions, strict=True)
        ]
