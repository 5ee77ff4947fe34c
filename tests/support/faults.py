"""Fake defenses and small helpers for the reliability tests, and a server process that serves one
of the fakes.

``FaultyDefense`` misbehaves on queries marked by their first pixel, so a test can put one bad
query into a micro-batch of good ones: ``RAISE`` makes the whole ``answer`` call raise, ``NAN``
gives that query NaN probabilities, ``INF_MAP`` an infinite map, ``FALLBACK`` the fail-closed
answer (``Answer.fallback``). Every other query gets the undefended victim's answer.

``python tests/reliability_support.py --port P [--delay S]`` serves ``lenet-mnist`` through
``SlowDefense`` (S seconds of model time per instance) with ``server.app.serve``, configured by
the ``DD_*`` variables like ``deepdefense serve``: the SIGTERM and soak tests run it as a child.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from fastapi import FastAPI
from torch import Tensor

from defense import Answer, NoDefense
from defense.interpreters import create_interpreter
from models.checkpoint import load_checkpoint

SHAPE = (1, 28, 28)
RAISE, NAN, INF_MAP, FALLBACK = 0.25, 0.75, 0.5, 0.125


def victim() -> torch.nn.Module:
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
            raise RuntimeError(f"optimisation diverged; weights at /srv/models/victim.safetensors: "
                               f"{self.model.net.features.conv1.weight.flatten()[:4]}")
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


def metric_value(metrics_text: str, sample: str) -> float:
    """The value of one sample of a /metrics page, e.g. ``dd_answers_total{defense="none"}``."""
    for line in metrics_text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{sample} is not exported")


@contextmanager
def served_like_serve(app: FastAPI) -> Iterator[str]:
    """``app`` under uvicorn in a thread, configured as ``deepdefense serve`` configures it
    (``server.app.uvicorn_config``), on a free loopback port; yields the base URL once ready."""
    from clients.loopback import uvicorn_thread
    from server.app import uvicorn_config

    config = uvicorn_config(app, app.state.runtime.settings)
    config.log_level = "warning"
    with uvicorn_thread(config) as url:
        yield url


def main() -> None:
    from server.app import serve
    from server.settings import ServerSettings

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.05, help="model seconds per instance")
    args = parser.parse_args()
    settings = ServerSettings(defense="none", host="127.0.0.1", port=args.port, log_level="warning")
    serve(settings, SlowDefense(victim(), args.delay))


if __name__ == "__main__":
    main()
