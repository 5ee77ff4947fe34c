"""The ``deepdefense`` command line: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence

from defense import DEFENSES
from models.data import DATA_ROOT_ENV, SPECS, default_data_root
from models.registry import list_models


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a victim model and write a checkpoint (safetensors + metadata JSON)")
    p.add_argument("--arch", required=True, choices=list_models())
    p.add_argument("--dataset", required=True, choices=sorted(SPECS))
    p.add_argument("--data-root", default=default_data_root(),
                   help=f"folder holding the data sets in torchvision's layout (default: ${DATA_ROOT_ENV})")
    p.add_argument("--out", required=True, help="output path without suffix, e.g. models/checkpoints/lenet-mnist")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-shift", type=int, default=2, help="random translation in pixels for images ≤ 32 px (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:N]")
    p.add_argument("--download", action="store_true", help="download the data set if it is missing (needs internet)")
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from deepdefense.device import resolve_device
    from models.train import TrainConfig, train

    cfg = TrainConfig(
        arch=args.arch, dataset=args.dataset, data_root=args.data_root, out=args.out, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, max_shift=args.max_shift, seed=args.seed,
        device=str(resolve_device(args.device)), download=args.download,
        command=shlex.join(["deepdefense", *argv]),
    )
    path, meta = train(cfg)
    print(f"wrote {path} (test accuracy {meta.test_accuracy:.2f}%, sha256 {meta.sha256[:12]}…)")
    return _run_sensitivity(argparse.Namespace(checkpoint=str(path), data_root=args.data_root, n=1000, seed=args.seed), argv)


def _add_sensitivity(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sensitivity", help="compute layer sensitivity (eq. 9) and store it in a checkpoint's metadata")
    p.add_argument("checkpoint", help="shipped checkpoint name (lenet-mnist) or path to its metadata JSON")
    p.add_argument("--data-root", default=default_data_root(),
                   help=f"folder holding the data sets in torchvision's layout (default: ${DATA_ROOT_ENV})")
    p.add_argument("--n", type=int, default=1000, help="number of training images N")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_run_sensitivity)


def _run_sensitivity(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from defense.sensitivity import store_sensitivity

    scores = store_sensitivity(args.checkpoint, args.data_root, n=args.n, seed=args.seed)
    total = sum(scores.values())
    for layer, score in sorted(scores.items(), key=lambda kv: -kv[1]):
        print(f"{layer:32s} S = {score:12.4f}  ({100 * score / total:5.1f}%)")
    return 0


def _report(result: dict, out: str | None) -> int:
    """Print a result as JSON and, when asked, write it to ``out`` too."""
    import json

    print(json.dumps(result, indent=2))
    if out:
        with open(out, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


def _engine_options(pairs: Sequence[str]) -> dict[str, float | int]:
    """``--set lr=0.05 --set steps=30`` → {"lr": 0.05, "steps": 30}."""
    options: dict[str, float | int] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {pair!r}")
        options[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else float(value)
    return options


def _add_fidelity(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fidelity", help="measure what a defense costs benign users on real test images")
    p.add_argument("--checkpoint", default="lenet-mnist")
    p.add_argument("--dataset", default=None, help="images to query with (default: the checkpoint's data set)")
    p.add_argument("--data-root", default=default_data_root(),
                   help=f"folder holding the data sets in torchvision's layout (default: ${DATA_ROOT_ENV})")
    p.add_argument("--defense", default="deepdefense", choices=DEFENSES)
    p.add_argument("--interpreter", default="gradcam")
    p.add_argument("--n", type=int, default=1000, help="number of test images (the first n)")
    p.add_argument("--batch-size", type=int, default=64, help="queries per defense.answer call (a micro-batch)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="engine option, e.g. lr=0.05")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", dest="json_out", default=None, help="also write the figures to this JSON file")
    p.set_defaults(func=_run_fidelity)


def _run_fidelity(args: argparse.Namespace, argv: Sequence[str]) -> int:

    from clients.fidelity import measure_fidelity
    from deepdefense.device import resolve_device
    from defense.loader import load_defense
    from models.data import load_split

    device = resolve_device(args.device)
    defense, meta = load_defense(args.checkpoint, args.defense, args.interpreter, device=device,
                                 data_root=args.data_root, **_engine_options(args.set))
    test = load_split(args.dataset or meta.dataset, args.data_root, "test")
    if not hasattr(test, "tensors"):
        raise ValueError("fidelity needs a tensor data set (MNIST-like or CIFAR)")
    images = test.tensors[0][: args.n].to(device)
    result = {"command": shlex.join(["deepdefense", *argv]), "checkpoint": args.checkpoint,
              "dataset": args.dataset or meta.dataset, "defense": args.defense, "interpreter": args.interpreter,
              "options": _engine_options(args.set), "device": str(device), "batch_size": args.batch_size,
              **measure_fidelity(defense, images, batch_size=args.batch_size).as_dict()}
    return _report(result, args.json_out)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="serve a victim model through a defense over HTTP (FastAPI under uvicorn)",
        description="Flags override DD_* environment variables (see docs/server.md). API keys are read only "
                    "from DD_API_KEYS or the file named by DD_API_KEYS_FILE, never from a flag.")
    p.add_argument("--checkpoint", help="shipped checkpoint name or metadata JSON path (default: lenet-mnist)")
    p.add_argument("--defense", choices=DEFENSES,
                   help="default: deepdefense; 'none' serves the undefended victim")
    p.add_argument("--interpreter", help="gradcam (default), gradinput or relevancecam")
    p.add_argument("--device", help="auto (default: CUDA when present), cpu or cuda[:N]")
    p.add_argument("--engine", help='defense options as JSON, e.g. \'{"steps": 10}\'')
    p.add_argument("--data-root", help="data sets, for layer sensitivity not stored in the checkpoint")
    p.add_argument("--host", help="default: 127.0.0.1")
    p.add_argument("--port", type=int, help="default: 8000")
    p.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--max-instances", type=int, help="instances per request (default: 16)")
    p.add_argument("--max-body-bytes", type=int, help="request body limit (default: 8 MiB)")
    p.add_argument("--max-batch-size", type=int, help="instances per micro-batch (default: 8)")
    p.add_argument("--max-batch-wait-ms", type=float, help="longest wait for a micro-batch to fill (default: 5)")
    p.add_argument("--queue-size", type=int, help="queued instances before answering 503 (default: 64)")
    p.add_argument("--request-timeout-s", type=float, help="504 after this many seconds (default: 30)")
    p.add_argument("--query-budget", type=int, help="queries per API key, kept across restarts (default: none)")
    p.add_argument("--budget-db", help="SQLite file of spent budgets (default: deepdefense-budget.sqlite)")
    p.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace, argv: Sequence[str]) -> int:
    import json

    from server.app import serve
    from server.settings import ServerSettings

    overrides = {k: v for k, v in vars(args).items() if k in ServerSettings.model_fields and v is not None}
    if "engine" in overrides:
        overrides["engine"] = json.loads(overrides["engine"])
    serve(ServerSettings(**overrides))
    return 0


def _add_oracle_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="base URL of a running 'deepdefense serve'")
    p.add_argument("--api-key-file", default=None,
                   help="file holding the API key (first non-comment line); default: $DD_CLIENT_API_KEY")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per HTTP request")


def _add_attack(sub: argparse._SubParsersAction) -> None:
    from clients.attack import STRATEGIES, AttackConfig
    from clients.attack_losses import ATTACK_LOSSES

    d = AttackConfig()
    p = sub.add_parser(
        "attack", help="steal the served model: query it, store the transfer set, train and test an attack model",
        description="The model-stealing adversary of DeepDefense §3 over HTTP. The transfer set is stored as it is "
                    "collected; rerunning the same command continues where an interrupted run stopped.")
    _add_oracle_flags(p)
    p.add_argument("--budget", type=int, default=d.budget, help="query budget B")
    p.add_argument("--strategy", choices=STRATEGIES, default=d.strategy,
                   help="random: sample P_A (Knockoff Nets); jbda: Jacobian-based augmentation (Papernot et al.)")
    p.add_argument("--loss", choices=ATTACK_LOSSES, default=d.loss,
                   help="explanations: eq. (1); probabilities: soft labels; labels: top-1 only")
    p.add_argument("--lambda", dest="lam", type=float, default=d.lam, help="weight of the map term of eq. (1)")
    p.add_argument("--dataset", default=d.dataset, choices=sorted(SPECS),
                   help="the attacker's data set P_A (queries come from its training split)")
    p.add_argument("--data-root", default=default_data_root(),
                   help=f"folder holding the data sets in torchvision's layout (default: ${DATA_ROOT_ENV})")
    p.add_argument("--arch", default=None, choices=list_models(), help="attack model (default: the victim's)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="training batch size")
    p.add_argument("--query-batch", type=int, default=d.query_batch, help="images per request")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--seed-size", type=int, default=d.seed_size, help="JBDA: size of the seed set S_0")
    p.add_argument("--jbda-step", type=float, default=d.jbda_step, help="JBDA: step λ of the augmentation")
    p.add_argument("--rounds", type=int, default=d.rounds, help="JBDA: labelling rounds max_ρ")
    p.add_argument("--test-n", type=int, default=None, help="test on the first n victim test images (default: all)")
    p.add_argument("--store", default=None, help="transfer-set folder (default: runs/transfer-sets/<derived name>)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="also write the result record to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_attack)


def _run_attack(args: argparse.Namespace, argv: Sequence[str]) -> int:

    from clients.attack import AttackConfig, run_attack
    from clients.oracle import HttpOracle, OracleError, read_api_key
    from deepdefense.device import resolve_device

    config = AttackConfig(
        budget=args.budget, strategy=args.strategy, loss=args.loss, dataset=args.dataset,
        data_root=str(args.data_root) if args.data_root else None, arch=args.arch, epochs=args.epochs,
        batch_size=args.batch_size, query_batch=args.query_batch, lr=args.lr, lam=args.lam, seed=args.seed,
        seed_size=args.seed_size, jbda_step=args.jbda_step, rounds=args.rounds, test_n=args.test_n,
        device=str(resolve_device(args.device)))
    try:
        with HttpOracle(args.url, read_api_key(args.api_key_file), timeout=args.timeout) as oracle:
            result = run_attack(oracle, config, args.store, progress=not args.quiet)
    except OracleError as err:
        print(f"deepdefense attack: {err}; the answers so far are stored, rerun the same command to continue",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("deepdefense attack: interrupted; the answers so far are stored, rerun the same command to continue",
              file=sys.stderr)
        return 130
    result = {"command": shlex.join(["deepdefense", *argv]), "url": args.url, **result}
    return _report(result, args.out)


def _add_client(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("client", help="a benign user: test images, agreement with the truth and the undefended "
                                      "victim, latency percentiles")
    _add_oracle_flags(p)
    p.add_argument("--checkpoint", default=None,
                   help="the undefended victim to compare with, loaded locally (default: the served model's name)")
    p.add_argument("--dataset", default=None, help="test images to send (default: the served model's data set)")
    p.add_argument("--data-root", default=default_data_root(),
                   help=f"folder holding the data sets in torchvision's layout (default: ${DATA_ROOT_ENV})")
    p.add_argument("--n", type=int, default=1000, help="number of test images (the first n)")
    p.add_argument("--batch-size", type=int, default=1, help="images per request")
    p.add_argument("--no-explain", dest="explain", action="store_false", help="ask for predictions only")
    p.add_argument("--out", default=None, help="also write the report to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_client)


def _run_client(args: argparse.Namespace, argv: Sequence[str]) -> int:

    from clients.benign import run_benign
    from clients.oracle import HttpOracle, OracleError, read_api_key
    from defense.api import NoDefense
    from defense.interpreters import create_interpreter
    from models.checkpoint import load_checkpoint
    from models.data import load_split

    try:
        with HttpOracle(args.url, read_api_key(args.api_key_file), timeout=args.timeout) as oracle:
            info = oracle.info()
            model, meta = load_checkpoint(args.checkpoint or info.name)
            model.requires_grad_(False)
            undefended = NoDefense(model, create_interpreter(info.interpreter, model, tuple(meta.input_shape)))
            images, labels = load_split(args.dataset or info.dataset, args.data_root, "test").tensors
            report = run_benign(oracle, images[: args.n], labels[: args.n], undefended, batch_size=args.batch_size,
                                explain=args.explain, progress=not args.quiet)
    except OracleError as err:
        print(f"deepdefense client: {err}", file=sys.stderr)
        return 1
    result = {"command": shlex.join(["deepdefense", *argv]), "url": args.url, "model": info.name,
              "defense": info.defense, "dataset": args.dataset or info.dataset, **report.as_dict()}
    return _report(result, args.out)


def _add_load(sub: argparse._SubParsersAction) -> None:
    from server.loadtest import add_load_arguments

    p = sub.add_parser("load", help="load and soak test a server on loopback: concurrent clients for a bounded time; "
                                    "statuses, error classes, latency percentiles, resident-memory growth",
                       description="See docs/reliability.md. With --serve, 'deepdefense serve' is started (configured "
                                   "by DD_* variables) and stopped with SIGTERM at the end.")
    add_load_arguments(p)
    p.set_defaults(func=_run_load)


def _run_load(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from server.loadtest import run_from_args

    return _report({"command": shlex.join(["deepdefense", *argv]), **run_from_args(args)}, args.out)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    from clients.eval_command import add_eval_arguments

    p = sub.add_parser("eval", help="the paper's experiments end to end: attack accuracy per defense, loss and budget "
                                    "(Fig. 2, Tables 3-5), Average Drop (Table 2), R_test/R_unif; JSON, CSV, PNG",
                       description="See clients/README.md. Transfer sets and finished trainings are stored as they "
                                   "are made: rerunning the same command continues where an interrupted run stopped.")
    add_eval_arguments(p)
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from clients.eval_command import run_eval

    return run_eval(args, shlex.join(["deepdefense", *argv]), _engine_options(args.set))


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark: undefended path, one-query engine, batched engine, and the server "
                                     "under 1/8/32 concurrent clients; ms/query, queries/s, peak memory, ratios",
                       description="See docs/performance.md and deepdefense/bench.py.")
    p.add_argument("--model", default="lenet-mnist", choices=["lenet-mnist", "resnet18"],
                   help="lenet-mnist (shipped) or resnet18 (random weights, 224 px)")
    p.add_argument("--interpreter", default="gradcam")
    p.add_argument("--device", default="auto")
    p.add_argument("--data-root", default=default_data_root(),
                   help=f"MNIST test images for lenet-mnist (default: ${DATA_ROOT_ENV}; random images without)")
    p.add_argument("--queries", type=int, default=64, help="queries per in-process phase")
    p.add_argument("--one-query-queries", type=int, default=16, help="queries for the one-query engine")
    p.add_argument("--batch-sizes", default="1,8,32,64", help="batched-engine micro-batch sizes")
    p.add_argument("--clients", default="1,8,32", help="concurrent clients of the server phases")
    p.add_argument("--duration", type=float, default=30.0, help="seconds per server phase")
    p.add_argument("--max-requests", type=int, default=2000, help="requests per server phase")
    p.add_argument("--no-server", dest="server", action="store_false", help="skip the server phases")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="engine option, e.g. steps=30")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the JSON here and the Markdown table beside it (.md)")
    p.set_defaults(func=_run_bench)


def _run_bench(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from pathlib import Path

    from deepdefense.bench import BenchConfig, markdown, run_bench

    def sizes(text: str) -> tuple[int, ...]:
        return tuple(int(v) for v in text.split(",") if v.strip())

    config = BenchConfig(model=args.model, interpreter=args.interpreter, device=args.device, data_root=args.data_root,
                         queries=args.queries, one_query_queries=args.one_query_queries,
                         batch_sizes=sizes(args.batch_sizes), clients=sizes(args.clients), duration_s=args.duration,
                         max_requests=args.max_requests, server=args.server, seed=args.seed,
                         options=_engine_options(args.set))
    command = shlex.join(["deepdefense", *argv])
    result = {"command": command, **run_bench(config, progress=lambda m: print(m, file=sys.stderr))}
    table = markdown(result, command)
    print(table, file=sys.stderr)
    if args.out:
        Path(args.out).with_suffix(".md").write_text(table)
    return _report(result, args.out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepdefense", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(sub)
    _add_sensitivity(sub)
    _add_fidelity(sub)
    _add_serve(sub)
    _add_attack(sub)
    _add_client(sub)
    _add_load(sub)
    _add_eval(sub)
    _add_bench(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args, argv)
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"deepdefense {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
