"""``measure.launcher.served``: the server measurements run against has its settings fixed, not the caller's."""

from __future__ import annotations

import pytest

import deepdefense.server.app as server_app
from deepdefense.measure.launcher import served


def test_a_served_server_carries_no_watermark_whatever_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """With keys the watermark is on by default and relabels answers chosen under secrets drawn per run: figures
    measured through ``served`` would not repeat."""
    monkeypatch.setenv("DD_WATERMARK", "on")
    made = []
    real = server_app.create_app
    monkeypatch.setattr(server_app, "create_app", lambda settings: made.append(real(settings)) or made[-1])
    with served("lenet-mnist", "none", "gradcam") as (url, key):
        assert url.startswith("http://") and key
    assert len(made) == 1 and made[0].state.runtime.settings.watermark == "off"
    assert made[0].state.runtime.watermark is None, "the served server watermarks its answers"
