"""The running guest migrated with its GPU-like device in its own process: ``dmarw serve
--device gpu --once`` on each side, attached with ``RemoteDevice``; the device's writes
reach the dirty set only through the server's DMA-logging report, its state moves as
STOP_COPY data read and written with MIG_DATA.  Verified as the in-process migration is
(every page at switchover; the destination's checksum against an unmigrated run).  The
negative control leaves the server's report out (``no_vfio_log``): pages must differ.

64 MiB, 2500 commands, three seeds; each run a few seconds.  Pre-copy begins only once the
guest's device has done some commands (a busy machine may otherwise reach the switchover
before the guest's first doorbell, and a control that loses nothing proves nothing).  Every temporary socket lives
under the test's own directory, so a leftover server or socket is found by its path.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dmarw.migration.guest import SourceMachine
from dmarw.migration.running import GuestConfig, GuestOutcome, run_guest_migration

pytestmark = pytest.mark.timeout(180)

RAM = 64 << 20
COMMANDS = 2500
STARTED = 32  # device commands done before pre-copy begins
SEEDS = range(3)
_reference: dict[int, int] = {}


@pytest.fixture
def own_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Temporary directories (the servers' sockets) under ``tmp_path``, in this process and
    the forked destination alike; afterwards none is left and no process names one.  The
    source guest, once started, is waited for until its device has done ``STARTED`` commands."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    start = SourceMachine.start

    def started(self: SourceMachine) -> None:
        start(self)
        deadline = time.monotonic() + 30.0
        while self.m.device.regs.commands < STARTED and self.running:
            assert time.monotonic() < deadline, "the guest's device did no command within 30 s"
            time.sleep(0.001)  # polling the device's progress

    monkeypatch.setattr(SourceMachine, "start", started)
    yield tmp_path
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("dmarw-gpu-")] == [], "a socket is left"
    assert _processes_naming(str(tmp_path)) == [], "a server process is left"


def _processes_naming(text: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            found.append(f"{pid}: {cmd}")
    return found


def migrate(seed: int, **kw: object) -> GuestOutcome:
    cfg = GuestConfig(ram=RAM, seed=seed, commands=COMMANDS, plain_copy=False, timeout=60.0, guest_timeout=15.0,
                      device_process=True, **kw)  # type: ignore[arg-type]
    o = run_guest_migration(cfg, reference=_reference.get(seed))
    _reference[seed] = o.reference
    return o


@pytest.mark.parametrize("seed", SEEDS)
def test_guest_with_device_process_migrates_and_verifies_both_ways(seed: int, own_tmp: Path) -> None:
    o = migrate(seed)
    r = o.report
    assert r.rounds[0].sent == RAM >> 12 and r.rounds[-1].final
    assert 0 < o.commands_at_stop < COMMANDS, o.commands_at_stop  # the guest was mid-run
    # the device's writes came only from the server's report (nothing wrote through this
    # process's container or user-space log)
    assert sum(st.vfio for st in r.rounds[1:]) > 0 and sum(st.user for st in r.rounds) == 0
    assert o.pages_ok, [hex(g) for g in o.differing[:8]]
    assert o.checksum == o.reference and o.ok
    assert o.stat["commands"] == COMMANDS


@pytest.mark.parametrize("seed", SEEDS)
def test_ignoring_the_servers_report_fails_page_verification(seed: int, own_tmp: Path) -> None:
    o = migrate(seed, no_vfio_log=True)
    assert sum(st.vfio for st in o.report.rounds) == 0
    assert not o.pages_ok and o.differing, "without the server's report no page was lost"
    assert all(g % 4096 == 0 and 0 <= g < RAM for g in o.differing)
    assert not o.ok and o.checksum != o.reference


def _dmarw(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dmarw", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("other", [["--replay"], ["--device-bypass"]])
def test_device_process_refused_with_other_modes_in_one_line(other: list[str]) -> None:
    p = _dmarw("migrate", "--ram", "16M", "--device-process", *other)
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert "--device-process" in lines[0] and p.stdout == ""


def test_cli_verifies_both_ways(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "dmarw", "migrate", "--guest", "--device-process", "--ram", "64M",
                        "--commands", str(COMMANDS), "--seed", "1", "--no-progress"],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert p.returncode == 0, p.stdout + p.stderr
    assert "device in its own process" in p.stdout
    assert "verification: OK, 16384 pages identical" in p.stdout
    assert "matches the unmigrated run" in p.stdout
    assert list(tmp_path.iterdir()) == [] and _processes_naming(str(tmp_path)) == []
