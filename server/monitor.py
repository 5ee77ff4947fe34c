"""The per-key extraction monitor: a key whose queries look like extraction is escalated.

It sees what the queries are, not one bit each (``server/query_features.py``):

* **Domain flags** — every answer of a gated server says whether the domain score flagged its query
  (``Answer.misinformed``). An honest user sends digits, of which the score flags well under 1%; a thief
  who steals with another domain's images (Fashion-MNIST, noise) has most of his flagged.
* **Near-duplicates** (Blacklight) — before a request is answered, each query's secret-keyed fingerprints
  are looked up in one index shared by every key (and every replica). A twin (the same image with a pixel
  moved, sent to compare the answers) or a query grown from one of the key's earlier ones is a
  near-duplicate; the very same bytes again (a retry) is not, since it gets the very same answer; nor is a
  near-duplicate of another honest key's query (honest users send the same public images). A near-duplicate of
  an *escalated* key's query taints the key that sends it: a thief who moves to a fresh key brings his queries
  along.
* **How a key's queries relate to each other** (PRADA) — each query's distance to the nearest of the
  key's earlier queries (kept in a bounded reservoir of coarse views), and the Shapiro–Wilk W of those
  distances: Jacobian-augmented queries (JBDA), grown from earlier ones, add a mass of tiny distances that
  natural digits do not have.

A server of several models (``server/runtime.py``) keeps one window and one escalation per key across them,
fed by the queries of the models that have the gate; a model without the gate refuses an escalated key.

The policy escalates a key once any of these says extraction: more than ``threshold`` (25%) of the last
``window`` (100) queries flagged by the domain score, more than ``duplicates`` (20%) of them
near-duplicates, at least ``tainted`` (3) near-duplicates of escalated keys' queries, or W below
``spread`` once ``spread_min`` distances are in (each after ``min_queries`` queries, the taint at once).
From then on every answer to that key comes from the misinformation path — in-domain queries
included, which is what the gate alone cannot do — or the key is refused with 403
(``monitor_action``), until an operator clears it (``DELETE /v1/admin/flags/{key_id}``). Near-duplicates
and distances are screened *before* a request is answered (``ExtractionMonitor.screen``), so the
request that tips a key over is already answered as escalated; domain flags are recorded after (a
retry's once: the very same bytes again add nothing, and cannot dilute a window).

Until then a key is *watched*: the gate misinforms its flagged queries one by one. Once its window is full
with at most ``trust_rate`` (half the threshold) flagged, it is *trusted*: its flagged queries are answered by
the defense like any other, so an honest user whose thick, thin or shifted digits the score sometimes flags
stops paying for them after his first ``window`` queries. Its flags still count; a trusted key whose window
passes ``trust_rate`` is watched again. What the trust gives a thief, measured: ``docs/results/trust.md``.

:class:`MonitorPolicy` is the pure rule (the evaluation harness replays query streams through it);
:class:`ExtractionMonitor` applies it to every key, with the state in a :class:`MonitorStore`: the
budget database (SQLite, :class:`SqliteMonitorStore`) or Redis (:class:`RedisMonitorStore`, shared by
replicas), so a restart forgets nothing. How the defaults were chosen, on the victim's training digits
only: ``docs/results/below-label-line.md``, "The monitor's defaults".
"""

from __future__ import annotations

import base64
import secrets as secrets_module
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import redis
from torch import Tensor

from deepdefense.defense.gate import MISINFORM, SCORE, TRUST

from .query_features import coarse_views, exact_prints, fingerprints, spread_statistic, view_distances
from .state import PREFIX, connect_sqlite, is_key_id, redis_key

