"""``deepdefense bench``: where the defended service stands (the harness is :mod:`measure.bench`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from deepdefense import flags
from deepdefense.common.options import key_values

HELP = (
    "benchmark: undefended path, one-query engine, batched engine, and the server under 1/8/32 concurrent "
    "clients; ms/query, queries/s, peak memory, ratios"
)
DESCRIPTION = "See docs/performance.md and measure/bench.py."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="lenet-mnist",
        choices=["lenet-mnist", "resnet18"],
        help="lenet-mnist (shipped) or resnet18 (random weights, 224 px)",
    )
    p.add_argument("--interpreter", default="gradcam", help="attribution method: gradcam, gradinput, relevancecam")
    flags.add_device(p)
    flags.add_data_root(p, " (MNIST test images for lenet-mnist; random images without)")
    p.add_argument("--queries", type=int, default=64, help="queries per in-process phase")
    p.add_argument("--one-query-queries", type=int, default=16, help="queries for the one-query engine")
    p.add_argument("--batch-sizes", default="1,8,32,64", help="batched-engine micro-batch sizes")
    p.add_argument("--clients", default="1,8,32", help="concurrent clients of the server phases")
    p.add_argument("--duration", type=float, default=30.0, help="seconds per server phase")
    p.add_argument("--max-requests", type=int, default=2000, help="requests per server phase")
    p.add_argument("--no-server", dest="server", action="store_false", help="skip the server phases")
    flags.add_engine_options(p)
    p.add_argument(
        "--previous",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="engine options of the 'previous defaults' arm, measured at the largest batch size beside the current "
        "defaults (default: warm_start=false, the 60-step cold configuration); --previous none: no such arm",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the images drawn and of the engine")
    p.add_argument(
        "--gate-latency",
        action="store_true",
        help="instead: the misinformation gate's latency, plain vs gated servers of deepdefense and none "
        "(docs/results/gate-latency.md); --queries requests of each kind per server",
    )
    flags.add_out(p, report="docs/results/bench-lenet-mnist-cpu.md")


def run(args: argparse.Namespace) -> int:
    if args.gate_latency:
        return _gate_latency(args)
    from deepdefense.measure.bench import BenchConfig, markdown, run_bench

    config = BenchConfig(
        model=args.model,
        interpreter=args.interpreter,
        device=args.device,
        data_root=args.data_root,
        queries=args.queries,
        one_query_queries=args.one_query_queries,
        batch_sizes=flags.sizes(args.batch_sizes),
        clients=flags.sizes(args.clients),
        duration_s=args.duration,
        max_requests=args.max_requests,
        server=args.server,
        seed=args.seed,
        options=flags.engine_options(args.engine),
        previous=_previous(args.previous),
    )
    return _report(args, run_bench(config, progress=_progress), markdown)


def _previous(pairs: list[str] | None) -> dict[str, Any] | None:
    """``--previous`` as engine options; the default arm (warm_start=false) when not given, None for ``none``."""
    if pairs is None:
        return {"warm_start": False}
    return None if pairs == ["none"] else key_values(pairs, "--previous")


def _gate_latency(args: argparse.Namespace) -> int:
    from deepdefense.measure.gate_latency import GateLatencyConfig, markdown, run_gate_latency

    if args.model != "lenet-mnist":
        raise SystemExit("--gate-latency: only lenet-mnist ships a domain score and a misinformation model")
    config = GateLatencyConfig(
        checkpoint=args.model,
        interpreter=args.interpreter,
        n=args.queries,
        seed=args.seed,
        device=args.device,
        data_root=args.data_root,
    )
    return _report(args, run_gate_latency(config, progress=_progress), markdown)


def _progress(message: str) -> None:
    print(message, file=sys.stderr)


def _report(args: argparse.Namespace, measured: dict[str, Any], markdown: Callable[[dict[str, Any], str], str]) -> int:
    """Print the Markdown table (and write it: ``--report``), and print (and write: ``--out``) the JSON."""
    result = {"command": args.command_line, **measured}
    table = markdown(result, args.command_line)
    print(table, file=sys.stderr)
    out, report = flags.out_paths(args)
    if report:
        report.write_text(table)
    return flags.print_report(result, out)
