"""``deepdefense edm``: train a victim's Ensemble of Diverse Models (defense/fitting/edm.py) on its training
split against synthetic outliers, measure it, and write it beside the victim as ``<victim>.edm``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from deepdefense import flags
from deepdefense.defense.fitting.edm import DEFAULT_LAMBDA_D, DEFAULT_MEMBERS
from deepdefense.defense.outliers import OUTLIERS

HELP = "train a victim's Ensemble of Diverse Models (EDM baseline) and write it beside the victim (<victim>.edm.*)"
DESCRIPTION = (
    "Trains --members models of the victim's architecture on its training split minus --held-out images, with "
    "cross-entropy in domain and lambda_D * DivLoss on synthetic outliers made from the same images "
    "(defense/outliers.py; never another data set). Prints the figures N and lambda_D are chosen on (held-out "
    "training images and outliers made from them), then the test-split figures, and saves the ensemble with "
    "all of them in its metadata. --ood-dataset only measures the finished ensemble on a foreign test split."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default="lenet-mnist", help="the victim: shipped name or path to its metadata JSON")
    flags.add_data_root(p, " (the victim's training split is used; its test split for the figures)")
    p.add_argument("--members", type=int, default=DEFAULT_MEMBERS, help="N, the ensemble's size (≥ 2)")
    p.add_argument("--lambda-d", type=float, default=DEFAULT_LAMBDA_D, help="λ_D, the weight of DivLoss")
    p.add_argument("--epochs", type=int, default=2, help="training epochs of the ensemble")
    p.add_argument("--batch-size", type=int, default=128, help="in-domain images per step")
    p.add_argument("--outlier-batch", type=int, default=64, help="synthetic outliers per step")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    p.add_argument("--max-shift", type=int, default=2, help="random translation in pixels for images ≤ 32 px (0: off)")
    p.add_argument("--held-out", type=int, default=5000, help="training images kept out of training (the choice)")
    p.add_argument(
        "--train-images", type=int, default=None, help="fit on only this many of the other training images (sweeps)"
    )
    p.add_argument("--kinds", nargs="+", default=list(OUTLIERS), choices=list(OUTLIERS), help="outlier kinds")
    p.add_argument("--seed", type=int, default=0, help="seed of the members' initialisation and the data order")
    p.add_argument(
        "--ood-dataset",
        default=None,
        help="also measure the finished ensemble on this data set's test split (measured only, never trained on)",
    )
    flags.add_save(p, "the ensemble", "<victim>.edm beside the victim")
    flags.add_out(p, "the measured figures")
    flags.add_device(p)
    flags.add_quiet(p)


def run(args: argparse.Namespace) -> int:
    make(args)
    return 0


def make(args: argparse.Namespace) -> Path:
    """Train, measure and write the ensemble the flags describe; returns its metadata path."""
    from deepdefense.common.device import resolve_device
    from deepdefense.defense.baselines.edm import save_ensemble
    from deepdefense.defense.fitting.edm import EDMConfig, train_ensemble
    from deepdefense.measure.edm import measure_foreign, measure_held_out, measure_test
    from deepdefense.models.checkpoint import load_checkpoint
    from deepdefense.models.data import load_split

    cfg = EDMConfig(
        victim=args.checkpoint,
        data_root=args.data_root,
        members=args.members,
        lambda_d=args.lambda_d,
        epochs=args.epochs,
        batch_size=args.batch_size,
        outlier_batch=args.outlier_batch,
        lr=args.lr,
        max_shift=args.max_shift,
        held_out=args.held_out,
        train_images=args.train_images,
        kinds=tuple(args.kinds),
        seed=args.seed,
        device=str(resolve_device(args.device)),
        progress=not args.quiet,
        command=args.command_line,
    )
    members, meta, held = train_ensemble(cfg)
    victim, victim_meta = load_checkpoint(args.checkpoint)
    measured = {"held_out": measure_held_out(members, held)}
    print(f"trained {cfg.members} members in {meta.training['seconds']:.0f} s")
    print("held out (the choice of N and λ_D):", json.dumps(measured["held_out"]))
    x, y = load_split(victim_meta.dataset, args.data_root, "test").tensors  # type: ignore[attr-defined]
    measured["test"] = measure_test(victim, members, x, y)
    if args.ood_dataset:
        foreign = load_split(args.ood_dataset, args.data_root, "test").tensors[0]  # type: ignore[attr-defined]
        measured["foreign_test"] = measure_foreign(victim, members, foreign, args.ood_dataset)
        measured["foreign_test"]["note"] = "measured after N and λ_D were chosen; never trained or tuned on"
    meta.measured = measured
    path = save_ensemble(members, meta, args.checkpoint, args.save)
    print(json.dumps(measured, indent=2))
    test = measured["test"]
    print(
        f"wrote {path}: served test accuracy {test['served_accuracy']:.2f}% (members "
        f"{', '.join(f'{a:.2f}' for a in test['member_accuracy'])}), agreement with the victim "
        f"{test['served_agreement_with_victim']:.2f}%, held-out outlier coherence "
        f"{measured['held_out']['outliers']['coherence_mean']:.3f} (sha256 {meta.sha256[:12]}…)"
    )
    if args.out:
        flags.write_json(args.out, {"command": args.command_line, "measured": measured, "training": meta.training})
    return path
