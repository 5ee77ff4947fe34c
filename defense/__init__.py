"""Interpreters, the DeepDefense engine, layer selection and baseline defenses."""

from __future__ import annotations

from torch import nn

from .api import Answer, Defense, NoDefense
from .interpreters import Interpreter

DEFENSES = ("deepdefense", "dd-s", "dd-i", "none")


def create_defense(name: str, model: nn.Module, interpreter: Interpreter, **options: object) -> Defense:
    """A defense by name: ``deepdefense``, ``dd-s``, ``dd-i`` (engine options as keywords) or ``none``."""
    if name == "none":
        return NoDefense(model, interpreter)
    if name in ("deepdefense", "dd-s", "dd-i"):
        from .engine import DeepDefense

        return DeepDefense(model, interpreter, mode=name, **options)
    raise ValueError(f"unknown defense {name!r}; known defenses: {', '.join(DEFENSES)}")


__all__ = ["DEFENSES", "Answer", "Defense", "NoDefense", "create_defense"]
