"""The command line itself: every flag of every command has help and shows its default, the checkpoint is
named one way (``--checkpoint``) by every command that takes one, and ``load`` reports progress as it runs."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shlex
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import pytest
from support.settings import make_settings

from deepdefense import flags
from deepdefense.cli import build_parser, main
from deepdefense.clients.load import LoadConfig, run_load
from deepdefense.common.options import described
from deepdefense.defense import NoDefense
from deepdefense.defense.fitting.edm import EDMConfig
from deepdefense.defense.fitting.misinformation import MisinfoConfig
from deepdefense.defense.fitting.warm_start import WarmStartConfig
from deepdefense.measure.launcher import in_thread
from deepdefense.server.app import create_app

pytestmark = pytest.mark.usefixtures("no_server_env")


def commands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_flag_has_help_and_shows_its_default() -> None:
    for name, parser in commands().items():
        formatter = parser._get_formatter()  # what --help prints for each flag, before wrapping
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            flag = "/".join(action.option_strings) or action.dest
            assert action.help, f"deepdefense {name} {flag} has no help"
            if action.option_strings and action.default not in (None, argparse.SUPPRESS, True, False):
                shown = formatter._expand_help(action)
                assert "default" in shown, f"deepdefense {name} {flag} does not show its default"


def test_every_command_names_its_checkpoint_with_the_flag() -> None:
    for name, parser in commands().items():
        positional = [a.dest for a in parser._actions if not a.option_strings and a.dest != "help"]
        assert "checkpoint" not in positional, f"deepdefense {name} takes its checkpoint positionally"
    args = build_parser().parse_args(["sensitivity", "--checkpoint", "lenet-fashionmnist"])
    assert args.checkpoint == "lenet-fashionmnist"
    assert build_parser().parse_args(["sensitivity"]).checkpoint == "lenet-mnist"


def test_load_reports_progress_while_it_runs(
    tmp_path: Path, defense: NoDefense, capsys: pytest.CaptureFixture[str]
) -> None:
    with in_thread(create_app(make_settings(tmp_path), defense)) as url:
        config = LoadConfig(url=url, clients=2, duration_s=2.5, timeout_s=30, progress_every_s=1.0, explain=False)
        report = asyncio.run(run_load(config))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("load: ")]
    assert 1 <= len(lines) <= 2, lines  # every second until the end, not after it
    assert lines[0].startswith("load: 1/2.5 s, ") and " served (" in lines[0] and lines[0].endswith("errors: none")
    assert report.served > 0
    with pytest.raises(ValueError, match="progress_every_s"):
        LoadConfig(url=url, progress_every_s=-1)


def test_results_files_say_which_commit_measured_them_and_when(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    assert flags.print_report({"command": "deepdefense x", "figure": 1.0}, str(out)) == 0
    measured = json.loads(out.read_text())["measured"]
    assert re.fullmatch(r"[0-9a-f]{7,}", measured["commit"]) and isinstance(measured["dirty"], bool)
    assert (
        measured["commit"]
        == subprocess.run(
            ["git", "rev-parse", "--short=7", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    )
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", measured["date"])


def test_eval_flags_are_made_from_its_config() -> None:
    """Every field of ``EvalConfig`` (and of its training recipe) is a flag of ``deepdefense eval`` whose help is
    the field's description, and a command line parses into the config it spells."""
    from dataclasses import fields

    from deepdefense.clients.attack_model import TrainingRecipe
    from deepdefense.commands.eval import config_from_args
    from deepdefense.measure.evaluate import EvalConfig

    parser = commands()["eval"]
    actions = {a.dest: a for a in parser._actions}
    shared = {
        "data_root": "data_root",
        "engine_options": "engine",
        "device": "device",
        "defense_device": "defense_device",
    }
    for f in [*fields(EvalConfig), *fields(TrainingRecipe)]:
        if f.name == "recipe":
            continue
        action = actions[shared.get(f.name, f.name)]
        if f.name not in shared:
            assert action.help == f.metadata["help"].replace("%", "%%"), f.name
    argv = ["eval", "--out", "o", "--defenses", "none", "pp", "--gated", "--cs", "--budgets", "10", "20"]
    argv += ["--losses", "labels", "--lambda", "0.5", "--optimizer", "sgd", "--jbda-epochs", "3", "--test-n", "7"]
    argv += ["--set", "steps=5", "--only-cached", "--device", "cpu", "--data-root", "d"]
    config = config_from_args(build_parser().parse_args(argv))
    assert config == EvalConfig(
        defenses=("none", "pp"),
        gated=(),
        cs=(),
        budgets=(10, 20),
        losses=("labels",),
        recipe=TrainingRecipe(lam=0.5, optimizer="sgd"),
        jbda_epochs=3,
        test_n=7,
        engine_options={"steps": 5},
        only_cached=True,
        device="cpu",
        data_root="d",
    )
    with pytest.raises(SystemExit):  # choices come from the field's Literal type
        build_parser().parse_args(["eval", "--out", "o", "--query-sets", "nowhere"])


class _Given(Exception):
    """Raised by a fitting pipeline's stand-in with the config the command handed it."""


