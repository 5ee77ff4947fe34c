"""Shared fixtures: the data root comes from $DD_DATA_ROOT (CI sets ../shared/data).

Plain helpers and fakes live in the ``support`` package next to this file (``from support.x import``:
pytest puts this folder on ``sys.path`` to import this conftest); test modules never import each other.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from support.fakes import GatedDefense
from support.faults import load_victim
from support.images import SHAPE
from support.redis_server import RedisServer

from deepdefense.defense import NoDefense, create_defense
from deepdefense.defense.interpreters import create_interpreter

REPO = Path(__file__).resolve().parent.parent


def _data_root() -> Path:
    return Path(os.environ.get("DD_DATA_ROOT", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = _data_root()
    if not (root / "MNIST" / "raw").is_dir():
        pytest.skip(f"MNIST not found under {root} (set DD_DATA_ROOT to the shared data folder)")
    return root


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def no_server_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests configure the server explicitly; DD_* variables of the caller's shell do not leak in.

    Not autouse: it also clears ``DD_DATA_ROOT``, which the CLI and data tests read. The server
    modules opt in for all their tests with ``pytestmark = pytest.mark.usefixtures("no_server_env")``."""
    for name in [n for n in os.environ if n.startswith("DD_")]:
        monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def victim() -> torch.nn.Module:
    """``lenet-mnist``, frozen; one per test module."""
    return load_victim()


@pytest.fixture(scope="module")
def defense(victim: torch.nn.Module) -> NoDefense:
    """The undefended victim (defense ``none``, Grad-CAM maps); one per test module."""
    return create_defense("none", victim, create_interpreter("gradcam", victim, SHAPE))  # type: ignore[return-value]


@pytest.fixture
def gated(victim: torch.nn.Module) -> Iterator[GatedDefense]:
    """A :class:`GatedDefense` over the victim; its gate is opened again when the test ends."""
    d = GatedDefense(victim)
    yield d
    d.gate.set()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own on a free port, killed at teardown (no mock: the package must be installed)."""
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()
