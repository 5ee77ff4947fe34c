"""Baseline defenses the paper compares DeepDefense with (§5): Prediction Poisoning (``pp``)."""

from .pp import PredictionPoisoning

__all__ = ["PredictionPoisoning"]
