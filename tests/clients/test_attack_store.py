"""The transfer-set store: append-only shards committed by the manifest, crash leftovers ignored,
another attack's store refused, planned queries kept, Ctrl-C held until the answered batch is
stored; a store that does not read back as written (empty, a shard corrupt or missing, a malformed
manifest, counts that disagree) refused with an error naming the store and the fault; JBDA's
augmentation step."""

from __future__ import annotations

import json
import re
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from support.files import flip_last_byte

from deepdefense.clients.jbda import jacobian_augmentation
from deepdefense.clients.oracle import OracleReply
from deepdefense.clients.transfer import TransferStore, TransferStoreError, collect
from deepdefense.models.lenet import LeNet

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
    with pytest.raises(ValueError, match="holds 10 answers, fewer than the 11"):  # never cut short in silence
        data.prefix(11)


def test_an_existing_store_opens_with_its_own_fingerprint_and_an_empty_folder_is_refused(tmp_path: Path) -> None:
    TransferStore(tmp_path / "s", FP).append(torch.rand(3, 1, 28, 28), reply(3))
    opened = TransferStore.existing(tmp_path / "s")
    assert opened.fingerprint == TransferStore(tmp_path / "s", FP).fingerprint and len(opened.load()) == 3
    (tmp_path / "empty").mkdir()
    with pytest.raises(TransferStoreError, match=r"holds no manifest\.json"):
        TransferStore.existing(tmp_path / "empty")
    assert not (tmp_path / "empty" / "manifest.json").exists(), "refused, not made a new store"


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


def two_shards(root: Path) -> TransferStore:
    store = TransferStore(root, FP)
    store.append(torch.rand(4, 1, 28, 28), reply(4))
    store.append(torch.rand(3, 1, 28, 28), reply(3, 4))
    return store


def refused(root: Path, problem: str, action: Callable[[], Any] | None = None) -> None:
    """``action`` (default: opening the store at ``root``) raises TransferStoreError, whose message
    names the store and matches ``problem``."""
    with pytest.raises(TransferStoreError) as info:
        (action or (lambda: TransferStore(root, FP)))()
    message = str(info.value)
    assert message.startswith(f"transfer set {root}: "), message
    assert re.search(problem, message), message


def edit_manifest(root: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    edit(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_an_empty_store_opens_but_loading_it_says_it_holds_no_queries(tmp_path: Path) -> None:
    # Every caller of load() trains or measures on what it returns, right after collecting: an empty set
    # there is a mistake (a budget of 0, a wrong --store) that should stop the run, not train on nothing.
    store = TransferStore(tmp_path / "s", FP)
    assert len(store) == 0 and len(TransferStore(tmp_path / "s", FP)) == 0
    refused(tmp_path / "s", r"holds no queries", store.load)


@pytest.mark.parametrize(
    "damage",
    [b"", b"half-written by a crashed run", "truncated"],
    ids=["empty-file", "garbage", "truncated"],
)
def test_a_corrupt_shard_is_refused_when_the_store_is_opened(tmp_path: Path, damage: bytes | str) -> None:
    two_shards(tmp_path / "s")
    shard = tmp_path / "s" / "shard-000001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-7] if damage == "truncated" else damage)
    refused(tmp_path / "s", r"shard shard-000001\.safetensors is corrupt \(")


def test_a_shard_whose_bytes_changed_is_refused_when_loaded(tmp_path: Path) -> None:
    # The header still parses (so opening succeeds); the tensors' bytes differ from what was committed.
    store = two_shards(tmp_path / "s")
    shard = tmp_path / "s" / "shard-000000.safetensors"
    flip_last_byte(shard)
    refused(
        tmp_path / "s",
        r"shard shard-000000\.safetensors is corrupt \(its SHA-256 differs",
        TransferStore(tmp_path / "s", FP).load,
    )
    refused(tmp_path / "s", r"SHA-256 differs", store.load)


def test_a_store_written_before_checksums_still_loads(tmp_path: Path) -> None:
    x = torch.rand(7, 1, 28, 28)
    store = TransferStore(tmp_path / "s", FP)
    store.append(x[:4], reply(4))
    store.append(x[4:], reply(3, 4))
    edit_manifest(tmp_path / "s", lambda m: [s.pop("sha256") for s in m["shards"]])
    assert torch.equal(TransferStore(tmp_path / "s", FP).load().images, x), "identity: the bytes it was given"


def test_a_missing_shard_is_refused_when_opened_and_when_loaded(tmp_path: Path) -> None:
    store = two_shards(tmp_path / "s")
    (tmp_path / "s" / "shard-000001.safetensors").unlink()
    missing = r"shard shard-000001\.safetensors is listed in manifest\.json but missing"
    refused(tmp_path / "s", missing)
    refused(tmp_path / "s", missing, store.load)  # gone after the store was opened


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{not json", r"manifest\.json is not valid JSON"),
        ("", r"manifest\.json is not valid JSON"),
        ("[]", r"malformed: expected an object, found list"),
        ('{"shards": []}', r"malformed: missing key\(s\) fingerprint"),
        ('{"fingerprint": {}}', r"malformed: missing key\(s\) shards"),
        ('{"fingerprint": "random", "shards": []}', r"'fingerprint' must be an object, found str"),
        ('{"fingerprint": {}, "shards": {}}', r"'shards' must be a list, found dict"),
        ('{"fingerprint": {}, "shards": [7]}', r"shards\[0\] must be an object, found int"),
    ],
    ids=[
        "not-json",
        "empty-file",
        "a-list",
        "no-fingerprint",
        "no-shards",
        "fingerprint-str",
        "shards-dict",
        "entry-int",
    ],
)
def test_a_malformed_manifest_is_refused(tmp_path: Path, text: str, problem: str) -> None:
    TransferStore(tmp_path / "s", FP)
    (tmp_path / "s" / "manifest.json").write_text(text)
    refused(tmp_path / "s", problem)


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda m: m["shards"][1].pop("count"), r"shards\[1\] is missing key\(s\) count"),
        (lambda m: m["shards"][0].pop("file"), r"shards\[0\] is missing key\(s\) file"),
        (lambda m: m["shards"][1].update(count="3"), r"shards\[1\]\.count must be a whole number >= 0, found '3'"),
        (lambda m: m["shards"][1].update(count=-1), r"shards\[1\]\.count must be a whole number >= 0, found -1"),
        (lambda m: m["shards"][0].update(round=True), r"shards\[0\]\.round must be a whole number >= 0, found True"),
        (lambda m: m["shards"][0].update(round=0.5), r"shards\[0\]\.round must be a whole number >= 0, found 0\.5"),
        (lambda m: m["shards"][1].update(sha256=None), r"shards\[1\]\.sha256 must be 64 lowercase hex digits"),
        (lambda m: m["shards"].reverse(), r"shards\[0\]\.file is 'shard-000001\.safetensors', expected 'shard-000000"),
        (lambda m: m["shards"][1].update(file="../elsewhere.safetensors"), r"shards\[1\]\.file is '\.\./elsewhere"),
    ],
    ids=[
        "no-count",
        "no-file",
        "count-str",
        "count-negative",
        "round-bool",
        "round-float",
        "sha-null",
        "order",
        "path",
    ],
)
def test_a_manifest_with_wrong_types_or_missing_keys_is_refused(
    tmp_path: Path, edit: Callable[[dict[str, Any]], Any], problem: str
) -> None:
    two_shards(tmp_path / "s")
    edit_manifest(tmp_path / "s", edit)
    refused(tmp_path / "s", r"manifest\.json is malformed: " + problem)


