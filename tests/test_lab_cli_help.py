"""Every subcommand's ``--help`` as a user reads it at 80 columns: no line wider, every
flag explained, and no words of the project's own process in it."""

from __future__ import annotations

import re

import pytest

from dmarw.cli import build_parser

COMMANDS = ["tour", "demo", "reproduce", "bench", "workload", "migrate", "incoming", "serve", "info", "guest",
            "attach"]
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
        sub = next(a for a in parser._subparsers._group_actions if a.dest == "command").choices[command]  # type: ignore[union-attr]
        for action in sub._actions:
            assert action.help, f"{command}: {action.option_strings or action.dest} has no help"
