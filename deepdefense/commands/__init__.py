"""One module per subcommand, each with ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``
(``args.command_line`` holds the command as typed, for the records it writes)."""

from . import (
    attack,
    bench,
    client,
    detectors,
    domain,
    edm,
    eval,
    fidelity,
    formats,
    load,
    misinfo,
    ownership,
    prepare,
    sensitivity,
    serve,
    train,
    warmstart,
)

COMMANDS = {
    "train": train,
    "misinfo": misinfo,
    "edm": edm,
    "sensitivity": sensitivity,
    "fidelity": fidelity,
    "serve": serve,
    "attack": attack,
    "client": client,
    "load": load,
    "eval": eval,
    "bench": bench,
    "domain": domain,
    "formats": formats,
    "detectors": detectors,
    "warmstart": warmstart,
    "prepare": prepare,
    "ownership": ownership,
}
