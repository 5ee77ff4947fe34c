"""One module per subcommand, each with ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``
(``args.command_line`` holds the command as typed, for the records it writes)."""

from . import attack, bench, client, eval, fidelity, load, sensitivity, serve, train

COMMANDS = {
    "train": train,
    "sensitivity": sensitivity,
    "fidelity": fidelity,
    "serve": serve,
    "attack": attack,
    "client": client,
    "load": load,
    "eval": eval,
    "bench": bench,
}
