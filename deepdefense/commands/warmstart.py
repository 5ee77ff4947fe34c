"""``deepdefense warmstart``: learn a checkpoint's warm start for the DeepDefense engine on its training images and
write it beside the checkpoint (the pipeline: ``defense/fitting/warm_start.py``, ``fit_warm_start``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from deepdefense import flags
from deepdefense.defense.fitting.warm_start import WarmStartConfig

HELP = "learn the engine's per-class warm start on a checkpoint's training images; writes <checkpoint>.warm.*"
DESCRIPTION = (
    "Runs the engine's full cold solver (starting from the victim) on the first --n training images of a random "
    "permutation (--seed), averages each selected weight's move per predicted class (low-rank layers: the "
    "rank --rank SVD of the mean move), and saves it beside the checkpoint; the engine then starts every query "
    "there and needs far fewer steps (docs/performance.md, 'Warm starts'). Never reads test or attacker data."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    flags.add_fields(p, WarmStartConfig, ("checkpoint",))
    flags.add_data_root(p)
    flags.add_fields(p, WarmStartConfig, ("interpreter", "n", "rank", "seed", "serve_steps"))
    flags.add_save(p, "the warm start", "<checkpoint>.warm beside it")
    flags.add_engine_options(p, " of the cold solver it averages")
    flags.add_device(p)
    flags.add_quiet(p)


def run(args: argparse.Namespace) -> int:
    make(args)
    return 0


def make(args: argparse.Namespace) -> Path:
    """Learn and write the warm start the flags describe; returns its metadata path."""
    from deepdefense.defense.fitting.warm_start import fit_warm_start

    path, meta = fit_warm_start(
        flags.fit_config(
            WarmStartConfig,
            args,
            engine_options=flags.engine_options(args.engine),
        )
    )
    print(f"wrote {path} ({meta.images} training images, layers {', '.join(meta.layers)})")
    return path
