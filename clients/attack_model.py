"""The attack model f_A(·; w_A) of DeepDefense §3: built and trained on a transfer set.

Training is seeded end to end (initial weights, batch order, dropout), so a resumed attack trains
the same substitutes as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from tqdm import tqdm

from defense.interpreters import create_interpreter
from models.normalized import Normalized
from models.registry import create_model

from .attack_losses import AttackLoss, attack_loss
from .transfer import TransferSet


def build_attack_model(arch: str, num_classes: int, input_shape: Sequence[int], mean: Sequence[float],
                       std: Sequence[float], seed: int) -> Normalized:
    """A freshly initialised ``arch`` (weights drawn from ``seed``) normalising with the attacker's statistics."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = create_model(arch, num_classes=num_classes, in_channels=input_shape[0])
    return Normalized(net, mean, std)


def train_attack_model(model: nn.Module, data: TransferSet, *, loss: AttackLoss, interpreter: str, epochs: int,
                       batch_size: int, lr: float, lam: float, seed: int, device: torch.device,
                       progress: bool = True) -> list[float]:
    """Adam on the attack loss for ``epochs`` passes over ``data``; the mean loss of every epoch."""
    model.to(device).train()
    explainer = create_interpreter(interpreter, model, tuple(data.images.shape[1:]))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    maps = data.attributions
    history: list[float] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for epoch in range(epochs):
            order = torch.randperm(len(data), generator=generator)
            total = 0.0
            bar = tqdm(order.split(batch_size), desc=f"train {loss} {epoch + 1}/{epochs}", unit="batch",
                       leave=False, disable=not progress)
            for idx in bar:
                value = attack_loss(loss, model, explainer, data.images[idx].to(device), data.labels[idx].to(device),
                                    data.probabilities[idx].to(device),
                                    maps[idx].to(device) if maps is not None else None, lam)
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                optimizer.step()
                total += float(value.detach()) * len(idx)
                bar.set_postfix(loss=f"{float(value.detach()):.4f}")
            history.append(total / len(data))
    model.eval()
    return history

