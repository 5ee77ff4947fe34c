"""Ensemble of Diverse Models (Kariyappa, Prakash, Qureshi, "Protecting DNNs from theft using an ensemble
of diverse models", ICLR 2021), trained on the victim's own data only.

N models f_1 … f_N of the victim's architecture are trained together with

    L = E_{(x, y) ~ D_in, x̃ ~ D_out} [ (1/N) Σ_i CE(f_i(x), y) + λ_D · DivLoss({f_i(x̃)}) ],
    DivLoss({ỹ_i}) = log Σ_{1 ≤ a < b ≤ N} exp(CS(ỹ_a, ỹ_b)),

CS the cosine similarity of two output probability vectors, so that the members agree in domain and point
their probabilities in different directions out of domain; how far they do is measured by the coherence
max_{a ≠ b} CS(ỹ_a, ỹ_b) (1: all members give proportional answers; 0 for N = 2: disjoint supports).
A query is answered by one member, picked by a hash of the query (:func:`member_index`): the same query
always gets the same member, different queries spread over all of them, so an attacker's out-of-domain
queries get answers from a function that jumps between members from one query to the next.

D_out — ours, not the paper's. The paper (and the authors' code, as the talk in docs/design.md notes)
trains on the attacker's out-of-domain data; here D_out is only the synthetic outliers of
``defense/outliers.py`` (noise, blobs, shuffled patches and pixels, strong warps, overlaid digits) made
from the victim's own training images, a fresh batch every step. Nothing foreign (Fashion-MNIST is
lenet-mnist's attacker, MNIST lenet-fashionmnist's) is read by training or by the choice of N and λ_D;
``deepdefense edm --ood-dataset`` may *measure* the finished ensemble on one, after the choice.

N and λ_D are chosen on a held-out part of the victim's training split and synthetic outliers made from
it (in-domain accuracy of the served ensemble, mean coherence on the outliers); docs/design.md, "Ensemble
of Diverse Models", has the sweep and the measured figures.

Answers: the picked member's probabilities, its top-1 as the label and its attribution map for that label
through the same interpreter as the victim's (one interpreter per member), so label and map agree. The
victim itself never answers. ``Answer.stats["member"]`` says which member answered; like every defense's
stats it stays on the server (never sent, not in the metrics).

Shipped beside the victim as ``<victim>.edm.safetensors`` (the members' weights, ``member<i>/<name>``)
and ``<victim>.edm.json`` (:class:`EDMMeta`: the tensors' sha256, the victim's name and weights sha256,
how it was trained, what was measured); :func:`load_ensemble` verifies both.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap
from tqdm import tqdm

from models.checkpoint import (
    CheckpointError,
    build_model,
    load_checkpoint,
    read_meta,
    resolve_checkpoint,
    sha256_file,
    verified_weights,
)
from models.data import load_split
from models.normalized import Normalized
from models.train import random_shift, seed_everything

from ..api import Answer, Defense, NoDefense
from ..domain import state_sha256
from ..interpreters import Interpreter, create_interpreter
from ..outliers import OUTLIERS, synthesise

KIND = "edm"
#: ``<victim>.edm.json`` / ``.safetensors``.
SUFFIX = ".edm"
#: The shipped choice (module docstring; docs/design.md has the sweep).
DEFAULT_MEMBERS = 5
DEFAULT_LAMBDA_D = 0.5
#: How :func:`member_index` picks a member, as stated in the metadata and the public settings.
MEMBER_CHOICE = "sha256 of the query's float32 bytes (C, H, W, row-major; -0.0 as 0.0), first 8 bytes big-endian, mod N"

_EPS = 1e-12


class EDMError(CheckpointError):
    """An ensemble that cannot be used with this victim: missing, tampered with, or made for other weights."""


# --- the losses and the measure of agreement ------------------------------------------------------------------


def pairwise_cosine(p: Tensor) -> Tensor:
    """CS(p_a, p_b) for every pair a < b of the N members' outputs ``p`` (N, B, K); shape (N(N−1)/2, B),
    pairs in the order of ``torch.triu_indices(N, N, 1)``."""
    n = p.shape[0]
    if n < 2:
        raise ValueError("an ensemble needs at least two members to compare")
    unit = p / p.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    a, b = torch.triu_indices(n, n, 1, device=p.device)
    return (unit[a] * unit[b]).sum(-1)


def div_loss(p: Tensor) -> Tensor:
    """DivLoss = log Σ_{a<b} exp(CS(p_a, p_b)) per query, for the members' probabilities ``p`` (N, B, K);
    shape (B,). A smooth maximum of the pairwise similarities: between log(N(N−1)/2) (every pair orthogonal)
    and log(N(N−1)/2) + 1 (all members proportional)."""
    return torch.logsumexp(pairwise_cosine(p), dim=0)


def coherence(p: Tensor) -> Tensor:
    """max_{a ≠ b} CS(p_a, p_b) per query for the members' probabilities ``p`` (N, B, K); shape (B,)."""
    return pairwise_cosine(p).amax(0)


