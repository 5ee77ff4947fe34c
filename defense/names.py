"""The names of the defenses the server can serve: the one list every layer above reads."""

from __future__ import annotations

from typing import Literal, get_args

#: DeepDefense and its Table 5 ablations: one optimisation, three ways of showing its outputs.
EngineMode = Literal["deepdefense", "dd-s", "dd-i"]
#: Every defense by name: the engine modes, Prediction Poisoning, the Ensemble of Diverse Models, and the
#: undefended victim.
DefenseName = Literal[EngineMode, "pp", "edm", "none"]

ENGINE_MODES: tuple[str, ...] = get_args(EngineMode)
DEFENSES: tuple[str, ...] = get_args(DefenseName)
