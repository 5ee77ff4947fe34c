"""A fake defense the tests drive by hand: ``GatedDefense`` holds the model thread at a gate.

The fault-injecting fakes (``FaultyDefense``, ``SlowDefense``) and the fake server process are in
``support/faults.py``, which must stay runnable as a script and so imports nothing from here."""

from __future__ import annotations

import threading

import torch

from deepdefense.defense import NoDefense
from deepdefense.defense.interpreters import create_interpreter


class GatedDefense(NoDefense):
    """NoDefense that records each batch and, once closed, waits at the gate before answering."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model, create_interpreter("gradcam", model, (1, 28, 28)))
        self.gate = threading.Event()
        self.gate.set()  # open for the warm-up query
        self.entered = threading.Event()
        self.batches: list[tuple[int, bool]] = []

    def answer(self, x: torch.Tensor, *, explain: bool = True) -> list:
        self.batches.append((len(x), explain))
        self.entered.set()
        assert self.gate.wait(timeout=30), "the test never opened the gate"
        return super().answer(x, explain=explain)
