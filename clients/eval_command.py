"""``deepdefense eval``: its arguments and what it does with them (the harness is :mod:`clients.evaluate`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from defense import DEFENSES
from models.data import DATA_ROOT_ENV, SPECS, default_data_root

from .attack_losses import ATTACK_LOSSES
from .attack_model import OPTIMIZERS, SCHEDULES
from .evaluate import EvalConfig, run_evaluation

_D = EvalConfig()


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    where = p.add_argument_group("where the answers come from (default: in-process, the server's Defense.answer)")
    where.add_argument("--serve", action="store_true", help="start a 'deepdefense serve' app on loopback per defense "
                                                            "and query it over HTTP")
    where.add_argument("--url", action="append", default=[], metavar="[KEY=]URL",
                       help="a running server instead (repeatable); KEY names the arm (default: its defense), "
                            "e.g. deepdefense-cs50=http://127.0.0.1:8001")
    where.add_argument("--api-key-file", default=None, help="API key for --url servers (default: $DD_CLIENT_API_KEY)")
    what = p.add_argument_group("what to run")
    what.add_argument("--checkpoint", default=_D.checkpoint)
    what.add_argument("--interpreter", default=_D.interpreter)
    what.add_argument("--defenses", nargs="+", default=list(_D.defenses), choices=DEFENSES)
    what.add_argument("--losses", nargs="+", default=list(_D.losses), choices=ATTACK_LOSSES)
    what.add_argument("--budgets", nargs="+", type=int, default=list(_D.budgets), help="query budgets B")
    what.add_argument("--cs", nargs="*", type=float, default=list(_D.cs),
                      help="Table 3: DeepDefense arms at these cumulative sensitivities (none: skip)")
    what.add_argument("--top-k", nargs="*", type=int, default=list(_D.top_k),
                      help="Table 4: DeepDefense arms keeping these top-k (none: skip)")
    what.add_argument("--ablation-budget", type=int, default=None, help="B of the Table 3/4 arms (default: the largest)")
    what.add_argument("--ablation-losses", nargs="+", default=list(_D.ablation_losses), choices=ATTACK_LOSSES)
    what.add_argument("--avg-drop", nargs="*", default=list(_D.avg_drop), metavar="ARM",
                      help="arms whose maps are compared with the victim's (Table 2; none: skip)")
    what.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="engine option for the DeepDefense arms, e.g. steps=30")
    what.add_argument("--attacker-dataset", default=_D.attacker_dataset, choices=sorted(SPECS))
    what.add_argument("--data-root", default=default_data_root(),
                      help=f"folder holding the data sets in torchvision's layout (default: ${DATA_ROOT_ENV})")
    train = p.add_argument_group("the attack models")
    train.add_argument("--epochs", type=int, default=_D.epochs)
    train.add_argument("--batch-size", type=int, default=_D.batch_size)
    train.add_argument("--lr", type=float, default=_D.lr)
    train.add_argument("--lambda", dest="lam", type=float, default=_D.lam, help="weight of the map term of eq. (1)")
    train.add_argument("--optimizer", choices=OPTIMIZERS, default=_D.optimizer)
    train.add_argument("--schedule", choices=SCHEDULES, default=_D.schedule)
    train.add_argument("--weight-decay", type=float, default=_D.weight_decay)
    train.add_argument("--seed", type=int, default=_D.seed)
    scale = p.add_argument_group("scale")
    scale.add_argument("--test-n", type=int, default=None, help="first n victim test images (default: all)")
    scale.add_argument("--n-unif", type=int, default=_D.n_unif, help="uniform inputs for R_unif")
    scale.add_argument("--n-maps", type=int, default=_D.n_maps, help="test images for Average Drop (Table 2)")
    scale.add_argument("--p", type=float, default=_D.p, help="Average Drop keeps the top p%% of each map")
    scale.add_argument("--n-figure", type=int, default=_D.n_figure, help="rows of Figure 3")
    scale.add_argument("--runtime-n", type=int, default=_D.runtime_n, help="test queries timed per arm")
    scale.add_argument("--query-batch", type=int, default=_D.query_batch, help="images per request / answer call")
    run = p.add_argument_group("running")
    run.add_argument("--device", default="auto", help="attack models: auto (CUDA when present), cpu or cuda[:N]")
    run.add_argument("--defense-device", default=None, help="in-process and started defenses (default: --device)")
    run.add_argument("--store-root", default=_D.store_root, help="transfer sets (shared with 'deepdefense attack')")
    run.add_argument("--out", required=True, help="results folder (JSON, CSV, PNG; finished trainings are cached here)")
    run.add_argument("--report", default=None, help="also write the Markdown report here, e.g. docs/results/mnist.md")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument("--only-cached", action="store_true",
                     help="train no new attack model: report the stored ones (the others show as not run)")


def config_from_args(args: argparse.Namespace, engine_options: dict[str, Any]) -> EvalConfig:
    from deepdefense.device import resolve_device

    device = str(resolve_device(args.device))
    return EvalConfig(
        checkpoint=args.checkpoint, interpreter=args.interpreter, defenses=tuple(args.defenses),
        losses=tuple(args.losses), budgets=tuple(args.budgets), cs=tuple(args.cs), top_k=tuple(args.top_k),
        ablation_budget=args.ablation_budget, ablation_losses=tuple(args.ablation_losses), avg_drop=tuple(args.avg_drop),
        attacker_dataset=args.attacker_dataset, data_root=str(args.data_root) if args.data_root else None,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, lam=args.lam, optimizer=args.optimizer,
        schedule=args.schedule, weight_decay=args.weight_decay, query_batch=args.query_batch, seed=args.seed,
        test_n=args.test_n, n_unif=args.n_unif, n_maps=args.n_maps, p=args.p, n_figure=args.n_figure,
        runtime_n=args.runtime_n, engine_options=engine_options, device=device,
        defense_device=str(resolve_device(args.defense_device)) if args.defense_device else None,
        store_root=args.store_root, only_cached=args.only_cached)


def run_eval(args: argparse.Namespace, command: str, engine_options: dict[str, Any]) -> int:
    """Run the evaluation, writing the result files after every arm; print a summary as JSON."""
    from . import report
    from .oracle import OracleError, read_api_key

    config = config_from_args(args, engine_options)
    if min(config.budgets) < 1 or (config.ablation_budget is not None and config.ablation_budget < 1):
        raise ValueError("budgets must be positive")
    out = Path(args.out)
    started = time.perf_counter()

    def write(record: dict[str, Any]) -> None:
        record["command"] = command
        report.write_outputs(record, out)
        if args.report:
            Path(args.report).parent.mkdir(parents=True, exist_ok=True)
            Path(args.report).write_text(report.markdown(record, out, args.report))

    try:
        record = run_evaluation(config, out, urls=args.url or None, serve=args.serve,
                                api_key=read_api_key(args.api_key_file) if args.url else None,
                                progress=not args.quiet, command=command, on_arm=write)
    except OracleError as err:
        print(f"deepdefense eval: {err}; the answers so far are stored, rerun the same command to continue",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("deepdefense eval: interrupted; collected answers and finished trainings are stored, rerun the same "
              "command to continue", file=sys.stderr)
        return 130
    record["wall_s"] = round(time.perf_counter() - started, 1)
    write(record)
    summary = {"command": command, "out": str(out), "report": args.report, "wall_s": record["wall_s"],
               "table5": report.tables(record)["table5"]}
    print(json.dumps(summary, indent=2))
    return 0
