"""``deepdefense edm``: train a victim's Ensemble of Diverse Models on its training split against synthetic outliers,
measure it, and write it beside the victim as ``<victim>.edm`` (the pipeline: ``defense/fitting/edm.py``,
``fit_edm``; the figures: ``measure/edm.py``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from deepdefense import flags
from deepdefense.defense.fitting.edm import EDMConfig

HELP = "train a victim's Ensemble of Diverse Models (EDM baseline) and write it beside the victim (<victim>.edm.*)"
DESCRIPTION = (
    "Trains --members models of the victim's architecture on its training split minus --held-out images, with "
    "cross-entropy in domain and lambda_D * DivLoss on synthetic outliers made from the same images "
    "(defense/outliers.py; never another data set). Prints the figures N and lambda_D are chosen on (held-out "
    "training images and outliers made from them), then the test-split figures, and saves the ensemble with "
    "all of them in its metadata. --ood-dataset only measures the finished ensemble on a foreign test split."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    flags.add_fields(p, EDMConfig, ("checkpoint",))
    flags.add_data_root(p, " (the victim's training split is used; its test split for the figures)")
    flags.add_fields(p, EDMConfig, exclude=("checkpoint", "data_root", "save", "device", "progress", "command"))
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
    from deepdefense.defense.fitting.edm import fit_edm

    cfg = flags.fit_config(EDMConfig, args)
    path, meta = fit_edm(cfg, lambda members, meta, held: _measure(args, members, meta, held))
    measured = meta.measured
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


def _measure(args: argparse.Namespace, members: list[Any], meta: Any, held: Any) -> dict[str, Any]:
    """The trained ensemble's figures (``measure/edm.py``): on the held-out training images (printed, the choice of
    N and λ_D), on the test split, and with --ood-dataset on a foreign test split."""
    from deepdefense.measure.edm import measure_foreign, measure_held_out, measure_test
    from deepdefense.models.checkpoint import load_checkpoint
    from deepdefense.models.data import load_split

    victim, victim_meta = load_checkpoint(args.checkpoint)
    measured = {"held_out": measure_held_out(members, held)}
    print(f"trained {meta.members} members in {meta.training['seconds']:.0f} s")
    print("held out (the choice of N and λ_D):", json.dumps(measured["held_out"]))
    x, y = load_split(victim_meta.dataset, args.data_root, "test").tensors  # type: ignore[attr-defined]
    measured["test"] = measure_test(victim, members, x, y)
    if args.ood_dataset:
        foreign = load_split(args.ood_dataset, args.data_root, "test").tensors[0]  # type: ignore[attr-defined]
        measured["foreign_test"] = measure_foreign(victim, members, foreign, args.ood_dataset)
        measured["foreign_test"]["note"] = "measured after N and λ_D were chosen; never trained or tuned on"
    return measured
