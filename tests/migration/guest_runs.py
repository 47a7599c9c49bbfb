"""What the running-guest suites share: one migration of a seed with given flags, and the
two verdicts such a run is held to.

The unmigrated run of a guest (its RAM, seed, command count, batch, writer-heavy) is done
once per test session and its checksum reused by every migration of the same guest, over
either transport and with or without a negative control.
"""

from __future__ import annotations

import time

from dmarw.migration.guest import GuestSpec, reference_checksum
from dmarw.migration.running import GuestConfig, GuestOutcome, run_guest_migration

RAM = 64 << 20
PAGE = 4096
SEEDS = range(20)
# each control leaves one way of finding dirty pages out: pages written after they were
# sent are then not sent again, and the destination's memory differs from the source's
CONTROLS = ("device_bypass", "no_vfio_log", "no_kvm_log")
KEY = b"0123456789abcdef-shared-key"
GUEST_TIMEOUT = 15.0  # a verified guest finishes its remainder well within this

_references: dict[tuple[object, ...], tuple[int, float]] = {}


def reference(spec: GuestSpec) -> tuple[int, float]:
    """The unmigrated run's checksum and seconds, computed the first time it is asked for."""
    key = (spec.ram, spec.seed, spec.commands, spec.batch, spec.writer_heavy, spec.path)
    if key not in _references:
        t0 = time.perf_counter()
        checksum = reference_checksum(spec)
        _references[key] = (checksum, time.perf_counter() - t0)
    return _references[key]


def migrate(seed: int, commands: int, **flags: object) -> GuestOutcome:
    """One migration of the running guest of ``seed`` (64 MiB, ``commands`` device commands)
    with ``flags`` as :class:`GuestConfig` fields (``to``/``key`` for TCP, a control's name
    set to True, ...).  Under a negative control the destination's guest gets the whole
    unmigrated run's time plus 1 s for what remains of its run: a guest whose memory lost
    pages may loop, and one that needs longer than all of it took has not finished.  Without
    a control, pre-copy waits after round 0 for two batches of device commands (unless the
    flags say otherwise): both logs then have pages after round 0 however fast the stream."""
    base: dict[str, object] = {"ram": RAM, "seed": seed, "commands": commands, "plain_copy": False,
                               "timeout": 60.0, "guest_timeout": GUEST_TIMEOUT}
    base.update(flags)
    cfg = GuestConfig(**base)  # type: ignore[arg-type]
    checksum, seconds = reference(cfg.spec())
    if cfg.controls and "guest_timeout" not in flags:
        cfg.guest_timeout = seconds + 1.0
    if not cfg.controls and "precopy_commands" not in flags:
        cfg.precopy_commands = 2 * cfg.batch
    return run_guest_migration(cfg, reference=checksum)


def assert_mid_run(o: GuestOutcome) -> None:
    """The guest was running at the switchover: its device had done some of its commands,
    not all."""
    assert 0 < o.commands_at_stop < o.config.commands, (o.commands_at_stop, o.config.commands)


def assert_verified_both_ways(o: GuestOutcome) -> None:
    """Every page identical at the switchover, and the destination's guest ran to the
    unmigrated run's checksum; the guest was mid-run, its vCPU and device writing during
    pre-copy (both logs found pages after the first round)."""
    r = o.report
    assert_mid_run(o)
    assert r.rounds[0].sent == o.config.ram // PAGE and r.rounds[-1].final
    assert r.pages_sent == sum(st.sent for st in r.rounds) == r.dest_pages
    assert sum(st.kvm for st in r.rounds[1:]) > 0 and sum(st.vfio for st in r.rounds[1:]) > 0
    assert o.pages_ok, [hex(g) for g in o.differing[:8]]
    assert o.checksum_ok and o.ok, (o.checksum, o.reference, o.guest_error)
    assert o.stat["commands"] == o.config.commands


# per control: how many runs had the loss reach the guest's result (another checksum, or a
# guest that could not finish), and how many ran; see assert_losses_reach_the_result
RESULTS: dict[str, list[int]] = {}


def assert_control_failed(o: GuestOutcome, control: str) -> None:
    """The control took effect (a log left out counted nothing), the guest was mid-run,
    and verification of pages failed naming pages of guest RAM.  Where the loss reached
    the guest's result, its checksum differs or the guest could not finish; a lost page the
    guest had already folded in, or rewrites before reading, does not reach it, so that
    is counted here (:data:`RESULTS`), not asserted per run."""
    r = o.report
    assert_mid_run(o)
    assert o.held_commands >= o.config.hold() > 0, (o.held_commands, o.config.hold())  # writes to lose
    log = {"no_kvm_log": "kvm", "no_vfio_log": "vfio"}.get(control)
    if log is not None:
        assert sum(getattr(st, log) for st in r.rounds) == 0, control
    assert not o.pages_ok and o.differing, "the control lost no page"
    assert all(g % PAGE == 0 and 0 <= g < o.config.ram for g in o.differing), [hex(g) for g in o.differing[:8]]
    if o.checksum is None:
        assert o.guest_error, o.stat
    reached = o.checksum is None or o.checksum != o.reference
    counts = RESULTS.setdefault(control, [0, 0])
    counts[0] += reached
    counts[1] += 1
    assert not o.ok


def assert_losses_reach_the_result(controls: list[str]) -> None:
    """Across the runs so far, each control's loss reached the guest's result in most runs
    (skips a control that did not run: a test selected alone)."""
    import pytest

    for control in controls:
        if control not in RESULTS:
            pytest.skip(f"no run of the {control} control in this session")
        reached, ran = RESULTS[control]
        assert reached * 2 > ran, f"{control}: the loss reached the guest's result in {reached} of {ran} runs"
