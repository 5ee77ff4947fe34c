"""The command line itself: every flag of every command has help and shows its default, the checkpoint is
named one way (``--checkpoint``) by every command that takes one, and ``load`` reports progress as it runs."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
from pathlib import Path

import pytest
from support.settings import make_settings

from clients.load import LoadConfig, run_load
from deepdefense import flags
from deepdefense.cli import build_parser
from defense import NoDefense
from measure.launcher import in_thread
from server.app import create_app

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
