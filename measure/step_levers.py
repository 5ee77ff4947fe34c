"""Three of issue 32's levers on the engine's cost, measured before building any (docs/performance.md, "Third
round"):

* **an amortised start**: a small model, fitted offline on training images, that predicts each query's move of the
  selected weights, so that the solver would only check and finish. What the full cold solver moves each query's
  dense selected weights by (from its own keyed-noise start: the noise is known, only the move is to predict), on
  training images of the victim, and how much of it predictors fitted on other training images explain on held-out
  ones (R², 1 is all, 0 is no better than the mean move): the per-class mean (what today's warm start keeps) and
  ridge regressions on the query's pixels and on the victim's hidden features, each with its class. The low-rank
  layers' moves (``defense/low_rank.py``) are left out: they are kept as factors, not as one vector per query.
* **torch.compile of the step**: the solver's gradient of L_DD (eq. 8) at the start of a batch, eager and compiled
  (inductor, static shapes), timed alternately on the same batch with one torch thread (as each model thread of the
  server runs), the largest difference between the two gradients, and what Dynamo could trace of it (frames
  compiled, graphs captured, why the rest fell back to eager).
* **cost-aware layer choice**: eq. (9)'s cumulative sensitivity threshold ``cs`` picks the layers each query's clone
  changes; a lower one drops the cheapest-to-leave layers (on lenet-mnist, 85% drops conv1: its per-query copies and
  the backward pass into it). The CPU time of one answer for each threshold, from the victim with the same number of
  steps (a warm start is learnt per layer set), timed alternately. Speed only: with another layer set eq. (5) compares
  other gradients, so its strength is the attacker's to judge, not L_orth's (Table 3 of docs/results/mnist.md).

    python -m deepdefense.measure.step_levers --data-root ../shared/data --out docs/results/perf3/step-levers.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch._dynamo
from torch import Tensor, nn
from torch._dynamo.utils import counters
from torch.func import grad
from tqdm import tqdm

from deepdefense.common.provenance import provenance
from deepdefense.defense.engine import DeepDefense
from deepdefense.defense.loader import load_defense
from deepdefense.measure.markdown import module_command
from deepdefense.models.data import load_split

#: Ridge penalties tried for each feature set; the best held-out R² of each is reported with its penalty.
PENALTIES = (1.0, 10.0, 100.0, 1000.0, 10000.0)


def r_squared(predicted: Tensor, target: Tensor) -> float:
    """Share of the target's variance (about its own mean, over every coordinate) that ``predicted`` explains."""
    return float(1 - ((target - predicted) ** 2).sum() / ((target - target.mean(0)) ** 2).sum())


def ridge(features: Tensor, target: Tensor, penalty: float) -> Tensor:
    """Weights W minimising ‖features W − target‖² + penalty ‖W‖² (float64 normal equations)."""
    gram = features.T @ features + penalty * torch.eye(features.shape[1], dtype=features.dtype)
    return torch.linalg.solve(gram, features.T @ target)


def hidden_features(model: nn.Module, x: Tensor) -> Tensor:
    """The input of the victim's last ``Linear`` layer: its own description of the query."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    seen: list[Tensor] = []
    handle = last.register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0].detach()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return seen[0].flatten(1)


def solver_moves(engine: DeepDefense, x: Tensor, progress: bool) -> tuple[Tensor, Tensor]:
    """Each query's move of the dense selected weights by the full solver, from its keyed-noise start (n, D), and the
    victim's label of it."""
    moves, labels = [], []
    for batch in tqdm(x.split(engine.config.batch_size), desc="cold solver", unit="batch", disable=not progress):
        ref = engine.reference(batch)
        state, start = engine.solve(batch, ref), engine.initial_params(batch)
        moves.append(torch.cat([(state.anchor[k] - start[k]).detach().flatten(1) for k in engine.param_names], 1))
        labels.append(ref.label)
    return torch.cat(moves).double(), torch.cat(labels)


def amortised_start(engine: DeepDefense, x: Tensor, held_out: int, classes: int, progress: bool) -> dict[str, object]:
    """Held-out R² of the predictors of the solver's moves (the module's docstring)."""
    moves, labels = solver_moves(engine, x, progress)
    fit, test = slice(0, len(x) - held_out), slice(len(x) - held_out, len(x))
    onehot = nn.functional.one_hot(labels, classes).double()
    class_means = (onehot[fit].T @ moves[fit]) / onehot[fit].sum(0).clamp_min(1)[:, None]
    out: dict[str, object] = {
        "images": len(x),
        "held_out": held_out,
        "dense_coordinates": moves.shape[1],
        "mean_move_norm": float(moves.norm(dim=1).mean()),
        "r2_class_mean": r_squared(onehot[test] @ class_means, moves[test]),
    }
    for name, features in {"pixels": x.flatten(1), "hidden": hidden_features(engine.model, x)}.items():
        design = torch.cat([features.double(), onehot], 1)
        scores = {p: r_squared(design[test] @ ridge(design[fit], moves[fit], p), moves[test]) for p in PENALTIES}
        best = max(scores, key=scores.__getitem__)
        out[f"r2_ridge_{name}"] = {"best": scores[best], "penalty": best, "by_penalty": scores}
    return out


