"""One migration of a running guest end to end, verified two ways.

Order of work (one command does it all, so the comparison is within one run):

1. the **unmigrated run**: the same guest and seed on a ``KvmVm`` of this process, run to its
   end: the reference checksum;
2. the source guest is built (:class:`~.guest.SourceMachine`) and a **plain copy** of its
   RAM is timed over the same kind of socket (the throughput baseline,
   :mod:`.baseline`; the median of three copies each time): before the guest starts, and
   while it runs, just before pre-copy;
3. the destination: a forked process (``incoming``'s code on a socketpair) or ``--to`` a
   ``dmarw incoming`` after the key handshake; either builds its VM before ``REDY``;
4. the guest starts (vCPU thread, device engine thread) and pre-copy runs while it does;
   auto-converge throttles the vCPU when a round dirties more than half of what it sent;
   after round 0 the pre-copy waits, if asked (:attr:`GuestConfig.precopy_commands`), for
   the device to serve that many more commands: a negative control then always has
   writes to lose, however fast the stream;
5. stop-and-copy: vCPU kicked, device quiesced, last pages, vCPU/device state, ``END``;
6. verification: every page's digest at switchover, source against destination; then the
   destination resumes the guest to its end and reports its checksum, compared with (1).

A failed attempt resumes the source guest (:class:`~.source.MigrationFailed` is raised with
the guest running); the caller may retry or let it finish.  Forks happen while this
process has no other thread (before the guest starts).
"""

from __future__ import annotations

import errno
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from typing import Any

from ..errors import DmaError
from ..guest.params import RAM_MAX, RAM_MIN
from ..vmm import DEFAULT_DIRTY
from ..vmm.dirty import MODES
from . import control, dest
from .baseline import PlainCopier, PlainCopy
from .channel import Channel, fork_peer, handshake_source, tune
from .guest import GuestSpec, SourceMachine, reference_checksum
from .incoming import check_ram, parse_hostport, resolve, serve_connection
from .source import (
    MIN_BANDWIDTH,
    MigrationFailed,
    MigrationReport,
    RoundStats,
    Source,
    differing_pages,
)

AUTO_CONVERGE = (0.2, 0.1, 0.99)  # initial share, step, ceiling (QEMU's cpu-throttle defaults)
PLAIN_RUNS = 3  # plain copies timed per kind; the median one is the baseline
# under a negative control, the device batches served after round 0 before its harvest:
# four batches of the guest's mix hold ~24 device writes, ~10 of them to context pages,
# which no vCPU store rewrites
CONTROL_HOLD_BATCHES = 4


@dataclass
class GuestConfig:
    """Everything one running-guest migration depends on."""

    ram: int = 64 << 20
    seed: int = 0
    commands: int = 3000
    batch: int = 16
    writer_heavy: bool = False
    dirty: str = DEFAULT_DIRTY
    threshold: int = 256
    max_rounds: int = 16
    max_bandwidth: float | None = None  # bytes/s a pre-copy round may send (None: no cap)
    auto_converge: bool = True
    device_bypass: bool = False
    no_vfio_log: bool = False
    no_kvm_log: bool = False
    device_process: bool = False  # the device in a ``dmarw serve`` process, attached over vfio-user
    # commands the device serves between round 0's end and the next harvest (the guest and
    # device run on; the stream waits); None: CONTROL_HOLD_BATCHES batches under a negative
    # control, 0 otherwise
    precopy_commands: int | None = None
    plain_copy: bool = True
    to: str | None = None
    key: bytes | None = None
    timeout: float = 60.0  # any wait for the destination's next message
    # the destination's run of the guest to its end (a damaged guest may hang); None: four
    # times the unmigrated run's time plus 10 s, or 120 s when that time is not known
    guest_timeout: float | None = None

    def spec(self) -> GuestSpec:
        return GuestSpec(ram=self.ram, seed=self.seed, commands=self.commands, batch=self.batch,
                         writer_heavy=self.writer_heavy, dirty=self.dirty, device_process=self.device_process)

    @property
    def controls(self) -> bool:
        """A negative control is on."""
        return self.device_bypass or self.no_vfio_log or self.no_kvm_log

    def hold(self) -> int:
        """The commands pre-copy waits for after round 0 (see :attr:`precopy_commands`)."""
        if self.precopy_commands is not None:
            return self.precopy_commands
        return CONTROL_HOLD_BATCHES * self.batch if self.controls else 0

    def check(self) -> None:
        if not RAM_MIN <= self.ram <= RAM_MAX or self.ram % (1 << 20):
            raise DmaError(errno.EINVAL, f"--ram {self.ram:#x}: a running guest has a whole number of MiB "
                           f"in [{RAM_MIN >> 20} MiB, {RAM_MAX >> 20} MiB]")
        if self.dirty not in MODES:
            raise DmaError(errno.EINVAL, f"--dirty {self.dirty!r} is one of {', '.join(MODES)}")
        if self.threshold < 0 or self.max_rounds < 1:
            raise DmaError(errno.EINVAL, f"--threshold {self.threshold} must be >= 0 and --max-rounds {self.max_rounds} >= 1")
        if self.max_bandwidth is not None and not self.max_bandwidth >= MIN_BANDWIDTH:
            raise DmaError(errno.EINVAL, f"--max-bandwidth {self.max_bandwidth:,.0f} bytes/s: at least 1 MiB/s")
        if self.precopy_commands is not None and not 0 <= self.precopy_commands < self.commands:
            raise DmaError(errno.EINVAL, f"--precopy-commands {self.precopy_commands} must be in "
                           f"[0, --commands {self.commands}): the guest must still be at work at the switchover")
        if self.device_process and self.device_bypass:
            raise DmaError(errno.EINVAL, "--device-bypass and --device-process exclude each other "
                           "(the device in its own process writes guest RAM only through its server)")
        if self.to is not None:
            resolve(*parse_hostport(self.to, "--to"), f"--to {self.to}")
            if self.key is None:
                raise DmaError(errno.EINVAL, "--to needs --key-file: a migration between hosts is authenticated")
        if self.key is not None:
            control.check_key(self.key)
        self.spec().params()  # the guest's own limits (commands, batch), as EINVAL
        check_ram(self.ram, f"--ram {self.ram:#x}", copies=3)  # unmigrated run, source, destination


