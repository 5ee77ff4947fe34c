"""Files saved beside a checkpoint: where they live, how they are written and verified, and the victim they belong to.

A checkpoint is ``<name>.safetensors`` + ``<name>.json`` (``models.checkpoint``). What is made for its weights
lives beside it, each as a safetensors file of tensors plus a metadata JSON that names that file and its sha256:
the domain score ``<name>.domain.*``, the Ensemble of Diverse Models ``<name>.edm.*``, the engine's warm start
``<name>.warm.*`` and the misinformation model ``<name>-misinfo.*`` (itself a checkpoint). Every one of them is
written here (readable by a server running as another user, like any file the process creates with its umask),
its tensors' sha256 checked on every load, and its record of the victim (``victim_record``: checkpoint name,
weights file, sha256 of the weights) compared with the checkpoint's before it is used (``check_victim``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

from safetensors.torch import save
from torch import Tensor, nn

T = TypeVar("T")

#: The suffixes of a file pair: ``<stem>.json`` (metadata) and ``<stem>.safetensors`` (tensors).
PAIR = (".json", ".safetensors")


def stem(out: str | os.PathLike[str]) -> Path:
    """The pair's common path without suffix, from it or from either file of the pair."""
    path = Path(out)
    return path.with_suffix("") if path.suffix in PAIR else path


def beside(victim_meta_path: Path, suffix: str) -> Path:
    """The metadata JSON of the artifact ``suffix`` (``.domain``, ``.edm``, ``.warm``, ``-misinfo``) beside the
    checkpoint whose metadata JSON is ``victim_meta_path``."""
    return victim_meta_path.parent / f"{victim_meta_path.stem}{suffix}.json"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def state_sha256(model: nn.Module) -> str:
    """The sha256 of a victim's weights as ``save_checkpoint`` would write them: equal to the checkpoint
    file's sha256 exactly when the weights in memory are the checkpoint's."""
    net = getattr(model, "net", model)
    return hashlib.sha256(save({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()})).hexdigest()


def write_pair(out: str | os.PathLike[str], tensors: dict[str, Tensor], meta: Any) -> Path:
    """Write ``<out>.safetensors`` and ``<out>.json``; fills in ``meta.weights`` (the tensors' file name) and
    ``meta.sha256`` before the dataclass ``meta`` is written. Returns the JSON path.

    The bytes go through an ordinary ``open()``: ``safetensors``' ``save_file`` creates its file 0600, unreadable
    to a server running as another user."""
    base = stem(out)
    base.parent.mkdir(parents=True, exist_ok=True)
    weights = base.parent / f"{base.name}.safetensors"
    weights.write_bytes(save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))
    meta.weights, meta.sha256 = weights.name, sha256_file(weights)
    meta_path = base.parent / f"{base.name}.json"
    meta_path.write_text(json.dumps(asdict(meta), indent=2) + "\n")
    return meta_path


def read_pair_meta(meta_path: Path, cls: type[T], what: str, error: type[Exception]) -> T:
    """The metadata JSON at ``meta_path`` as a ``cls``; ``error`` when it is not one."""
    try:
        return cls(**json.loads(meta_path.read_text()))
    except (json.JSONDecodeError, TypeError) as err:
        raise error(f"{what} metadata {meta_path.name} is malformed: {err}") from None


def verified_weights(meta_path: Path, weights: str, sha256: str, what: str, error: type[Exception]) -> Path:
    """The tensors' file named in the metadata at ``meta_path``, once it exists and its sha256 is the recorded one."""
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


def victim_record(victim_meta_path: Path, weights: str, sha256: str) -> dict[str, str]:
    """What an artifact records of the checkpoint it was made for: its name, weights file and weights' sha256."""
    return {"checkpoint": victim_meta_path.stem, "weights": weights, "sha256": sha256}


def check_victim(
    what: str,
    meta_path: Path,
    recorded: str,
    victim_meta_path: Path,
    victim_sha256: str,
    error: type[Exception],
    *,
    made: str = "made",
    model: nn.Module | None = None,
    remedy: str = "",
) -> None:
    """Refuse (``error``) an artifact made for other victim weights (``recorded``, the sha256 it records) than the
    checkpoint's (``victim_sha256``), and a ``model`` (the victim, already loaded) whose weights are not the
    checkpoint's. ``made``: how the artifact was made (fitted, trained, learnt); ``remedy``: how to make a new one."""
    if recorded != victim_sha256:
        raise error(
            f"{what} {meta_path.stem} was {made} for victim weights {recorded[:12]}…, checkpoint "
            f"{victim_meta_path.stem} has {victim_sha256[:12]}…; refusing to load{f' ({remedy})' if remedy else ''}"
        )
    if model is not None and state_sha256(model) != victim_sha256:
        raise error(f"{what} {meta_path.stem}: the model given is not checkpoint {victim_meta_path.stem}'s weights")
