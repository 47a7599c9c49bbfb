"""A running guest migrated over TCP on 127.0.0.1 to ``dmarw incoming`` in its own process:
verified both ways; a wrong key refused before any RAM; the destination killed mid-stream
cancels the migration, the source guest runs on to the unmigrated run's checksum, and a
second attempt then succeeds.  Every wait is bounded."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from dmarw.migration.guest import SourceMachine, reference_checksum
from dmarw.migration.running import (
    GuestConfig,
    attempt_guest,
    open_destination,
    run_guest_migration,
)
from dmarw.migration.source import MigrationFailed, Source
from incoming_proc import Incoming

KEY = b"0123456789abcdef-shared-key"
RAM = 64 << 20
COMMANDS = 2500  # long enough to be mid-run after a TCP plain copy and a busy machine
WAIT = 90.0



def incoming(key_file: Path) -> Incoming:
    return Incoming(key_file, timeout=60, wait=WAIT)


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    p = tmp_path / "key"
    p.write_bytes(KEY)
    return p


def cfg(to: str, **kw: object) -> GuestConfig:
    base: dict[str, object] = {"ram": RAM, "seed": 11, "commands": COMMANDS, "plain_copy": False, "to": to,
                               "key": KEY, "timeout": 60.0, "guest_timeout": 15.0}
    base.update(kw)
    return GuestConfig(**base)  # type: ignore[arg-type]


def test_running_guest_over_tcp_verifies_both_ways(key_file: Path) -> None:
    inc = incoming(key_file)
    o = run_guest_migration(cfg(inc.addr, plain_copy=True))
    rc, err = inc.finish()
    assert rc == 0, err
    assert o.pages_ok and o.checksum_ok, (o.differing[:4], o.checksum, o.reference)
    assert 0 < o.commands_at_stop < COMMANDS
    assert o.plain is not None and o.plain.bytes == RAM
    assert "source authenticated" in err and "guest resumed and ran to its end" in err


def test_running_guest_wrong_key_is_refused(key_file: Path) -> None:
    inc = incoming(key_file)
    with pytest.raises(MigrationFailed, match="does not hold the shared key"):
        run_guest_migration(cfg(inc.addr, key=b"another key, 16+ bytes"), reference=0)
    rc, err = inc.finish()
    assert rc == 3 and "refused" in err and "guest VM ready" not in err


def test_destination_killed_mid_stream_the_guest_runs_on_and_a_second_attempt_succeeds(key_file: Path) -> None:
    c = cfg("")
    spec = c.spec()
    ref = reference_checksum(spec)
    sm = SourceMachine(spec)
    try:
        src = Source(sm.vm, sm.container, threshold=c.threshold, max_rounds=c.max_rounds)
        inc = incoming(key_file)
        c.to = inc.addr
        conn = open_destination(c, src, spec)  # its VM built before the guest starts
        sm.start()
        frames = [0]

        def kill(_n: int, _pages: int) -> None:
            frames[0] += 1
            if frames[0] == 8:
                os.kill(inc.proc.pid, signal.SIGKILL)

        with pytest.raises(MigrationFailed, match="destination lost, migration cancelled"):
            attempt_guest(sm, src, c, conn, on_sent=kill)
        assert inc.finish()[0] == -signal.SIGKILL
        assert sm.running and sm.m.port.result.checksum is None  # mid-run, and not stopped by the failure
        inc2 = incoming(key_file)
        c.to = inc2.addr
        o = attempt_guest(sm, src, c)
        rc, err = inc2.finish()
        assert rc == 0, err
        o.reference = ref
        assert o.pages_ok and o.checksum_ok, (o.differing[:4], o.checksum, ref)
    finally:
        sm.close()


def test_destination_killed_the_source_guest_finishes_unharmed(key_file: Path) -> None:
    c = cfg("")
    spec = c.spec()
    ref = reference_checksum(spec)
    sm = SourceMachine(spec)
    try:
        src = Source(sm.vm, sm.container)
        inc = incoming(key_file)
        c.to = inc.addr
        conn = open_destination(c, src, spec)
        sm.start()

        def kill_in_final(_rnd: int, _pages: int) -> None:
            if not sm.running and sm.outcome != "hlt":  # the guest is paused: the final round
                os.kill(inc.proc.pid, signal.SIGKILL)
                inc.proc.wait(WAIT)

        with pytest.raises(MigrationFailed):
            attempt_guest(sm, src, c, conn, on_round_start=kill_in_final)
        inc.finish()
        assert sm.m.port.result.checksum is None  # it was stopped mid-run, then resumed
        assert sm.finish(WAIT) == ref  # resumed after the failed switchover, it ends as unmigrated
    finally:
        sm.close()
