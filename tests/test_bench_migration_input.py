"""The migration benches refuse a user's mistake in one line (usage error, exit 2), before
any work and without a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dmarw.migration.guest_cli import kvm_unusable

BENCH = Path(__file__).resolve().parent.parent / "bench"


def run(script: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(BENCH / script), *argv], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("script", "argv", "msg"), [
    ("migration_throughput.py", ["--trials", "0"], "--trials 0: 1..20"),
    ("migration_throughput.py", ["--json", "/nonexistent-dir/x.json"], "its folder does not exist"),
    ("migration_modes.py", ["--modes", "bogus"], "choose from"),
])
def test_bad_arguments_are_one_line(script: str, argv: list[str], msg: str) -> None:
    p = run(script, *argv)
    assert p.returncode == 2 and msg in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert p.stdout == ""


@pytest.mark.kvm
@pytest.mark.parametrize("script", ["migration_throughput.py", "migration_modes.py"])
def test_a_guest_too_large_is_one_line(script: str) -> None:
    why = kvm_unusable()
    if why:
        pytest.skip(f"the size is checked after KVM: {why}")
    p = run(script, "--ram", "5G")
    assert p.returncode == 2 and "--ram 0x140000000" in p.stderr and "Traceback" not in p.stderr, p.stderr
