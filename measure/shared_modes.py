"""DeepDefense, DD-S and DD-I arms of the harness answered from one optimisation per query.

The three modes run the same optimisation and differ only in which of its outputs they show
(Table 5). In-process, the harness therefore keeps one engine per engine configuration and, for a
batch of queries, asks it once for all three modes (``DeepDefense.answer_modes``, the code path of
``DeepDefense.answer``); the answers of the modes not asked for yet are kept, keyed by the query's
bytes, for every arm that asks (DeepDefense alone and behind the misinformation gate ask for the
same mode). Each arm still sees exactly what a server of its mode would answer
(tests/defense/test_engine_batched.py), at a third of the cost.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from torch import Tensor

from deepdefense.defense import ENGINE_MODES, Answer, Defense
from deepdefense.defense.engine import DeepDefense


class SharedModes:
    """One engine's answers for every mode, kept per query (an evaluation's transfer sets: tens of MB)."""

    def __init__(self, engine: DeepDefense, modes: tuple[str, ...] = ENGINE_MODES) -> None:
        self.engine, self.modes = engine, modes
        self._kept: dict[str, dict[bytes, Answer]] = {m: {} for m in modes}

    def answer(self, x: Tensor, mode: str, explain: bool) -> list[Answer]:
        """``mode``'s answers; a query not kept for it is optimised now and kept for the other modes.
        A kept answer's stats say ``shared`` (its ``optimisation_seconds`` are the original run's)."""
        keys = [xi.detach().cpu().numpy().tobytes() for xi in x]
        missing = [i for i, k in enumerate(keys) if k not in self._kept[mode]]
        if missing:
            fresh = self.engine.answer_modes(x[missing], self.modes, explain=True)
            for m, answers in fresh.items():
                if m != mode:
                    answers = [replace(a, stats={**a.stats, "shared": 1.0}) for a in answers]
                self._kept[m].update((keys[i], a) for i, a in zip(missing, answers, strict=True))
        answers = [self._kept[mode][k] for k in keys]
        for k in keys:  # kept for another arm of the same mode (e.g. behind the misinformation gate), as shared
            self._kept[mode][k] = replace(self._kept[mode][k], stats={**self._kept[mode][k].stats, "shared": 1.0})
        return answers if explain else [replace(a, attribution=None) for a in answers]


class ModeOf(Defense):
    """The ``mode`` arm of a :class:`SharedModes` engine, as a :class:`Defense`."""

    def __init__(self, shared: SharedModes, mode: str) -> None:
        super().__init__(shared.engine.model, shared.engine.interpreter)
        self.shared, self.name = shared, mode

    def answer(self, x: Tensor, *, explain: bool = True) -> list[Answer]:
        return self.shared.answer(x, self.name, explain)

    def public_settings(self) -> dict[str, Any]:
        return {**self.shared.engine.public_settings(), "mode": self.name}


def engine_key(checkpoint: str, interpreter: str, device: str, options: dict[str, Any]) -> str:
    return json.dumps([checkpoint, interpreter, device, options], sort_keys=True, default=str)
