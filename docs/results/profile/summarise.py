"""Summarise py-spy's raw stacks of a server: samples per thread, and per (thread, what it was doing) where
"doing" is the innermost frame of the engine, the gate, the interpreter, the request path (parsing, validation,
encoding) or else the innermost frame. Usage: python summarise.py server.stacks load.json"""

import collections
import json
import sys

PARTS = [  # (label, substring of a frame), the first match from the innermost frame outwards wins
    ("engine", "defense/engine.py"),
    ("gate, domain score", "defense/gate.py"),
    ("gate, domain score", "defense/domain.py"),
    ("interpreter", "defense/interpreters"),
    ("micro-batcher", "server/batcher.py"),
    ("request path", "server/"),
    ("request path", "fastapi/"),
    ("request path", "starlette/"),
    ("request path", "pydantic"),
    ("HTTP", "uvicorn/"),
    ("HTTP", "h11/"),
]


def label(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, part in PARTS:
            if part in frame:
                if name == "engine":
                    return "engine: " + frame.split(" (")[0]
                return name
    return "other: " + (frames[-1].split(" (")[0] if frames else "(no Python frame)")


def main() -> None:
    threads: collections.Counter[str] = collections.Counter()
    doing: collections.Counter[tuple[str, str]] = collections.Counter()
    with open(sys.argv[1]) as f:
        lines = f.readlines()
    with open(sys.argv[2]) as f:
        load = json.load(f)
    for line in lines:
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        thread = frames[0].split(": ", 1)[-1]
        thread = "AnyIO worker threads" if thread.startswith("AnyIO") else thread
        threads[thread] += int(count)
        doing[(thread, label(frames[1:]))] += int(count)
    total = sum(threads.values())
    p50 = load["latency_ms"].get("p50")
    print(f"load: {load['throughput_rps']} answers/s, statuses {load['statuses']}, p50 {p50} ms")
    print(f"samples (active threads only, 50 Hz): {total}")
    for thread, n in threads.most_common():
        print(f"{thread}: {n} ({100 * n / total:.1f}%)")
        for (t, what), m in doing.most_common():
            if t == thread and m >= 0.005 * total:
                print(f"    {m:5d}  {100 * m / n:5.1f}% of the thread  {what}")


if __name__ == "__main__":
    main()