#: Queries per key whose domain flags and near-duplicate marks the policy looks at.
WINDOW = 100
#: Queries a key must have sent before its window can escalate it.
MIN_QUERIES = 50
#: A window with more than this fraction flagged by the domain score is extraction. With the domain score fitted on
#: honest variants, the lowest candidate under which no honest key of 1,000 perturbed victim training digits is
#: escalated is 0.15 (0.1 escalates 4 of 60; the evaluation's "monitor threshold" table). 0.2 escalated one of 60
#: honest keys of perturbed *test* digits (thicker strokes from one group of writers: 21 of a window of 100 flagged),
#: so the margin is wider: 0.25 (honest flags cluster by writer; Fashion-MNIST keys are flagged a third of the time).
THRESHOLD = 0.25
#: A key in good standing ("trusted"): its window of domain flags is full and at most this fraction of it is
#: flagged, half the escalation threshold. Its flagged queries are answered by the defense, not the misinformation
#: path: a key that has sent a full window of mostly in-domain digits is an honest user whose thick or faint digits
#: the score sometimes flags (``docs/results/format-variants.md``), or a thief who already holds natural digits of the
#: domain, for whom the gate was never the defense (``docs/results/trust.md``). Flags still count: a key past this
#: rate is watched again (per query), past ``THRESHOLD`` escalated.
TRUST_RATE = THRESHOLD / 2
#: A window with more than this fraction of near-duplicates is probing (twin tests send every image twice).
DUPLICATES = 0.2
#: PRADA: W of the nearest-earlier-query distances below this is extraction. Honest keys of the victim's
#: training digits (clean, and under honest variation) stay above 0.95; JBDA keys fall below 0.8.
SPREAD = 0.9
#: Distances a key must have before W is looked at.
SPREAD_MIN = 100
#: Near-duplicates of escalated keys' queries that taint a key.
TAINTED = 3
#: Coarse views kept per key (a uniform sample of all its queries), and distances kept for W.
RESERVOIR = 256

#: Where a key stands, as the gate acts on it: its flagged queries misinformed (watched), its flagged queries answered
#: by the defense (trusted), or every query misinformed (escalated).
Standing = Literal["watched", "trusted", "escalated"]

#: What the gate does with a key's queries, by its standing (``defense/gate.py``).
OVERRIDE: dict[Standing, int] = {"watched": SCORE, "trusted": TRUST, "escalated": MISINFORM}

# what a query's near-duplicate mark says: new; a near-duplicate of one of the key's earlier queries (not the same
# bytes); a near-duplicate of an escalated key's query; the very bytes of one of the key's earlier queries (a retry:
# it gets the same answer, so it tells nothing new, and is neither suspicious nor a new point for PRADA)
NEW, DUPLICATE, TAINT, REPEAT = "0", "1", "2", "r"


@dataclass
class KeyWindow:
    """One key's state: its recent flags and marks, its sample of queries and distances, its escalation."""

    flags: str = ""  # the window of domain flags, oldest first: '1' flagged, '0' not
    marks: str = ""  # the window of near-duplicate marks: NEW, DUPLICATE or TAINT
    queries: int = 0  # every query screened or observed (the larger of the two counts)
    flagged: int = 0  # of those, flagged by the domain score
    duplicates: int = 0  # near-duplicates of earlier queries, any key's
    tainted: int = 0  # near-duplicates of escalated keys' queries
    screened: int = 0  # queries whose coarse view was screened (the reservoir's count)
    views: bytes = b""  # up to RESERVOIR coarse views, each ``view_size`` bytes
    distances: bytes = b""  # up to RESERVOIR float32 nearest-earlier-query distances (a uniform sample)
    spread: float | None = None  # W of ``distances`` at the last screening
    escalated_at: float | None = None  # unix time of the escalation, None while not escalated
    escalated_after: int | None = None  # queries the key had sent when it was escalated
    reason: str | None = None  # what escalated it: domain, duplicates, taint or spread

    @property
    def escalated(self) -> bool:
        return self.escalated_at is not None


