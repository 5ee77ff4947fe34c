"""Fake defenses the tests drive by hand: ``GatedDefense`` holds the model thread at a gate; ``ExitingDefense`` ends
the process a marked query reaches (a model worker's child that dies mid-batch).

The fault-injecting fakes (``FaultyDefense``, ``SlowDefense``) and the fake server process are in
``support/faults.py``, which must stay runnable as a script and so imports nothing from here."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import torch

from deepdefense.defense import Defense, NoDefense
from deepdefense.defense.interpreters import create_interpreter
from deepdefense.server.batcher import MicroBatcher
from deepdefense.server.metrics import ModelMetrics, ServerMetrics


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


class ExitingDefense(NoDefense):
    """NoDefense whose process ends at once (``os._exit``, as a crash would) when a query's first pixel is ``EXIT``."""

    EXIT = 1.0

    def answer(self, x: torch.Tensor, *, explain: bool = True, **_: object) -> list:
        if bool((x[:, 0, 0, 0] == self.EXIT).any()):
            os._exit(3)
        return super().answer(x, explain=explain)


def raising(defense: Defense, message: str) -> None:
    """A call for a model worker that raises (module-level: a process worker can be sent it)."""
    raise ValueError(message)


def sleeping(defense: Defense, seconds: float) -> None:
    """A call for a model worker that takes ``seconds``."""
    time.sleep(seconds)


def unpicklable(defense: Defense) -> object:
    """A call for a model worker whose result cannot be sent back from a process."""
    return threading.Lock()


def batcher(defense: Defense | None, metrics: ModelMetrics | None = None, **options: Any) -> MicroBatcher:
    """A batcher around ``defense`` with the tests' settings (queue of 64, micro-batches of 8, no wait, 10 s latency
    limit, one model thread), ``options`` over them, and its series in ``metrics`` (default: model ``m``); not
    started."""
    metrics = metrics or ServerMetrics().model("m", defense="d", interpreter="i", device="cpu")
    settings = {
        "device": torch.device("cpu"),
        "num_classes": 10,
        "max_batch": 8,
        "max_wait": 0.0,
        "capacity": 64,
        "timeout": 30.0,
        "max_latency": 10.0,
        "retry_after": 1,
    }
    return MicroBatcher(defense, metrics, **(settings | options))  # type: ignore[arg-type]


def idle_batcher(**options: Any) -> MicroBatcher:
    """A batcher without a defense that is never started: the admission tests set its queue and cost by hand."""
    return batcher(None, **options)