@dataclass
class GuestOutcome:
    config: GuestConfig
    report: MigrationReport
    differing: list[int]
    plain: PlainCopy | None  # the plain way (write), with the guest running: the baseline
    reference: int
    checksum: int | None
    stat: dict[str, Any] = field(default_factory=dict)  # what the destination measured
    guest_error: str | None = None  # why the destination's guest did not finish
    commands_at_stop: int = 0
    throttled_seconds: float = 0.0
    reference_seconds: float = 0.0
    plain_others: list[PlainCopy] = field(default_factory=list)  # sendfile; before the guest started
    held_commands: int = 0  # commands the device served while pre-copy waited after round 0
    held_seconds: float = 0.0

    @property
    def pages_ok(self) -> bool:
        return not self.differing

    @property
    def checksum_ok(self) -> bool:
        return self.checksum is not None and self.checksum == self.reference

    @property
    def ok(self) -> bool:
        return self.pages_ok and self.checksum_ok


def auto_converge(apply: Callable[[float], None]) -> Callable[[int, int, int], float]:
    """QEMU's rule: when a round dirtied more than half of what it sent, take 20% of the
    vCPU's time, then 10% more each time it happens again (at most 99%)."""
    share = [0.0]

    def policy(_rnd: int, dirtied: int, sent: int) -> float:
        if dirtied > sent // 2:
            first, inc, top = AUTO_CONVERGE
            share[0] = first if share[0] == 0 else min(top, share[0] + inc)
            apply(share[0])
        return share[0]

    return policy


def _local_child(sock: socket.socket) -> None:
    rc = serve_connection(sock, None)
    sock.close()
    raise SystemExit(rc)


def open_destination(
    cfg: GuestConfig, src: Source, spec: GuestSpec, guest_timeout: float = 120.0
) -> tuple[BaseProcess | None, Channel, bytes | None]:
    """A destination with the guest's VM built and ``REDY`` received."""
    proc: BaseProcess | None = None
    mac = None
    if cfg.to is None:
        proc, ours = fork_peer(_local_child, name="dmarw-migrate-dest")
        ours.settimeout(cfg.timeout)
        ch = Channel(ours, "destination")
    else:
        host, port = parse_hostport(cfg.to, "--to")
        try:
            sock = socket.create_connection((host, port), timeout=cfg.timeout)
        except OSError as e:
            raise MigrationFailed(e.errno or errno.ECONNREFUSED, f"destination {cfg.to} unreachable: {e.strerror or e}") from None
        tune(sock)
        ch = Channel(sock, f"destination {cfg.to}")
    try:
        if cfg.key is not None and cfg.to is not None:
            mac = handshake_source(ch, cfg.key)
        ch.send(control.jsonmsg(control.SPEC, {
            "page_size": src.page_size, "layout": [list(r) for r in src.layout], "guest": spec.as_json(),
            "guest_timeout": guest_timeout,
        }))
        ch.recv(control.REDY)
    except OSError as e:
        ch.sock.close()
        if proc is not None:
            proc.join(cfg.timeout)
        raise MigrationFailed(e.errno or errno.EPROTO, str(getattr(e, "detail", e))) from None
    return proc, ch, mac


