"""A running guest migrated over TCP on 127.0.0.1 to ``dmarw incoming`` in its own process
(one migration per process; the shared key from its ``--key-file``): 20 seeds verified
both ways; each negative control fails page verification for each of the 20 seeds (its checksum too, in most runs); a wrong key
refused before any RAM; the destination killed mid-stream cancels the migration, the
source guest runs on to the unmigrated run's checksum, and a second attempt then succeeds.
Every wait is bounded, and every ``incoming`` started is reaped when its test ends.

64 MiB, 2000 device commands: the first round over TCP takes a few times longer than over
the socketpair, and the guest must still be mid-run at the switchover on a busy machine (in
100 runs of 1600 commands on the shared 2-core machine it had done 208 to 672 commands
there, once 1232).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from guest_runs import (
    CONTROLS,
    KEY,
    RAM,
    SEEDS,
    assert_control_failed,
    assert_losses_reach_the_result,
    assert_verified_both_ways,
    migrate,
    reference,
)

from dmarw.migration.guest import SourceMachine
from dmarw.migration.running import GuestConfig, GuestOutcome, attempt_guest, open_destination
from dmarw.migration.source import MigrationFailed, Source
from incoming_proc import Incoming

COMMANDS = 2000
WAIT = 90.0

Start = Callable[..., Incoming]


def over_tcp(incoming: Start, seed: int, **flags: object) -> tuple[GuestOutcome, str]:
    """``seed`` migrated to a fresh ``dmarw incoming``, which then exits with 0 (the stream
    was complete, whatever its guest did next); the outcome and the destination's log."""
    inc = incoming()
    o = migrate(seed, COMMANDS, to=inc.addr, key=KEY, **flags)
    rc, err = inc.finish()
    assert rc == 0, err
    assert "source authenticated" in err and "stream complete" in err, err
    return o, err


@pytest.mark.parametrize("seed", SEEDS)
def test_running_guest_over_tcp_verifies_both_ways(incoming: Start, seed: int) -> None:
    o, err = over_tcp(incoming, seed, plain_copy=True, dirty=("bitmap", "clear", "ring")[seed % 3])
    assert_verified_both_ways(o)
    assert o.plain is not None and o.plain.bytes == RAM
    assert f"guest resumed and ran to its end: checksum {o.reference:#018x}" in err, err


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("control", CONTROLS)
def test_negative_controls_over_tcp_fail_verification_every_run(incoming: Start, control: str, seed: int) -> None:
    o, err = over_tcp(incoming, seed, **{control: True})
    assert_control_failed(o, control)
    if o.checksum is not None and o.checksum != o.reference:  # what incoming saw is what it reported
        assert f"checksum {o.checksum:#018x}" in err, err


def test_each_controls_loss_reaches_the_guest_result_in_most_runs() -> None:
    assert_losses_reach_the_result(CONTROLS)


def test_running_guest_wrong_key_is_refused(incoming: Start) -> None:
    inc = incoming()
    with pytest.raises(MigrationFailed, match="does not hold the shared key"):
        migrate(11, COMMANDS, to=inc.addr, key=b"another key, 16+ bytes")
    rc, err = inc.finish()
    assert rc == 3 and "refused" in err and "guest VM ready" not in err


def test_an_incoming_that_a_test_gave_up_on_is_killed_and_reaped(tmp_path: Path, key_file: Path) -> None:
    """What the fixture does for a failed test (its Incoming.close()), and a destination that
    did not start listening: neither is left running or unreaped."""
    before = set(_children())  # the next test's incoming may be among them
    inc = Incoming(key_file, timeout=60, wait=WAIT)
    assert inc.addr.startswith("127.0.0.1:")
    inc.close()
    assert inc.proc.returncode == -signal.SIGKILL and not os.path.exists(f"/proc/{inc.proc.pid}")
    with pytest.raises(AssertionError, match="No such file"):
        Incoming(tmp_path / "missing", timeout=60, wait=WAIT)
    assert set(_children()) <= before, set(_children()) - before


def _children() -> list[str]:
    """This process's children, as their command lines."""
    me, found = os.getpid(), []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii") as f:
                ppid = int(f.read().rpartition(")")[2].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == me:
            found.append(f"{pid}: {cmd}")
    return found


def cfg(**kw: object) -> GuestConfig:
    base: dict[str, object] = {"ram": RAM, "seed": 11, "commands": COMMANDS, "plain_copy": False, "to": "",
                               "key": KEY, "timeout": 60.0, "guest_timeout": 15.0}
    base.update(kw)
    return GuestConfig(**base)  # type: ignore[arg-type]


def test_destination_killed_mid_stream_the_guest_runs_on_and_a_second_attempt_succeeds(incoming: Start) -> None:
    c = cfg()
    spec = c.spec()
    ref = reference(spec)[0]
    sm = SourceMachine(spec)
    try:
        src = Source(sm.vm, sm.container, threshold=c.threshold, max_rounds=c.max_rounds)
        inc = incoming()
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
        inc2 = incoming()
        c.to = inc2.addr
        o = attempt_guest(sm, src, c)
        rc, err = inc2.finish()
        assert rc == 0, err
        o.reference = ref
        assert o.pages_ok and o.checksum_ok, (o.differing[:4], o.checksum, ref)
    finally:
        sm.close()


def test_destination_killed_the_source_guest_finishes_unharmed(incoming: Start) -> None:
    c = cfg()
    spec = c.spec()
    ref = reference(spec)[0]
    sm = SourceMachine(spec)
    try:
        src = Source(sm.vm, sm.container)
        inc = incoming()
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
