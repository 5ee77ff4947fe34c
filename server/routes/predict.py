"""``POST /predict``: validated instances in, the defense's answers out."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TypeVar

import torch
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from torch import Tensor

from defense import Answer
from defense.gate import MisinformationGate

from ..auth import Caller
from ..batcher import DefenseFailed, MicroBatcher, QueueFull, RequestTimeout, Ticket
from ..budget import HOLD_HEADER, is_hold
from ..dependencies import CallerDep, RuntimeDep
from ..errors import ApiError, body_validation_error
from ..images import instances_to_tensor
from ..limits import require_json
from ..precision import rounded
from ..runtime import ModelRuntime, Runtime
from ..schemas import Attribution, ErrorResponse, Prediction, PredictRequest, PredictResponse
from ..state import STATE_ERRORS, state_reachable

logger = logging.getLogger("deepdefense.server")

router = APIRouter(tags=["predict"])

_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 403, 413, 415, 422, 429, 500, 503, 504)}
#: Logged and counted (never received) when the client went away before its answer was ready.
CLIENT_CLOSED = 499

T = TypeVar("T")


_REQUEST_BODY = {
    "required": True,
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PredictRequest"}}},
}


@router.post(
    "/predict",
    response_model=PredictResponse,
    response_model_exclude_none=True,
    dependencies=[Depends(require_json)],
    responses=_ERRORS,
    openapi_extra={"requestBody": _REQUEST_BODY},
)  # type: ignore[arg-type]
async def predict(caller: CallerDep, runtime: RuntimeDep, request: Request) -> PredictResponse:
    """Labels, probabilities and (with ``explain``) attribution maps, all from the defense of the model the body
    names (the default, the first served, when it names none)."""
    if all(m.state != "ready" for m in runtime.models.values()):
        runtime.default.ready_batcher()  # 503 while nothing is ready, before the body is read
    await before_body(runtime, caller)
    body = await run_in_threadpool(_parse, await request.body())
    model = runtime.model(body.model, field="model")
    model.ready_batcher()  # 503 while the model is not ready, before the instances are looked at
    limit = runtime.settings.max_instances
    if len(body.instances) > limit:
        raise ApiError(
            413,
            "too_many_instances",
            f"at most {limit} instances per request, got {len(body.instances)}",
            field="instances",
        )
    await run_in_threadpool(_within_budget, model, caller, len(body.instances))  # before any image is decoded
    x = await run_in_threadpool(
        partial(instances_to_tensor, invert=body.invert), body.instances, model.input_shape, model.image_limits
    )
    method, classes = model.interpreter_name, model.meta.classes
    return await answer_instances(
        model,
        caller,
        x,
        explain=body.explain,
        request=request,
        respond=lambda answers: PredictResponse(
            model=model.model_name,
            model_version=model.model_version,
            defense=model.defense_name,
            predictions=[_prediction(a, method, classes, body.explain) for a in answers],
        ),
    )


def _parse(body: bytes) -> PredictRequest:
    """The request body, validated off the event loop; the errors FastAPI would give for a declared body."""
    if not body:
        raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}])
    try:
        data = json.loads(body)
    except json.JSONDecodeError as err:
        raise RequestValidationError(
            [{"type": "json_invalid", "loc": ("body",), "msg": "JSON decode error", "ctx": {"error": err.msg}}]
        ) from None
    except (ValueError, RecursionError):  # not UTF-8, or nested deeper than the parser goes
        raise HTTPException(400, "There was an error parsing the body") from None
    try:
        return PredictRequest.model_validate(data)
    except ValidationError as err:
        raise body_validation_error(err) from None


async def before_body(runtime: Runtime, caller: Caller, model: ModelRuntime | None = None) -> None:
    """What refuses a request before its body is read: an escalated key (403) and a spent budget (429, fewer than
    one query left); a body costs the server nothing before these. ``model``: the model the request's path names;
    None for ``/predict``, whose body names it: then only a key escalated with ``monitor_action refuse`` (counted
    under the default model) and a key with no query left on any model are refused here, the rest once the body
    has named the model."""
    if runtime.monitor is not None and (model is not None or runtime.settings.monitor_action == "refuse"):
        await run_in_threadpool(_escalated, model or runtime.default, caller, 1)
    if runtime.settings.query_budget is not None:
        await run_in_threadpool(_within_any_budget, [model] if model else list(runtime.models.values()), caller)


def _within_any_budget(models: list[ModelRuntime], caller: Caller) -> None:
    """429 when the caller has no query left on any of ``models`` (before the body is read, when the request's
    instances are not known yet)."""
    with state_reachable(models[0].settings.retry_after_s):
        left = max(m.ledger.remaining(caller.key_id) for m in models)  # type: ignore[union-attr]
    if left < 1:
        raise _budget_exhausted(left, None)


def _within_budget(runtime: ModelRuntime, caller: Caller, queries: int) -> None:
    """429 when the caller's budget of the model has fewer than ``queries`` left. Read only: :func:`_spend` spends."""
    if runtime.ledger is None:
        return
    with state_reachable(runtime.settings.retry_after_s):
        left = runtime.ledger.remaining(caller.key_id)
    if left < queries:
        raise _budget_exhausted(left, queries)


