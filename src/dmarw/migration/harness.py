"""One migration end to end: a source guest with writers, a destination process, verification.

Guest RAM layout (one memslot, one container mapping, iova == gpa)::

    [0, 3/4 RAM)                 vCPU area: Vm.write_guest            (KVM dirty log)
    [3/4 RAM, RAM - pinned)      device area: dma_rw via ExternalUser (container bitmap)
    [RAM - pinned, RAM)          pinned pages: written through their hva (always resent)

The areas are disjoint on purpose: a device page is dirtied only by the device, so when a
negative control loses the device's writes nothing else resends those pages.  Each writer
completes :attr:`Config.after_round0` writes between round 0 and the first harvest, so
every run has pages to send again.  And once the destination has applied every pre-copy
round, just before the stop, the device writes one page of its area the destination did
not ask for again: the write every control must lose, so every control run fails,
deterministically.  Losing the writers' own writes is not certain: ``sendfile`` hands the
socket references to the page cache, so a receiver may read bytes written after the page
was checksummed, its page check fails and the destination asks for the page again.

Processes: the source (this process, with the writer threads) and a forked destination
with its own memfd guest RAM; a forked receiver also times a plain copy of the same RAM
over the same kind of socket before the writers start.  Forks happen while this process
has no other thread.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess

from ..core import container as make_container
from ..core import resolve
from ..core import vm as make_vm
from ..errors import DmaError
from ..kvm import Vm
from ..mm import PAGE_SIZE, AddressSpace
from ..type1 import Container, Prot
from ..vfio import ExternalUser, Group
from . import control, dest
from .baseline import PlainCopy, plain_copy
from .channel import Channel, handshake_source, tune
from .incoming import check_ram, parse_hostport
from .source import MigrationFailed, MigrationReport, RoundStats, Source, differing_pages
from .writers import Writer, Writers, fill, place

_group_ids = itertools.count(1)
PIN_EVERY = 8  # one device write in PIN_EVERY goes to a pinned page


@dataclass
class Config:
    """Everything one run depends on (defaults: the ``dmarw migrate`` defaults)."""

    ram: int = 1 << 30
    seed: int = 0
    vcpu_rate: float = 64.0  # vCPU writes per MiB streamed
    dma_rate: float = 32.0  # device writes per MiB streamed
    pinned: int = 16
    threshold: int = 256
    max_rounds: int = 16
    max_bandwidth: float | None = None  # bytes/s a pre-copy round may send (None: no cap)
    device_bypass: bool = False
    no_vfio_log: bool = False
    profile: str = "glmark2"
    ops: int = 20_000  # workload records generated per writer (cycled)
    after_round0: int = 16
    plain_copy: bool = True
    core: str | None = None  # "python" or "native"; None: dmarw.core's default selection
    to: str | None = None  # HOST:PORT of a `dmarw incoming`; None: a forked local destination
    key: bytes | None = None  # the shared key (required with `to`)
    timeout: float = 30.0  # seconds any wait for the destination may last

    def check(self) -> None:
        if self.ram % PAGE_SIZE or self.ram < 1 << 20:  # each writer's area >= 64 KiB
            raise DmaError(errno.EINVAL, f"--ram {self.ram:#x} must be a multiple of 4096 and >= 1 MiB")
        if not 0 <= self.pinned <= min(512, self.ram // PAGE_SIZE // 8):
            raise DmaError(errno.EINVAL, f"--pinned {self.pinned} must be in 0..{min(512, self.ram // PAGE_SIZE // 8)}")
        if self.vcpu_rate < 0 or self.dma_rate < 0:
            raise DmaError(errno.EINVAL, "rates must be >= 0")
        if self.ops < 1:
            raise DmaError(errno.EINVAL, f"--ops {self.ops} must be >= 1 (workload records per writer)")
        if self.threshold < 0 or self.max_rounds < 1:
            raise DmaError(errno.EINVAL, f"--threshold {self.threshold} must be >= 0 and --max-rounds {self.max_rounds} >= 1")
        if self.to is not None:
            parse_hostport(self.to, "--to")
            if self.key is None:
                raise DmaError(errno.EINVAL, "--to needs --key-file: a migration between hosts is authenticated")
        if self.key is not None:
            control.check_key(self.key)
        # two copies of guest RAM exist at once on this machine: the source's, and the plain
        # copy's receiver or the local destination's
        check_ram(self.ram, f"--ram {self.ram:#x}", copies=2)


@dataclass
class Outcome:
    config: Config
    report: MigrationReport
    differing: list[int]
    plain: PlainCopy | None
    writes: dict[str, int] = field(default_factory=dict)
    core: str = "python"
    setup_seconds: float = 0.0
    verify_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.differing


class SourceGuest:
    """The source VM: memfd RAM, a dirty-logging memslot, a tracked container, a device."""

    def __init__(self, ram: int, seed: int, npinned: int, core: str | None = None) -> None:
        self.ram = ram
        self.core = resolve(core)
        self.space = AddressSpace()
        self.hva = self.space.mmap(ram, backing="memfd")
        fill(self.space, self.hva, ram, seed)
        self.vm: Vm = make_vm(self.space, self.core)
        self.vm.set_memslot(0, 0, ram, self.hva, dirty_log=True)
        self.container: Container = make_container(self.core)
        self.container.map_dma(0, ram, self.hva, self.space, Prot.READ | Prot.WRITE)
        self.group = Group(f"dmarw-migrate-{os.getpid()}-{next(_group_ids)}", core=self.core)
        device = self.group.add_device("0000:00:02.0")
        self.group.set_container(self.container)
        self.ext = ExternalUser.from_device(device)
        self.notifier = self.container.register_unmap_notifier(self._unmapped)
        self.pin_iova = ram - npinned * PAGE_SIZE
        self.npinned = npinned
        self.pinned_hvas = self.ext.pin_pages(self.pin_iova, npinned, Prot.READ | Prot.WRITE) if npinned else []

    def _unmapped(self, iova: int, size: int) -> None:
        """Unmap notifier: drop our pins inside the range."""
        lo, hi = max(iova, self.pin_iova), min(iova + size, self.pin_iova + self.npinned * PAGE_SIZE)
        if lo < hi and self.pinned_hvas:
            self.ext.unpin_pages(lo, (hi - lo) // PAGE_SIZE)
            self.pinned_hvas = []

    @property
    def areas(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(base, span) of the vCPU area and of the device area."""
        vcpu = (self.ram * 3 // 4) // PAGE_SIZE * PAGE_SIZE
        return (0, vcpu), (vcpu, self.pin_iova - vcpu)

    def close(self) -> None:
        self.container.unmap_dma(0, self.ram)  # the notifier unpins
        self.container.unregister_unmap_notifier(self.notifier)
        self.ext.close()
        self.group.remove()
        self.vm.close()
        self.space.close()


def device_write(guest: SourceGuest, cfg: Config) -> Callable[[int, bytes], None]:
    """The device's write: ``dma_rw`` through its external user, or (the control) the raw hva."""
    if not cfg.device_bypass:
        return guest.ext.dma_write
    space, hva = guest.space, guest.hva

    def raw(iova: int, data: bytes) -> None:
        space.write(hva + iova, data)

    return raw


def build_writers(guest: SourceGuest, cfg: Config) -> Writers:
    """The vCPU and device writers over the lab's workload ``cfg.profile``."""
    from ..lab.workload import generate  # the lab's workload generator

    (vbase, vspan), (dbase, dspan) = guest.areas
    vcpu_w = generate(cfg.profile, cfg.ops, cfg.seed * 2 + 1, vspan).writes()
    dev_w = generate(cfg.profile, cfg.ops, cfg.seed * 2 + 2, dspan).writes()
    vm_write = guest.vm.write_guest
    space = guest.space
    dev_write = device_write(guest, cfg)

    def pin_write(hva_: int, data: bytes) -> None:
        space.write(hva_, data)

    vops: list[tuple[Callable[[int, bytes], None], int, int]] = [
        (vm_write, a, n) for a, n in place(vcpu_w, vbase, vspan)
    ]
    dops: list[tuple[Callable[[int, bytes], None], int, int]] = []
    for i, (a, n) in enumerate(place(dev_w, dbase, dspan)):
        if guest.pinned_hvas and i % PIN_EVERY == PIN_EVERY - 1:
            k = (i // PIN_EVERY) % len(guest.pinned_hvas)
            dops.append((pin_write, guest.pinned_hvas[k] + a % PAGE_SIZE, min(n, PAGE_SIZE - a % PAGE_SIZE)))
        else:
            dops.append((dev_write, a, n))
    return Writers([Writer("vcpu", cfg.vcpu_rate, vops), Writer("device", cfg.dma_rate, dops)])


# -- one run -----------------------------------------------------------------------------
def open_destination(cfg: Config, src: Source, spec_extra: dict[str, object] | None = None) -> tuple[
    BaseProcess | None, Channel, bytes | None
]:
    """A destination ready for the stream: a forked local process, or ``cfg.to`` after the
    key handshake and ``SPEC``.  Raises :class:`MigrationFailed` if it cannot be had."""
    if cfg.to is None:
        proc, sock = dest.start(src.page_size, src.layout)
        sock.settimeout(cfg.timeout)
        return proc, Channel(sock, "destination"), None
    assert cfg.key is not None
    host, port = parse_hostport(cfg.to, "--to")
    try:
        sock = socket.create_connection((host, port), timeout=cfg.timeout)
        tune(sock)
    except OSError as e:
        raise MigrationFailed(e.errno or errno.ECONNREFUSED, f"destination {cfg.to} unreachable: {e.strerror or e}") from None
    ch = Channel(sock, f"destination {cfg.to}")
    try:
        mac = handshake_source(ch, cfg.key)
        spec: dict[str, object] = {"page_size": src.page_size, "layout": [list(r) for r in src.layout]}
        spec.update(spec_extra or {})
        ch.send(control.jsonmsg(control.SPEC, spec))
        ch.recv(control.REDY)
    except OSError as e:
        sock.close()
        raise MigrationFailed(e.errno or errno.EPROTO, str(getattr(e, "detail", e))) from None
    return None, ch, mac


def run(
    cfg: Config,
    *,
    on_sent: Callable[[int, int], None] | None = None,
    on_round_start: Callable[[int, int], None] | None = None,
    on_round_end: Callable[[RoundStats], None] | None = None,
) -> Outcome:
    """Set up, (time a plain copy,) migrate with the writers running, verify every page."""
    cfg.check()
    t0 = time.perf_counter()
    guest = SourceGuest(cfg.ram, cfg.seed, cfg.pinned, cfg.core)
    writers = build_writers(guest, cfg)
    try:
        setup = time.perf_counter() - t0
        plain = plain_copy(guest.space, guest.hva, cfg.ram, tcp=cfg.to is not None) if cfg.plain_copy else None
        if cfg.to is None:  # fork the local destination before any thread starts
            conn = open_destination(cfg, make_source(guest, cfg))
            writers.start()
        else:
            writers.start()
            conn = None
        return attempt(guest, writers, cfg, conn, plain, setup, on_sent, on_round_start, on_round_end)
    finally:
        writers.stop()
        guest.close()


def make_source(guest: SourceGuest, cfg: Config) -> Source:
    return Source(
        guest.vm,
        guest.container,
        threshold=cfg.threshold,
        max_rounds=cfg.max_rounds,
        use_vfio_log=not cfg.no_vfio_log,
        max_bandwidth=cfg.max_bandwidth,
    )


def attempt(
    guest: SourceGuest,
    writers: Writers,
    cfg: Config,
    conn: tuple[BaseProcess | None, Channel, bytes | None] | None = None,
    plain: PlainCopy | None = None,
    setup: float = 0.0,
    on_sent: Callable[[int, int], None] | None = None,
    on_round_start: Callable[[int, int], None] | None = None,
    on_round_end: Callable[[RoundStats], None] | None = None,
) -> Outcome:
    """One migration of a running guest (its writers started); on :class:`MigrationFailed`
    the writers run on, so the caller may try again."""
    src = make_source(guest, cfg)
    proc, ch, mac = conn if conn is not None else open_destination(cfg, src)
    sock = ch.sock

    def sent(n: int, pages: int) -> None:
        writers.grant(n)
        if on_sent is not None:
            on_sent(n, pages)

    def round_end(st: RoundStats) -> None:
        if st.round == 0 and not st.final:
            writers.force(cfg.after_round0)
        if on_round_end is not None:
            on_round_end(st)

    def applied(resend: set[int]) -> None:
        (base, span) = guest.areas[1]
        for gfn in range(base >> 12, (base + span) >> 12):
            if gfn not in resend:
                device_write(guest, cfg)(gfn << 12, writers.stamp(PAGE_SIZE))
                return

    try:
        report = src.migrate(
            sock, writers.pause, resume=writers.resume, mac_key=mac, ch=ch,
            on_sent=sent, on_round_start=on_round_start, on_round_end=round_end, on_applied=applied,
        )
        t_v = time.perf_counter()
        mine = src.digests()  # writers are paused: this is the source's final memory
        try:
            _, theirs = ch.recv(control.HASH)
        except OSError as e:
            writers.resume()
            raise MigrationFailed(e.errno or errno.EPIPE, f"destination lost before its page digests: {e}") from None
    finally:
        sock.close()
        if proc is not None:
            proc.join(cfg.timeout)
            if proc.is_alive():
                proc.kill()
                proc.join()
    writers.raise_error()
    differing = differing_pages(mine, theirs, src.layout, src.page_size, dest.DIGEST_SIZE)
    verify = time.perf_counter() - t_v
    return Outcome(cfg, report, differing, plain, writers.done(), guest.core, setup, verify)
