"""The :class:`clients.oracle.Oracle` protocol answered in-process: a :class:`defense.Defense` called
as the server's micro-batcher calls it, for the evaluation harness's in-process arms and the tests."""

from __future__ import annotations

import torch
from torch import Tensor

from deepdefense.clients.oracle import ModelInfo, OracleReply, stack_reply
from deepdefense.defense.api import Defense
from deepdefense.defense.gate import MisinformationGate
from deepdefense.models.checkpoint import CheckpointMeta
from deepdefense.server.monitor import ExtractionMonitor


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
        self.defense, self._info = defense, info
        self.device = next(defense.model.parameters()).device

    def info(self) -> ModelInfo:
        return self._info

    def query(self, x: Tensor, *, explain: bool = True) -> OracleReply:
        answers = self.defense.answer(x.to(self.device), explain=explain)
        maps = [a.attribution.detach().cpu() for a in answers] if explain else None
        return stack_reply([a.label for a in answers], [a.probabilities.detach().cpu() for a in answers], maps)


class MonitoredOracle(LocalOracle):
    """A gated defense called in-process as the default server with API keys answers one key: the extraction
    monitor screens each batch before it is answered, an escalated key's queries are all answered by the
    misinformation path, a trusted key's flagged ones by the defense, and the domain flags of the queries that are
    not retries are recorded after (``server/data_plane.py``'s order)."""

    def __init__(self, gate: MisinformationGate, info: ModelInfo, monitor: ExtractionMonitor, key_id: str) -> None:
        super().__init__(gate, info)
        self.gate, self.monitor, self.key_id = gate, monitor, key_id

    def query(self, x: Tensor, *, explain: bool = True) -> OracleReply:
        screening = self.monitor.screen(self.key_id, x)
        override = torch.full((len(x),), screening.override, dtype=torch.int8)
        answers = self.gate.answer(x.to(self.device), explain=explain, override=override)
        if not screening.escalated:
            self.monitor.observe(self.key_id, screening.distinct([a.flagged for a in answers]))
        maps = [a.attribution.detach().cpu() for a in answers] if explain else None
        return stack_reply([a.label for a in answers], [a.probabilities.detach().cpu() for a in answers], maps)
