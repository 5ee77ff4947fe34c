"""What a thief's first answers alone are worth: an attack model trained (as every attack model of the
evaluation, ``clients/attack_model.py``'s recipe) on the first n answers of a stored transfer set, scored on the
victim's test split. For JBDA through the gate with the monitor, the first answers are the natural seed digits,
answered honestly before any rule can see the Jacobian steps that follow them (docs/results/below-label-line.md).

    python -m deepdefense.measure.first_answers --store runs/transfer-sets/<jbda store> --n 150 214 \
        --data-root ../shared/data
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from deepdefense.clients.attack_model import TrainingRecipe, build_attack_model, train_attack_model
from deepdefense.clients.transfer import TransferSet, TransferStore
from deepdefense.measure.markdown import module_command
from deepdefense.models.data import DatasetSpec, get_spec, load_split
from deepdefense.models.train import evaluate


def lenet_thief(data: TransferSet, loss: str, spec: DatasetSpec, seed: int) -> nn.Module:
    """A LeNet attack model with ``spec``'s normalisation (the data its queries come from) trained on ``data`` with
    ``loss``, as the evaluation trains its thieves (``clients/attack_model.py``'s recipe), on the CPU."""
    model = build_attack_model("lenet", len(spec.classes), (1, 28, 28), spec.mean, spec.std, seed)
    train_attack_model(
        model, data, loss=loss, interpreter="gradcam", recipe=TrainingRecipe(), seed=seed, device=torch.device("cpu"),
        progress=False,
    )  # fmt: skip
    return model


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", required=True, help="a transfer-set store (runs/transfer-sets/...)")
    p.add_argument("--n", type=int, nargs="+", required=True, help="first answers to train on")
    p.add_argument("--dataset", default="mnist", help="the victim's data set (normalisation and test split)")
    p.add_argument("--data-root", default=None, help="data sets in torchvision's layout ($DD_DATA_ROOT)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the record here as JSON")
    args = p.parse_args(argv)
    data = TransferStore.existing(args.store).load()
    spec, test = get_spec(args.dataset), load_split(args.dataset, args.data_root, "test")
    accuracy = {}
    for n in args.n:
        model = lenet_thief(data.prefix(n), "labels", spec, args.seed)
        accuracy[n] = round(evaluate(model, test, torch.device("cpu")), 2)
    command = module_command("deepdefense.measure.first_answers", argv)
    record = {"command": command, "store": Path(args.store).name, "seed": args.seed, "accuracy_first_n": accuracy}
    print(json.dumps(record, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
