"""API keys: who is calling. Keys are compared in constant time and known elsewhere only by
:func:`key_id`, a short hash, so they never reach logs, metrics or the budget database."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass

ANONYMOUS = "anonymous"


def key_id(key: str) -> str:
    """The label of a key in metrics and the budget database: 12 hex digits of its sha256."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Caller:
    """The authenticated caller: a key's id, or ``anonymous`` when the server has no keys."""

    key_id: str


class KeyRing:
    """The configured keys; empty means that the server is open."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = [(hashlib.sha256(k.encode()).digest(), key_id(k)) for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def identify(self, token: str) -> str | None:
        """The id of the key equal to ``token``; every key is compared, each in constant time."""
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for key_digest, kid in self._keys:
            if hmac.compare_digest(digest, key_digest):
                found = kid
        return found
