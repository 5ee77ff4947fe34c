"""The data plane: everything a request meets beyond its protocol's types, one place for every protocol.

The routes (``/predict``, the Open Inference Protocol's ``/v2``, the probes, the model list, the operator's
flags) convert their request into plain values (a model name, a ``(B, C, H, W)`` batch), call one
:class:`DataPlane` method and convert what it returns into their response; every rule is checked here or
below it, once. Its refusals are typed errors (``server/errors.py``), each naming its status and code,
rendered in the shape of the protocol that asked.

In the order a query meets them: readiness (503), the model named (404), an escalated key and a spent
budget before the body is read (:meth:`DataPlane.before_body`), the instance limit (413) and the budget
(429) before any image is decoded, then :meth:`DataPlane.answer`: the spend, the monitor's screening, the
micro-batcher, the answers, the monitor again, the watermark, the response, and the refund of whatever
was not paid for (docs/server.md, "What a request costs").
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import torch
from fastapi import Request
from starlette.concurrency import run_in_threadpool
from torch import Tensor

from deepdefense.defense import Answer
from deepdefense.defense.gate import MISINFORM, SCORE, MisinformationGate

from .auth import Caller
from .batcher import DefenseFailed, MicroBatcher, QueueFull, RequestTimeout, Ticket
from .budget import HOLD_HEADER, is_hold
from .errors import (
    AnswerFailed,
    AnswerTimeout,
    BudgetExhausted,
    Busy,
    ClientClosedRequest,
    KeyFlagged,
    NotFlagged,
    TooManyInstances,
)
from .monitor import ExtractionMonitor, Screening
from .runtime import ModelRuntime, Runtime
from .state import STATE_ERRORS, state_reachable

logger = logging.getLogger("deepdefense.server")

T = TypeVar("T")


class DataPlane:
    """What every route calls, over the app's :class:`Runtime` (its models and what they share)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    # -- readiness and the models --------------------------------------------------------------------------------

    async def ready(self) -> list[ModelRuntime]:
        """Every served model, the default first, once all are ready and the Redis state (if any) answers (503)."""
        self.runtime.check_ready()
        await run_in_threadpool(self.runtime.check_state)
        return self.models()

    def models(self) -> list[ModelRuntime]:
        """Every served model, the default (the first) first."""
        return list(self.runtime.models.values())

    def model(self, name: str | None, field: str) -> ModelRuntime:
        """The model ``name`` names (None: the default); 404 ``model_not_found`` naming the served ones."""
        return self.runtime.model(name, field=field)

    def ready_model(self, name: str | None, field: str) -> ModelRuntime:
        """The model ``name`` names (404), once it is ready (503)."""
        model = self.model(name, field)
        model.ready_batcher()
        return model

    # -- what refuses a request before its queries are decoded ------------------------------------------------

    async def before_body(self, caller: Caller, model: ModelRuntime | None = None) -> None:
        """What refuses a request before its body is read: no model ready (503, when the body names the model),
        an escalated key (403) and a spent budget (429, fewer than one query left); a body costs the server
        nothing before these. ``model``: the model the request's path names; None for ``/predict``, whose body
        names it: then only a key escalated with ``monitor_action refuse`` (counted under the default model)
        and a key with no query left on any model are refused here, the rest once the body has named the
        model."""
        runtime = self.runtime
        if model is None and all(m.phase != "ready" for m in runtime.models.values()):
            runtime.default.ready_batcher()
        if runtime.monitor is not None and (model is not None or runtime.settings.monitor_action == "refuse"):
            await run_in_threadpool(_escalated, model or runtime.default, caller, 1)
        if runtime.settings.query_budget is not None:
            await run_in_threadpool(_within_any_budget, [model] if model else self.models(), caller)

    def check_instances(self, count: int, field: str) -> None:
        """413 ``too_many_instances`` above ``max_instances`` (``field``: where the request counts them)."""
        limit = self.runtime.settings.max_instances
        if count > limit:
            raise TooManyInstances(limit, count, field)

    async def check_budget(self, model: ModelRuntime, caller: Caller, queries: int) -> None:
        """429 when the caller's budget of ``model`` has fewer than ``queries`` left (read only: the answer
        spends), before any image is decoded."""
        await run_in_threadpool(_within_budget, model, caller, queries)

    # -- answering ---------------------------------------------------------------------------------------------

    async def answer(
        self,
        model: ModelRuntime,
        caller: Caller,
        x: Tensor,
        *,
        explain: bool,
        request: Request,
        respond: Callable[[list[Answer]], T],
    ) -> T:
        """``respond(answers)`` for the validated (B, C, H, W) batch ``x``, answered by ``model``'s defense: the
        path every route that answers queries shares (``/predict``, the Open Inference Protocol's ``infer``).

        In order, after :meth:`before_body` (an escalated key refused, a spent budget): the caller's budget
        (429), the monitor's screening of the queries (near-duplicates and distances: it may escalate the key
        now, before anything is answered; 403 ``key_flagged``, refunded, under ``refuse``), the micro-batcher
        (503 when full, overloaded or the key holds its share of the queue; an escalated key's queries are
        answered there by the misinformation path, a trusted key's flagged ones by the defense, in the same
        computation as any other), the answers (504 in
        time, 499 when the client goes away, 500 when the defense fails), the monitor again (a key escalated
        while the request was queued gets the escalated answer or 403), the monitor's record of the domain
        flags, the watermark, then ``respond``. The request is charged once ``respond`` has returned; whatever
        else happens, the queries not paid for are refunded (docs/server.md, "What a request costs"). Where
        the monitor or the budget cannot be reached (their state in Redis), the request is answered 503
        ``state_unavailable``: never an answer that was not metered. In cluster mode the spend is kept under
        the gateway's hold until the request ends (``server/budget.py``, "Holds")."""
        batcher = model.ready_batcher()
        hold = _hold(model, request)
        # before_body refused an escalated key under ``refuse`` before the body was read; nothing here
        # refuses before it costs anything; see "What a request costs" in docs/server.md.
        await run_in_threadpool(_spend, model, caller, len(x), hold)
        charged = 0  # of the len(x) queries spent, those the request pays for; the rest is refunded however it ends
        ticket: Ticket | None = None
        try:
            screening = await run_in_threadpool(_screened, model, caller, x)  # escalated now or earlier, or trusted
            key = caller.key_id if model.keys.enabled else ""
            override = SCORE if screening is None else screening.override
            ticket = batcher.enqueue(x, explain=explain, override=override, key=key)
            model.metrics.key_queries.labels(caller.key_id).inc(len(x))
            try:
                answers = await _unless_disconnected(request, ticket.answers())
            except (RequestTimeout, _ClientGone):
                charged = ticket.give_up()  # what reached a model worker is paid for; the dropped rest is not
                raise
            escalated = False
            if model.monitor is not None:
                answers, escalated = await _monitored(model, batcher, caller, x, answers, screening, explain=explain)
            if model.watermark is not None:
                answers = await run_in_threadpool(_watermarked, model, caller, x, answers, escalated)
            response = respond(answers)
            charged = len(x)
            return response
        except QueueFull as full:
            raise Busy(full.reason, full.retry_after) from None
        except RequestTimeout:
            raise AnswerTimeout(model.settings.request_timeout_s) from None
        except _ClientGone:
            raise ClientClosedRequest from None
        except DefenseFailed:
            raise AnswerFailed from None
        finally:
            if ticket is not None:
                ticket.give_up()  # whatever went wrong, nothing of this request stays queued
            if charged < len(x):
                await _refund(model, caller, len(x) - charged, hold)
            if hold is not None:
                await _settle(model, hold)

    # -- the operator's view of the monitor ----------------------------------------------------------------------

    async def flagged_keys(self) -> list[dict[str, object]]:
        """The keys the extraction monitor has escalated, oldest first (503 while the state is unreachable)."""
        with state_reachable(self.runtime.settings.retry_after_s):
            return await run_in_threadpool(self._monitor().flagged_keys)

    async def clear_flag(self, key_id: str) -> None:
        """Clear a key's escalation and its window (404 ``not_flagged`` when it is not escalated)."""
        monitor = self._monitor()
        with state_reachable(self.runtime.settings.retry_after_s):
            if not await run_in_threadpool(monitor.clear, key_id):
                raise NotFlagged
            self.runtime.metrics.flagged_keys.set(await run_in_threadpool(monitor.count_flagged))

    def _monitor(self) -> ExtractionMonitor:
        assert self.runtime.monitor is not None  # the operator's routes are included only with the monitor on
        return self.runtime.monitor


