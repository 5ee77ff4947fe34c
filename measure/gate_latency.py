"""What the misinformation gate costs, and whether its answers can be told apart by their latency
(``deepdefense bench --gate-latency``; ``docs/results/gate-latency.md``).

Per defense, two servers on loopback in this process — the defense alone and the defense behind the gate,
as ``deepdefense serve`` builds them — get the same single-instance requests with maps, one at a time, in
a seeded random order over both servers: victim test images (honest traffic) and images of the attacker's
data set. Interleaving spreads any drift of the machine (another process, a frequency change) over both
servers alike.

* **Cost**: the ratio of the gated server's median latency to the plain one's on the honest queries, with
  a bootstrap 95% interval (issue 14's target: ≤ 1.05).
* **Does the latency tell?** On the gated server, the queries its domain score flags (misinformed) against
  those it does not: the two-sample Kolmogorov–Smirnov statistic and the balanced accuracy of the best
  latency threshold — chosen on one half of the queries, scored on the other, so that it is not fitted to
  the sample it is scored on (0.5: the latency tells nothing). The plain server's latencies of the same
  two groups are the control: what the queries' content alone gives away, with no gate.
"""

from __future__ import annotations

import bisect
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from deepdefense.clients.oracle import HttpOracle
from deepdefense.defense.domain import load_domain_score
from deepdefense.measure.launcher import served
from deepdefense.measure.markdown import document, row, table
from deepdefense.models.checkpoint import load_checkpoint
from deepdefense.models.data import load_split

#: Issue 14: the gate adds at most 5% to a defended query's latency.
TARGET_RATIO = 1.05
BALANCED = "threshold_balanced_accuracy"


@dataclass(frozen=True)
class GateLatencyConfig:
    checkpoint: str = "lenet-mnist"
    interpreter: str = "gradcam"
    defenses: tuple[str, ...] = ("deepdefense", "none")
    attacker_dataset: str = "fashionmnist"  # the other half of the requests (flagged by the gate, mostly)
    n: int = 200  # requests of each kind (honest, attacker's) per server
    warmup: int = 5  # untimed requests per server first
    bootstrap: int = 2000
    seed: int = 0
    device: str = "cpu"
    data_root: str | None = None


def run_gate_latency(config: GateLatencyConfig, progress: Callable[[str], None] = print) -> dict[str, Any]:
    victim, meta = load_checkpoint(config.checkpoint)
    honest = load_split(meta.dataset, config.data_root, "test").tensors[0][: config.n]
    other = load_split(config.attacker_dataset, config.data_root, "test").tensors[0][: config.n]
    queries = torch.cat([honest, other])
    domain, _ = load_domain_score(config.checkpoint, victim.requires_grad_(False))
    flags = domain.flags(queries).tolist()
    arms = {}
    for defense in config.defenses:
        progress(f"gate latency: {defense} and {defense} + gate, {2 * len(queries)} timed requests")
        seconds = _interleaved(config, defense, queries)
        arms[defense] = _summary(config, seconds["plain"], seconds["gated"], flags, config.n)
    flagged = {"honest": sum(flags[: config.n]), "other": sum(flags[config.n :])}
    result = {"config": asdict(config), "flagged": flagged, "arms": arms}
    return result | {"summary_lines": summary_lines(result)}


def _interleaved(config: GateLatencyConfig, defense: str, queries: Tensor) -> dict[str, list[float]]:
    """Seconds per request of every query on both servers, sent one at a time in a seeded random order."""
    common = {"device": config.device, "data_root": config.data_root}
    with (
        served(config.checkpoint, defense, config.interpreter, gate="none", **common) as (plain_url, plain_key),
        served(config.checkpoint, defense, config.interpreter, gate="misinform", **common) as (gated_url, gated_key),
        HttpOracle(plain_url, plain_key) as plain,
        HttpOracle(gated_url, gated_key) as gated,
    ):
        oracles = {"plain": plain, "gated": gated}
        for oracle in oracles.values():
            for i in range(config.warmup):
                oracle.query(queries[i : i + 1])
        jobs = [(server, i) for server in oracles for i in range(len(queries))]
        random.Random(config.seed).shuffle(jobs)
        seconds = {server: [0.0] * len(queries) for server in oracles}
        for server, i in jobs:
            started = time.perf_counter()
            oracles[server].query(queries[i : i + 1])
            seconds[server][i] = time.perf_counter() - started
    return seconds


def _summary(
    config: GateLatencyConfig, plain: list[float], gated: list[float], flags: list[bool], n: int
) -> dict[str, Any]:
    ratio = statistics.median(gated[:n]) / statistics.median(plain[:n])
    low, high = _bootstrap_ratio(plain[:n], gated[:n], config.bootstrap, config.seed)
    return {
        "plain_ms": _ms(plain[:n]),
        "gated_ms": _ms(gated[:n]),
        "ratio": round(ratio, 4),
        "ratio_ci95": [round(low, 4), round(high, 4)],
        "gated_tells": _tells(gated, flags, config.seed),
        "plain_tells": _tells(plain, flags, config.seed),
    }


def _ms(seconds: list[float]) -> dict[str, float]:
    q = statistics.quantiles(seconds, n=20)
    return {"p50": round(1000 * statistics.median(seconds), 2), "p95": round(1000 * q[18], 2)}


