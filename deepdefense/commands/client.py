"""``deepdefense client``: a benign user of a running server."""

from __future__ import annotations

import argparse
import sys

from deepdefense import flags

HELP = "a benign user: test images, agreement with the truth and the undefended victim, latency percentiles"


def add_arguments(p: argparse.ArgumentParser) -> None:
    flags.add_server_url(p)
    p.add_argument("--model", default=None, help="the served model to ask, by name (default: the server's first)")
    p.add_argument(
        "--protocol",
        choices=("predict", "v2"),  # clients.oracle.PROTOCOLS (imported only when the command runs)
        default="predict",
        help="predict: POST /predict; v2: the Open Inference Protocol's POST /v2/models/{name}/infer",
    )
    p.add_argument(
        "--checkpoint",
        default=None,
        help="the undefended victim to compare with, loaded locally (default: the served model's name)",
    )
    p.add_argument("--dataset", default=None, help="test images to send (default: the served model's data set)")
    flags.add_data_root(p)
    p.add_argument("--n", type=int, default=1000, help="number of test images (the first n)")
    p.add_argument("--batch-size", type=int, default=1, help="images per request")
    p.add_argument("--no-explain", dest="explain", action="store_false", help="ask for predictions only")
    flags.add_out(p)
    flags.add_quiet(p)


def run(args: argparse.Namespace) -> int:
    from deepdefense.clients.benign import run_benign
    from deepdefense.clients.oracle import HttpOracle, OracleError, read_api_key
    from deepdefense.defense.api import NoDefense
    from deepdefense.defense.interpreters import create_interpreter
    from deepdefense.models.checkpoint import load_checkpoint
    from deepdefense.models.data import load_split

    try:
        with HttpOracle(
            args.url, read_api_key(args.api_key_file), model=args.model, protocol=args.protocol, timeout=args.timeout
        ) as oracle:
            info = oracle.info()
            model, meta = load_checkpoint(args.checkpoint or info.name)
            model.requires_grad_(False)
            undefended = NoDefense(model, create_interpreter(info.interpreter, model, tuple(meta.input_shape)))
            images, labels = load_split(args.dataset or info.dataset, args.data_root, "test").tensors
            report = run_benign(
                oracle,
                images[: args.n],
                labels[: args.n],
                undefended,
                batch_size=args.batch_size,
                explain=args.explain,
                progress=not args.quiet,
            )
    except OracleError as err:
        print(f"deepdefense client: {err}", file=sys.stderr)
        return 1
    result = {
        "command": args.command_line,
        "url": args.url,
        "model": info.name,
        "protocol": args.protocol,
        "defense": info.defense,
        "dataset": args.dataset or info.dataset,
        **report.as_dict(),
    }
    return flags.print_report(result, args.out)
