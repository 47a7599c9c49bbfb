"""``dmarw``'s exit codes: one meaning each, so that a script can tell a usage mistake (2)
from a migration that was refused or cancelled (3) or one whose verification failed (1);
and the ``--help`` of the commands that end in them says which is which."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from dmarw import exitcodes
from dmarw.cli import build_parser

CODES = {"OK": 0, "FAILED": 1, "USAGE": 2, "MIGRATION_FAILED": 3, "INTERRUPTED": 130, "TERMINATED": 143}


def test_each_exit_code_has_one_meaning() -> None:
    assert {name: getattr(exitcodes, name) for name in CODES} == CODES
    assert len(set(CODES.values())) == len(CODES)


@pytest.mark.parametrize("command", [None, "migrate", "incoming"])
def test_help_lists_every_exit_code(command: str | None, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([command, "--help"] if command else ["--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    status = out[out.index("exit status:"):]
    found = [int(n) for n in re.findall(r"(?:^|[:;] )(\d+) ", status)]
    assert found == sorted(CODES.values()), status
    assert "2 usage error" in status and "3 migration refused or cancelled" in status


def test_a_usage_error_is_not_a_refused_migration() -> None:
    # both were exit 2: argparse's usage error and "migration failed"
    p = subprocess.run([sys.executable, "-m", "dmarw", "migrate", "--replay", "--no-such-flag"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == exitcodes.USAGE and "Traceback" not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
