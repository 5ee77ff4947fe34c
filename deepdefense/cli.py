"""The ``deepdefense`` command line: one entry point, one subcommand per job.

This module only dispatches: each subcommand module under ``deepdefense/commands/`` owns its
``add_arguments(parser)`` and ``run(args)``; flags shared by several live in ``deepdefense/flags.py``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence

from deepdefense.commands import COMMANDS
from deepdefense.common import __version__
from deepdefense.flags import HelpFormatter


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepdefense", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        p = sub.add_parser(
            name,
            help=module.HELP,
            description=getattr(module, "DESCRIPTION", module.HELP),
            formatter_class=HelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["deepdefense", *argv])  # recorded beside every result a command writes
    try:
        return args.run(args)
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"deepdefense {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
