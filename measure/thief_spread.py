"""How far the eq. (1) thief moves when nothing but float rounding changes: the evaluation's explanations attack
model (``clients/attack_model.py``'s recipe, the attacker's own normalisation, seed 0) trained on stored transfer sets
with a given number of torch threads, and the sets' answers compared with each other. Two engines whose answers
agree to float rounding (issue 32's convolutions) are then told apart only if their thieves differ by more than the
same engine's thief does across thread counts (docs/performance.md, "Third round").

    python -m deepdefense.measure.thief_spread --stores before=runs/transfer-sets/<store> after=runs/... \
        --threads 2 --data-root ../shared/data --out docs/results/perf3/thief-spread-2.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from deepdefense.clients.transfer import TransferSet, TransferStore
from deepdefense.common.options import key_values
from deepdefense.common.provenance import provenance
from deepdefense.measure.first_answers import lenet_thief
from deepdefense.measure.markdown import module_command
from deepdefense.models.data import get_spec, load_split
from deepdefense.models.train import evaluate


def compare(a: TransferSet, b: TransferSet) -> dict[str, object]:
    """How far two sets' answers to the same queries are apart: per answer, the largest change of a probability."""
    assert torch.equal(a.images, b.images), "the sets answer different queries"
    assert a.attributions is not None and b.attributions is not None, "the sets hold no maps"
    gap = (a.probabilities - b.probabilities).abs().amax(1)
    return {
        "answers": len(a),
        "same_labels": int((a.labels == b.labels).sum()),
        "median_max_abs_probability": float(gap.median()),
        "over": {f"{t:g}": int((gap > t).sum()) for t in (1e-6, 1e-4, 1e-2)},
        "max_abs_probability": float(gap.max()),
        "mean_abs_map": float((a.attributions - b.attributions).abs().mean()),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stores", nargs="+", required=True, metavar="NAME=STORE", help="transfer-set stores by name")
    p.add_argument("--threads", type=int, required=True, help="torch threads while the thieves train")
    p.add_argument("--budget", type=int, default=10_000, help="B: the answers each thief trains on")
    p.add_argument("--attacker-data", default="fashionmnist", help="the data set the queries come from")
    p.add_argument("--dataset", default="mnist", help="the victim's data set (its test split scores the thief)")
    p.add_argument("--data-root", default=None, help="data sets in torchvision's layout ($DD_DATA_ROOT)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="the record (JSON)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    stores = key_values(args.stores, "--stores").items()
    sets = {name: TransferStore.existing(store).load().prefix(args.budget) for name, store in stores}
    spec, test = get_spec(args.attacker_data), load_split(args.dataset, args.data_root, "test")
    thieves: dict[str, dict[str, float]] = {}
    record = {"command": module_command("deepdefense.measure.thief_spread", argv), "seed": args.seed}
    record |= {"threads": args.threads, "stores": args.stores, "measured": provenance(), "thieves": thieves}
    record["answers"] = {f"{a} vs {b}": compare(sets[a], sets[b]) for a, b in itertools.pairwise(sets)}
    for name, data in sets.items():  # one thief per set, as deepdefense eval trains its eq. (1) thief
        started = time.perf_counter()
        model = lenet_thief(data, "explanations", spec, args.seed)
        accuracy = round(evaluate(model.eval(), test, torch.device("cpu")), 2)
        thieves[name] = {"accuracy": accuracy, "train_s": round(time.perf_counter() - started, 1)}
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
        print(name, thieves[name], flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