@pytest.mark.parametrize(
    "name, function, argv, expected",
    [
        (
            "warmstart",
            "warm_start.fit_warm_start",
            [
                "--checkpoint",
                "c",
                "--n",
                "64",
                "--rank",
                "4",
                "--serve-steps",
                "12",
                "--set",
                "steps=10",
                "--save",
                "s",
            ],
            WarmStartConfig(checkpoint="c", n=64, rank=4, serve_steps=12, save="s", engine_options={"steps": 10}),
        ),
        (
            "misinfo",
            "misinformation.fit_misinformation_model",
            ["--checkpoint", "c", "--epochs", "1", "--balance", "0", "--max-shift", "0"],
            MisinfoConfig(checkpoint="c", epochs=1, balance=0.0, max_shift=0),
        ),
        (
            "edm",
            "edm.fit_edm",
            ["--members", "3", "--lambda-d", "0.25", "--kinds", "uniform_noise", "strong_warp", "--train-images", "9"],
            EDMConfig(members=3, lambda_d=0.25, kinds=("uniform_noise", "strong_warp"), train_images=9),
        ),
    ],
)
def test_the_fitting_commands_hand_their_pipeline_the_config_their_flags_spell(
    monkeypatch: pytest.MonkeyPatch, name: str, function: str, argv: list[str], expected: object
) -> None:
    """``warmstart``, ``misinfo`` and ``edm`` make their flags from their config's fields: a command line reaches
    the one pipeline it calls as the config it spells (the shared flags as the other commands read them)."""
    module, attribute = function.split(".")

    def stand_in(cfg: object, *measure: object) -> None:
        raise _Given(cfg)

    monkeypatch.setattr(f"deepdefense.defense.fitting.{module}.{attribute}", stand_in)
    line = [name, *argv, "--data-root", "d", "--device", "cpu", "--quiet"]
    with pytest.raises(_Given) as given:
        main(line)
    command = shlex.join(["deepdefense", *line])
    assert given.value.args[0] == replace(expected, data_root="d", progress=False, command=command)  # type: ignore[type-var]


@dataclass(frozen=True)
class Config:
    mode: Literal["a", "b"] = described("a", help="the mode")
    sizes: tuple[int, ...] = described((1, 2), help="sizes", nargs="*")
    limit: int | None = described(None, help="a limit (default: none)")
    on: bool = described(False, help="switch it on")
    rate: float = described(0.5, help="keeps p% of it", flag="--keep")


def test_flags_of_a_dataclass_follow_its_field_types() -> None:
    parser = argparse.ArgumentParser(formatter_class=flags.HelpFormatter)
    flags.add_fields(parser, Config)
    assert flags.from_fields(Config, parser.parse_args([])) == Config()
    args = parser.parse_args(["--mode", "b", "--sizes", "--limit", "3", "--on", "--keep", "0.25"])
    assert flags.from_fields(Config, args) == Config("b", (), 3, True, 0.25)
    assert flags.from_fields(Config, args, limit=9).limit == 9
    with pytest.raises(SystemExit):
        parser.parse_args(["--mode", "c"])
    assert "keeps p% of it (default: 0.5)" in parser.format_help()


def test_one_description_of_the_machine() -> None:
    """Records and caches key on the short form (``deepdefense eval``'s cached runtimes: it must not change);
    the long form adds the processor and the versions (``deepdefense bench``)."""
    import os
    import platform

    import torch

    from deepdefense.common.provenance import machine

    m = machine("cpu")
    assert (
        str(m) == f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    )
    assert m.accelerator is None and str(m) in m.describe() and f"torch {torch.__version__}" in m.describe()
    assert f"CPU {m.cpu}" in m.describe() and m.cpu


def test_one_output_convention() -> None:
    """``--out`` is where a command's record goes: a JSON file, or for eval and prepare (many files) a folder;
    ``--report`` the Markdown beside it; what a command makes for the server is ``--save``; no ``--json``."""
    folders = {"eval", "prepare"}
    for name, parser in [*commands().items(), ("ownership verify", _subcommand(commands()["ownership"], "verify"))]:
        options = {o: a for a in parser._actions for o in a.option_strings}
        assert "--json" not in options, name
        if "--out" in options:
            assert options["--out"].metavar == ("FOLDER" if name in folders else "FILE"), name
        if "--save" in options:
            assert options["--save"].metavar == "STEM", name
    for argv, paths in (
        (["--report", "r/x.md"], (Path("r/x.json"), Path("r/x.md"))),
        (["--out", "o/y.json"], (Path("o/y.json"), Path("o/y.md"))),
        (["--out", "o/y.json", "--report", "r/x.md"], (Path("o/y.json"), Path("r/x.md"))),
        ([], (None, None)),
    ):
        assert flags.out_paths(build_parser().parse_args(["formats", *argv])) == paths
    assert flags.out_paths(build_parser().parse_args(["fidelity", "--out", "f.json"])) == (Path("f.json"), None)


def _subcommand(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def test_key_value_options_read_values_as_json_when_they_parse() -> None:
    """One reader for ``--set``/``--previous`` and ``DD_ENGINE__*`` (``server/settings.py``)."""
    from deepdefense.common.options import key_values

    options = key_values(["steps=30", " lr =0.05", "warm_start=false", "conv_impl=unfold", "note=a=b", "empty="])
    assert options == {"steps": 30, "lr": 0.05, "warm_start": False, "conv_impl": "unfold", "note": "a=b", "empty": ""}
    for bad in ("steps", "=3"):
        with pytest.raises(ValueError, match="--previous expects KEY=VALUE"):
            key_values([bad], "--previous")
    assert flags.engine_options(["top_k=[1, 3]"]) == {"top_k": [1, 3]}
