"""Interpreters, the DeepDefense engine, layer selection and baseline defenses."""

from __future__ import annotations

from torch import nn

from .api import Answer, Defense, NoDefense
from .interpreters import Interpreter
from .names import DEFENSES, ENGINE_MODES, DefenseName, EngineMode


def create_defense(name: str, model: nn.Module, interpreter: Interpreter, **options: object) -> Defense:
    """A defense by name: ``deepdefense``, ``dd-s``, ``dd-i`` (engine options as keywords), ``pp``
    (Prediction Poisoning options as keywords), ``edm`` (its trained ``members`` as a keyword: see
    ``defense.loader.load_defense``, which loads the ensemble shipped beside a checkpoint) or ``none``."""
    if name == "none":
        return NoDefense(model, interpreter)
    if name in ENGINE_MODES:
        from .engine import DeepDefense

        return DeepDefense(model, interpreter, mode=name, **options)
    if name == "pp":
        from .baselines.pp import PredictionPoisoning

        return PredictionPoisoning(model, interpreter, **options)
    if name == "edm":
        from .baselines.edm import EnsembleOfDiverseModels

        if "members" not in options:
            raise ValueError(
                "defense 'edm' needs its trained members: load it with defense.loader.load_defense(checkpoint, "
                "'edm'), which reads the ensemble shipped beside the checkpoint (deepdefense edm makes one)"
            )
        return EnsembleOfDiverseModels(model, interpreter, **options)  # type: ignore[arg-type]
    raise ValueError(f"unknown defense {name!r}; known defenses: {', '.join(DEFENSES)}")


__all__ = ["DEFENSES", "ENGINE_MODES", "Answer", "Defense", "DefenseName", "EngineMode", "NoDefense", "create_defense"]
