"""The per-key extraction monitor: a key whose recent queries look like extraction is escalated.

Every answer of a gated server says whether the domain score flagged its query (``Answer.misinformed``).
An honest user sends digits, of which the score flags about 0.5%; an attacker who steals with queries
from another domain (Fashion-MNIST, noise, Jacobian-augmented images) has most of his flagged. The
policy keeps, per key, the flags of its last ``window`` (100) queries, and escalates the key once at least
``min_queries`` (50) of them are in and more than ``threshold`` (80%) of the window is flagged. From then on
every answer to that key comes from the misinformation model — in-domain queries included, which is
what the gate alone cannot do — or the key is refused with 403 (``monitor_action``), until an
operator clears it (``DELETE /v1/admin/flags/{key_id}``).

:class:`MonitorPolicy` is the pure rule (the evaluation harness replays transfer sets through it);
:class:`ExtractionMonitor` applies it to every key, with the state per key in a :class:`MonitorStore`:
the budget database (SQLite, :class:`SqliteMonitorStore`) or Redis (:class:`RedisMonitorStore`, shared
by replicas), so a restart forgets nothing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import redis

from .state import PREFIX, connect_sqlite, is_key_id, redis_key

#: Queries per key whose flags the policy looks at.
WINDOW = 100
#: Queries a key must have sent before it can be escalated.
MIN_QUERIES = 50
#: A window with more than this fraction flagged is extraction: the lowest of 0.5, 0.6, …, 0.9 under which no
#: honest key of 1,000 perturbed victim training digits is escalated (the evaluation's "monitor threshold" table).
THRESHOLD = 0.8

_SCHEMA = """CREATE TABLE IF NOT EXISTS monitor (
    key_id TEXT PRIMARY KEY,
    flags TEXT NOT NULL,          -- the window, oldest first: '1' flagged, '0' not
    queries INTEGER NOT NULL,     -- every query the key has sent
    flagged INTEGER NOT NULL,     -- of those, flagged by the domain score
    escalated_at REAL,            -- unix time of the escalation, NULL while not escalated
    escalated_after INTEGER       -- queries the key had sent when it was escalated
)"""
_COLUMNS = "flags, queries, flagged, escalated_at, escalated_after"


@dataclass
class KeyWindow:
    """One key's state: its recent flags and whether it is escalated."""

    flags: str = ""
    queries: int = 0
    flagged: int = 0
    escalated_at: float | None = None
    escalated_after: int | None = None

    @property
    def escalated(self) -> bool:
        return self.escalated_at is not None


@dataclass(frozen=True)
class MonitorPolicy:
    """When a window of flags is extraction: at least ``min_queries`` queries, more than ``threshold`` flagged."""

    window: int = WINDOW
    min_queries: int = MIN_QUERIES
    threshold: float = THRESHOLD

    def __post_init__(self) -> None:
        if not 1 <= self.min_queries <= self.window or not 0 <= self.threshold < 1:
            raise ValueError("the monitor needs 1 <= min_queries <= window and 0 <= threshold < 1")

    def observe(self, state: KeyWindow, flags: Iterable[bool], now: float | None = None) -> KeyWindow:
        """``state`` after the queries whose flags are ``flags``, in order; escalation happens at the
        first query after which the window qualifies, and is kept."""
        s = KeyWindow(state.flags, state.queries, state.flagged, state.escalated_at, state.escalated_after)
        for flag in flags:
            s.flags = (s.flags + ("1" if flag else "0"))[-self.window :]
            s.queries += 1
            s.flagged += bool(flag)
            if not s.escalated and self.extraction(s.flags):
                s.escalated_at, s.escalated_after = time.time() if now is None else now, s.queries
        return s

    def extraction(self, window: str) -> bool:
        return len(window) >= self.min_queries and window.count("1") > self.threshold * len(window)

    def queries_until_escalated(self, flags: Iterable[bool]) -> int | None:
        """How many queries of a fresh key sending ``flags`` pass before it is escalated (None: never)."""
        return self.observe(KeyWindow(), flags, now=0.0).escalated_after