async def answer_instances(
    runtime: ModelRuntime,
    caller: Caller,
    x: Tensor,
    *,
    explain: bool,
    request: Request,
    respond: Callable[[list[Answer]], T],
) -> T:
    """``respond(answers)`` for the validated (B, C, H, W) batch ``x``, answered by the defense: the path
    every route that answers queries shares (``/predict``, the Open Inference Protocol's ``infer``).

    In order, after the route's ``before_body`` (an escalated key refused, a spent budget): the caller's budget
    (429), the monitor's screening of the queries (near-duplicates and distances: it may escalate the key now,
    before anything is answered; 403 ``key_flagged``, refunded, under ``refuse``), the micro-batcher (503 when full,
    overloaded or the key holds its share of the queue; an escalated key's queries are answered there by the
    misinformation path, in the same computation as any other), the answers (504 in time, 499 when the
    client goes away, 500 when the defense fails), the monitor again (a key escalated while the request was
    queued gets the escalated answer or 403), the monitor's record of the domain flags, then ``respond``.
    The request is charged once ``respond`` has returned; whatever else happens, the queries not paid for
    are refunded (docs/server.md, "What a request costs"). Where the monitor or the budget cannot be reached
    (their state in Redis), the request is answered 503 ``state_unavailable``: never an answer that was not
    metered. In cluster mode the spend is kept under the gateway's hold until the request ends
    (``server/budget.py``, "Holds")."""
    batcher = runtime.ready_batcher()
    hold = _hold(runtime, request)
    # The routes refused an escalated key under ``refuse`` before reading the body (``before_body``); nothing here
    # refuses before it costs anything; see "What a request costs" in docs/server.md.
    await run_in_threadpool(_spend, runtime, caller, len(x), hold)
    charged = 0  # of the len(x) queries spent, those the request pays for; the rest is refunded however it ends
    ticket: Ticket | None = None
    try:
        escalated = await run_in_threadpool(_screened, runtime, caller, x)  # True for a key escalated earlier too
        key = caller.key_id if runtime.keys.enabled else ""
        ticket = batcher.enqueue(x, explain=explain, misinform=escalated, key=key)
        runtime.metrics.key_queries.labels(caller.key_id).inc(len(x))
        try:
            answers = await _unless_disconnected(request, ticket.answers())
        except (RequestTimeout, ClientClosed):
            charged = ticket.give_up()  # what reached the model thread is paid for; the dropped rest is not
            raise
        if runtime.monitor is not None:
            answers = await _monitored(runtime, batcher, caller, x, answers, escalated, explain=explain)
        if runtime.watermark is not None:
            answers = await run_in_threadpool(_watermarked, runtime, caller, x, answers)
        response = respond(answers)
        charged = len(x)
        return response
    except QueueFull as full:
        raise ApiError(
            503, full.reason, "the server is busy; retry later", headers={"Retry-After": str(full.retry_after)}
        ) from None
    except RequestTimeout:
        raise ApiError(504, "timeout", f"not answered within {runtime.settings.request_timeout_s:g} s") from None
    except ClientClosed:
        raise ApiError(CLIENT_CLOSED, "client_closed_request", "the client closed the connection") from None
    except DefenseFailed:
        raise ApiError(
            500,
            "defense_failed",
            "the defense could not answer this query; nothing of it is sent and the request is not charged",
        ) from None
    finally:
        if ticket is not None:
            ticket.give_up()  # whatever went wrong, nothing of this request stays queued
        if charged < len(x):
            await _refund(runtime, caller, len(x) - charged, hold)
        if hold is not None:
            await _settle(runtime, hold)


