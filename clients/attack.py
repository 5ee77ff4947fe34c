"""The model-stealing adversary of DeepDefense §3 (``deepdefense attack``).

The attacker samples B queries from its own data set P_A (by default Fashion-MNIST against the
MNIST victim, the paper's setup, §5) — or grows them from a small seed set by JBDA — sends them to
the oracle in batches, stores the transfer set on disk as it goes (:mod:`clients.transfer`; a rerun
continues where an interrupted one stopped and never re-sends a stored query), trains an attack
model with one of the losses of :mod:`clients.attack_losses` and reports its test accuracy on the
victim's test set.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import TensorDataset

from deepdefense.clients.attack_losses import AttackLoss
from deepdefense.clients.attack_model import TrainingRecipe, build_attack_model, train_attack_model
from deepdefense.clients.jbda import collect_jbda
from deepdefense.clients.oracle import ModelInfo, Oracle
from deepdefense.clients.transfer import TransferSet, TransferStore, collect, fingerprint_digest
from deepdefense.models.data import get_spec, load_split
from deepdefense.models.train import evaluate

Strategy = Literal["random", "jbda"]
STRATEGIES: tuple[Strategy, ...] = ("random", "jbda")


@dataclass(frozen=True)
class AttackConfig:
    budget: int = 10_000  # B, queries in the transfer set
    strategy: Strategy = "random"  # random: Knockoff Nets' random sampling from P_A; jbda: Papernot et al.
    loss: AttackLoss = "explanations"
    dataset: str = "fashionmnist"  # the attacker's data set P_A (its training split)
    data_root: str | None = None
    arch: str | None = None  # None: the victim's architecture, as the server reports it
    recipe: TrainingRecipe = field(default_factory=TrainingRecipe)  # how the attack model is trained
    query_batch: int = 16  # images per request
    seed: int = 0
    seed_size: int = 150  # JBDA |S_0|
    jbda_step: float = 0.1  # JBDA λ
    rounds: int = 7  # JBDA max_ρ: |S_0|·2^(max_ρ−1) queries at most
    test_n: int | None = None  # first n victim test images (None: all)
    device: str = "cpu"


def sample_queries(pool: int, n: int, seed: int) -> torch.Tensor:
    """Indices of ``n`` distinct images of a pool of ``pool``, drawn from ``seed``; a larger ``n``
    extends a smaller one's draw."""
    if n > pool:
        raise ValueError(f"the attacker's data set holds {pool} images, fewer than the {n} asked for")
    return torch.randperm(pool, generator=torch.Generator().manual_seed(seed))[:n]


def fingerprint(config: AttackConfig, info: ModelInfo) -> dict[str, Any]:
    """What fixes the queries and their answers: the store refuses to mix another attack's answers in.
    The budget is left out (a larger budget extends a smaller one's queries); JBDA's queries also
    depend on how its substitutes are trained."""
    fp: dict[str, Any] = {
        "strategy": config.strategy,
        "dataset": config.dataset,
        "seed": config.seed,
        "oracle": {
            "model": info.name,
            "defense": info.defense,
            "interpreter": info.interpreter,
            "settings": info.defense_settings,
        },
    }
    if config.strategy == "jbda":
        fp["jbda"] = {
            **{k: getattr(config, k) for k in ("seed_size", "jbda_step", "rounds", "arch", "loss")},
            **asdict(config.recipe),
        }
    return fp


def default_store(config: AttackConfig, info: ModelInfo) -> Path:
    """``runs/transfer-sets/<model>-<defense>-<strategy>-<dataset>-<digest>``: the same command finds its store
    again."""
    digest = fingerprint_digest(fingerprint(config, info))
    return Path("runs") / "transfer-sets" / f"{info.name}-{info.defense}-{config.strategy}-{config.dataset}-{digest}"


def run_attack(
    oracle: Oracle, config: AttackConfig, store_dir: str | Path | None = None, progress: bool = True
) -> dict[str, Any]:
    """Collect (or finish collecting) the transfer set, train the attack model, test it; the result record."""
    started = time.perf_counter()
    info = oracle.info()
    arch = config.arch or info.arch
    config = replace(config, arch=arch)
    device = torch.device(config.device)
    spec = get_spec(config.dataset)
    if tuple(spec.input_shape) != tuple(info.input_shape):
        raise ValueError(
            f"attacker data set {config.dataset} has images of shape {list(spec.input_shape)}, "
            f"the victim takes {list(info.input_shape)}"
        )
    store_path = Path(store_dir) if store_dir is not None else default_store(config, info)
    store = TransferStore(store_path, fingerprint(config, info))
    stored_before = len(store)

    def fresh_model(seed: int) -> nn.Module:
        return build_attack_model(arch, len(info.classes), info.input_shape, spec.mean, spec.std, seed)

    def fit(data: TransferSet, seed: int) -> tuple[nn.Module, list[float]]:
        model = fresh_model(seed)
        history = train_attack_model(
            model,
            data,
            loss=config.loss,
            interpreter=info.interpreter,
            recipe=config.recipe,
            seed=seed,
            device=device,
            progress=progress,
        )
        return model, history

    pool = load_split(config.dataset, config.data_root, "train").tensors[0]
    if config.strategy == "random":
        queries = pool[sample_queries(len(pool), config.budget, config.seed)]
        sent = collect(oracle, store, queries, batch_size=config.query_batch, progress=progress)
    elif config.strategy == "jbda":
        seed_set = pool[sample_queries(len(pool), min(config.seed_size, config.budget), config.seed)]
        sent = collect_jbda(
            oracle,
            store,
            seed_set,
            budget=config.budget,
            rounds=config.rounds,
            step=config.jbda_step,
            train=lambda data: fit(data, config.seed + len(data))[0],
            batch_size=config.query_batch,
            progress=progress,
        )
    else:
        raise ValueError(f"unknown strategy {config.strategy!r}; known strategies: {', '.join(STRATEGIES)}")
    collected = time.perf_counter()

    data = store.load().prefix(config.budget)
    model, history = fit(data, config.seed)
    trained = time.perf_counter()

    test = load_split(info.dataset, config.data_root, "test")
    if config.test_n is not None:
        test = TensorDataset(*(t[: config.test_n] for t in test.tensors))
    accuracy = evaluate(model, test, device)
    finished = time.perf_counter()
    return {
        "accuracy": round(accuracy, 2),
        "budget": config.budget,
        "transfer_set_size": len(data),
        "queries_sent": sent,
        "queries_stored_before": stored_before,
        "strategy": config.strategy,
        "loss": config.loss,
        "lambda": config.recipe.lam if config.loss == "explanations" else None,
        "epochs": config.recipe.epochs,
        "epoch_losses": history,
        "arch": arch,
        "seed": config.seed,
        "attacker_dataset": config.dataset,
        "test_set": f"{info.dataset} test",
        "test_n": len(test),
        "victim": {
            "model": info.name,
            "arch": info.arch,
            "defense": info.defense,
            "interpreter": info.interpreter,
            "settings": info.defense_settings,
        },
        "store": str(store_path),
        "config": asdict(config),
        "timings": {
            "query_s": round(collected - started, 3),
            "train_s": round(trained - collected, 3),
            "eval_s": round(finished - trained, 3),
            "total_s": round(finished - started, 3),
        },
    }
