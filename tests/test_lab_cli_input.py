"""Trace files a careless user passes to ``dmarw bench/reproduce --trace``: a device with
no newlines (``/dev/zero``) and a huge line are refused from the first bounded read, one
line on stderr, before any memory is spent on them."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import pytest


def _limit_memory() -> None:  # in the child: a read of the whole of /dev/zero fails, not the machine
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))


def dmarw(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dmarw", *args], capture_output=True, text=True, timeout=60,
                          preexec_fn=_limit_memory)


@pytest.mark.parametrize("command", ["bench", "reproduce"])
def test_trace_from_a_device_without_newlines_is_refused_at_once(command: str) -> None:
    p = dmarw(command, "--trace", "/dev/zero", "--ops", "1000")
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert lines[0].startswith("dmarw: error: ") and "/dev/zero:1: binary content" in lines[0]
    assert p.stdout == ""


def test_trace_with_a_huge_line_is_refused(tmp_path: Path) -> None:
    t = tmp_path / "t.trace"
    t.write_bytes(b"dmarw-trace 1\n" + b"w" * (1 << 20))
    p = dmarw("bench", "--trace", str(t))
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1, p.stderr
    assert f"{t}:2: a line longer than 65,536 bytes" in lines[0]


@pytest.mark.parametrize(("argv", "needle"), [
    (["migrate", "--ops", "0"], "--ops 0 must be >= 1"),
    (["incoming", "--listen", "nowhere", "--key-file", "/nonexistent/key"], "--key-file /nonexistent/key"),
    (["attach", "/nonexistent.sock"], "/nonexistent.sock: No such file"),
    (["serve", "--device", "sample", "/nonexistent/dir/s.sock"], "/nonexistent/dir/s.sock"),
])
def test_an_error_names_the_program_once(argv: list[str], needle: str) -> None:
    p = dmarw(*argv)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1 and needle in lines[0], p.stderr
    assert lines[0].startswith("dmarw: error: ") and lines[0].count("dmarw") == 1, lines[0]


@pytest.mark.parametrize("argv", [["bench", "--ops", "1000", "--no-baseline"],
                                  ["reproduce", "--ops", "1000", "--rounds", "4", "--vms", "1", "--no-sweep",
                                   "--paths", "kvm"],
                                  ["migrate", "--replay", "--ram", "16M", "--ops", "100"]])
def test_a_run_into_a_pipe_leaves_stderr_empty(argv: list[str]) -> None:
    # the transient progress bar, with no terminal to draw on, left a blank line on stderr
    # (so a failure after it was two lines)
    p = dmarw(*argv)
    assert p.returncode == 0 and p.stderr == "", p.stderr


@pytest.mark.parametrize(("value", "code", "needle"), [
    ("5", 2, "argument --ram-size: must be a multiple of 4096, at least 64 KiB"),
    ("0x1000", 2, "argument --ram-size: must be a multiple of 4096, at least 64 KiB"),
    ("0x10000000000", 1, "--ram-size 0x10000000000 is more than this machine can give"),
])
def test_workload_ram_size_is_checked_as_the_flag(tmp_path: Path, value: str, code: int, needle: str) -> None:
    p = dmarw("workload", "--ops", "10", "--ram-size", value, "-o", str(tmp_path / "w.trace"))
    lines = p.stderr.strip().splitlines()
    assert p.returncode == code and len(lines) == 1 and needle in lines[0], p.stderr
    assert not (tmp_path / "w.trace").exists()
