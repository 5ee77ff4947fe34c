"""``deepdefense train``: train a victim and write its checkpoint, then its layer sensitivity."""

from __future__ import annotations

import argparse

from deepdefense import flags
from deepdefense.models.data import SPECS
from deepdefense.models.registry import list_models

HELP = "train a victim model and write a checkpoint (safetensors + metadata JSON)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", required=True, choices=list_models(), help="the victim's architecture")
    p.add_argument("--dataset", required=True, choices=sorted(SPECS), help="the data set to train on")
    flags.add_data_root(p)
    flags.add_save(p, "the checkpoint", e_g="models/checkpoints/lenet-mnist")
    p.add_argument("--epochs", type=int, default=10, help="training epochs")
    p.add_argument("--batch-size", type=int, default=128, help="training batch size")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--max-shift", type=int, default=2, help="random translation in pixels for images ≤ 32 px (0: off)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the data order")
    flags.add_device(p)
    p.add_argument("--download", action="store_true", help="download the data set if it is missing (needs internet)")


def run(args: argparse.Namespace) -> int:
    from deepdefense.commands import sensitivity
    from deepdefense.common.device import resolve_device
    from deepdefense.models.train import TrainConfig, train

    cfg = TrainConfig(
        arch=args.arch,
        dataset=args.dataset,
        data_root=args.data_root,
        out=args.save,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        max_shift=args.max_shift,
        seed=args.seed,
        device=str(resolve_device(args.device)),
        download=args.download,
        command=args.command_line,
    )
    path, meta = train(cfg)
    print(f"wrote {path} (test accuracy {meta.test_accuracy:.2f}%, sha256 {meta.sha256[:12]}…)")
    return sensitivity.run(argparse.Namespace(checkpoint=str(path), data_root=args.data_root, n=1000, seed=args.seed))
