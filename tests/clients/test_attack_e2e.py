"""``deepdefense attack`` end to end against uvicorn on loopback, scaled down (B = 64, one epoch):
every loss on one stored transfer set, JBDA, a run cut off by the server's budget and resumed
without re-sending a stored query, Ctrl-C in-process, and one run against DeepDefense itself."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from support.numerics import top1_margin
from support.servers import served_queries
from support.settings import loopback_settings

from deepdefense.cli import main
from deepdefense.clients.attack import AttackConfig, run_attack, sample_queries
from deepdefense.clients.attack_model import TrainingRecipe
from deepdefense.clients.oracle import OracleReply
from deepdefense.clients.transfer import TransferStore
from deepdefense.defense.loader import load_defense
from deepdefense.measure.launcher import in_thread
from deepdefense.measure.local_oracle import LocalOracle, local_info
from deepdefense.models.data import load_split
from deepdefense.server.app import create_app

SMALL = ["--budget", "64", "--epochs", "1", "--test-n", "500", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with in_thread(create_app(loopback_settings(tmp_path_factory.mktemp("server")))) as url:
        yield url


def attack(url: str, data_root: Path, store: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    out = store.parent / f"{store.name}.json"
    out.unlink(missing_ok=True)
    rc = main(
        [
            "attack",
            "--url",
            url,
            "--data-root",
            str(data_root),
            "--store",
            str(store),
            "--out",
            str(out),
            *SMALL,
            *extra,
        ]
    )
    return rc, json.loads(out.read_text()) if out.is_file() else {}


def manifest(store: Path) -> dict[str, Any]:
    return json.loads((store / "manifest.json").read_text())


def test_every_loss_on_one_stored_transfer_set(server: str, data_root: Path, tmp_path: Path) -> None:
    store = tmp_path / "random"
    before = served_queries(server)
    for i, loss in enumerate(("explanations", "probabilities", "labels")):
        rc, result = attack(server, data_root, store, "--loss", loss)
        assert rc == 0
        assert result["loss"] == loss and result["budget"] == 64 and result["transfer_set_size"] == 64
        assert result["queries_sent"] == (64 if i == 0 else 0)  # later losses reuse the stored answers
        assert result["epochs"] == 1 and len(result["epoch_losses"]) == 1 and result["seed"] == 0
        assert 0.0 <= result["accuracy"] <= 100.0 and result["test_n"] == 500
        assert result["victim"]["defense"] == "none" and result["arch"] == "lenet"
        assert result["command"].startswith("deepdefense attack --url")
        assert set(result["timings"]) == {"query_s", "train_s", "eval_s", "total_s"}
    assert served_queries(server) - before == 64
    assert [s["count"] for s in manifest(store)["shards"]] == [16] * 4
    data = TransferStore(store, manifest(store)["fingerprint"]).load()
    pool = load_split("fashionmnist", data_root, "train").tensors[0]
    assert torch.equal(data.images, pool[sample_queries(len(pool), 64, 0)]), (
        "identity is the property: the store holds the sampled pool images, byte for byte"
    )
    assert torch.allclose(data.probabilities.sum(1), torch.ones(64), atol=1e-5)
    assert data.attributions is not None and data.attributions.shape == (64, 28, 28)
    # answers arrive rounded; rounding keeps the order of two probabilities but may make them equal, and then
    # argmax would pick the first of the tied classes: with no tie at the top, the identity is exact on any CPU
    assert top1_margin(data.probabilities).min() > 0, "a tie at the top after rounding"
    assert torch.equal(data.labels, data.probabilities.argmax(1)), (
        "identity is the property: each stored label is the argmax of the stored probabilities it came with"
    )


def test_jbda_doubles_its_set_each_round(server: str, data_root: Path, tmp_path: Path) -> None:
    store = tmp_path / "jbda"
    before = served_queries(server)
    rc, result = attack(
        server, data_root, store, "--strategy", "jbda", "--seed-size", "16", "--rounds", "4", "--loss", "labels"
    )
    assert rc == 0 and result["strategy"] == "jbda" and result["queries_sent"] == 64
    assert served_queries(server) - before == 64
    rounds = [s["round"] for s in manifest(store)["shards"]]
    assert [rounds.count(r) for r in range(3)] == [1, 1, 2]  # 16 + 16 + 32 queries; round 3 is past the budget
    assert sorted(p.name for p in store.glob("plan-*")) == [f"plan-round-{r}.safetensors" for r in range(3)]
    data = TransferStore(store, manifest(store)["fingerprint"]).load()
    step = (data.images[16:32] - data.images[:16]).abs().amax(dim=(1, 2, 3))
    assert torch.allclose(step, torch.full((16,), 0.1), atol=1e-6)  # S_1 = S_0 + λ sgn(J)
    assert data.images.min() >= 0 and data.images.max() <= 1


def test_a_run_refused_by_the_server_resumes_without_requerying(data_root: Path, tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("attacker-key-0123456789\n")
    store = tmp_path / "resumed"
    first = loopback_settings(
        tmp_path, api_keys="attacker-key-0123456789", query_budget=40, budget_db=tmp_path / "a.sqlite"
    )
    with in_thread(create_app(first)) as url:
        rc, _ = attack(url, data_root, store, "--api-key-file", str(key), "--loss", "probabilities")
        assert rc == 1  # the third request of 16 would pass the budget of 40: 429
        assert served_queries(url) == 32
    assert sum(s["count"] for s in manifest(store)["shards"]) == 32
    second = loopback_settings(tmp_path, api_keys="attacker-key-0123456789", budget_db=tmp_path / "b.sqlite")
    with in_thread(create_app(second)) as url:
        rc, result = attack(url, data_root, store, "--api-key-file", str(key), "--loss", "probabilities")
        assert served_queries(url) == 32
    assert rc == 0 and result["queries_sent"] == 32 and result["queries_stored_before"] == 32
    assert sum(s["count"] for s in manifest(store)["shards"]) == 64


class Interrupting:
    """An oracle that counts its calls and raises KeyboardInterrupt on call ``stop_at``."""

    def __init__(self, oracle: LocalOracle, stop_at: int | None = None) -> None:
        self.oracle, self.stop_at, self.calls = oracle, stop_at, 0

    def info(self):
        return self.oracle.info()

    def query(self, x: torch.Tensor, *, explain: bool = True) -> OracleReply:
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        return self.oracle.query(x, explain=explain)


def test_ctrl_c_keeps_every_answered_batch(data_root: Path, tmp_path: Path) -> None:
    defense, meta = load_defense("lenet-mnist", "none")
    local = LocalOracle(defense, local_info("lenet-mnist", meta, defense))
    config = AttackConfig(
        budget=48,
        strategy="jbda",
        seed_size=16,
        rounds=3,
        loss="labels",
        recipe=TrainingRecipe(epochs=1),
        data_root=str(data_root),
        test_n=200,
    )
    cut = Interrupting(local, stop_at=3)  # rounds 0 and 1 answered, the plan of round 2 stored, then Ctrl-C
    with pytest.raises(KeyboardInterrupt):
        run_attack(cut, config, tmp_path / "s", progress=False)
    assert sum(s["count"] for s in manifest(tmp_path / "s")["shards"]) == 32
    again = Interrupting(local)
    result = run_attack(again, config, tmp_path / "s", progress=False)
    assert again.calls == 1 and result["queries_sent"] == 16 and result["transfer_set_size"] == 48
    fresh = run_attack(Interrupting(local), config, tmp_path / "fresh", progress=False)
    resumed = TransferStore(tmp_path / "s", manifest(tmp_path / "s")["fingerprint"]).load()
    uncut = TransferStore(tmp_path / "fresh", manifest(tmp_path / "fresh")["fingerprint"]).load()
    assert torch.equal(resumed.images, uncut.images), (
        "identity is the property: a resumed run sends the queries the uncut run sends (same seed, same shapes)"
    )
    assert fresh["queries_sent"] == 48


def test_attack_against_deepdefense(data_root: Path, tmp_path: Path) -> None:
    settings = loopback_settings(tmp_path, defense="deepdefense", engine={"steps": 2})
    with in_thread(create_app(settings)) as url:
        rc, result = attack(url, data_root, tmp_path / "dd", "--budget", "16", "--loss", "explanations")
        assert served_queries(url) == 16
    assert rc == 0 and result["victim"]["defense"] == "deepdefense"
    assert result["victim"]["settings"]["steps"] == 2 and result["transfer_set_size"] == 16
