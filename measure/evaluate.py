"""The evaluation harness (``deepdefense eval``): the experiments of DeepDefense §5 end to end.

For every *arm* — a defense with its options, answered in-process (``LocalOracle`` over
``defense.loader.load_defense``: the ``Defense.answer`` the server's micro-batcher calls), by a
server this harness starts on loopback, or by a running server (``--url``) — the harness

1. collects one transfer set of the arm's largest budget from its *query set* — ``random``: the
   attacker's data set sampled at random (Knockoff Nets; the paper's); ``jbda``: Jacobian-based
   augmentation from a few of the victim's training images (Papernot et al.); ``victim-train``: the
   victim's own training images, the in-domain ceiling — in the store of :mod:`clients.transfer`,
   shared with ``deepdefense attack`` (resumable, never re-sends a stored query); every smaller
   budget is a prefix of it and every attack loss trains on it. An arm may sit behind the
   misinformation gate (``gated``: ``<defense>+gate``; ``--defense none`` behind it is Adaptive
   Misinformation);
2. trains an attack model per (loss, budget) and measures its test accuracy on the victim's test
   set (Figure 2, Tables 3–5) and its fidelity R_test / R_unif to the victim (:mod:`measure.agreement`);
3. times ``runtime_n`` test queries (ms/query; mean L_orth and fallbacks when in-process, Table 3);
4. for the arms named in ``avg_drop``, queries the first ``n_maps`` test images (stored the same
   way) and compares the Average Drop of the victim's and the answered maps (Table 2,
   :mod:`measure.average_drop`), keeping a few for Figure 3.

Every training result is cached under ``<out>/runs/<digest>.json`` keyed by everything that
determines it (the transfer set's fingerprint, the budget, the loss, the training recipe, the test
images), so a rerun skips finished work and an interrupted one loses at most the training under way.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, closing, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from tqdm import tqdm

from deepdefense.clients.adaptive import collect_adaptive, with_twins
from deepdefense.clients.attack import AttackConfig, fingerprint, sample_queries
from deepdefense.clients.attack_losses import PAPER_LOSSES, AttackLoss, kept_answers
from deepdefense.clients.attack_model import TrainingRecipe, build_attack_model, train_attack_model
from deepdefense.clients.jbda import collect_jbda
from deepdefense.clients.oracle import HttpOracle, ModelInfo, Oracle
from deepdefense.clients.transfer import TransferSet, TransferStore, collect, fingerprint_digest
from deepdefense.common.options import described
from deepdefense.common.provenance import machine, provenance
from deepdefense.defense import ENGINE_MODES, Defense, NoDefense
from deepdefense.defense.domain import DomainScore, load_domain_score
from deepdefense.defense.gate import MisinformationGate
from deepdefense.defense.interpreters import create_interpreter
from deepdefense.defense.names import DefenseName
from deepdefense.measure import agreement, average_drop
from deepdefense.measure.domain import PERTURBATIONS
from deepdefense.measure.local_oracle import LocalOracle, MonitoredOracle, local_info
from deepdefense.measure.shared_modes import ModeOf, SharedModes, engine_key
from deepdefense.models.checkpoint import load_checkpoint
from deepdefense.models.data import SPECS, get_spec, load_split
from deepdefense.models.train import evaluate
from deepdefense.server.monitor import ExtractionMonitor, KeyWindow, MonitorPolicy, SqliteMonitorStore

#: The key id an arm's queries are sent under when the monitor watches them (``--monitored``).
MONITORED_KEY = "a77ac4e40000"
#: The monitor thresholds whose honest escalations the evaluation counts (server/monitor.py, THRESHOLD).
THRESHOLD_CANDIDATES = (0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.8)
#: Queries per honest key in the monitor's replay (a user who sends a thousand digits).
BENIGN_KEY_QUERIES = 1000


#: Where an arm's queries come from (module docstring, step 1).
QuerySet = Literal["random", "jbda", "victim-train", "twins", "adaptive"]
QUERY_SETS: tuple[QuerySet, ...] = get_args(QuerySet)
#: Query sets where every query is followed by its twin (``clients/adaptive.py``): the ``twin`` attacker's.
TWIN_SETS = ("twins", "adaptive")


@dataclass(frozen=True)
class EvalConfig:
    """Everything that shapes an evaluation run (defaults: the paper's MNIST experiments). Each field's description
    is the help of its ``deepdefense eval`` flag (``deepdefense/commands/eval.py`` makes the flags from the fields)."""

    checkpoint: str = described("lenet-mnist", help="the victim: shipped name or path to its metadata JSON")
    interpreter: str = described("gradcam", help="attribution method of the defended answers")
    defenses: tuple[DefenseName, ...] = described(
        ("none", "pp", *ENGINE_MODES), help="the defenses to attack, one arm each", nargs="*"
    )
    gated: tuple[DefenseName, ...] = described(
        (),
        help="defenses also evaluated behind the misinformation gate (arms '<defense>+gate'; 'none': Adaptive "
        "Misinformation)",
        nargs="*",
    )
    monitored: bool = described(
        False,
        help="gated arms answer as the default server with API keys: each arm's queries are one key's, which the "
        "extraction monitor screens and may escalate (its state and summary under <out>/monitor/)",
    )
    query_sets: tuple[QuerySet, ...] = described(
        ("random",),
        help="random: the attacker's data set (--attacker-dataset); jbda: Jacobian augmentation from --jbda-seeds "
        "victim training images; victim-train: the victim's training images (the in-domain ceiling); twins: random "
        "with every image followed by its twin (one pixel moved by 1/255); adaptive: JBDA grown only from the "
        "answers that moved between their twins (clients/adaptive.py)",
    )
    losses: tuple[AttackLoss, ...] = described(PAPER_LOSSES, help="the attackers' losses")
    budgets: tuple[int, ...] = described((2500, 5000, 7500, 10_000), help="query budgets B")
    cs: tuple[float, ...] = described(
        (50.0, 70.0, 90.0), help="Table 3: DeepDefense arms at these cumulative sensitivities (none: skip)", nargs="*"
    )
    top_k: tuple[int, ...] = described(
        (1, 3), help="Table 4: DeepDefense arms keeping these top-k (none: skip)", nargs="*"
    )
    ablation_budget: int | None = described(None, help="B of the Table 3/4 arms (default: the largest)")
    ablation_losses: tuple[AttackLoss, ...] = described(
        ("explanations",), help="the attackers' losses of the Table 3/4 arms"
    )
    avg_drop: tuple[str, ...] = described(
        ("deepdefense",),
        help="arms whose maps are compared with the victim's (Table 2; none: skip)",
        nargs="*",
        metavar="ARM",
    )
    attacker_dataset: str = described(
        AttackConfig.dataset,
        help="the data set the attacker queries with",  # P_A of the random query set: its training split
        choices=sorted(SPECS),
    )
    jbda_seeds: int = described(100, help="|S_0| of the jbda query set, drawn from the victim's training split")
    jbda_step: float = described(AttackConfig.jbda_step, help="step λ of the jbda query set's augmentation")
    jbda_epochs: int = described(
        10, help="epochs of each jbda round's substitute (Papernot et al. train theirs for 10)"
    )
    data_root: str | None = None
    recipe: TrainingRecipe = field(default_factory=TrainingRecipe)  # how every attack model is trained
    query_batch: int = described(AttackConfig.query_batch, help="images per request / answer call")
    seed: int = described(0, help="seed of the queries and the attack models")
    test_n: int | None = described(None, help="first n victim test images (default: all)")
    n_unif: int = described(10_000, help="uniform inputs for R_unif")  # |U|: the talk's value
    n_maps: int = described(1000, help="test images for Average Drop (Table 2)")
    p: float = described(15.0, help="Average Drop keeps the top p% of each map")
    n_figure: int = described(6, help="rows of Figure 3")
    runtime_n: int = described(100, help="test queries timed per arm")
    benign_n: int = described(
        0, help="victim test images an honest user sends each arm: its accuracy and agreement with the victim (0: skip)"
    )
    engine_options: dict[str, Any] = field(default_factory=dict)  # --set, for the engine modes
    device: str = "cpu"  # attack models, the victim's reference outputs
    defense_device: str | None = None  # in-process defenses and served ones (None: ``device``)
    store_root: str = described("runs/transfer-sets", help="transfer sets (shared with 'deepdefense attack')")
    only_cached: bool = described(
        False,
        help="train no attack model and send no attacker query: report the cached ones from <out>/runs (the others "
        "show as not run), with or without the transfer sets; honest-user and Table 2 answers are measured once when "
        "not cached",
    )

    @property
    def largest_budget(self) -> int:
        return max(self.budgets)

    def training(self) -> dict[str, Any]:
        """The attack-model recipe (part of every cache key)."""
        return {**asdict(self.recipe), "seed": self.seed, "attacker_dataset": self.attacker_dataset}


@dataclass(frozen=True)
class Arm:
    """One answered configuration: ``key`` names it in the results (``deepdefense``, ``deepdefense-cs50``,
    ``deepdefense+gate``, ``none+gate@jbda``…); ``role``: what the report makes of it — ``main`` (Table 5, Figure 2,
    the gate's tables), ``cs`` (Table 3) or ``top-k`` (Table 4)."""

    key: str
    defense: str
    options: dict[str, Any]
    budget: int
    losses: tuple[AttackLoss, ...]
    url: str | None = None  # a running server (None: in-process or started by the harness)
    gated: bool = False  # behind the misinformation gate (in-process and started servers)
    query_set: str = "random"
    role: str = "main"

    def fields(self) -> dict[str, Any]:
        """What the record keeps of the arm beside its key: the report reads these, never the key."""
        return {"role": self.role, "gated": self.gated, "query_set": self.query_set}


def arm_key(defense: str, gated: bool = False, query_set: str = "random") -> str:
    return defense + ("+gate" if gated else "") + ("" if query_set == "random" else f"@{query_set}")


def key_role(key: str) -> tuple[str, bool, str]:
    """(role, gated, query set) that a key names: how an arm named by ``--url KEY=URL`` is placed, and how a record
    written before arms kept their fields is read (:func:`role_of`)."""
    name, _, query_set = key.partition("@")
    top_k = name.startswith(("deepdefense-top", "pp-top"))
    return (
        "top-k" if top_k else "cs" if name.startswith("deepdefense-cs") else "main",
        name.endswith("+gate"),
        query_set or "random",
    )


def role_of(key: str, arm: Mapping[str, Any]) -> tuple[str, bool, str]:
    """(role, gated, query set) of a record's arm (or ``not_collected`` entry): its fields, else its key's."""
    return (arm["role"], arm["gated"], arm["query_set"]) if "role" in arm else key_role(key)


def plan_arms(config: EvalConfig) -> list[Arm]:
    """The main arms (one per defense, and per gated defense, for every query set, every loss, the largest
    budget) and, when DeepDefense is evaluated, its Table 3 (CS) and Table 4 (top-k) variants at the
    ablation budget on the random query set; PP's Table 4 variants likewise when PP is evaluated (a
    variant whose settings equal the main arm's shares its transfer set and trainings)."""
    unknown = sorted(set(config.query_sets) - set(QUERY_SETS))
    if unknown:
        raise ValueError(f"unknown query sets {unknown}; known: {', '.join(QUERY_SETS)}")
    engine = {**config.engine_options}
    # the twin attacker only where every query has its twin
    losses_of = {qs: tuple(x for x in config.losses if x != "twin" or qs in TWIN_SETS) for qs in config.query_sets}
    top = config.largest_budget
    arms = [
        Arm(arm_key(d, g, qs), d, engine if d in ENGINE_MODES else {}, top, losses_of[qs], gated=g, query_set=qs)
        for qs in config.query_sets
        for g, defenses in ((False, config.defenses), (True, config.gated))
        for d in defenses
    ]
    budget, losses = config.ablation_budget or config.largest_budget, config.ablation_losses
    if "deepdefense" in config.defenses and "random" in config.query_sets:
        arms += [
            Arm(f"deepdefense-cs{c:g}", "deepdefense", {**engine, "cs": float(c)}, budget, losses, role="cs")
            for c in config.cs
        ]
        arms += [
            Arm(f"deepdefense-top{k}", "deepdefense", {**engine, "top_k": int(k)}, budget, losses, role="top-k")
            for k in config.top_k
        ]
    if "pp" in config.defenses and "random" in config.query_sets:  # Table 4 compares PP at the same k
        arms += [Arm(f"pp-top{k}", "pp", {"top_k": int(k)}, budget, losses, role="top-k") for k in config.top_k]
    return arms


def url_arms(config: EvalConfig, urls: list[str], api_key: str | None = None) -> list[Arm]:
    """Arms answered by running servers: ``KEY=URL`` names the arm, a bare URL is named after the
    defense it serves. An arm named after its defense is a main arm (largest budget, every loss)."""
    arms = []
    for item in urls:
        named = re.match(r"^([A-Za-z0-9_.-]+)=(.+)$", item)
        url = named.group(2) if named else item
        with HttpOracle(url, api_key) as oracle:
            defense = oracle.info().defense
        key = named.group(1) if named else defense
        main = key == defense
        role, gated, _ = key_role(key)  # the server is what it is: its key says how to report it
        budget = config.largest_budget if main else config.ablation_budget or config.largest_budget
        losses = config.losses if main else config.ablation_losses
        arms.append(Arm(key, defense, {}, budget, losses, url=url, role=role, gated=gated))
    if len({a.key for a in arms}) != len(arms):
        raise ValueError("two servers answer for the same arm; name them KEY=URL")
    return arms


def digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Evaluation:
    """One evaluation run: what every arm shares (the attacker's pool, the victim's test set and its reference
    outputs, the cache of finished trainings) and the steps each arm goes through."""

    def __init__(self, config: EvalConfig, out: Path, progress: bool = True, command: str | None = None) -> None:
        self.config, self.out, self.progress, self.command = config, out, progress, command
        self.device = torch.device(config.device)
        self.victim, self.meta = load_checkpoint(config.checkpoint, device=self.device)
        self.victim.requires_grad_(False)
        interpreter = create_interpreter(config.interpreter, self.victim, tuple(self.meta.input_shape))
        self.reference = NoDefense(self.victim, interpreter)
        self.spec = get_spec(config.attacker_dataset)
        if tuple(self.spec.input_shape) != tuple(self.meta.input_shape):
            raise ValueError(
                f"attacker data set {config.attacker_dataset} does not fit the victim's input {self.meta.input_shape}"
            )
        self.pool = load_split(config.attacker_dataset, config.data_root, "train").tensors[0]
        self.victim_train = load_split(self.meta.dataset, config.data_root, "train").tensors[0]
        self.victim_spec = get_spec(self.meta.dataset)
        self.all_test, self.all_test_labels = load_split(self.meta.dataset, config.data_root, "test").tensors
        self.test_images, self.test_labels = self.all_test[: config.test_n], self.all_test_labels[: config.test_n]
        self.unif = agreement.uniform_inputs(config.n_unif, tuple(self.meta.input_shape), config.seed)
        self.victim_test = agreement.probabilities(self.victim, self.test_images)
        self.victim_unif = agreement.probabilities(self.victim, self.unif)
        (out / "runs").mkdir(parents=True, exist_ok=True)

    # -- caching -----------------------------------------------------------------------------------
    def stored(self, key: str) -> dict[str, Any] | None:
        path = self.out / "runs" / f"{key}.json"
        record = json.loads(path.read_text()) if path.is_file() else None
        return record if record is not None and record.get("cache_key") == key else None

    def is_cached(self, key: str) -> bool:
        return self.stored(key) is not None

    def cached(self, key: str, make: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """The record stored under ``key``, or ``make()`` stored there first (atomically)."""
        record = self.stored(key)
        if record is None:
            record = write_json(self.out / "runs" / f"{key}.json", {"cache_key": key, **make()})
        return record

    # -- one arm -----------------------------------------------------------------------------------
    def store(self, info: ModelInfo, strategy: str, dataset: str) -> TransferStore:
        """The store of this oracle's answers to ``strategy`` queries from ``dataset`` (``random`` and
        ``jbda``: the attack's, named and fingerprinted as ``deepdefense attack`` names them; ``test``:
        test images)."""
        c = self.config
        if strategy in ("jbda", "adaptive"):
            fp = {**fingerprint(self.jbda_config(info), info), "strategy": strategy}
        else:
            fp = fingerprint(AttackConfig(strategy="random", dataset=dataset, seed=c.seed), info)
        if strategy not in ("random", "jbda", "adaptive"):
            fp = {**fp, "strategy": strategy, "seed": None}
        name = f"{info.name}-{info.defense}-{strategy}-{dataset}-{fingerprint_digest(fp)}"
        return TransferStore(Path(c.store_root) / name, fp)

    def jbda_config(self, info: ModelInfo) -> AttackConfig:
        """JBDA as the jbda query set runs it: seeds from the victim's training split, substitutes of the
        victim's architecture trained on labels for ``jbda_epochs`` per round."""
        c = self.config
        rounds = 1 + max(0, math.ceil(math.log2(c.largest_budget / c.jbda_seeds)))
        seeds = {"seed": c.seed, "seed_size": c.jbda_seeds, "jbda_step": c.jbda_step, "rounds": rounds}
        recipe = replace(c.recipe, epochs=c.jbda_epochs)
        return AttackConfig(
            strategy="jbda", loss="labels", dataset=self.meta.dataset, arch=info.arch, recipe=recipe, **seeds
        )

    def collect_set(self, oracle: Oracle, info: ModelInfo, budget: int, query_set: str) -> tuple[TransferStore, int]:
        """Send the query set's queries that are not stored yet; the store and the number sent."""
        c = self.config
        if query_set not in QUERY_SETS:
            raise ValueError(f"unknown query set {query_set!r}; known: {', '.join(QUERY_SETS)}")
        if query_set in ("random", "twins"):
            store = self.store(info, query_set, c.attacker_dataset)
        else:  # victim-train: random queries from the victim's own data set
            store = self.store(info, "random" if query_set == "victim-train" else query_set, self.meta.dataset)
        if c.only_cached:  # report what is stored: send nothing
            return store, 0
        batching = {"batch_size": c.query_batch, "progress": self.progress}
        if query_set == "random":
            queries = self.pool[sample_queries(len(self.pool), budget, c.seed)]
        elif query_set == "twins":  # half the budget's images, each followed by its twin
            queries = with_twins(self.pool[sample_queries(len(self.pool), (budget + 1) // 2, c.seed)])
        elif query_set == "victim-train":
            queries = self.victim_train[sample_queries(len(self.victim_train), budget, c.seed)]
        else:
            jbda = self.jbda_config(info)
            spec = self.victim_spec
            seeds = self.victim_train[sample_queries(len(self.victim_train), jbda.seed_size, c.seed)]

            def substitute(data: TransferSet) -> torch.nn.Module:
                seed = c.seed + len(data)
                model = build_attack_model(info.arch, len(info.classes), info.input_shape, spec.mean, spec.std, seed)
                self.train(model, data, loss="labels", interpreter=info.interpreter, recipe=jbda.recipe, seed=seed)
                return model

            collector = collect_adaptive if query_set == "adaptive" else collect_jbda
            how = {"rounds": jbda.rounds, "step": jbda.jbda_step, "train": substitute, **batching}
            return store, collector(oracle, store, seeds, budget=budget, **how)
        return store, collect(oracle, store, queries, **batching)

    def transfer_set(
        self, oracle: Oracle, info: ModelInfo, budget: int, query_set: str = "random"
    ) -> tuple[TransferSet | None, dict[str, Any]]:
        """Collect (or finish collecting) the arm's transfer set of ``budget`` queries; with ``only_cached``
        nothing is sent and the set is None when it is not fully stored."""
        started = time.perf_counter()
        store, sent = self.collect_set(oracle, info, budget, query_set)
        before = len(store) - sent
        seconds = time.perf_counter() - started
        if len(store) < budget and not self.config.only_cached:
            raise ValueError(f"transfer set {store.root} holds {len(store)} queries, fewer than B = {budget}")
        # --only-cached on a machine without the (uncommitted) transfer set: the cached records stand alone
        data = store.load().prefix(budget) if len(store) >= budget else None
        where = {"query_set": query_set, "store": str(store.root), "fingerprint": fingerprint_digest(store.fingerprint)}
        sending = {"stored_before": before, "queries_sent": sent, "collect_s": round(seconds, 3)}
        return data, where | sending | {"ms_per_query_collect": round(1000 * seconds / sent, 3) if sent else None}

    def train(self, model: torch.nn.Module, data: TransferSet, **how: Any) -> list[float]:
        """Train an attack model (or a JBDA substitute) on this run's device: ``train_attack_model``."""
        return train_attack_model(model, data, device=self.device, progress=self.progress, **how)

    def attack_key(self, info: ModelInfo, store_fp: str, loss: AttackLoss, budget: int) -> str:
        """The cache key of one attack model: everything that determines it."""
        c = self.config  # digest sorts the keys
        trained = {"store": store_fp, "budget": budget, "loss": loss, "training": c.training(), "arch": info.arch}
        scored = {"test_n": c.test_n, "n_unif": c.n_unif, "victim": c.checkpoint}
        return digest(trained | scored | {"lam": c.recipe.lam if loss == "explanations" else None})

    def budgets(self, arm: Arm) -> list[int]:
        """The budgets the arm's attack models are trained at: the configured ones up to the arm's."""
        return sorted(b for b in self.config.budgets if b <= arm.budget) or [arm.budget]

    def any_cached(self, arm: Arm, info: ModelInfo, fp: str) -> bool:
        """Whether one of the arm's attack models is cached (``only_cached`` reports such an arm)."""
        return any(self.is_cached(self.attack_key(info, fp, loss, b)) for b in self.budgets(arm) for loss in arm.losses)

    def attack(
        self, data: TransferSet | None, info: ModelInfo, store_fp: str, loss: AttackLoss, budget: int, query_set: str
    ) -> dict[str, Any] | None:
        """Train and test one attack model (cached); None when it is not cached and ``only_cached``."""
        c = self.config
        key = self.attack_key(info, store_fp, loss, budget)

        def make() -> dict[str, Any]:
            assert data is not None, "only_cached never trains"
            spec = self.spec if query_set in ("random", "twins") else self.victim_spec  # the data its queries come from
            model = build_attack_model(info.arch, len(info.classes), info.input_shape, spec.mean, spec.std, c.seed)
            mask = kept_answers(loss, data.prefix(budget).probabilities)
            kept = budget if mask is None else int(mask.sum())
            if kept == 0:  # a filtering attacker that trusts none of the answers learns nothing
                return {"loss": loss, "budget": budget, "kept": 0, "accuracy": None, **c.training()}
            started = time.perf_counter()
            history = self.train(
                model, data.prefix(budget), loss=loss, interpreter=info.interpreter, recipe=c.recipe, seed=c.seed
            )
            trained = time.perf_counter()
            accuracy = evaluate(model, torch.utils.data.TensorDataset(self.test_images, self.test_labels), self.device)
            references = {"victim_test": self.victim_test, "victim_unif": self.victim_unif}
            fid = agreement.fidelity(self.victim, model, self.test_images, c.n_unif, c.seed, **references)
            measured = {"loss": loss, "budget": budget, "kept": kept, "accuracy": round(accuracy, 2), **fid.as_dict()}
            training = {"epoch_losses": history, "train_s": round(trained - started, 3), "device": str(self.device)}
            training |= {"lambda": c.recipe.lam if loss == "explanations" else None, **c.training()}
            return measured | training | {"made_by": self.command, "machine": str(machine(self.device))}

        return None if c.only_cached and not self.is_cached(key) else self.cached(key, make)

    def runtime(self, oracle: Oracle, store_fp: str) -> dict[str, Any]:
        """ms/query over the first ``runtime_n`` test images in requests of ``query_batch`` after one
        untimed warm-up query (cached); in-process also the engine's mean L_orth, steps and fallbacks."""
        c = self.config
        where = str(machine(c.defense_device or c.device))
        key = digest({"runtime": store_fp, "n": c.runtime_n, "batch": c.query_batch, "machine": where})

        def make() -> dict[str, Any]:
            images = self.all_test[: c.runtime_n]
            stats: list[dict[str, float]] = []
            fallbacks = 0
            # warm-up (first-call allocations), not timed: the next test image, so that an arm sharing an
            # earlier arm's optimisations (measure/shared_modes.py) finds it kept like the timed ones
            warm = self.all_test[c.runtime_n : c.runtime_n + 1]
            oracle.query(warm if len(warm) else images[:1])
            started = time.perf_counter()
            for x in tqdm(images.split(c.query_batch), desc="runtime", unit="request", disable=not self.progress):
                if isinstance(oracle, LocalOracle):
                    answers = oracle.defense.answer(x.to(oracle.device))
                    stats += [a.stats for a in answers]
                    fallbacks += sum(int(a.fallback) for a in answers)
                else:
                    oracle.query(x)
            seconds = time.perf_counter() - started
            if stats and all(s.get("shared") for s in stats):  # answered by an earlier arm's optimisation
                seconds = sum(s["optimisation_seconds"] for s in stats)
            ms = round(1000 * seconds / max(len(images), 1), 3)
            record: dict[str, Any] = {"n": len(images), "query_batch": c.query_batch, "ms_per_query": ms}
            record |= {"in_process": isinstance(oracle, LocalOracle), "machine": where, "made_by": self.command}
            l_orth = [s["l_orth"] for s in stats if "l_orth" in s]
            if isinstance(oracle, LocalOracle):
                record["fallbacks"] = fallbacks
                record["mean_l_orth"] = round(sum(l_orth) / len(l_orth), 4) if l_orth else None
                steps = [s["steps"] for s in stats if "steps" in s]
                record["mean_steps"] = round(sum(steps) / len(steps), 2) if steps else None
            return record

        return self.cached(key, make)

    def maps(self, oracle: Oracle, info: ModelInfo) -> dict[str, Any]:
        """Table 2 for one arm: the answered maps of the first ``n_maps`` test images (stored and
        resumable) against the victim's own, scored by the victim; Figure 3's rows kept too (cached)."""
        c = self.config
        store = self.store(info, "test", info.dataset)
        maps = {"maps": fingerprint_digest(store.fingerprint), "n": c.n_maps, "p": c.p, "figure": c.n_figure}
        key = digest({**maps, "victim": c.checkpoint})
        return self.cached(key, lambda: self._maps(oracle, store))

    def _maps(self, oracle: Oracle, store: TransferStore) -> dict[str, Any]:
        c = self.config
        images = self.all_test[: c.n_maps]
        collect(oracle, store, images, batch_size=c.query_batch, progress=self.progress)
        answered = store.load().prefix(len(images))  # n_maps, or the whole test split where it is shorter
        if answered.attributions is None:
            raise ValueError(f"{store.root} holds no attribution maps")
        victim = self.reference.answer(images.to(self.device))
        victim_maps = torch.stack([a.attribution for a in victim]).cpu()
        classes = torch.tensor([a.label for a in victim])
        victim_drops = average_drop.image_drops(self.victim, images, victim_maps, classes, c.p)
        answered_drops = average_drop.image_drops(self.victim, images, answered.attributions, classes, c.p)
        figure = slice(0, min(c.n_figure, len(images)))  # Figure 3's rows
        shown = {
            "images": images,
            "victim_maps": victim_maps,
            "defended_maps": answered.attributions,
            "labels": classes,
        }
        return {
            "n": len(images),
            "p": c.p,
            "victim": average_drop.summary(victim_drops),
            "defended": average_drop.summary(answered_drops),
            "ttest": average_drop.paired_ttest(victim_drops, answered_drops).as_dict(),
            "labels_kept": agreement.percent(answered.labels == classes),
            "figure": {k: v[figure].tolist() for k, v in shown.items()},
        }

    def benign(self, oracle: Oracle, info: ModelInfo) -> dict[str, Any]:
        """What an honest user gets from the arm: the first ``benign_n`` victim test images, answered (stored
        with Table 2's), scored against the true labels and the victim's own (cached)."""
        c = self.config
        store = self.store(info, "test", info.dataset)
        key = digest({"benign": fingerprint_digest(store.fingerprint), "n": c.benign_n, "victim": c.checkpoint})
        return self.cached(key, lambda: self._benign(oracle, store))

    def _benign(self, oracle: Oracle, store: TransferStore) -> dict[str, Any]:
        c = self.config
        images = self.all_test[: c.benign_n]  # benign_n, or the whole test split where it is shorter
        collect(oracle, store, images, batch_size=c.query_batch, progress=self.progress)
        answered = store.load().prefix(len(images))
        n = len(answered)
        victim = agreement.probabilities(self.victim, self.all_test[:n]).argmax(1)
        truth = self.all_test_labels[:n]
        return {
            "n": n,
            "accuracy": agreement.percent(answered.labels == truth),
            "victim_accuracy": agreement.percent(victim == truth),
            "agreement": agreement.percent(answered.labels == victim),
        }

    def monitor(self, data: TransferSet, arm: Arm) -> dict[str, Any]:
        """The extraction monitor and the arm's queries: with ``monitored``, what the monitor that watched them
        did (``monitor/<arm>.json``, written when they were sent); otherwise their domain flags replayed in order
        through the policy as one key. Honest keys of ``BENIGN_KEY_QUERIES`` victim test digits, clean and
        perturbed, beside it."""
        policy, flags = MonitorPolicy(), self.domain_flags(data.images)
        summary = self.out / "monitor" / f"{arm.key}.json"  # written when the arm's queries were sent
        watched = json.loads(summary.read_text()) if self.config.monitored and summary.exists() else None
        return {k: getattr(policy, k) for k in ("window", "min_queries", "threshold")} | {
            "queries": len(flags),
            "flagged_pct": round(100.0 * sum(flags) / max(len(flags), 1), 2),
            "escalated_at": watched["escalated_after"] if watched else policy.queries_until_escalated(flags),
            "watched": watched,
            "benign": self.benign_monitor,
            "threshold_choice": self.monitor_threshold_choice,
            "benign_key_queries": BENIGN_KEY_QUERIES,
        }

    def monitor_db(self, arm: Arm) -> Path | None:
        """The monitor's state while an in-process gated arm's queries are sent, when ``monitored``."""
        if not (arm.gated and self.config.monitored and arm.url is None):
            return None
        return self.out / "monitor" / f"{arm.key}.sqlite"

    def save_monitor_summary(self, arm: Arm) -> None:
        """What the monitor did with the arm's key, kept beside its state (the state itself is not committed)."""
        db = self.monitor_db(arm)
        if db is None or not db.exists():
            return
        with closing(SqliteMonitorStore(db)) as store:
            summary = _window_summary(store.read(MONITORED_KEY))
        db.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")

    @cached_property
    def domain(self) -> DomainScore:
        """The gate's domain score, for the monitor's replay (loaded when first needed)."""
        return load_domain_score(self.config.checkpoint, self.victim, device=self.device)[0]

    def domain_flags(self, images: torch.Tensor) -> list[bool]:
        return self.domain.flags(images.to(self.device)).cpu().tolist()

    @cached_property
    def monitor_threshold_choice(self) -> dict[str, Any]:
        """How the monitor's default threshold was chosen, on digits no result here is measured on: per
        candidate threshold, the honest keys escalated among ``BENIGN_KEY_QUERIES``-query keys of the last
        10,000 victim training images, clean and under every perturbation (the default is the lowest with none)."""
        x = self.victim_train[-10_000:]
        keys = []
        for perturb in (None, *PERTURBATIONS.values()):
            g = torch.Generator().manual_seed(self.config.seed)
            flags = self.domain_flags(x if perturb is None else perturb(x, g))
            keys += [flags[i : i + BENIGN_KEY_QUERIES] for i in range(0, len(flags), BENIGN_KEY_QUERIES)]
        escalated = {
            f"{t:g}": sum(MonitorPolicy(threshold=t).queries_until_escalated(k) is not None for k in keys)
            for t in THRESHOLD_CANDIDATES
        }
        return {"keys": len(keys), "escalated": escalated}

    @cached_property
    def benign_monitor(self) -> dict[str, Any]:
        """Honest keys: the victim's test digits in order, cut into keys of ``BENIGN_KEY_QUERIES`` queries, clean
        and under each perturbation of ``docs/results/domain-score.md`` (seeded), all through one monitor with
        its default policy as the server runs it (screened before, domain flags after); the same for every arm
        (cached in ``monitor/benign.json``)."""
        cached = self.out / "monitor" / "benign.json"
        if cached.exists():
            return json.loads(cached.read_text())
        out = {}
        with tempfile.TemporaryDirectory() as tmp, closing(ExtractionMonitor(Path(tmp) / "honest.sqlite")) as monitor:
            variants = {"clean": None, **PERTURBATIONS}
            for v, (name, perturb) in enumerate(tqdm(variants.items(), desc="honest keys", disable=not self.progress)):
                g = torch.Generator().manual_seed(self.config.seed)
                x = self.all_test if perturb is None else perturb(self.all_test, g)
                flags = self.domain_flags(x)
                states = []
                for k, start in enumerate(range(0, len(x), BENIGN_KEY_QUERIES)):
                    key = f"{v:06x}{k:06x}"
                    for b in range(start, min(start + BENIGN_KEY_QUERIES, len(x)), self.config.query_batch):
                        end = min(b + self.config.query_batch, start + BENIGN_KEY_QUERIES, len(x))
                        screening = monitor.screen(key, x[b:end])
                        if not screening.escalated:
                            monitor.observe(key, screening.distinct(flags[b:end]))
                    states.append(monitor.store.read(key))
                out[name] = {
                    "keys": len(states),
                    "flagged_pct": round(100.0 * sum(flags) / len(flags), 2),
                    "escalated": sum(s.escalated for s in states),
                    "reasons": sorted({s.reason for s in states if s.reason}),
                    "duplicates_pct": round(100.0 * sum(s.duplicates for s in states) / len(flags), 2),
                    "min_spread": round(min(s.spread for s in states if s.spread is not None), 4),
                }
        cached.parent.mkdir(parents=True, exist_ok=True)
        return write_json(cached, out)

    def run_arm(self, arm: Arm, oracle: Oracle) -> dict[str, Any]:
        info = oracle.info()
        data, collected = self.transfer_set(oracle, info, arm.budget, arm.query_set)
        fp = collected["fingerprint"]
        budgets = self.budgets(arm)
        jobs = [(loss, b) for b in reversed(budgets) for loss in arm.losses]  # the largest budget (Table 5) first
        runs = [
            self.attack(data, info, fp, loss, b, arm.query_set)
            for loss, b in tqdm(jobs, desc=f"attack models ({arm.key})", unit="model", disable=not self.progress)
        ]
        result = {"key": arm.key, "defense": info.defense, **arm.fields(), "options": arm.options}
        result |= {"settings": info.defense_settings, "url": arm.url, "budget": arm.budget, **collected}
        result |= {"runtime": self.runtime(oracle, fp), "runs": [r for r in runs if r is not None]}
        if arm.key in self.config.avg_drop:
            result["average_drop"] = self.maps(oracle, info)
        if self.config.benign_n and arm.query_set == "random":
            result["benign"] = self.benign(oracle, info)
        if arm.gated and arm.url is None and data is not None:  # the monitor and the transfer set's queries
            result["monitor"] = self.monitor(data, arm)
        return result


@contextmanager
def open_oracle(
    arm: Arm,
    config: EvalConfig,
    serve: bool,
    api_key: str | None = None,
    shared: dict[str, SharedModes] | None = None,
    monitor_db: Path | None = None,
) -> Iterator[Oracle]:
    """The arm's oracle: in-process, a server started for it on loopback, or the running server at ``arm.url``.

    ``monitor_db``: an in-process gated arm answers as the default server with API keys — its queries are one
    key's, which the extraction monitor (its state in this SQLite file) screens and may escalate.

    In-process engine modes with the same options share one engine through ``shared``
    (:mod:`measure.shared_modes`): one optimisation per query answers DeepDefense, DD-S and DD-I.
    """
    device = config.defense_device or config.device
    load = {"device": device, "data_root": config.data_root}
    if arm.url is not None or serve:
        from deepdefense.measure.launcher import served

        gate_name = "misinform" if arm.gated else "none"
        context: AbstractContextManager[tuple[str, str | None]] = (
            nullcontext((arm.url, api_key))
            if arm.url is not None
            else served(config.checkpoint, arm.defense, config.interpreter, engine=arm.options, gate=gate_name, **load)
        )
        with context as (url, key), HttpOracle(url, key) as oracle:
            yield oracle
        return
    from deepdefense.defense.loader import load_defense, load_gate

    if shared is not None and arm.defense in ENGINE_MODES and not arm.gated:  # a gated arm loads its own engine
        key = engine_key(config.checkpoint, config.interpreter, device, arm.options)
        if key not in shared:
            engine, _ = load_defense(config.checkpoint, "deepdefense", config.interpreter, **load, **arm.options)
            main = arm.role == "main" and arm.query_set == "random"  # Table 5's arms share; CS and top-k have options
            shared[key] = SharedModes(
                engine, tuple(m for m in ENGINE_MODES if m in config.defenses) if main else (arm.defense,)
            )
        defense: Defense = ModeOf(shared[key], arm.defense)
        meta = load_checkpoint(config.checkpoint)[1]
    else:
        defense, meta = load_defense(config.checkpoint, arm.defense, config.interpreter, **load, **arm.options)
    if not arm.gated:
        yield LocalOracle(defense, local_info(config.checkpoint, meta, defense))
        return
    gate = load_gate(defense, config.checkpoint, device=device)
    assert isinstance(gate, MisinformationGate)
    info = local_info(config.checkpoint, meta, gate)
    if config.monitored:
        info = replace(info, defense_settings={**info.defense_settings, "monitor": "on"})
    if not config.monitored or monitor_db is None:  # monitored without a db: the thief's queries are collected
        yield LocalOracle(gate, info)
        return
    with closing(ExtractionMonitor(monitor_db)) as monitor:
        yield MonitoredOracle(gate, info, monitor, MONITORED_KEY)


def run_evaluation(
    config: EvalConfig,
    out: str | Path,
    *,
    urls: list[str] | None = None,
    serve: bool = False,
    api_key: str | None = None,
    progress: bool = True,
    command: str | None = None,
    on_arm: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run every arm (collect, train, test, time, maps) and return the whole record; ``on_arm`` is
    called after each arm (the CLI writes the result files there, so an interrupted run keeps them)."""
    out = Path(out)
    run = Evaluation(config, out, progress, command)
    arms = url_arms(config, urls, api_key) if urls else plan_arms(config)
    test = torch.utils.data.TensorDataset(run.test_images, run.test_labels)
    record: dict[str, Any] = {
        "config": {**asdict(config), "arms": [a.key for a in arms]},
        "environment": environment(config),
        "victim": config.checkpoint,
        "arch": run.meta.arch,
        "dataset": run.meta.dataset,
        "victim_accuracy": round(evaluate(run.victim, test, run.device), 2),
        "victim_unif_classes": torch.bincount(run.victim_unif.argmax(1), minlength=len(run.meta.classes)).tolist(),
        "arms": {},
    }
    shared: dict[str, SharedModes] = {}
    collected = {}
    for arm in arms:  # every transfer set first: the engine modes sharing one optimisation collect together
        with open_oracle(arm, config, serve, api_key, shared, run.monitor_db(arm)) as oracle:
            info = oracle.info()
            data, collected_ = run.transfer_set(oracle, info, arm.budget, arm.query_set)
            run.save_monitor_summary(arm)
            if data is None and not run.any_cached(arm, info, collected_["fingerprint"]):
                # --only-cached: an arm whose queries were never sent here and that has no cached model is not run
                missing = f"transfer set {collected_['store']} is not stored and no attack model of it is cached"
                entry = {"why": missing, "defense": info.defense, **arm.fields(), "settings": info.defense_settings}
                record["not_collected"] = {**record.get("not_collected", {}), arm.key: entry}
            else:
                collected[arm.key] = collected_
    for arm in [a for a in arms if a.key in collected]:
        with open_oracle(arm, config, serve, api_key, shared) as oracle:
            record["arms"][arm.key] = {**run.run_arm(arm, oracle), **collected[arm.key]}
        if on_arm is not None:
            on_arm(record)
    return record


def _window_summary(s: KeyWindow) -> dict[str, Any]:
    """A monitored key's state as the results report it (no coarse views, no distances)."""
    fields = ("queries", "flagged", "duplicates", "tainted", "spread", "escalated_after", "reason")
    return {f: getattr(s, f) for f in fields} | {"spread": None if s.spread is None else round(s.spread, 4)}


def write_json(path: Path, payload: Any) -> Any:
    """``payload`` written to ``path`` as JSON, atomically (concurrent runs may share a folder); ``payload``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    tmp.replace(path)
    return payload


def environment(config: EvalConfig) -> dict[str, Any]:
    m = machine(config.device)
    env = {"torch": m.torch, "python": m.python, "host": m.host, "machine": m.arch, "threads": m.threads}
    devices = {"device": config.device, "defense_device": config.defense_device or config.device}
    return env | devices | {"cuda": m.accelerator, **provenance()}
