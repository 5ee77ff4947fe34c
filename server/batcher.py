"""Micro-batching: concurrent requests share one ``Defense.answer`` call, run off the event loop.

Requests put their instances on a bounded queue (counted in instances; a request that does not
fit is refused at once with :class:`QueueFull`). One worker coroutine takes the oldest instance,
gathers up to ``max_batch`` instances with the same ``explain`` flag, waiting at most ``max_wait``
seconds for more, and hands the batch to a single worker thread, so the model is used by one
thread at a time. A request waits at most ``timeout`` seconds in all (:class:`RequestTimeout`);
its instances still queued by then are dropped without being computed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import Tensor

from defense import Answer, Defense

from .metrics import ServerMetrics

logger = logging.getLogger("deepdefense.server")


class QueueFull(Exception):
    """The queue cannot take the request's instances now."""


class RequestTimeout(Exception):
    """The request was not answered within its time limit."""


@dataclass
class _Item:
    x: Tensor  # (C, H, W)
    explain: bool
    future: asyncio.Future[Answer]
    enqueued: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    """Collects instances into micro-batches and answers them with ``defense.answer``."""

    def __init__(self, defense: Defense, metrics: ServerMetrics, *, device: torch.device, max_batch: int,
                 max_wait: float, capacity: int, timeout: float) -> None:
        self.defense = defense
        self.metrics = metrics
        self.device = device
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.capacity = capacity
        self.timeout = timeout
        self._queue: deque[_Item] = deque()
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dd-model")
        self._worker: asyncio.Task[None] | None = None

    @property
    def queued(self) -> int:
        """Instances waiting for a micro-batch."""
        return len(self._queue)

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="dd-batcher")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        for item in self._queue:
            item.future.cancel()
        self._queue.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def run_in_worker(self, x: Tensor, *, explain: bool) -> list[Answer]:
        """``defense.answer`` on the model thread, bypassing the queue (the warm-up query)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._answer, x, explain)

    async def submit(self, x: Tensor, *, explain: bool) -> list[Answer]:
        """Answers for a (B, C, H, W) batch, in order; raises QueueFull or RequestTimeout."""
        if len(self._queue) + len(x) > self.capacity:
            raise QueueFull
        loop = asyncio.get_running_loop()
        items = [_Item(xi, explain, loop.create_future()) for xi in x]
        self._queue.extend(items)
        self.metrics.queue_instances.set(len(self._queue))
        self._arrived.set()
        try:
            return list(await asyncio.wait_for(asyncio.gather(*(i.future for i in items)), self.timeout))
        except TimeoutError:
            raise RequestTimeout from None

    async def _run(self) -> None:
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            started = time.perf_counter()
            for item in batch:
                self.metrics.queue_wait.observe(started - item.enqueued)
            self.metrics.batch_instances.observe(len(batch))
            x = torch.stack([item.x for item in batch])
            try:
                answers = await self.run_in_worker(x, explain=batch[0].explain)
            except Exception as err:  # the defense failed: every request of the batch gets the error
                logger.exception("defense.answer failed on a batch of %d", len(batch))
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(err)
                continue
            self.metrics.inference.observe(time.perf_counter() - started)
            for item, answer in zip(batch, answers, strict=True):
                self.metrics.observe_answer(answer)
                if not item.future.done():
                    item.future.set_result(answer)

    async def _next_batch(self) -> list[_Item]:
        """The oldest live instance and up to ``max_batch - 1`` more with the same ``explain``."""
        while not self._live():
            self._arrived.clear()
            await self._arrived.wait()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        while self._count_matching() < self.max_batch and (left := deadline - loop.time()) > 0:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                break
        return self._take()

    def _live(self) -> bool:
        """Drop instances whose request has given up; True when one is left."""
        while self._queue and self._queue[0].future.done():
            self._queue.popleft()
        self.metrics.queue_instances.set(len(self._queue))
        return bool(self._queue)

    def _count_matching(self) -> int:
        if not self._live():
            return 0
        explain = self._queue[0].explain
        return sum(1 for item in self._queue if item.explain == explain and not item.future.done())

    def _take(self) -> list[_Item]:
        if not self._live():
            return []
        explain = self._queue[0].explain
        batch, rest = [], deque()
        for item in self._queue:
            if item.future.done():
                continue
            if item.explain == explain and len(batch) < self.max_batch:
                batch.append(item)
            else:
                rest.append(item)
        self._queue = rest
        self.metrics.queue_instances.set(len(self._queue))
        return batch

    def _answer(self, x: Tensor, explain: bool) -> list[Answer]:
        return self.defense.answer(x.to(self.device), explain=explain)
