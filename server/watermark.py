"""Watermarked answers (DAWN, Szyller et al., ACM Multimedia 2021): proof that a suspect model was copied.

Per API key, a keyed hash of each query picks a small fraction of them (``fraction``, default
:data:`FRACTION`; ``escalated_fraction``, :data:`ESCALATED_FRACTION`, once the extraction monitor has escalated
the key) whose answer carries a *watermark class* chosen by the same hash, never the answer's own label.
Such an answer is the defense's own answer to that query, relabelled: the top-1 class's probability and the
watermark class's are swapped, so its sorted probabilities — the answer's shape —
are the honest ones, its map is the honest one, and it moves with the query as every honest answer does
(the twin test and the answer-shape classifier of ``measure/detectors.py`` see an honest answer). The map
is not recomputed for the watermark class: DeepDefense's maps are made to disagree with the victim's, so no
one can check a map against a label, and recomputing it for the watermark class (tried) made the answers
detectable (``docs/results/ownership.md``) and, for one of three confident test digits, whose victim's map of
another class is (nearly) zero, returned that map of the victim itself unchanged — which the server never
sends. A thief's copy learns these labels; a model trained without our answers agrees with them only by chance
(``ownership_test``).

* **The decision** is a function of the query's coarse view (``server/query_features.py``) quantised on
  the near-duplicate grids under the watermark's own secret, not of its bytes: the first grid's
  fingerprint, hashed with the key id under the secret, picks whether (below ``fraction``) and which
  class. A query that shares any fingerprint with one of the key's watermarked queries gets that
  query's watermark (a twin, one pixel moved, cannot find it by comparing answers); a near-duplicate of
  an honest query is decided afresh, so it may be watermarked where the first was not — a thief who
  drops it loses an answer he already has, and learns nothing of the first.
* **The records** — each watermarked query's pixels (float32, to send it again), its watermark class,
  the label it would have had and its fingerprints — are kept per key, at most ``records`` (oldest
  dropped), in the budget database (SQLite) or Redis (shared by replicas), so a restart forgets nothing.
  ``deepdefense ownership verify`` reads them from the same place.
* **The cost** to honest users: the watermarked fraction of their answers carries a wrong label
  (``docs/results/ownership.md`` measures it). An escalated key is a thief's (the monitor escalates no honest
  key of the evaluation), and its answers come from the misinformation path anyway, so its answers carry the
  watermark more often at no honest user's cost: the same hash below the larger fraction, so a query
  watermarked before the escalation still is after it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import redis
import torch
from scipy.stats import binom
from torch import Tensor, nn

from deepdefense.defense.api import Answer

from .query_features import coarse_views, fingerprints
from .state import PREFIX, connect_sqlite, redis_key

#: The share of each key's queries watermarked while the monitor has not escalated the key: what it costs honest
#: users in accuracy. Chosen by measurement (docs/results/ownership.md, "Targets"): the copies made from 2,500
#: natural digits (a thief the monitor cannot tell from an honest user) are proven at 0.25% already, and on five
#: draws of the hash at 0.4%; honest keys of 1,000 test digits keep 99.11% of the victim's 99.50% at 0.4%, 99.01% at
#: 0.5% (the edge of issue 28's 99.0%), 98.43% at 1%.
FRACTION = 0.004
#: The share once the monitor has escalated the key: 1%, the smallest of 0.25%, 0.5% and 1% at which every copy
#: made from 2,500 queries was proven when one fraction served every key — the JBDA thieves, whom the monitor
#: escalates, need it.
ESCALATED_FRACTION = 0.01
#: Watermarked queries kept per key (the oldest dropped): 100 keys' worth is about 6 MB per thousand records.
RECORDS = 2000
#: The least chance an independent model is credited with of answering a query's watermark class (of K − 1
#: wrong ones): its own per-class error on those queries is used when higher (``ownership_test``).
FLOOR = 0.01
#: p-value under which ``ownership_test`` says the suspect was copied.
ALPHA = 1e-3


@dataclass(frozen=True)
class Record:
    """One watermarked query of a key: what is needed to send it again, and what its answer said."""

    pixels: bytes  # the query (C, H, W) as float32
    shape: tuple[int, ...]
    mark: int  # the watermark class the answer carried
    label: int  # the label the answer would have carried
    prints: tuple[str, ...]  # its near-duplicate fingerprints under the watermark's secret
    at: float

    def query(self) -> Tensor:
        return torch.from_numpy(np.frombuffer(self.pixels, dtype=np.float32).reshape(self.shape).copy())

    def to_json(self) -> str:
        data = {**self.__dict__, "pixels": base64.b64encode(self.pixels).decode()}
        return json.dumps(data)

    @staticmethod
    def from_json(text: str) -> Record:
        data = json.loads(text)
        data["pixels"], data["shape"], data["prints"] = (
            base64.b64decode(data["pixels"]),
            tuple(data["shape"]),
            tuple(data["prints"]),
        )
        return Record(**data)


class WatermarkStore(Protocol):
    """Where each key's watermark records live."""

    def marks_of(self, key_id: str, prints: list[str]) -> dict[str, int]:
        """Of ``prints``, those of ``key_id``'s kept records, with their watermark class."""
        ...

    def add(self, key_id: str, records: list[Record]) -> None:
        """Keep ``records`` for ``key_id``; past the store's bound the oldest are dropped."""
        ...

    def records(self, key_id: str) -> list[Record]:
        """``key_id``'s kept records, oldest first."""
        ...

    def close(self) -> None: ...


