"""Can a thief tell a misinformed answer from an honest one? The two detectors a thief who has read our
code would build, measured against the gate the server runs (issue 28):

* **Twin distance** — ask twice, the second time with one pixel moved by 1/255 (``clients/adaptive.py``),
  and threshold the largest change of the probabilities (and of the map). DeepDefense misdirects every query
  afresh, so honest answers move; answers drawn from one fixed network would not.
* **Answer shape** — a logistic regression on what one answer shows: its sorted probabilities, their
  entropy, and statistics of its map (mean, spread, peak, the share of the top tenth of its mass, its entropy).

Paired design: every query of a pool is answered by both paths of the gate — the wrapped defense (honest)
and the misinformation path (misinformed: the gate made to misinform every query) — so that what a detector
learns is the path, not the pool (a query from another domain looks different whichever path answers it).
Each detector is fitted on half of the queries (threshold and direction, or the regression) and scored on the
other half: balanced accuracy, 0.5 is chance. ``before``: the same detectors against the first gate, whose
misinformed answers were the misinformation model's own fixed answers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from deepdefense.clients.adaptive import twin_of
from deepdefense.defense.api import Answer, Defense, NoDefense
from deepdefense.defense.gate import MISINFORM, MisinformationGate
from deepdefense.defense.interpreters import create_interpreter
from deepdefense.defense.loader import load_defense, load_gate
from deepdefense.defense.misinformation import load_misinformation
from deepdefense.models.data import load_split

#: Answers computed per call (the engine batches them).
CHUNK = 64


@dataclass(frozen=True)
class Paired:
    """One pool answered by one path, and again for each query's twin."""

    probabilities: Tensor  # (N, K)
    maps: Tensor  # (N, H, W)
    twin_probabilities: Tensor
    twin_maps: Tensor


Answering = Callable[[Tensor], list[Answer]]


def answer_pool(answer: Answering, x: Tensor) -> Paired:
    """``answer``'s answers to ``x`` and to its twins."""
    run = lambda q: [a for chunk in q.split(CHUNK) for a in answer(chunk)]
    first, second = run(x), run(twin_of(x))
    stack = lambda answers, f: torch.stack([getattr(a, f).detach().cpu() for a in answers])
    return Paired(*(stack(answers, f) for answers in (first, second) for f in ("probabilities", "attribution")))


def twin_distances(p: Paired) -> Tensor:
    """(N, 2): the largest change of the probabilities, and of the map, between each query and its twin."""
    dp = (p.probabilities - p.twin_probabilities).abs().amax(1)
    dm = (p.maps - p.twin_maps).flatten(1).abs().amax(1)
    return torch.stack([dp, dm], 1)


