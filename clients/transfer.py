"""The attacker's transfer set {(x_i, f(x_i), I(x_i))} (DeepDefense §3) on disk, written as it is collected.

A store is a folder of append-only shards (``shard-000000.safetensors``, …) and ``manifest.json``,
which lists the committed shards and the fingerprint of the attack that made them. A shard is
written to a temporary file and renamed, then the manifest is replaced the same way, so a crash or
Ctrl-C at any point leaves the store at its last committed shard; a shard written but not yet listed
is simply written again. Opening a store made by a different attack (another fingerprint) is refused,
so answers of different servers or query plans are never mixed.

A store that does not read back as it was written is refused with :class:`TransferStoreError`, which
names the store and what is wrong, never read in part: a ``manifest.json`` that is not JSON or not of
the shape above, a shard it lists that is missing or unreadable, or whose tensors disagree with its
entry (count, keys, shapes) or with the other shards; shards in a folder without a manifest. The
manifest, the shard headers and the counts are checked when the store is opened, before any query
is sent on the strength of them; each shard's SHA-256 (recorded in its entry) when it is loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load, save, save_file
from torch import Tensor
from tqdm import tqdm

from deepdefense.clients.oracle import Oracle, OracleReply

_MANIFEST = "manifest.json"
_SHARD = "shard-{:06d}.safetensors"
_REQUIRED = ("images", "labels", "probabilities")  # and "attributions" in every shard or in none


class TransferStoreError(ValueError):
    """A transfer-set store that cannot be read back as it was written; the message names the store."""

    def __init__(self, root: Path, problem: str) -> None:
        super().__init__(f"transfer set {root}: {problem}")
        self.root = root
        self.problem = problem


@dataclass
class TransferSet:
    """Queries and the oracle's answers, in query order."""

    images: Tensor  # (N, C, H, W)
    labels: Tensor  # (N,)
    probabilities: Tensor  # (N, K)
    attributions: Tensor | None  # (N, H, W)
    rounds: Tensor  # (N,) the JBDA round that produced each query (0 for sampled queries)

    def __len__(self) -> int:
        return len(self.labels)

    def prefix(self, n: int) -> TransferSet:
        """The first ``n`` answers. A set of fewer is refused: what is trained on it would be reported under a budget
        of ``n`` it never had."""
        if len(self) < n:
            raise ValueError(f"the transfer set holds {len(self)} answers, fewer than the {n} asked for")
        return self.select(slice(0, n))

    def select(self, rows: slice | Tensor) -> TransferSet:
        """The answers at ``rows`` (a slice, indices or a boolean mask), in query order."""
        maps = self.attributions[rows] if self.attributions is not None else None
        return TransferSet(self.images[rows], self.labels[rows], self.probabilities[rows], maps, self.rounds[rows])


