"""Micro-batching: concurrent requests share one ``Defense.answer`` call, run off the event loop.

Requests put their instances on a bounded queue (counted in instances). Admission control refuses
a request at once with :class:`QueueFull` when its instances do not fit, or — unless the server is
idle — when its expected latency exceeds ``max_latency``: overload becomes an immediate 503 with a
``Retry-After`` computed from the backlog, not a pile of requests that time out. The expected
latency is the instances of the micro-batch on the model workers and of the queue ahead, and its
own, times the measured model seconds per instance: a moving average that rises at once with a
slower batch and falls slowly, seeded by the warm-up query. A queue whose oldest instance has
already waited ``max_latency`` refuses too, whatever the estimate says. No key may hold more than
``key_share`` of the queue, in instances (of ``capacity``) or in expected seconds (of ``max_latency``):
beyond, its request is refused (``key_share``) while other keys' requests are still admitted — unless the
key has nothing queued, so that any key can always send one request. One worker coroutine takes the
oldest instance and gathers up to ``max_batch`` instances with the same ``explain`` flag, round-robin
across the keys that queued them (one of each key, then a second of each, …), so that a key with one
instance queued is in the next micro-batch however many another key queued; it waits at most
``max_wait`` seconds for more, and hands the batch to a free model worker (``server/workers.py``). There are
``workers`` of them: threads of this process, each calling its own replica of the defense
(:func:`defense.replica.replica`: the same tensors, its own modules), or processes, each with its own copy;
either way a defense is used by one call at a time while several micro-batches are answered at once, and a
micro-batch forms while every worker is busy. On the worker :func:`server.isolation.answer_isolated` keeps one
query's failure from failing the others. A request waits at most ``timeout`` seconds in all
(:class:`RequestTimeout`); instances of a request that gave up (timeout, or the client went away and the request
was cancelled) are dropped without being computed: :meth:`Ticket.give_up` drops them and counts the instances
that reached a model worker, which is what
such a request is charged for.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import Tensor

from deepdefense.defense import Answer, Defense
from deepdefense.defense.gate import SCORE

from .isolation import Failure, answer_isolated, answer_rows
from .metrics import ModelMetrics
from .workers import ModelWorker, start_workers

logger = logging.getLogger("deepdefense.server")
T = TypeVar("T")


class QueueFull(Exception):
    """The queue cannot take the request's instances now; retry after ``retry_after`` seconds."""

    def __init__(self, reason: str, retry_after: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class RequestTimeout(Exception):
    """The request was not answered within its time limit."""


class DefenseFailed(Exception):
    """The defense could not answer one of the request's instances (see :mod:`server.isolation`)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


#: Weight of a faster micro-batch in the moving average of seconds per instance (a slower one counts at once).
_COST_SMOOTHING = 0.3
#: While another model worker is busy, a free one waits up to this share of a micro-batch's time for its own to fill:
#: a fuller micro-batch costs less per instance, and the busy worker's requests come back meanwhile (measured:
#: docs/performance.md, "Third round").
_FILL_SHARE = 0.1
#: The longest Retry-After the server asks for, in seconds.
_MAX_RETRY_AFTER = 60


@dataclass
class _Item:
    x: Tensor  # (C, H, W)
    explain: bool
    future: asyncio.Future[Answer]
    enqueued: float = field(default_factory=time.perf_counter)
    taken: bool = False  # handed to a model worker: computed, or being computed now
    key: str = ""  # the key id of the request, for the per-key share and the round-robin
    override: int = SCORE  # the gate's score decides, or MISINFORM (an escalated key's), TRUST (defense/gate.py)


class Ticket:
    """A request's instances on the queue: their answers, or — once the request gives up — how many of
    them reached a model worker."""

    def __init__(self, items: list[_Item], timeout: float) -> None:
        self._items = items
        self._timeout = timeout

    async def answers(self) -> list[Answer]:
        """The answers in order; raises RequestTimeout or DefenseFailed."""
        gathered = asyncio.gather(*(i.future for i in self._items), return_exceptions=True)
        try:
            results = await asyncio.wait_for(gathered, self._timeout)
        except TimeoutError:
            raise RequestTimeout from None
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return list(results)

    def give_up(self) -> int:
        """Drop the instances still queued (they are never computed) and return how many were handed
        to a model worker: answered, failed, or being computed now (those finish and their answers
        are discarded). Everything runs on the event loop and the worker takes only instances whose
        request has not given up, so the count is exact and final. A no-op once all are answered."""
        for item in self._items:
            item.future.cancel()
        return sum(item.taken for item in self._items)


class MicroBatcher:
    """Collects instances into micro-batches and answers them with ``defense.answer``."""

    def __init__(
        self,
        defense: Defense,
        metrics: ModelMetrics,
        *,
        device: torch.device,
        num_classes: int,
        max_batch: int,
        max_wait: float,
        capacity: int,
        timeout: float,
        max_latency: float,
        retry_after: int,
        key_share: float = 1.0,
        workers: int | Sequence[ModelWorker] = 1,
    ) -> None:
        """``workers``: the model workers (``server/workers.py``), or how many threads to answer on, each with its
        own replica of ``defense``."""
        if isinstance(workers, int):
            if workers < 1:
                raise ValueError(f"workers must be ≥ 1, got {workers}")
            workers = start_workers(defense, "thread", workers)
        if not workers:
            raise ValueError("a batcher needs at least one model worker")
        self._workers = list(workers)
        self.workers = len(self._workers)
        self.worker_kind = self._workers[0].kind
        self.metrics = metrics
        self.device = device
        self.num_classes = num_classes
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.capacity = capacity
        self.timeout = timeout
        self.max_latency = max_latency
        self.retry_after = retry_after
        self.key_share = key_share
        self.cost: float | None = None  # moving average of model-thread seconds per instance
        self._running = 0  # instances of the micro-batches on the model workers now
        self._batch_seconds = 0.0  # how long the last micro-batch took
        self._queue: deque[_Item] = deque()
        self._arrived = asyncio.Event()
        # one thread per worker: a thread worker computes on it, a process worker waits on it for its child's reply
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="dd-model")
        self._free: asyncio.Queue[ModelWorker] = asyncio.Queue()  # the workers not computing now
        for w in self._workers:
            self._free.put_nowait(w)
        self._serving: set[asyncio.Task[None]] = set()  # the micro-batches being answered
        self._worker: asyncio.Task[None] | None = None

    @property
    def queued(self) -> int:
        """Instances waiting for a micro-batch."""
        return len(self._queue)

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="dd-batcher")

    async def stop(self) -> None:
        tasks = [*self._serving, *([self._worker] if self._worker is not None else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for item in self._queue:
            item.future.cancel()
        self._queue.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)
        await asyncio.gather(*(asyncio.to_thread(w.close) for w in self._workers))

    async def warm_up(self, x: Tensor, *, explain: bool) -> list[list[Answer]]:
        """``defense.answer`` on every model worker in turn, bypassing the queue and the isolation (the warm-up
        query: a defense that fails it never becomes ready, and each worker pays for its first answer before any
        request waits for it); each worker's answers, in order. The times seed the cost estimate."""
        loop = asyncio.get_running_loop()
        taken = [await self._free.get() for _ in range(self.workers)]
        try:
            answers = []
            for worker in taken:
                started = time.perf_counter()
                answers.append(
                    await loop.run_in_executor(self._executor, worker.run, _answer, x, explain, None, self.device)
                )
                self._observe_cost(time.perf_counter() - started, len(x))
            return answers
        finally:
            for worker in taken:
                self._free.put_nowait(worker)

    async def answer_now(self, x: Tensor, *, explain: bool, override: Tensor | None = None) -> list[Answer]:
        """Answers for ``x`` on the next free model worker, bypassing the queue and the isolation (the monitor's
        escalated path: ``override`` as in ``server/isolation.py``'s ``answer_rows``)."""
        return await self.on_model_worker(_answer, x, explain, override, self.device)

    async def on_model_worker(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(defense, *args)`` on a free model worker, with its defense (each defense is used by one call at a
        time). On a process worker ``fn``, ``args`` and the result must pickle (a module-level function)."""
        worker = await self._free.get()
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, worker.run, fn, *args)
        finally:
            self._free.put_nowait(worker)

    def _seconds_per_instance(self) -> float:
        """How long the queue takes per instance, the model workers together (0 before any measurement)."""
        return (self.cost or 0.0) / self.workers

    def expected_latency(self, instances: int, key: str = "") -> float:
        """Seconds until a request of ``instances`` admitted now would be answered: the micro-batch
        on the model workers and the queue ahead of it, at the measured seconds per instance (0
        before any measurement). Instances admitted after it may join its micro-batch, but each
        only when its own expected latency, which counts this request, is within the limit.

        With a ``key``, "ahead" is what the round-robin of :meth:`_take` puts ahead: the key's own queued
        instances, and of every other key at most as many as the request's last turn (its held
        instances and its own), so that one key's backlog does not make another key's request late."""
        if key:
            held: dict[str, int] = {}
            for item in self._queue:
                if not item.future.done():
                    held[item.key] = held.get(item.key, 0) + 1
            turns = held.get(key, 0) + instances
            ahead = sum(min(n, turns) for n in held.values()) + instances
        else:
            ahead = len(self._queue) + instances
        return (self._running + ahead) * self._seconds_per_instance()

    def _held(self, key: str) -> int:
        """Instances of ``key`` waiting in the queue (of requests that have not given up)."""
        return sum(1 for item in self._queue if item.key == key and not item.future.done())

    def _admit(self, instances: int, key: str = "") -> None:
        """Raise :class:`QueueFull` when the request's instances do not fit, would be late, or would take
        its key past its share of the queue."""
        cost = self._seconds_per_instance()
        busy = self._live() or self._running > 0
        held = self._held(key) if key and self.key_share < 1 else 0  # "": no keys, one caller
        # the oldest instance ahead: of the whole queue, or (round-robin) of the key's own
        waiting = [i for i in self._queue if not i.future.done() and (not key or i.key == key)]
        oldest = time.perf_counter() - waiting[0].enqueued if waiting else 0.0
        over_share = held + instances - self.key_share * self.capacity
        late_share = (held + instances) * cost - self.key_share * self.max_latency
        if held and (over_share > 0 or (busy and late_share > 0)):
            reason, wait = "key_share", max(over_share * cost, late_share)
        elif len(self._queue) + instances > self.capacity:
            reason, wait = "queue_full", (len(self._queue) + instances - self.capacity) * cost
        elif busy and (
            (expected := self.expected_latency(instances, key)) > self.max_latency or oldest > self.max_latency
        ):
            # an idle server takes any request that fits, however long it will take
            reason, wait = "overloaded", expected - self.max_latency
        else:
            return
        self.metrics.rejected.labels(reason).inc()
        # Retry-After: when the backlog will have shrunk enough to admit the request
        raise QueueFull(reason, min(max(self.retry_after, math.ceil(wait)), _MAX_RETRY_AFTER))

    def _observe_cost(self, seconds: float, instances: int) -> None:
        """Update the seconds per instance: up at once, down by a moving average."""
        per_instance = seconds / instances
        if self.cost is None or per_instance > self.cost:
            self.cost = per_instance
        else:
            self.cost = (1 - _COST_SMOOTHING) * self.cost + _COST_SMOOTHING * per_instance
        self.metrics.instance_cost.set(self.cost)

    def enqueue(self, x: Tensor, *, explain: bool, override: int = SCORE, key: str = "") -> Ticket:
        """Queue a (B, C, H, W) batch of the key with id ``key`` (``""``: a server without keys, whose one
        anonymous caller has the whole queue), or raise QueueFull (nothing queued). ``override``: what the
        misinformation gate does with every instance (``defense/gate.py``): MISINFORM answers it from the
        misinformation path (a key the monitor escalated), TRUST from the defense whatever its domain score (a key
        in good standing), both in the same micro-batch computation as any other, so that it costs what any
        other costs."""
        self._admit(len(x), key)
        loop = asyncio.get_running_loop()
        items = [_Item(xi, explain, loop.create_future(), override=override, key=key) for xi in x]
        self.metrics.queue_instances.set(len(self._queue) + len(items))
        self._queue.extend(items)  # nothing after this can fail: a queued request always gets its ticket
        self._arrived.set()
        return Ticket(items, self.timeout)

    async def submit(self, x: Tensor, *, explain: bool) -> list[Answer]:
        """Answers for a (B, C, H, W) batch, in order; raises QueueFull, RequestTimeout or
        DefenseFailed. Cancelling the call drops the instances that are still queued."""
        ticket = self.enqueue(x, explain=explain)
        try:
            return await ticket.answers()
        finally:
            ticket.give_up()

    async def _run(self) -> None:
        while True:
            await self._instances_queued()
            # a model worker is free: the next micro-batch goes to it. It is held only while instances are queued
            # (at most ``max_wait``), so that a function waiting for a model worker (``on_model_worker``) gets one
            worker = await self._free.get()
            try:
                batch = await self._next_batch()
            except Exception:  # a bug here must not kill the worker and leave every later request to time out
                logger.exception("taking a micro-batch failed")
                self._free.put_nowait(worker)
                await asyncio.sleep(0)  # a bug that repeats does not starve the event loop
                continue
            except BaseException:
                self._free.put_nowait(worker)
                raise
            if not batch:  # every instance's request gave up
                self._free.put_nowait(worker)
                continue
            task = asyncio.get_running_loop().create_task(self._serve(batch, worker), name="dd-micro-batch")
            self._serving.add(task)
            task.add_done_callback(self._serving.discard)

    async def _serve(self, batch: list[_Item], worker: ModelWorker) -> None:
        """Answer ``batch`` on ``worker``, then give the worker back. A worker that fails outside the defense (a
        process worker's child that died) fails the batch's instances alone, as a defense that raises does."""
        self._running += len(batch)
        try:
            started = time.perf_counter()
            for item in batch:
                self.metrics.queue_wait.observe(started - item.enqueued)
            self.metrics.batch_instances.observe(len(batch))
            x = torch.stack([item.x for item in batch])
            override = torch.tensor([item.override for item in batch], dtype=torch.int8)
            results, retries = await asyncio.get_running_loop().run_in_executor(
                self._executor, worker.run, _isolated, x, batch[0].explain, override, self.device, self.num_classes
            )
            self.metrics.isolation_retries.inc(retries)
            elapsed = self._batch_seconds = time.perf_counter() - started
            self.metrics.inference.observe(elapsed)
            self._observe_cost(elapsed, len(batch))
            self._settle(batch, results)
        except Exception:  # a bug here must not leave the batch's requests to time out
            logger.exception("micro-batch of %d failed outside the defense", len(batch))
            self._settle(batch, [Failure("exception")] * len(batch))
        finally:
            self._running -= len(batch)
            self._free.put_nowait(worker)

    def _settle(self, batch: list[_Item], results: list[Answer | Failure]) -> None:
        for item, result in zip(batch, results, strict=True):
            if isinstance(result, Failure):
                self.metrics.observe_failure(result.reason)
                outcome: Answer | BaseException = DefenseFailed(result.reason)
            else:
                self.metrics.observe_answer(result)
                outcome = result
            if item.future.done():  # its request gave up while the batch ran; the answer is discarded
                continue
            if isinstance(outcome, BaseException):
                item.future.set_exception(outcome)
            else:
                item.future.set_result(outcome)

    async def _instances_queued(self) -> None:
        """Return once an instance whose request has not given up is queued."""
        while not self._live():
            self._arrived.clear()
            await self._arrived.wait()

    async def _next_batch(self) -> list[_Item]:
        """The oldest live instance and up to ``max_batch - 1`` more with the same ``explain`` (none when every
        queued request has given up meanwhile), after at most ``max_wait`` for more — or, while another model
        thread is busy, ``_FILL_SHARE`` of the last micro-batch's time if that is longer."""
        if not self._live():
            return []
        loop = asyncio.get_running_loop()
        wait = max(self.max_wait, _FILL_SHARE * self._batch_seconds) if self._running else self.max_wait
        deadline = loop.time() + wait
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
            self.metrics.dropped.inc()
        self.metrics.queue_instances.set(len(self._queue))
        return bool(self._queue)

    def _count_matching(self) -> int:
        if not self._live():
            return 0
        explain = self._queue[0].explain
        return sum(1 for item in self._queue if item.explain == explain and not item.future.done())

    def _take(self) -> list[_Item]:
        """The next micro-batch: instances with the oldest one's ``explain``, round-robin across keys."""
        if not self._live():
            return []
        explain = self._queue[0].explain
        by_key: dict[str, list[_Item]] = {}
        for item in self._queue:
            if item.future.done():
                self.metrics.dropped.inc()
            elif item.explain == explain:
                by_key.setdefault(item.key, []).append(item)
        batch: list[_Item] = []
        for turn in range(self.max_batch):
            batch += [items[turn] for items in by_key.values() if turn < len(items)][: self.max_batch - len(batch)]
            if len(batch) == self.max_batch:
                break
        chosen = {id(item) for item in batch}
        rest = deque(item for item in self._queue if not item.future.done() and id(item) not in chosen)
        self.metrics.queue_instances.set(len(rest))
        # nothing changes before this point, so a failure above leaves the queue as it was
        self._queue = rest
        for item in batch:
            item.taken = True
        return batch


# What the batcher runs on a model worker: module-level functions, so that a process worker can be sent them.


def _isolated(
    defense: Defense, x: Tensor, explain: bool, override: Tensor, device: torch.device, num_classes: int
) -> tuple[list[Answer | Failure], int]:
    """A micro-batch's results (``server/isolation.py``), and how many times its batch was answered again one by one
    (0 or 1; the batcher counts it in ``dd_batch_isolation_retries_total``)."""
    retries: list[None] = []
    results = answer_isolated(
        defense,
        x.to(device),
        explain=explain,
        num_classes=num_classes,
        on_retry=lambda: retries.append(None),
        override=override,
    )
    return results, len(retries)


def _answer(defense: Defense, x: Tensor, explain: bool, override: Tensor | None, device: torch.device) -> list[Answer]:
    """``answer_rows`` of ``x`` moved to the model's device."""
    return answer_rows(defense, x.to(device), explain=explain, override=override)
