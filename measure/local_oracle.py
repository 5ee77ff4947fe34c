"""The :class:`clients.oracle.Oracle` protocol answered in-process: a :class:`defense.Defense` called
as the server's micro-batcher calls it, for the evaluation harness's in-process arms and the tests."""

from __future__ import annotations

from torch import Tensor

from clients.oracle import ModelInfo, OracleReply, stack_reply
from defense.api import Defense
from models.checkpoint import CheckpointMeta


def local_info(name: str, meta: CheckpointMeta, defense: Defense) -> ModelInfo:
    """The :class:`ModelInfo` a server would report for checkpoint ``name`` served through ``defense``."""
    return ModelInfo(
        name=name,
        arch=meta.arch,
        dataset=meta.dataset,
        classes=list(meta.classes),
        input_shape=tuple(meta.input_shape),
        interpreter=defense.interpreter.name,
        defense=defense.name,
        defense_settings=defense.public_settings(),
    )


class LocalOracle:
    """A :class:`Defense` called in-process, as the server's micro-batcher calls it."""

    def __init__(self, defense: Defense, info: ModelInfo) -> None:
        self.defense = defense
        self._info = info
        self.device = next(defense.model.parameters()).device

    def info(self) -> ModelInfo:
        return self._info

    def query(self, x: Tensor, *, explain: bool = True) -> OracleReply:
        answers = self.defense.answer(x.to(self.device), explain=explain)
        maps = [a.attribution.detach().cpu() for a in answers] if explain else None
        return stack_reply([a.label for a in answers], [a.probabilities.detach().cpu() for a in answers], maps)