def member_index(x: Tensor, n: int, key: bytes = b"") -> Tensor:
    """The member that answers each query of ``x`` (B, …): the sha256 of ``key`` followed by the query's
    float32 bytes (its own values, row-major; −0.0 counted as 0.0), its first 8 bytes read as a big-endian
    integer, mod ``n``. Shape (B,), int64, on the CPU.

    A pure function of the query's values: the same query gets the same member in any batch, on any device
    and in any process (no Python ``hash``, no seed); the 2⁶⁴ mod n bias is below 10⁻¹⁸. With an empty
    ``key`` anyone who knows this rule can tell which member answers a query; a deployment that wants the
    choice hidden sets a secret ``key`` (the ``hash_key`` option of the defense)."""
    if n < 1:
        raise ValueError("n must be positive")
    rows = (x.detach().to("cpu", torch.float32) + 0.0).contiguous().reshape(len(x), -1).numpy()
    picks = [int.from_bytes(hashlib.sha256(key + row.tobytes()).digest()[:8], "big") % n for row in rows]
    return torch.tensor(picks, dtype=torch.long)


# --- training -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EDMConfig:
    victim: str  # checkpoint name or metadata path of the victim
    data_root: str | os.PathLike[str] | None
    members: int = DEFAULT_MEMBERS
    lambda_d: float = DEFAULT_LAMBDA_D
    epochs: int = 2
    batch_size: int = 128  # in-domain images per step (every member sees the same batch)
    outlier_batch: int = 64  # synthetic outliers per step, made from other training images of the fit split
    lr: float = 1e-3
    max_shift: int = 2  # random translation of the in-domain images, as the victim was trained (models/train.py)
    held_out: int = 5000  # training images kept out of training: the choice of N and λ_D is made on them
    train_images: int | None = None  # fit on only the first this many of the rest (quick sweeps and tests)
    kinds: tuple[str, ...] = tuple(OUTLIERS)
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    command: str = ""


