"""Write .tune/data.pt for tune_gpu.py: the 10,000 Fashion-MNIST training images the attack sends
(seed 0, the same draw as 'deepdefense attack' / 'deepdefense eval') and the MNIST test set, as uint8.

    python docs/results/attack-tuning/prepare.py ../shared/data
"""

import sys
from pathlib import Path

import torch

from deepdefense.clients.attack import sample_queries
from deepdefense.models.data import load_split

root = sys.argv[1]
pool = load_split("fashionmnist", root, "train").tensors[0]
q = (pool[sample_queries(len(pool), 10000, 0)] * 255).round().to(torch.uint8)
tx, ty = load_split("mnist", root, "test").tensors
Path(".tune").mkdir(exist_ok=True)
torch.save({"queries": q, "test_x": (tx * 255).round().to(torch.uint8), "test_y": ty}, ".tune/data.pt")
