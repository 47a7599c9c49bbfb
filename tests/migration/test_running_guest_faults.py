"""Faults around a running guest's migration over TCP, with ``dmarw incoming`` in its own
process: the source killed mid-stream (the destination, whose guest VM was built, says so,
exits non-zero and resumes nothing), and a destination that cannot be reached while the
guest runs (the attempt is cancelled, the guest runs on, and a second attempt succeeds).
Every wait is bounded."""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
from pathlib import Path

import pytest

from dmarw.migration.guest import SourceMachine, reference_checksum
from dmarw.migration.running import GuestConfig, attempt_guest, open_destination
from dmarw.migration.source import MigrationFailed, Source
from incoming_proc import Incoming

KEY = b"0123456789abcdef-faults-key"
WAIT = 90.0


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    p = tmp_path / "key"
    p.write_bytes(KEY)
    return p


def config(to: str) -> GuestConfig:
    return GuestConfig(ram=64 << 20, seed=7, commands=2500, plain_copy=False, to=to, key=KEY, timeout=60.0,
                       guest_timeout=15.0)


def _source_that_dies(to: str, after_frames: int) -> None:
    """A source process: the guest runs, pre-copy starts, and after ``after_frames`` frames
    the process is killed (no goodbye: the socket just closes)."""
    c = config(to)
    spec = c.spec()
    sm = SourceMachine(spec)
    src = Source(sm.vm, sm.container)
    conn = open_destination(c, src, spec)
    sm.start()
    sent = [0]

    def die(_bytes: int, _pages: int) -> None:
        sent[0] += 1
        if sent[0] == after_frames:
            os.kill(os.getpid(), signal.SIGKILL)

    attempt_guest(sm, src, c, conn, on_sent=die)
    os._exit(1)  # the migration ended before the kill: the test fails on the exit code


def test_source_killed_mid_stream_the_destination_resumes_nothing(key_file: Path) -> None:
    inc = Incoming(key_file, timeout=60, wait=WAIT)
    p = multiprocessing.get_context("fork").Process(target=_source_that_dies, args=(inc.addr, 3))
    p.start()
    p.join(WAIT)
    if p.is_alive():
        p.kill()
        p.join()
    rc, err = inc.finish()
    assert p.exitcode == -signal.SIGKILL, p.exitcode
    assert "guest VM ready" in err, err  # it had a guest to resume ...
    assert rc == 3 and "nothing resumed" in err and "truncated" in err, (rc, err)
    assert "guest resumed" not in err and "stream complete" not in err  # ... and resumed nothing


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_destination_the_running_guest_runs_on_and_a_second_attempt_succeeds(key_file: Path) -> None:
    c = config("")
    spec = c.spec()
    ref = reference_checksum(spec)
    sm = SourceMachine(spec)
    try:
        src = Source(sm.vm, sm.container, threshold=c.threshold, max_rounds=c.max_rounds)
        inc = Incoming(key_file, timeout=60, wait=WAIT)  # forked before the guest's threads
        sm.start()
        sm.wait_under_way(4)
        c.to = f"127.0.0.1:{_closed_port()}"
        with pytest.raises(MigrationFailed, match="unreachable"):
            attempt_guest(sm, src, c)
        assert sm.running and sm.m.port.result.checksum is None  # mid-run, untouched by the failure
        c.to = inc.addr
        o = attempt_guest(sm, src, c)
        rc, err = inc.finish()
        assert rc == 0, err
        o.reference = ref
        assert o.pages_ok and o.checksum_ok, (o.differing[:4], o.checksum, ref)
    finally:
        sm.close()