@dataclass(frozen=True)
class MonitorPolicy:
    """When a key's queries are extraction (see the module's docstring for each rule)."""

    window: int = WINDOW
    min_queries: int = MIN_QUERIES
    threshold: float = THRESHOLD
    duplicates: float = DUPLICATES
    spread: float = SPREAD
    spread_min: int = SPREAD_MIN
    tainted: int = TAINTED
    reservoir: int = RESERVOIR
    trust_rate: float | None = None  # None: half the threshold (TRUST_RATE at the default threshold)

    def __post_init__(self) -> None:
        if not 1 <= self.min_queries <= self.window or not 0 <= self.threshold < 1 or not 0 < self.duplicates <= 1:
            raise ValueError("the monitor needs 1 <= min_queries <= window, 0 <= threshold < 1, 0 < duplicates <= 1")
        if self.trust_rate is None:
            object.__setattr__(self, "trust_rate", self.threshold / 2)  # frozen: set once, here
        assert self.trust_rate is not None
        if not 0 <= self.trust_rate <= self.threshold:
            raise ValueError("the monitor needs 0 <= trust_rate <= threshold")
        if self.spread_min < 3 or self.reservoir < self.spread_min or self.tainted < 1:
            raise ValueError("the monitor needs 3 <= spread_min <= reservoir and tainted >= 1")

    def standing(self, s: KeyWindow) -> Standing:
        """How the gate treats the key's next queries: escalated; trusted once its window of domain flags is full
        and at most ``trust_rate`` of it flagged; else watched."""
        if s.escalated:
            return "escalated"
        rate = self.trust_rate
        assert rate is not None  # resolved in __post_init__
        if len(s.flags) >= self.window and s.flags.count("1") <= rate * len(s.flags):
            return "trusted"
        return "watched"

    def observe(self, state: KeyWindow, flags: Iterable[bool], now: float | None = None) -> KeyWindow:
        """``state`` after the answered queries whose domain flags are ``flags``, in order (retries left out: they
        tell nothing new); escalation happens at the first query after which the window qualifies, and is kept."""
        s = replace(state)
        for flag in flags:
            s.flags = (s.flags + ("1" if flag else "0"))[-self.window :]
            if s.screened == 0:  # a screened key counted this query when it was screened
                s.queries += 1
            s.flagged += bool(flag)
            if not s.escalated and self.extraction(s.flags):
                self._escalate(s, "domain", now)
        return s

    def screen(self, state: KeyWindow, views: np.ndarray, marks: Sequence[str], now: float | None = None) -> KeyWindow:
        """``state`` after a request's queries, before they are answered: each one's coarse view (a row of
        ``views``) and near-duplicate mark. The views go through PRADA (nearest earlier distance, kept in a
        uniform sample; the key's views in a reservoir sample), the marks into the window."""
        s = replace(state)
        size = views.shape[1]
        kept = np.frombuffer(s.views, dtype=np.uint8).reshape(-1, size).copy()
        dist = np.frombuffer(s.distances, dtype=np.float32).copy()
        for view, mark in zip(views, marks, strict=True):
            if mark == REPEAT:
                s.queries += 1
                s.marks = (s.marks + NEW)[-self.window :]
                continue
            rng = np.random.default_rng(s.screened)  # the same stream of queries samples the same way anywhere
            if len(kept):
                dist = _sample(dist, view_distances(view, kept).min(), s.screened - 1, self.reservoir, rng)
            kept = _sample(kept, view, s.screened, self.reservoir, rng)
            s.screened += 1
            s.queries += 1
            s.marks = (s.marks + mark)[-self.window :]
            s.duplicates += mark in (DUPLICATE, TAINT)
            s.tainted += mark == TAINT
        s.views, s.distances = kept.tobytes(), dist.astype(np.float32).tobytes()
        if len(dist) >= self.spread_min:
            s.spread = spread_statistic(dist)
        if not s.escalated:
            reason = self.screened_extraction(s)
            if reason is not None:
                self._escalate(s, reason, now)
        return s

    def extraction(self, window: str) -> bool:
        """Whether a window of domain flags is extraction."""
        return len(window) >= self.min_queries and window.count("1") > self.threshold * len(window)

    def screened_extraction(self, s: KeyWindow) -> str | None:
        """What, of the screening's rules, says ``s`` is extraction (None: nothing)."""
        if s.tainted >= self.tainted:
            return "taint"
        if len(s.marks) >= self.min_queries and len(s.marks) - s.marks.count(NEW) > self.duplicates * len(s.marks):
            return "duplicates"
        if s.spread is not None and s.spread < self.spread:
            return "spread"
        return None

    def queries_until_escalated(self, flags: Iterable[bool]) -> int | None:
        """How many queries of a fresh key sending ``flags`` pass before it is escalated (None: never)."""
        return self.observe(KeyWindow(), flags, now=0.0).escalated_after

    def misinformed(self, flags: Sequence[bool], per_request: int = 1) -> list[bool]:
        """Which of a fresh key's distinct queries, whose domain flags are ``flags`` and which it sends
        ``per_request`` at a time, the gate answers from the misinformation path: all of a request sent while
        the key is escalated, the flagged ones while it is watched, none while it is trusted (its standing is
        read before each request, its flags recorded after, as the server does). Domain flags only: the
        screening's rules (near-duplicates, PRADA) are not replayed."""
        s, out = KeyWindow(), []
        for i in range(0, len(flags), per_request):
            chunk = [bool(f) for f in flags[i : i + per_request]]
            standing = self.standing(s)
            out += [standing == "escalated" or (f and standing == "watched") for f in chunk]
            s = self.observe(s, chunk, now=0.0)
        return out

    @staticmethod
    def _escalate(s: KeyWindow, reason: str, now: float | None) -> None:
        s.escalated_at, s.escalated_after, s.reason = time.time() if now is None else now, s.queries, reason


