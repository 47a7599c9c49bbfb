"""A running guest (the guest program on a KvmVm, the GPU-like device serving its ring)
migrated between two processes, verified two ways: every page at switchover, and the
guest's checksum on the destination against an unmigrated run of the same guest and seed.
Each of the three negative controls fails page verification for every one of the 20 seeds,
naming the pages; where the loss reaches the guest's result its checksum differs too, which
for each control must be so in most runs (a lost page the guest had already folded in, or
rewrites before it reads, leaves its result alone).

Each run is 64 MiB with 1200 device commands: long enough that the guest is mid-run at the
switchover (asserted), short enough for 20 seeds x (1 + 3 controls).  The unmigrated run's
checksum is recorded once per seed (:mod:`guest_runs`) and reused by every run of it.
"""

from __future__ import annotations

import pytest
from guest_runs import (
    CONTROLS,
    RAM,
    SEEDS,
    assert_control_failed,
    assert_losses_reach_the_result,
    assert_verified_both_ways,
    migrate,
)

from dmarw.migration.running import GuestConfig

COMMANDS = 1200


@pytest.mark.parametrize("seed", SEEDS)
def test_running_guest_migrates_and_verifies_both_ways(seed: int) -> None:
    o = migrate(seed, COMMANDS, dirty=("bitmap", "clear", "ring")[seed % 3])
    assert_verified_both_ways(o)
    assert set(o.report.downtime_parts) >= {"vCPU stop", "last pages", "state", "restore", "resume"}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("control", CONTROLS)
def test_negative_controls_fail_verification_every_run(control: str, seed: int) -> None:
    assert_control_failed(migrate(seed, COMMANDS, **{control: True}), control)


def test_each_controls_loss_reaches_the_guest_result_in_most_runs() -> None:
    assert_losses_reach_the_result(CONTROLS)


def test_round_limit_ends_pre_copy_and_the_throttle_is_reported_per_round() -> None:
    """threshold 0 never converges while the guest dirties a page: the round limit ends it."""
    o = migrate(1, COMMANDS, writer_heavy=True, threshold=0, max_rounds=4)
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