@dataclass
class EDMMeta:
    """What a saved ensemble is, what it belongs to, how it was trained and what was measured."""

    members: int
    lambda_d: float
    arch: str
    dataset: str
    d_out: dict[str, Any]  # what the out-of-domain side of the loss was made of, and what was never read
    training: dict[str, Any]  # epochs, batch sizes, lr, seed, held-out split, torch, threads, seconds
    command: str
    member_choice: str = MEMBER_CHOICE
    kind: str = KIND
    victim: dict[str, str] = field(default_factory=dict)  # checkpoint name, weights file, sha256
    measured: dict[str, Any] = field(default_factory=dict)
    weights: str = ""
    sha256: str = ""


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
    """An EDM ensemble for ``cfg.victim``: ``cfg.members`` fresh models of its architecture and normalisation
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
    victim_path = resolve_checkpoint(cfg.victim)
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


# --- storage --------------------------------------------------------------------------------------------------


def ensemble_paths(checkpoint: str | os.PathLike[str]) -> tuple[Path, Path]:
    """(ensemble metadata JSON, victim metadata JSON) of a checkpoint name or metadata JSON."""
    victim = resolve_checkpoint(checkpoint)
    return victim.parent / f"{victim.stem}{SUFFIX}.json", victim


def save_ensemble(
    members: Sequence[nn.Module],
    meta: EDMMeta,
    checkpoint: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
) -> Path:
    """Write ``<out>.safetensors`` (member i's weights as ``member<i>/<name>``) and ``<out>.json`` (default:
    ``<victim>.edm`` beside the victim); fills in the tensors' name and sha256 and the victim's identity.
    Returns the JSON path."""
    meta_path, victim_path = ensemble_paths(checkpoint)
    if out is not None:
        stem = Path(out).with_suffix("") if Path(out).suffix in (".json", ".safetensors") else Path(out)
        meta_path = stem.parent / f"{stem.name}.json"
    meta_path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"member{i}/{k}": v.detach().cpu().contiguous()
        for i, m in enumerate(members)
        for k, v in getattr(m, "net", m).state_dict().items()
    }
    weights = meta_path.with_suffix(".safetensors")
    weights.write_bytes(save(tensors))  # through open(): readable by a server running as another user
    victim = read_meta(victim_path)
    meta.members = len(members)
    meta.victim = {"checkpoint": victim_path.stem, "weights": victim.weights, "sha256": victim.sha256}
    meta.weights, meta.sha256 = weights.name, sha256_file(weights)
    meta_path.write_text(json.dumps(asdict(meta), indent=2) + "\n")
    return meta_path


def read_ensemble_meta(meta_path: Path) -> EDMMeta:
    try:
        return EDMMeta(**json.loads(meta_path.read_text()))
    except (json.JSONDecodeError, TypeError) as err:
        raise EDMError(f"ensemble metadata {meta_path.name} is malformed: {err}") from None


def load_ensemble(
    checkpoint: str | os.PathLike[str], model: nn.Module | None = None, *, device: str | torch.device = "cpu"
) -> tuple[list[Normalized], EDMMeta]:
    """The ensemble shipped for ``checkpoint`` (frozen members in eval mode) and its metadata.

    Refuses (:class:`EDMError`) a missing one (the message says how to make it), tensors whose sha256 is not
    the recorded one, an ensemble made for other victim weights than the checkpoint's, a ``model`` (the
    victim, already loaded) whose weights are not the checkpoint's, and weights that do not fit the victim's
    architecture."""
    meta_path, victim_path = ensemble_paths(checkpoint)
    if not meta_path.is_file():
        raise EDMError(
            f"checkpoint {victim_path.stem} ships no ensemble of diverse models (looked for {meta_path.name} beside "
            f"it); run deepdefense edm --checkpoint {victim_path.stem}"
        )
    meta = read_ensemble_meta(meta_path)
    if meta.kind != KIND:
        raise EDMError(f"{meta_path.name} is not an ensemble of diverse models (kind {meta.kind!r})")
    weights = verified_weights(meta_path, meta.weights, meta.sha256, "ensemble", EDMError)
    victim = read_meta(victim_path)
    recorded = str(meta.victim.get("sha256", ""))
    if recorded != victim.sha256:
        raise EDMError(
            f"ensemble {meta_path.stem} was trained for victim weights {recorded[:12]}…, checkpoint "
            f"{victim_path.stem} has {victim.sha256[:12]}…; refusing to load (retrain it: deepdefense edm "
            f"--checkpoint {victim_path.stem})"
        )
    if model is not None and state_sha256(model) != victim.sha256:
        raise EDMError(f"ensemble {meta_path.stem}: the model given is not checkpoint {victim_path.stem}'s weights")
    try:
        tensors = load_file(str(weights))
    except SafetensorError as err:
        raise EDMError(f"ensemble {meta_path.stem}: {err}") from None
    members = []
    for i in range(meta.members):
        prefix = f"member{i}/"
        member = build_model(victim)
        try:
            member.net.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0]
            raise EDMError(f"ensemble {meta_path.stem}: member {i} does not fit {victim.arch!r} ({first})") from None
        members.append(member.to(device).eval().requires_grad_(False))
    if len(tensors) != sum(len(m.net.state_dict()) for m in members):
        raise EDMError(f"ensemble {meta_path.stem}: its tensors are not those of {meta.members} members")
    return members, meta


# --- serving --------------------------------------------------------------------------------------------------


class EnsembleOfDiverseModels(Defense):
    """EDM: each query answered by the member :func:`member_index` picks — that member's probabilities, its
    top-1 and its own attribution map through the victim's interpreter. The victim (``self.model``) is kept
    for what wraps a defense (the gate's domain score) and never answers."""

    name = "edm"

    def __init__(
        self,
        model: nn.Module,
        interpreter: Interpreter,
        *,
        members: Sequence[nn.Module],
        info: EDMMeta | None = None,
        hash_key: str = "",
    ) -> None:
        super().__init__(model, interpreter)
        if len(members) < 2:
            raise ValueError("an ensemble of diverse models needs at least two members")
        self.members = tuple(members)
        self.answerers = tuple(
            NoDefense(m, create_interpreter(interpreter.name, m, interpreter.input_shape)) for m in self.members
        )
        self.info = info
        self.key = hash_key.encode()

    def public_settings(self) -> dict[str, Any]:
        settings: dict[str, Any] = {
            "members": len(self.members),
            "member_choice": ("keyed " if self.key else "") + MEMBER_CHOICE,
        }
        if self.info is not None:
            settings |= {
                "lambda_d": self.info.lambda_d,
                "d_out": f"synthetic outliers made from {self.info.dataset} training images "
                f"({', '.join(self.info.d_out.get('kinds', []))})",
                "epochs": self.info.training.get("epochs"),
                "seed": self.info.training.get("seed"),
            }
        return settings

    def answer(self, x: Tensor, *, explain: bool = True) -> list[Answer]:
        picks = member_index(x, len(self.members), self.key)
        answers: list[Answer | None] = [None] * len(x)
        for i in picks.unique().tolist():
            rows = (picks == i).nonzero().flatten()
            member_answers = self.answerers[i].answer(x[rows.to(x.device)], explain=explain)
            for r, a in zip(rows.tolist(), member_answers, strict=True):
                answers[r] = replace(a, stats={"member": float(i)})
        return answers  # type: ignore[return-value]  # every row belongs to exactly one member