class MonitorStore(Protocol):
    """Where :class:`ExtractionMonitor` keeps each key's :class:`KeyWindow`; the policy is not its business."""

    def read(self, key_id: str) -> KeyWindow:
        """``key_id``'s state (a fresh window when the key has none)."""
        ...

    def update(self, key_id: str, change: Callable[[KeyWindow], KeyWindow]) -> KeyWindow:
        """Replace ``key_id``'s state ``s`` by ``change(s)`` as one atomic step (across processes too: no
        other update of the key comes between the read and the write); return the new state.
        ``change`` may be called more than once."""
        ...

    def escalated_keys(self) -> list[tuple[str, KeyWindow]]:
        """The escalated keys' ids and states, oldest escalation first."""
        ...

    def count_escalated(self) -> int: ...

    def clear(self, key_id: str) -> bool:
        """Forget ``key_id``'s state if it is escalated; False when it is not."""
        ...

    def close(self) -> None: ...


class ExtractionMonitor:
    """:class:`MonitorPolicy` over every key, with its state in a :class:`MonitorStore`: the SQLite file
    of the budgets (a ``Path``, the default) or Redis (:class:`RedisMonitorStore`, shared by replicas)."""

    def __init__(self, store: MonitorStore | Path, policy: MonitorPolicy | None = None) -> None:
        self.store: MonitorStore = SqliteMonitorStore(store) if isinstance(store, Path) else store
        self.policy = policy or MonitorPolicy()

    def escalated(self, key_id: str) -> bool:
        return self.store.read(key_id).escalated

    def observe(self, key_id: str, flags: list[bool]) -> bool:
        """Record a request's flags for ``key_id``; True when the key is escalated afterwards."""
        return self.store.update(key_id, lambda state: self.policy.observe(state, flags)).escalated

    def flagged_keys(self) -> list[dict[str, object]]:
        """The escalated keys (by key id), oldest escalation first."""
        return [
            {
                "key_id": key_id,
                "queries": s.queries,
                "flagged": s.flagged,
                "escalated_at": s.escalated_at,
                "escalated_after": s.escalated_after,
            }
            for key_id, s in self.store.escalated_keys()
        ]

    def count_flagged(self) -> int:
        return self.store.count_escalated()

    def clear(self, key_id: str) -> bool:
        """Forget ``key_id``'s window and escalation; False when it was not escalated."""
        return self.store.clear(key_id)

    def close(self) -> None:
        self.store.close()


class SqliteMonitorStore:
    """:class:`MonitorStore` in a SQLite file (the budgets' ``budget_db``): one row per key."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        self._db = connect_sqlite(path, _SCHEMA)

    def read(self, key_id: str) -> KeyWindow:
        with self._lock:
            return self._select(key_id)

    def update(self, key_id: str, change: Callable[[KeyWindow], KeyWindow]) -> KeyWindow:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")  # read, update and write as one step (processes share the file)
            try:
                state = change(self._select(key_id))
                self._db.execute(
                    "INSERT OR REPLACE INTO monitor VALUES (?, ?, ?, ?, ?, ?)",
                    (key_id, state.flags, state.queries, state.flagged, state.escalated_at, state.escalated_after),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return state

    def escalated_keys(self) -> list[tuple[str, KeyWindow]]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT key_id, {_COLUMNS} FROM monitor WHERE escalated_at IS NOT NULL ORDER BY escalated_at"
            ).fetchall()
        return [(key_id, KeyWindow(*state)) for key_id, *state in rows]

    def count_escalated(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM monitor WHERE escalated_at IS NOT NULL").fetchone()[0]

    def clear(self, key_id: str) -> bool:
        with self._lock:
            deleted = self._db.execute("DELETE FROM monitor WHERE key_id = ? AND escalated_at IS NOT NULL", (key_id,))
        return deleted.rowcount == 1

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _select(self, key_id: str) -> KeyWindow:
        row = self._db.execute(f"SELECT {_COLUMNS} FROM monitor WHERE key_id = ?", (key_id,)).fetchone()
        return KeyWindow(*row) if row else KeyWindow()


#: KEYS[1] the key's state, KEYS[2] the escalated keys; ARGV[1] the key id. Deletes the state only when escalated.
_CLEAR = """
if redis.call('HEXISTS', KEYS[1], 'escalated_at') == 0 then
    return 0
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""


