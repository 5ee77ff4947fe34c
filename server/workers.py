"""Model workers: where the micro-batches are computed, on threads of the server's process or in processes of their own.

A **thread worker** calls its own replica of the defense (``defense/replica.py``: the same tensors, its own modules)
on a thread of the server's process. A **process worker** holds its own copy of the defense in a child process and
answers over a pipe. The per-query engine is thousands of small tensor operations per micro-batch, each entered from
Python holding the GIL: two model threads of one process wait for each other and for the event loop, so much that a
micro-batch of 4 costs two threads nearly twice what it costs one alone (docs/performance.md, "Fourth round").
Processes do not share a GIL. A cheap defense would pay more for the pipe (the batch and its answers pickled each
way) than the GIL costs it, so ``auto`` takes processes for the engine on a CPU and threads for everything else.

A child gets the parent's defense pickled — the very object the server built, with every choice made at load time
(its convolutions, its warm start) — and one torch thread's share of the cores. It ignores SIGINT and SIGTERM (the
server drains its requests on those and closes the pipes after), and dies with the server (``PR_SET_PDEATHSIG`` on
Linux; everywhere, a closed pipe ends it). A child that dies mid-batch is replaced before its worker is used again,
and that batch's instances fail alone (500 ``defense_failed``), as a defense that raises does.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import pickle
import signal
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, Literal, TypeVar

import torch

from deepdefense.defense import Defense
from deepdefense.defense.engine import DeepDefense
from deepdefense.defense.gate import MisinformationGate
from deepdefense.defense.replica import replica

logger = logging.getLogger("deepdefense.server")
T = TypeVar("T")

WorkerKind = Literal["thread", "process"]
#: Seconds a new child may take to load its copy of the defense before the server gives up on it.
START_TIMEOUT_S = 120.0
#: Seconds a child is given to exit once its pipe is closed, before it is killed.
STOP_TIMEOUT_S = 5.0


class WorkerDied(RuntimeError):
    """A process worker's child ended (killed, out of memory, crashed) before it answered."""


class WorkerError(RuntimeError):
    """A function run in a process worker raised; the message names the exception (its traceback is in the log)."""


def resolve_kind(kind: Literal["auto", "thread", "process"], defense: Defense, device: torch.device) -> WorkerKind:
    """``auto``: processes for the per-query engine (bare or behind the misinformation gate) on a CPU, threads for
    everything else (a cheap defense, or a GPU, whose kernels run outside the GIL)."""
    if kind != "auto":
        return kind
    engine = defense.inner if isinstance(defense, MisinformationGate) else defense
    return "process" if isinstance(engine, DeepDefense) and device.type == "cpu" else "thread"


class ModelWorker(ABC):
    """One model worker: ``run(fn, *args)`` is ``fn(defense, *args)`` with this worker's defense. Blocking; the
    batcher calls it on a thread of its own executor, one call per worker at a time."""

    kind: WorkerKind

    @abstractmethod
    def run(self, fn: Callable[..., T], *args: Any) -> T: ...

    @abstractmethod
    def close(self) -> None:
        """Release what the worker holds (a process worker's child)."""


class ThreadWorker(ModelWorker):
    """The defense (or a replica of it) called on the calling thread."""

    kind: WorkerKind = "thread"

    def __init__(self, defense: Defense) -> None:
        self.defense = defense

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        return fn(self.defense, *args)

    def close(self) -> None:
        """Nothing to release: the defense is the server's."""


