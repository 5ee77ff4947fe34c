"""Cluster mode: the same FastAPI app as N Ray Serve replicas behind Serve's HTTP proxy
(``deepdefense serve --replicas N``, or Ray's own ``serve run docker/serve-config.yaml``; docs/scaling.md).

Ray is imported lazily, inside the functions here, so that the one-process server (``--replicas`` unset)
never needs it; ``pip install 'deepdefense[cluster]'`` installs it.

Serve's proxy sends every request to a gateway (``server/gateway.py``, the application's ingress, one per
replica, holding no model), which hands it whole to a replica of the app and answers 503 ``replica_lost``
(JSON, Retry-After, the request's budget hold released) when that replica dies with it: without the
gateway, Serve's proxy answers such requests with a plain-text 500 and their budget stays spent.

Each replica is a whole server: :func:`server.app.create_app` builds the app inside the replica (from the
settings, sent to it as a plain dict), the replica runs the app's lifespan (``Runtime.start``/``stop``)
when it starts and stops, and gets requests only once its model is ready. Every replica keeps
its own micro-batcher (``server/batcher.py``), not ``@serve.batch``: the batcher is where this server
does admission control by expected latency (503 ``overloaded`` / ``queue_full`` with ``Retry-After``
instead of a 504 after the timeout), refunds the budget of instances that never reached the model,
drops the queued instances of requests that gave up, and isolates a failing query so that only its
request fails (fail closed) while the rest of the micro-batch is answered. ``@serve.batch`` gathers
calls into a list and hands back results; it knows nothing of budgets, refunds, expected latency or
per-query isolation, so using it would mean writing all of that again around it. Nothing was measured
to compare the two.

What replicas share lives in Redis (``state``): the budgets and the extraction monitor's windows. With
more than one replica and a budget or the monitor, the settings refuse to start without it (the SQLite
``budget_db`` is a file on one machine). Everything else is per replica: its queue, its metrics registry
(``/metrics`` is answered by whichever replica Serve routes the scrape to; ``dd_server_info{replica}``
names it), its copy of the model.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from deepdefense.common.readiness import NotReady, wait_ready
from deepdefense.models.checkpoint import local_checkpoint

from .app import DRAIN_MARGIN_S, create_app
from .budget import RedisLedger
from .gateway import Forwarded, Gateway, Returned, call_app, gateway_app
from .runtime import StartupError
from .settings import ServerSettings, model_name
from .state import connect_redis

if TYPE_CHECKING:
    from fastapi import FastAPI

logger = logging.getLogger("deepdefense.server")

#: The Serve application's name (``serve status``, ``serve shutdown``) and its deployment's.
APP_NAME = "deepdefense"
DEPLOYMENT_NAME = "DeepDefense"
#: The gateway's deployment (``server/gateway.py``), Serve's ingress of the application.
GATEWAY_NAME = "Gateway"
#: Longest wait for the proxy to answer ``/readyz`` with 200 once Serve reports the replicas running.
HTTP_READY_TIMEOUT_S = 120.0
#: Serve's own access log (proxy and replicas) writes raw paths; the app's access log (``deepdefense.access``)
#: writes route templates only, as in the one-process server.
NO_SERVE_ACCESS_LOG = {"enable_access_log": False}
#: What to install when Ray is missing.
INSTALL_HINT = "cluster mode (--replicas) needs Ray Serve: pip install 'deepdefense[cluster]' (ray[serve])"


def _ray() -> tuple[Any, Any]:
    """``ray`` and ``ray.serve``, imported now; :class:`StartupError` naming the extra when they are missing."""
    try:
        import ray
        from ray import serve
    except ImportError as err:
        raise StartupError(f"{INSTALL_HINT} ({err})") from None
    return ray, serve


def settings_payload(settings: ServerSettings) -> dict[str, Any]:
    """The settings as a plain, JSON-compatible dict for the replicas, which may run on other hosts with
    another environment: every field explicit (so no ``DD_*`` variable of a replica's host changes it),
    the keys read here (key files folded into the key lists, secrets revealed: the dict travels inside
    Ray's serialised deployment, never through a log or a config file), paths made absolute."""
    data: dict[str, Any] = settings.model_dump()
    data["api_keys"] = ",".join(settings.keys()) or None
    data["admin_keys"] = ",".join(settings.admin_keys_list()) or None
    data["api_keys_file"] = data["admin_keys_file"] = None
    data["budget_db"] = str(Path(settings.budget_db).resolve())
    data["checkpoint"] = [_checkpoint_for_replicas(c) for c in settings.checkpoint]
    if settings.data_root is not None and Path(settings.data_root).is_dir():
        data["data_root"] = str(Path(settings.data_root).resolve())
    if settings.device.startswith("cuda"):
        data["device"] = "cuda"  # Ray gives the replica one GPU (num_gpus=1), which it sees as cuda:0
    for name, value in data.items():
        if isinstance(value, SecretStr):  # none are left; a new secret field would otherwise go as '**********'
            raise TypeError(f"settings_payload does not know how to send the secret setting {name!r}")
        if isinstance(value, Path):
            data[name] = str(value)
    return data


def _checkpoint_for_replicas(checkpoint: str) -> str:
    """A metadata JSON of this working directory as an absolute path; a shipped name stays a name."""
    local = local_checkpoint(checkpoint)
    return str(local.resolve()) if local is not None else checkpoint


def replica_id() -> str:
    """This Ray Serve replica's id (``dd_server_info{replica}``)."""
    _, serve = _ray()
    context = serve.get_replica_context()
    return str(getattr(context, "replica_tag", None) or context.replica_id.unique_id)


def replica_app(payload: dict[str, Any]) -> FastAPI:
    """The app of one replica, built inside it from :func:`settings_payload`'s dict. Its lifespan returns
    only once the model is ready (Serve routes to a replica once its start-up is done) and fails the
    replica when preparing fails (Serve then retries it, and ``serve.run`` reports the failure)."""
    settings = ServerSettings(**payload)
    # Ray configures the replica's logging; ours (start-up lines, the access log) at the configured level
    logging.getLogger("deepdefense").setLevel(settings.log_level.upper())
    return create_app(settings, replica=replica_id(), wait_until_ready=True)


def deployment(settings: ServerSettings) -> Any:
    """The Serve deployment of the app: ``settings.replicas`` replicas of :func:`replica_app`, each running the
    app's lifespan, reached through the gateway (:func:`gateway_deployment`) by ``forward``.

    ``max_ongoing_requests`` (``settings.max_ongoing_requests``, default 8) is how many requests Serve's
    router lets one replica hold at a time; the others wait in the router until a replica has room, and
    go to the less busy of two replicas it samples. The value is set for two things: enough requests per
    replica for its micro-batcher to form batches, and few enough that Serve keeps spreading requests over
    the replicas instead of stacking a deep queue behind one; 8 requests of at most ``max_instances``
    instances also stay within one replica's ``queue_size``, so its admission control (503 with
    Retry-After) still applies to what it holds. A reasoned default, not measured under Serve; the
    figures it rests on are in docs/scaling.md, "``max_ongoing_requests``: 8".

    ``max_queued_requests`` (``settings.max_queued_requests``): how many requests may wait in each gateway's
    router for a replica; beyond it the gateway answers 503 ``overloaded`` with Retry-After at once.

    ``ray_actor_options``: ``replica_cpus`` CPUs per replica, one GPU when the device is ``cuda``.
    ``graceful_shutdown_timeout_s`` matches the one-process server's drain (request timeout + 5 s); Serve's
    access log is off (:data:`NO_SERVE_ACCESS_LOG`).
    """
    _, serve = _ray()
    payload = settings_payload(settings)

    class DeepDefenseReplica:
        """One replica: the FastAPI app of ``server.app.create_app``, its lifespan run here (start-up returns
        once the model is ready), reached by the gateway through :meth:`forward`. (Serve allows one
        ``@serve.ingress`` per application: the gateway's.)"""

        async def __init__(self) -> None:
            self.app = replica_app(payload)
            self._lifespan = self.app.router.lifespan_context(self.app)
            await self._lifespan.__aenter__()

        async def forward(self, request: Forwarded) -> Returned:
            """A request from the gateway, through this replica's app."""
            return await call_app(self.app, request)

        def check_health(self) -> None:
            """Serve's periodic health check: a replica whose models are not all ready is replaced."""
            runtime = self.app.state.runtime
            if runtime.phase != "ready":
                raise RuntimeError(f"the models of this replica are {runtime.phase}: {runtime.failure}")

        async def __del__(self) -> None:
            """Serve stops the replica: the app's shutdown (its runtime drains and stops)."""
            await self._lifespan.__aexit__(None, None, None)

    return serve.deployment(
        DeepDefenseReplica,
        name=DEPLOYMENT_NAME,
        num_replicas=settings.replicas or 1,
        max_ongoing_requests=settings.max_ongoing_requests,
        max_queued_requests=settings.max_queued_requests,
        ray_actor_options={
            "num_cpus": settings.replica_cpus,
            "num_gpus": 1 if settings.device.startswith("cuda") else 0,
        },
        graceful_shutdown_timeout_s=settings.request_timeout_s + DRAIN_MARGIN_S,
        logging_config=NO_SERVE_ACCESS_LOG,
    )


def gateway_deployment(settings: ServerSettings) -> Any:
    """The gateway (``server/gateway.py``): Serve's ingress, one per replica of the app, holding no model.
    It awaits its requests and costs almost no CPU, so it reserves none, and it may hold what every replica
    holds plus its router's queue: more than that, and Serve's router refuses (503 ``overloaded`` as JSON)
    before Serve's proxy would queue requests for the gateway itself."""
    _, serve = _ray()
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError

    payload = settings_payload(settings)

    def build_gateway() -> Any:  # called inside each gateway replica when it starts
        gateway_settings = ServerSettings(**payload)
        logging.getLogger("deepdefense").setLevel(gateway_settings.log_level.upper())
        app = serve.get_deployment_handle(DEPLOYMENT_NAME)  # of this application

        async def replica(request: Forwarded) -> Returned:
            return await app.forward.remote(request)

        ledger = None
        if gateway_settings.state is not None and gateway_settings.query_budget is not None:
            # it only releases holds, which name the budget they spent from: any model's ledger does
            default = model_name(gateway_settings.checkpoint[0])
            ledger = RedisLedger(connect_redis(gateway_settings.state), gateway_settings.query_budget, default)
        gateway = Gateway(
            replica,
            lost=(RayActorError,),
            overloaded=(BackPressureError,),
            ledger=ledger,
            retry_after_s=gateway_settings.retry_after_s,
        )
        return gateway_app(
            gateway, max_body_bytes=gateway_settings.body_limit(), body_timeout_s=gateway_settings.body_timeout_s
        )

    @serve.ingress(build_gateway)
    class DeepDefenseGateway:
        """Serve's ingress of the application: hands each request to a replica (``server/gateway.py``)."""

        def __init__(self, app: Any) -> None:
            """``app``: the bound replicas (Serve deploys them with the gateway; the gateway finds them by name)."""

    return serve.deployment(
        DeepDefenseGateway,
        name=GATEWAY_NAME,
        num_replicas=settings.replicas or 1,
        max_ongoing_requests=(settings.replicas or 1) * settings.max_ongoing_requests + settings.max_queued_requests,
        ray_actor_options={"num_cpus": 0},
        graceful_shutdown_timeout_s=settings.request_timeout_s + DRAIN_MARGIN_S,
        logging_config=NO_SERVE_ACCESS_LOG,
    )


def application(settings: ServerSettings) -> Any:
    """The Serve application: the gateway as its ingress, bound to the app's replicas."""
    return gateway_deployment(settings).bind(deployment(settings).bind())


def app_builder(args: dict[str, Any]) -> Any:
    """The Serve application for Ray's own ``serve run`` / ``serve deploy`` (``docker/serve-config.yaml``,
    ``import_path: deepdefense.server.cluster:app_builder``): ``args`` are settings by name (``replicas``, ``state``,
    ``checkpoint``, ``defense``, …), over the ``DD_*`` environment of the process that builds the
    application (API keys from ``DD_API_KEYS`` / ``DD_API_KEYS_FILE`` there); ``replicas`` defaults to 1.
    The config file's ``http_options`` choose the address; ``host``/``port`` here are not used, except that
    ``host`` defaults to ``0.0.0.0``: the builder cannot see the proxy's address, so without API keys it
    refuses to build unless ``allow_open`` is set (or ``host`` names the loopback address the proxy uses)."""
    settings = ServerSettings(**{"replicas": 1, "host": "0.0.0.0", **args})
    return application(settings)


def start_replicas(settings: ServerSettings) -> str:
    """Connect to Ray (``settings.ray_address``, or a local instance unless Ray is already initialised in
    this process), start Serve's proxy on ``settings.host``/``port``, deploy the replicas and return the
    base URL once every replica is ready and the proxy answers ``/readyz``. :class:`StartupError` when
    the replicas could not start (the reason is in Serve's replica logs)."""
    ray, serve = _ray()
    if not ray.is_initialized():
        ray.init(address=settings.ray_address)
    serve.start(
        http_options={"host": settings.host, "port": settings.port, "keep_alive_timeout_s": settings.keep_alive_s},
        logging_config=NO_SERVE_ACCESS_LOG,
    )
    try:
        serve.run(application(settings), name=APP_NAME, route_prefix="/")
    except Exception as err:  # Serve's RuntimeError/RayServeException after the replicas failed to start
        raise StartupError(
            f"the Serve replicas of {', '.join(settings.checkpoint)} did not start: {err} (why: the replica logs, "
            "logs/serve/replica_*.log in the Ray session folder, /tmp/ray/session_latest by default)"
        ) from None
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    url = f"http://{host}:{settings.port}"
    try:
        wait_ready(url, HTTP_READY_TIMEOUT_S, what="Serve's proxy")
    except NotReady as err:
        raise StartupError(str(err)) from None
    return url


def stop_replicas() -> None:
    """Delete the application (its replicas drain their requests first), then shut Serve down unless
    other applications still run on the cluster."""
    _, serve = _ray()
    serve.delete(APP_NAME)
    if not serve.status().applications:
        serve.shutdown()


def serve_replicas(settings: ServerSettings) -> None:
    """``deepdefense serve --replicas N``: start the replicas, block until SIGINT/SIGTERM, then shut Serve
    down (and the local Ray instance, when this process started it)."""
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # the /readyz polls
    ray, _ = _ray()
    stop = threading.Event()
    try:
        url = start_replicas(settings)
        # after ray.init, which installs a SIGTERM handler of its own in the driver
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        where = f"the Ray cluster at {settings.ray_address}" if settings.ray_address else "a local Ray instance"
        logger.info(
            "ready: %d replica(s) of %s through %s on %s, at %s",
            settings.replicas or 1,
            ", ".join(settings.checkpoint),
            settings.defense,
            where,
            url,
        )
        while not stop.wait(1.0):
            pass
        logger.info("stopping: the replicas finish their requests (at most %g s)", settings.request_timeout_s)
    finally:
        try:
            if ray.is_initialized():
                stop_replicas()
        except Exception:  # Serve never started, or its controller is gone: nothing left to stop
            logger.exception("stopping Serve failed")
        finally:
            ray.shutdown()
