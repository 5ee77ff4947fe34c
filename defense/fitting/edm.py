"""Training an Ensemble of Diverse Models (``defense/baselines/edm.py``: what it is, how it serves, how it is stored)
offline, on the victim's own data only.

N models f_1 … f_N of the victim's architecture are trained together with

    L = E_{(x, y) ~ D_in, x̃ ~ D_out} [ (1/N) Σ_i CE(f_i(x), y) + λ_D · DivLoss({f_i(x̃)}) ],
    DivLoss({ỹ_i}) = log Σ_{1 ≤ a < b ≤ N} exp(CS(ỹ_a, ỹ_b)),

CS the cosine similarity of two output probability vectors (``pairwise_cosine``).

D_out — ours, not the paper's. The paper (and the authors' code, as the talk in docs/design.md notes)
trains on the attacker's out-of-domain data; here D_out is only the synthetic outliers of
``defense/outliers.py`` (noise, blobs, shuffled patches and pixels, strong warps, overlaid digits) made
from the victim's own training images, a fresh batch every step. Nothing foreign (Fashion-MNIST is
lenet-mnist's attacker, MNIST lenet-fashionmnist's) is read by training or by the choice of N and λ_D;
``deepdefense edm --ood-dataset`` may *measure* the finished ensemble on one, after the choice.

N and λ_D are chosen on a held-out part of the victim's training split and synthetic outliers made from
it (in-domain accuracy of the served ensemble, mean coherence on the outliers); docs/design.md, "Ensemble
of Diverse Models", has the sweep and the measured figures.

:func:`fit_edm` is the whole pipeline (train, measure, save); ``deepdefense edm`` calls it.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap
from tqdm import tqdm

from deepdefense.common.options import described
from deepdefense.models.checkpoint import build_model, load_checkpoint, resolve_checkpoint
from deepdefense.models.data import load_split
from deepdefense.models.normalized import Normalized
from deepdefense.models.train import random_shift, seed_everything

from ..baselines.edm import EDMMeta, pairwise_cosine, save_ensemble
from ..outliers import OUTLIERS, synthesise

#: The shipped choice (``defense/baselines/edm.py``; docs/design.md has the sweep).
DEFAULT_MEMBERS = 5
DEFAULT_LAMBDA_D = 0.5


def div_loss(p: Tensor) -> Tensor:
    """DivLoss = log Σ_{a<b} exp(CS(p_a, p_b)) per query, for the members' probabilities ``p`` (N, B, K);
    shape (B,). A smooth maximum of the pairwise similarities: between log(N(N−1)/2) (every pair orthogonal)
    and log(N(N−1)/2) + 1 (all members proportional)."""
    return torch.logsumexp(pairwise_cosine(p), dim=0)


@dataclass(frozen=True)
class EDMConfig:
    """What :func:`fit_edm` trains; the fields with a description are ``deepdefense edm``'s flags."""

    checkpoint: str = described("lenet-mnist", help="the victim: shipped name or path to its metadata JSON")
    members: int = described(DEFAULT_MEMBERS, help="N, the ensemble's size (≥ 2)")
    lambda_d: float = described(DEFAULT_LAMBDA_D, help="λ_D, the weight of DivLoss")
    epochs: int = described(2, help="training epochs of the ensemble")
    # every member sees the same batch
    batch_size: int = described(128, help="in-domain images per step")
    # made from other training images of the fit split
    outlier_batch: int = described(64, help="synthetic outliers per step")
    lr: float = described(1e-3, help="learning rate")
    # of the in-domain images, as the victim was trained (models/train.py)
    max_shift: int = described(2, help="random translation in pixels for images ≤ 32 px (0: off)")
    # the choice of N and λ_D is made on them
    held_out: int = described(5000, help="training images kept out of training (the choice)")
    train_images: int | None = described(None, help="fit on only this many of the other training images (sweeps)")
    kinds: tuple[str, ...] = described(tuple(OUTLIERS), help="outlier kinds", choices=list(OUTLIERS))
    seed: int = described(0, help="seed of the members' initialisation and the data order")
    data_root: str | os.PathLike[str] | None = None
    save: str | os.PathLike[str] | None = None  # default: <victim>.edm beside the victim
    device: str = "cpu"
    progress: bool = True
    command: str = ""


