"""A running guest (the guest program on a KvmVm, the GPU-like device serving its ring)
migrated between two processes, verified two ways: every page at switchover, and the
guest's checksum on the destination against an unmigrated run of the same guest and seed.

Each run is 64 MiB with 1200 device commands: long enough that the guest is mid-run at the
switchover (asserted), short enough for 20 seeds.  The unmigrated run's checksum is
recorded once per seed and reused by the negative controls of that seed.
"""

from __future__ import annotations

import pytest

from dmarw.migration.running import GuestConfig, GuestOutcome, run_guest_migration

RAM = 64 << 20
COMMANDS = 1200
SEEDS = range(20)
CONTROL_SEEDS = range(3)
_reference: dict[tuple[int, bool], int] = {}


def migrate(seed: int, **kw: object) -> GuestOutcome:
    base: dict[str, object] = {"ram": RAM, "seed": seed, "commands": COMMANDS, "plain_copy": False, "timeout": 60.0,
                              "guest_timeout": 15.0}
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


def test_round_limit_ends_pre_copy_and_the_throttle_is_reported_per_round() -> None:
    """threshold 0 never converges while the guest dirties a page: the round limit ends it."""
    o = migrate(1, writer_heavy=True, threshold=0, max_rounds=4)
    r = o.report
    assert len(r.rounds) <= 4 + 1  # pre-copy rounds, then the final one
    shares = [st.throttle for st in r.rounds]
    assert shares == sorted(shares) and all(0 <= s < 1 for s in shares)  # it only grows
    assert o.ok


def test_auto_converge_takes_a_growing_share_of_the_vcpu_time() -> None:
    """The policy: 20% when a round dirtied more than half of what it sent, +10% each time
    after; and the share set really keeps the vCPU out of the guest."""
    from dmarw.migration.guest import SourceMachine
    from dmarw.migration.running import auto_converge

    sm = SourceMachine(GuestConfig(ram=RAM, seed=5, commands=COMMANDS).spec())
    try:
        policy = auto_converge(sm.set_throttle)
        assert policy(1, 10, 100) == 0.0  # converging: no throttle
        assert policy(2, 60, 100) == pytest.approx(0.2)
        assert policy(3, 60, 100) == pytest.approx(0.3)
        assert policy(4, 10, 100) == pytest.approx(0.3)  # never lowered during a migration
        sm.start()
        # until the ticker's first kick has sat out its share, or the guest ended (on a quiet
        # machine the guest runs 50 commands before the first 10 ms tick: wait on the event)
        while sm.running and sm.throttled_s == 0:
            sm._thread.join(0.01)  # type: ignore[union-attr]
        assert sm.throttled_s > 0  # the ticker kicked the running guest; each kick sat out its share
        sm.pause()
        assert sm.m.device.regs.commands < COMMANDS
    finally:
        sm.close()
