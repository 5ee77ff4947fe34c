"""What two model workers cost each other, as threads of one process and as processes (docs/performance.md, "Fourth
round"): the default server's defense (lenet-mnist, DeepDefense from the warm start, Grad-CAM, the gate) answers
micro-batches of the first MNIST test digits, each size timed (wall clock, one torch thread per worker, as the
server runs them) on one worker alone, on two thread workers at once (``server/workers.py``: the defense and a
replica, each called from its own thread) and on two process workers at once (each a child with a copy, called
over its pipe: the pickling each way is counted).

    python -m deepdefense.measure.worker_kinds --data-root ../shared/data --out docs/results/perf4/worker-kinds.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from deepdefense.common.provenance import provenance
from deepdefense.measure.markdown import module_command
from deepdefense.models.data import load_split
from deepdefense.server.isolation import answer_rows
from deepdefense.server.runtime import build_defense
from deepdefense.server.settings import ServerSettings
from deepdefense.server.workers import ModelWorker, start_workers

SIZES = (1, 4, 16, 32)  # micro-batch sizes: under 32 polite clients the server's run from 1 to about 30
REPEATS = 4  # answers timed per size and worker, after one untimed


def seconds_per_answer(workers: Sequence[ModelWorker], x: Tensor) -> float:
    """Mean wall seconds of one answer of ``x`` while every worker answers it ``REPEATS`` times at once."""
    answer = partial(answer_rows, explain=True)  # as the server's workers are called (a process worker is sent it)

    def one(worker: ModelWorker) -> float:
        worker.run(answer, x)  # untimed: the first answer of a size pays for its allocations
        started = time.perf_counter()
        for _ in range(REPEATS):
            worker.run(answer, x)
        return (time.perf_counter() - started) / REPEATS

    with ThreadPoolExecutor(len(workers)) as pool:
        times = list(pool.map(one, workers))
    return sum(times) / len(times)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default=None, help="data sets in torchvision's layout ($DD_DATA_ROOT)")
    p.add_argument("--out", required=True, help="the record (JSON)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # each worker's share of two cores, as `deepdefense serve` gives it
    settings = ServerSettings(data_root=args.data_root)
    defense = build_defense(settings, settings.checkpoint[0], torch.device("cpu"))
    digits = load_split("mnist", args.data_root, "test")
    x = torch.stack([digits[i][0] for i in range(max(SIZES))])
    kinds = {
        "alone": start_workers(defense, "thread", 1),
        "two threads": start_workers(defense, "thread", 2),
        "two processes": start_workers(defense, "process", 2),
    }
    rows = []
    try:
        for n in tqdm(SIZES, desc="micro-batch sizes", unit="size"):
            row: dict[str, float | int] = {"instances": n}
            for name, workers in kinds.items():
                row[f"{name} ms"] = round(1000 * seconds_per_answer(workers, x[:n]), 1)
            rows.append(row)
    finally:
        for workers in kinds.values():
            for w in workers:
                w.close()
    record = {"command": module_command(__name__, argv), "measured": provenance(), "repeats": REPEATS, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print("| instances | " + " | ".join(f"{k} (ms per micro-batch)" for k in kinds) + " |")
    print("| --- | " + " | ".join("---" for _ in kinds) + " |")
    for row in rows:
        print(f"| {row['instances']} | " + " | ".join(f"{row[f'{k} ms']}" for k in kinds) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