@dataclass
class HeldOut:
    """The victim's training images kept out of training, and synthetic outliers made from them: what the
    choice of N and λ_D looks at."""

    x: Tensor
    y: Tensor
    outliers: Tensor
    kind: Tensor  # index into ``kinds`` per outlier
    kinds: tuple[str, ...]


def held_out_split(n: int, held_out: int, seed: int) -> tuple[Tensor, Tensor]:
    """(fit indices, held-out indices) of a training split of ``n`` images: a permutation seeded by ``seed``."""
    if not 0 < held_out < n:
        raise ValueError(f"held_out must be between 1 and {n - 1} (the training split has {n} images)")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[held_out:], perm[:held_out]


def _stacked(members: Sequence[nn.Module]) -> tuple[nn.Module, dict[str, Tensor], dict[str, Tensor]]:
    """A stateless copy of the architecture and the members' parameters and buffers stacked on a new first axis."""
    params, buffers = stack_module_state(list(members))
    return copy.deepcopy(members[0]).to("meta"), params, buffers


def ensemble_logits(base: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor) -> Tensor:
    """Every member's logits for ``x`` in one vectorised call; shape (N, B, K). Dropout draws differ per member."""

    def one(p: dict[str, Tensor], b: dict[str, Tensor], xx: Tensor) -> Tensor:
        return functional_call(base, (p, b), (xx,))

    return vmap(one, in_dims=(0, 0, None), randomness="different")(params, buffers, x)


def fit_ensemble(
    members: Sequence[Normalized], x: Tensor, y: Tensor, cfg: EDMConfig, generator: torch.Generator, shift: int
) -> list[Normalized]:
    """Minimise the EDM loss over the training images ``x`` with labels ``y``: each step an in-domain batch
    (random shifts, as the victim's recipe) and ``cfg.outlier_batch`` synthetic outliers (``cfg.kinds``,
    equal shares) made from other images of ``x``. Adam + one-cycle over all members at once. Returns the
    members (new modules, eval mode) with the trained weights."""
    device = torch.device(cfg.device)
    base, params, buffers = _stacked([m.to(device) for m in members])
    base.train()
    params = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    steps_per_epoch = len(x) // cfg.batch_size
    optimizer = torch.optim.Adam(params.values(), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, total_steps=max(cfg.epochs * steps_per_epoch, 1)
    )
    n = len(members)
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(x), generator=generator)[: steps_per_epoch * cfg.batch_size]
        bar = tqdm(
            order.split(cfg.batch_size), desc=f"edm {epoch + 1}/{cfg.epochs}", unit="batch", disable=not cfg.progress
        )
        for idx in bar:
            xi = random_shift(x[idx], shift, generator).to(device)
            source = x[torch.randint(len(x), (cfg.outlier_batch,), generator=generator)]
            outliers, _ = synthesise(source, generator, cfg.kinds)
            logits = ensemble_logits(base, params, buffers, torch.cat([xi, outliers.to(device)]))
            z_in, z_out = logits[:, : len(xi)], logits[:, len(xi) :]
            ce = F.cross_entropy(z_in.reshape(-1, z_in.shape[-1]), y[idx].to(device).repeat(n))
            div = div_loss(z_out.softmax(-1)).mean()
            loss = ce + cfg.lambda_d * div
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            bar.set_postfix(ce=f"{ce.item():.4f}", div=f"{div.item():.3f}")
    trained = []
    for i, member in enumerate(members):
        with torch.no_grad():
            for name, p in member.named_parameters():
                p.copy_(params[name][i])
        trained.append(member.eval())
    return trained


