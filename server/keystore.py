"""The server's own secrets, made at random once and kept with the per-key state, so that a restart and every
replica use the same: the key-id secret (``server/auth.py``: key ids are HMACs under it), the EDM hash key
(which member answers a query, ``defense/baselines/edm.py``) and the watermark's (which queries it marks,
``server/watermark.py``).

With the Redis state they are Redis keys ``dd:secret:<name>`` (set once with ``SET NX``, so replicas that start
together agree); otherwise files beside ``budget_db`` (``<budget_db>.<name>.secret``, mode 0600, made with an
atomic link so that processes that start together agree). A secret file that others may read is refused: the
server does not start. Deleting a secret gives new key ids (spent budgets and monitor windows start afresh) or
a new member choice.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

import redis

from .state import PREFIX

#: The secret of key ids, the EDM hash key, and the watermark's (``server/watermark.py``).
KEY_ID = "key-id"
EDM_HASH = "edm-hash"
WATERMARK = "watermark"
_BYTES = 32


class SecretFileError(ValueError):
    """A secret file is readable by others or malformed; the message names the file, never its content."""


def secret_key(name: str, prefix: str = PREFIX) -> str:
    """The Redis key of the secret ``name``: ``<prefix>secret:<name>``."""
    return f"{prefix}secret:{name}"


def redis_secret(client: redis.Redis, name: str, prefix: str = PREFIX) -> bytes:
    """The secret ``name`` kept in Redis, made now when no replica has made it yet."""
    key = secret_key(name, prefix)
    client.set(key, secrets.token_hex(_BYTES), nx=True)
    return bytes.fromhex(client.get(key))  # type: ignore[arg-type]


def secret_path(budget_db: Path, name: str) -> Path:
    return budget_db.with_name(f"{budget_db.name}.{name}.secret")


def file_secret(path: Path) -> bytes:
    """The secret in ``path``, made now (mode 0600) when the file does not exist."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        draft = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(_BYTES) + "\n")
        try:
            os.link(draft, path)  # atomic: of processes starting together, one makes it and all read it
        except FileExistsError:
            pass
        finally:
            draft.unlink()
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        raise SecretFileError(f"the secret file {path} may be read by others: chmod 600 it")
    try:
        value = bytes.fromhex(path.read_text().strip())
    except ValueError:
        raise SecretFileError(f"the secret file {path} does not hold hex digits; delete it to make a new one") from None
    if len(value) < 16:
        raise SecretFileError(f"the secret file {path} holds fewer than 16 bytes; delete it to make a new one")
    return value


def server_secret(name: str, client: redis.Redis | None, budget_db: Path) -> bytes:
    """The secret ``name``: in the Redis state when there is one, else in a file beside ``budget_db``."""
    return redis_secret(client, name) if client is not None else file_secret(secret_path(budget_db, name))
