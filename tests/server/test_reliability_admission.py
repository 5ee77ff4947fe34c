"""Admission control, step by step: the expected latency of a new request counts the micro-batches on
the model threads, the queue ahead and its own instances, drained by every model thread; an idle server
admits anything that fits; an old queue refuses whatever the estimate; the cost estimate rises at once and
falls slowly; the warm-up seeds it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import torch
from support.fakes import idle_batcher as batcher
from support.faults import SlowDefense
from support.servers import serving
from support.settings import make_settings

from deepdefense.server.app import create_app
from deepdefense.server.batcher import MicroBatcher, QueueFull, _Item

pytestmark = pytest.mark.usefixtures("no_server_env")


def queue(b: MicroBatcher, n: int, age: float = 0.0) -> None:
    loop = asyncio.new_event_loop()
    for _ in range(n):
        b._queue.append(_Item(torch.zeros(1, 28, 28), True, loop.create_future(), time.perf_counter() - age))
    loop.close()


def refusal(b: MicroBatcher, instances: int = 1) -> tuple[str, int] | None:
    try:
        b._admit(instances)
    except QueueFull as full:
        return full.reason, full.retry_after
    return None


def test_the_expected_latency_counts_the_running_batch_the_queue_and_its_own_instances() -> None:
    b = batcher()
    b.cost = 1.0
    assert b.expected_latency(2) == 2.0
    b._running = 8
    assert b.expected_latency(1) == 9.0
    queue(b, 8)
    assert b.expected_latency(1) == 17.0


def test_several_model_threads_drain_the_queue_together() -> None:
    b = batcher(workers=2)  # ``cost`` is one model thread's seconds per instance; two drain twice as fast
    b.cost = 1.0
    b._running = 8
    queue(b, 8)
    assert b.expected_latency(1) == 8.5
    assert refusal(b, 4) is None  # 10 s expected
    assert refusal(b, 6) == ("overloaded", 1)  # 11 s


def test_admission_refuses_late_requests_with_a_retry_after_from_the_backlog() -> None:
    b = batcher()
    assert refusal(b, 16) is None  # nothing measured, nothing running: only the capacity counts
    b.cost = 1.0
    assert refusal(b, 16) is None  # idle: admitted however long it will take
    b._running = 8
    assert refusal(b) is None  # 9 s expected
    assert refusal(b, 8) == ("overloaded", 6)  # 16 s expected, 10 admitted: retry in 6 s
    b.cost = 0.25
    assert refusal(b, 8) is None  # 4 s expected
    queue(b, 60)
    assert refusal(b, 5) == ("queue_full", 1)
    assert (
        b.metrics.registry.get_sample_value("dd_rejected_requests_total", {"model": "m", "reason": "overloaded"}) == 1
    )
    assert (
        b.metrics.registry.get_sample_value("dd_rejected_requests_total", {"model": "m", "reason": "queue_full"}) == 1
    )


def test_an_old_queue_refuses_whatever_the_estimate() -> None:
    b = batcher()
    b.cost = 0.001  # the estimate says a few milliseconds …
    queue(b, 1, age=11.0)  # … but the oldest instance has waited 11 s
    assert refusal(b) is not None and refusal(b)[0] == "overloaded"  # type: ignore[index]


def test_the_cost_rises_at_once_and_falls_slowly() -> None:
    b = batcher()
    b._observe_cost(8.0, 8)
    assert b.cost == 1.0
    b._observe_cost(24.0, 8)
    assert b.cost == 3.0
    b._observe_cost(8.0, 8)
    assert b.cost == pytest.approx(0.7 * 3.0 + 0.3 * 1.0)


def test_the_warm_up_seeds_the_cost(tmp_path: Path, victim: torch.nn.Module) -> None:
    app = create_app(make_settings(tmp_path), SlowDefense(victim, 0.05))
    with serving(app):
        assert app.state.runtime.default.batcher.cost >= 0.05