class ProcessWorker(ModelWorker):
    """A child process with its own copy of the defense; ``fn`` and ``args`` must pickle (a module-level function,
    tensors, plain values), and so must what ``fn`` returns."""

    kind: WorkerKind = "process"

    def __init__(self, defense: bytes, threads: int, name: str) -> None:
        self._defense, self._threads, self._name = defense, threads, name
        self._closed = False  # closed for good (the server stops): a child that ends now is not replaced
        self._busy = False  # a call is in the child now
        self._conn: Connection | None = None
        self._process: multiprocessing.process.BaseProcess | None = None
        self._start()

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise WorkerDied(f"model worker {self._name} is closed")
        if self._conn is None:  # the last replacement failed to start: try again
            self._start()
        assert self._conn is not None
        message = pickle.dumps((fn, args))  # by value (no shared memory, no descriptors); a call that does not pickle
        self._busy = True  # fails here, before the child sees it
        try:
            self._conn.send_bytes(message)
            reply = self._conn.recv_bytes()
        except (EOFError, OSError, TypeError) as err:  # the child is gone (TypeError: the pipe closed under the call)
            if self._closed:  # the server stopped while this call ran
                raise WorkerDied(f"model worker {self._name} was closed while it answered") from err
            code = self._process.exitcode if self._process is not None else None
            logger.error("model worker %s ended (exit code %s); starting another", self._name, code)
            self._replace()
            raise WorkerDied(f"model worker {self._name} ended (exit code {code})") from err
        finally:
            self._busy = False
        status, value = pickle.loads(reply)
        if status == "error":
            raise WorkerError(value)
        return value

    def close(self) -> None:
        self._closed = True
        self._release()

    def _release(self) -> None:
        """End the child and close the pipe: an idle child is let go (its recv ends and it exits), one in a call is
        killed (the call is abandoned: the server is stopping, or the child is gone already)."""
        conn, process = self._conn, self._process
        self._conn = self._process = None
        busy = self._busy
        if process is not None and busy:
            process.kill()
        if conn is not None and not busy:
            conn.close()
        if process is not None:
            process.join(STOP_TIMEOUT_S)
            if process.is_alive():
                process.kill()
                process.join(STOP_TIMEOUT_S)
        if conn is not None and busy:
            conn.close()

    def _start(self) -> None:
        ctx = _context()
        parent, child = ctx.Pipe()
        process = ctx.Process(target=_child, args=(child, self._defense, self._threads), name=self._name, daemon=True)
        process.start()
        child.close()
        self._conn, self._process = parent, process  # released below if it does not come up
        if not parent.poll(START_TIMEOUT_S):
            self._release()
            raise WorkerDied(f"model worker {self._name} did not start within {START_TIMEOUT_S:.0f} s")
        try:
            status, value = pickle.loads(parent.recv_bytes())
        except EOFError:
            self._release()
            raise WorkerDied(f"model worker {self._name} ended while loading the defense") from None
        if status != "ready":
            self._release()
            raise WorkerError(f"model worker {self._name} could not load the defense: {value}")

    def _replace(self) -> None:
        self._release()
        try:
            self._start()
        except Exception:  # the next call tries again; until then each call fails alone
            logger.exception("model worker %s could not be started again", self._name)


def start_workers(defense: Defense, kind: WorkerKind, count: int) -> list[ModelWorker]:
    """``count`` workers of ``kind`` for ``defense``: threads get the defense and replicas of it, processes a
    pickled copy each (started one after the other; each loads it in about a second)."""
    if kind == "thread":
        return [ThreadWorker(d) for d in [defense, *(replica(defense) for _ in range(count - 1))]]
    blob = pickle.dumps(defense)
    threads = torch.get_num_threads()  # `deepdefense serve` divides the cores among the workers before this
    workers: list[ModelWorker] = []
    try:
        for i in range(count):
            workers.append(ProcessWorker(blob, threads, name=f"dd-model-{i}"))
    except BaseException:
        for w in workers:
            w.close()
        raise
    return workers


def _context() -> multiprocessing.context.BaseContext:
    """A fork server where there is one: its children start from a clean process that has imported torch once (never
    a fork of the server's threads), in a fraction of the seconds a fresh interpreter takes to import torch."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


def _child(conn: Connection, defense: bytes, threads: int) -> None:
    """A child's life: load the defense, say ready, then answer ``(fn, args)`` until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server drains on these, then closes the pipe
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()
    torch.set_num_threads(threads)
    try:
        own: Defense = pickle.loads(defense)
    except Exception as err:
        conn.send_bytes(pickle.dumps(("error", f"{type(err).__name__}: {err}")))
        return
    conn.send_bytes(pickle.dumps(("ready", None)))
    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):
            return
        try:  # a call that does not unpickle, raises, or returns what does not pickle: the caller gets WorkerError
            fn, args = pickle.loads(message)
            reply = pickle.dumps(("ok", fn(own, *args)))
        except Exception as err:
            logger.exception("a call in a model worker raised")
            reply = pickle.dumps(("error", f"{type(err).__name__}: {err}"))
        try:
            conn.send_bytes(reply)
        except OSError:  # the server closed the pipe while this call ran: it is shutting down
            return


def _die_with_parent() -> None:
    """Linux: SIGKILL when the parent ends (the fork server, which ends with the server), so that a server killed
    without its shutdown leaves no children computing."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
