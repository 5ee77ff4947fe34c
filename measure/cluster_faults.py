"""The replica-kill fault of cluster mode (``docs/results/scaling/kill.sh``, docs/scaling.md): closed-loop
load (``clients.load.run_load``) against ``deepdefense serve --replicas 2``; after ``--kill-after`` seconds
one Serve replica's worker process (``ray::ServeReplica:…`` in ``ps``) gets SIGKILL. Records every status
the clients saw (by ``run_load``'s error classes: a 503 without Retry-After or a JSON body, a transport
error or a client timeout shows there), the seconds until Serve reports the deployment healthy with 2
running replicas again, and the budget spent in Redis against the 200 answers.

``python -m deepdefense.measure.cluster_faults --url URL --redis redis://… --out kill.json`` (key in
$DD_CLIENT_API_KEY)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import httpx
import redis

from deepdefense.clients.load import LoadConfig, run_load
from deepdefense.server.auth import key_id
from deepdefense.server.budget import budget_key
from deepdefense.server.keystore import KEY_ID, redis_secret

REPLICA_TITLE = "ServeReplica:deepdefense:DeepDefense"


def replica_pids() -> list[int]:
    """PIDs of the running Serve replica workers of the ``deepdefense`` application (from ``ps``)."""
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True, check=True).stdout
    return sorted(int(line.split()[0]) for line in out.splitlines() if REPLICA_TITLE in line and "ps -eo" not in line)


def serve_running_replicas() -> tuple[str, int] | None:
    """(deployment status, running replicas) from Ray Serve's controller; None when it cannot be asked."""
    try:
        from ray import serve

        status = serve.status().applications["deepdefense"].deployments["DeepDefense"]
        return str(getattr(status.status, "value", status.status)), int(status.replica_states.get("RUNNING", 0))
    except Exception:  # the controller unreachable: recorded as None
        return None


def killer(kill_after_s: float, deadline_s: float, record: dict[str, Any]) -> None:
    """Wait, SIGKILL one replica worker, then poll until 2 replicas are healthy again (or the deadline)."""
    time.sleep(kill_after_s)
    before = replica_pids()
    record["replica_pids_before"] = before
    if not before:
        record["kill"] = "no ServeReplica process found"
        return
    victim = before[0]
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    record |= {"killed_pid": victim, "killed_at_s": kill_after_s}
    while time.monotonic() - killed_at < deadline_s:
        pids = replica_pids()
        serve_state = serve_running_replicas()
        # without the controller's answer: 2 replica workers, the killed one not among them
        healthy = serve_state == ("HEALTHY", 2) if serve_state is not None else len(pids) == 2
        if healthy and victim not in pids and len(pids) == 2:
            record["restart_s"] = round(time.monotonic() - killed_at, 1)
            record["replica_pids_after"] = pids
            record["serve_status_after"] = (
                {"deployment": serve_state[0], "running_replicas": serve_state[1]} if serve_state else "not asked"
            )
            return
        time.sleep(0.5)
    record |= {"restart_s": None, "restart": f"not back to 2 healthy replicas within {deadline_s:g} s"}
    record |= {"replica_pids_after": replica_pids(), "serve_status_after": serve_running_replicas()}


def record_unexpected(samples: list[dict[str, Any]], started: float) -> None:
    """Wrap ``httpx.AsyncClient.post`` (what ``run_load`` sends with) to keep, for every answer that is not
    200 or 503, its time since the start, status, headers and the first 300 characters of its body."""
    post = httpx.AsyncClient.post

    async def recording_post(self: httpx.AsyncClient, *args: Any, **kwargs: Any) -> httpx.Response:
        r = await post(self, *args, **kwargs)
        if r.status_code not in (200, 503):
            at = round(time.monotonic() - started, 1)
            samples.append({"at_s": at, "status": r.status_code, "headers": dict(r.headers), "body": r.text[:300]})
        return r

    httpx.AsyncClient.post = recording_post  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--url", required=True)
    p.add_argument("--redis", required=True, help="the server's --state URL")
    p.add_argument("--budget", type=int, required=True, help="the server's --query-budget (for the report)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--kill-after", type=float, default=20.0)
    p.add_argument("--restart-deadline", type=float, default=120.0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    key = os.environ["DD_CLIENT_API_KEY"]

    import ray

    try:  # to ask Serve's controller for the replicas' states
        ray.init(address="auto", logging_level="error", log_to_driver=False)
    except Exception as err:  # then the restart is told from ps alone
        print(f"not connected to Ray ({err}); replica states from ps only", file=sys.stderr)
    record: dict[str, Any] = {}
    thread = threading.Thread(target=killer, args=(args.kill_after, args.restart_deadline, record), daemon=True)
    config = LoadConfig(
        url=args.url, clients=args.clients, duration_s=args.duration, max_requests=100_000, timeout_s=120, api_key=key
    )
    unexpected: list[dict[str, Any]] = []
    record_unexpected(unexpected, time.monotonic())
    thread.start()
    report = asyncio.run(run_load(config)).as_dict()
    thread.join(timeout=args.restart_deadline + args.kill_after)
    state = redis.Redis.from_url(args.redis, decode_responses=True)
    default = httpx.get(f"{args.url}/readyz", timeout=30).json()["model"]  # the model the load client asked
    spent = state.get(budget_key(default, key_id(key, redis_secret(state, KEY_ID))))
    answered, errors = report["statuses"].get("200", 0), report["errors"]
    others = {k: v for k, v in report["statuses"].items() if k not in ("200", "503")}
    transport = {k: v for k, v in errors.items() if k.startswith("transport")}
    result = {
        "command": " ".join(["python -m deepdefense.measure.cluster_faults", *sys.argv[1:]]),
        "replicas": 2,
        "budget": args.budget,
        **{k: report[k] for k in ("statuses", "errors", "retry_after_s")},
        "unexpected": {"statuses": others, "transport": transport, "503_not_json": errors.get("503 not-json", 0)},
        "unexpected_answers": unexpected,
        "answered_200": answered,
        "spent_in_redis": int(spent or 0),
        "spent_equals_answered": int(spent or 0) == answered,
        "fault": record,
        "load": report,
    }
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(json.dumps({k: v for k, v in result.items() if k != "load"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
