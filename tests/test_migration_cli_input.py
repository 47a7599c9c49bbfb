"""``dmarw migrate`` / ``dmarw incoming`` bad numbers as a careless user types them: each is
one line on stderr, no traceback, a non-zero exit, refused before any RAM is set up."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

FAST = 15.0  # seconds: an interpreter start and the checks, never a migration


def dmarw(*args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "dmarw", *args], capture_output=True, text=True, timeout=60)
    return p, time.monotonic() - t0


@pytest.fixture
def key(tmp_path: Path) -> str:
    k = tmp_path / "key"
    k.write_bytes(b"k" * 32)
    return str(k)


@pytest.mark.parametrize("value", ["nan", "inf", "1e300", "-1", "0"])
@pytest.mark.parametrize("command", ["migrate", "incoming"])
def test_timeout_must_be_finite_and_positive(command: str, value: str, key: str) -> None:
    where = ["--to", "127.0.0.1:1"] if command == "migrate" else ["--listen", "127.0.0.1:0"]
    p, took = dmarw(command, *where, "--key-file", key, "--timeout", value)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert lines[0].startswith("dmarw: error: argument --timeout:") and "seconds" in lines[0]
    assert "listening" not in p.stderr and took < FAST


@pytest.mark.parametrize("flag", ["--vcpu-rate", "--dma-rate"])
@pytest.mark.parametrize("value", ["nan", "1e300", "-1"])
def test_write_rates_are_bounded(flag: str, value: str) -> None:
    p, took = dmarw("migrate", "--replay", "--ram", "16M", flag, value)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"dmarw: error: argument {flag}:"), p.stderr
    assert p.stdout == "" and took < FAST


@pytest.mark.parametrize("mode", ["--replay", "--guest"])
def test_huge_ops_is_refused_before_generating(mode: str) -> None:
    # it was a MemoryError traceback after seconds of generating records
    p, took = dmarw("migrate", mode, "--ops", str(10**12))
    lines = p.stderr.strip().splitlines()
    if mode == "--guest" and "needs KVM" in p.stderr:
        pytest.skip(f"--guest refused first: {p.stderr.strip()}")
    assert p.returncode == 1 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert "--ops 1,000,000,000,000 is more than 40,000,000" in lines[0]
    assert p.stdout == "" and took < FAST