class RedisMonitorStore:
    """:class:`MonitorStore` in Redis: a key's state in the hash ``dd:monitor:<key id>``, the escalated
    key ids in the sorted set ``dd:monitor-escalated`` (scored by the time of escalation).

    ``update`` reads the hash under WATCH, lets the policy change it in Python and writes it back in
    MULTI/EXEC, again from the read when another process wrote the key meanwhile."""

    def __init__(self, client: redis.Redis, prefix: str = PREFIX) -> None:
        self._client, self._prefix = client, prefix
        self._escalated = f"{prefix}monitor-escalated"
        self._clear = client.register_script(_CLEAR)

    def read(self, key_id: str) -> KeyWindow:
        return _window(self._client.hgetall(self._key(key_id)))

    def update(self, key_id: str, change: Callable[[KeyWindow], KeyWindow]) -> KeyWindow:
        name = self._key(key_id)

        def step(pipe: redis.client.Pipeline) -> KeyWindow:
            state = change(_window(pipe.hgetall(name)))  # watched: executed at once
            pipe.multi()
            pipe.hset(name, mapping=_fields(state))
            if state.escalated:
                pipe.zadd(self._escalated, {key_id: state.escalated_at})
            return state

        return self._client.transaction(step, name, value_from_callable=True)

    def escalated_keys(self) -> list[tuple[str, KeyWindow]]:
        ids = self._client.zrange(self._escalated, 0, -1)
        pipe = self._client.pipeline(transaction=False)
        for key_id in ids:
            pipe.hgetall(self._key(key_id))
        found = [(key_id, _window(fields)) for key_id, fields in zip(ids, pipe.execute(), strict=True)]
        return [(key_id, state) for key_id, state in found if state.escalated]  # cleared meanwhile: left out

    def count_escalated(self) -> int:
        return int(self._client.zcard(self._escalated))

    def clear(self, key_id: str) -> bool:
        if not is_key_id(key_id):  # an operator's typo: no such key
            return False
        return self._clear(keys=[self._key(key_id), self._escalated], args=[key_id]) == 1

    def close(self) -> None:
        self._client.close()

    def _key(self, key_id: str) -> str:
        return redis_key(self._prefix, "monitor", key_id)


def _fields(state: KeyWindow) -> dict[str, str | int | float]:
    """``state`` as the fields of its Redis hash (the escalation's two only once it happened)."""
    fields: dict[str, str | int | float] = {"flags": state.flags, "queries": state.queries, "flagged": state.flagged}
    if state.escalated_at is not None and state.escalated_after is not None:
        fields |= {"escalated_at": repr(state.escalated_at), "escalated_after": state.escalated_after}
    return fields


def _window(fields: dict[str, str]) -> KeyWindow:
    """The :class:`KeyWindow` of a Redis hash (a fresh one for no hash)."""
    escalated_at, after = fields.get("escalated_at"), fields.get("escalated_after")
    return KeyWindow(
        flags=fields.get("flags", ""),
        queries=int(fields.get("queries", 0)),
        flagged=int(fields.get("flagged", 0)),
        escalated_at=float(escalated_at) if escalated_at is not None else None,
        escalated_after=int(after) if after is not None else None,
    )
