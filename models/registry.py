"""A name → constructor registry for victim architectures (timm-style, no hidden state beyond the table)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

ModelFactory = Callable[..., nn.Module]

_REGISTRY: dict[str, ModelFactory] = {}


class UnknownModelError(KeyError):
    """Raised when an architecture name is not in the registry."""

    def __str__(self) -> str:  # KeyError would quote the message otherwise
        return str(self.args[0])


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator: register ``fn`` as the constructor of architecture ``name``."""

    def decorator(fn: ModelFactory) -> ModelFactory:
        if name in _REGISTRY:
            raise ValueError(f"architecture {name!r} is registered twice")
        _REGISTRY[name] = fn
        return fn

    return decorator


def list_models() -> list[str]:
    """Names of all registered architectures, sorted."""
    return sorted(_REGISTRY)


def create_model(name: str, *, num_classes: int, in_channels: int) -> nn.Module:
    """Build architecture ``name``; every model exposes ``cam_layer``, the name of its last conv block."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown architecture {name!r}; known architectures: {', '.join(list_models())}"
        ) from None
    return factory(num_classes=num_classes, in_channels=in_channels)
