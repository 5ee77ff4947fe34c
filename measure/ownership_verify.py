"""``deepdefense ownership verify``: send a key's watermarked queries, as the server keeps them, to a suspect (an
API speaking our ``/predict`` with pixels, or a checkpoint run here) and weigh the watermark labels that come back
and the ranks its probabilities give the watermark classes (``server.watermark.ownership_test``). It reads the
server's state and speaks HTTP as a client, so it sits here, above both."""

from __future__ import annotations

from contextlib import closing
from dataclasses import dataclass

import torch

from deepdefense.clients.oracle import HttpOracle, read_api_key
from deepdefense.models.checkpoint import load_checkpoint
from deepdefense.server.auth import key_id
from deepdefense.server.keystore import KEY_ID, server_secret
from deepdefense.server.runtime import open_watermark
from deepdefense.server.settings import ServerSettings
from deepdefense.server.state import connect_redis
from deepdefense.server.watermark import Verdict, ownership_test


@dataclass(frozen=True)
class Suspect:
    """A suspect model: its API (``url``, with the key in ``key_file`` it asks for) or a checkpoint run here."""

    url: str | None = None
    key_file: str | None = None
    checkpoint: str | None = None
    timeout: float = 60.0

    def answers(self, x: torch.Tensor, batch_size: int) -> tuple[list[int], torch.Tensor]:
        """Its top-1 answers to ``x`` and its probabilities (n, K), in requests (or batches) of ``batch_size``; an
        unreachable or refusing API raises ``clients.oracle.OracleError``."""
        if self.url:
            with HttpOracle(self.url, read_api_key(self.key_file), timeout=self.timeout) as oracle:
                replies = [oracle.query(b, explain=False) for b in x.split(batch_size)]
            return [int(a) for r in replies for a in r.labels], torch.cat([r.probabilities for r in replies])
        assert self.checkpoint, "a suspect is an API or a checkpoint"
        model, _ = load_checkpoint(self.checkpoint)
        with torch.no_grad():
            probabilities = torch.cat([model(b).softmax(-1) for b in x.split(batch_size)])
        return probabilities.argmax(1).tolist(), probabilities


def verify_ownership(
    settings: ServerSettings, suspect: Suspect, key: str | None = None, kid: str | None = None, batch_size: int = 16
) -> tuple[str, Verdict]:
    """The key's id (given, or computed from the ``key`` itself with the server's secret) and the verdict on the
    suspect, from the watermarked queries the server's state keeps for that key (the default model's)."""
    client = connect_redis(settings.state) if settings.state else None
    if kid is None:
        if not key:
            raise ValueError("no API key given")
        kid = key_id(key, server_secret(KEY_ID, client, settings.budget_db))
    victim, meta = load_checkpoint(settings.checkpoint[0])  # the watermarked model: the default
    with closing(open_watermark(settings, client, meta.num_classes)) as watermark:
        records = watermark.records(kid)
    if not records:
        raise ValueError(f"no watermarked queries are kept for key {kid} in this server's state")
    x = torch.stack([r.query() for r in records])
    with torch.no_grad():
        victim_probabilities = torch.cat([victim(b).softmax(-1) for b in x.split(batch_size)])
    labels, probabilities = suspect.answers(x, batch_size)
    return kid, ownership_test(
        records, labels, victim_probabilities, meta.num_classes, suspect_probabilities=probabilities
    )
