"""A defense's replica for another model thread (defense/replica.py): the same tensors, its own modules, the
same answers, and safe to call while the original is called on another thread."""

from __future__ import annotations

import itertools
import threading

import torch
from torch import nn

from deepdefense.defense.engine import DeepDefense
from deepdefense.defense.gate import MisinformationGate
from deepdefense.defense.loader import load_defense, load_gate
from deepdefense.defense.replica import replica

SHORT = {"steps": 2}  # the replica's contract, not the defense's quality


def gated_engine() -> MisinformationGate:
    engine, _ = load_defense("lenet-mnist", "deepdefense", "gradcam", **SHORT)
    return load_gate(engine, "lenet-mnist")  # type: ignore[return-value]


def modules(defense: MisinformationGate) -> list[nn.Module]:
    inner = defense.inner
    assert isinstance(inner, DeepDefense)
    return [inner.model, inner.explainer.model, defense.misinformation]


def test_a_replica_shares_every_tensor_and_owns_its_modules() -> None:
    original = gated_engine()
    copy = replica(original)
    for mine, theirs in zip(modules(original), modules(copy), strict=True):
        assert mine is not theirs  # functional_call and the probes swap attributes on a module while it runs
        for a, b in zip(
            itertools.chain(mine.parameters(), mine.buffers()),
            itertools.chain(theirs.parameters(), theirs.buffers()),
            strict=True,
        ):
            assert a is b  # one set of victim weights, however many threads
    assert isinstance(copy.inner, DeepDefense) and copy.inner.warm is not None
    assert all(copy.inner.warm.dense[k] is original.inner.warm.dense[k] for k in original.inner.warm.dense)


def test_a_replica_answers_as_the_original_while_both_run_at_once() -> None:
    original = gated_engine()
    copy = replica(original)
    x = torch.rand((6, 1, 28, 28), generator=torch.Generator().manual_seed(0))
    alone = original.answer(x)
    together: dict[str, list] = {}
    threads = [
        threading.Thread(target=lambda name=name, d=d: together.update({name: d.answer(x)}))
        for name, d in (("original", original), ("replica", copy))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert set(together) == {"original", "replica"}, "a thread raised or did not finish"
    for answers in together.values():
        for a, b in zip(alone, answers, strict=True):
            assert a.label == b.label
            # the same computation on the same batch: equal up to the kernels' thread scheduling
            torch.testing.assert_close(a.probabilities, b.probabilities, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(a.attribution, b.attribution, rtol=1e-5, atol=1e-6)