def answer_features(p: Paired) -> Tensor:
    """(N, K + 6): sorted probabilities, their entropy, and the map's mean, std, peak, top-decile mass share and
    entropy (the map's absolute values normalised to a distribution)."""
    probs = p.probabilities.sort(1, descending=True).values
    entropy = -(probs.clamp_min(1e-12).log() * probs).sum(1, keepdim=True)
    m = p.maps.flatten(1).abs()
    mass = m / m.sum(1, keepdim=True).clamp_min(1e-12)
    top = mass.sort(1, descending=True).values[:, : max(1, m.shape[1] // 10)].sum(1, keepdim=True)
    map_entropy = -(mass.clamp_min(1e-12).log() * mass).sum(1, keepdim=True)
    stats = torch.cat([m.mean(1, keepdim=True), m.std(1, keepdim=True), m.amax(1, keepdim=True), top, map_entropy], 1)
    return torch.cat([probs, entropy, stats], 1)


def balanced_accuracy(predicted: Tensor, truth: Tensor) -> float:
    """Mean of the true-positive and true-negative rates (0.5: chance, whatever the classes' sizes)."""
    tpr = (predicted & truth).sum() / truth.sum().clamp_min(1)
    tnr = (~predicted & ~truth).sum() / (~truth).sum().clamp_min(1)
    return float((tpr + tnr) / 2)


def fit_threshold(score: Tensor, truth: Tensor) -> tuple[float, bool]:
    """The threshold and direction (True: above means positive) of ``score`` with the best balanced accuracy."""
    best = (0.0, 0.0, True)
    for t in score.unique():
        for above in (True, False):
            ba = balanced_accuracy(score > t if above else score <= t, truth)
            if ba > best[0]:
                best = (ba, float(t), above)
    return best[1], best[2]


#: L2 penalty on the regression's weights: without it, classes a few features separate drive L-BFGS to weights
#: of 1e26 and a fit that is chance on the held-out half.
RIDGE = 1e-3


def fit_logistic(features: Tensor, truth: Tensor, steps: int = 200) -> torch.nn.Module:
    """A standardised logistic regression (L-BFGS with a line search and a small ridge, weighted so both classes
    count alike)."""
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    model = torch.nn.Sequential(_Standardise(mean, std), torch.nn.Linear(features.shape[1], 1))
    weight = torch.where(truth, 0.5 / truth.float().mean(), 0.5 / (~truth).float().mean())
    optimiser = torch.optim.LBFGS(model.parameters(), max_iter=steps, line_search_fn="strong_wolfe")
    target = truth.float()

    def closure() -> Tensor:
        optimiser.zero_grad()
        logits = model(features).squeeze(1)
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none") * weight).mean()
        loss = loss + RIDGE * model[1].weight.square().sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    return model.eval()


class _Standardise(torch.nn.Module):
    def __init__(self, mean: Tensor, std: Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def detect(honest: Paired, misinformed: Paired, seed: int) -> dict[str, float]:
    """Both detectors' balanced accuracy on held-out halves of the queries (each query in one half only, its
    honest and its misinformed answer together)."""
    n = len(honest.probabilities)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    halves = order[: n // 2], order[n // 2 :]  # fit, test
    twins = torch.cat([twin_distances(honest), twin_distances(misinformed)])  # honest rows first
    shape = torch.cat([answer_features(honest), answer_features(misinformed)])
    truth = torch.cat([torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)])
    fit, test = (torch.cat([rows, rows + n]) for rows in halves)  # a query's two answers stay in one half
    out: dict[str, float] = {}
    for i, name in enumerate(("twin_probabilities", "twin_map")):
        t, above = fit_threshold(twins[fit, i], truth[fit])
        score = twins[test, i]
        out[name] = round(balanced_accuracy(score > t if above else score <= t, truth[test]), 4)
    model = fit_logistic(shape[fit], truth[fit])  # L-BFGS turns gradients on for its closure
    with torch.no_grad():
        out["answer_shape"] = round(balanced_accuracy(model(shape[test]).squeeze(1) > 0, truth[test]), 4)
    return out


def summary(p: Paired) -> dict[str, float]:
    """What the answers of one path look like: top probability and entropy quartiles, twin movement medians."""
    top = p.probabilities.amax(1)
    entropy = -(p.probabilities.clamp_min(1e-12).log() * p.probabilities).sum(1)
    d = twin_distances(p)
    return {
        "top_p25": round(float(top.quantile(0.25)), 4),
        "top_median": round(float(top.median()), 4),
        "entropy_median": round(float(entropy.median()), 4),
        "twin_dp_median": round(float(d[:, 0].median()), 6),
        "twin_dmap_median": round(float(d[:, 1].median()), 6),
    }


def untempered(model: torch.nn.Module, temperature: float) -> torch.nn.Module:
    """``model`` with its last Linear layer multiplied by ``temperature``: the misinformation model as the first
    gate served it, before its logits were divided by the temperature recorded in its metadata."""
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.mul_(temperature)
        if last.bias is not None:
            last.bias.mul_(temperature)
    return model


def map_reading(own: Paired, foreign: Paired, seed: int, steps: int = 300) -> dict[str, float]:
    """What a misinformed answer's map (the defense's own, made for the victim's class) gives away. A linear
    classifier from map to label, fitted on half of the honest answers to the victim's own domain (what a
    thief's honest answers teach him), read on the other half, and on the honest maps of ``foreign`` queries
    against the victim's labels for them (what he would learn from a flagged query's map)."""
    n = len(own.maps)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    fit, test = order[: n // 2], order[n // 2 :]
    labels, foreign_labels = own.probabilities.argmax(1), foreign.probabilities.argmax(1)
    torch.manual_seed(seed)
    reader = torch.nn.Linear(own.maps[0].numel(), own.probabilities.shape[1])
    optimiser = torch.optim.Adam(reader.parameters(), lr=1e-2, weight_decay=1e-4)
    x = own.maps[fit].flatten(1)
    for _ in range(steps):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(reader(x), labels[fit]).backward()
        optimiser.step()
    with torch.no_grad():
        right = lambda maps, y: round(float((reader(maps.flatten(1)).argmax(1) == y).float().mean()), 4)
        return {
            "own_heldout": right(own.maps[test], labels[test]),
            "foreign": right(foreign.maps, foreign_labels),
            "foreign_commonest": round(float(foreign_labels.bincount().max() / len(foreign_labels)), 4),
        }


def study(gate: MisinformationGate, before: Defense, pools: dict[str, Tensor], seed: int = 0) -> dict[str, Any]:
    """For each pool: both detectors against ``gate``'s misinformation path and against ``before``, and the
    shape of each path's answers; and what the maps tell of the victim's class (:func:`map_reading`: the first
    pool is the victim's own domain, the others foreign)."""
    honest = lambda q: gate.inner.answer(q, explain=True)
    misinformed = lambda q: gate.answer(q, explain=True, override=torch.full((len(q),), MISINFORM, dtype=torch.int8))
    then = lambda q: before.answer(q, explain=True)
    out: dict[str, Any] = {"pools": {}, "map_reading": {}}
    own: Paired | None = None
    for name, x in pools.items():
        h, now, first = answer_pool(honest, x), answer_pool(misinformed, x), answer_pool(then, x)
        out["pools"][name] = {
            "n": len(x),
            "after": detect(h, now, seed),
            "before": detect(h, first, seed),
            "answers": {"honest": summary(h), "misinformed": summary(now), "misinformed_before": summary(first)},
        }
        if own is None:
            own, own_name = h, name
        else:
            out["map_reading"][name] = {"own": own_name, **map_reading(own, h, seed)}
    return out


def run_detectors(
    checkpoint: str,
    defense: str,
    interpreter: str,
    foreign: str,
    n: int,
    seed: int,
    device: torch.device,
    data_root: str | None = None,
) -> dict[str, Any]:
    """The study of ``deepdefense detectors``: the gate the server runs for ``checkpoint`` (``defense`` behind it),
    and its first round's fixed answers (the misinformation model untempered), on the first ``n`` test images of
    the victim's data set and of ``foreign``."""
    inner, meta = load_defense(checkpoint, defense, interpreter, device=device, data_root=data_root)
    gate = load_gate(inner, checkpoint, device=device)
    assert isinstance(gate, MisinformationGate)
    first, mmeta = load_misinformation(checkpoint, device=device)  # the first gate's fixed answers
    first = untempered(first.eval().requires_grad_(False), float(mmeta.extra.get("logit_temperature", 1.0)))
    before = NoDefense(first, create_interpreter(interpreter, first, tuple(mmeta.input_shape)))
    pools = {dataset: load_split(dataset, data_root, "test").tensors[0][:n] for dataset in (meta.dataset, foreign)}
    with torch.inference_mode(False):
        return study(gate, before, pools, seed=seed)
