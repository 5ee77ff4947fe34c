"""Interpreters, the DeepDefense engine, layer selection and baseline defenses."""

from __future__ import annotations

from torch import nn

from .api import Answer, Defense, NoDefense
from .interpreters import Interpreter
from .names import DEFENSES, ENGINE_MODES, DefenseName, EngineMode


def create_defense(name: str, model: nn.Module, interpreter: Interpreter, **options: object) -> Defense:
    """A defense by name: ``deepdefense``, ``dd-s``, ``dd-i`` (engine options as keywords), ``pp``
    (Prediction Poisoning options as keywords) or ``none``."""
    if name == "none":
        return NoDefense(model, interpreter)
    if name in ENGINE_MODES:
        from .engine import DeepDefense

        return DeepDefense(model, interpreter, mode=name, **options)
    if name == "pp":
        from .baselines.pp import PredictionPoisoning

        return PredictionPoisoning(model, interpreter, **options)
    raise ValueError(f"unknown defense {name!r}; known defenses: {', '.join(DEFENSES)}")


__all__ = ["DEFENSES", "ENGINE_MODES", "Answer", "Defense", "DefenseName", "EngineMode", "NoDefense", "create_defense"]
