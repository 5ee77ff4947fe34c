"""A real ``redis-server`` of the test's own, on a free loopback port, with nothing saved to disk; it can be
killed and started again on the same port (Redis lost and back). No fake: the Redis tests need the binary
(``apt-get install redis-server``; ``.ci/run`` installs it) and fail, not skip, without it.

``spend_in_process`` is the body of a spawned process that spends from a ledger of its own."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path

import redis

#: Longest wait for a started redis-server to answer PING.
START_TIMEOUT_S = 10.0


def free_port() -> int:
    """A loopback TCP port nothing listens on (at the moment of asking)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """One ``redis-server`` process in ``folder``, on ``port``; :meth:`start` and :meth:`stop` as often as needed."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            raise AssertionError(
                "redis-server is not installed, and the Redis tests need a real one: "
                "apt-get install redis-server (.ci/run installs it when missing)"
            )
        self.executable, self.folder, self.port = executable, folder, port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log = folder / "redis-server.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True, socket_timeout=2)

    def start(self) -> None:
        """Start the server and return once it answers PING (fail the test after :data:`START_TIMEOUT_S`)."""
        assert self.process is None, "already running"
        command = [self.executable, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly"]
        command += ["no", "--dir", str(self.folder)]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=self.folder)
        deadline = time.monotonic() + START_TIMEOUT_S
        with self.client() as probe:
            while True:
                if self.process.poll() is not None:
                    self.process = None
                    raise AssertionError(f"redis-server exited at start:\n{self.log.read_text()[-2000:]}")
                try:
                    if probe.ping():
                        return
                except redis.exceptions.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError(f"redis-server did not answer PING within {START_TIMEOUT_S:g} s")
                time.sleep(0.02)

    def stop(self) -> None:
        """Kill the server (SIGKILL: Redis lost, not shut down) and wait until it is gone."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None


def spend_in_process(url: str, key_id: str, budget: int, spends: int, start: Barrier, results: Queue) -> None:
    """In a process of its own: ``spends`` spends of one query from a new ledger, once every process is
    ready (``start``); puts how many were granted."""
    from deepdefense.server.budget import RedisLedger
    from deepdefense.server.state import connect_redis

    ledger = RedisLedger(connect_redis(url), budget, "lenet-mnist")
    try:
        start.wait(timeout=60)
        results.put(sum(ledger.spend(key_id, 1) is not None for _ in range(spends)))
    finally:
        ledger.close()


def pin_redis_secrets(server: RedisServer) -> None:
    """Put the fixed secrets of ``support.settings.PINNED_SECRETS`` in ``server``'s Redis, where replicas read them."""
    from deepdefense.server.keystore import secret_key
    from support.settings import PINNED_SECRETS

    with server.client() as raw:
        for name, value in PINNED_SECRETS.items():
            raw.set(secret_key(name), value)


def redis_key_id(server: RedisServer, key: str) -> str:
    """``key``'s id under the key-id secret in ``server``'s Redis (made now if no app made it yet), as apps give it."""
    from deepdefense.server.auth import key_id
    from deepdefense.server.keystore import KEY_ID, redis_secret

    with server.client() as raw:
        return key_id(key, redis_secret(raw, KEY_ID))
