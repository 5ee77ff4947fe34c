"""Several model workers (``model_workers``): micro-batches are answered at once, each worker with its own defense,
never two calls with one; the escalated path and the warm-up take a free worker. Threads (a replica each) and
processes (a copy each, ``server/workers.py``): a child answers what the engine answers here, one that dies fails
its micro-batch alone and is replaced, and stopping the batcher ends the children."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
from support.fakes import ExitingDefense, batcher, raising, sleeping, unpicklable
from support.images import queries
from support.settings import make_settings

from deepdefense.defense import Answer, Defense, NoDefense
from deepdefense.defense.engine import DeepDefense
from deepdefense.defense.gate import MISINFORM, SCORE, TRUST, MisinformationGate
from deepdefense.defense.interpreters import create_interpreter
from deepdefense.server.batcher import DefenseFailed, MicroBatcher
from deepdefense.server.metrics import ServerMetrics
from deepdefense.server.runtime import build_defense
from deepdefense.server.workers import WorkerDied, WorkerError, resolve_kind, start_workers

pytestmark = pytest.mark.usefixtures("no_server_env")


class MeetingDefense(NoDefense):
    """NoDefense whose calls wait until ``parties`` of them are running at once (at most 30 s), recording which
    defense object answered and whether another call was inside that same object meanwhile."""

    parties = 2
    meeting: threading.Barrier  # set per test; a class attribute, so that replicas share it
    calls: list[int]
    overlapped: list[bool]

    def answer(self, x: torch.Tensor, *, explain: bool = True, **_: object) -> list[Answer]:
        inside = getattr(self, "inside", 0)
        self.inside = inside + 1
        MeetingDefense.calls.append(id(self))
        MeetingDefense.overlapped.append(inside > 0)
        try:
            MeetingDefense.meeting.wait(timeout=30)  # BrokenBarrierError: the calls were not at the same time
            return super().answer(x, explain=explain)
        finally:
            self.inside -= 1


def make_batcher(victim: torch.nn.Module, workers: int) -> MicroBatcher:
    MeetingDefense.meeting = threading.Barrier(workers)
    MeetingDefense.calls, MeetingDefense.overlapped = [], []
    defense = MeetingDefense(victim, create_interpreter("gradcam", victim, (1, 28, 28)))
    return batcher(defense, max_batch=2, timeout=60.0, max_latency=1e6, workers=workers)


def test_two_model_threads_answer_two_micro_batches_at_once_each_with_its_own_defense(victim: torch.nn.Module) -> None:
    async def run() -> list[list[Answer]]:
        b = make_batcher(victim, workers=2)
        b.start()
        try:
            x = torch.rand((1, 1, 28, 28), generator=torch.Generator().manual_seed(0))
            # micro-batches of at most 2: four instances make two micro-batches, which meet on the barrier
            tickets = [b.enqueue(x, explain=True, key=str(i)) for i in range(4)]
            return await asyncio.wait_for(asyncio.gather(*(t.answers() for t in tickets)), 60)
        finally:
            await b.stop()

    answers = asyncio.run(run())
    assert all(len(a) == 1 and a[0].attribution is not None for a in answers)
    assert len(MeetingDefense.calls) == 2 and len(set(MeetingDefense.calls)) == 2  # two threads, two defenses
    assert not any(MeetingDefense.overlapped)


def test_the_model_thread_functions_get_a_free_threads_defense(victim: torch.nn.Module) -> None:
    async def run() -> tuple[set[int], int]:
        b = make_batcher(victim, workers=2)
        try:
            x = torch.rand((1, 1, 28, 28), generator=torch.Generator().manual_seed(0))
            # two at once: each is given a defense no other running call has (they meet on the barrier)
            results = await asyncio.wait_for(
                asyncio.gather(*(b.on_model_worker(lambda d: (id(d), d.answer(x))) for _ in range(2))), 60
            )
            return {r[0] for r in results}, b._free.qsize()
        finally:
            await b.stop()

    used, free = asyncio.run(run())
    assert len(used) == 2 and free == 2  # both given back
    assert not any(MeetingDefense.overlapped)


# -- process workers (server/workers.py) ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Defense:
    """The real engine behind the real gate, as the default server builds it, at 2 steps."""
    settings = make_settings(tmp_path_factory.mktemp("engine"), defense="deepdefense", gate="auto", engine={"steps": 2})
    return build_defense(settings, "lenet-mnist", torch.device("cpu"))


def test_auto_takes_processes_for_the_engine_on_a_cpu_and_threads_otherwise(
    engine: Defense, defense: NoDefense
) -> None:
    assert isinstance(engine, MisinformationGate) and isinstance(engine.inner, DeepDefense)
    cpu = torch.device("cpu")
    assert resolve_kind("auto", engine, cpu) == "process"
    assert resolve_kind("auto", engine.inner, cpu) == "process"
    assert resolve_kind("auto", defense, cpu) == "thread"  # a cheap defense: the pipe would cost more than the GIL
    assert resolve_kind("auto", engine, torch.device("meta")) == "thread"  # not a CPU
    assert resolve_kind("thread", engine, cpu) == "thread" and resolve_kind("process", defense, cpu) == "process"


def test_process_workers_answer_what_the_engine_answers_in_this_process(engine: Defense) -> None:
    x = queries(6)
    override = torch.tensor([SCORE, SCORE, MISINFORM, TRUST, SCORE, SCORE], dtype=torch.int8)

    async def run() -> tuple[list[Answer], list[list[Answer]], list[Answer], list[bool]]:
        b = batcher(engine, workers=start_workers(engine, "process", 2), max_batch=3, timeout=120, max_latency=1e6)
        b.start()
        try:
            warm = await b.warm_up(x[:1], explain=True)  # every worker answers it
            tickets = [b.enqueue(x[i : i + 1], explain=True, override=int(override[i])) for i in range(6)]
            answers = await asyncio.wait_for(asyncio.gather(*(t.answers() for t in tickets)), 120)
            escalated = await b.answer_now(x[:2], explain=True, override=torch.full((2,), MISINFORM, dtype=torch.int8))
            alive = [w._process is not None and w._process.is_alive() for w in b._workers]  # type: ignore[attr-defined]
            return [a[0] for a in answers], warm, escalated, alive
        finally:
            await b.stop()

    answers, warm, escalated, alive = asyncio.run(run())
    assert alive == [True, True]
    torch.set_num_threads(1)  # as each worker computes; the same code and weights, so only rounding may differ
    here = engine.answer(x, override=override)  # type: ignore[call-arg]
    assert [a.label for a in answers] == [a.label for a in here]
    assert [a.misinformed for a in answers] == [a.misinformed for a in here]
    for a, h in zip(answers, here, strict=True):
        torch.testing.assert_close(a.probabilities, h.probabilities, atol=1e-5, rtol=0)
        torch.testing.assert_close(a.attribution, h.attribution, atol=1e-5, rtol=0)
    assert len(warm) == 2 and all(len(w) == 1 for w in warm)
    torch.testing.assert_close(warm[0][0].probabilities, warm[1][0].probabilities, atol=1e-5, rtol=0)
    assert all(a.misinformed for a in escalated)  # the monitor's escalated path runs in a child too


def test_a_child_that_dies_fails_its_micro_batch_alone_and_is_replaced(victim: torch.nn.Module) -> None:
    defense = ExitingDefense(victim, create_interpreter("gradcam", victim, (1, 28, 28)))
    dying = queries(2)
    dying[1, 0, 0, 0] = ExitingDefense.EXIT

    async def run() -> tuple[BaseException | None, list[Answer], int, int, float]:
        metrics = ServerMetrics().model("m", defense="d", interpreter="i", device="cpu")
        b = batcher(defense, metrics, workers=start_workers(defense, "process", 1), max_batch=2, timeout=60)
        b.start()
        try:
            first = b._workers[0]._process.pid  # type: ignore[attr-defined]
            lost = b.enqueue(dying, explain=True)  # one micro-batch; its child ends inside it
            failure = None
            try:
                await asyncio.wait_for(lost.answers(), 60)
            except DefenseFailed as err:
                failure = err
            after = await asyncio.wait_for(b.enqueue(queries(2, seed=1), explain=True).answers(), 60)
            second = b._workers[0]._process.pid  # type: ignore[attr-defined]
            return failure, after, first, second, metrics.failures.labels("d", "exception")._value.get()
        finally:
            await b.stop()

    failure, after, first, second, failures = asyncio.run(run())
    assert isinstance(failure, DefenseFailed)  # 500 defense_failed over HTTP, nothing computed is sent
    assert failures == 2  # both instances of the micro-batch, counted as failures of the defense
    assert second != first  # a new child
    assert len(after) == 2 and all(a.attribution is not None for a in after)  # the next request is answered


def test_stopping_the_batcher_ends_its_children(victim: torch.nn.Module) -> None:
    defense = NoDefense(victim, create_interpreter("gradcam", victim, (1, 28, 28)))

    async def run() -> list[Any]:
        b = batcher(defense, workers=start_workers(defense, "process", 2))
        b.start()
        processes = [w._process for w in b._workers]  # type: ignore[attr-defined]
        await b.stop()
        return processes

    processes = asyncio.run(run())
    assert all(p is not None and not p.is_alive() for p in processes)


def test_a_call_that_fails_in_a_child_raises_here_and_the_child_answers_on(victim: torch.nn.Module) -> None:
    defense = NoDefense(victim, create_interpreter("gradcam", victim, (1, 28, 28)))

    async def run() -> tuple[list[str], list[Answer]]:
        b = batcher(defense, workers=start_workers(defense, "process", 1))
        b.start()
        errors = []
        try:
            for fn, args in ((raising, ("no such digit",)), (unpicklable, ())):
                try:
                    await b.on_model_worker(fn, *args)
                except WorkerError as err:
                    errors.append(str(err))
            return errors, await asyncio.wait_for(b.enqueue(queries(1), explain=True).answers(), 60)
        finally:
            await b.stop()

    errors, after = asyncio.run(run())
    assert len(errors) == 2 and errors[0] == "ValueError: no such digit" and "pickle" in errors[1].lower()
    assert len(after) == 1 and after[0].attribution is not None


def test_a_worker_closed_while_it_answers_starts_no_other_child(victim: torch.nn.Module) -> None:
    (worker,) = start_workers(NoDefense(victim, create_interpreter("gradcam", victim, (1, 28, 28))), "process", 1)
    child = worker._process  # type: ignore[attr-defined]
    with ThreadPoolExecutor(1) as pool:
        call = pool.submit(worker.run, sleeping, 1.0)
        time.sleep(0.3)  # the call is in the child
        worker.close()  # as the server stops
        with pytest.raises(WorkerDied, match="closed"):
            call.result(timeout=30)
    assert child is not None and not child.is_alive()
    assert worker._process is None  # type: ignore[attr-defined]  # no replacement was started
    with pytest.raises(WorkerDied):
        worker.run(sleeping, 0.0)
