"""The misinformation model of Adaptive Misinformation (Kariyappa & Qureshi, "Defending Against Model
Stealing Attacks with Adaptive Misinformation", CVPR 2020), and the blend that serves it.

The misinformation model f̂ has the victim's architecture and normalisation and is trained on the
victim's own training data, but to be *wrong*: it puts little probability on the true class while
staying a confident, ordinary-looking classifier. The gate (``defense/gate.py``) takes only its
ranking of the classes for out-of-domain queries (the attacker's): the answer's values and map stay the
served defense's, on classes that look plausible yet teach a clone the wrong labels.

Its checkpoint is an ordinary one (``models.checkpoint``: safetensors + metadata JSON with sha256,
loadable with ``load_checkpoint``); ``extra`` says what it is (``kind: "misinformation"``) and which
victim it belongs to (name and sha256 of the victim's weights). It lives next to the victim as
``<victim>-misinfo``; :func:`load_misinformation` refuses one made for other weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from models.checkpoint import (
    CheckpointError,
    CheckpointMeta,
    build_model,
    load_checkpoint,
    read_meta,
    resolve_checkpoint,
)
from models.data import load_split
from models.normalized import Normalized
from models.train import evaluate, random_shift, seed_everything

KIND = "misinformation"
SUFFIX = "-misinfo"


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


def misinformation_weight(score: Tensor | float, tau: float, nu: float) -> Tensor:
    """α = sigmoid(ν·(τ − score)) — AM's adaptive weight: near 0 for in-domain queries (score above the
    threshold τ), near 1 for out-of-domain ones; ν sets how sharp the switch is."""
    return torch.sigmoid(nu * (tau - torch.as_tensor(score, dtype=torch.float32)))


def blend(p_victim: Tensor, p_misinfo: Tensor, score: Tensor | float, tau: float, nu: float) -> Tensor:
    """p = (1 − α)·p_victim + α·p_misinfo with α = sigmoid(ν·(τ − score)) — AM's answer (§4, "Adaptive
    misinformation"; their score is the victim's maximum probability, an OOD detector).

    ``p_victim`` and ``p_misinfo`` are (B, K) probabilities, ``score`` is one value per row (B,) or one
    for all. A convex combination of two distributions, so each row still sums to 1.
    """
    return mix(p_victim, p_misinfo, misinformation_weight(score, tau, nu))


def mix(p_victim: Tensor, p_misinfo: Tensor, alpha: Tensor | float) -> Tensor:
    """(1 − α)·p_victim + α·p_misinfo for a given α (one per row, or one for all): the blend's body."""
    alpha = torch.as_tensor(alpha).to(p_victim)
    alpha = alpha.reshape(-1, 1) if alpha.dim() else alpha
    return (1.0 - alpha) * p_victim + alpha * p_misinfo


@dataclass(frozen=True)
class MisinfoConfig:
    victim: str  # checkpoint name or metadata path of the victim
    data_root: str | os.PathLike[str] | None
    epochs: int = 3
    batch_size: int = 128
    lr: float = 1e-3
    max_shift: int = 2  # random translation, as the victim was trained (models/train.py)
    balance: float = 1.0  # weight of answer_spread_penalty; 0 is AM's loss alone
    seed: int = 0
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
    """A misinformation model for ``cfg.victim``: its architecture and normalisation, its training split.

    Returns the model and its metadata (not yet written: the caller adds measured figures and saves
    with ``models.checkpoint.save_checkpoint``). ``test_accuracy`` is its top-1 accuracy on the
    victim's test split — near 0 when training worked.
    """
    victim_path = resolve_checkpoint(cfg.victim)
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


def misinformation_path(victim_checkpoint: str | os.PathLike[str]) -> Path:
    """Where a victim's misinformation model lives: ``<victim dir>/<victim>-misinfo`` (no suffix)."""
    victim = resolve_checkpoint(victim_checkpoint)
    return victim.parent / f"{victim.stem}{SUFFIX}"


def load_misinformation(
    victim_checkpoint: str | os.PathLike[str], *, device: str | torch.device = "cpu"
) -> tuple[Normalized, CheckpointMeta]:
    """The misinformation model made for ``victim_checkpoint`` (shipped name or metadata path).

    Refuses (``CheckpointError``) a missing one, weights whose sha256 differs from the metadata's, a
    checkpoint that is not a misinformation model, and one made for other victim weights: the
    victim's sha256 recorded at training must equal the victim metadata's — a retrained victim
    needs its misinformation model retrained too.
    """
    victim_path = resolve_checkpoint(victim_checkpoint)
    victim = read_meta(victim_path)
    path = misinformation_path(victim_path).with_suffix(".json")
    if not path.is_file():
        raise CheckpointError(
            f"no misinformation model for {victim_path.stem} (looked for {path.name} beside it; "
            f"make one with 'deepdefense misinfo --checkpoint {victim_path.stem}')"
        )
    model, meta = load_checkpoint(path, arch=victim.arch, device=device)
    if meta.extra.get("kind") != KIND:
        raise CheckpointError(f"checkpoint {path.stem} is not a misinformation model (kind {meta.extra.get('kind')!r})")
    recorded = str(meta.extra.get("victim_sha256", ""))
    if recorded != victim.sha256:
        raise CheckpointError(
            f"misinformation model {path.stem} belongs to victim weights {recorded[:12]}…, not to "
            f"{victim_path.stem} ({victim.sha256[:12]}…); refusing to load"
        )
    if (meta.classes, meta.input_shape, meta.mean, meta.std) != (
        victim.classes,
        victim.input_shape,
        victim.mean,
        victim.std,
    ):
        raise CheckpointError(f"misinformation model {path.stem} does not share {victim_path.stem}'s classes and input")
    return model, meta
