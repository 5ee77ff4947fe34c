"""What the extraction monitor's trust gives a thief who knows it is there.

A key is trusted once its window of domain flags (``server/monitor.py``: 100 distinct queries) is full with at most
``TRUST_RATE`` (12.5%) of it flagged; the gate then answers its flagged queries from the defense instead of the
misinformation path. An honest user whose thick or faint digits the score sometimes flags stops paying for them
(``docs/results/format-variants.md``). A thief can have the same: but only by keeping seven in eight of his
recent distinct queries unflagged, that is, by holding natural digits of the victim's domain, which the gate was
never the defense against. Measured here: what that leaves him. Each key's queries are replayed through the
server's default policy (``MonitorPolicy.misinformed``: the standing read before each request of 16, the domain
flags of the shipped score recorded after; the screening's near-duplicate and PRADA rules are not replayed, they
could only escalate sooner), with the trust and without it (every flagged query misinformed until escalation, as
before the trust). The answer's label is exact without running the engine: DeepDefense keeps the victim's top-1,
and the gate's reranking gives the misinformation model's first class. A labels thief (the evaluation's recipe,
``measure.first_answers.lenet_thief``) is trained on each key's answers and scored on the victim's test split.

Keys: a share ``f`` of Fashion-MNIST training images (the evaluation's attacker set; nothing here is fitted, the
trust rate is half the escalation threshold) in a stream of distinct MNIST training digits, shuffled; and a key that
earns the trust with seven requests of digits, then sends Fashion-MNIST only.

    python -m deepdefense.measure.trust --data-root ../shared/data --out docs/results/trust.json \\
        --report docs/results/trust.md
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from deepdefense.clients.transfer import TransferSet, TransferStore
from deepdefense.measure.first_answers import lenet_thief
from deepdefense.measure.markdown import module_command, table
from deepdefense.models.data import get_spec, load_split
from deepdefense.models.train import evaluate
from deepdefense.server.monitor import KeyWindow, MonitorPolicy, Standing

#: Requests carry this many queries (as the evaluation's clients send them).
PER_REQUEST = 16
#: Shares of Fashion-MNIST among a key's distinct queries.
SHARES = (0.25, 0.35, 0.5, 0.75, 1.0)
#: Digits the earn-then-switch key sends first: seven requests, a full window and its first trusted request.
EARN = 7 * PER_REQUEST


class _Untrusting(MonitorPolicy):
    """``MonitorPolicy`` as the server was before the trust: no key is ever trusted."""

    def standing(self, s: KeyWindow) -> Standing:
        return "escalated" if s.escalated else "watched"


def without_trust(policy: MonitorPolicy, flags: Sequence[bool], per_request: int = PER_REQUEST) -> list[bool]:
    """The server before the trust: every flagged query misinformed, and every query once the key is escalated
    (``policy``'s replay, with no key ever trusted)."""
    untrusting = _Untrusting(**{f.name: getattr(policy, f.name) for f in fields(policy)})
    return untrusting.misinformed(flags, per_request)


def key_rows(natural: int, foreign: int, budget: int, g: torch.Generator | None) -> Tensor:
    """A key's rows of the pool (``budget`` digits, then ``budget`` foreign images): ``natural`` digits and
    ``foreign`` images, shuffled by ``g`` (None: the digits first, then the foreign images)."""
    rows = torch.cat([torch.arange(natural), budget + torch.arange(foreign)])
    return rows if g is None else rows[torch.randperm(len(rows), generator=g)]


def labels_thief(x: Tensor, labels: Tensor, test: Any, seed: int) -> float:
    """Test accuracy (%) of a labels thief (the evaluation's recipe) trained on queries ``x`` answered ``labels``."""
    data = TransferSet(x, labels, torch.nn.functional.one_hot(labels, 10).float(), None, torch.zeros(len(x)))
    return round(evaluate(lenet_thief(data, "labels", get_spec("mnist"), seed), test, torch.device("cpu")), 2)


def key_record(
    name: str,
    x: Tensor,
    foreign: Tensor,
    flags: Tensor,
    truth: Tensor,
    wrong: Tensor,
    test: Any,
    seed: int,
    policy: MonitorPolicy,
) -> dict[str, Any]:
    """One key's replay with the trust and without it, and a labels thief trained on each one's answers."""
    record: dict[str, Any] = {"key": name, "queries": len(x), "foreign": int(foreign.sum())}
    record["flagged"] = int(flags.sum())
    record["escalated_after"] = policy.queries_until_escalated(flags.tolist())
    thieves: dict[str, float] = {}
    masks = {"with_trust": policy.misinformed(flags.tolist(), PER_REQUEST), "without": without_trust(policy, flags)}
    for arm, misinformed in masks.items():
        m = torch.tensor(misinformed)
        record[f"misinformed_{arm}"] = int(m.sum())
        record[f"foreign_honest_{arm}"] = int((foreign & ~m).sum())
        if arm == "without" and misinformed == masks["with_trust"]:
            thieves[arm] = thieves["with_trust"]  # the same answers train the same thief
            continue
        thieves[arm] = labels_thief(x, torch.where(m, wrong, truth), test, seed)
    natural = ~foreign
    if natural.any() and foreign.any():  # what the key's digits alone are worth, answered honestly
        thieves["digits_alone"] = labels_thief(x[natural], truth[natural], test, seed)
    record["thief_accuracy"] = thieves
    return record


def escalated_from(after: int | None, reason: str | None, per_request: int) -> int | None:
    """The first query answered as escalated, for a key escalated after its ``after``-th query: the screening's
    rules escalate before the request that tips the key over is answered, the domain flags after it."""
    if after is None:
        return None
    request = (after - 1) // per_request + (reason == "domain")
    return request * per_request


def replayed_arms(evaluations: Sequence[str], score: Any, policy: MonitorPolicy) -> list[dict[str, Any]]:
    """The monitored arms of ``deepdefense eval`` output folders (``--monitored``), their stored queries replayed
    in order, in their requests, up to where the monitor escalated the arm's key when it was measured (from then on
    every answer is misinformed with the trust or without): how many answers the trust changes. Exact repeats are
    counted: the replay records their flags again, the server would not."""
    out = []
    for folder in evaluations:
        results = json.loads((Path(folder) / "results.json").read_text())
        for key, arm in results["arms"].items():
            if arm["settings"].get("monitor") != "on":
                continue
            data = TransferStore.existing(arm["store"]).load().prefix(arm["budget"])
            with torch.no_grad():
                flags = torch.cat([score.flags(c) for c in data.images.split(1000)]).cpu().tolist()
            per_request = arm["runtime"]["query_batch"]
            now, before = policy.misinformed(flags, per_request), without_trust(policy, flags, per_request)
            watched = arm["monitor"]["watched"]  # what the monitor did with the arm's key when it was measured
            escalated = escalated_from(watched.get("escalated_after"), watched.get("reason"), per_request)
            changed = sum(a != b for a, b in list(zip(now, before, strict=True))[:escalated])
            distinct = len({x.numpy().tobytes() for x in data.images})
            out.append({
                "evaluation": Path(folder).name, "arm": key, "query_set": arm["query_set"], "budget": arm["budget"],
                "per_request": per_request, "flagged": sum(flags), "repeats": len(flags) - distinct,
                "escalated_after": watched.get("escalated_after"), "reason": watched.get("reason"),
                "answers_changed": changed,
            })  # fmt: skip
    return out


def run(data_root: str | None, budget: int, seed: int, evaluations: Sequence[str], progress: bool) -> dict[str, Any]:
    from deepdefense.defense.domain import load_domain_score
    from deepdefense.defense.misinformation import load_misinformation
    from deepdefense.models.checkpoint import load_checkpoint

    started = time.time()
    torch.manual_seed(seed)
    victim, meta = load_checkpoint("lenet-mnist")
    victim.eval().requires_grad_(False)
    score, score_meta = load_domain_score("lenet-mnist", victim, torch.device("cpu"))
    wrong_model, _ = load_misinformation("lenet-mnist")
    wrong_model.eval().requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    digits = load_split("mnist", data_root, "train").tensors[0]
    fashion = load_split("fashionmnist", data_root, "train").tensors[0]
    digits = digits[torch.randperm(len(digits), generator=g)[:budget]]
    fashion = fashion[torch.randperm(len(fashion), generator=g)[:budget]]
    pool = torch.cat([digits, fashion])
    with torch.no_grad():
        flags = torch.cat([score.flags(c) for c in pool.split(1000)]).cpu()
        truth = torch.cat([victim(c).argmax(1) for c in pool.split(1000)])
        wrong = torch.cat([wrong_model(c).argmax(1) for c in pool.split(1000)])
    test = load_split("mnist", data_root, "test")
    policy = MonitorPolicy()
    plans = [(f"{round(100 * f)}% Fashion-MNIST", budget - round(f * budget), round(f * budget), g) for f in SHARES]
    plans.append((f"{EARN} digits, then Fashion-MNIST", EARN, budget - EARN, None))
    keys = []
    for name, natural, foreign, shuffle in tqdm(plans, desc="keys", disable=not progress):
        rows = key_rows(natural, foreign, budget, shuffle)
        keys.append(
            key_record(name, pool[rows], rows >= budget, flags[rows], truth[rows], wrong[rows], test, seed, policy)
        )
    return {
        "budget": budget,
        "seed": seed,
        "per_request": PER_REQUEST,
        "policy": {"window": policy.window, "threshold": policy.threshold, "trust_rate": policy.trust_rate},
        "domain_score": {"method": score_meta.method, "threshold": score_meta.threshold, "sha256": score_meta.sha256},
        "victim_sha256": meta.sha256,
        "fashion_flag_rate": round(float(flags[budget:].double().mean()), 4),
        "digits_flag_rate": round(float(flags[:budget].double().mean()), 4),
        "keys": keys,
        "evaluation_arms": replayed_arms(evaluations, score, policy),
        "seconds": round(time.time() - started, 1),
    }


def report(record: dict[str, Any]) -> str:
    rows = []
    for k in record["keys"]:
        t = k["thief_accuracy"]
        rows.append([
            k["key"], f"{k['foreign']:,}", f"{k['flagged']:,}", k["escalated_after"] or "never",
            f"{k['foreign_honest_without']:,}", f"**{k['foreign_honest_with_trust']:,}**",
            f"{t['without']:.2f}%", f"**{t['with_trust']:.2f}%**",
            f"{t['digits_alone']:.2f}%" if "digits_alone" in t else "—",
        ])  # fmt: skip
    head = [
        "key", "Fashion-MNIST queries", "flagged", "escalated after", "Fashion answered honestly, before",
        "with the trust", "labels thief, before", "with the trust", "thief on the key's digits alone",
    ]  # fmt: skip
    p = record["policy"]
    return "\n".join(
        [
            "# What the monitor's trust gives a thief",
            "",
            f"Made by (seed {record['seed']}, {record['seconds']} s on this machine):",
            "",
            "```bash",
            record["command"],
            "```",
            "",
            __doc__.split("\n\n    python")[0].strip(),
            "",
            f"Policy: window {p['window']}, escalation above {p['threshold']:.0%} flagged, trust at most "
            f"{p['trust_rate']:.1%}; requests of {record['per_request']}; B = {record['budget']:,} queries per key. "
            f"The shipped score flags {record['fashion_flag_rate']:.2%} of these Fashion-MNIST images and "
            f"{record['digits_flag_rate']:.2%} of these MNIST training digits.",
            "",
            *table(head, rows),
            "",
            *_arms_table(record.get("evaluation_arms", [])),
            "## Reading",
            "",
            "* *Before* is the server without the trust (every flagged query misinformed until the key is escalated);",
            "  *with the trust* is the server now. The thief's accuracy is on the victim's 10,000 test digits.",
            "* The trust hands out honest answers to flagged queries only to keys whose recent distinct queries are",
            "  mostly unflagged: a thief gets them only alongside natural digits of the victim's domain, and the last",
            "  column is what those digits alone, honestly answered, already give him.",
            "* A thief who earns the trust and then switches is escalated as before (the flags count whatever the",
            "  standing); until then the trust answers the flagged ones among his first foreign queries honestly.",
            "* Not replayed: near-duplicates and PRADA (they could only escalate sooner).",
            "* A thief with two keys can tell a flagged query by the answers of a watched and a trusted key to the",
            "  same bytes (each answer is a function of the query); to ask many, the trusted key needs seven natural",
            "  digits per flagged query.",
            "",
        ]
    )


def _arms_table(arms: list[dict[str, Any]]) -> list[str]:
    if not arms:
        return []
    head = [
        "evaluation", "arm", "B", "queries per request", "flagged", "exact repeats", "escalated after", "by",
        "answers the trust changes",
    ]  # fmt: skip
    rows = [
        [a["evaluation"], a["arm"], f"{a['budget']:,}", a["per_request"], a["flagged"], a["repeats"],
         a["escalated_after"] or "never", a["reason"] or "—", f"**{a['answers_changed']}**"]
        for a in arms
    ]  # fmt: skip
    return [
        "## The evaluation's monitored arms, replayed",
        "",
        "The arms of `deepdefense eval --monitored` (`docs/results/below-label-line.md` and the gate-aware reports)",
        "were measured before the trust. Their stored queries replayed in order and in their requests, with and",
        "without it, up to where the monitor escalated the arm's key (after that every answer is misinformed either",
        "way): 0 means the arm's answers, and so its thief, are the same now.",
        "",
        *table(head, rows),
        "",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default=None, help="data sets in torchvision's layout ($DD_DATA_ROOT)")
    p.add_argument("--budget", type=int, default=10_000, help="queries per key")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the record here as JSON")
    p.add_argument("--report", default=None, help="write the Markdown report here")
    p.add_argument(
        "--evaluations",
        nargs="*",
        default=[],
        help="deepdefense eval --monitored output folders whose "
        "arms are replayed with and without the trust (their transfer sets must be on this machine)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    record = {"command": module_command("deepdefense.measure.trust", argv)}
    record |= run(args.data_root, args.budget, args.seed, args.evaluations, progress=not args.quiet)
    print(json.dumps(record["keys"], indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    if args.report:
        Path(args.report).write_text(report(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