class ClientClosed(Exception):
    """The client went away before its answer was ready."""


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """``work``'s result, or — when the client disconnects first — ``work`` cancelled and
    :class:`ClientClosed` (answered 499, which nobody reads but the metrics count)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise ClientClosed
    return task.result()


async def _disconnected(request: Request) -> None:
    """Return once the server reports that the client has gone (the body has already been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _refund(runtime: ModelRuntime, caller: Caller, queries: int, hold: str | None) -> None:
    """Give back queries that were spent but are not charged (see "What a request costs")."""
    if runtime.ledger is None:
        return
    try:
        await run_in_threadpool(runtime.ledger.refund, caller.key_id, queries, hold)
    except STATE_ERRORS as err:  # the state is lost: the queries stay spent (too much charged, never too little)
        logger.warning("could not refund %d queries (%s): they stay spent", queries, type(err).__name__)


async def _settle(runtime: ModelRuntime, hold: str) -> None:
    """End the request's hold: what it holds stays charged (an unreachable state lets it expire, the same)."""
    try:
        await run_in_threadpool(runtime.ledger.settle, hold)  # type: ignore[union-attr]
    except STATE_ERRORS as err:
        logger.warning("could not settle a hold (%s): it expires charged", type(err).__name__)


def _hold(runtime: ModelRuntime, request: Request) -> str | None:
    """The hold the cluster's gateway named for this request; None outside cluster mode, without a budget or
    without the Redis state (holds live there). Only the gateway reaches a replica's app, and it replaces
    any hold header a client sends."""
    if runtime.settings.replicas is None or runtime.ledger is None or runtime.settings.state is None:
        return None
    hold = request.headers.get(HOLD_HEADER)
    return hold if hold is not None and is_hold(hold) else None


def _escalated(runtime: ModelRuntime, caller: Caller, queries: int) -> bool:
    """Whether the extraction monitor has escalated the caller's key (403 when escalated keys are refused)."""
    if runtime.monitor is None:
        return False
    with state_reachable(runtime.settings.retry_after_s):
        escalated = runtime.monitor.escalated(caller.key_id)
    return escalated and _act(runtime, queries)


def _screened(runtime: ModelRuntime, caller: Caller, x: Tensor) -> bool:
    """The extraction monitor screens the request's queries before they are answered (an escalated key's
    too: its queries go into the near-duplicate index, where another key that reuses them is found); True
    when the key is escalated now (403 ``key_flagged`` instead when escalated keys are refused)."""
    if runtime.monitor is None:
        return False
    if not runtime.gated:  # the monitor watches the gated models' queries; here it only refuses an escalated key
        return _escalated(runtime, caller, len(x))
    with state_reachable(runtime.settings.retry_after_s):
        escalated = runtime.monitor.screen(caller.key_id, x)
        runtime.metrics.flagged_keys.set(runtime.monitor.count_flagged())
    return escalated and _act(runtime, len(x))


def _act(runtime: ModelRuntime, queries: int) -> bool:
    """An escalated key's request: counted, and refused (403: under ``monitor_action refuse``, or by a model
    without the gate, which has no misinformation to give) or answered by the misinformation path (True)."""
    if runtime.settings.monitor_action == "refuse" or not runtime.gated:
        runtime.metrics.escalated.labels("refuse").inc(queries)
        raise ApiError(403, "key_flagged", "this API key is suspended; contact the operator", field="Authorization")
    return True


async def _monitored(
    runtime: ModelRuntime,
    batcher: MicroBatcher,
    caller: Caller,
    x: Tensor,
    answers: list[Answer],
    escalated: bool,
    *,
    explain: bool,
) -> list[Answer]:
    """The answers an escalated key gets, and the monitor's record of the others' domain flags. A key escalated
    while the request was queued (by another of its requests) gets the escalated answer too — recomputed by
    the misinformation path — or 403 under ``refuse``, uncharged."""
    if not escalated and await run_in_threadpool(_escalated, runtime, caller, len(x)):
        gate = runtime.defense
        assert isinstance(gate, MisinformationGate)  # the settings require the gate for the monitor
        everything = torch.ones(len(x), dtype=torch.bool)
        answers = await batcher.on_model_thread(
            lambda: gate.answer(x.to(batcher.device), explain=explain, misinform=everything)
        )
        escalated = True
    if escalated:
        runtime.metrics.escalated.labels("misinform").inc(len(answers))
        return answers
    if not runtime.gated:  # no domain flags to record
        return answers
    flags = [a.misinformed for a in answers]  # the gate's domain flags (settings require the gate)
    with state_reachable(runtime.settings.retry_after_s):  # unobserved answers are not sent
        await run_in_threadpool(runtime.monitor.observe, caller.key_id, flags)  # type: ignore[union-attr]
        runtime.metrics.flagged_keys.set(await run_in_threadpool(runtime.monitor.count_flagged))  # type: ignore[union-attr]
    return answers


def _watermarked(runtime: ModelRuntime, caller: Caller, x: Tensor, answers: list[Answer]) -> list[Answer]:
    """``answers`` with the watermark's (``server/watermark.py``), kept in the store before any is sent (503
    ``state_unavailable`` when the store cannot be reached: a watermark not kept proves nothing)."""
    assert runtime.watermark is not None
    with state_reachable(runtime.settings.retry_after_s):
        return runtime.watermark.apply(caller.key_id, x, answers)


def _spend(runtime: ModelRuntime, caller: Caller, queries: int, hold: str | None) -> None:
    """Spend the caller's queries from its budget (429, nothing spent, when it does not cover them; 503
    ``state_unavailable`` when the budget cannot be reached)."""
    if runtime.ledger is None:
        return
    with state_reachable(runtime.settings.retry_after_s):
        spent = runtime.ledger.spend(caller.key_id, queries, hold) is not None
        left = 0 if spent else runtime.ledger.remaining(caller.key_id)
    if not spent:
        raise _budget_exhausted(left, queries)


def _budget_exhausted(left: int, queries: int | None) -> ApiError:
    asked = "" if queries is None else f", {queries} asked"
    return ApiError(
        429, "budget_exhausted", f"the query budget of this key is spent ({left} left{asked})", field="Authorization"
    )


def _prediction(answer: Answer, method: str, classes: list[str], explain: bool) -> Prediction:
    attribution = None
    if explain and answer.attribution is not None:
        h, w = answer.attribution.shape
        flat = rounded(answer.attribution)
        rows = [flat[i * w : (i + 1) * w] for i in range(h)]
        attribution = Attribution(method=method, shape=[h, w], values=rows)
    label = int(answer.label)
    return Prediction(
        label=label,
        class_name=classes[label],
        probabilities=rounded(answer.probabilities),
        attribution=attribution,
    )
