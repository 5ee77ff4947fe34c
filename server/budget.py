"""Per-key query budgets, kept outside the process so that a restart does not reset them: in SQLite
(:class:`QueryLedger`, the default) or in Redis (:class:`RedisLedger`, shared by replicas).

A key has a budget per model (each served model has its own ledger): what a key learns of one model does not
cost it queries of another. Budget files and Redis states written before budgets were per model kept one spend
per key; when a model's ledger opens, every key's old spend is copied into that model's budget, unless the
model already has one for the key (so it happens once per model and key): after the upgrade a key has spent on
every model at least what it had spent before (charged too much, never too little). The old spend stays where it
was, untouched.

Both check and spend in one atomic step, so concurrent requests (threads, or server processes
sharing the file or the Redis) cannot overspend: SQLite with one conditional ``UPDATE`` inside an
immediate transaction, Redis with one Lua script (Redis runs a script alone, start to end).

**Holds** (Redis only; cluster mode, docs/scaling.md "Faults"): a request that the cluster's gateway sent to
a replica carries a hold id (:data:`HOLD_HEADER`). The replica spends *and* records the spend under the hold
in one script, gives back through the hold what it refunds, and settles the hold (the rest is charged) when
the request ends. When the replica dies with the request, the gateway releases the hold: whatever it still
holds is refunded, once, so a killed replica neither loses a budget nor charges for answers never sent.
"""

from __future__ import annotations

import re
import threading
import uuid
from pathlib import Path
from typing import Protocol

import redis

from .state import PREFIX, connect_sqlite, is_key_id, redis_key

#: The header by which cluster mode's gateway names the hold of a request it sends to a replica (a fresh
#: :func:`new_hold` per request; the gateway replaces any a client sends, and one-process servers ignore it).
HOLD_HEADER = "x-dd-hold"
#: A hold id: 32 hex digits.
_HOLD_ID = re.compile(r"[0-9a-f]{32}")

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS model_spent (model TEXT NOT NULL, key_id TEXT NOT NULL, queries INTEGER NOT NULL, "
    "PRIMARY KEY (model, key_id))"
)
#: The table of budget files written before budgets were per model: one spend per key.
_LEGACY_TABLE = "spent"


class Ledger(Protocol):
    """Queries spent per key id on one model, against one budget shared by every key."""

    budget: int

    def spend(self, key_id: str, queries: int, hold: str | None = None) -> int | None:
        """Spend ``queries`` of ``key_id``'s budget and return what is left, or None (nothing spent)
        when the budget does not cover them; with ``hold``, the spend is also recorded under it."""
        ...

    def refund(self, key_id: str, queries: int, hold: str | None = None) -> None:
        """Give back queries that were spent but are not charged; never below nothing spent. With ``hold``,
        at most what the hold still holds (nothing once the gateway has released it)."""
        ...

    def settle(self, hold: str) -> None:
        """The request of ``hold`` has ended: what the hold still holds stays charged."""
        ...

    def remaining(self, key_id: str) -> int: ...

    def close(self) -> None: ...


class QueryLedger:
    """Queries spent per key id on ``model`` against one budget shared by every key."""

    def __init__(self, path: Path, budget: int, model: str) -> None:
        self.budget, self.model = budget, model
        self._lock = threading.Lock()
        self._db = connect_sqlite(path, _SCHEMA)
        self._carry_over_legacy()

    def _carry_over_legacy(self) -> None:
        """The spend of a budget file written before budgets were per model, copied into this model's budgets
        where it has none for the key (the module's docstring)."""
        legacy = self._db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (_LEGACY_TABLE,))
        if legacy.fetchone() is not None:
            self._db.execute(
                f"INSERT OR IGNORE INTO model_spent (model, key_id, queries) "
                f"SELECT ?, key_id, queries FROM {_LEGACY_TABLE}",
                (self.model,),
            )

    def spend(self, key_id: str, queries: int, hold: str | None = None) -> int | None:
        """Spend ``queries`` of ``key_id``'s budget and return what is left, or None (nothing spent)
        when the budget does not cover them."""
        _no_hold(hold)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT OR IGNORE INTO model_spent (model, key_id, queries) VALUES (?, ?, 0)", (self.model, key_id)
                )
                updated = self._db.execute(
                    "UPDATE model_spent SET queries = queries + ? WHERE model = ? AND key_id = ? AND queries + ? <= ?",
                    (queries, self.model, key_id, queries, self.budget),
                ).rowcount
                (spent,) = self._db.execute(
                    "SELECT queries FROM model_spent WHERE model = ? AND key_id = ?", (self.model, key_id)
                ).fetchone()
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return self.budget - spent if updated == 1 else None

    def refund(self, key_id: str, queries: int, hold: str | None = None) -> None:
        """Give back queries that were spent but are not charged (docs/server.md, "What a request costs")."""
        _no_hold(hold)
        with self._lock:
            self._db.execute(
                "UPDATE model_spent SET queries = MAX(queries - ?, 0) WHERE model = ? AND key_id = ?",
                (queries, self.model, key_id),
            )

    def settle(self, hold: str) -> None:
        _no_hold(hold)

    def remaining(self, key_id: str) -> int:
        with self._lock:
            row = self._db.execute(
                "SELECT queries FROM model_spent WHERE model = ? AND key_id = ?", (self.model, key_id)
            ).fetchone()
        return self.budget - (row[0] if row else 0)

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _no_hold(hold: str | None) -> None:
    if hold is not None:
        raise ValueError("holds are kept in the Redis state only (cluster mode requires it)")


