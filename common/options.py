"""Options as people type them and as code declares them: ``KEY=VALUE`` text whose values read as JSON when they
parse (command lines' ``--set``, ``DD_ENGINE__*`` variables), and dataclass fields that carry their description,
from which ``deepdefense/flags.py`` makes a command's flags (help, choices, how many values)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from typing import Any


def json_or_text(value: Any) -> Any:
    """``"30"`` → 30, ``"0.05"`` → 0.05, ``"false"`` → False, ``"unfold"`` → "unfold"; non-text is returned as is."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def key_values(pairs: Sequence[str], flag: str = "--set") -> dict[str, Any]:
    """``["steps=30", "lr=0.05", "conv_impl=unfold"]`` → ``{"steps": 30, "lr": 0.05, "conv_impl": "unfold"}``;
    a pair without ``=`` or without a key is a ValueError naming ``flag``."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{flag} expects KEY=VALUE, got {pair!r}")
        options[key.strip()] = json_or_text(value)
    return options


def described(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    factory: Callable[[], Any] | Any = dataclasses.MISSING,
    **flag: Any,
) -> Any:
    """A dataclass field with its description (``help``) and, where the type does not say it, how its flag reads
    (``nargs="*"``: may be given empty; ``choices``; ``metavar``; ``flag``: another flag name than the field's)."""
    return dataclasses.field(default=default, default_factory=factory, metadata={"help": help, **flag})
