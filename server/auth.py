"""API keys: who is calling. Keys are compared in constant time and known elsewhere only by
:func:`key_id`, a keyed hash (HMAC-SHA256 under the server's key-id secret, ``server/keystore.py``), so
they never reach logs, metrics or the budget database, and an id seen in ``/metrics`` cannot be tested
offline against guessed keys without that secret."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass

ANONYMOUS = "anonymous"
#: The fewest characters a key may have, and the fewest different characters among them (``server/settings.py``).
MIN_KEY_LENGTH = 16
MIN_KEY_DISTINCT = 8
#: The rule :func:`weak_key` enforces, as the start-up error states it (never with the key).
KEY_RULE = f"at least {MIN_KEY_LENGTH} characters, at least {MIN_KEY_DISTINCT} of them different"


def key_id(key: str, secret: bytes) -> str:
    """The label of a key in metrics and the budget database: 12 hex digits of its HMAC-SHA256 under ``secret``."""
    return _digest(key, secret).hex()[:12]


def weak_key(key: str) -> bool:
    """Whether ``key`` breaks :data:`KEY_RULE` (a guessable key would be found from its id by a dictionary)."""
    return len(key) < MIN_KEY_LENGTH or len(set(key)) < MIN_KEY_DISTINCT


def _digest(key: str, secret: bytes) -> bytes:
    return hmac.new(secret, key.encode(), hashlib.sha256).digest()


@dataclass(frozen=True)
class Caller:
    """The authenticated caller: a key's id, or ``anonymous`` when the server has no keys."""

    key_id: str


class KeyRing:
    """The configured keys; empty means that the server is open. ``secret``: the key-id secret."""

    def __init__(self, keys: Iterable[str], secret: bytes) -> None:
        self._secret = secret
        self._keys = [(_digest(k, secret), key_id(k, secret)) for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def identify(self, token: str) -> str | None:
        """The id of the key equal to ``token``; every key is compared, each in constant time."""
        digest = _digest(token, self._secret)
        found = None
        for key_digest, kid in self._keys:
            if hmac.compare_digest(digest, key_digest):
                found = kid
        return found
