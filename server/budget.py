"""Per-key query budgets, kept outside the process so that a restart does not reset them: in SQLite
(:class:`QueryLedger`, the default) or in Redis (:class:`RedisLedger`, shared by replicas).

Both check and spend in one atomic step, so concurrent requests (threads, or server processes
sharing the file or the Redis) cannot overspend: SQLite with one conditional ``UPDATE`` inside an
immediate transaction, Redis with one Lua script (Redis runs a script alone, start to end).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Protocol

import redis

from .state import PREFIX, connect_sqlite, redis_key

_SCHEMA = "CREATE TABLE IF NOT EXISTS spent (key_id TEXT PRIMARY KEY, queries INTEGER NOT NULL)"


class Ledger(Protocol):
    """Queries spent per key id against one budget shared by every key."""

    budget: int

    def spend(self, key_id: str, queries: int) -> int | None:
        """Spend ``queries`` of ``key_id``'s budget and return what is left, or None (nothing spent)
        when the budget does not cover them."""
        ...

    def refund(self, key_id: str, queries: int) -> None:
        """Give back queries that were spent but are not charged; never below nothing spent."""
        ...

    def remaining(self, key_id: str) -> int: ...

    def close(self) -> None: ...


class QueryLedger:
    """Queries spent per key id against one budget shared by every key."""

    def __init__(self, path: Path, budget: int) -> None:
        self.budget = budget
        self._lock = threading.Lock()
        self._db = connect_sqlite(path, _SCHEMA)

    def spend(self, key_id: str, queries: int) -> int | None:
        """Spend ``queries`` of ``key_id``'s budget and return what is left, or None (nothing spent)
        when the budget does not cover them."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("INSERT OR IGNORE INTO spent (key_id, queries) VALUES (?, 0)", (key_id,))
                updated = self._db.execute(
                    "UPDATE spent SET queries = queries + ? WHERE key_id = ? AND queries + ? <= ?",
                    (queries, key_id, queries, self.budget),
                ).rowcount
                (spent,) = self._db.execute("SELECT queries FROM spent WHERE key_id = ?", (key_id,)).fetchone()
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return self.budget - spent if updated == 1 else None

    def refund(self, key_id: str, queries: int) -> None:
        """Give back queries that were spent but are not charged (docs/server.md, "What a request costs")."""
        with self._lock:
            self._db.execute("UPDATE spent SET queries = MAX(queries - ?, 0) WHERE key_id = ?", (queries, key_id))

    def remaining(self, key_id: str) -> int:
        with self._lock:
            row = self._db.execute("SELECT queries FROM spent WHERE key_id = ?", (key_id,)).fetchone()
        return self.budget - (row[0] if row else 0)

    def close(self) -> None:
        with self._lock:
            self._db.close()


#: KEYS[1] the key's spent queries, ARGV[1] the queries asked, ARGV[2] the budget: {1, left} when
#: spent, {0, left} (nothing spent) when the budget does not cover them. Atomic: Redis runs a script alone.
_SPEND = """
local spent = tonumber(redis.call('GET', KEYS[1]) or '0')
local queries, budget = tonumber(ARGV[1]), tonumber(ARGV[2])
if spent + queries > budget then
    return {0, budget - spent}
end
return {1, budget - redis.call('INCRBY', KEYS[1], queries)}
"""
#: KEYS[1] the key's spent queries, ARGV[1] the queries given back; never below 0, never creates the key.
_REFUND = """
local spent = redis.call('GET', KEYS[1])
if spent then
    redis.call('SET', KEYS[1], math.max(tonumber(spent) - tonumber(ARGV[1]), 0))
end
"""


class RedisLedger:
    """:class:`Ledger` in Redis: the queries spent by a key id under ``dd:budget:<key id>``."""

    def __init__(self, client: redis.Redis, budget: int, prefix: str = PREFIX) -> None:
        self.budget = budget
        self._client, self._prefix = client, prefix
        self._spend = client.register_script(_SPEND)  # EVALSHA, loaded again when Redis has forgotten it
        self._refund = client.register_script(_REFUND)

    def spend(self, key_id: str, queries: int) -> int | None:
        ok, left = self._spend(keys=[self._key(key_id)], args=[queries, self.budget])
        return int(left) if ok == 1 else None

    def refund(self, key_id: str, queries: int) -> None:
        self._refund(keys=[self._key(key_id)], args=[queries])

    def remaining(self, key_id: str) -> int:
        return self.budget - int(self._client.get(self._key(key_id)) or 0)

    def close(self) -> None:
        self._client.close()

    def _key(self, key_id: str) -> str:
        return redis_key(self._prefix, "budget", key_id)
