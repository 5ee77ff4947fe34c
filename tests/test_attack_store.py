"""The transfer-set store: append-only shards committed by the manifest, crash leftovers ignored,
another attack's store refused, planned queries kept, Ctrl-C held until the answered batch is
stored; JBDA's augmentation step."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from clients.jbda import jacobian_augmentation
from clients.oracle import OracleReply
from clients.transfer import TransferStore, collect
from models.lenet import LeNet

FP = {"strategy": "random", "dataset": "fashionmnist", "seed": 0}


def reply(n: int, offset: int = 0) -> OracleReply:
    labels = torch.arange(offset, offset + n) % 10
    return OracleReply(
        labels=labels, probabilities=torch.nn.functional.one_hot(labels, 10).float(), attributions=torch.rand(n, 28, 28)
    )


def test_shards_are_committed_in_order_and_read_back(tmp_path: Path) -> None:
    store = TransferStore(tmp_path / "s", FP)
    x = torch.rand(10, 1, 28, 28)
    store.append(x[:4], reply(4))
    store.append(x[4:], reply(6, 4), round_=1)
    again = TransferStore(tmp_path / "s", FP)
    data = again.load()
    assert len(again) == 10 and again.count(0) == 4 and again.count(1) == 6
    same = "identity is the property: a store reads back the bytes it was given"
    assert torch.equal(data.images, x) and data.labels.tolist() == list(range(10)), same
    assert data.rounds.tolist() == [0] * 4 + [1] * 6
    assert torch.equal(data.prefix(3).images, x[:3]) and len(data.prefix(3)) == 3, same


def test_a_shard_not_in_the_manifest_is_ignored_and_rewritten(tmp_path: Path) -> None:
    store = TransferStore(tmp_path / "s", FP)
    store.append(torch.rand(2, 1, 28, 28), reply(2))
    (tmp_path / "s" / "shard-000001.safetensors").write_bytes(b"half-written by a crashed run")
    assert len(TransferStore(tmp_path / "s", FP)) == 2
    resumed = TransferStore(tmp_path / "s", FP)
    resumed.append(torch.rand(3, 1, 28, 28), reply(3))
    assert len(resumed.load()) == 5
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["shards"][1]["count"] == 3


def test_another_attacks_store_is_refused(tmp_path: Path) -> None:
    TransferStore(tmp_path / "s", FP)
    with pytest.raises(ValueError, match="differs in: seed"):
        TransferStore(tmp_path / "s", FP | {"seed": 1})


def test_a_plan_is_made_once(tmp_path: Path) -> None:
    store = TransferStore(tmp_path / "s", FP)
    first = store.plan("round-1", lambda: torch.rand(4, 1, 28, 28))
    second = TransferStore(tmp_path / "s", FP).plan("round-1", lambda: pytest.fail("planned twice"))
    assert torch.equal(first, second), "identity is the property: the stored plan is read back, not redrawn"


def test_jacobian_augmentation_steps_by_lambda_inside_the_unit_cube() -> None:
    model = LeNet().eval()
    x = torch.rand(6, 1, 28, 28)
    labels = torch.arange(6)
    out = jacobian_augmentation(model, x, labels, step=0.1, chunk=4)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    moved = (out - x).abs()
    assert torch.all(moved <= 0.1 + 1e-6)
    assert moved.max() > 0.099
    x_req = x.clone().requires_grad_(True)
    score = model(x_req).softmax(-1)[torch.arange(6), labels].sum()
    (g,) = torch.autograd.grad(score, x_req)
    # g: one batch of 6; the augmentation's own gradient: chunks of 4 and 2, another summation order.
    # Signs are compared exactly where |g| is far above float32 rounding of its sums (1e-4 of the largest):
    # a component that small could change sign by path alone. That still leaves most pixels.
    inside = (x > 0.1) & (x < 0.9) & (g.abs() > 1e-4 * g.abs().max())
    assert inside.float().mean() > 0.5
    assert torch.equal((out - x)[inside].sign(), g[inside].sign())


class CtrlCWhileAnswering:
    """An oracle whose user presses Ctrl-C while the second request is in flight."""

    def __init__(self) -> None:
        self.calls = 0

    def query(self, x: torch.Tensor, *, explain: bool = True) -> OracleReply:
        self.calls += 1
        if self.calls == 2:
            signal.raise_signal(signal.SIGINT)
        return reply(len(x))


def test_ctrl_c_stops_after_the_answered_batch_is_stored(tmp_path: Path) -> None:
    store = TransferStore(tmp_path / "s", FP)
    oracle = CtrlCWhileAnswering()
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        collect(oracle, store, torch.rand(20, 1, 28, 28), batch_size=4, progress=False)  # type: ignore[arg-type]
    assert oracle.calls == 2 and len(store) == 8
    assert signal.getsignal(signal.SIGINT) is before
