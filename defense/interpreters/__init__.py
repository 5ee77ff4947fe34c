"""Differentiable interpreters: Grad-CAM, Relevance-CAM and Gradient⊙Input, by name."""

from __future__ import annotations

from torch import nn

from .base import CAM, Explanation, Interpreter, normalise
from .gradcam import GradCAM
from .gradinput import GradientInput
from .relevancecam import RelevanceCAM

INTERPRETERS: dict[str, type[Interpreter]] = {cls.name: cls for cls in (GradCAM, RelevanceCAM, GradientInput)}


def create_interpreter(name: str, model: nn.Module, input_shape: tuple[int, ...]) -> Interpreter:
    try:
        cls = INTERPRETERS[name]
    except KeyError:
        raise ValueError(
            f"unknown interpreter {name!r}; known interpreters: {', '.join(sorted(INTERPRETERS))}"
        ) from None
    return cls(model, input_shape)


__all__ = [
    "CAM",
    "INTERPRETERS",
    "Explanation",
    "GradCAM",
    "GradientInput",
    "Interpreter",
    "RelevanceCAM",
    "create_interpreter",
    "normalise",
]
