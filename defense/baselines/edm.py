"""Ensemble of Diverse Models (Kariyappa, Prakash, Qureshi, "Protecting DNNs from theft using an ensemble
of diverse models", ICLR 2021), trained on the victim's own data only.

N members of the victim's architecture, trained together (``defense/fitting/edm.py``) so that they agree in
domain and point their probabilities in different directions out of domain; how far they do is measured by the
coherence max_{a ≠ b} CS(ỹ_a, ỹ_b) of two members' output probabilities (1: all members give proportional answers;
0 for N = 2: disjoint supports). A query is answered by one member, picked by a hash of the query
(:func:`member_index`): the same query always gets the same member, different queries spread over all of them,
so an attacker's out-of-domain queries get answers from a function that jumps between members from one query
to the next.

D_out (the out-of-domain side of the training loss) is synthetic outliers made from the victim's own training
images, never another data set: ``defense/fitting/edm.py`` says how it is made and how N and λ_D are chosen.

Answers: the picked member's probabilities, its top-1 as the label and its attribution map for that label
through the same interpreter as the victim's (one interpreter per member), so label and map agree. The
victim itself never answers. ``Answer.stats["member"]`` says which member answered; like every defense's
stats it stays on the server (never sent, not in the metrics).

Shipped beside the victim as ``<victim>.edm.safetensors`` (the members' weights, ``member<i>/<name>``)
and ``<victim>.edm.json`` (:class:`EDMMeta`: the tensors' sha256, the victim's name and weights sha256,
how it was trained, what was measured); :func:`load_ensemble` verifies both.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from deepdefense.models.artifacts import (
    beside,
    check_victim,
    read_pair_meta,
    verified_weights,
    victim_record,
    write_pair,
)
from deepdefense.models.checkpoint import CheckpointError, build_model, read_meta, resolve_checkpoint
from deepdefense.models.normalized import Normalized

from ..api import Answer, Defense, NoDefense
from ..interpreters import Interpreter, create_interpreter

KIND = "edm"
#: ``<victim>.edm.json`` / ``.safetensors``.
SUFFIX = ".edm"
#: How :func:`member_index` picks a member, as stated in the metadata and the public settings.
MEMBER_CHOICE = "sha256 of the query's float32 bytes (C, H, W, row-major; -0.0 as 0.0), first 8 bytes big-endian, mod N"

_EPS = 1e-12


class EDMError(CheckpointError):
    """An ensemble that cannot be used with this victim: missing, tampered with, or made for other weights."""


# --- the measure of agreement ----------------------------------------------------------------------


def pairwise_cosine(p: Tensor) -> Tensor:
    """CS(p_a, p_b) for every pair a < b of the N members' outputs ``p`` (N, B, K); shape (N(N−1)/2, B),
    pairs in the order of ``torch.triu_indices(N, N, 1)``."""
    n = p.shape[0]
    if n < 2:
        raise ValueError("an ensemble needs at least two members to compare")
    unit = p / p.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    a, b = torch.triu_indices(n, n, 1, device=p.device)
    return (unit[a] * unit[b]).sum(-1)


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


# --- metadata -------------------------------------------------------------------------------------------------


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


# --- storage --------------------------------------------------------------------------------------------------


def ensemble_paths(checkpoint: str | os.PathLike[str]) -> tuple[Path, Path]:
    """(ensemble metadata JSON, victim metadata JSON) of a checkpoint name or metadata JSON."""
    victim = resolve_checkpoint(checkpoint)
    return beside(victim, SUFFIX), victim


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
    tensors = {f"member{i}/{k}": v for i, m in enumerate(members) for k, v in getattr(m, "net", m).state_dict().items()}
    victim = read_meta(victim_path)
    meta.members = len(members)
    meta.victim = victim_record(victim_path, victim.weights, victim.sha256)
    return write_pair(out or meta_path, tensors, meta)


def read_ensemble_meta(meta_path: Path) -> EDMMeta:
    return read_pair_meta(meta_path, EDMMeta, "ensemble", EDMError)


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
    remedy = f"retrain it: deepdefense edm --checkpoint {victim_path.stem}"
    recorded = str(meta.victim.get("sha256", ""))
    check_victim(
        "ensemble",
        meta_path,
        recorded,
        victim_path,
        victim.sha256,
        EDMError,
        made="trained",
        model=model,
        remedy=remedy,
    )
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
