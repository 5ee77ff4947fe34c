"""From a checkpoint name to a ready defense: load the victim read-only, bind the interpreter,
attach the stored layer sensitivity. One code path for the server, the harness and the CLI."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from models.checkpoint import CheckpointMeta, load_checkpoint

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
    model shipped beside it (each refused unless its hashes name these victim weights). Flagged queries are
    answered by ``inner``'s defense run on the misinformation model (:func:`misinformer`)."""
    from .domain import load_domain_score
    from .gate import MisinformationGate
    from .misinformation import load_misinformation

    score, _ = load_domain_score(checkpoint, inner.model, device)
    misinformation, meta = load_misinformation(checkpoint, device=device)
    misinformation.eval().requires_grad_(False)
    return MisinformationGate(inner, score.flags, misinformer(inner, misinformation, tuple(meta.input_shape)))


def misinformer(inner: Defense, misinformation: torch.nn.Module, input_shape: tuple[int, ...]) -> Defense:
    """The defense that answers flagged queries: ``inner``'s own kind on the misinformation model, so that a
    misinformed answer varies with its query as ``inner``'s answers do and costs what they cost. For the
    DeepDefense engine: the same mode, layers, settings and step count, from the victim's plain start (a
    warm start is learnt for the victim's weights); for any other defense, the misinformation model's own
    answers (``none``: Adaptive Misinformation as published)."""
    from .api import NoDefense
    from .engine import DeepDefense

    interpreter = create_interpreter(inner.interpreter.name, misinformation, input_shape)
    if isinstance(inner, DeepDefense):
        config = replace(inner.config, warm_start=False, steps=inner.steps)
        return DeepDefense(misinformation, interpreter, sensitivity=inner.sensitivity, mode=inner.mode, config=config)
    return NoDefense(misinformation, interpreter)
