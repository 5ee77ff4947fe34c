"""``deepdefense eval``: the paper's experiments end to end (the harness is :mod:`measure.evaluate`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from deepdefense import flags
from deepdefense.measure.evaluate import EvalConfig, run_evaluation

HELP = (
    "the paper's experiments end to end: attack accuracy per defense, loss and budget (Fig. 2, Tables 3-5), "
    "Average Drop (Table 2), R_test/R_unif; JSON, CSV, PNG"
)
DESCRIPTION = (
    "See measure/README.md. Transfer sets and finished trainings are stored as they are made: rerunning "
    "the same command continues where an interrupted run stopped."
)


#: Flags by group; a field of ``EvalConfig`` in none of them is a flag of "what to run". ``data_root``,
#: ``engine_options``, ``device`` and ``defense_device`` read as the other commands' flags of the same name.
TRAINING = ("recipe", "seed")
SCALE = ("test_n", "n_unif", "n_maps", "p", "n_figure", "runtime_n", "benign_n", "query_batch")
RUNNING = ("store_root",)
SHARED = ("data_root", "engine_options", "device", "defense_device")


def add_arguments(p: argparse.ArgumentParser) -> None:
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
    flags.add_fields(what, EvalConfig, exclude=(*TRAINING, *SCALE, *RUNNING, "only_cached", *SHARED))
    flags.add_engine_options(what, " for the DeepDefense arms")
    flags.add_data_root(what)
    flags.add_fields(p.add_argument_group("the attack models"), EvalConfig, TRAINING)
    flags.add_fields(p.add_argument_group("scale"), EvalConfig, SCALE)
    run_group = p.add_argument_group("running")
    flags.add_device(run_group, "attack models: ")
    run_group.add_argument("--defense-device", default=None, help="in-process and started defenses (default: --device)")
    flags.add_fields(run_group, EvalConfig, RUNNING)
    flags.add_out_folder(run_group, "results folder (JSON, CSV, PNG; finished trainings are cached here)")
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
    flags.add_fields(run_group, EvalConfig, ("only_cached",))


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    from deepdefense.common.device import resolve_device

    return flags.from_fields(
        EvalConfig,
        args,
        data_root=str(args.data_root) if args.data_root else None,
        engine_options=flags.engine_options(args.engine),
        device=str(resolve_device(args.device)),
        defense_device=str(resolve_device(args.defense_device)) if args.defense_device else None,
    )


def run(args: argparse.Namespace) -> int:
    """Run the evaluation, writing the result files after every arm; print a summary as JSON."""
    from deepdefense.clients.oracle import OracleError, read_api_key
    from deepdefense.measure import report

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
