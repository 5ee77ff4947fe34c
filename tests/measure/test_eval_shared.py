"""The harness's shared engine: DD-S and DD-I arms reuse DeepDefense's optimisation, answers unchanged."""

from __future__ import annotations

from pathlib import Path

import torch

from deepdefense.defense.loader import load_defense
from deepdefense.measure.shared_modes import ModeOf, SharedModes
from deepdefense.models.data import load_split


def test_modes_share_one_optimisation(data_root: Path) -> None:
    x = load_split("mnist", data_root, "test").tensors[0][:3]
    engine = load_defense("lenet-mnist", "deepdefense", "gradcam", steps=3)[0]
    calls = []
    real = engine.answer_modes
    engine.answer_modes = lambda q, modes, explain=True: calls.append(len(q)) or real(q, modes, explain=explain)
    shared = SharedModes(engine, ("deepdefense", "dd-s", "dd-i"))
    arms = {m: ModeOf(shared, m).answer(x) for m in ("deepdefense", "dd-s", "dd-i")}
    assert calls == [3], "one optimisation for the three arms"
    direct = real(x, ("deepdefense", "dd-s", "dd-i"))
    for mode, answers in arms.items():
        assert ModeOf(shared, mode).public_settings()["mode"] == mode
        for a, b in zip(answers, direct[mode], strict=True):
            torch.testing.assert_close(a.probabilities, b.probabilities)
            torch.testing.assert_close(a.attribution, b.attribution)
            assert ("shared" in a.stats) == (mode != "deepdefense")
    again = ModeOf(shared, "deepdefense").answer(x)  # another arm of the same mode (behind the gate, say)
    assert calls == [3], "an arm asking for a mode already answered optimised again"
    for a, b in zip(again, arms["deepdefense"], strict=True):
        torch.testing.assert_close(a.probabilities, b.probabilities)
        assert "shared" in a.stats
    ModeOf(shared, "dd-s").answer(x[:2] + 0.01)
    assert calls == [3, 2], "new queries are optimised"
