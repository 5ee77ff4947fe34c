"""Baseline defenses the paper compares DeepDefense with (§5): Prediction Poisoning (``pp``); and a later one,
the Ensemble of Diverse Models (``edm``, Kariyappa et al., ICLR 2021)."""

from .edm import EnsembleOfDiverseModels
from .pp import PredictionPoisoning

__all__ = ["EnsembleOfDiverseModels", "PredictionPoisoning"]
