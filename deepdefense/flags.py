"""Flags shared by several subcommands, defined once: data root, device, server URL and API key file,
engine options (``--set KEY=VALUE``), where the output goes (:func:`add_out`), quiet; and the flags of a
dataclass's fields (:func:`add_fields`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from deepdefense.common.options import key_values
from deepdefense.common.provenance import provenance
from deepdefense.models.data import DATA_ROOT_ENV, default_data_root


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
    return key_values(pairs, "--set")


def add_out(p: argparse.ArgumentParser | argparse._ArgumentGroup, what: str = "the record", report: str = "") -> None:
    """The output convention of every command: ``--out FILE`` is where the command's record goes (the JSON it
    measured, with the command that made it); a command that also renders the record as Markdown (``report``:
    an example place) takes ``--report FILE`` too, and each of the two defaults to beside the other (``.json``,
    ``.md``). What a command makes for the server (a checkpoint, an artifact beside one) is ``--save``
    (:func:`add_save`); ``eval`` and ``prepare``, which write many files, take a folder (:func:`add_out_folder`)."""
    beside = " (default: beside --report, as .json)" if report else ""
    p.add_argument("--out", default=None, metavar="FILE", help=f"write {what} to this JSON file{beside}")
    if report:
        p.add_argument(
            "--report",
            default=None,
            metavar="FILE",
            help=f"write the Markdown report here, e.g. {report} (default: beside --out, as .md)",
        )


def out_paths(args: argparse.Namespace) -> tuple[Path | None, Path | None]:
    """Where the record and the report of :func:`add_out` go: each given, or beside the other."""
    out, report = (Path(v) if v else None for v in (args.out, getattr(args, "report", None)))
    if "report" not in vars(args):
        return out, None
    return out or (report.with_suffix(".json") if report else None), report or (out.with_suffix(".md") if out else None)


def write_json(path: Path | str, record: dict[str, Any]) -> None:
    """Write a record (its folder made if missing) and say so on stderr."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)


def write_outputs(args: argparse.Namespace, record: dict[str, Any], markdown: Callable[[dict[str, Any]], str]) -> None:
    """Write what :func:`add_out` promises: the record to ``--out``, its Markdown (``markdown(record)``) to
    ``--report``, each where :func:`out_paths` puts it."""
    out, report = out_paths(args)
    if out:
        write_json(out, record)
    if report:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(markdown(record))
        print(f"wrote {report}")


def add_out_folder(p: argparse.ArgumentParser | argparse._ArgumentGroup, what: str, default: str = "") -> None:
    """``--out FOLDER`` of the commands that write many files: their record (``results.json``, ``report.json``)
    and what comes with it."""
    p.add_argument(
        "--out",
        required=not default,
        default=None,
        metavar="FOLDER",
        help=what + (f" (default: {default})" if default else ""),
    )


def add_save(p: argparse.ArgumentParser | argparse._ArgumentGroup, what: str, default: str = "", e_g: str = "") -> None:
    """``--save STEM``: where a command writes what it makes for the server (its ``.json`` and ``.safetensors``)."""
    where = f" (default: {default})" if default else f", e.g. {e_g}" if e_g else ""
    p.add_argument(
        "--save",
        required=not default,
        default=None,
        metavar="STEM",
        help=f"write {what} here: a path without suffix{where}",
    )


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
        write_json(out, result)
    return 0


def add_fields(
    p: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    names: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
) -> None:
    """One flag per field of the dataclass ``cls`` (``names`` of them, or all but ``exclude``), in the order of the
    fields: ``--field-name`` (or the field's ``flag``), its type, choices (a ``Literal``), how many values (a tuple:
    one or more, ``nargs="*"``: none too), its default, and its help from the field's description
    (:func:`common.options.described`). A field holding a dataclass gives the flags of that dataclass' fields."""
    hints = typing.get_type_hints(cls)
    chosen = set(names) if names is not None else {f.name for f in dataclasses.fields(cls)} - set(exclude)
    for f in dataclasses.fields(cls):
        if f.name not in chosen:
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            add_fields(p, hints[f.name])
            continue
        meta = dict(f.metadata)
        help_text = meta.pop("help").replace("%", "%%")
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
        kind = flag_kind(hints[f.name])
        if kind.get("action") is argparse.BooleanOptionalAction and default is False:
            kind = {"action": "store_true"}
        name = meta.pop("flag", f"--{f.name.replace('_', '-')}")
        kind |= meta
        p.add_argument(name, dest=f.name, default=list(default) if isinstance(default, tuple) else default,
                       help=help_text, **kind)  # fmt: skip


def from_fields(cls: type, args: argparse.Namespace, **given: Any) -> Any:
    """The ``cls`` the flags of :func:`add_fields` describe (lists as tuples); ``given`` fields are taken as they
    are instead of from ``args``."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in given:
            values[f.name] = given[f.name]
        elif dataclasses.is_dataclass(hints[f.name]):
            values[f.name] = from_fields(hints[f.name], args)
        else:
            value = getattr(args, f.name)
            values[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)


def fit_config(cls: type, args: argparse.Namespace, **given: Any) -> Any:
    """:func:`from_fields` for a config of what a command learns offline, with the run's own fields: the device of
    ``--device`` (resolved), progress bars unless ``--quiet``, and the command line that made it."""
    from deepdefense.common.device import resolve_device

    return from_fields(
        cls,
        args,
        device=str(resolve_device(args.device)),
        progress=not args.quiet,
        command=args.command_line,
        **given,
    )


def flag_kind(annotation: Any) -> dict[str, Any]:
    """argparse ``type``/``choices``/``action``/``nargs`` for a field's annotation (Optional unwrapped): a
    ``Literal`` gives its values as choices, a bool a ``--x/--no-x`` switch, a list a repeatable flag, a tuple
    one flag taking one or more values."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return {"choices": list(typing.get_args(annotation))}
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is list:  # repeatable: --checkpoint a --checkpoint b
        return {"action": "append", "type": str}
    if origin is tuple:
        return {"nargs": "+", **flag_kind(typing.get_args(annotation)[0])}
    if annotation in (int, float):
        return {"type": annotation}
    if annotation is Path or (isinstance(annotation, type) and issubclass(annotation, Path)):
        return {"type": Path}
    return {"type": str}
