"""The ``deepdefense`` command line: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence

from models.data import DATA_ROOT_ENV, SPECS, default_data_root
from models.registry import list_models


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a victim model and write a checkpoint (safetensors + metadata JSON)")
    p.add_argument("--arch", required=True, choices=list_models())
    p.add_argument("--dataset", required=True, choices=sorted(SPECS))
    p.add_argument("--data-root", default=default_data_root(),
                   help=f"folder holding the data sets in torchvision's layout (default: ${DATA_ROOT_ENV})")
    p.add_argument("--out", required=True, help="output path without suffix, e.g. models/checkpoints/lenet-mnist")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-shift", type=int, default=2, help="random translation in pixels for images ≤ 32 px (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:N]")
    p.add_argument("--download", action="store_true", help="download the data set if it is missing (needs internet)")
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from deepdefense.device import resolve_device
    from models.train import TrainConfig, train

    cfg = TrainConfig(
        arch=args.arch, dataset=args.dataset, data_root=args.data_root, out=args.out, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, max_shift=args.max_shift, seed=args.seed,
        device=str(resolve_device(args.device)), download=args.download,
        command=shlex.join(["deepdefense", *argv]),
    )
    path, meta = train(cfg)
    print(f"wrote {path} (test accuracy {meta.test_accuracy:.2f}%, sha256 {meta.sha256[:12]}…)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepdefense", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args, argv)
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"deepdefense {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
