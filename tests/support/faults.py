"""Fault-injecting fake defenses for the reliability tests, and a server process that serves one
of them.

``FaultyDefense`` misbehaves on queries marked by their first pixel, so a test can put one bad
query into a micro-batch of good ones: ``RAISE`` makes the whole ``answer`` call raise, ``NAN``
gives that query NaN probabilities, ``INF_MAP`` an infinite map, ``FALLBACK`` the fail-closed
answer (``Answer.fallback``). Every other query gets the undefended victim's answer.

``python tests/support/faults.py --port P [--delay S]`` serves ``lenet-mnist`` through
``SlowDefense`` (S seconds of model time per instance) with ``server.app.serve``, configured by
the ``DD_*`` variables like ``deepdefense serve``: the SIGTERM and soak tests run it as a child.
Run as a script, this folder (not ``tests/``) is on ``sys.path``: import only installed packages here.
"""

from __future__ import annotations

import argparse
import threading
import time

import torch
from torch import Tensor

from deepdefense.defense import Answer, NoDefense
from deepdefense.defense.interpreters import create_interpreter
from deepdefense.models.checkpoint import load_checkpoint

SHAPE = (1, 28, 28)
RAISE, NAN, INF_MAP, FALLBACK = 0.25, 0.75, 0.5, 0.125


def load_victim() -> torch.nn.Module:
    """``lenet-mnist`` from the shipped checkpoint, frozen."""
    model, _ = load_checkpoint("lenet-mnist")
    model.requires_grad_(False)
    return model


def marked(marker: float, seed: int = 0) -> Tensor:
    """A random query whose first pixel is ``marker``."""
    x = torch.rand(SHAPE, generator=torch.Generator().manual_seed(seed))
    x[0, 0, 0] = marker
    return x


class FaultyDefense(NoDefense):
    """The undefended victim, except on marked queries; records the size of every call."""

    name = "faulty-fake"

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model, create_interpreter("gradcam", model, SHAPE))
        self.calls: list[int] = []
        self.lock = threading.Lock()

    def answer(self, x: Tensor, *, explain: bool = True) -> list[Answer]:
        with self.lock:
            self.calls.append(len(x))
        first = x[:, 0, 0, 0]
        if bool((first == RAISE).any()):
            raise RuntimeError(
                f"optimisation diverged; weights at /srv/models/victim.safetensors: "
                f"{self.model.net.features.conv1.weight.flatten()[:4]}"
            )
        answers = super().answer(x, explain=explain)
        for value, a in zip(first.tolist(), answers, strict=True):
            if value == NAN:
                a.probabilities = torch.full_like(a.probabilities, float("nan"))
            elif value == INF_MAP and a.attribution is not None:
                a.attribution = torch.full_like(a.attribution, float("inf"))
            elif value == FALLBACK:
                k = len(a.probabilities)
                a.probabilities = torch.arange(k, 0, -1, dtype=torch.float32).softmax(0)
                a.label, a.fallback = 0, True
        return answers


class SlowDefense(NoDefense):
    """The undefended victim after ``delay`` seconds of model time per instance."""

    name = "slow-fake"

    def __init__(self, model: torch.nn.Module, delay: float) -> None:
        super().__init__(model, create_interpreter("gradcam", model, SHAPE))
        self.delay = delay

    def answer(self, x: Tensor, *, explain: bool = True) -> list[Answer]:
        time.sleep(self.delay * len(x))
        return super().answer(x, explain=explain)


def main() -> None:
    from deepdefense.server.app import serve
    from deepdefense.server.settings import ServerSettings

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.05, help="model seconds per instance")
    args = parser.parse_args()
    settings = ServerSettings(defense="none", host="127.0.0.1", port=args.port, log_level="warning")
    serve(settings, SlowDefense(load_victim(), args.delay))


if __name__ == "__main__":
    main()
