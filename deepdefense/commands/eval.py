"""``deepdefense eval``: the paper's experiments end to end (the harness is :mod:`measure.evaluate`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from clients.attack_losses import ATTACK_LOSSES
from deepdefense import flags
from defense import DEFENSES
from measure.evaluate import QUERY_SETS, EvalConfig, run_evaluation
from models.data import SPECS

HELP = (
    "the paper's experiments end to end: attack accuracy per defense, loss and budget (Fig. 2, Tables 3-5), "
    "Average Drop (Table 2), R_test/R_unif; JSON, CSV, PNG"
)
DESCRIPTION = (
    "See measure/README.md. Transfer sets and finished trainings are stored as they are made: rerunning "
    "the same command continues where an interrupted run stopped."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    defaults = EvalConfig()
    where = p.add_argument_group("where the answers come from (default: in-process, the server's Defense.answer)")
    where.add_argument(
        "--serve",
        action="store_true",
        help="start a 'deepdefense serve' app on loopback per defense and query it over HTTP",
    )
    where.add_argument(
        "--url",
        action="append",
        default=[],
        metavar="[KEY=]URL",
        help="a running server instead (repeatable); KEY names the arm (default: its defense), "
        "e.g. deepdefense-cs50=http://127.0.0.1:8001",
    )
    flags.add_api_key_file(where)
    what = p.add_argument_group("what to run")
    what.add_argument(
        "--checkpoint", default=defaults.checkpoint, help="the victim: shipped name or path to its metadata JSON"
    )
    what.add_argument("--interpreter", default=defaults.interpreter, help="attribution method of the defended answers")
    what.add_argument(
        "--defenses",
        nargs="*",
        default=list(defaults.defenses),
        choices=DEFENSES,
        help="the defenses to attack, one arm each",
    )
    what.add_argument(
        "--gated",
        nargs="*",
        default=list(defaults.gated),
        choices=DEFENSES,
        help="defenses also evaluated behind the misinformation gate (arms '<defense>+gate'; 'none': Adaptive "
        "Misinformation)",
    )
    what.add_argument(
        "--monitored",
        action="store_true",
        help="gated arms answer as the default server with API keys: each arm's queries are one key's, which the "
        "extraction monitor screens and may escalate (its state and summary under <out>/monitor/)",
    )
    what.add_argument(
        "--query-sets",
        nargs="+",
        default=list(defaults.query_sets),
        choices=QUERY_SETS,
        help="random: the attacker's data set (--attacker-dataset); jbda: Jacobian augmentation from --jbda-seeds "
        "victim training images; victim-train: the victim's training images (the in-domain ceiling); twins: random "
        "with every image followed by its twin (one pixel moved by 1/255); adaptive: JBDA grown only from the "
        "answers that moved between their twins (clients/adaptive.py)",
    )
    what.add_argument("--jbda-seeds", type=int, default=defaults.jbda_seeds, help="|S_0| of the jbda query set")
    what.add_argument(
        "--losses", nargs="+", default=list(defaults.losses), choices=ATTACK_LOSSES, help="the attackers' losses"
    )
    what.add_argument("--budgets", nargs="+", type=int, default=list(defaults.budgets), help="query budgets B")
    what.add_argument(
        "--cs",
        nargs="*",
        type=float,
        default=list(defaults.cs),
        help="Table 3: DeepDefense arms at these cumulative sensitivities (none: skip)",
    )
    what.add_argument(
        "--top-k",
        nargs="*",
        type=int,
        default=list(defaults.top_k),
        help="Table 4: DeepDefense arms keeping these top-k (none: skip)",
    )
    what.add_argument(
        "--ablation-budget", type=int, default=None, help="B of the Table 3/4 arms (default: the largest)"
    )
    what.add_argument(
        "--ablation-losses",
        nargs="+",
        default=list(defaults.ablation_losses),
        choices=ATTACK_LOSSES,
        help="the attackers' losses of the Table 3/4 arms",
    )
    what.add_argument(
        "--avg-drop",
        nargs="*",
        default=list(defaults.avg_drop),
        metavar="ARM",
        help="arms whose maps are compared with the victim's (Table 2; none: skip)",
    )
    flags.add_engine_options(what, " for the DeepDefense arms")
    what.add_argument(
        "--attacker-dataset",
        default=defaults.attacker_dataset,
        choices=sorted(SPECS),
        help="the data set the attacker queries with",
    )
    flags.add_data_root(what)
    train = p.add_argument_group("the attack models")
    flags.add_recipe(train, defaults.recipe)
    train.add_argument("--seed", type=int, default=defaults.seed, help="seed of the queries and the attack models")
    scale = p.add_argument_group("scale")
    scale.add_argument("--test-n", type=int, default=None, help="first n victim test images (default: all)")
    scale.add_argument("--n-unif", type=int, default=defaults.n_unif, help="uniform inputs for R_unif")
    scale.add_argument("--n-maps", type=int, default=defaults.n_maps, help="test images for Average Drop (Table 2)")
    scale.add_argument("--p", type=float, default=defaults.p, help="Average Drop keeps the top p%% of each map")
    scale.add_argument("--n-figure", type=int, default=defaults.n_figure, help="rows of Figure 3")
    scale.add_argument("--runtime-n", type=int, default=defaults.runtime_n, help="test queries timed per arm")
    scale.add_argument(
        "--benign-n",
        type=int,
        default=defaults.benign_n,
        help="victim test images an honest user sends each arm: its accuracy and agreement with the victim (0: skip)",
    )
    scale.add_argument("--query-batch", type=int, default=defaults.query_batch, help="images per request / answer call")
    run_group = p.add_argument_group("running")
    flags.add_device(run_group, "attack models: ")
    run_group.add_argument("--defense-device", default=None, help="in-process and started defenses (default: --device)")
    run_group.add_argument(
        "--store-root", default=defaults.store_root, help="transfer sets (shared with 'deepdefense attack')"
    )
    run_group.add_argument(
        "--out", required=True, help="results folder (JSON, CSV, PNG; finished trainings are cached here)"
    )
    run_group.add_argument(
        "--report",
        default=None,
        help="also write the Markdown report here, e.g. docs/results/mnist.md (runs with gated arms or other query "
        "sets: the misinformation gate's report, e.g. docs/results/below-label-line.md)",
    )
    run_group.add_argument(
        "--baseline-results",
        default=None,
        metavar="RESULTS_JSON",
        help="the gate's report: another run's results.json whose ungated arms fill the rows this run lacks",
    )
    flags.add_quiet(run_group)
    run_group.add_argument(
        "--only-cached",
        action="store_true",
        help=(
            "train no attack model and send no attacker query: report the cached ones from <out>/runs (the "
            "others show as not run), with or without the transfer sets; honest-user and Table 2 answers are "
            "measured once when not cached"
        ),
    )


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    from common.device import resolve_device

    device = str(resolve_device(args.device))
    return EvalConfig(
        checkpoint=args.checkpoint,
        interpreter=args.interpreter,
        defenses=tuple(args.defenses),
        gated=tuple(args.gated),
        monitored=args.monitored,
        query_sets=tuple(args.query_sets),
        jbda_seeds=args.jbda_seeds,
        losses=tuple(args.losses),
        budgets=tuple(args.budgets),
        cs=tuple(args.cs),
        top_k=tuple(args.top_k),
        ablation_budget=args.ablation_budget,
        ablation_losses=tuple(args.ablation_losses),
        avg_drop=tuple(args.avg_drop),
        attacker_dataset=args.attacker_dataset,
        data_root=str(args.data_root) if args.data_root else None,
        recipe=flags.recipe(args),
        query_batch=args.query_batch,
        seed=args.seed,
        test_n=args.test_n,
        n_unif=args.n_unif,
        n_maps=args.n_maps,
        p=args.p,
        n_figure=args.n_figure,
        runtime_n=args.runtime_n,
        benign_n=args.benign_n,
        engine_options=flags.engine_options(args.engine),
        device=device,
        defense_device=str(resolve_device(args.defense_device)) if args.defense_device else None,
        store_root=args.store_root,
        only_cached=args.only_cached,
    )


def run(args: argparse.Namespace) -> int:
    """Run the evaluation, writing the result files after every arm; print a summary as JSON."""
    from clients.oracle import OracleError, read_api_key
    from measure import report

    command = args.command_line
    config = config_from_args(args)
    if min(config.budgets) < 1 or (config.ablation_budget is not None and config.ablation_budget < 1):
        raise ValueError("budgets must be positive")
    out = Path(args.out)
    started = time.perf_counter()

    baseline = json.loads(Path(args.baseline_results).read_text()) if args.baseline_results else None

    def write(record: dict[str, Any]) -> None:
        record["command"] = command
        report.write_outputs(record, out)
        if args.report:
            Path(args.report).parent.mkdir(parents=True, exist_ok=True)
            Path(args.report).write_text(report.markdown(record, out, args.report, baseline))

    try:
        record = run_evaluation(
            config,
            out,
            urls=args.url or None,
            serve=args.serve,
            api_key=read_api_key(args.api_key_file) if args.url else None,
            progress=not args.quiet,
            command=command,
            on_arm=write,
        )
    except OracleError as err:
        print(
            f"deepdefense eval: {err}; the answers so far are stored, rerun the same command to continue",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print(
            "deepdefense eval: interrupted; collected answers and finished trainings are stored, rerun the same "
            "command to continue",
            file=sys.stderr,
        )
        return 130
    record["wall_s"] = round(time.perf_counter() - started, 1)
    write(record)
    summary = {
        "command": command,
        "out": str(out),
        "report": args.report,
        "wall_s": record["wall_s"],
        "table5": report.tables(record)["table5"],
    }
    print(json.dumps(summary, indent=2))
    return 0
