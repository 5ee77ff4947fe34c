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
:class:`ExtractionMonitor` keeps its state per key in the budget database, so a restart forgets
nothing.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

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


@dataclass
class ExtractionMonitor:
    """:class:`MonitorPolicy` over every key, with its state in the SQLite file of the budgets."""

    path: Path
    policy: MonitorPolicy = field(default_factory=MonitorPolicy)

    def __post_init__(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(_SCHEMA)

    def escalated(self, key_id: str) -> bool:
        return self._read(key_id).escalated

    def observe(self, key_id: str, flags: list[bool]) -> bool:
        """Record a request's flags for ``key_id``; True when the key is escalated afterwards."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")  # read, update and write as one step (processes share the file)
            try:
                state = self.policy.observe(self._select(key_id), flags)
                self._db.execute(
                    "INSERT OR REPLACE INTO monitor VALUES (?, ?, ?, ?, ?, ?)",
                    (key_id, state.flags, state.queries, state.flagged, state.escalated_at, state.escalated_after),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return state.escalated

    def flagged_keys(self) -> list[dict[str, object]]:
        """The escalated keys (by key id), oldest escalation first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT key_id, queries, flagged, escalated_at, escalated_after FROM monitor "
                "WHERE escalated_at IS NOT NULL ORDER BY escalated_at"
            ).fetchall()
        names = ("key_id", "queries", "flagged", "escalated_at", "escalated_after")
        return [dict(zip(names, row, strict=True)) for row in rows]

    def count_flagged(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM monitor WHERE escalated_at IS NOT NULL").fetchone()[0]

    def clear(self, key_id: str) -> bool:
        """Forget ``key_id``'s window and escalation; False when it was not escalated."""
        with self._lock:
            deleted = self._db.execute("DELETE FROM monitor WHERE key_id = ? AND escalated_at IS NOT NULL", (key_id,))
        return deleted.rowcount == 1

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _read(self, key_id: str) -> KeyWindow:
        with self._lock:
            return self._select(key_id)

    def _select(self, key_id: str) -> KeyWindow:
        row = self._db.execute(
            "SELECT flags, queries, flagged, escalated_at, escalated_after FROM monitor WHERE key_id = ?", (key_id,)
        ).fetchone()
        return KeyWindow(*row) if row else KeyWindow()
