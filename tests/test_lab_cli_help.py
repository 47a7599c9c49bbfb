"""Every subcommand's ``--help`` as a user reads it at 80 columns: no line wider, every
flag explained, and no words of the project's own process in it."""

from __future__ import annotations

import argparse
import re

import pytest

from dmarw.cli import build_parser


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


COMMANDS = list(_subparsers(build_parser()))  # every registered subcommand, a new one too
PROCESS_WORDS = re.compile(r"\bissue\s*#?\d|\bthe seed\b|\bseed (thread|study|figures?)\b", re.IGNORECASE)


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_fits_80_columns_and_explains_every_flag(command: str | None, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    parser = build_parser()
    with pytest.raises(SystemExit) as e:
        parser.parse_args([command, "--help"] if command else ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    wide = [line for line in out.splitlines() if len(line) > 80]
    assert not wide, wide
    assert not PROCESS_WORDS.search(out), PROCESS_WORDS.search(out)
    assert "``" not in out, out  # reST markup of a docstring is not for the terminal
    if command:
        sub = _subparsers(parser)[command]
        for action in sub._actions:
            assert action.help, f"{command}: {action.option_strings or action.dest} has no help"


def test_every_subcommand_is_registered_here() -> None:
    assert {"tour", "demo", "reproduce", "bench", "workload", "migrate", "incoming", "serve", "info", "guest",
            "attach"} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_says_what_the_subcommand_does(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    # tour and demo printed only their usage and flags
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    paragraphs = [" ".join(p.split()) for p in out.split("\n\n")]
    assert paragraphs[0].startswith(f"usage: dmarw {command}"), paragraphs[0]
    said = paragraphs[1]  # argparse prints the description right after the usage
    assert not said.endswith(":") and not said.startswith(("options:", "positional arguments:")), out
    assert len(said.split()) >= 5 and said.endswith("."), said