@pytest.mark.parametrize("count", [2, 5, 0])
def test_a_count_that_disagrees_with_its_shard_is_refused(tmp_path: Path, count: int) -> None:
    # collect() skips as many queries as the manifest counts: a wrong count would skip unsent queries
    # (or resend paid ones), so it is refused when the store is opened, before any query is sent.
    two_shards(tmp_path / "s")
    edit_manifest(tmp_path / "s", lambda m: m["shards"][0].update(count=count))
    refused(
        tmp_path / "s", rf"shard shard-000000\.safetensors holds 4 rows of \w+, its manifest\.json entry counts {count}"
    )


def test_shards_that_disagree_with_each_other_are_refused(tmp_path: Path) -> None:
    store = TransferStore(tmp_path / "s", FP)
    store.append(torch.rand(2, 1, 28, 28), reply(2))
    store.append(torch.rand(2, 1, 28, 28), OracleReply(reply(2).labels, reply(2).probabilities, None))
    refused(tmp_path / "s", r"shard shard-000001\.safetensors has no attribution maps, unlike shard-000000")
    other = TransferStore(tmp_path / "t", FP)
    other.append(torch.rand(2, 1, 28, 28), reply(2))
    other.append(torch.rand(2, 3, 28, 28), reply(2))
    refused(tmp_path / "t", r"shard shard-000001\.safetensors has images of shape \[\*, 3, 28, 28\], shard-000000")


def test_shards_without_a_manifest_are_not_overwritten(tmp_path: Path) -> None:
    two_shards(tmp_path / "s")
    (tmp_path / "s" / "manifest.json").unlink()
    before = (tmp_path / "s" / "shard-000000.safetensors").read_bytes()
    refused(tmp_path / "s", r"holds 2 shard file\(s\) \(shard-000000\.safetensors, \.\.\.\) but no manifest\.json")
    assert (tmp_path / "s" / "shard-000000.safetensors").read_bytes() == before
    assert not (tmp_path / "s" / "manifest.json").exists()


def test_a_corrupt_plan_is_refused_not_redrawn(tmp_path: Path) -> None:
    store = TransferStore(tmp_path / "s", FP)
    store.plan("round-1", lambda: torch.rand(4, 1, 28, 28))
    (tmp_path / "s" / "plan-round-1.safetensors").write_bytes(b"garbage")
    refused(
        tmp_path / "s",
        r"plan-round-1\.safetensors is corrupt",
        lambda: store.plan("round-1", lambda: pytest.fail("redrawn")),
    )


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