# -- budgets -------------------------------------------------------------------------------------------------------


def _within_any_budget(models: list[ModelRuntime], caller: Caller) -> None:
    """429 when the caller has no query left on any of ``models`` (before the body is read, when the request's
    instances are not known yet)."""
    with state_reachable(models[0].settings.retry_after_s):
        left = max(m.ledger.remaining(caller.key_id) for m in models)  # type: ignore[union-attr]
    if left < 1:
        raise BudgetExhausted(left, None)


def _within_budget(model: ModelRuntime, caller: Caller, queries: int) -> None:
    """429 when the caller's budget of the model has fewer than ``queries`` left. Read only: :func:`_spend` spends."""
    if model.ledger is None:
        return
    with state_reachable(model.settings.retry_after_s):
        left = model.ledger.remaining(caller.key_id)
    if left < queries:
        raise BudgetExhausted(left, queries)


def _spend(model: ModelRuntime, caller: Caller, queries: int, hold: str | None) -> None:
    """Spend the caller's queries from its budget (429, nothing spent, when it does not cover them; 503
    ``state_unavailable`` when the budget cannot be reached)."""
    if model.ledger is None:
        return
    with state_reachable(model.settings.retry_after_s):
        spent = model.ledger.spend(caller.key_id, queries, hold) is not None
        left = 0 if spent else model.ledger.remaining(caller.key_id)
    if not spent:
        raise BudgetExhausted(left, queries)


