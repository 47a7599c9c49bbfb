"""``dmarw guest`` refuses an output it cannot write before the guest runs: one line on
stderr, no traceback, nothing printed on stdout (no run happened)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from terminal import sigint_default


@pytest.mark.parametrize("where", ["missing/out.json", "."])
def test_unwritable_json_is_refused_before_the_run(tmp_path: Path, where: str) -> None:
    p = subprocess.run([sys.executable, "-m", "dmarw", "guest", "--json", str(tmp_path / where)],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1 and lines[0].startswith("dmarw: error: --json "), p.stderr
    assert p.stdout == "" and "Traceback" not in p.stderr
    assert list(tmp_path.iterdir()) == []


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@pytest.mark.guest_kvm
@pytest.mark.parametrize(("sig", "code", "word"), [(signal.SIGINT, 130, "interrupted"),
                                                   (signal.SIGTERM, 143, "terminated")], ids=["ctrl-c", "sigterm"])
def test_a_signal_during_the_guest_capture_ends_every_guest(sig: int, code: int, word: str) -> None:
    # the signal goes to dmarw alone (kill PID), not its process group: the guest processes
    # must be ended by dmarw itself (they were left running and dmarw waited for them)
    cmd = [sys.executable, "-m", "dmarw", "reproduce", "--guest", "--guest-commands", "2000000", "--vms", "2",
           "--paths", "kvm", "--no-sweep", "--rounds", "4"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=sigint_default)
    kids: list[int] = []
    deadline = time.monotonic() + 60
    while len(kids) < 2 and time.monotonic() < deadline and proc.poll() is None:  # both guests started
        kids = _children(proc.pid)
        try:  # a wait on the process itself, not a sleep
            proc.wait(timeout=0.05)
        except subprocess.TimeoutExpired:
            pass
    assert len(kids) >= 2, "the guest processes did not start"
    proc.send_signal(sig)
    try:
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        for k in kids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(k, signal.SIGKILL)
    assert proc.returncode == code and err.strip() == f"dmarw: {word}", (proc.returncode, err)
    for k in kids:  # gone, or at most a zombie about to be reaped
        assert not Path(f"/proc/{k}").exists() or "Z" in Path(f"/proc/{k}/stat").read_text().split()[2]


def test_reproduce_guest_refuses_more_commands_than_memory_holds() -> None:
    # every guest's accesses are recorded in memory at once: 10M commands on 16 VMs was ~50 GB
    p = subprocess.run([sys.executable, "-m", "dmarw", "reproduce", "--guest", "--guest-commands", "10000000",
                        "--vms", "1,16"], capture_output=True, text=True, timeout=60)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1, p.stderr
    assert "--guest-commands 10,000,000 on 16 VMs is 160,000,000 commands; at most 16,000,000" in lines[0]
    assert p.stdout == ""
