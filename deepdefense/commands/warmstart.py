"""``deepdefense warmstart``: learn a checkpoint's warm start for the DeepDefense engine (defense/fitting/warm_start.py)
on its training images, and write it beside the checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from deepdefense import flags
from deepdefense.defense.warm_start import WARM_STEPS

HELP = "learn the engine's per-class warm start on a checkpoint's training images; writes <checkpoint>.warm.*"
DESCRIPTION = (
    "Runs the engine's full cold solver (starting from the victim) on the first --n training images of a random "
    "permutation (--seed), averages each selected weight's move per predicted class (low-rank layers: the "
    "rank --rank SVD of the mean move), and saves it beside the checkpoint; the engine then starts every query "
    "there and needs far fewer steps (docs/performance.md, 'Warm starts'). Never reads test or attacker data."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default="lenet-mnist", help="shipped checkpoint name or path to its metadata JSON")
    flags.add_data_root(p)
    p.add_argument("--interpreter", default="gradcam", help="the interpreter the warm start is learnt for")
    p.add_argument("--n", type=int, default=1280, help="training images to learn on")
    p.add_argument("--rank", type=int, default=8, help="rank of each low-rank layer's move (even)")
    p.add_argument("--seed", type=int, default=0, help="which training images (a seeded permutation)")
    p.add_argument(
        "--serve-steps",
        type=int,
        default=WARM_STEPS,
        help="the engine's default steps from this warm start: the fewest that keep the strength of the cold "
        "solver, measured with deepdefense fidelity (docs/performance.md)",
    )
    flags.add_save(p, "the warm start", "<checkpoint>.warm beside it")
    flags.add_engine_options(p, " of the cold solver it averages")
    flags.add_device(p)
    flags.add_quiet(p)


def run(args: argparse.Namespace) -> int:
    make(args)
    return 0


def make(args: argparse.Namespace) -> Path:
    """Learn and write the warm start the flags describe; returns its metadata path."""
    import torch

    from deepdefense.common.device import resolve_device
    from deepdefense.defense.engine import COLD_STEPS, DeepDefense
    from deepdefense.defense.fitting.warm_start import learn_warm_start
    from deepdefense.defense.loader import load_defense
    from deepdefense.defense.warm_start import WarmStart, WarmStartMeta, save_warm_start
    from deepdefense.models.data import load_split

    options = {"warm_start": False, **flags.engine_options(args.engine)}
    device = resolve_device(args.device)
    engine, meta = load_defense(
        args.checkpoint, "deepdefense", args.interpreter, device=device, data_root=args.data_root, **options
    )
    assert isinstance(engine, DeepDefense)
    images = load_split(meta.dataset, args.data_root, "train").tensors[0]
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed))[: args.n]
    dense, factors = learn_warm_start(
        engine, images[pick].to(device), classes=meta.num_classes, rank=args.rank, progress=not args.quiet
    )
    warm = WarmStart(
        WarmStartMeta(
            interpreter=args.interpreter,
            layers=engine.layers,
            classes=meta.num_classes,
            rank=args.rank,
            images=len(pick),
            dataset=f"{meta.dataset} train",
            steps=engine.config.steps or COLD_STEPS,
            seed=args.seed,
            command=args.command_line,
            serve_steps=args.serve_steps,
        ),
        dense,
        factors,
    )
    path = save_warm_start(warm, args.checkpoint, args.save)
    print(f"wrote {path} ({len(pick)} training images, layers {', '.join(engine.layers)})")
    return path
