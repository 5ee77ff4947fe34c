"""Victim architectures, data sets, training and checkpoints."""

from . import lenet, resnet, wide_resnet  # noqa: F401  (registers the architectures)
from .checkpoint import CheckpointError, CheckpointMeta, load_checkpoint, save_checkpoint
from .normalized import Normalized
from .registry import UnknownModelError, create_model, list_models, register_model

__all__ = [
    "CheckpointError",
    "CheckpointMeta",
    "Normalized",
    "UnknownModelError",
    "create_model",
    "list_models",
    "load_checkpoint",
    "register_model",
    "save_checkpoint",
]
