"""``deepdefense bench``: where the defended service stands, measured in one run on the same inputs.

Paths measured, in this order, each on the same images:

(a) ``undefended`` — the victim's predict + explain (``NoDefense.answer``), one query per call;
(b) ``one-query engine`` — DeepDefense answering one query per call (``batch_size=1``);
(c) ``batched engine`` — DeepDefense answering micro-batches of 1, 8, 32, 64 queries; then, at the largest
    micro-batch, ``batched engine (previous defaults)`` — the engine with ``previous`` options (default
    ``warm_start=false``: the configuration before warm starts, 60 steps from the victim), so that the
    speed-up of the current defaults is measured side by side in one run;
(d) ``server`` — ``deepdefense serve`` started on a free loopback port (micro-batches of the largest
    batch size, admission limit and request timeout lifted so that capacity is measured) under a
    closed loop of 1, 8 and 32 concurrent clients, bounded in requests and seconds
    (``clients.load.run_load``).

For in-process paths a query's latency is its call's wall time divided by the queries in the call
(the queries of a batch finish together); p50/p95 are over calls, queries per second over the whole
phase. Peak memory is the process's resident set size (sampled every 5 ms) on CPU, and
``torch.cuda.max_memory_allocated`` on CUDA; for the server, the server process's peak RSS.

``--model lenet-mnist`` uses the shipped checkpoint and MNIST test images (random images when no
data root is given); ``--model resnet18`` a randomly initialised ResNet-18 at 224 px (17 classes, as
the paper's Flowers-17 victim) with layer sensitivity (eq. 9) computed on 64 random images — fine
for timing, meaningless for accuracy.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Self

import torch
from torch import Tensor
from tqdm import tqdm

from deepdefense.clients.latency import percentiles
from deepdefense.clients.load import rss_mb
from deepdefense.common.provenance import machine
from deepdefense.defense.api import Defense
from deepdefense.defense.loader import load_defense
from deepdefense.measure.markdown import document, table

MODELS = ("lenet-mnist", "resnet18")
#: A row's figures, in the order of the report's columns after the setup and its queries per call or clients.
FIGURES = ("queries", "ms_per_query_p50", "ms_per_query_p95", "queries_per_second", "peak_memory_mb")
#: The setup of the arm with the previous defaults (``BenchConfig.previous``).
PREVIOUS = "batched engine (previous defaults)"


@dataclass
class Row:
    """One measured setup: in-process (``queries_per_call`` set) or through the server (``clients`` set)."""

    setup: str  # "undefended", "one-query engine", "batched engine" or "server"
    queries_per_call: int | None  # in-process: queries per answer call (a micro-batch)
    clients: int | None  # server: concurrent closed-loop clients
    queries: int
    ms_per_query_p50: float
    ms_per_query_p95: float
    queries_per_second: float
    peak_memory_mb: float
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass
class BenchConfig:
    model: str = "lenet-mnist"
    interpreter: str = "gradcam"
    device: str = "cpu"
    data_root: str | None = None
    queries: int = 64  # per in-process phase (rounded up to whole batches)
    one_query_queries: int = 16  # the one-query engine is slow: fewer queries
    batch_sizes: tuple[int, ...] = (1, 8, 32, 64)
    clients: tuple[int, ...] = (1, 8, 32)
    duration_s: float = 30.0  # per server phase
    max_requests: int = 2000  # per server phase
    server: bool = True
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)  # engine options (--set)
    previous: dict[str, Any] | None = field(default_factory=lambda: {"warm_start": False})  # None: no such arm


class PeakMemory:
    """Peak memory over a ``with`` block: CUDA allocator peak, or this process's sampled RSS."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mb = 0.0

    def __enter__(self) -> Self:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._stop = threading.Event()
            self.peak_mb = process_rss_mb()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak_mb = max(self.peak_mb, process_rss_mb())

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self.peak_mb, process_rss_mb())


def process_rss_mb(pid: int | None = None) -> float:
    """Resident set size of a process (this one by default) in MiB; 0 where it cannot be read."""
    return rss_mb(pid or os.getpid()) or 0.0


