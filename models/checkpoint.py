"""Checkpoints: safetensors weights plus a metadata JSON that names everything needed to serve them.

``<name>.safetensors`` holds the architecture's state dict; ``<name>.json`` holds the architecture,
data set, class names, input shape, normalisation, test accuracy, seed, the training command and
the sha256 of the weights file, which is verified on every load.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .normalized import Normalized
from .registry import create_model

SHIPPED_DIR = Path(__file__).resolve().parent / "checkpoints"


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted or used: the message says why."""


@dataclass
class CheckpointMeta:
    arch: str
    dataset: str
    classes: list[str]
    input_shape: list[int]
    mean: list[float]
    std: list[float]
    test_accuracy: float
    seed: int
    command: str
    sha256: str = ""
    weights: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_model(meta: CheckpointMeta) -> Normalized:
    """An untrained model of the checkpoint's architecture, wrapped with its normalisation."""
    net = create_model(meta.arch, num_classes=meta.num_classes, in_channels=meta.input_shape[0])
    return Normalized(net, meta.mean, meta.std)


def save_checkpoint(model: Normalized, meta: CheckpointMeta, out: str | os.PathLike[str]) -> Path:
    """Write ``<out>.safetensors`` and ``<out>.json``; returns the JSON path."""
    out = Path(out)
    out = out.with_suffix("") if out.suffix in (".json", ".safetensors") else out
    out.parent.mkdir(parents=True, exist_ok=True)
    weights = out.parent / f"{out.name}.safetensors"
    state = {k: v.detach().cpu().contiguous() for k, v in model.net.state_dict().items()}
    save_file(state, str(weights))
    meta.weights = weights.name
    meta.sha256 = sha256_file(weights)
    meta_path = out.parent / f"{out.name}.json"
    meta_path.write_text(json.dumps(asdict(meta), indent=2) + "\n")
    return meta_path


def resolve_checkpoint(name_or_path: str | os.PathLike[str]) -> Path:
    """A shipped checkpoint's name (``lenet-mnist``) or a path to a metadata JSON."""
    path = Path(name_or_path)
    local = path if path.suffix == ".json" else path.with_suffix(".json")
    for candidate in (local, SHIPPED_DIR / f"{path.stem}.json"):
        if candidate.is_file():
            return candidate
    available = ", ".join(sorted(p.stem for p in SHIPPED_DIR.glob("*.json"))) or "none"
    raise CheckpointError(f"checkpoint {str(name_or_path)!r} not found (shipped checkpoints: {available})")


def read_meta(meta_path: Path) -> CheckpointMeta:
    try:
        raw = json.loads(meta_path.read_text())
        return CheckpointMeta(**raw)
    except (json.JSONDecodeError, TypeError) as err:
        raise CheckpointError(f"checkpoint metadata {meta_path.name} is malformed: {err}") from None


def verified_weights(
    meta_path: Path, weights: str, sha256: str, what: str = "checkpoint", error: type[Exception] = CheckpointError
) -> Path:
    """The weights file named in the metadata at ``meta_path``, once it exists and its sha256 is the recorded one."""
    path = meta_path.parent / weights
    if not path.is_file():
        raise error(f"{what} {meta_path.stem}: weights file {weights!r} is missing")
    actual = sha256_file(path)
    if actual != sha256:
        raise error(
            f"{what} {meta_path.stem}: sha256 of {weights} is {actual[:12]}…, metadata says {sha256[:12]}…; "
            "refusing to load"
        )
    return path


def load_checkpoint(
    name_or_path: str | os.PathLike[str], *, arch: str | None = None, device: str | torch.device = "cpu"
) -> tuple[Normalized, CheckpointMeta]:
    """Load a checkpoint after verifying its sha256; refuse one of another architecture than ``arch``."""
    meta_path = resolve_checkpoint(name_or_path)
    meta = read_meta(meta_path)
    if arch is not None and meta.arch != arch:
        raise CheckpointError(f"checkpoint {meta_path.stem} holds architecture {meta.arch!r}, expected {arch!r}")
    weights = verified_weights(meta_path, meta.weights, meta.sha256)
    model = build_model(meta)
    try:
        state = load_file(str(weights))
        model.net.load_state_dict(state, strict=True)
    except (SafetensorError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0]
        raise CheckpointError(
            f"checkpoint {meta_path.stem}: weights do not fit architecture {meta.arch!r} ({first})"
        ) from None
    return model.to(device).eval(), meta