_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS watermarks (id INTEGER PRIMARY KEY AUTOINCREMENT, key_id TEXT NOT NULL, "
    "record TEXT NOT NULL)"
)
_PRINTS_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS watermark_prints (key_id TEXT NOT NULL, print TEXT NOT NULL, mark INTEGER NOT NULL, "
    "record INTEGER NOT NULL, PRIMARY KEY (key_id, print))"
)


class SqliteWatermarkStore:
    """:class:`WatermarkStore` in the budget database: one row per record, one per fingerprint."""

    def __init__(self, path: Path, records: int = RECORDS) -> None:
        self._lock = threading.Lock()
        self._db = connect_sqlite(path, _SCHEMA)
        self._db.execute(_PRINTS_SCHEMA)
        self._db.execute("CREATE INDEX IF NOT EXISTS watermarks_key ON watermarks (key_id, id)")
        self._limit = records

    def marks_of(self, key_id: str, prints: list[str]) -> dict[str, int]:
        if not prints:
            return {}
        with self._lock:
            rows = self._db.execute(
                "SELECT print, mark FROM watermark_prints WHERE key_id = ? AND print IN "
                f"({', '.join('?' * len(prints))})",
                [key_id, *prints],
            ).fetchall()
        return dict(rows)

    def add(self, key_id: str, records: list[Record]) -> None:
        if not records:
            return
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for r in records:
                    row = self._db.execute(
                        "INSERT INTO watermarks (key_id, record) VALUES (?, ?)", (key_id, r.to_json())
                    )
                    self._db.executemany(
                        "INSERT OR IGNORE INTO watermark_prints VALUES (?, ?, ?, ?)",
                        [(key_id, p, r.mark, row.lastrowid) for p in r.prints],
                    )
                old = "SELECT id FROM watermarks WHERE key_id = ? ORDER BY id DESC LIMIT -1 OFFSET ?"
                self._db.execute(
                    f"DELETE FROM watermark_prints WHERE key_id = ? AND record IN ({old})",
                    (key_id,) * 2 + (self._limit,),
                )
                self._db.execute(f"DELETE FROM watermarks WHERE id IN ({old})", (key_id, self._limit))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def records(self, key_id: str) -> list[Record]:
        with self._lock:
            rows = self._db.execute("SELECT record FROM watermarks WHERE key_id = ? ORDER BY id", (key_id,)).fetchall()
        return [Record.from_json(text) for (text,) in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()


#: KEYS[1] the key's records (a list), KEYS[2] its fingerprints (a hash: print → class); ARGV[1] the bound, then
#: the records as JSON. Appends them, drops the oldest past the bound with their fingerprints, in one step.
_ADD = """
for i = 2, #ARGV do
    local record = cjson.decode(ARGV[i])
    redis.call('RPUSH', KEYS[1], ARGV[i])
    for _, p in ipairs(record['prints']) do
        redis.call('HSETNX', KEYS[2], p, record['mark'])
    end
end
local limit = tonumber(ARGV[1])
while redis.call('LLEN', KEYS[1]) > limit do
    local old = cjson.decode(redis.call('LPOP', KEYS[1]))
    for _, p in ipairs(old['prints']) do
        redis.call('HDEL', KEYS[2], p)
    end
end
return 1
"""


class RedisWatermarkStore:
    """:class:`WatermarkStore` in Redis: a key's records in the list ``dd:watermark:<key id>`` (JSON, oldest
    first), its fingerprints in the hash ``dd:watermark-prints:<key id>``; both changed by one script."""

    def __init__(self, client: redis.Redis, records: int = RECORDS, prefix: str = PREFIX) -> None:
        self._client, self._limit, self._prefix = client, records, prefix
        self._add = client.register_script(_ADD)

    def marks_of(self, key_id: str, prints: list[str]) -> dict[str, int]:
        if not prints:
            return {}
        found = self._client.hmget(redis_key(self._prefix, "watermark-prints", key_id), prints)
        return {p: int(m) for p, m in zip(prints, found, strict=True) if m is not None}

    def add(self, key_id: str, records: list[Record]) -> None:
        if records:
            keys = [redis_key(self._prefix, "watermark", key_id), redis_key(self._prefix, "watermark-prints", key_id)]
            self._add(keys=keys, args=[self._limit, *(r.to_json() for r in records)])

    def records(self, key_id: str) -> list[Record]:
        return [Record.from_json(t) for t in self._client.lrange(redis_key(self._prefix, "watermark", key_id), 0, -1)]

    def close(self) -> None:
        self._client.close()


def decide(secret: bytes, key_id: str, print_: str, label: int, classes: int, fraction: float) -> int | None:
    """The watermark class of a query of ``key_id`` whose first fingerprint is ``print_`` and whose answer's label
    is ``label``: None for most; for a ``fraction`` of them one of the ``classes`` − 1 others, uniformly."""
    digest = hmac.new(secret, f"{key_id}:{print_}".encode(), hashlib.sha256).digest()
    if int.from_bytes(digest[:8], "little") >= fraction * 2**64:
        return None
    other = int.from_bytes(digest[8:16], "little") % (classes - 1)
    return other + (other >= label)


def relabel(answer: Answer, mark: int) -> Answer:
    """``answer`` carrying ``mark``: the probabilities of its label and of ``mark`` swapped (sorted, they are the
    same), the label ``mark``; its map stays the defense's own for the query."""
    p = answer.probabilities.clone()
    p[[answer.label, mark]] = p[[mark, answer.label]]
    return replace(answer, label=mark, probabilities=p)


@dataclass(frozen=True)
class Marks:
    """A request's watermark: per query its class (None: answered as it is), its fingerprints, and whether it is
    watermarked afresh (else it follows a kept query it is a near-duplicate of, and is not kept again)."""

    marks: list[int | None]
    prints: list[tuple[str, ...]]
    fresh: list[bool]


class Watermark:
    """Which of a key's queries are watermarked and with what class, and the key's records."""

    def __init__(
        self,
        store: WatermarkStore | Path,
        secret: bytes,
        classes: int,
        fraction: float = FRACTION,
        escalated_fraction: float | None = None,
    ) -> None:
        escalated_fraction = max(fraction, ESCALATED_FRACTION) if escalated_fraction is None else escalated_fraction
        if not 0 < fraction <= escalated_fraction < 1 or classes < 2:
            raise ValueError("the watermark needs 0 < fraction <= escalated_fraction < 1 and at least 2 classes")
        self.store: WatermarkStore = SqliteWatermarkStore(store) if isinstance(store, Path) else store
        self.classes, self.fraction, self.escalated_fraction = classes, fraction, escalated_fraction
        self._secret = secret

    def marks(self, key_id: str, x: Tensor, labels: list[int], *, escalated: bool = False) -> Marks:
        """Each query's watermark class (None: answered as it is) given its answer's label. In order: a query that
        shares a fingerprint with one of the key's watermarked queries (kept, or earlier in this batch) gets its
        class; any other is decided by :func:`decide`, at ``escalated_fraction`` for a key the monitor escalated."""
        fraction = self.escalated_fraction if escalated else self.fraction
        prints = [tuple(row) for row in fingerprints(coarse_views(x), self._secret)]
        known = self.store.marks_of(key_id, sorted({p for row in prints for p in row}))
        out = Marks([], prints, [])
        for row, label in zip(prints, labels, strict=True):
            found = next((known[p] for p in row if p in known), None)
            mark = decide(self._secret, key_id, row[0], label, self.classes, fraction) if found is None else found
            mark = None if mark == label else mark  # a near-duplicate whose own label is the watermark's: as it is
            if mark is not None and found is None:
                known.update({p: mark for p in row})
            out.marks.append(mark)
            out.fresh.append(mark is not None and found is None)
        return out

    def record(self, key_id: str, x: Tensor, answers: list[Answer], marks: Marks) -> None:
        """Keep the request's freshly watermarked queries (``answers``: the honest ones, before :func:`relabel`)."""
        now = time.time()
        rows = x.detach().float().cpu()
        kept = [
            Record(rows[i].numpy().tobytes(), tuple(rows[i].shape), m, answers[i].label, marks.prints[i], now)
            for i, m in enumerate(marks.marks)
            if m is not None and marks.fresh[i]
        ]
        self.store.add(key_id, kept)

    def apply(self, key_id: str, x: Tensor, answers: list[Answer], *, escalated: bool = False) -> list[Answer]:
        """``answers`` to ``key_id``'s queries ``x`` as they are sent: the watermarked ones :func:`relabel`-ed, and
        kept first (a watermark that was not kept proves nothing); ``escalated``: the monitor escalated the key."""
        marks = self.marks(key_id, x, [a.label for a in answers], escalated=escalated)
        self.record(key_id, x, answers, marks)
        return [a if m is None else relabel(a, m) for a, m in zip(answers, marks.marks, strict=True)]

    def records(self, key_id: str) -> list[Record]:
        return self.store.records(key_id)

    def close(self) -> None:
        self.store.close()


@dataclass(frozen=True)
class Verdict:
    """What ``ownership_test`` found: the suspect's agreement with the watermark, and how unlikely it is by chance."""

    queries: int  # watermarked queries sent
    classes: int  # K
    agreed: int  # answered with their watermark class
    chance: float  # the rate an independent model is credited with per query
    expected: float  # queries × chance
    count_p_value: float  # the count's binomial tail
    mean_rank: float | None  # the watermark class's mean rank among the suspect's K − 1 others (None: no probabilities)
    rank_p_value: float | None  # the exact tail of the ranks' sum (None: no probabilities)
    p_value: float  # the count's p-value alone, or with the ranks' the smaller of the two, doubled (Bonferroni)
    verdict: str  # "copied" when p_value < ALPHA, else "not shown"
    victim_rate: float  # the victim's mean probability of the watermark classes on those queries
    suspect_rate: float  # the suspect's rate of answering one given other wrong class

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def _one_hot(probabilities: Tensor) -> bool:
    """Whether every row of ``probabilities`` (n, K) puts all its mass on one class: a suspect that answers labels."""
    top = probabilities.argmax(1)
    return torch.equal(probabilities, nn.functional.one_hot(top, probabilities.shape[1]).to(probabilities))


def watermark_ranks(records: list[Record], probabilities: Tensor) -> Tensor:
    """Each record's watermark class's rank (1 = first) among the suspect's classes other than the label the answer
    would have had, by the suspect's ``probabilities`` (n, K). A tie counts against the accusation: the watermark
    class is ranked below every class it ties with."""
    marks = torch.tensor([r.mark for r in records])
    others = torch.ones_like(probabilities, dtype=torch.bool)
    others[torch.arange(len(records)), torch.tensor([r.label for r in records])] = False
    others[torch.arange(len(records)), marks] = False
    at_least = probabilities >= probabilities.gather(1, marks[:, None])
    return (at_least & others).sum(1) + 1


def uniform_sum_cdf(total: int, n: int, m: int) -> float:
    """P(S ≤ ``total``) for S the sum of ``n`` independent ranks, each uniform on 1..``m``: the exact distribution,
    convolved in log space (tails far below 1e-300 stay exact until the last step)."""
    if total < n:
        return 0.0
    log_pmf = np.zeros(1)  # the sum of 0 ranks minus its least value: 0, surely
    width = min(total - n, n * (m - 1)) + 1  # sums above ``total`` never matter
    for _ in range(n):
        grown = np.full((m, len(log_pmf) + m - 1), -np.inf)
        for shift in range(m):
            grown[shift, shift : shift + len(log_pmf)] = log_pmf
        log_pmf = (np.logaddexp.reduce(grown, axis=0) - np.log(m))[:width]
    return float(min(1.0, np.exp(np.logaddexp.reduce(log_pmf))))


def ownership_test(
    records: list[Record],
    suspect: list[int],
    victim_probabilities: Tensor,
    classes: int,
    alpha: float = ALPHA,
    suspect_probabilities: Tensor | None = None,
) -> Verdict:
    """Whether a suspect that answered ``suspect`` (labels; and ``suspect_probabilities``, (n, K), where it gives
    them) to the records' queries repeats their watermark. Two tests of one null hypothesis — a model trained
    without our answers:

    * **the count.** Each query's watermark class is one of the K − 1 classes other than its label, drawn by a
      hash the model never saw, so it answers it with some rate q, independently per query, and the count of
      agreements is Binomial(n, q). q is taken as the largest of :data:`FLOOR`, the victim's own mean probability
      of the watermark classes (``victim_probabilities``, (n, K)), and the suspect's own rate of answering one
      given wrong class other than the watermark's (its answers that are neither the label nor the watermark,
      over n × (K − 2)): an independent model errs the same way towards the watermark class as towards any other.
    * **the ranks** (with probabilities). Given the query, the suspect's probabilities are fixed and the watermark
      class is drawn uniformly from the K − 1 classes other than the label, independently per query (distinct
      fingerprints, a keyed hash): its rank among them (:func:`watermark_ranks`) is uniform on 1..K − 1 whatever
      the suspect is, so the sum of the ranks has an exact distribution and needs no estimated rate. A copy that
      learnt the watermark ranks it high even where its top-1 is the honest label.

    The p-value is the count's P(X ≥ agreed), or, with probabilities, twice the smaller of the two. Probabilities
    that are one-hot on every query are labels: their ranks say what the count says, so the count stands alone
    (whether a suspect answers one-hot is fixed before the watermark classes are drawn, so the choice keeps the
    test's level)."""
    n = len(records)
    if n == 0:
        return Verdict(0, classes, 0, FLOOR, 0.0, 1.0, None, None, 1.0, "not shown", 0.0, 0.0)
    marks = torch.tensor([r.mark for r in records])
    labels = torch.tensor([r.label for r in records])
    answers = torch.tensor(suspect)
    agreed = int((answers == marks).sum())
    other = int(((answers != marks) & (answers != labels)).sum())
    suspect_rate = other / (n * max(classes - 2, 1))
    victim_rate = float(victim_probabilities.gather(1, marks[:, None]).mean())
    chance = max(FLOOR, victim_rate, suspect_rate)
    count_p = float(binom.sf(agreed - 1, n, chance))
    mean_rank = rank_p = None
    p_value = count_p
    if suspect_probabilities is not None and not _one_hot(suspect_probabilities):
        ranks = watermark_ranks(records, suspect_probabilities)
        mean_rank = float(ranks.float().mean())
        rank_p = uniform_sum_cdf(int(ranks.sum()), n, classes - 1)
        p_value = min(1.0, 2 * min(count_p, rank_p))
    return Verdict(
        queries=n,
        classes=classes,
        agreed=agreed,
        chance=chance,
        expected=n * chance,
        count_p_value=count_p,
        mean_rank=mean_rank,
        rank_p_value=rank_p,
        p_value=p_value,
        verdict="copied" if p_value < alpha else "not shown",
        victim_rate=victim_rate,
        suspect_rate=suspect_rate,
    )