def measure(
    setup: str,
    answer: Callable[[Tensor], object],
    images: Tensor,
    batch: int,
    device: torch.device,
    notes: dict[str, Any] | None = None,
) -> Row:
    """``answer`` called on consecutive batches of ``images``: per-query milliseconds of each call (p50, p95),
    queries per second over them all, and the peak memory."""
    answer(images[:batch])  # warm-up: first-call allocations, kernel selection
    with PeakMemory(device) as memory:
        per_query, started = [], time.perf_counter()
        for start in tqdm(range(0, len(images), batch), desc=f"{setup} ×{batch}", unit="call", leave=False):
            x = images[start : start + batch]
            began = time.perf_counter()
            answer(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            per_query.append(1000 * (time.perf_counter() - began) / len(x))
        seconds = time.perf_counter() - started
    p = percentiles(per_query)
    figures = (round(p["p50"], 2), round(p["p95"], 2), round(len(images) / seconds, 2), round(memory.peak_mb, 1))
    return Row(setup, batch, None, len(images), *figures, notes or {})


# -- victims -------------------------------------------------------------------------------------------


@contextmanager
def victim(config: BenchConfig) -> Iterator[tuple[str, Tensor]]:
    """The checkpoint to serve (name or metadata path) and the bench's input images (on CPU)."""
    generator = torch.Generator().manual_seed(config.seed)
    n = max(config.queries, max(config.batch_sizes), config.one_query_queries)
    n = -(-n // max(config.batch_sizes)) * max(config.batch_sizes)
    if config.model == "lenet-mnist":
        yield "lenet-mnist", _mnist_or_random(config.data_root, n, generator)
        return
    if config.model != "resnet18":
        raise ValueError(f"unknown bench model {config.model!r}; known: {', '.join(MODELS)}")
    with tempfile.TemporaryDirectory(prefix="dd-bench-") as folder:
        yield str(random_resnet18(Path(folder), config.seed)), torch.rand((n, 3, 224, 224), generator=generator)


def _mnist_or_random(data_root: str | None, n: int, generator: torch.Generator) -> Tensor:
    if data_root:
        from deepdefense.models.data import load_split

        return load_split("mnist", data_root, "test").tensors[0][:n]
    return torch.rand((n, 1, 28, 28), generator=generator)


def random_resnet18(folder: Path, seed: int) -> Path:
    """A randomly initialised ResNet-18 at 224 px saved as a checkpoint, sensitivity stored (eq. 9)."""
    from deepdefense.defense.sensitivity import layer_sensitivity
    from deepdefense.models.checkpoint import CheckpointMeta, build_model, save_checkpoint

    meta = CheckpointMeta(
        arch="resnet18",
        dataset="random",
        classes=[str(i) for i in range(17)],
        input_shape=[3, 224, 224],
        mean=[0.485, 0.456, 0.406],
        std=[0.229, 0.224, 0.225],
        test_accuracy=0.0,
        seed=seed,
        command="deepdefense bench --model resnet18",
    )
    torch.manual_seed(seed)
    model = build_model(meta).eval()
    images = torch.rand((64, 3, 224, 224), generator=torch.Generator().manual_seed(seed))
    scores = layer_sensitivity(model, images, batch_size=8)
    meta.extra["sensitivity"] = {"n": 64, "seed": seed, "split": "uniform random", "scores": scores}
    return save_checkpoint(model, meta, folder / "resnet18-random")


# -- the run -------------------------------------------------------------------------------------------------


def run_bench(config: BenchConfig, progress: Callable[[str], None] = print) -> dict[str, Any]:
    from deepdefense.common.device import resolve_device

    device = resolve_device(config.device)
    rows: list[Row] = []
    with victim(config) as (checkpoint, images):
        images = images.to(device)
        engine = dict(config.options)

        def defense(name: str, **options: Any) -> Defense:
            return load_defense(
                checkpoint, name, config.interpreter, device=device, data_root=config.data_root, **options
            )[0]

        progress("(a) undefended predict + explain")
        rows.append(measure("undefended", defense("none").answer, images[: config.queries], 1, device))
        progress("(b) one-query engine")
        one = defense("deepdefense", **{**engine, "batch_size": 1})
        notes = {"layers": one.layers, "steps": one.config.steps}
        rows.append(measure("one-query engine", one.answer, images[: config.one_query_queries], 1, device, notes))
        for b in config.batch_sizes:
            progress(f"(c) batched engine, batch {b}")
            batched = defense("deepdefense", **{**engine, "batch_size": b})
            n = max(config.queries, b) if b > 1 else config.one_query_queries
            rows.append(measure("batched engine", batched.answer, images[: -(-n // b) * b], b, device))
        if config.previous is not None:
            b = max(config.batch_sizes)
            progress(f"(c) batched engine with the previous defaults {config.previous}, batch {b}")
            old = defense("deepdefense", **{**engine, **config.previous, "batch_size": b})
            n = -(-max(config.queries, b) // b) * b
            notes = {"options": config.previous, "steps": old.config.steps}
            rows.append(measure(PREVIOUS, old.answer, images[:n], b, device, notes))
        if config.server:
            rows += server_rows(checkpoint, config, device, progress)
    setup = {"model": config.model, "interpreter": config.interpreter, "device": machine(device).describe()}
    measured = {"engine_options": config.options, "rows": [asdict(r) for r in rows], "ratios": ratios(rows)}
    return setup | measured | {"config": {k: v for k, v in asdict(config).items() if k != "options"}}


def server_rows(
    checkpoint: str, config: BenchConfig, device: torch.device, progress: Callable[[str], None]
) -> list[Row]:
    """(d): ``deepdefense serve`` on loopback under closed-loop load, one phase per client count."""
    from deepdefense.clients.load import LoadConfig, run_load
    from deepdefense.measure.launcher import spawn_serve

    env = {
        **os.environ,
        "DD_CHECKPOINT": checkpoint,
        "DD_DEFENSE": "deepdefense",
        "DD_INTERPRETER": config.interpreter,
        "DD_DEVICE": str(device),
        "DD_MAX_BATCH_SIZE": str(max(config.batch_sizes)),
        "DD_QUEUE_SIZE": str(4 * max(max(config.clients), max(config.batch_sizes))),
        "DD_ENGINE": json.dumps(config.options),
        "DD_LOG_LEVEL": "warning",
        # capacity, not admission control: every request of the closed loop is admitted and waited for
        "DD_MAX_EXPECTED_LATENCY_S": "3600",
        "DD_REQUEST_TIMEOUT_S": "3600",
    }
    for key in ("DD_API_KEYS", "DD_API_KEYS_FILE", "DD_QUERY_BUDGET"):
        env.pop(key, None)
    rows = []
    with spawn_serve(env) as (url, process, _):
        for clients in config.clients:
            progress(f"(d) server, {clients} concurrent clients")
            limits = {"duration_s": config.duration_s, "max_requests": config.max_requests, "seed": config.seed}
            report = asyncio.run(run_load(LoadConfig(url=url, clients=clients, server_pid=process.pid, **limits)))
            latency, peak = report.latency_ms, report.rss_mb.get("peak", process_rss_mb(process.pid))
            p50, p95 = (latency.get(p, float("nan")) for p in ("p50", "p95"))
            notes = {"p99_ms": latency.get("p99"), "errors": report.errors, "statuses": report.statuses}
            notes["rss_mb"] = report.rss_mb
            rows.append(Row("server", None, clients, report.served, p50, p95, report.throughput_rps, peak, notes))
    return rows


def ratios(rows: list[Row]) -> dict[str, float]:
    """Throughput ratios against the one-query engine (and the undefended path)."""

    qps: dict[tuple[str, int | None], float] = {}
    for r in rows:  # the first row of a setup and batch
        qps.setdefault((r.setup, r.queries_per_call), r.queries_per_second)
    one, undefended = qps.get(("one-query engine", 1)), qps.get(("undefended", 1))
    out = {
        f"{r.setup} ×{r.queries_per_call or r.clients} / one-query engine": round(r.queries_per_second / one, 2)
        for r in rows
        if r.setup in ("batched engine", "server") and one
    }
    if one and undefended:
        out["undefended / one-query engine"] = round(undefended / one, 2)
    old = next((r for r in rows if r.setup == PREVIOUS), None)
    new = qps.get(("batched engine", old.queries_per_call)) if old is not None and old.queries_per_call else None
    if old is not None and new:
        b = old.queries_per_call
        out[f"batched engine ×{b} / previous defaults ×{b}"] = round(new / old.queries_per_second, 2)
    return out


def markdown(result: dict[str, Any], command: str) -> str:
    lines = [
        f"Model `{result['model']}`, {result['interpreter']}, on {result['device']}.",
        "",
        f"Command: `{command}`",
        "",
        *table(
            "setup | queries per call / clients | queries | ms/query p50 | ms/query p95 | queries/s | "
            "peak memory (MiB)",
            ((r["setup"], r["queries_per_call"] or r["clients"], *(r[k] for k in FIGURES)) for r in result["rows"]),
        ),
        "",
        *table(["ratio of queries per second", "value"], result["ratios"].items()),
    ]
    return document(lines)