async def _refund(model: ModelRuntime, caller: Caller, queries: int, hold: str | None) -> None:
    """Give back queries that were spent but are not charged (see "What a request costs")."""
    if model.ledger is None:
        return
    try:
        await run_in_threadpool(model.ledger.refund, caller.key_id, queries, hold)
    except STATE_ERRORS as err:  # the state is lost: the queries stay spent (too much charged, never too little)
        logger.warning("could not refund %d queries (%s): they stay spent", queries, type(err).__name__)


async def _settle(model: ModelRuntime, hold: str) -> None:
    """End the request's hold: what it holds stays charged (an unreachable state lets it expire, the same)."""
    try:
        await run_in_threadpool(model.ledger.settle, hold)  # type: ignore[union-attr]
    except STATE_ERRORS as err:
        logger.warning("could not settle a hold (%s): it expires charged", type(err).__name__)


def _hold(model: ModelRuntime, request: Request) -> str | None:
    """The hold the cluster's gateway named for this request; None outside cluster mode, without a budget or
    without the Redis state (holds live there). Only the gateway reaches a replica's app, and it replaces
    any hold header a client sends."""
    if model.settings.replicas is None or model.ledger is None or model.settings.state is None:
        return None
    hold = request.headers.get(HOLD_HEADER)
    return hold if hold is not None and is_hold(hold) else None


# -- the client going away -------------------------------------------------------------------------------------------


