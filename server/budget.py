"""Per-key query budgets in SQLite, so that a restart does not reset them.

``spend`` checks and spends in one conditional ``UPDATE`` inside an immediate transaction, so
concurrent requests (threads or server processes sharing the file) cannot overspend.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

_SCHEMA = "CREATE TABLE IF NOT EXISTS spent (key_id TEXT PRIMARY KEY, queries INTEGER NOT NULL)"


class QueryLedger:
    """Queries spent per key id against one budget shared by every key."""

    def __init__(self, path: Path, budget: int) -> None:
        self.budget = budget
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(_SCHEMA)

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
