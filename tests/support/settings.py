"""Server settings for the tests: explicit defaults (defense ``none`` without the misinformation gate or the
watermark, a budget database in the test's temporary folder, a 1 ms batch wait) with per-test overrides; and fixed
server secrets for the tests whose outcome hangs on a draw keyed by them."""

from __future__ import annotations

import os
from contextlib import closing
from pathlib import Path
from typing import Any

from deepdefense.server.keystore import KEY_ID, WATERMARK, secret_path
from deepdefense.server.monitor import SqliteMonitorStore
from deepdefense.server.settings import ServerSettings

#: Fixed secrets for the tests whose outcome hangs on which queries a keyed draw picks (key ids are HMACs under
#: the first, the watermark's selection under both): made at random, such a test would fail in a few runs of a
#: hundred, when no query of its short batch happened to be drawn.
PINNED_SECRETS = {KEY_ID: "1d" * 32, WATERMARK: "7e" * 32}
#: A fixed secret for the extraction monitor's fingerprints (``server/query_features.py``): whether two different
#: digits share a near-duplicate fingerprint hangs on the grids it shifts. Made at random, two of the first 200
#: MNIST test digits share one under about one secret in 230 (80 of the 20,000 that ``random.Random(0).randbytes(32)``
#: draws in turn; 95 of 20,000 from ``secrets``); under this one no two of the first 400 do.
PINNED_MONITOR_SECRET = bytes.fromhex("2f" * 32)


def make_settings(tmp_path: Path, **overrides: Any) -> ServerSettings:
    """Settings from the defaults and ``overrides``; ``DD_*`` variables still apply (the
    ``no_server_env`` fixture clears those of the caller's shell, a test may set its own)."""
    options: dict[str, Any] = {
        "defense": "none",
        "gate": "none",
        "budget_db": tmp_path / "budget.sqlite",
        "max_batch_wait_ms": 1,
        "model_workers": 1,  # the fakes hold their one model thread at a gate; test_model_workers runs several
        "watermark": "off",  # on by default with keys; the tests that compare answers with the victim's keep it off
    }
    return ServerSettings(**(options | overrides))


def loopback_settings(tmp: Path, **overrides: Any) -> ServerSettings:
    """:func:`make_settings` with every ``DD_*`` variable hidden while the settings are read, for the
    tests that do not use the ``no_server_env`` fixture (their CLI runs still read ``DD_DATA_ROOT``)."""
    saved = {k: os.environ.pop(k) for k in [k for k in os.environ if k.startswith("DD_")]}
    try:
        return make_settings(tmp, **overrides)
    finally:
        os.environ.update(saved)


def pin_secrets(settings: ServerSettings) -> None:
    """Write :data:`PINNED_SECRETS` where a server of ``settings`` without Redis keeps its secrets (mode 0600)."""
    for name, value in PINNED_SECRETS.items():
        path = secret_path(settings.budget_db, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(value + "\n")


def pin_monitor_secret(budget_db: Path) -> None:
    """Keep :data:`PINNED_MONITOR_SECRET` in ``budget_db``, where a monitor's SQLite store keeps the secret it makes;
    before any monitor opens the file (one that already holds a secret is refused)."""
    with closing(SqliteMonitorStore(budget_db)) as store:
        store.keep_secret(PINNED_MONITOR_SECRET)
