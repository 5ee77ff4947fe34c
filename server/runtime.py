"""Everything one app serves with, and its start-up: verify the checkpoint (at once: a corrupt or
mismatched one is refused before the server listens), build the defense (layer sensitivity
included) in the background, send a warm-up query whose answers must pass the same checks as every
answer, then report ready."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
from collections.abc import Callable
from typing import Literal

import redis
import torch

from deepdefense.common.device import resolve_device
from deepdefense.defense import Defense
from deepdefense.defense.gate import MisinformationGate
from deepdefense.defense.loader import load_defense, load_gate
from deepdefense.models.checkpoint import load_checkpoint, read_meta, resolve_checkpoint

from .auth import KeyRing
from .batcher import MicroBatcher
from .budget import Ledger, QueryLedger, RedisLedger
from .card import dataset_look
from .errors import ModelNotFound, ModelNotReady
from .images import ImageLimits
from .isolation import answer_problem
from .keystore import EDM_HASH, KEY_ID, WATERMARK, SecretFileError, server_secret
from .metrics import MAIN, ServerMetrics
from .monitor import ExtractionMonitor, MonitorPolicy, RedisMonitorStore
from .settings import ServerSettings
from .state import STATE_ERRORS, StateUnreachable, connect_redis, redis_address, state_reachable
from .watermark import RedisWatermarkStore, SqliteWatermarkStore, Watermark
from .workers import resolve_kind, start_workers

logger = logging.getLogger("deepdefense.server")

#: Where a model (and the app) is in its life: preparing, serving, or stopped by a failure to prepare.
Phase = Literal["starting", "ready", "failed"]
#: What :func:`model_version` hashes before the weights' sha256.
VERSION_SALT = b"deepdefense model version\0"


class StartupError(ValueError):
    """The served model or its defense could not be prepared; the message says why."""


def build_defense(
    settings: ServerSettings, checkpoint: str, device: torch.device, edm_hash_key: str | None = None
) -> Defense:
    """The configured defense around ``checkpoint``'s frozen victim, with the layer sensitivity stored in the
    checkpoint (or computed on ``settings.data_root``): the project's one loading path. ``edm_hash_key``:
    EDM's hash key where the engine options name none (the server's persisted one, ``server/keystore.py``)."""
    if settings.defense == "none" and settings.engine:
        logger.warning("engine options are ignored by defense 'none'")
    options = dict(settings.engine) if settings.defense != "none" else {}
    if settings.defense == "edm" and edm_hash_key is not None:
        options.setdefault("hash_key", edm_hash_key)
    defense, _ = load_defense(
        checkpoint,
        settings.defense,
        settings.interpreter,
        device=device,
        data_root=settings.data_root,
        **options,
    )
    if settings.gated(checkpoint):
        defense = load_gate(defense, checkpoint, device=device)
    return defense


def model_version(weights_sha256: str) -> str:
    """12 hex digits of the sha256 of ``VERSION_SALT`` + the weights' sha256: it changes whenever the weights do,
    but is not the weights file's digest, which no answer carries (a file's sha256 can be looked up in public
    indexes of model files; tests/server/test_reliability_security.py). Whoever holds a candidate file can still
    compute its version and compare."""
    return hashlib.sha256(VERSION_SALT + weights_sha256.encode()).hexdigest()[:12]


def open_watermark(settings: ServerSettings, client: redis.Redis | None, classes: int) -> Watermark:
    """The watermark of ``settings``: its secret and records in the Redis ``client`` when there is one, else beside
    and in ``budget_db`` (``deepdefense ownership verify`` opens it the same way)."""
    store = (
        RedisWatermarkStore(client, settings.watermark_records)
        if client is not None
        else SqliteWatermarkStore(settings.budget_db, settings.watermark_records)
    )
    secret = server_secret(WATERMARK, client, settings.budget_db)
    return Watermark(store, secret, classes, settings.watermark_fraction, settings.watermark_escalated_fraction)


class Runtime:
    """Everything one app serves with: the models (:class:`ModelRuntime`, by name, the first the default), and
    what they share: the settings, the API and operator keys, the extraction monitor, the Redis state and the
    metrics."""

    def __init__(self, settings: ServerSettings, defense: Defense | None = None, *, replica: str = MAIN) -> None:
        """``defense``: the first model's, ready built (tests, benchmarks); the others' are built from the settings."""
        self.settings = settings
        self.metrics = ServerMetrics(replica=replica)
        self.monitor: ExtractionMonitor | None = None
        self.watermark: Watermark | None = None  # the default model's answers' (``server/watermark.py``)
        self._redis: redis.Redis | None = None  # the Redis state's client, when there is one
        self.on_failure: Callable[[], None] | None = None  # `serve` stops the server when preparing fails
        try:
            self._open_state(settings)
            self.models: dict[str, ModelRuntime] = {}
            for i, checkpoint in enumerate(settings.checkpoint):
                model = ModelRuntime(self, checkpoint, defense if i == 0 else None)
                self.models[model.model_name] = model
            self.default = next(iter(self.models.values()))
            if settings.watermarking():  # records are kept per key, so they are one model's: the default's
                self.watermark = open_watermark(settings, self._redis, len(self.default.meta.classes))
                self.default.watermark = self.watermark
        except StateUnreachable as err:  # the server does not start answering without its state
            raise StartupError(str(err)) from None
        except STATE_ERRORS as err:  # reached, then lost before start-up was done
            raise StartupError(
                f"lost the Redis state at {redis_address(settings.state or '')} while starting: {type(err).__name__}"
            ) from None
        except SecretFileError as err:
            raise StartupError(str(err)) from None

    def _open_state(self, settings: ServerSettings) -> None:
        """The monitor's state and the server's secrets (``server/keystore.py``): in the SQLite file ``budget_db``
        and files beside it, or in the Redis at ``state``; the models open their budgets there too."""
        keys = settings.keys()
        edm = settings.defense == "edm" and "hash_key" not in settings.engine
        kept = settings.query_budget is not None or settings.monitoring() or settings.watermarking()
        if settings.state and not (kept or keys or edm):
            logger.warning("state is set, but without keys, query_budget, the monitor or EDM nothing is kept there")
        client = connect_redis(settings.state) if settings.state and (kept or keys or edm) else None
        self._redis = client
        # key ids are HMACs under a kept secret; operator keys are only compared, under a secret of this process
        self.keys = KeyRing(keys, server_secret(KEY_ID, client, settings.budget_db) if keys else b"")
        self.admin_keys = KeyRing(settings.admin_keys_list(), secrets.token_bytes(32))
        self.edm_hash_key = server_secret(EDM_HASH, client, settings.budget_db).hex() if edm else None
        if settings.monitoring():
            policy = MonitorPolicy(
                settings.monitor_window,
                settings.monitor_min_queries,
                settings.monitor_threshold,
                trust_rate=settings.monitor_trust_rate,
            )
            self.monitor = ExtractionMonitor(RedisMonitorStore(client) if client else settings.budget_db, policy)
            self.metrics.flagged_keys.set(self.monitor.count_flagged())  # escalations survive a restart

    def open_ledger(self, model: str) -> Ledger | None:
        """``model``'s budgets (``server/budget.py``), where the monitor's state is; None without a budget."""
        budget = self.settings.query_budget
        if budget is None:
            return None
        if self._redis is not None:
            return RedisLedger(self._redis, budget, model)
        return QueryLedger(self.settings.budget_db, budget, model)

    @property
    def phase(self) -> Phase:
        """``failed`` when a model failed to prepare, ``ready`` when every model is, else ``starting``."""
        phases = {m.phase for m in self.models.values()}
        return "failed" if "failed" in phases else "ready" if phases == {"ready"} else "starting"

    @property
    def failure(self) -> str | None:
        """Why preparing failed, naming the models that failed (for the operator; never sent to clients)."""
        failed = [m for m in self.models.values() if m.failure]
        return "; ".join(f"{m.model_name} with defense {m.defense_name!r}: {m.failure}" for m in failed) or None

    def model_failed(self) -> None:
        if self.on_failure is not None:
            self.on_failure()

    async def start(self) -> None:
        """Begin preparing every model in the background; ``/healthz`` answers meanwhile, ``/readyz`` once done."""
        for model in self.models.values():
            await model.start()

    async def prepared(self) -> None:
        """Wait until every model's preparing is over (``phase`` is then ``ready`` or ``failed``); a Ray Serve
        replica waits for this before Serve sends it requests (``create_app(..., wait_until_ready=True)``)."""
        for model in self.models.values():
            await model.prepared()

    async def stop(self) -> None:
        for model in self.models.values():
            await model.stop()
        if self.monitor is not None:
            self.monitor.close()
        if self.watermark is not None:
            self.watermark.close()

    def model(self, name: str | None, field: str) -> ModelRuntime:
        """The served model named ``name`` (None: the default, the first); 404 ``model_not_found`` naming the
        served ones for any other name (``field``: where the request named it)."""
        if name is None:
            return self.default
        model = self.models.get(name)
        if model is None:
            raise ModelNotFound(list(self.models), field)
        return model

    def check_ready(self) -> None:
        """503 while a model is still starting (or failed to start)."""
        for model in self.models.values():
            model.ready_batcher()

    def check_state(self) -> None:
        """Readiness of the shared state: 503 ``state_unavailable`` while the Redis state cannot be reached
        (requests that spend or observe would get the same); nothing to check for SQLite or no state."""
        if self._redis is not None:
            with state_reachable(self.settings.retry_after_s):
                self._redis.ping()


class ModelRuntime:
    """One served model: its checkpoint, defense (with its gate), micro-batcher, budgets and series, and the
    server's keys, settings and monitor it answers with."""

    def __init__(self, server: Runtime, checkpoint: str, defense: Defense | None = None) -> None:
        settings = self.settings = server.settings
        self._server = server
        meta_path = resolve_checkpoint(checkpoint)
        self.checkpoint, self.model_name = checkpoint, meta_path.stem
        self.meta = read_meta(meta_path)
        if defense is None:  # sha256, architecture and shapes, before anything listens (CheckpointError)
            load_checkpoint(meta_path)
        self.input_shape: tuple[int, int, int] = tuple(self.meta.input_shape)  # type: ignore[assignment]
        self.look = dataset_look(self.meta)  # the model card's data (CheckpointError when malformed)
        self.defense = defense
        if defense is None:
            self.device = resolve_device(settings.device)
            self.defense_name, self.interpreter_name = settings.defense, settings.interpreter
        else:
            self.device = next(defense.model.parameters()).device
            self.defense_name, self.interpreter_name = defense.name, defense.interpreter.name
        self.image_limits = ImageLimits(max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels)
        self.metrics = server.metrics.model(
            self.model_name, defense=self.defense_name, interpreter=self.interpreter_name, device=str(self.device)
        )
        self.keys = server.keys
        self.gated = settings.gated(checkpoint)
        self.monitor = server.monitor  # a key is watched across models; an ungated model refuses escalated keys
        self.watermark: Watermark | None = None  # the default model's is set by the server (Runtime.__init__)
        self.edm_hash_key = server.edm_hash_key
        self.ledger = server.open_ledger(self.model_name)
        self.batcher: MicroBatcher | None = None
        self.phase: Phase = "starting"
        self.failure: str | None = None  # why preparing failed, for the operator (never sent to clients)
        self._preparing: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Begin preparing in the background."""
        if self.defense_name == "none":
            gated = " except for the misinformation gate" if self.gated else ""
            logger.warning("serving %s UNDEFENDED (defense 'none')%s, as asked", self.model_name, gated)
        self._preparing = asyncio.get_running_loop().create_task(self._prepare(), name=f"dd-prepare-{self.model_name}")

    async def prepared(self) -> None:
        if self._preparing is not None:
            await asyncio.shield(self._preparing)

    async def stop(self) -> None:
        if self._preparing is not None:
            self._preparing.cancel()
            await asyncio.gather(self._preparing, return_exceptions=True)
        if self.batcher is not None:
            await self.batcher.stop()
        if self.ledger is not None:
            self.ledger.close()

    async def _prepare(self) -> None:
        try:
            if self.defense is None:
                self.defense = await asyncio.to_thread(
                    build_defense, self.settings, self.checkpoint, self.device, self.edm_hash_key
                )
            s = self.settings
            kind = resolve_kind(s.model_worker_kind, self.defense, self.device)
            if kind == "process":  # each child loads its copy of the defense: seconds, off the event loop
                workers = await asyncio.to_thread(start_workers, self.defense, kind, s.model_workers)
            else:  # replicas of the defense, at once: a given defense is ready without a turn of the event loop
                workers = start_workers(self.defense, kind, s.model_workers)
            self.batcher = MicroBatcher(
                self.defense,
                self.metrics,
                device=self.device,
                num_classes=self.meta.num_classes,
                max_batch=s.max_batch_size,
                max_wait=s.max_batch_wait_ms / 1000,
                capacity=s.queue_size,
                timeout=s.request_timeout_s,
                max_latency=s.max_expected_latency_s,
                retry_after=s.retry_after_s,
                key_share=s.queue_share,
                workers=workers,
            )
            self.batcher.start()
            if s.warmup:
                await self._warm_up(self.batcher)
        except Exception as err:
            logger.exception("preparing %s with defense %r failed", self.model_name, self.defense_name)
            self.failure = f"{type(err).__name__}: {err}"
            self.phase = "failed"
            self._server.model_failed()
            return
        self.phase = "ready"
        gate = "on" if isinstance(self.defense, MisinformationGate) else "off"
        logger.info(
            "ready: %s through %s (%s) on %s, %d model workers (%s), misinformation gate %s",
            self.model_name,
            self.defense_name,
            self.interpreter_name,
            self.device,
            self.batcher.workers,
            {"process": "processes", "thread": "threads"}[self.batcher.worker_kind],
            gate,
        )

    async def _warm_up(self, batcher: MicroBatcher) -> None:
        probe = torch.rand((1, *self.input_shape), generator=torch.Generator().manual_seed(0))
        for answer in [a for answers in await batcher.warm_up(probe, explain=True) for a in answers]:
            problem = answer_problem(
                answer, explain=True, num_classes=self.meta.num_classes, map_shape=tuple(self.input_shape[1:])
            )
            if problem is not None:
                raise StartupError(f"the warm-up answer of defense {self.defense_name!r} is unusable: {problem}")

    @property
    def model_version(self) -> str:
        """The served weights' version, in every answer and in the model metadata: :func:`model_version` of
        their sha256 (checkpoint metadata, verified when the weights were loaded)."""
        return model_version(self.meta.sha256)

    def ready_batcher(self) -> MicroBatcher:
        """The batcher, or a 503 while the model is still starting (or failed to start)."""
        if self.phase != "ready" or self.batcher is None:
            why = "is still loading" if self.phase == "starting" else "failed to load"
            raise ModelNotReady(self.model_name, why, self.settings.retry_after_s)
        return self.batcher

    def ready_defense(self) -> Defense:
        self.ready_batcher()
        assert self.defense is not None  # set before the phase becomes ready
        return self.defense
