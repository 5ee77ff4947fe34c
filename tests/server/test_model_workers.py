"""Several model threads (``model_workers``): micro-batches are answered at once, each thread with its own
replica of the defense, never two threads with one; the escalated path and the warm-up take a free thread."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from support.fakes import batcher

from deepdefense.defense import Answer, NoDefense
from deepdefense.defense.interpreters import create_interpreter
from deepdefense.server.batcher import MicroBatcher

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
                asyncio.gather(*(b.on_model_thread(lambda d: (id(d), d.answer(x))) for _ in range(2))), 60
            )
            return {r[0] for r in results}, b._free.qsize()
        finally:
            await b.stop()

    used, free = asyncio.run(run())
    assert len(used) == 2 and free == 2  # both given back
    assert not any(MeetingDefense.overlapped)