def _sample(kept: np.ndarray, item: np.ndarray | float, seen: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Reservoir sampling (Vitter's algorithm R): ``kept`` after the ``seen``-th item (0-based) of a stream,
    a uniform sample of at most ``size`` of its items."""
    row = np.asarray(item, dtype=kept.dtype).reshape((1, *kept.shape[1:]))
    if len(kept) < size:
        return np.concatenate([kept, row])
    slot = int(rng.integers(0, seen + 1))
    if slot < size:
        kept[slot] = row[0]
    return kept


@dataclass(frozen=True)
class Screening:
    """What the monitor says of a request before it is answered: the key's standing, and which of the queries are
    retries (the very bytes of one of the key's earlier queries), whose domain flags are not recorded again."""

    standing: Standing
    retries: tuple[bool, ...]

    @property
    def escalated(self) -> bool:
        return self.standing == "escalated"

    @property
    def override(self) -> int:
        """What the gate does with the request's queries (``defense/gate.py``)."""
        return OVERRIDE[self.standing]

    def distinct(self, flags: Sequence[bool]) -> list[bool]:
        """The domain flags of the request's queries that are not retries, for :meth:`ExtractionMonitor.observe`."""
        return [bool(f) for f, retry in zip(flags, self.retries, strict=True) if not retry]


class MonitorStore(Protocol):
    """Where :class:`ExtractionMonitor` keeps each key's :class:`KeyWindow`, the near-duplicate index shared
    by every key, and the secret that keys the fingerprints; the policy is not its business."""

    def read(self, key_id: str) -> KeyWindow:
        """``key_id``'s state (a fresh window when the key has none)."""
        ...

    def update(self, key_id: str, change: Callable[[KeyWindow], KeyWindow]) -> KeyWindow:
        """Replace ``key_id``'s state ``s`` by ``change(s)`` as one atomic step (across processes too: no
        other update of the key comes between the read and the write); return the new state.
        ``change`` may be called more than once."""
        ...

    def seen_by(self, prints: list[str]) -> dict[str, str]:
        """The fingerprints of ``prints`` already in the index, each with the key id that first sent it."""
        ...

    def index(self, prints: dict[str, str]) -> None:
        """Add fingerprint → key id pairs to the index; a fingerprint already there keeps its first key."""
        ...

    def secret(self) -> bytes:
        """The secret that keys the fingerprints: made once, at random, and kept with the state (so every
        replica and every restart fingerprints alike)."""
        ...

    def escalated_keys(self) -> list[tuple[str, KeyWindow]]:
        """The escalated keys' ids and states, oldest escalation first."""
        ...

    def escalated_ids(self) -> set[str]: ...

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
        self._secret = self.store.secret()

    def escalated(self, key_id: str) -> bool:
        return self.store.read(key_id).escalated

    def screen(self, key_id: str, x: Tensor) -> Screening:
        """Screen a request's queries (B, C, H, W) before they are answered: look their fingerprints up in the
        index shared by every key, add them, and update ``key_id``'s state; the key's standing after it.

        The index holds each fingerprint's first key (a near-duplicate of an escalated key's query taints), each
        key's own fingerprints (a near-duplicate of the key's own earlier query is a duplicate) and each key's
        exact queries (the same bytes again is a retry, not a duplicate). A near-duplicate of another, honest
        key's query is nothing: honest users send the same public images."""
        views = coarse_views(x)
        prints = fingerprints(views, self._secret)
        owned = [[f"{key_id}:{p}" for p in row] for row in prints]
        exact = [f"{key_id}:={e}" for e in exact_prints(x, self._secret)]
        seen = self.store.seen_by([p for row in prints + owned for p in row] + exact)
        escalated = self.store.escalated_ids() if seen else set()
        new: dict[str, str] = {}
        marks = []
        for row, mine, same in zip(prints, owned, exact, strict=True):  # in order: a twin finds its first half
            owners = {seen.get(p) or new.get(p) for p in row} - {None}
            if same in seen or same in new:
                marks.append(REPEAT)
            elif owners & escalated:
                marks.append(TAINT)
            else:
                marks.append(DUPLICATE if any(p in seen or p in new for p in mine) else NEW)
            new.update({p: key_id for p in [*row, *mine, same] if p not in seen and p not in new})
        state = self.store.update(key_id, lambda s: self.policy.screen(s, views, marks))
        self.store.index(new)
        return Screening(self.policy.standing(state), tuple(m == REPEAT for m in marks))

    def observe(self, key_id: str, flags: list[bool]) -> bool:
        """Record the domain flags of a request's distinct queries (``Screening.distinct``) for ``key_id``; True
        when the key is escalated afterwards."""
        return self.store.update(key_id, lambda state: self.policy.observe(state, flags)).escalated

    def flagged_keys(self) -> list[dict[str, object]]:
        """The escalated keys (by key id), oldest escalation first."""
        return [
            {
                "key_id": key_id,
                "queries": s.queries,
                "flagged": s.flagged,
                "duplicates": s.duplicates,
                "spread": s.spread,
                "reason": s.reason,
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


#: The columns of a key's row, in :class:`KeyWindow`'s order.
_FIELDS = tuple(KeyWindow.__dataclass_fields__)
_TYPES = {"flags": "TEXT NOT NULL", "marks": "TEXT NOT NULL", "views": "BLOB NOT NULL", "distances": "BLOB NOT NULL"}
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS monitor (key_id TEXT PRIMARY KEY, "
    + ", ".join(f"{f} {_TYPES.get(f, 'NUMERIC')}" for f in _FIELDS)
    + ")"
)
_INDEX_SCHEMA = "CREATE TABLE IF NOT EXISTS near_duplicates (print TEXT PRIMARY KEY, key_id TEXT NOT NULL, at REAL)"
_SECRET_SCHEMA = "CREATE TABLE IF NOT EXISTS monitor_secret (id INTEGER PRIMARY KEY CHECK (id = 0), secret BLOB)"
_COLUMNS = ", ".join(_FIELDS)
_UPSERT = f"INSERT OR REPLACE INTO monitor (key_id, {_COLUMNS}) VALUES ({', '.join('?' * (len(_FIELDS) + 1))})"
#: Fingerprints the SQLite index keeps; past this the oldest tenth is forgotten.
INDEX_ROWS = 2_000_000
#: How long a fingerprint stays in the Redis index (seconds; Redis forgets it then).
INDEX_TTL_S = 30 * 24 * 3600


class SqliteMonitorStore:
    """:class:`MonitorStore` in a SQLite file (the budgets' ``budget_db``): one row per key, one per fingerprint."""

    def __init__(self, path: Path, index_rows: int = INDEX_ROWS) -> None:
        self._lock = threading.Lock()
        self._db = connect_sqlite(path, _SCHEMA)
        self._migrate()
        self._db.execute(_INDEX_SCHEMA)
        self._db.execute(_SECRET_SCHEMA)
        self._index_rows, self._inserted = index_rows, 0

    def _migrate(self) -> None:
        """A database written by an earlier monitor: its rows gain the new columns (empty)."""
        have = {row[1] for row in self._db.execute("PRAGMA table_info(monitor)")}
        for f in _FIELDS:
            if f not in have:
                default = {"TEXT NOT NULL": "''", "BLOB NOT NULL": "X''"}.get(_TYPES.get(f, ""), "NULL")
                self._db.execute(f"ALTER TABLE monitor ADD COLUMN {f} {_TYPES.get(f, 'NUMERIC')} DEFAULT {default}")

    def read(self, key_id: str) -> KeyWindow:
        with self._lock:
            return self._select(key_id)

    def update(self, key_id: str, change: Callable[[KeyWindow], KeyWindow]) -> KeyWindow:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")  # read, update and write as one step (processes share the file)
            try:
                state = change(self._select(key_id))
                values = (key_id, *(getattr(state, f) for f in _FIELDS))
                self._db.execute(_UPSERT, values)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return state

    def seen_by(self, prints: list[str]) -> dict[str, str]:
        if not prints:
            return {}
        with self._lock:
            rows = self._db.execute(
                f"SELECT print, key_id FROM near_duplicates WHERE print IN ({', '.join('?' for _ in prints)})", prints
            ).fetchall()
        return dict(rows)

    def index(self, prints: dict[str, str]) -> None:
        if not prints:
            return
        now = time.time()
        with self._lock:
            self._db.executemany(
                "INSERT OR IGNORE INTO near_duplicates VALUES (?, ?, ?)", [(p, k, now) for p, k in prints.items()]
            )
            self._inserted += len(prints)
            if self._inserted >= self._index_rows // 10:  # now and then: keep the index bounded
                self._inserted = 0
                (count,) = self._db.execute("SELECT COUNT(*) FROM near_duplicates").fetchone()
                if count > self._index_rows:
                    self._db.execute(
                        "DELETE FROM near_duplicates WHERE print IN "
                        "(SELECT print FROM near_duplicates ORDER BY at LIMIT ?)",
                        (count - self._index_rows + self._index_rows // 10,),
                    )

    def keep_secret(self, secret: bytes) -> None:
        """Keep ``secret`` as the fingerprints' secret instead of a random one (a replay that must mark the same
        near-duplicates on every run); refused once the store holds one."""
        with self._lock:
            try:
                self._db.execute("INSERT INTO monitor_secret VALUES (0, ?)", (secret,))
            except sqlite3.IntegrityError:
                raise ValueError("the monitor's store already holds its secret") from None

    def secret(self) -> bytes:
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO monitor_secret VALUES (0, ?)", (secrets_module.token_bytes(32),))
            (secret,) = self._db.execute("SELECT secret FROM monitor_secret WHERE id = 0").fetchone()
        return bytes(secret)

    def escalated_keys(self) -> list[tuple[str, KeyWindow]]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT key_id, {_COLUMNS} FROM monitor WHERE escalated_at IS NOT NULL ORDER BY escalated_at"
            ).fetchall()
        return [(key_id, _row(state)) for key_id, *state in rows]

    def escalated_ids(self) -> set[str]:
        with self._lock:
            return {k for (k,) in self._db.execute("SELECT key_id FROM monitor WHERE escalated_at IS NOT NULL")}

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
        return _row(row) if row else KeyWindow()


def _row(values: Sequence[object]) -> KeyWindow:
    """The :class:`KeyWindow` of a SQLite row (blobs as bytes; NULL counts of a migrated row as 0)."""
    fields = dict(zip(_FIELDS, values, strict=True))
    for f in ("queries", "flagged", "duplicates", "tainted", "screened"):
        fields[f] = int(fields[f] or 0)
    fields["views"], fields["distances"] = bytes(fields["views"] or b""), bytes(fields["distances"] or b"")
    return KeyWindow(**fields)  # type: ignore[arg-type]


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
    """:class:`MonitorStore` in Redis: a key's state in the hash ``dd:monitor:<key id>``, the escalated key ids
    in the sorted set ``dd:monitor-escalated`` (scored by the time of escalation), each fingerprint as
    ``dd:near-dup:<print>`` (its first key id, forgotten after ``index_ttl_s``), the secret in ``dd:monitor-secret``.

    ``update`` reads the hash under WATCH, lets the policy change it in Python and writes it back in
    MULTI/EXEC, again from the read when another process wrote the key meanwhile."""

    def __init__(self, client: redis.Redis, prefix: str = PREFIX, index_ttl_s: int = INDEX_TTL_S) -> None:
        self._client, self._prefix, self._ttl = client, prefix, index_ttl_s
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

    def seen_by(self, prints: list[str]) -> dict[str, str]:
        if not prints:
            return {}
        owners = self._client.mget([f"{self._prefix}near-dup:{p}" for p in prints])
        return {p: owner for p, owner in zip(prints, owners, strict=True) if owner is not None}

    def index(self, prints: dict[str, str]) -> None:
        pipe = self._client.pipeline(transaction=False)
        for p, key_id in prints.items():
            pipe.set(f"{self._prefix}near-dup:{p}", key_id, nx=True, ex=self._ttl)
        pipe.execute()

    def secret(self) -> bytes:
        name = f"{self._prefix}monitor-secret"
        self._client.set(name, secrets_module.token_hex(32), nx=True)
        return bytes.fromhex(self._client.get(name))

    def escalated_keys(self) -> list[tuple[str, KeyWindow]]:
        ids = self._client.zrange(self._escalated, 0, -1)
        pipe = self._client.pipeline(transaction=False)
        for key_id in ids:
            pipe.hgetall(self._key(key_id))
        found = [(key_id, _window(fields)) for key_id, fields in zip(ids, pipe.execute(), strict=True)]
        return [(key_id, state) for key_id, state in found if state.escalated]  # cleared meanwhile: left out

    def escalated_ids(self) -> set[str]:
        return set(self._client.zrange(self._escalated, 0, -1))

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
    """``state`` as the fields of its Redis hash: blobs in base64, the optional ones only when set."""
    fields: dict[str, str | int | float] = {}
    for f in _FIELDS:
        value = getattr(state, f)
        if isinstance(value, bytes):
            fields[f] = base64.b64encode(value).decode()
        elif isinstance(value, float):
            fields[f] = repr(value)
        elif value is not None:
            fields[f] = value
    return fields


def _window(fields: dict[str, str]) -> KeyWindow:
    """The :class:`KeyWindow` of a Redis hash (a fresh one for no hash)."""
    out: dict[str, object] = {}
    for f, default in KeyWindow().__dict__.items():
        raw = fields.get(f)
        if raw is None:
            out[f] = default
        elif isinstance(default, bytes):
            out[f] = base64.b64decode(raw)
        elif isinstance(default, int):
            out[f] = int(raw)
        elif f in ("spread", "escalated_at"):
            out[f] = float(raw)
        elif f == "escalated_after":
            out[f] = int(raw)
        else:
            out[f] = raw
    return KeyWindow(**out)  # type: ignore[arg-type]