class _ClientGone(Exception):
    """The client went away before its answer was ready."""


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """``work``'s result, or — when the client disconnects first — ``work`` cancelled and
    :class:`_ClientGone` (answered 499, which nobody reads but the metrics count)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise _ClientGone
    return task.result()


async def _disconnected(request: Request) -> None:
    """Return once the server reports that the client has gone (the body has already been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# -- the extraction monitor and the watermark ---------------------------------------------------------------------


def _escalated(model: ModelRuntime, caller: Caller, queries: int) -> bool:
    """Whether the extraction monitor has escalated the caller's key (403 when escalated keys are refused)."""
    if model.monitor is None:
        return False
    with state_reachable(model.settings.retry_after_s):
        escalated = model.monitor.escalated(caller.key_id)
    return escalated and _act(model, queries)


def _screened(model: ModelRuntime, caller: Caller, x: Tensor) -> Screening | None:
    """The extraction monitor screens the request's queries before they are answered (an escalated key's
    too: its queries go into the near-duplicate index, where another key that reuses them is found); the key's
    standing (403 ``key_flagged`` instead when escalated keys are refused). None without the monitor, and for a
    model without the gate, which the monitor does not watch (it only refuses an escalated key there)."""
    if model.monitor is None:
        return None
    if not model.gated:
        _escalated(model, caller, len(x))
        return None
    with state_reachable(model.settings.retry_after_s):
        screening = model.monitor.screen(caller.key_id, x)
        model.metrics.flagged_keys.set(model.monitor.count_flagged())
    if screening.escalated:
        _act(model, len(x))
    return screening


def _act(model: ModelRuntime, queries: int) -> bool:
    """An escalated key's request: counted, and refused (403: under ``monitor_action refuse``, or by a model
    without the gate, which has no misinformation to give) or answered by the misinformation path (True)."""
    if model.settings.monitor_action == "refuse" or not model.gated:
        model.metrics.escalated.labels("refuse").inc(queries)
        raise KeyFlagged
    return True


async def _monitored(
    model: ModelRuntime,
    batcher: MicroBatcher,
    caller: Caller,
    x: Tensor,
    answers: list[Answer],
    screening: Screening | None,
    *,
    explain: bool,
) -> tuple[list[Answer], bool]:
    """The answers an escalated key gets, and the monitor's record of the others' domain flags (a retry's not
    again); and whether the key is escalated. A key escalated while the request was queued (by another of its
    requests) gets the escalated answer too — recomputed by the misinformation path — or 403 under ``refuse``,
    uncharged."""
    escalated = screening is not None and screening.escalated
    if not escalated and await run_in_threadpool(_escalated, model, caller, len(x)):
        assert isinstance(model.defense, MisinformationGate)  # the settings require the gate for the monitor
        everything = torch.full((len(x),), MISINFORM, dtype=torch.int8)
        answers = await batcher.answer_now(x, explain=explain, override=everything)
        escalated = True
    if escalated:
        model.metrics.escalated.labels("misinform").inc(len(answers))
        return answers, True
    if screening is None:  # a model without the gate: no domain flags to record
        return answers, False
    flags = screening.distinct([a.flagged for a in answers])
    with state_reachable(model.settings.retry_after_s):  # unobserved answers are not sent
        await run_in_threadpool(model.monitor.observe, caller.key_id, flags)  # type: ignore[union-attr]
        model.metrics.flagged_keys.set(await run_in_threadpool(model.monitor.count_flagged))  # type: ignore[union-attr]
    return answers, False


def _watermarked(
    model: ModelRuntime, caller: Caller, x: Tensor, answers: list[Answer], escalated: bool
) -> list[Answer]:
    """``answers`` with the watermark's (``server/watermark.py``; the escalated fraction for a key the monitor
    escalated), kept in the store before any is sent (503 ``state_unavailable`` when the store cannot be reached: a
    watermark not kept proves nothing)."""
    assert model.watermark is not None
    with state_reachable(model.settings.retry_after_s):
        return model.watermark.apply(caller.key_id, x, answers, escalated=escalated)
