"""Checkpoints: safetensors weights plus a metadata JSON that names everything needed to serve them.

``<name>.safetensors`` holds the architecture's state dict; ``<name>.json`` holds the architecture,
data set, class names, input shape, normalisation, test accuracy, seed, the training command and
the sha256 of the weights file, which is verified on every load.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .artifacts import read_pair_meta, verified_weights, write_pair
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


def build_model(meta: CheckpointMeta) -> Normalized:
    """An untrained model of the checkpoint's architecture, wrapped with its normalisation."""
    net = create_model(meta.arch, num_classes=meta.num_classes, in_channels=meta.input_shape[0])
    return Normalized(net, meta.mean, meta.std)


def save_checkpoint(model: Normalized, meta: CheckpointMeta, out: str | os.PathLike[str]) -> Path:
    """Write ``<out>.safetensors`` and ``<out>.json`` (``models.artifacts.write_pair``); returns the JSON path."""
    return write_pair(out, model.net.state_dict(), meta)


def local_checkpoint(name_or_path: str | os.PathLike[str]) -> Path | None:
    """The metadata JSON that ``name_or_path`` names in this working directory (with or without ``.json``), if any."""
    path = Path(name_or_path)
    local = path if path.suffix == ".json" else path.with_suffix(".json")
    return local if local.is_file() else None


def resolve_checkpoint(name_or_path: str | os.PathLike[str]) -> Path:
    """A path to a metadata JSON (``local_checkpoint``), else a shipped checkpoint's name (``lenet-mnist``)."""
    local = local_checkpoint(name_or_path)
    if local is not None:
        return local
    shipped = SHIPPED_DIR / f"{Path(name_or_path).stem}.json"
    if shipped.is_file():
        return shipped
    available = ", ".join(sorted(p.stem for p in SHIPPED_DIR.glob("*.json"))) or "none"
    raise CheckpointError(f"checkpoint {str(name_or_path)!r} not found (shipped checkpoints: {available})")


def read_meta(meta_path: Path) -> CheckpointMeta:
    return read_pair_meta(meta_path, CheckpointMeta, "checkpoint", CheckpointError)


def load_checkpoint(
    name_or_path: str | os.PathLike[str], *, arch: str | None = None, device: str | torch.device = "cpu"
) -> tuple[Normalized, CheckpointMeta]:
    """Load a checkpoint after verifying its sha256; refuse one of another architecture than ``arch``."""
    meta_path = resolve_checkpoint(name_or_path)
    meta = read_meta(meta_path)
    if arch is not None and meta.arch != arch:
        raise CheckpointError(f"checkpoint {meta_path.stem} holds architecture {meta.arch!r}, expected {arch!r}")
    weights = verified_weights(meta_path, meta.weights, meta.sha256, "checkpoint", CheckpointError)
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
