"""Convergence of a writer-heavy running guest: its sweeps dirty pages faster than pre-copy
copies them, so without a throttle pre-copy runs into the round limit, and with
auto-converge the throttle engages, only grows, and the migration ends before the limit;
both verifications hold either way.

64 MiB, 10,000 device commands (the guest is still mid-run at the switchover); the
unmigrated run's checksum is computed once and shared by both tests (:mod:`guest_runs`).
Pre-copy is capped at 128 MiB/s (``max_bandwidth``, QEMU's max-bandwidth): uncapped, the
stream now drains pages faster than this guest's sweeps dirty them (each page a sweep
dirties again costs the guest a write fault), and the cap makes "the guest outruns the
stream" hold on any machine these run on, the guest's speed apart by ten times.
Assertions are on page counts and round order, never on time.
"""

from __future__ import annotations

from guest_runs import assert_verified_both_ways, migrate

from dmarw.migration.running import GuestOutcome

COMMANDS = 10_000
SEED = 3
THRESHOLD = 256
MAX_BANDWIDTH = 128 << 20  # bytes/s


def writer_heavy(**kw: object) -> GuestOutcome:
    return migrate(SEED, COMMANDS, writer_heavy=True, threshold=THRESHOLD, max_bandwidth=MAX_BANDWIDTH,
                   guest_timeout=60.0, **kw)


def test_without_a_throttle_the_writer_heavy_guest_outruns_pre_copy() -> None:
    o = writer_heavy(auto_converge=False, max_rounds=6)
    r = o.report
    pre = [st for st in r.rounds if not st.final]
    assert len(pre) == 6 and not r.converged  # the round limit ended it, not the threshold
    assert all(st.throttle == 0 for st in r.rounds)
    # every round's pages are what the guest dirtied during the one before: never under the
    # threshold; and from round 2 on, more than half of what that round sent (the rule that
    # throttles).  Round 0 sends all of RAM, of which one round's sweeps dirty only a part.
    assert all(st.sent > THRESHOLD for st in pre[1:]), [st.sent for st in pre]
    for before, st in zip(pre[1:], pre[2:], strict=False):
        assert st.sent > before.sent // 2, (before.sent, st.sent)
    assert r.rounds[-1].sent > THRESHOLD  # stop-and-copy got a full dirty set
    assert_verified_both_ways(o)  # it was writing throughout


def test_auto_converge_throttles_the_writer_heavy_guest_until_pre_copy_ends() -> None:
    max_rounds = 16
    o = writer_heavy(max_rounds=max_rounds)
    r = o.report
    pre = [st for st in r.rounds if not st.final]
    shares = [st.throttle for st in r.rounds]
    assert shares[0] == 0 and shares[-1] > 0 and shares == sorted(shares), shares  # it rises, never falls
    # it engaged because the guest outran the stream: the round before the first throttled
    # one dirtied more than half of what it sent, and more than the threshold
    j = next(i for i, s in enumerate(shares) if s > 0)
    assert pre[j].sent > pre[j - 1].sent // 2 and pre[j].sent > THRESHOLD, (pre[j - 1].sent, pre[j].sent)
    assert r.converged and len(pre) < max_rounds  # within the round limit, by the threshold
    assert o.throttled_seconds > 0
    assert_verified_both_ways(o)  # it was writing throughout
