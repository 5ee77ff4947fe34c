"""``deepdefense load``: load and soak test of a server on loopback (``clients.load``); with ``--serve``
the launcher starts ``deepdefense serve`` for the run and stops it with SIGTERM at the end."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from deepdefense import flags
from deepdefense.clients.load import MAX_CLIENTS, MAX_DURATION_S, MAX_REQUESTS, LoadConfig

HELP = (
    "load and soak test a server on loopback: concurrent clients for a bounded time; statuses, error classes, "
    "latency percentiles, resident-memory growth"
)
DESCRIPTION = (
    "See docs/reliability.md. With --serve, 'deepdefense serve' is started (configured by DD_* variables) "
    "and stopped with SIGTERM at the end."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="a running server (loopback only)")
    p.add_argument(
        "--serve",
        action="store_true",
        help="start 'deepdefense serve' (configured by DD_* variables) on a free loopback port, run the "
        "load against it, then stop it with SIGTERM; --url is ignored",
    )
    p.add_argument("--clients", type=int, default=32, help=f"concurrent clients (at most {MAX_CLIENTS})")
    p.add_argument("--duration", type=float, default=120.0, help=f"seconds of load (at most {MAX_DURATION_S:g})")
    p.add_argument("--max-requests", type=int, default=100_000, help=f"requests in all (at most {MAX_REQUESTS})")
    p.add_argument("--instances", type=int, default=1, help="instances per request")
    p.add_argument("--no-explain", dest="explain", action="store_false", help="ask for predictions only")
    p.add_argument("--timeout", type=float, default=60.0, help="client-side seconds per request")
    p.add_argument(
        "--ignore-retry-after",
        dest="honour_retry_after",
        action="store_false",
        help="retry a 503 at once instead of after its Retry-After",
    )
    p.add_argument("--server-pid", type=int, default=None, help="sample this process's resident memory")
    flags.add_api_key_file(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the images sent and the retry jitter")
    p.add_argument(
        "--progress-every",
        type=float,
        default=10.0,
        help="seconds between progress lines on stderr (requests, served, errors so far); 0: none",
    )
    flags.add_out(p)


def run(args: argparse.Namespace) -> int:
    from deepdefense.clients.load import run_load
    from deepdefense.clients.oracle import read_api_key
    from deepdefense.measure.launcher import spawn_serve

    def config(url: str, pid: int | None) -> LoadConfig:
        return LoadConfig(
            url=url,
            clients=args.clients,
            duration_s=args.duration,
            max_requests=args.max_requests,
            instances=args.instances,
            explain=args.explain,
            timeout_s=args.timeout,
            honour_retry_after=args.honour_retry_after,
            seed=args.seed,
            api_key=read_api_key(args.api_key_file),
            server_pid=pid,
            progress_every_s=args.progress_every,
        )

    if args.serve:
        with spawn_serve(dict(os.environ), log=sys.stderr) as (url, process, shutdown):
            report = asyncio.run(run_load(config(url, process.pid)))
        report.shutdown = shutdown
    else:
        report = asyncio.run(run_load(config(args.url, args.server_pid)))
    return flags.print_report({"command": args.command_line, **report.as_dict()}, args.out)