def _bootstrap_ratio(plain: list[float], gated: list[float], rounds: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of median(gated) / median(plain), each resampled on its own."""
    rng = random.Random(seed)
    ratios = sorted(
        statistics.median(rng.choices(gated, k=len(gated))) / statistics.median(rng.choices(plain, k=len(plain)))
        for _ in range(rounds)
    )
    return ratios[int(0.025 * rounds)], ratios[min(int(0.975 * rounds), rounds - 1)]


def ks_statistic(a: list[float], b: list[float]) -> float:
    """The two-sample Kolmogorov–Smirnov statistic: the largest gap between the two empirical CDFs."""
    sa, sb = sorted(a), sorted(b)
    cdf = lambda s, p: bisect.bisect_right(s, p) / len(s)
    return max((abs(cdf(sa, p) - cdf(sb, p)) for p in set(a) | set(b)), default=0.0)


def threshold_accuracy(train: list[tuple[float, bool]], test: list[tuple[float, bool]]) -> float:
    """Balanced accuracy on ``test`` of the latency threshold (and direction) best on ``train``."""

    def balanced(rows: list[tuple[float, bool]], t: float, slower: bool) -> float:
        pos = [s for s, f in rows if f]
        neg = [s for s, f in rows if not f]
        if not pos or not neg:
            return 0.5
        tpr = sum((s > t) == slower for s in pos) / len(pos)
        tnr = sum((s > t) != slower for s in neg) / len(neg)
        return (tpr + tnr) / 2

    candidates = [(s, d) for s, _ in train for d in (True, False)]
    t, slower = max(candidates, key=lambda c: balanced(train, *c))
    return balanced(test, t, slower)


def _tells(seconds: list[float], flags: list[bool], seed: int) -> dict[str, Any]:
    rows = list(zip(seconds, flags, strict=True))
    flagged, kept = [s for s, f in rows if f], [s for s, f in rows if not f]
    random.Random(seed).shuffle(rows)
    half = len(rows) // 2
    return {
        "flagged": len(flagged),
        "unflagged": len(kept),
        "flagged_p50_ms": round(1000 * statistics.median(flagged), 2) if flagged else None,
        "unflagged_p50_ms": round(1000 * statistics.median(kept), 2) if kept else None,
        "ks": round(ks_statistic(flagged, kept), 3) if flagged and kept else None,
        "threshold_balanced_accuracy": round(threshold_accuracy(rows[:half], rows[half:]), 3),
    }


def summary_lines(result: dict[str, Any]) -> list[str]:
    """One line per defense, for this report and the gate's (``measure/report.py``)."""
    lines = []
    for defense, a in result["arms"].items():
        g, p = a["gated_tells"], a["plain_tells"]
        lines.append(
            f"`{defense}`: the gate multiplies the median latency of an honest query by {a['ratio']:.3f} "
            f"(95% CI {a['ratio_ci95'][0]:.3f}–{a['ratio_ci95'][1]:.3f}; {a['plain_ms']['p50']:.1f} → "
            f"{a['gated_ms']['p50']:.1f} ms); flagged vs unflagged through the gate: p50 {g['flagged_p50_ms']} vs "
            f"{g['unflagged_p50_ms']} ms, KS {g['ks']}, held-out threshold balanced accuracy "
            f"{g['threshold_balanced_accuracy']:.3f} (without the gate, the same queries: KS {p['ks']}, "
            f"{p['threshold_balanced_accuracy']:.3f})"
        )
    return lines


def markdown(result: dict[str, Any], command: str) -> str:
    c = result["config"]
    lines = [
        "# The misinformation gate's latency",
        "",
        f"`{command}` (seed {c['seed']}, device {c['device']}). Generated by `measure/gate_latency.py`; how it is "
        "measured is in its docstring. Per defense, a plain and a gated server on loopback in one process, "
        f"{c['n']} {c['checkpoint']} test images and {c['n']} {c['attacker_dataset']} test images each, one "
        "request (one instance, with its map) at a time, interleaved over both servers in a seeded random order. "
        f"The domain score flags {result['flagged']['honest']} of the honest and {result['flagged']['other']} of the "
        "attacker's images.",
        "",
        *table("defense | plain p50 / p95 (ms) | gated p50 / p95 (ms) | ratio of medians (95% CI) | target ≤ 1.05"),
    ]
    for defense, a in result["arms"].items():
        lo, hi = a["ratio_ci95"]
        # the target is for a defended query; without a defense the gate's cost is set against a bare forward
        verdict = "— (undefended)" if defense == "none" else "met" if a["ratio"] <= TARGET_RATIO else "not met"
        plain, gated = (f"{a[k]['p50']} / {a[k]['p95']}" for k in ("plain_ms", "gated_ms"))
        lines.append(row([defense, plain, gated, f"{a['ratio']:.3f} ({lo:.3f}–{hi:.3f})", verdict]))
    lines += [
        "",
        "Can a client tell a misinformed answer by its latency? Flagged against unflagged queries (KS statistic; "
        "balanced accuracy of the best latency threshold, chosen on half of the queries and scored on the other "
        "half: 0.5 tells nothing). The plain server is the control: the same queries with no gate.",
        "",
        *table(
            "defense | server | flagged p50 (ms) | unflagged p50 (ms) | KS | threshold balanced accuracy",
            (
                (defense, server, *(t[k] for k in ("flagged_p50_ms", "unflagged_p50_ms", "ks")), f"{t[BALANCED]:.3f}")
                for defense, a in result["arms"].items()
                for server, t in (("gated", a["gated_tells"]), ("plain", a["plain_tells"]))
            ),
        ),
    ]
    return document(lines)
