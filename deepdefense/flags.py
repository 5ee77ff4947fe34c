"""Flags shared by several subcommands, defined once: data root, device, server URL and API key file,
engine options (``--set KEY=VALUE``), output file, quiet."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from common.provenance import provenance
from models.data import DATA_ROOT_ENV, default_data_root


class HelpFormatter(argparse.HelpFormatter):
    """``--help`` of every command: each flag's help, then its default where the help does not already say it
    (flags that switch something on or off, and flags without a default, show none)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (
            "default" in text
            or not action.option_strings
            or action.default in (None, argparse.SUPPRESS)
            or isinstance(action.default, bool)
        ):
            return text
        return f"{text} (default: %(default)s)"


def add_data_root(p: argparse.ArgumentParser | argparse._ArgumentGroup, what: str = "") -> None:
    p.add_argument(
        "--data-root",
        default=default_data_root(),
        help=f"folder holding the data sets in torchvision's layout{what} (default: ${DATA_ROOT_ENV})",
    )


def add_device(p: argparse.ArgumentParser | argparse._ArgumentGroup, what: str = "") -> None:
    p.add_argument("--device", default="auto", help=f"{what}auto (CUDA when present), cpu or cuda[:N]")


def add_api_key_file(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument(
        "--api-key-file",
        default=None,
        help="file holding the API key (first non-comment line); default: $DD_CLIENT_API_KEY",
    )


def add_server_url(p: argparse.ArgumentParser) -> None:
    """Where a client finds the server: ``--url``, ``--api-key-file``, ``--timeout``."""
    p.add_argument("--url", default="http://127.0.0.1:8000", help="base URL of a running 'deepdefense serve'")
    add_api_key_file(p)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per HTTP request")


def add_engine_options(p: argparse.ArgumentParser | argparse._ArgumentGroup, what: str = "") -> None:
    p.add_argument(
        "--set",
        dest="engine",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"defense option{what}, repeatable, e.g. --set steps=30 --set lr=0.05 (values read as JSON "
        "when they parse: 30, 0.05, false; else as text)",
    )


def engine_options(pairs: Sequence[str]) -> dict[str, Any]:
    """``["steps=30", "lr=0.05", "conv_impl=unfold"]`` → ``{"steps": 30, "lr": 0.05, "conv_impl": "unfold"}``."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects KEY=VALUE, got {pair!r}")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return options


def add_out(p: argparse.ArgumentParser | argparse._ArgumentGroup, what: str = "the result") -> None:
    p.add_argument("--out", default=None, help=f"also write {what} to this JSON file")


def add_quiet(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def sizes(text: str) -> tuple[int, ...]:
    """``"1,8,32"`` → (1, 8, 32)."""
    return tuple(int(v) for v in text.split(",") if v.strip())


def print_report(result: dict[str, Any], out: str | None) -> int:
    """Print a result as JSON and, when asked, write it to ``out`` too; the result is stamped with where it
    comes from (``measured``: the commit and the date, :func:`common.provenance.provenance`)."""
    result = {**result, "measured": provenance()}
    print(json.dumps(result, indent=2))
    if out:
        with open(out, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


def add_recipe(p: argparse.ArgumentParser | argparse._ArgumentGroup, defaults: Any) -> None:
    """The attack-model training recipe (``clients.attack_model.TrainingRecipe``), one flag per field."""
    from clients.attack_model import OPTIMIZERS, SCHEDULES

    p.add_argument("--epochs", type=int, default=defaults.epochs, help="training epochs of the attack model")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="training batch size")
    p.add_argument("--lr", type=float, default=defaults.lr, help="learning rate")
    p.add_argument("--lambda", dest="lam", type=float, default=defaults.lam, help="weight of the map term of eq. (1)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=defaults.optimizer, help="the attack model's optimizer")
    p.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default=defaults.schedule,
        help="cosine: the learning rate decays to 0 over all steps",
    )
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="L2 weight decay")


def recipe(args: argparse.Namespace) -> Any:
    """The ``TrainingRecipe`` the flags of :func:`add_recipe` describe."""
    from dataclasses import fields

    from clients.attack_model import TrainingRecipe

    return TrainingRecipe(**{f.name: getattr(args, f.name) for f in fields(TrainingRecipe)})
