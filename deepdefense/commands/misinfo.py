"""``deepdefense misinfo``: train the misinformation model of a victim (Adaptive Misinformation), measure
it on the victim's test set, and write it beside the victim as ``<victim>-misinfo`` (the pipeline:
``defense/fitting/misinformation.py``, ``fit_misinformation_model``; the figures: ``measure/misinformation.py``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from deepdefense import flags
from deepdefense.defense.fitting.misinformation import MisinfoConfig

HELP = "train a victim's misinformation model (Adaptive Misinformation) and write its checkpoint"


def add_arguments(p: argparse.ArgumentParser) -> None:
    flags.add_fields(p, MisinfoConfig, ("checkpoint",))
    flags.add_data_root(p, " (the victim's training split is used; its test split for the figures)")
    flags.add_save(p, "the misinformation model", "<victim>-misinfo beside the victim")
    flags.add_fields(p, MisinfoConfig, ("epochs", "batch_size", "lr", "max_shift", "balance", "seed"))
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
    from deepdefense.defense.fitting.misinformation import fit_misinformation_model
    from deepdefense.measure.misinformation import report

    cfg = flags.fit_config(MisinfoConfig, args)
    path, meta = fit_misinformation_model(cfg, lambda model: _measure(args, model))
    figures = meta.extra["measured"]
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


def _measure(args: argparse.Namespace, model: Any) -> dict[str, Any]:
    """The trained model's figures against its victim on the victim's test split (``measure/misinformation.py``)."""
    from deepdefense.measure.misinformation import measure_misinformation
    from deepdefense.models.checkpoint import load_checkpoint
    from deepdefense.models.data import load_split

    victim, victim_meta = load_checkpoint(args.checkpoint)
    return measure_misinformation(victim, model, load_split(victim_meta.dataset, args.data_root, "test"))
