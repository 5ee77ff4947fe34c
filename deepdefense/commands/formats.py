"""``deepdefense formats``: honest test digits in the formats people make them (black on white with the invert
option, scanned- and photographed-like), through the server's input path, and the misinformation gate's false
flags on them (docs/results/format-variants.md)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

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
    import torch

    from common.device import resolve_device
    from defense.domain import load_domain_score
    from defense.misinformation import load_misinformation
    from measure.formats import VARIANTS, baseline_of, check_over_http, measure_variant, sample_test_digits
    from models.checkpoint import load_checkpoint
    from models.data import load_split

    started = time.time()
    baseline = json.loads(Path(args.baseline).read_text()) if args.baseline else None
    device = resolve_device(args.device)
    model, meta = load_checkpoint(args.checkpoint, device=device)
    model.requires_grad_(False)
    score, score_meta = load_domain_score(args.checkpoint, model, device)
    misinformation, _ = load_misinformation(args.checkpoint, device=device)
    misinformation.eval().requires_grad_(False)
    images, labels = load_split(meta.dataset, args.data_root, "test").tensors  # type: ignore[attr-defined]
    digits, labels = sample_test_digits(images, labels, args.n, args.seed)
    results = []
    for i, variant in enumerate(VARIANTS):  # each variant its own generator: the figures do not depend on the order
        g = torch.Generator().manual_seed(args.seed + i)
        r = measure_variant(variant, digits, labels, score, misinformation, g)
        results.append(r)
        print(f"  {variant.name:38s} flagged {100 * r['flag_rate']:6.2f}%  victim {100 * r['victim_accuracy']:6.2f}%"
              f"  right through the gate {100 * r['right_through_gate']:6.2f}%")  # fmt: skip
    checks: list[dict[str, Any]] = []
    if args.http_check:
        chosen = [v for v in VARIANTS if v.name in ("clean ink on paper, invert", "thinner, ink on paper, invert")]
        for variant in chosen:
            g = torch.Generator().manual_seed(args.seed + 1000 + len(checks))
            checks.append(check_over_http(variant, digits[: args.http_check], score, args.checkpoint, g))
            print(f"  over HTTP: {checks[-1]}")
    record = {
        "command": args.command_line,
        "seed": args.seed,
        "checkpoint": args.checkpoint,
        "victim_sha256": meta.sha256,
        "dataset": meta.dataset,
        "n": len(digits),
        "gate": {"method": score_meta.method, "threshold": score_meta.threshold, "sha256": score_meta.sha256},
        "variants": results,
        "http_check": checks,
        "seconds": round(time.time() - started, 1),
    }
    if baseline is not None:
        record["baseline"] = baseline_of(baseline, record)
    _write(args, record)
    return 0


def _write(args: argparse.Namespace, record: dict[str, Any]) -> None:
    from measure.formats_report import markdown

    out, report = flags.out_paths(args)
    if out:
        flags.write_json(out, record)
    if report:
        report.write_text(markdown(record))
        print(f"wrote {report}")
