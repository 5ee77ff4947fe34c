"""Prometheus metrics of one app, in its own ``CollectorRegistry``, and the middleware that feeds
the per-route ones and writes the access log. API keys appear only as :func:`server.auth.key_id`
hashes; the access log names the route template, never the raw path, query string or headers, and
gives each request's id (``server/requestid.py``) and, for a refusal, its error code."""

from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deepdefense.defense import Answer

from .errors import ERROR_CODE
from .requestid import REQUEST_ID

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
FAILURE_REASONS = ("exception", "invalid_answer")
REJECT_REASONS = ("queue_full", "overloaded", "key_share")
#: The ``replica`` label of ``dd_server_info`` outside Ray Serve (one process, its own registry).
MAIN = "main"

access_log = logging.getLogger("deepdefense.access")


class ServerMetrics:
    """Every metric the server exports; names follow Prometheus conventions (units, ``_total``). The series of
    what a model does (its queue, batches, answers, failures, the gate's and the monitor's work on its queries)
    carry a ``model`` label; :meth:`model` gives one model's view of them. The HTTP series and the count of
    escalated keys (a key is escalated across every model, ``server/monitor.py``) are the server's.

    Two registries: ``registry`` holds the service's series, which anyone who may read ``/metrics`` gets;
    ``operator_registry`` holds what would tell a thief about the gate and the monitor (misinformed answers,
    escalated keys, per-key counts by key id), which only an operator key reads."""

    def __init__(self, *, replica: str = MAIN) -> None:
        self.registry = CollectorRegistry()
        self.operator_registry = CollectorRegistry()
        r, op = self.registry, self.operator_registry
        self.replica = replica
        self.info = Info(
            "dd_server",
            "What this server serves, one series per model; defense='none' means undefended; replica: the Ray "
            "Serve replica answering this scrape, 'main' for the one-process server.",
            ["model"],
            registry=r,
        )
        self.requests = Counter(
            "dd_http_requests_total",
            "HTTP requests by route template, method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "dd_http_request_duration_seconds",
            "End-to-end HTTP latency by route template.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("dd_http_requests_in_flight", "HTTP requests being handled now.", registry=r)
        self.queue_instances = Gauge(
            "dd_queue_instances", "Instances waiting for a micro-batch.", ["model"], registry=r
        )
        self.queue_wait = Histogram(
            "dd_queue_wait_seconds",
            "Time an instance waits before its micro-batch runs.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inference = Histogram(
            "dd_inference_seconds",
            "Wall time of one defense.answer call (a micro-batch).",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.optimisation = Histogram(
            "dd_defense_optimisation_seconds",
            "Per-query optimisation time reported by the defense.",
            ["model", "defense"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_instances = Histogram(
            "dd_batch_instances", "Instances per micro-batch.", ["model"], buckets=_BATCH_BUCKETS, registry=r
        )
        self.answers = Counter(
            "dd_answers_total", "Answered instances by model and defense.", ["model", "defense"], registry=r
        )
        self.fallbacks = Counter(
            "dd_defense_fallbacks_total",
            "Answers that fell back to the defense's documented safe answer.",
            ["model", "defense"],
            registry=r,
        )
        self.misinformed = Counter(
            "dd_misinformed_answers_total",
            "Answers the misinformation gate gave (queries its domain score flagged as out of domain).",
            ["model", "defense"],
            registry=op,
        )
        self.trusted_flags = Counter(
            "dd_trusted_flagged_answers_total",
            "Queries the domain score flagged that the defense answered, their key being in good standing with the "
            "extraction monitor (server/monitor.py, TRUST_RATE).",
            ["model", "defense"],
            registry=op,
        )
        self.flagged_keys = Gauge(
            "dd_flagged_keys",
            "API keys the extraction monitor has escalated (until an operator clears them).",
            registry=op,
        )
        self.escalated = Counter(
            "dd_escalated_instances_total",
            "Instances of escalated keys, by model and what they got: misinform (every answer from the "
            "misinformation model) or refuse (403 key_flagged).",
            ["model", "action"],
            registry=op,
        )
        self.key_queries = Counter(
            "dd_key_queries_total",
            "Queries (instances) admitted per model and API key hash.",
            ["model", "key"],
            registry=op,
        )
        self.failures = Counter(
            "dd_defense_failures_total",
            "Instances the defense could not answer (it raised, or its answer was not a finite, "
            "well-formed distribution); their requests got 500 defense_failed.",
            ["model", "defense", "reason"],
            registry=r,
        )
        self.isolation_retries = Counter(
            "dd_batch_isolation_retries_total",
            "Micro-batches whose defense call failed and were retried one instance at a time.",
            ["model"],
            registry=r,
        )
        self.dropped = Counter(
            "dd_dropped_instances_total",
            "Queued instances dropped uncomputed because their request gave up (timeout or client disconnect).",
            ["model"],
            registry=r,
        )
        self.rejected = Counter(
            "dd_rejected_requests_total",
            "Requests refused with 503 by admission control.",
            ["model", "reason"],
            registry=r,
        )
        self.instance_cost = Gauge(
            "dd_instance_cost_seconds",
            "Moving average of model-thread seconds per instance (admission control).",
            ["model"],
            registry=r,
        )

    def model(self, model: str, *, defense: str, interpreter: str, device: str) -> ModelMetrics:
        """The series of ``model`` (served through ``defense`` with ``interpreter`` on ``device``), every one of
        them exported from now on, at zero until something happens."""
        self.info.labels(model).info(
            {"defense": defense, "interpreter": interpreter, "device": device, "replica": self.replica}
        )
        return ModelMetrics(self, model, defense)


class _Labelled:
    """A metric family with its first label (the model) fixed: ``.labels(*rest)``."""

    def __init__(self, family: Counter, model: str) -> None:
        self._family, self._model = family, model

    def labels(self, *rest: str) -> Counter:
        return self._family.labels(self._model, *rest)


class ModelMetrics:
    """One model's series of :class:`ServerMetrics` (the ``model`` label fixed), as its micro-batcher and its
    requests record them; ``flagged_keys`` and the registries are the server's."""

    def __init__(self, metrics: ServerMetrics, model: str, defense: str) -> None:
        self.registry, self.operator_registry = metrics.registry, metrics.operator_registry
        self.flagged_keys = metrics.flagged_keys
        self.defense = defense
        for name in ("queue_instances", "queue_wait", "inference", "batch_instances", "isolation_retries", "dropped"):
            setattr(self, name, getattr(metrics, name).labels(model))
        self.instance_cost = metrics.instance_cost.labels(model)
        self.answers = metrics.answers.labels(model, defense)
        self.fallbacks = metrics.fallbacks.labels(model, defense)
        self.misinformed = metrics.misinformed.labels(model, defense)
        self.trusted_flags = metrics.trusted_flags.labels(model, defense)
        self.optimisation = metrics.optimisation.labels(model, defense)
        self.rejected = _Labelled(metrics.rejected, model)
        self.escalated = _Labelled(metrics.escalated, model)
        self.key_queries = _Labelled(metrics.key_queries, model)
        self.failures = _Labelled(metrics.failures, model)
        for reason in FAILURE_REASONS:
            self.failures.labels(defense, reason)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        for action in ("misinform", "refuse"):
            self.escalated.labels(action)

    def observe_failure(self, reason: str) -> None:
        self.failures.labels(self.defense, reason).inc()

    def observe_answer(self, answer: Answer) -> None:
        self.answers.inc()
        if answer.fallback:
            self.fallbacks.inc()
        if answer.misinformed:
            self.misinformed.inc()
        elif answer.flagged:
            self.trusted_flags.inc()
        seconds = answer.stats.get("optimisation_seconds")
        if seconds is not None:
            self.optimisation.observe(seconds)


class RequestMetricsMiddleware:
    """Counts requests, times them and logs them by route template (unknown paths share ``unmatched``)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        started = time.perf_counter()
        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_status)
        finally:
            self.metrics.in_flight.dec()
            route = getattr(scope.get("route"), "path", "unmatched")
            seconds = time.perf_counter() - started
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            self.metrics.latency.labels(route).observe(seconds)
            state = scope.get("state", {})
            code = state.get(ERROR_CODE)
            access_log.info(
                "%s %s %d %.1f ms id=%s%s",
                scope["method"],
                route,
                status,
                1000 * seconds,
                state.get(REQUEST_ID, "-"),
                f" error={code}" if code else "",
            )
