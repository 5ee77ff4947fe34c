"""From a checkpoint name to a ready defense: load the victim read-only, bind the interpreter,
attach the stored layer sensitivity. One code path for the server, the harness and the CLI."""

from __future__ import annotations

from typing import Any

import torch

from deepdefense.models.checkpoint import CheckpointMeta, load_checkpoint

from . import ENGINE_MODES, create_defense
from .api import Defense
from .interpreters import create_interpreter
from .sensitivity import checkpoint_sensitivity
from .warm_start import load_warm_start


def load_defense(
    checkpoint: str,
    defense: str = "deepdefense",
    interpreter: str = "gradcam",
    *,
    device: str | torch.device = "cpu",
    data_root: str | None = None,
    **options: Any,
) -> tuple[Defense, CheckpointMeta]:
    model, meta = load_checkpoint(checkpoint, device=device)
    if meta.extra.get("kind") == "misinformation":  # confidently wrong by design: never served as a victim
        raise ValueError(f"checkpoint {checkpoint} is a misinformation model, not a victim; serve its victim")
    model.requires_grad_(False)
    bound = create_interpreter(interpreter, model, tuple(meta.input_shape))
    if defense in ENGINE_MODES:
        options.setdefault("sensitivity", checkpoint_sensitivity(model, meta, data_root))
        warm = load_warm_start(checkpoint, model)
        if warm is not None and warm.meta.interpreter == interpreter:  # another interpreter's: from the victim
            options.setdefault("warm", warm)
    if defense == "edm" and "members" not in options:  # the ensemble shipped beside the victim, or a ValueError
        from .baselines.edm import load_ensemble

        members, info = load_ensemble(checkpoint, model, device=device)
        options.update(members=members, info=info)
    return create_defense(defense, model, bound, **options), meta


def gate_available(checkpoint: str) -> bool:
    """Whether ``checkpoint`` ships what the misinformation gate needs: a domain score and a misinformation
    model beside it (``deepdefense domain``, ``deepdefense misinfo``)."""
    from .domain import domain_paths
    from .misinformation import misinformation_path

    return domain_paths(checkpoint)[0].is_file() and misinformation_path(checkpoint).with_suffix(".json").is_file()


def load_gate(inner: Defense, checkpoint: str, *, device: str | torch.device = "cpu") -> Defense:
    """``inner`` behind the misinformation gate of ``checkpoint``: the domain score and the misinformation
    model shipped beside it (each refused unless its hashes name these victim weights)."""
    from .domain import load_domain_score
    from .gate import MisinformationGate
    from .misinformation import load_misinformation

    score, _ = load_domain_score(checkpoint, inner.model, device)
    misinformation, _ = load_misinformation(checkpoint, device=device)
    return MisinformationGate(inner, score.flags, misinformation.eval().requires_grad_(False))