def run_guest_migration(
    cfg: GuestConfig,
    *,
    on_sent: Callable[[int, int], None] | None = None,
    on_round_start: Callable[[int, int], None] | None = None,
    on_round_end: Callable[[RoundStats], None] | None = None,
    reference: int | None = None,
) -> GuestOutcome:
    """``reference``: the unmigrated run's checksum when already recorded for this guest
    and seed (e.g. by an earlier run); otherwise the unmigrated run happens first."""
    cfg.check()
    spec = cfg.spec()
    t0 = time.perf_counter()
    ref = reference_checksum(spec) if reference is None else reference
    ref_s = time.perf_counter() - t0
    if cfg.guest_timeout is None:
        cfg.guest_timeout = 4 * ref_s + 10.0 if reference is None else 120.0
    sm = SourceMachine(spec, device_bypass=cfg.device_bypass)
    copier: PlainCopier | None = None
    try:
        space, hva = sm.m.env.space, sm.m.env.hva
        plains: list[PlainCopy] = []
        if cfg.plain_copy:
            copier = PlainCopier(cfg.ram, tcp=cfg.to is not None)
            plains.append(copier.copy(space, hva, "before the guest started", runs=PLAIN_RUNS))
        src = Source(sm.vm, sm.container, threshold=cfg.threshold, max_rounds=cfg.max_rounds,
                     use_kvm_log=not cfg.no_kvm_log, use_vfio_log=not cfg.no_vfio_log, device_log=sm.device_log,
                     max_bandwidth=cfg.max_bandwidth)
        conn = open_destination(cfg, src, spec, cfg.guest_timeout)  # its VM ready before the guest starts
        try:
            sm.attach_device()  # after the fork: the device's server and client are this process's
        except BaseException:
            conn[1].sock.close()
            if conn[0] is not None:
                conn[0].join(cfg.timeout)
            raise
        sm.start()
        sm.wait_under_way(max(1, min(16, spec.commands // 50)))  # pre-copy of a guest at work
        if copier is not None:  # the same conditions as the migration's: the guest at work
            plains[:0] = [copier.copy(space, hva, "with the guest running", api, runs=PLAIN_RUNS) for api in ("write", "sendfile")]
            copier.close()
        o = attempt_guest(sm, src, cfg, conn, on_sent, on_round_start, on_round_end)
        o.plain, o.plain_others = (plains[0], plains[1:]) if plains else (None, [])
        o.reference, o.reference_seconds = ref, ref_s
        return o
    finally:
        if copier is not None:
            copier.close()
        sm.close()


def attempt_guest(
    sm: SourceMachine,
    src: Source,
    cfg: GuestConfig,
    conn: tuple[BaseProcess | None, Channel, bytes | None] | None = None,
    on_sent: Callable[[int, int], None] | None = None,
    on_round_start: Callable[[int, int], None] | None = None,
    on_round_end: Callable[[RoundStats], None] | None = None,
) -> GuestOutcome:
    """One attempt with the guest running; on :class:`MigrationFailed` it runs on."""
    guest_timeout = cfg.guest_timeout if cfg.guest_timeout is not None else 120.0
    proc, ch, mac = conn if conn is not None else open_destination(cfg, src, sm.spec, guest_timeout)
    throttle = auto_converge(sm.set_throttle) if cfg.auto_converge else None
    hold = cfg.hold()
    held = [0, 0.0]  # commands, seconds

    def round_end(st: RoundStats) -> None:
        if on_round_end is not None:
            on_round_end(st)
        if st.round == 0 and not st.final and hold > 0:
            t0, c0 = time.perf_counter(), sm.commands
            # never to the guest's last batches: it must still be at work at the switchover
            sm.wait_under_way(min(c0 + hold, cfg.commands - 2 * cfg.batch), timeout=cfg.timeout)
            held[:] = [sm.commands - c0, time.perf_counter() - t0]

    try:
        report = src.migrate(ch.sock, sm.pause, resume=sm.resume, state=sm.state, mac_key=mac, ch=ch,
                             throttle=throttle, on_sent=on_sent, on_round_start=on_round_start,
                             on_round_end=round_end)
        sm.set_throttle(0.0)
        mine = src.digests()  # the guest is stopped: the source's memory at switchover
        try:
            _, theirs = ch.recv(control.HASH)
            ch.sock.settimeout(guest_timeout + cfg.timeout)
            _, raw = ch.recv(control.STAT)
        except OSError as e:
            # the destination has the guest now: nothing to resume here, but say what is lost
            raise MigrationFailed(e.errno or errno.EPIPE, f"destination lost after the switchover: {e}") from None
        stat = control.parse_json(control.STAT, raw)
    finally:
        sm.set_throttle(0.0)
        ch.sock.close()
        if proc is not None:
            proc.join(cfg.timeout)
            if proc.is_alive():
                proc.kill()
                proc.join()
    differing = differing_pages(mine, theirs, src.layout, src.page_size, dest.DIGEST_SIZE)
    checksum = stat.get("checksum")
    parts = report.downtime_parts
    if "restore_seconds" in stat:
        dest_s = parts.pop("destination", 0.0)
        parts["restore"] = float(stat["restore_seconds"])
        parts["stream drain"] = max(0.0, dest_s - parts["restore"])
        parts["resume"] = float(stat.get("resume_seconds", 0.0))
        report.downtime_seconds += parts["resume"]
    return GuestOutcome(cfg, report, differing, None, 0, int(checksum) if checksum is not None else None, stat,
                        stat.get("error"), sm.commands_at_stop, sm.throttled_s,
                        held_commands=int(held[0]), held_seconds=float(held[1]))
