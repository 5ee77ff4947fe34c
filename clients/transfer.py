"""The attacker's transfer set {(x_i, f(x_i), I(x_i))} (DeepDefense §3) on disk, written as it is collected.

A store is a folder of append-only shards (``shard-000000.safetensors``, …) and ``manifest.json``,
which lists the committed shards and the fingerprint of the attack that made them. A shard is
written to a temporary file and renamed, then the manifest is replaced the same way, so a crash or
Ctrl-C at any point leaves the store at its last committed shard; a shard written but not yet listed
is simply written again. Opening a store made by a different attack (another fingerprint) is refused,
so answers of different servers or query plans are never mixed.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm import tqdm

from clients.oracle import Oracle, OracleReply

_MANIFEST = "manifest.json"


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
        maps = self.attributions[:n] if self.attributions is not None else None
        return TransferSet(self.images[:n], self.labels[:n], self.probabilities[:n], maps, self.rounds[:n])


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
            stored = json.loads(manifest.read_text())
            if stored["fingerprint"] != self.fingerprint:
                differ = sorted(
                    k
                    for k in {*stored["fingerprint"], *self.fingerprint}
                    if stored["fingerprint"].get(k) != self.fingerprint.get(k)
                )
                raise ValueError(
                    f"transfer set {self.root} was collected by another attack (differs in: "
                    f"{', '.join(differ)}); choose another --store"
                )
            self.shards: list[dict[str, Any]] = stored["shards"]
        else:
            self.root.mkdir(parents=True, exist_ok=True)
            self.shards = []
            self._write_manifest()

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
        name = f"shard-{len(self.shards):06d}.safetensors"
        _atomic_write(self.root / name, lambda p: save_file(tensors, str(p)))
        self.shards.append({"file": name, "count": len(x), "round": round_})
        self._write_manifest()

    def load(self) -> TransferSet:
        """Every committed query, in the order they were sent."""
        parts = [load_file(str(self.root / s["file"])) for s in self.shards]
        if not parts:
            raise ValueError(f"transfer set {self.root} is empty")
        cat = {k: torch.cat([p[k] for p in parts]) for k in ("images", "labels", "probabilities")}
        maps = torch.cat([p["attributions"] for p in parts]) if all("attributions" in p for p in parts) else None
        rounds = torch.cat([torch.full((s["count"],), s["round"], dtype=torch.long) for s in self.shards])
        return TransferSet(cat["images"], cat["labels"], cat["probabilities"], maps, rounds)

    def plan(self, name: str, make: Callable[[], Tensor]) -> Tensor:
        """The queries planned under ``name``: read back when stored, else made and stored first, so
        that a resumed run sends exactly the queries the interrupted one would have sent."""
        path = self.root / f"plan-{name}.safetensors"
        if path.is_file():
            return load_file(str(path))["x"]
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