def train_ensemble(cfg: EDMConfig) -> tuple[list[Normalized], EDMMeta, HeldOut]:
    """An EDM ensemble for ``cfg.checkpoint``: ``cfg.members`` fresh models of its architecture and normalisation
    (seeded inits, all different) trained on its training split minus ``cfg.held_out`` images, against
    synthetic outliers made from the same images.

    Returns the members, their metadata (not yet saved: the caller adds the measured figures and calls
    :func:`save_ensemble`) and the held-out images with outliers made from them (generator ``seed + 2``),
    on which the choice of N and λ_D is made."""
    if cfg.members < 2:
        raise ValueError("an ensemble of diverse models needs at least two members")
    unknown = [k for k in cfg.kinds if k not in OUTLIERS]
    if unknown or not cfg.kinds:
        raise ValueError(f"unknown outlier kinds {unknown}; known: {', '.join(OUTLIERS)}")
    victim_path = resolve_checkpoint(cfg.checkpoint)
    _, victim = load_checkpoint(victim_path)  # verifies the victim's sha256 before we record it
    x, y = load_split(victim.dataset, cfg.data_root, "train").tensors  # type: ignore[attr-defined]
    fit_idx, held_idx = held_out_split(len(x), cfg.held_out, cfg.seed)
    fit_idx = fit_idx[: cfg.train_images]
    generator = seed_everything(cfg.seed)  # after the victim's load, whose model init draws random numbers
    members = [build_model(victim) for _ in range(cfg.members)]  # seeded inits, each its own
    shift = cfg.max_shift if victim.input_shape[-1] <= 32 else 0
    started = time.perf_counter()
    members = fit_ensemble(members, x[fit_idx], y[fit_idx], cfg, generator, shift)
    seconds = time.perf_counter() - started
    held_x = x[held_idx]
    outliers, kind = synthesise(held_x, torch.Generator().manual_seed(cfg.seed + 2), cfg.kinds)
    meta = EDMMeta(
        members=cfg.members,
        lambda_d=cfg.lambda_d,
        arch=victim.arch,
        dataset=victim.dataset,
        d_out={
            "what": "synthetic outliers (defense/outliers.py) made from the fit split of the victim's training images",
            "kinds": list(cfg.kinds),
            "per_step": cfg.outlier_batch,
            "never": f"any data set other than {victim.dataset} train (the attacker's queries); {victim.dataset} test",
        },
        training={
            "split": f"{victim.dataset} train: {len(fit_idx)} images fitted, {len(held_idx)} held out "
            f"(permutation seed {cfg.seed}); held-out outliers from generator seed {cfg.seed + 2}",
            "epochs": cfg.epochs,
            "batch_size": cfg.batch_size,
            "outlier_batch": cfg.outlier_batch,
            "lr": cfg.lr,
            "schedule": "Adam, one-cycle",
            "max_shift": shift,
            "seed": cfg.seed,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": cfg.device,
            "seconds": round(seconds, 1),
        },
        command=cfg.command,
    )
    return [m.cpu() for m in members], meta, HeldOut(held_x, y[held_idx], outliers, kind, tuple(cfg.kinds))


def fit_edm(
    cfg: EDMConfig, measure: Callable[[list[Normalized], EDMMeta, HeldOut], dict[str, Any]]
) -> tuple[Path, EDMMeta]:
    """Train the ensemble ``cfg`` describes (:func:`train_ensemble`), keep what ``measure`` (given the members,
    their metadata and the held-out images) returns as its measured figures, and write it at ``cfg.save``
    (default: ``<victim>.edm`` beside the victim); returns its metadata path and metadata."""
    members, meta, held = train_ensemble(cfg)
    meta.measured = measure(members, meta, held)
    return save_ensemble(members, meta, cfg.checkpoint, cfg.save), meta
