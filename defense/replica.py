"""A defense for another model thread: its own modules and per-call objects, the same tensors.

A defense is not safe to call from two threads at once: ``torch.func.functional_call`` swaps a module's
parameters while it runs, and the interpreters' probes record activations on the modules they hook. The
server answers micro-batches on several model threads (``server/batcher.py``), so each thread calls a
replica of its own. Every tensor the defense holds — the victim's weights and buffers, the warm start,
the domain score, the misinformation model — is shared with the original, never copied: the victim stays
one set of read-only tensors, whatever the number of threads.
"""

from __future__ import annotations

import copy
from typing import Any, TypeVar

from torch import Tensor, nn

from .api import Defense

D = TypeVar("D", bound=Defense)


def _tensors(root: object) -> dict[int, Tensor]:
    """Every tensor reachable from ``root`` through attributes, containers and modules, by id."""
    found: dict[int, Tensor] = {}
    seen: set[int] = set()
    stack: list[Any] = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (type, str, bytes, int, float, bool)) or obj is None:
            continue
        seen.add(id(obj))
        if isinstance(obj, Tensor):
            found[id(obj)] = obj
            continue
        if isinstance(obj, nn.Module):
            found.update((id(t), t) for t in (*obj.parameters(), *obj.buffers()))
        if isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        if hasattr(obj, "__self__"):  # a bound method: its object
            stack.append(obj.__self__)
        if hasattr(obj, "__dict__") and not callable(getattr(obj, "__code__", None)):
            stack.extend(vars(obj).values())
    return found


def replica(defense: D) -> D:
    """A structural copy of ``defense`` sharing all its tensors (see the module's docstring)."""
    return copy.deepcopy(defense, memo=dict(_tensors(defense)))
