"""models/artifacts.py: the one way files beside a checkpoint are named, written, verified and tied to their victim."""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from deepdefense.defense.domain import domain_paths
from deepdefense.defense.misinformation import misinformation_path
from deepdefense.defense.warm_start import warm_start_paths
from deepdefense.models.artifacts import beside, check_victim, stem, verified_weights, victim_record, write_pair
from deepdefense.models.checkpoint import SHIPPED_DIR, load_checkpoint, read_meta, save_checkpoint


@dataclass
class Meta:
    note: str
    weights: str = ""
    sha256: str = ""


@pytest.fixture
def umask() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_checkpoint_is_written_like_every_artifact_beside_it(tmp_path: Path, umask: None) -> None:
    """Both readable by a server running as another user (safetensors' own save_file makes its file 0600)."""
    model, meta = load_checkpoint("lenet-mnist")
    checkpoint = save_checkpoint(model, meta, tmp_path / "victim")
    artifact = write_pair(beside(checkpoint, ".extra"), {"t": torch.ones(2)}, Meta("x"))
    for path in (checkpoint, checkpoint.with_suffix(".safetensors"), artifact, artifact.with_suffix(".safetensors")):
        assert mode(path) == 0o644, path
    assert read_meta(checkpoint).sha256 == meta.sha256, "the same bytes as the shipped checkpoint's"


def test_paths_beside_a_checkpoint(tmp_path: Path) -> None:
    victim = SHIPPED_DIR / "lenet-mnist.json"
    assert (
        stem(tmp_path / "a.b.json") == stem(tmp_path / "a.b.safetensors") == stem(tmp_path / "a.b") == tmp_path / "a.b"
    )
    assert warm_start_paths("lenet-mnist") == (SHIPPED_DIR / "lenet-mnist.warm.json", victim)
    assert domain_paths("lenet-mnist") == (SHIPPED_DIR / "lenet-mnist.domain.json", victim)
    assert domain_paths(SHIPPED_DIR / "lenet-mnist.domain.json") == (SHIPPED_DIR / "lenet-mnist.domain.json", victim)
    assert misinformation_path("lenet-mnist") == SHIPPED_DIR / "lenet-mnist-misinfo"


def test_an_artifact_is_verified_and_tied_to_its_victim(tmp_path: Path) -> None:
    for suffix in (".json", ".safetensors"):
        shutil.copy(SHIPPED_DIR / f"lenet-mnist{suffix}", tmp_path / f"lenet-mnist{suffix}")
    victim_path = tmp_path / "lenet-mnist.json"
    victim = read_meta(victim_path)
    meta = Meta("x")
    path = write_pair(beside(victim_path, ".extra"), {"t": torch.arange(3.0)}, meta)
    assert verified_weights(path, meta.weights, meta.sha256, "extra", ValueError) == path.with_suffix(".safetensors")
    record = victim_record(victim_path, victim.weights, victim.sha256)
    assert record == {"checkpoint": "lenet-mnist", "weights": "lenet-mnist.safetensors", "sha256": victim.sha256}
    model = load_checkpoint(victim_path)[0]
    check_victim("extra", path, record["sha256"], victim_path, victim.sha256, ValueError, model=model)
    with pytest.raises(
        ValueError, match=r"was made for victim weights 000000000000…, .*refusing to load \(make it again\)"
    ):
        check_victim("extra", path, "0" * 64, victim_path, victim.sha256, ValueError, remedy="make it again")
    other = load_checkpoint("lenet-fashionmnist")[0]
    with pytest.raises(ValueError, match="the model given is not checkpoint lenet-mnist's weights"):
        check_victim("extra", path, victim.sha256, victim_path, victim.sha256, ValueError, model=other)
    path.with_suffix(".safetensors").write_bytes(b"changed")
    with pytest.raises(ValueError, match=r"sha256 of lenet-mnist\.extra\.safetensors is"):
        verified_weights(path, meta.weights, meta.sha256, "extra", ValueError)
