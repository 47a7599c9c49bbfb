"""The running guest migrated with its GPU-like device in its own process: ``dmarw serve
--device gpu --once`` on each side, attached with ``RemoteDevice``; the device's writes
reach the dirty set only through the server's DMA-logging report, its state moves as
STOP_COPY data read and written with MIG_DATA.  Verified as the in-process migration is
(every page at switchover; the destination's checksum against an unmigrated run).  The
negative control leaves the server's report out (``no_vfio_log``): pages must differ.
The same from the command line, between two processes and over TCP to ``dmarw incoming``
(which starts its own device server), and that one's control.

64 MiB, 2500 commands, three seeds; each run a few seconds.  Pre-copy begins only once the
guest's device has done some commands (a busy machine may otherwise reach the switchover
before the guest's first doorbell, and a control that loses nothing proves nothing).  Every temporary socket lives
under the test's own directory, so a leftover server or socket is found by its path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from guest_runs import KEY, assert_control_failed, assert_verified_both_ways, migrate

from dmarw.migration.guest import SourceMachine
from incoming_proc import Incoming

pytestmark = pytest.mark.timeout(180)

RAM = 64 << 20
COMMANDS = 2500
STARTED = 32  # device commands done before pre-copy begins
SEEDS = range(3)


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


@pytest.mark.parametrize("seed", SEEDS)
def test_guest_with_device_process_migrates_and_verifies_both_ways(seed: int, own_tmp: Path) -> None:
    o = migrate(seed, COMMANDS, device_process=True)
    assert_verified_both_ways(o)
    # the device's writes came only from the server's report (nothing wrote through this
    # process's container or user-space log)
    assert sum(st.user for st in o.report.rounds) == 0


@pytest.mark.parametrize("seed", SEEDS)
def test_ignoring_the_servers_report_fails_page_verification(seed: int, own_tmp: Path) -> None:
    assert_control_failed(migrate(seed, COMMANDS, device_process=True, no_vfio_log=True), "no_vfio_log")


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


def test_cli_over_tcp_to_incoming_verifies_both_ways(incoming: Callable[..., Incoming], key_file: Path,
                                                     tmp_path: Path) -> None:
    """``dmarw migrate --guest --device-process --to`` a ``dmarw incoming``: each side has its
    device server, both servers' sockets under ``tmp_path``; none is left afterwards."""
    env = {"TMPDIR": str(tmp_path)}
    inc = incoming(**env)
    out = tmp_path / "migrate.json"
    p = subprocess.run([sys.executable, "-m", "dmarw", "migrate", "--guest", "--device-process", "--to", inc.addr,
                        "--key-file", str(key_file), "--ram", "64M", "--commands", str(COMMANDS), "--seed", "1",
                        "--no-progress", "--json", str(out)],
                       capture_output=True, text=True, timeout=120, env={**os.environ, **env})
    rc, err = inc.finish()
    assert p.returncode == 0 and rc == 0, p.stdout + p.stderr + err
    assert "source authenticated" in err and "guest VM ready" in err and "stream complete" in err, err
    o = json.loads(out.read_text())
    rounds = o["report"]["rounds"]
    assert 0 < o["commands_at_stop"] < COMMANDS, o["commands_at_stop"]
    assert sum(r["vfio"] for r in rounds[1:]) > 0 and sum(r["user"] for r in rounds) == 0
    assert o["pages_ok"] and o["differing_gpas"] == [], o["differing_gpas"][:8]
    assert o["checksum_ok"] and o["checksum"] == o["reference_checksum"] and o["destination"]["commands"] == COMMANDS
    assert f"to {inc.addr}; device in its own process (vfio-user)" in p.stdout
    assert "verification: OK, 16384 pages identical" in p.stdout and "matches the unmigrated run" in p.stdout
    assert f"guest resumed and ran to its end: checksum {o['reference_checksum']:#018x}" in err, err
    assert [q.name for q in tmp_path.iterdir() if q.name.startswith("dmarw-gpu-")] == [], "a socket is left"
    assert _processes_naming(str(tmp_path)) == [], "a server process is left"


def test_over_tcp_without_the_servers_report_fails_page_verification(incoming: Callable[..., Incoming],
                                                                     own_tmp: Path) -> None:
    """The control of the test above, through the API: the command line has no bound on
    the destination guest's run but its default (four times the unmigrated run plus 10 s),
    and a guest that lost pages may loop until then."""
    inc = incoming(TMPDIR=str(own_tmp))
    o = migrate(1, COMMANDS, device_process=True, no_vfio_log=True, to=inc.addr, key=KEY)
    rc, err = inc.finish()
    assert rc == 0 and "guest VM ready" in err and "stream complete" in err, err
    assert_control_failed(o, "no_vfio_log")