def fingerprint_digest(fingerprint: dict[str, Any]) -> str:
    """12 hex digits identifying an attack's query plan and oracle."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:12]


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class TransferStore:
    """An append-only transfer set in ``root``; ``fingerprint`` must match the stored one."""

    def __init__(self, root: str | os.PathLike[str], fingerprint: dict[str, Any]) -> None:
        self.root = Path(root)
        self.fingerprint = json.loads(json.dumps(fingerprint))  # as it reads back from JSON
        manifest = self.root / _MANIFEST
        if manifest.is_file():
            stored = self._read_manifest(manifest)
            if stored["fingerprint"] != self.fingerprint:
                differ = sorted(
                    k
                    for k in {*stored["fingerprint"], *self.fingerprint}
                    if stored["fingerprint"].get(k) != self.fingerprint.get(k)
                )
                raise TransferStoreError(
                    self.root,
                    f"collected by another attack (differs in: {', '.join(differ)}); choose another --store",
                )
            self.shards: list[dict[str, Any]] = stored["shards"]
            self._check_shards()
        else:
            strays = sorted(p.name for p in self.root.glob("shard-*.safetensors"))
            if strays:
                raise TransferStoreError(
                    self.root,
                    f"holds {len(strays)} shard file(s) ({strays[0]}, ...) but no {_MANIFEST}; "
                    "they would be overwritten, so the folder is not used as a new store",
                )
            self.root.mkdir(parents=True, exist_ok=True)
            self.shards = []
            self._write_manifest()

    @classmethod
    def existing(cls, root: str | os.PathLike[str]) -> TransferStore:
        """The store already in ``root``, whatever attack collected it (the fingerprint its manifest holds): for
        reading a collected set back. A folder without a manifest is refused, never made a new store."""
        manifest = Path(root) / _MANIFEST
        if not manifest.is_file():
            raise TransferStoreError(Path(root), f"holds no {_MANIFEST}: not a transfer-set store")
        return cls(root, json.loads(manifest.read_text())["fingerprint"])

    def _read_manifest(self, path: Path) -> dict[str, Any]:
        """``manifest.json`` parsed and checked for shape: ``fingerprint`` an object, ``shards`` a list of
        ``{"file": "shard-<i>.safetensors", "count": int >= 0, "round": int >= 0[, "sha256": hex]}`` in order."""
        try:
            stored = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise TransferStoreError(self.root, f"{_MANIFEST} is not valid JSON ({err})") from err

        def bad(what: str) -> TransferStoreError:
            return TransferStoreError(self.root, f"{_MANIFEST} is malformed: {what}")

        if not isinstance(stored, dict):
            raise bad(f"expected an object, found {type(stored).__name__}")
        missing = [k for k in ("fingerprint", "shards") if k not in stored]
        if missing:
            raise bad(f"missing key(s) {', '.join(missing)}")
        if not isinstance(stored["fingerprint"], dict):
            raise bad(f"'fingerprint' must be an object, found {type(stored['fingerprint']).__name__}")
        if not isinstance(stored["shards"], list):
            raise bad(f"'shards' must be a list, found {type(stored['shards']).__name__}")
        for i, entry in enumerate(stored["shards"]):
            where = f"shards[{i}]"
            if not isinstance(entry, dict):
                raise bad(f"{where} must be an object, found {type(entry).__name__}")
            lacking = [k for k in ("file", "count", "round") if k not in entry]
            if lacking:
                raise bad(f"{where} is missing key(s) {', '.join(lacking)}")
            if entry["file"] != _SHARD.format(i):
                # append names the next shard by position: any other name would be overwritten or skipped
                raise bad(f"{where}.file is {entry['file']!r}, expected {_SHARD.format(i)!r}")
            for key in ("count", "round"):
                value = entry[key]
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise bad(f"{where}.{key} must be a whole number >= 0, found {value!r}")
            if "sha256" in entry and not (
                isinstance(entry["sha256"], str) and re.fullmatch(r"[0-9a-f]{64}", entry["sha256"])
            ):
                raise bad(f"{where}.sha256 must be 64 lowercase hex digits, found {entry['sha256']!r}")
        return stored

    def _check_shards(self) -> None:
        """Every listed shard is present, its header readable, and its tensors agree with its entry
        (count) and with the first shard (keys, shapes after the first dimension). Reads headers only."""
        first: dict[str, list[int]] | None = None
        for entry in self.shards:
            path = self.root / entry["file"]
            if not path.is_file():
                raise TransferStoreError(self.root, f"shard {entry['file']} is listed in {_MANIFEST} but missing")
            try:
                with safe_open(str(path), "pt") as fh:
                    shapes = {k: list(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118
            except SafetensorError as err:
                raise TransferStoreError(self.root, f"shard {entry['file']} is corrupt ({err})") from err
            self._check_shard(entry, shapes, first)
            first = first or shapes

    def _check_shard(
        self, entry: dict[str, Any], shapes: dict[str, list[int]], first: dict[str, list[int]] | None
    ) -> None:
        name = entry["file"]
        lacking = [k for k in _REQUIRED if k not in shapes]
        if lacking:
            raise TransferStoreError(self.root, f"shard {name} lacks tensor(s) {', '.join(lacking)}")
        for key, shape in shapes.items():
            if not shape or shape[0] != entry["count"]:
                rows = shape[0] if shape else "no"
                raise TransferStoreError(
                    self.root, f"shard {name} holds {rows} rows of {key}, its {_MANIFEST} entry counts {entry['count']}"
                )
        if first is None:
            return
        if ("attributions" in shapes) != ("attributions" in first):
            has = "has" if "attributions" in shapes else "has no"
            raise TransferStoreError(
                self.root,
                f"shard {name} {has} attribution maps, unlike {self.shards[0]['file']}; maps would be dropped",
            )
        for key, shape in shapes.items():
            if key in first and shape[1:] != first[key][1:]:
                raise TransferStoreError(
                    self.root,
                    f"shard {name} has {key} of shape [*, {', '.join(map(str, shape[1:]))}], "
                    f"{self.shards[0]['file']} [*, {', '.join(map(str, first[key][1:]))}]",
                )

    def __len__(self) -> int:
        return sum(s["count"] for s in self.shards)

    def count(self, round_: int) -> int:
        """Queries stored for JBDA round ``round_``."""
        return sum(s["count"] for s in self.shards if s["round"] == round_)

    def append(self, x: Tensor, reply: OracleReply, round_: int = 0) -> None:
        """Commit one batch of queries with their answers."""
        tensors = {
            "images": x.detach().cpu().float().contiguous(),
            "labels": reply.labels.cpu(),
            "probabilities": reply.probabilities.cpu().float().contiguous(),
        }
        if reply.attributions is not None:
            tensors["attributions"] = reply.attributions.cpu().float().contiguous()
        name = _SHARD.format(len(self.shards))
        data = save(tensors)
        _atomic_write(self.root / name, lambda p: p.write_bytes(data))
        self.shards.append({"file": name, "count": len(x), "round": round_, "sha256": hashlib.sha256(data).hexdigest()})
        self._write_manifest()

    def load(self) -> TransferSet:
        """Every committed query, in the order they were sent; :class:`TransferStoreError` if there are
        none (every caller trains or measures on them) or a shard does not read back as written."""
        if not self.shards:
            raise TransferStoreError(self.root, "holds no queries (nothing has been collected into it)")
        parts: list[dict[str, Tensor]] = []
        for entry in self.shards:
            parts.append(self._load_shard(entry, {k: list(t.shape) for k, t in parts[0].items()} if parts else None))
        cat = {k: torch.cat([p[k] for p in parts]) for k in _REQUIRED}
        maps = torch.cat([p["attributions"] for p in parts]) if "attributions" in parts[0] else None
        rounds = torch.cat([torch.full((s["count"],), s["round"], dtype=torch.long) for s in self.shards])
        return TransferSet(cat["images"], cat["labels"], cat["probabilities"], maps, rounds)

    def _load_shard(self, entry: dict[str, Any], first: dict[str, list[int]] | None) -> dict[str, Tensor]:
        name = entry["file"]
        try:
            data = (self.root / name).read_bytes()
        except FileNotFoundError as err:
            raise TransferStoreError(self.root, f"shard {name} is listed in {_MANIFEST} but missing") from err
        if "sha256" in entry and hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise TransferStoreError(self.root, f"shard {name} is corrupt (its SHA-256 differs from {_MANIFEST})")
        try:
            tensors = load(data)
        except SafetensorError as err:
            raise TransferStoreError(self.root, f"shard {name} is corrupt ({err})") from err
        self._check_shard(entry, {k: list(t.shape) for k, t in tensors.items()}, first)
        return tensors

    def plan(self, name: str, make: Callable[[], Tensor]) -> Tensor:
        """The queries planned under ``name``: read back when stored, else made and stored first, so
        that a resumed run sends exactly the queries the interrupted one would have sent."""
        path = self.root / f"plan-{name}.safetensors"
        if path.is_file():
            try:
                x = load(path.read_bytes()).get("x")
            except SafetensorError as err:
                raise TransferStoreError(self.root, f"{path.name} is corrupt ({err})") from err
            if x is None:
                raise TransferStoreError(self.root, f"{path.name} holds no tensor 'x'")
            return x
        x = make().detach().cpu().float().contiguous()
        _atomic_write(path, lambda p: save_file({"x": x}, str(p)))
        return x

    def _write_manifest(self) -> None:
        text = json.dumps({"fingerprint": self.fingerprint, "shards": self.shards}, indent=1) + "\n"
        _atomic_write(self.root / _MANIFEST, lambda p: p.write_text(text))


def collect(
    oracle: Oracle,
    store: TransferStore,
    queries: Tensor,
    *,
    round_: int = 0,
    batch_size: int = 16,
    progress: bool = True,
) -> int:
    """Send the queries of ``round_`` not yet stored, ``batch_size`` at a time, committing each batch
    as soon as it is answered; returns how many were sent. Maps are always asked for, so one
    transfer set serves every attack loss."""
    start = store.count(round_)
    todo = queries[start:]
    bar = tqdm(total=len(queries), initial=start, desc=f"queries (round {round_})", unit="query", disable=not progress)
    with bar, deferred_interrupt() as interrupted:
        for begin in range(0, len(todo), batch_size):
            batch = todo[begin : begin + batch_size]
            store.append(batch, oracle.query(batch, explain=True), round_)
            bar.update(len(batch))
            if interrupted.is_set():
                raise KeyboardInterrupt
    return len(todo)


@contextmanager
def deferred_interrupt() -> Iterator[threading.Event]:
    """Hold a first Ctrl-C (SIGINT) until the caller checks the event, so that a request already
    answered (and paid for) is stored before the program stops; a second one stops at once. Only
    the main thread can take signals; in other threads this does nothing."""
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield event
        return

    def hold(signum: int, frame: object) -> None:
        if event.is_set():
            raise KeyboardInterrupt
        event.set()

    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield event
    finally:
        signal.signal(signal.SIGINT, previous)
