"""Training the misinformation model of Adaptive Misinformation (``defense/misinformation.py``: what it is, how it
is served and stored) offline, on the victim's own training split: the victim's architecture and normalisation,
trained to be confidently *wrong*. :func:`fit_misinformation_model` is the whole pipeline (train, measure, save);
``deepdefense misinfo`` calls it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from deepdefense.common.options import described
from deepdefense.models.checkpoint import (
    CheckpointMeta,
    build_model,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from deepdefense.models.data import load_split
from deepdefense.models.normalized import Normalized
from deepdefense.models.train import evaluate, random_shift, seed_everything

from ..misinformation import KIND, misinformation_path


def misinformation_loss(logits: Tensor, y: Tensor) -> Tensor:
    """L(θ̂) = (1/B) Σ_b −log(1 − f̂(x_b; θ̂)_{y_b}) — AM's misinformation objective (§4, "Misinformation
    function"): minimising it maximises the probability of being wrong.

    Written as log(1 − p_y) = logsumexp_{k≠y} z_k − logsumexp_k z_k, so it stays finite and keeps
    its gradient when p_y rounds to 1 in float32 (the naive ``log(1 - softmax)`` gives inf there,
    which is exactly where a freshly started model needs the push). ∂L/∂z_y = p_y > 0: a descent
    step lowers the true class's logit; the others rise in proportion to their own probability,
    so the mass goes to the classes the model already finds likely (a confident wrong answer,
    not a uniform one).
    """
    true = torch.nn.functional.one_hot(y, logits.shape[-1]).bool()
    others = logits.masked_fill(true, float("-inf"))
    return (torch.logsumexp(logits, -1) - torch.logsumexp(others, -1)).mean()


def answer_spread_penalty(logits: Tensor) -> Tensor:
    """R = (1/B) Σ_b H(p_b) + KL(p̄ ‖ u) = log K − I(x; ŷ) over the batch, p̄ = (1/B) Σ_b p_b, u uniform.

    Our addition to AM's loss (weight ``balance``): −log(1 − p_true) is indifferent to *which* wrong class
    gets the mass, and the easiest way to be wrong is to say one class: a LeNet trained on it alone (3
    MNIST epochs, seed 0) answers "1" to 57% of the test set (every 0, most other digits; "0" to every 1).
    Each answer is confident, yet over a handful of queries the collapse is obvious. The first term keeps
    each answer confident (low entropy, not uniform), the second spreads the answers over all classes;
    together they maximise the information the answer carries about the input, as an honest
    classifier's would, while the AM term keeps it wrong (docs/results/misinformation.md has both).
    """
    log_p = logits.log_softmax(-1)
    p = log_p.exp()
    conditional = -(p * log_p).sum(-1).mean()
    marginal = p.mean(0)
    return conditional + (marginal * (marginal * logits.shape[-1]).clamp_min(1e-12).log()).sum()


@dataclass(frozen=True)
class MisinfoConfig:
    """What :func:`fit_misinformation_model` trains; the fields with a description are ``deepdefense misinfo``'s
    flags."""

    checkpoint: str = described("lenet-mnist", help="the victim: shipped name or path to its metadata JSON")
    epochs: int = described(3, help="training epochs")
    batch_size: int = described(128, help="training batch size")
    lr: float = described(1e-3, help="learning rate")
    max_shift: int = described(2, help="random translation in pixels for images ≤ 32 px (0: off)")
    balance: float = described(
        1.0,
        help="weight of the answer-spread term (confident answers over all classes); 0: AM's loss alone",
    )
    seed: int = described(0, help="seed of the initialisation and the data order")
    data_root: str | os.PathLike[str] | None = None
    save: str | os.PathLike[str] | None = None  # default: <victim>-misinfo beside the victim
    device: str = "cpu"
    progress: bool = True
    command: str = ""


def fit_misinformation(
    model: Normalized, train_set: Dataset, cfg: MisinfoConfig, generator: torch.Generator, shift: int
) -> Normalized:
    """Minimise :func:`misinformation_loss` + ``cfg.balance`` · :func:`answer_spread_penalty` over ``train_set``
    (Adam + one-cycle and random shifts, as the victim's recipe)."""
    device = torch.device(cfg.device)
    model.to(device)
    loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, generator=generator, drop_last=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * len(loader))
    for epoch in range(cfg.epochs):
        model.train()
        bar = tqdm(loader, desc=f"misinfo {epoch + 1}/{cfg.epochs}", unit="batch", disable=not cfg.progress)
        for x, y in bar:
            x = random_shift(x, shift, generator).to(device)
            logits = model(x)
            loss = misinformation_loss(logits, y.to(device))
            if cfg.balance:
                loss = loss + cfg.balance * answer_spread_penalty(logits)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return model.eval()


def train_misinformation(cfg: MisinfoConfig) -> tuple[Normalized, CheckpointMeta]:
    """A misinformation model for ``cfg.checkpoint``: its architecture and normalisation, its training split.

    Returns the model and its metadata (not yet written: the caller adds measured figures and saves
    with ``models.checkpoint.save_checkpoint``). ``test_accuracy`` is its top-1 accuracy on the
    victim's test split — near 0 when training worked.
    """
    victim_path = resolve_checkpoint(cfg.checkpoint)
    _, victim = load_checkpoint(victim_path)  # verifies the victim's sha256 before we record it
    generator = seed_everything(cfg.seed)  # after the victim's load, whose model init draws random numbers
    meta = CheckpointMeta(
        arch=victim.arch,
        dataset=victim.dataset,
        classes=list(victim.classes),
        input_shape=list(victim.input_shape),
        mean=list(victim.mean),
        std=list(victim.std),
        test_accuracy=0.0,
        seed=cfg.seed,
        command=cfg.command,
        extra={
            "kind": KIND,
            "victim": victim_path.stem,
            "victim_sha256": victim.sha256,
            "loss": "mean -log(1 - p_true) (Adaptive Misinformation, Kariyappa & Qureshi, CVPR 2020) "
            "+ balance * (mean H(p) + KL(mean p || uniform))",
            "balance": cfg.balance,
            "train_split": f"{victim.dataset} train",
            "epochs": cfg.epochs,
            "batch_size": cfg.batch_size,
            "lr": cfg.lr,
            "max_shift": cfg.max_shift,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
    )
    model = build_model(meta)  # seeded init: same seed, same start
    train_set = load_split(victim.dataset, cfg.data_root, "train")
    shift = cfg.max_shift if victim.input_shape[-1] <= 32 else 0
    model = fit_misinformation(model, train_set, cfg, generator, shift)
    test_set = load_split(victim.dataset, cfg.data_root, "test")
    meta.test_accuracy = round(evaluate(model, test_set, torch.device(cfg.device)), 2)
    return model.cpu(), meta


def fit_misinformation_model(
    cfg: MisinfoConfig, measure: Callable[[Normalized], dict[str, Any]]
) -> tuple[Path, CheckpointMeta]:
    """Train the misinformation model ``cfg`` describes (:func:`train_misinformation`), keep what ``measure``
    (given the trained model) returns in its metadata (``extra["measured"]``), and write it as a checkpoint at
    ``cfg.save`` (default: ``<victim>-misinfo`` beside the victim); returns its metadata path and metadata."""
    model, meta = train_misinformation(cfg)
    meta.extra["measured"] = measure(model)
    return save_checkpoint(model, meta, cfg.save or misinformation_path(cfg.checkpoint)), meta
