"""``deepdefense sensitivity``: layer sensitivity S_ℓ (eq. 9) of a checkpoint, stored in its metadata."""

from __future__ import annotations

import argparse
from pathlib import Path

from deepdefense import flags

HELP = "compute layer sensitivity (eq. 9) and store it in a checkpoint's metadata"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default="lenet-mnist", help="shipped checkpoint name or path to its metadata JSON")
    flags.add_data_root(p)
    p.add_argument("--n", type=int, default=1000, help="number of training images N")
    p.add_argument("--seed", type=int, default=0, help="seed of the N training images drawn")


def run(args: argparse.Namespace) -> int:
    make(args)
    return 0


def make(args: argparse.Namespace) -> Path:
    """Compute S_ℓ, store it in the checkpoint's metadata and print it; returns that metadata's path."""
    from deepdefense.defense.sensitivity import store_sensitivity

    path, scores = store_sensitivity(args.checkpoint, args.data_root, n=args.n, seed=args.seed)
    total = sum(scores.values())
    for layer, score in sorted(scores.items(), key=lambda kv: -kv[1]):
        print(f"{layer:32s} S = {score:12.4f}  ({100 * score / total:5.1f}%)")
    return path
