"""Train a model the way a provider would outside this project: plain PyTorch and torchvision, no `deepdefense
train`. Writes ``<out>/weights.pt`` (the state dict) and ``<out>/model.toml`` (its description), which
`deepdefense prepare --from <out>/model.toml` turns into a defended checkpoint (docs/own-model.md).

    python docs/examples/train_outside.py --data-root ../shared/data --out own-model

The network is the registered ``lenet`` architecture (models/lenet.py), trained differently from the project's
recipe: SGD with momentum, inputs normalised to [-1, 1] by torchvision's Normalize(0.5, 0.5), no augmentation.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from deepdefense.models.registry import create_model

SETS = {"mnist": datasets.MNIST, "fashionmnist": datasets.FashionMNIST}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", required=True, help="folder holding MNIST/ and FashionMNIST/ (torchvision layout)")
    p.add_argument("--dataset", default="mnist", choices=sorted(SETS))
    p.add_argument("--out", default="own-model", help="folder for weights.pt and model.toml")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    to_input = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
    train = SETS[args.dataset](args.data_root, train=True, transform=to_input)
    test = SETS[args.dataset](args.data_root, train=False, transform=to_input)
    loader = DataLoader(train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(args.seed))
    net = create_model("lenet", num_classes=10, in_channels=1)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    started = time.time()
    for epoch in range(args.epochs):
        net.train()
        for x, y in loader:
            loss = nn.functional.cross_entropy(net(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        print(f"epoch {epoch + 1}: last batch loss {loss.item():.4f} ({time.time() - started:.0f} s)")
    net.eval()
    with torch.no_grad():
        correct = sum(int((net(x).argmax(1) == y).sum()) for x, y in DataLoader(test, batch_size=1000))
    print(f"test accuracy {100 * correct / len(test):.2f}%")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), out / "weights.pt")
    classes = ", ".join(f'"{c}"' for c in train.classes)
    (out / "model.toml").write_text(
        f"""# what the model reads: written once by whoever trained it (docs/own-model.md)
arch = "lenet"                  # registered architecture whose state dict weights.pt is
weights = "weights.pt"          # relative to this file
format = "state_dict"
dataset = "{args.dataset}"            # prepare fits and measures on this data set's splits
input_shape = [1, 28, 28]
value_range = [0.0, 1.0]        # ToTensor(): black 0, white 1
classes = [{classes}]
source = "docs/examples/train_outside.py --dataset {args.dataset} --epochs {args.epochs} --seed {args.seed}"
seed = {args.seed}

[normalisation]                 # Normalize((0.5,), (0.5,)) after ToTensor()
mean = [0.5]
std = [0.5]
"""
    )
    print(f"wrote {out / 'weights.pt'} and {out / 'model.toml'}")


if __name__ == "__main__":
    main()
