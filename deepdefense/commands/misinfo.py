"""``deepdefense misinfo``: train the misinformation model of a victim (Adaptive Misinformation), measure
it on the victim's test set, and write it beside the victim as ``<victim>-misinfo``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from deepdefense import flags

HELP = "train a victim's misinformation model (Adaptive Misinformation) and write its checkpoint"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default="lenet-mnist", help="the victim: shipped name or path to its metadata JSON")
    flags.add_data_root(p, " (the victim's training split is used; its test split for the figures)")
    flags.add_save(p, "the misinformation model", "<victim>-misinfo beside the victim")
    p.add_argument("--epochs", type=int, default=3, help="training epochs")
    p.add_argument("--batch-size", type=int, default=128, help="training batch size")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    p.add_argument("--max-shift", type=int, default=2, help="random translation in pixels for images ≤ 32 px (0: off)")
    p.add_argument(
        "--balance",
        type=float,
        default=1.0,
        help="weight of the answer-spread term (confident answers over all classes); 0: AM's loss alone",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the data order")
    flags.add_device(p)
    p.add_argument(
        "--report", default=None, help="also write the figures as Markdown here (docs/results/misinformation.md)"
    )
    flags.add_quiet(p)


def run(args: argparse.Namespace) -> int:
    make(args)
    return 0


def make(args: argparse.Namespace) -> Path:
    """Train, measure and write the misinformation model the flags describe; returns its metadata path."""
    from deepdefense.common.device import resolve_device
    from deepdefense.defense.fitting.misinformation import MisinfoConfig, train_misinformation
    from deepdefense.defense.misinformation import misinformation_path
    from deepdefense.measure.misinformation import measure_misinformation, report
    from deepdefense.models.checkpoint import load_checkpoint, save_checkpoint
    from deepdefense.models.data import load_split

    cfg = MisinfoConfig(
        victim=args.checkpoint,
        data_root=args.data_root,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        max_shift=args.max_shift,
        balance=args.balance,
        seed=args.seed,
        device=str(resolve_device(args.device)),
        progress=not args.quiet,
        command=args.command_line,
    )
    model, meta = train_misinformation(cfg)
    victim, victim_meta = load_checkpoint(args.checkpoint)
    figures = measure_misinformation(victim, model, load_split(victim_meta.dataset, args.data_root, "test"))
    meta.extra["measured"] = figures
    path = save_checkpoint(model, meta, args.save or misinformation_path(args.checkpoint))
    print(json.dumps(figures, indent=2))
    print(
        f"wrote {path} (top-1 accuracy {meta.test_accuracy:.2f}%, mean p_true {figures['misinfo_mean_p_true']}, "
        f"sha256 {meta.sha256[:12]}…)"
    )
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(report(figures, meta))
        print(f"wrote {args.report}")
    return path