def new_hold() -> str:
    """A fresh hold id (cluster mode's gateway makes one per request)."""
    return uuid.uuid4().hex


def is_hold(hold: str) -> bool:
    return _HOLD_ID.fullmatch(hold) is not None


#: KEYS[1] the key's spent queries, ARGV[1] the queries asked, ARGV[2] the budget: {1, left} when
#: spent, {0, left} (nothing spent) when the budget does not cover them. With KEYS[2] (a hold) the spend is
#: recorded there too (its budget key and queries), expiring after ARGV[3] s. Atomic: Redis runs a script alone.
_SPEND = """
local spent = tonumber(redis.call('GET', KEYS[1]) or '0')
local queries, budget = tonumber(ARGV[1]), tonumber(ARGV[2])
if spent + queries > budget then
    return {0, budget - spent}
end
local left = budget - redis.call('INCRBY', KEYS[1], queries)
if KEYS[2] then
    redis.call('HSET', KEYS[2], 'budget', KEYS[1], 'queries', queries)
    redis.call('EXPIRE', KEYS[2], tonumber(ARGV[3]))
end
return {1, left}
"""
#: KEYS[1] the key's spent queries, ARGV[1] the queries given back; never below 0, never creates the key.
#: With KEYS[2] (a hold) at most what the hold still holds, taken from it: nothing once it was released.
_REFUND = """
local queries = tonumber(ARGV[1])
if KEYS[2] then
    local held = tonumber(redis.call('HGET', KEYS[2], 'queries') or '0')
    queries = math.min(queries, held)
    if queries <= 0 then
        return 0
    end
    redis.call('HSET', KEYS[2], 'queries', held - queries)
end
local spent = redis.call('GET', KEYS[1])
if spent then
    redis.call('SET', KEYS[1], math.max(tonumber(spent) - queries, 0))
end
return queries
"""
#: KEYS[1] a hold: what it still holds is refunded to its budget key and the hold deleted; returns the queries.
_RELEASE = """
local held = redis.call('HMGET', KEYS[1], 'budget', 'queries')
redis.call('DEL', KEYS[1])
if not held[1] then
    return 0
end
local queries = tonumber(held[2])
local spent = redis.call('GET', held[1])
if spent and queries > 0 then
    redis.call('SET', held[1], math.max(tonumber(spent) - queries, 0))
end
return queries
"""


def budget_key(model: str, key_id: str, prefix: str = PREFIX) -> str:
    """The Redis key of what ``key_id`` has spent on ``model``: ``dd:budget:<model>:<key id>``."""
    return redis_key(prefix, f"budget:{model}", key_id)


class RedisLedger:
    """:class:`Ledger` in Redis: the queries spent by a key id on ``model`` under ``dd:budget:<model>:<key id>``.

    Releasing a hold (the gateway's part, :meth:`release`) does not depend on the model: the hold names the budget
    key it spent from."""

    def __init__(
        self, client: redis.Redis, budget: int, model: str, prefix: str = PREFIX, hold_ttl_s: int = 3600
    ) -> None:
        """``hold_ttl_s``: how long a hold outlives its spend when neither its replica nor the gateway ends it
        (both died): it then expires, and its queries stay charged."""
        self.budget, self.model = budget, model
        self._client, self._prefix, self._hold_ttl_s = client, prefix, hold_ttl_s
        self._spend = client.register_script(_SPEND)  # EVALSHA, loaded again when Redis has forgotten it
        self._refund = client.register_script(_REFUND)
        self._release = client.register_script(_RELEASE)
        self._carry_over_legacy()

    def _carry_over_legacy(self) -> None:
        """The spends kept before budgets were per model (``dd:budget:<key id>``), copied into this model's budgets
        where it has none for the key (the module's docstring)."""
        legacy = f"{self._prefix}budget:"
        for name in self._client.scan_iter(match=legacy + "?" * 12, count=1000):
            spent = self._client.get(name)
            if is_key_id(name.removeprefix(legacy)) and spent is not None:
                self._client.set(self._key(name.removeprefix(legacy)), spent, nx=True)

    def spend(self, key_id: str, queries: int, hold: str | None = None) -> int | None:
        keys = [self._key(key_id), *self._hold_keys(hold)]
        ok, left = self._spend(keys=keys, args=[queries, self.budget, self._hold_ttl_s])
        return int(left) if ok == 1 else None

    def refund(self, key_id: str, queries: int, hold: str | None = None) -> None:
        self._refund(keys=[self._key(key_id), *self._hold_keys(hold)], args=[queries])

    def settle(self, hold: str) -> None:
        self._client.delete(*self._hold_keys(hold))

    def release(self, hold: str) -> int:
        """Refund what ``hold`` still holds (its replica died with the request) and end it; the queries refunded."""
        return int(self._release(keys=self._hold_keys(hold)))

    def remaining(self, key_id: str) -> int:
        return self.budget - int(self._client.get(self._key(key_id)) or 0)

    def close(self) -> None:
        self._client.close()

    def _key(self, key_id: str) -> str:
        return budget_key(self.model, key_id, self._prefix)

    def _hold_keys(self, hold: str | None) -> list[str]:
        if hold is None:
            return []
        if not is_hold(hold):
            raise ValueError("a hold id is 32 hex digits (budget.new_hold)")
        return [f"{self._prefix}hold:{hold}"]
