"""``deepdefense detectors``: can a thief tell the gate's misinformed answers from honest ones? The twin
test and a classifier on the answer's shape, before and after the gate's second round
(docs/results/gate-detectors.md; measure/detectors.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from deepdefense import flags

HELP = "balanced accuracy of a thief's twin-test and answer-shape detectors against the misinformation gate"
DESCRIPTION = (
    "Answers --n test images of the victim's data set and of --foreign through both paths of the gate the "
    "server runs (the wrapped defense, and the same made to misinform), each again with one pixel moved by 1/255, fits "
    "each detector on half the images and scores it on the other half."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default="lenet-mnist", help="a checkpoint that ships the gate")
    p.add_argument("--defense", default="deepdefense", help="the defense behind the gate, as served")
    p.add_argument("--interpreter", default="gradcam", help="the attribution method, as served")
    flags.add_data_root(p)
    p.add_argument("--foreign", default="fashionmnist", help="a data set of another domain (measured on, never fit)")
    p.add_argument("--n", type=int, default=500, help="test images per pool")
    p.add_argument("--seed", type=int, default=0, help="seed of the fit/test split")
    p.add_argument("--first-try", default=None, help="the record of an earlier run to show beside this one (its JSON)")
    flags.add_out(p, report="docs/results/gate-detectors.md")
    flags.add_device(p)


def run(args: argparse.Namespace) -> int:
    from deepdefense.common.device import resolve_device
    from deepdefense.common.provenance import provenance
    from deepdefense.measure.detectors import run_detectors
    from deepdefense.measure.detectors_report import markdown

    device = resolve_device(args.device)
    result = run_detectors(
        args.checkpoint, args.defense, args.interpreter, args.foreign, args.n, args.seed, device, args.data_root
    )
    record = {
        "command": args.command_line,
        "checkpoint": args.checkpoint,
        "defense": args.defense,
        "interpreter": args.interpreter,
        "seed": args.seed,
        "measured": provenance(),
        **result,
    }
    if args.first_try:
        record["first_try"] = json.loads(Path(args.first_try).read_text())
        record["first_try_record"] = args.first_try
    print(json.dumps(result, indent=1))
    flags.write_outputs(args, record, markdown)
    return 0
