"""Where the per-key state lives: the budgets (``server/budget.py``) and the extraction monitor's
windows (``server/monitor.py``).

Unset ``state`` (``DD_STATE``, ``--state``): the SQLite file ``budget_db``, for one server process
(or several sharing the file on one host). ``redis://host:port/db`` (or ``rediss://``): a Redis
server that every replica shares. The client waits at most :data:`SOCKET_TIMEOUT_S` for Redis and
retries a command once on a fresh connection (after a Redis restart); Redis unreachable at start-up
stops the server (:class:`StateUnreachable`), Redis lost while serving answers 503
``state_unavailable`` (:func:`state_reachable`) until it is back. Messages name the Redis address,
never a password of the URL.
"""

from __future__ import annotations

import logging
import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .errors import StateUnavailable

logger = logging.getLogger("deepdefense.server")

#: The URL schemes of a Redis state: plain TCP, and TLS.
SCHEMES = ("redis", "rediss")
#: Longest wait for Redis (connecting, and each reply): a lost Redis costs a request this, not a hang.
SOCKET_TIMEOUT_S = 1.0
#: What "Redis cannot be reached" raises in redis-py (``BusyLoadingError``, ``AuthenticationError`` included).
STATE_ERRORS: tuple[type[Exception], ...] = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
#: The start of every Redis key this server writes: ``dd:budget:<key id>``, ``dd:monitor:<key id>``.
PREFIX = "dd:"
#: A key id (``server.auth.key_id``): the only name of an API key that reaches Redis.
_KEY_ID = re.compile(r"[0-9a-f]{12}")


class StateUnreachable(ValueError):
    """Redis could not be reached at start-up; the message names its address, never its password."""


def redis_address(url: str) -> str:
    """``host:port/db`` of a ``redis://`` or ``rediss://`` URL, without its user and password.

    Raises ValueError for any other URL, with a message that never repeats the URL (it may hold a password)."""
    try:
        parts = urlsplit(url)
        scheme, host, port, db = parts.scheme, parts.hostname, parts.port, parts.path.strip("/") or "0"
    except ValueError:  # a malformed host or port; urllib's message may quote it
        raise ValueError("the state URL is malformed: expected redis://[:password@]host:port/db") from None
    if scheme not in SCHEMES:
        raise ValueError("the state must be a redis:// or rediss:// URL (redis://[:password@]host:port/db)")
    if not host:
        raise ValueError("the state URL names no host: expected redis://[:password@]host:port/db")
    if not db.isdigit():
        raise ValueError("the database of the state URL (its path) must be a number: redis://host:port/0")
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{port or 6379}/{db}"


def is_key_id(key_id: str) -> bool:
    return _KEY_ID.fullmatch(key_id) is not None


def redis_key(prefix: str, kind: str, key_id: str) -> str:
    """``<prefix><kind>:<key id>``; ValueError for anything but a 12-hex key id, so a raw API key never
    becomes a Redis key."""
    if not is_key_id(key_id):
        raise ValueError("per-key state in Redis is kept under 12-hex key ids only (server.auth.key_id)")
    return f"{prefix}{kind}:{key_id}"


def connect_redis(url: str) -> redis.Redis:
    """A client of the Redis at ``url``, once it answers PING; :class:`StateUnreachable` otherwise."""
    address = redis_address(url)
    client = redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=SOCKET_TIMEOUT_S,
        retry=Retry(NoBackoff(), 1),  # one retry on a fresh connection: the pooled one died with a restart
        client_name="deepdefense",
    )
    try:
        client.ping()
    except redis.exceptions.RedisError as err:
        client.close()
        raise StateUnreachable(
            f"cannot reach the Redis state at {address} (DD_STATE / --state): {type(err).__name__}: "
            f"{_without_secrets(str(err), url)}"
        ) from None
    return client


@contextmanager
def state_reachable(retry_after: int) -> Iterator[None]:
    """Inside a request: Redis lost (a connection error or timeout) becomes 503 ``state_unavailable`` with
    ``Retry-After``, so that nothing is answered that could not be metered."""
    try:
        yield
    except STATE_ERRORS as err:
        logger.warning("the Redis state is unreachable (%s): answering 503 state_unavailable", type(err).__name__)
        raise StateUnavailable(retry_after) from None


def _without_secrets(message: str, url: str) -> str:
    password = urlsplit(url).password
    return message.replace(password, "***") if password else message


def connect_sqlite(path: Path, schema: str) -> sqlite3.Connection:
    """The SQLite state file at ``path`` (made with its folder when missing) in WAL mode with ``schema`` applied:
    autocommit, shared by threads (callers hold their own lock) and by processes on one host."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(schema)
    return db
