"""``deepdefense fidelity``: what a defense costs benign users, in-process on real test images."""

from __future__ import annotations

import argparse

from deepdefense import flags
from deepdefense.defense import DEFENSES

HELP = "measure what a defense costs benign users on real test images"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default="lenet-mnist", help="shipped checkpoint name or path to its metadata JSON")
    p.add_argument("--dataset", default=None, help="images to query with (default: the checkpoint's data set)")
    flags.add_data_root(p)
    p.add_argument("--defense", default="deepdefense", choices=DEFENSES, help="the defense measured")
    p.add_argument("--interpreter", default="gradcam", help="attribution method: gradcam, gradinput, relevancecam")
    p.add_argument("--n", type=int, default=1000, help="number of test images (the first n)")
    p.add_argument("--batch-size", type=int, default=64, help="queries per defense.answer call (a micro-batch)")
    flags.add_engine_options(p)
    flags.add_device(p)
    flags.add_out(p)


def run(args: argparse.Namespace) -> int:
    from deepdefense.common.device import resolve_device
    from deepdefense.defense.loader import load_defense
    from deepdefense.measure.fidelity import measure_fidelity
    from deepdefense.models.data import load_split

    device = resolve_device(args.device)
    options = flags.engine_options(args.engine)
    defense, meta = load_defense(
        args.checkpoint, args.defense, args.interpreter, device=device, data_root=args.data_root, **options
    )
    test = load_split(args.dataset or meta.dataset, args.data_root, "test")
    if not hasattr(test, "tensors"):
        raise ValueError("fidelity needs a tensor data set (MNIST-like or CIFAR)")
    images = test.tensors[0][: args.n].to(device)
    result = {
        "command": args.command_line,
        "checkpoint": args.checkpoint,
        "dataset": args.dataset or meta.dataset,
        "defense": args.defense,
        "interpreter": args.interpreter,
        "options": options,
        "device": str(device),
        "batch_size": args.batch_size,
        **measure_fidelity(defense, images, batch_size=args.batch_size).as_dict(),
    }
    return flags.print_report(result, args.out)
