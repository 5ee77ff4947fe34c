"""``deepdefense formats``: honest test digits in the formats people make them (black on white with the invert
option, scanned- and photographed-like), through the server's input path, and the misinformation gate's false
flags on them (docs/results/format-variants.md)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from deepdefense import flags

HELP = "the misinformation gate's false flags on honest digits in other formats (invert option, scans, photos)"
DESCRIPTION = (
    "Draws --n digits of the checkpoint's test split, sends each variant through server.images (as /predict "
    "decodes it, invert option included) and counts what the shipped domain score flags; with --http-check N, "
    "N digits of two variants also go through a real server on loopback to show the same count there."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default="lenet-mnist", help="a checkpoint that ships the gate")
    flags.add_data_root(p)
    p.add_argument("--n", type=int, default=10_000, help="test digits per variant (default: all 10,000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random variants (noise, offsets)")
    p.add_argument("--http-check", type=int, default=256, help="digits per variant sent over HTTP (0: none)")
    p.add_argument(
        "--baseline",
        default=None,
        help="a record of an earlier run with another domain score (its JSON, e.g. from git show "
        "<commit>:docs/results/format-variants.json) over the same digits, seed and variants: the report shows its "
        "flags beside this run's as 'before'",
    )
    flags.add_out(p, report="docs/results/format-variants.md")
    flags.add_device(p)


def run(args: argparse.Namespace) -> int:
    from deepdefense.common.device import resolve_device
    from deepdefense.measure.formats import baseline_of, run_formats
    from deepdefense.measure.formats_report import markdown

    baseline = json.loads(Path(args.baseline).read_text()) if args.baseline else None
    device = resolve_device(args.device)
    measured = run_formats(args.checkpoint, args.n, args.seed, args.http_check, device, args.data_root)
    record = {"command": args.command_line, **measured}
    if baseline is not None:
        record["baseline"] = baseline_of(baseline, record)
    flags.write_outputs(args, record, markdown)
    return 0