def compiled_step(engine: DeepDefense, x: Tensor, repeats: int) -> dict[str, object]:
    """The solver's gradient at the start of batch ``x``, eager and compiled (the module's docstring)."""
    state = engine._start(x, engine.reference(x))  # the solver's own start: the warm start, checked
    factors = state.low_rank_factors()
    taps = {m: x.new_zeros(len(x), w.q.shape[1]) for m, w in state.low_rank.items()}
    inputs = (state.params, taps, state.x, state.ref, factors)
    eager = grad(engine.objective, argnums=(0, 1), has_aux=True)
    torch._dynamo.reset()
    counters.clear()
    started = time.perf_counter()
    compiled = torch.compile(eager, dynamic=False)
    (compiled_grads, _), _ = compiled(*inputs)
    compile_s = time.perf_counter() - started
    traced = {"frames": dict(counters["frames"]), "graphs": counters["stats"]["unique_graphs"]}
    traced["fell_back"] = {reason.splitlines()[0]: n for reason, n in counters["unimplemented"].items()}
    (eager_grads, _), _ = eager(*inputs)
    gap = max(float((compiled_grads[k] - eager_grads[k]).abs().max()) for k in eager_grads)
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(repeats):  # alternately, so that a slower stretch of the machine falls on both
        for name, step in (("eager", eager), ("compiled", compiled)):
            started = time.perf_counter()
            step(*inputs)
            times[name].append(time.perf_counter() - started)
    eager_ms, compiled_ms = (1000 * statistics.median(times[k]) for k in ("eager", "compiled"))
    return {
        "batch": len(x),
        "eager_ms": eager_ms,
        "compiled_ms": compiled_ms,
        "speedup": eager_ms / compiled_ms,
        "compile_s": compile_s,
        "max_abs_gradient_difference": gap,
        "dynamo": traced,
    }


def layer_choice(
    checkpoint: str, data_root: str | None, x: Tensor, thresholds: Sequence[float], steps: int, repeats: int
) -> dict[str, object]:
    """Per threshold ``cs``: the layers it selects and the median CPU time of one answer to ``x`` (the module's
    docstring)."""
    engines: dict[float, DeepDefense] = {}
    for cs in thresholds:
        engine, _ = load_defense(checkpoint, "deepdefense", data_root=data_root, cs=cs, warm_start=False, steps=steps)
        assert isinstance(engine, DeepDefense)
        engines[cs] = engine
    times: dict[float, list[float]] = {cs: [] for cs in thresholds}
    for engine in engines.values():
        engine.answer(x)  # the first answer times the convolutions (defense/per_query.py) and warms the caches
    for _ in range(repeats):  # alternately, so that a slower stretch of the machine falls on every threshold
        for cs, engine in engines.items():
            started = time.process_time()
            engine.answer(x)
            times[cs].append(time.process_time() - started)
    return {
        "batch": len(x),
        "steps": steps,
        "by_threshold": {
            f"{cs:g}": {"layers": e.layers, "cpu_ms": 1000 * statistics.median(times[cs])} for cs, e in engines.items()
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="lenet-mnist")
    p.add_argument("--data-root", default=None, help="data sets in torchvision's layout ($DD_DATA_ROOT)")
    p.add_argument("--images", type=int, default=1536, help="training images the cold solver runs on")
    p.add_argument("--held-out", type=int, default=384, help="of those, the ones the predictors are scored on")
    p.add_argument("--batches", type=int, nargs="+", default=[16, 32, 64], help="batch sizes of the compiled step")
    p.add_argument("--repeats", type=int, default=20, help="timed gradients per batch size and path")
    p.add_argument("--thresholds", type=float, nargs="+", default=[90.0, 85.0], help="eq. (9)'s cs to time")
    p.add_argument("--answer-repeats", type=int, default=5, help="timed answers per batch size and threshold")
    p.add_argument("--seed", type=int, default=0, help="which training and test images")
    p.add_argument("--out", required=True, help="the record (JSON)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    record: dict[str, object] = {"command": module_command("deepdefense.measure.step_levers", argv)}
    record |= {"seed": args.seed, "measured": provenance(), "torch_threads": 1}
    cold, meta = load_defense(args.checkpoint, "deepdefense", data_root=args.data_root, warm_start=False)
    warm, _ = load_defense(args.checkpoint, "deepdefense", data_root=args.data_root)
    assert isinstance(cold, DeepDefense) and isinstance(warm, DeepDefense)
    train = load_split(meta.dataset, args.data_root, "train").tensors[0]
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))[: args.images]
    record["amortised_start"] = {"cold_steps": cold.steps} | amortised_start(
        cold, train[pick], args.held_out, meta.num_classes, not args.quiet
    )
    print(json.dumps(record["amortised_start"]), flush=True)
    test = load_split(meta.dataset, args.data_root, "test").tensors[0]
    record["compiled_step"] = [compiled_step(warm, test[:b], args.repeats) for b in args.batches]
    print(json.dumps(record["compiled_step"]), flush=True)
    record["layer_choice"] = [  # at the default engine's steps, from the victim (warm starts are per layer set)
        layer_choice(args.checkpoint, args.data_root, test[:b], args.thresholds, warm.steps, args.answer_repeats)
        for b in args.batches
    ]
    print(json.dumps(record["layer_choice"]), flush=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
