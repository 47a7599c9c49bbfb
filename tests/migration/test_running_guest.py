"""A running guest (the guest program on a KvmVm, the GPU-like device serving its ring)
migrated between two processes, verified two ways: every page at switchover, and the
guest's checksum on the destination against an unmigrated run of the same guest and seed.

Each run is 64 MiB with 2000 device commands: long enough that the guest is mid-run at the
switchover (asserted), short enough for 20 seeds.  The unmigrated run's checksum is
recorded once per seed and reused by the negative controls of that seed.
"""

from __future__ import annotations

import pytest

from dmarw.migration.running import GuestConfig, GuestOutcome, run_guest_migration

RAM = 64 << 20
COMMANDS = 2000
SEEDS = range(20)
CONTROL_SEEDS = range(4)
_reference: dict[tuple[int, bool], int] = {}


def migrate(seed: int, **kw: object) -> GuestOutcome:
    base: dict[str, object] = {"ram": RAM, "seed": seed, "commands": COMMANDS, "plain_copy": False, "timeout": 60.0,
                              "guest_timeout": 30.0}
    base.update(kw)
    cfg = GuestConfig(**base)  # type: ignore[arg-type]
    key = (seed, cfg.writer_heavy)
    o = run_guest_migration(cfg, reference=_reference.get(key))
    _reference[key] = o.reference
    return o


def check_running(o: GuestOutcome) -> None:
    r = o.report
    assert r.rounds[0].sent == RAM >> 12 and r.rounds[-1].final
    assert r.pages_sent == sum(st.sent for st in r.rounds) == r.dest_pages
    # the guest was running: stopped mid-way, and its device had work done before the stop
    assert 0 < o.commands_at_stop < COMMANDS, o.commands_at_stop
    assert sum(st.kvm for st in r.rounds[1:]) > 0 and sum(st.vfio for st in r.rounds[1:]) > 0
    assert set(r.downtime_parts) >= {"vCPU stop", "last pages", "state", "restore", "resume"}


@pytest.mark.parametrize("seed", SEEDS)
def test_running_guest_migrates_and_verifies_both_ways(seed: int) -> None:
    o = migrate(seed, dirty=("bitmap", "clear", "ring")[seed % 3])
    check_running(o)
    assert o.pages_ok, [hex(g) for g in o.differing[:8]]
    assert o.checksum == o.reference and o.checksum_ok and o.ok
    assert o.stat["commands"] == COMMANDS


@pytest.mark.parametrize("seed", CONTROL_SEEDS)
@pytest.mark.parametrize("control", ["device_bypass", "no_vfio_log", "no_kvm_log"])
def test_negative_controls_fail_verification_every_run(control: str, seed: int) -> None:
    o = migrate(seed, **{control: True})
    assert not o.pages_ok and o.differing, "the control lost no page"
    assert not o.ok
    # the guest's result shows the loss too: another checksum, or it could not finish
    assert o.checksum != o.reference


def test_writer_heavy_guest_is_throttled_and_ends_within_the_round_limit() -> None:
    o = migrate(1, writer_heavy=True, threshold=0, max_rounds=6)
    r = o.report
    assert len(r.rounds) <= 6 + 1  # pre-copy rounds, then the final one
    assert any(st.throttle > 0 for st in r.rounds), [st.throttle for st in r.rounds]
    shares = [st.throttle for st in r.rounds]
    assert shares == sorted(shares)  # the throttle only grows
    assert o.throttled_seconds > 0
    assert o.ok
