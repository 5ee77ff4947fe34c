"""The attack model f_A(·; w_A) of DeepDefense §3: built and trained on a transfer set.

Training is seeded end to end (initial weights, batch order, dropout), so a resumed attack trains
the same substitutes as an uninterrupted one. Defaults (Adam, lr 1e-3, batch 64, cosine decay of
the learning rate to 0 over all steps, 60 epochs) were chosen on lenet-mnist undefended at
B = 10,000; docs/results/attack-tuning.md has the runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from tqdm import tqdm

from deepdefense.clients.attack_losses import AttackLoss, attack_loss, kept_answers
from deepdefense.clients.transfer import TransferSet
from deepdefense.common.options import described
from deepdefense.defense.interpreters import create_interpreter
from deepdefense.models.normalized import Normalized
from deepdefense.models.registry import create_model

Optimizer = Literal["adam", "sgd"]
Schedule = Literal["cosine", "constant"]
OPTIMIZERS: tuple[Optimizer, ...] = ("adam", "sgd")
SCHEDULES: tuple[Schedule, ...] = ("cosine", "constant")


@dataclass(frozen=True)
class TrainingRecipe:
    """How an attack model is trained: one type for ``deepdefense attack`` and the evaluation harness."""

    epochs: int = described(60, help="training epochs of the attack model")
    batch_size: int = described(64, help="training batch size")
    lr: float = described(1e-3, help="learning rate")
    # λ of eq. (1); chosen on lenet-mnist, undefended, B = 10,000 (docs/results/attack-tuning.md)
    lam: float = described(1e-2, help="weight of the map term of eq. (1)", flag="--lambda")
    optimizer: Optimizer = described("adam", help="the attack model's optimizer")
    schedule: Schedule = described("cosine", help="cosine: the learning rate decays to 0 over all steps")
    weight_decay: float = described(0.0, help="L2 weight decay")


def build_attack_model(
    arch: str, num_classes: int, input_shape: Sequence[int], mean: Sequence[float], std: Sequence[float], seed: int
) -> Normalized:
    """A freshly initialised ``arch`` (weights drawn from ``seed``) normalising with the attacker's statistics."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = create_model(arch, num_classes=num_classes, in_channels=input_shape[0])
    return Normalized(net, mean, std)


def make_optimizer(
    model: nn.Module, optimizer: Optimizer, lr: float, weight_decay: float, schedule: Schedule, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    """Adam, or SGD with Nesterov momentum 0.9; with ``cosine`` the learning rate decays to 0 over
    ``total_steps`` (one step per batch), with ``constant`` it stays at ``lr``."""
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}; known: {', '.join(OPTIMIZERS)}")
    if schedule == "cosine":
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total_steps, 1))
    if schedule == "constant":
        return opt, None
    raise ValueError(f"unknown schedule {schedule!r}; known: {', '.join(SCHEDULES)}")


def train_attack_model(
    model: nn.Module,
    data: TransferSet,
    *,
    loss: AttackLoss,
    interpreter: str,
    recipe: TrainingRecipe,
    seed: int,
    device: torch.device,
    progress: bool = True,
) -> list[float]:
    """The recipe's optimizer on the attack loss for ``recipe.epochs`` passes over ``data`` (over the answers
    the attacker keeps, for the filtering attackers); the mean loss of every epoch."""
    mask = kept_answers(loss, data.probabilities)
    if mask is not None:
        data = data.select(mask)
        if len(data) == 0:
            raise ValueError(f"the {loss} attacker keeps none of the {len(mask)} answers")
    epochs, batch_size, lam = recipe.epochs, recipe.batch_size, recipe.lam
    model.to(device).train()
    explainer = create_interpreter(interpreter, model, tuple(data.images.shape[1:]))
    opt, scheduler = make_optimizer(
        model,
        recipe.optimizer,
        recipe.lr,
        recipe.weight_decay,
        recipe.schedule,
        epochs * math.ceil(len(data) / batch_size),
    )
    generator = torch.Generator().manual_seed(seed)
    maps = data.attributions
    history: list[float] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for epoch in range(epochs):
            order = torch.randperm(len(data), generator=generator)
            total = 0.0
            bar = tqdm(
                order.split(batch_size),
                desc=f"train {loss} {epoch + 1}/{epochs}",
                unit="batch",
                leave=False,
                disable=not progress,
            )
            for idx in bar:
                value = attack_loss(
                    loss,
                    model,
                    explainer,
                    data.images[idx].to(device),
                    data.labels[idx].to(device),
                    data.probabilities[idx].to(device),
                    maps[idx].to(device) if maps is not None else None,
                    lam,
                )
                opt.zero_grad(set_to_none=True)
                value.backward()
                opt.step()
                if scheduler is not None:
                    scheduler.step()
                total += float(value.detach()) * len(idx)
                bar.set_postfix(loss=f"{float(value.detach()):.4f}")
            history.append(total / len(data))
    model.eval()
    return history
