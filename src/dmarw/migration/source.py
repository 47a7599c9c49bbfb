"""The source: pre-copy of a :class:`~dmarw.kvm.Vm` + :class:`~dmarw.type1.Container` pair.

Rule of each round: **harvest, then copy**.  The dirty logs are got-and-cleared first
(KVM ``get_dirty_log`` per memslot for vCPU writes, the container's ``get_dirty_bitmap``
per mapping for device writes, and every pinned page, which a device may write at any time
through its host address without any log seeing it); only then are those pages read and
sent.  A write that lands after a page's harvest either is seen by the copy or sets the
bit again for the next harvest, because both paths store the bytes before they mark the
page.

Sending: an unkeyed stream reads the pages straight from guest RAM: each page's CRC32C is
computed there, and a frame that is one run of pages goes to the socket without a copy
(the socket holds references to the pages): by the native core's vmsplice + splice, or
``sendfile`` from the RAM's memfd where that is not to be had; a frame of scattered pages
is gathered into a staging buffer (its CRCs taken there) and goes with one ``sendmsg``.  While the guest runs (pre-copy,
frames flagged ``LIVE``) a page may change after its CRC was taken; the destination then
finds its check failed, keeps it as not yet received, and names it in its acknowledgement
of the last pre-copy round: the final round sends it again with the guest stopped (such a
page was also written after its harvest, so its log holds it too).  A keyed stream copies the pages
out first, so its tag covers exactly the bytes that were checked.

Round 0 sends every page (the logs are cleared first); a pre-copy round keeps to
``max_bandwidth`` when one is set (the final round does not).  Each next round sends what was
dirtied during the previous one, until the harvested set has at most ``threshold`` pages
or ``max_rounds`` rounds were sent.  Then ``pause()`` is called (it must return only when
every writer is quiescent), the logs are harvested once more, and the final round sends
that set, the set harvested just before, and the pinned pages.  Downtime runs from the
call to ``pause()`` until the destination reports it is complete.

Locks: the source takes none of its own; it uses the Vm's srcu read side and the
container's read side through their public calls.  One thread drives a :class:`Source`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import select
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from ..checksum import crc32c_pages
from ..core import native_available
from ..errors import DmaError
from ..kvm import Vm
from ..mm import PAGE_SIZE
from ..type1 import Container
from . import control
from .channel import Channel
from .dest import page_digests
from .stream import MAX_PAGES, Encoder, Layout

PAGES_PER_FRAME = 1024  # 4 MiB of 4 KiB pages per PAGES frame (16 MiB measured no faster)
PIPE_BYTES = 1 << 20  # the vmsplice pipe: the unprivileged limit (fs.pipe-max-size)
MIN_BANDWIDTH = 1 << 20  # bytes/s: the lowest pre-copy bandwidth cap


@dataclass
class RoundStats:
    """One round: pages found dirty (union and per source), pages and bytes sent, seconds."""

    round: int
    dirtied: int
    kvm: int
    vfio: int
    pinned: int
    sent: int
    bytes: int
    seconds: float
    final: bool = False
    throttle: float = 0.0  # share of vCPU time taken away during this round (auto-converge)
    user: int = 0  # pages of a KvmVm's user-space log
    harvest_seconds: float = 0.0  # the harvest that chose this round's pages
    resent: int = 0  # pages the destination asked for again (their LIVE copy failed its check)


@dataclass
class MigrationReport:
    rounds: list[RoundStats] = field(default_factory=list)
    npages: int = 0
    page_size: int = PAGE_SIZE
    bytes_sent: int = 0
    pages_sent: int = 0
    total_seconds: float = 0.0
    downtime_seconds: float = 0.0
    converged: bool = False  # stopped because the dirty set fell under the threshold
    dest_pages: int = 0
    dest_rounds: int = 0
    downtime_parts: dict[str, float] = field(default_factory=dict)
    sender_cpu_seconds: float = 0.0  # CPU of the thread that ran the migration, start to DONE
    send_api: str = ""  # how page contents went out: "vmsplice + splice", "sendfile", "sendmsg from RAM", ...


class MigrationFailed(DmaError):
    """The migration was cancelled: the destination refused the stream (its message is
    included), hung up, or stopped answering.  The source guest is resumed before this is
    raised."""


def frame_buffer(size: int) -> mmap.mmap:
    """Memory for frames staged in user space, faulted in now, not during a round, and kept
    from any child this process forks (``MADV_DONTFORK``): after a fork (the local
    destination) every private page is copy-on-write, and the first write to each took a
    fault, 13-16 us here (10 ms of a 700-page round)."""
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(AttributeError, OSError):  # Linux only
        m.madvise(mmap.MADV_DONTFORK)
    for off in range(0, size, PAGE_SIZE):
        m[off] = 0
    return m


def dirty_pages(bitmap: bytes | bytearray) -> np.ndarray:
    """Set bits of a kernel-layout bitmap (bit k of byte j is page 8j+k), ascending, as an
    int64 array: the zero u64 words are skipped in bulk, the others unpacked together."""
    b = np.frombuffer(bitmap, dtype=np.uint8)
    n = len(b) // 8 * 8
    nz = np.flatnonzero(b[:n].view("<u8"))
    rows, cols = np.nonzero(np.unpackbits(b[:n].reshape(-1, 8)[nz], axis=1, bitorder="little"))
    out = (nz[rows] << 6) + cols
    if n < len(b):
        out = np.concatenate([out, n * 8 + np.flatnonzero(np.unpackbits(b[n:], bitorder="little"))])
    return out.astype(np.int64, copy=False)


def dirty_indices(bitmap: bytes | bytearray) -> list[int]:
    """:func:`dirty_pages` as a list.  A 1 GiB log is 4096 words, nearly all zero at the
    end of pre-copy."""
    return dirty_pages(bitmap).tolist()


@dataclass
class Harvest:
    """Dirty gfns by where they were found; ``pages`` is their union."""

    kvm: set[int] = field(default_factory=set)
    vfio: set[int] = field(default_factory=set)
    pinned: set[int] = field(default_factory=set)
    user: set[int] = field(default_factory=set)  # a KvmVm's user-space log (its own writes)
    resend: set[int] = field(default_factory=set)  # the destination's word: their copy failed

    @property
    def pages(self) -> set[int]:
        return self.kvm | self.vfio | self.pinned | self.user | self.resend

    def __or__(self, other: Harvest) -> Harvest:
        return Harvest(
            self.kvm | other.kvm, self.vfio | other.vfio, self.pinned | other.pinned, self.user | other.user,
            self.resend | other.resend,
        )


@dataclass(frozen=True)
class _Slot:
    slot: int
    gpa: int
    size: int
    hva: int


class Source:
    """Pre-copy migration of every memslot of ``vm``; see the module docstring for the rules.

    ``use_kvm_log``/``use_vfio_log`` exist for the negative controls: with
    ``use_vfio_log=False`` the container is never asked (neither its bitmap nor its pins —
    in the kernel, pinned pages are reported only through that bitmap).  ``device_log()``:
    the guest pages a device in another process wrote since its last call (a vfio-user
    server's DMA-logging report), counted with the container's and left out with it.
    """

    def __init__(
        self,
        vm: Vm,
        container: Container,
        *,
        threshold: int = 256,
        max_rounds: int = 16,
        use_kvm_log: bool = True,
        use_vfio_log: bool = True,
        device_log: Callable[[], set[int]] | None = None,
        max_bandwidth: float | None = None,
    ) -> None:
        if threshold < 0 or max_rounds < 1:
            raise DmaError(errno.EINVAL, f"threshold {threshold} must be >= 0 and max_rounds {max_rounds} >= 1")
        if max_bandwidth is not None and not max_bandwidth >= MIN_BANDWIDTH:
            raise DmaError(errno.EINVAL, f"max_bandwidth {max_bandwidth!r} bytes/s must be at least {MIN_BANDWIDTH:,} (1 MiB/s)")
        slots = sorted(vm.memslots(), key=lambda s: s.gpa)
        if not slots:
            raise DmaError(errno.EINVAL, "migration source: the VM has no memslot")
        for s in slots:
            if use_kvm_log and not s.dirty.tracking:
                raise DmaError(errno.ENXIO, f"memslot {s.slot} gpa {s.gpa:#x}+{s.size:#x} does not log dirty pages")
        if container.pgsize % PAGE_SIZE:
            raise DmaError(errno.EINVAL, f"container page size {container.pgsize:#x}")
        self.vm = vm
        self.space = vm.space
        self.container = container
        self.threshold = threshold
        self.max_rounds = max_rounds
        self.use_kvm_log = use_kvm_log
        self.use_vfio_log = use_vfio_log
        self.device_log = device_log  # a device in another process: its DMA-logging report, gfns
        self.max_bandwidth = max_bandwidth  # bytes/s a pre-copy round may send (None: as fast as it can)
        self.page_size = PAGE_SIZE
        self.slots = [_Slot(s.slot, s.gpa, s.size, s.hva) for s in slots]
        self.layout: Layout = tuple((s.gpa, s.size) for s in self.slots)
        self.npages = sum(s.size for s in self.slots) // PAGE_SIZE
        self._frame_buf = frame_buffer(PAGES_PER_FRAME * PAGE_SIZE)
        self.zero_copy = True  # no copy where it can (False: sendmsg, one copy)
        self.splice = native_available()  # whole runs by vmsplice + splice (else sendfile from a memfd)
        self._pipe: tuple[int, int] | None = None  # the pipe vmsplice fills, kept for the migration
        self.sent_by: set[str] = set()  # how frames went out (the report's send_api)

    # -- address translation ---------------------------------------------------------------
    def _gfns_of_hvas(self, hvas: np.ndarray, size: int) -> list[int]:
        """Guest page numbers backed by ``[hva, hva+size)`` for each (page-aligned) hva."""
        pages = hvas if size <= PAGE_SIZE else (hvas[:, None] + np.arange(0, size, PAGE_SIZE, dtype=np.int64)).ravel()
        out: list[int] = []
        for s in self.slots:
            inside = pages[(pages >= s.hva) & (pages < s.hva + s.size)]
            out.extend(((inside - s.hva + s.gpa) >> 12).tolist())
        return out

    def _gfns_of_pages(self, idx: Iterable[int]) -> Iterable[int]:
        """Gfns of page indices in layout order (a destination's bitmap over the layout)."""
        bases = []
        at = 0
        for s in self.slots:
            bases.append((at, s.size >> 12, s.gpa >> 12))
            at += s.size >> 12
        for k in idx:
            for first, n, gfn0 in bases:
                if first <= k < first + n:
                    yield gfn0 + k - first
                    break

    def _slot_of(self, gfn: int) -> _Slot:
        gpa = gfn << 12
        for s in self.slots:
            if s.gpa <= gpa < s.gpa + s.size:
                return s
        raise DmaError(errno.EFAULT, f"gpa {gpa:#x} is in no memslot")

    # -- harvest -----------------------------------------------------------------------------
    def harvest(self) -> Harvest:
        """Get-and-clear both logs (as enabled) and list the pinned pages, as gfns."""
        return self._harvest(True)

    def clear_logs(self) -> None:
        """Start tracking (idempotent) and drop what the logs hold, undecoded: round 0
        sends everything."""
        if self.use_vfio_log:
            self.container.dirty_pages_start()
        self._harvest(False)

    def _harvest(self, keep: bool) -> Harvest:
        """Get-and-clear every log; ``keep``: decode them into gfns (else only clear)."""
        h = Harvest()
        mode = getattr(self.vm, "dirty_mode", None)
        for s in self.slots:
            base = s.gpa >> 12
            if mode is not None:  # a real KVM VM: the kernel's log and the VMM's own, apart
                if self.use_kvm_log:
                    bm = mode.harvest(s.slot, s.size >> 12)
                    if keep:
                        h.kvm.update((dirty_pages(bm) + base).tolist())
                bm = self.vm.view.get_dirty_log(s.slot)  # type: ignore[attr-defined]
                if keep:
                    h.user.update((dirty_pages(bm) + base).tolist())
            elif self.use_kvm_log:
                bm = self.vm.get_dirty_log(s.slot)
                if keep:
                    h.kvm.update((dirty_pages(bm) + base).tolist())
        if self.use_vfio_log:
            c = self.container
            ps = c.pgsize
            maps = c.mappings()
            for iova, size, hva, _prot in maps:
                bm = c.get_dirty_bitmap(iova, size, ps)
                if keep:
                    h.vfio.update(self._gfns_of_hvas(hva + dirty_pages(bm) * ps, ps))
            if keep:
                pins = [hva + piova - iova for piova in c.pinned() for iova, size, hva, _prot in maps if iova <= piova < iova + size]
                h.pinned.update(self._gfns_of_hvas(np.array(pins, dtype=np.int64), ps))
            if self.device_log is not None:
                got = self.device_log()
                if keep:
                    h.vfio.update(got)
        return h

    # -- sending ---------------------------------------------------------------------------
    def _read_pages(self, gfns: list[int]) -> memoryview:
        """Copy the pages out of guest RAM into this source's frame buffer (one copy per run
        of consecutive pages; the buffer is reused, so no fresh memory is faulted in per
        frame).  The view is valid until the next call."""
        need = len(gfns) << 12
        if len(self._frame_buf) < need:
            self._frame_buf = frame_buffer(need)
        out = memoryview(self._frame_buf)
        at = 0
        i = 0
        s = self._slot_of(gfns[0])
        last = gfns[0] + len(gfns) - 1  # the range below has len(gfns) items at most
        if gfns[-1] == last < (s.gpa + s.size) >> 12 and gfns == list(range(gfns[0], last + 1)):
            i = len(gfns)  # the usual frame: one run, one copy
            region, off = self.space.region(s.hva + (gfns[0] << 12) - s.gpa, need)
            with memoryview(region.map) as ram:
                out[:need] = ram[off : off + need]
        while i < len(gfns):
            s = self._slot_of(gfns[i])
            end_gfn = (s.gpa + s.size) >> 12
            j = i + 1
            while j < len(gfns) and gfns[j] == gfns[j - 1] + 1 and gfns[j] < end_gfn:
                j += 1
            n = (j - i) << 12
            region, off = self.space.region(s.hva + (gfns[i] << 12) - s.gpa, n)
            with memoryview(region.map) as ram:
                out[at : at + n] = ram[off : off + n]
            at += n
            i = j
        return out[:need]

    def _gather(self, batch: np.ndarray) -> memoryview:
        """Copy the pages of ``batch`` (sorted gfns, one run or scattered) into this source's
        frame buffer: one numpy take per memslot, not a copy per run (:meth:`_read_pages`
        where a memslot spans more than one mapping).  The view is valid until the next
        call."""
        need = len(batch) << 12
        if len(self._frame_buf) < need:
            self._frame_buf = frame_buffer(need)
        out = np.frombuffer(self._frame_buf, dtype=np.uint8, count=need).reshape(-1, PAGE_SIZE)
        at = 0
        for s in self.slots:
            g0 = s.gpa >> 12
            lo, hi = (int(k) for k in np.searchsorted(batch, (g0, g0 + (s.size >> 12))))
            if lo == hi:
                continue
            try:
                region, off = self.space.region(s.hva, s.size)
            except DmaError:  # a memslot over more than one mapping: run by run
                del out
                return self._read_pages(batch.tolist())
            with memoryview(region.map) as whole:
                ram = np.frombuffer(whole, dtype=np.uint8, count=s.size, offset=off).reshape(-1, PAGE_SIZE)
                # in range by the searchsorted above; "clip" copies straight into out (the default
                # mode stages the rows in a fresh buffer first, faulted in on every call)
                np.take(ram, batch[lo:hi] - g0, axis=0, out=out[at : at + hi - lo], mode="clip")
                del ram
            at += hi - lo
        del out
        if at != len(batch):
            raise DmaError(errno.EFAULT, f"migration source: {len(batch) - at} gfn(s) of a frame outside every memslot")
        return memoryview(self._frame_buf)[:need]

    def _send(self, sock: socket.socket, parts: list[bytes | memoryview]) -> int:
        return send_parts(sock, parts)

    def _splice(self, sock: socket.socket, head: bytes, run: memoryview) -> bool:
        """Write ``head`` (copied) and ``run`` (by the native core's vmsplice and splice, no
        copy) through this source's pipe; False, with nothing written, where the kernel
        refuses vmsplice (``splice`` is then off)."""
        from .. import _native

        if self._pipe is None:
            self._pipe = os.pipe2(os.O_CLOEXEC)
            try:
                fcntl.fcntl(self._pipe[1], fcntl.F_SETPIPE_SZ, PIPE_BYTES)
            except OSError:  # beyond this user's limit: the kernel's default size
                pass
        try:
            _native.send_pages(sock.fileno(), run, sock.gettimeout(), head, self._pipe)
        except OSError as e:
            self.close_pipe()  # it may hold part of the frame
            if e.errno not in (errno.ENOSYS, errno.EPERM, errno.EINVAL) or isinstance(e, TimeoutError):
                raise
            self.splice = False
            return False
        return True

    def close_pipe(self) -> None:
        """Close the pipe the frames went through (made again when next needed)."""
        if self._pipe is not None:
            for fd in self._pipe:
                os.close(fd)
            self._pipe = None

    def _send_pages(self, sock: socket.socket, enc: Encoder, batch: np.ndarray, live: bool) -> int:
        """One PAGES frame of the gfns in ``batch``, read straight from guest RAM (see the
        module rule)."""
        gpas = batch.astype("<u8") << 12
        first, n = int(batch[0]), len(batch)
        s = self._slot_of(first)
        # sorted, no repeats: consecutive when the last is n - 1 on; the usual frame, in one slot
        one = int(batch[-1]) == first + n - 1 and (first + n) << 12 <= s.gpa + s.size
        if enc.keyed or not one:  # a copy the tag covers; scattered pages, gathered at once
            self.sent_by.add("staged copy, sendmsg")
            with self._gather(batch) as pages:
                return self._send(sock, enc.pages_frame(gpas, pages, live=live and not enc.keyed))
        size = n << 12
        region, off = self.space.region(s.hva + (first << 12) - s.gpa, size)
        with memoryview(region.map)[off : off + size] as run:
            parts = enc.pages_frame(gpas, [run], crcs=crc32c_pages(run, PAGE_SIZE), live=live)
            if not self.zero_copy or (region.fd is None and not self.splice):
                self.sent_by.add("sendmsg from RAM")
                return self._send(sock, parts)
            if self.splice:
                head_bytes = b"".join(parts[:-1])
                if self._splice(sock, head_bytes, run):
                    self.sent_by.add("vmsplice + splice")
                    return len(head_bytes) + size
            head = self._send(sock, parts[:-1])
            if region.fd is None:  # anonymous RAM, and vmsplice refused: one copy
                self.sent_by.add("sendmsg from RAM")
                return head + self._send(sock, [run])
            self.sent_by.add("sendfile")
            send_file(sock, region.fd, off, size)
            return head + size

    def _send_round(
        self,
        sock: socket.socket,
        enc: Encoder,
        gfns: np.ndarray | list[range],
        on_sent: Callable[[int, int], None] | None,
        live: bool,
    ) -> int:
        """Send ``gfns`` (sorted, no repeats; or ranges, each frame made as it is sent) as
        PAGES frames and a ROUND frame; returns bytes written.  A pre-copy round (``live``)
        keeps to ``max_bandwidth``: after each frame it waits until its bytes so far are
        due (QEMU's max-bandwidth); the final round, in the downtime, goes at full speed."""
        total = 0
        cap = self.max_bandwidth if live else None
        t0 = time.perf_counter()
        step = min(PAGES_PER_FRAME, MAX_PAGES)
        if isinstance(gfns, np.ndarray):
            batches: Iterable[np.ndarray] = (gfns[i : i + step] for i in range(0, len(gfns), step))
        else:
            batches = (np.arange(i, min(i + step, r.stop), dtype=np.int64) for r in gfns for i in range(r.start, r.stop, step))
        for batch in batches:
            n = self._send_pages(sock, enc, batch, live)
            total += n
            if on_sent is not None:
                on_sent(n, len(batch))
            if cap is not None and (due := total / cap - (time.perf_counter() - t0)) > 0:
                time.sleep(due)  # the user's rate limit itself, not a cost imitated
        return total + self._send(sock, enc.end_round())

    # -- the whole migration ---------------------------------------------------------------
    def migrate(
        self,
        sock: socket.socket,
        pause: Callable[[], None],
        *,
        resume: Callable[[], None] | None = None,
        state: Callable[[], list[tuple[str, bytes]]] | None = None,
        mac_key: bytes | None = None,
        ch: Channel | None = None,
        throttle: Callable[[int, int, int], float] | None = None,
        on_sent: Callable[[int, int], None] | None = None,
        on_round_start: Callable[[int, int], None] | None = None,
        on_round_end: Callable[[RoundStats], None] | None = None,
        on_applied: Callable[[set[int]], None] | None = None,
    ) -> MigrationReport:
        """Run pre-copy over ``sock`` to a destination that replies with :mod:`.control`
        messages (``DONE`` or ``FAIL``).

        ``pause()`` stops the guest (returns once it is quiescent); ``state()`` then gives
        the named state blobs (vCPU, device) sent after the last pages; ``resume()`` restarts
        the source guest when the migration fails after ``pause()``: the guest keeps running.
        ``ch``: the control channel already open on ``sock`` (its reader may hold replies).
        ``throttle(round, dirtied, sent)`` after each pre-copy round returns the share of
        vCPU time now taken away (auto-converge), reported per round.
        ``on_sent(bytes, pages)`` after each frame; ``on_round_start(round, pages)`` and
        ``on_round_end(stats)`` around each round; ``on_applied(resend)`` once the destination
        has applied every pre-copy round, just before the stop, with the gfns it asked for
        again (their page check failed).  Raises :class:`MigrationFailed` (the
        destination refused, hung up or stopped answering; the source guest is running).
        """
        rep = MigrationReport(npages=self.npages, page_size=self.page_size)
        enc = Encoder(self.page_size, self.layout, mac_key)
        ch = ch or Channel(sock, "destination")
        clock = time.perf_counter
        paused = False
        cpu0 = time.thread_time()
        try:
            t_start = clock()
            self._send(sock, enc.start())
            self.clear_logs()
            # round 0: every page, slot by slot (no 2 MiB array of gfns made first)
            gfns: np.ndarray | list[range] = [range(s.gpa >> 12, (s.gpa + s.size) >> 12) for s in self.slots]
            count = self.npages  # pages in this round
            h = Harvest()
            rnd = 0
            share = 0.0
            harvest_s = 0.0
            while True:
                if on_round_start is not None:
                    on_round_start(rnd, count)
                t0 = clock()
                nbytes = self._send_round(sock, enc, gfns, on_sent, live=True)
                st = RoundStats(
                    rnd, count, len(h.kvm), len(h.vfio), len(h.pinned), count, nbytes, clock() - t0,
                    throttle=share, user=len(h.user), harvest_seconds=harvest_s,
                )
                rep.rounds.append(st)
                if on_round_end is not None:
                    on_round_end(st)
                rnd += 1
                t1 = clock()
                h = self.harvest()
                harvest_s = clock() - t1
                pending = h.pages
                if len(pending) <= self.threshold or rnd >= self.max_rounds:
                    rep.converged = len(pending) <= self.threshold
                    break
                if throttle is not None:
                    share = throttle(rnd - 1, len(pending), count)
                gfns = _sorted(pending)
                count = len(gfns)
            # the destination has applied every pre-copy round: nothing of them is left to
            # drain once the guest is stopped
            acked = -1
            bad = b""
            while acked < rnd - 1:
                _tag, payload = ch.recv(control.RACK)
                acked, bad = control.parse_rack(payload)
            resend = Harvest(resend=set(self._gfns_of_pages(dirty_indices(bad)))) if bad else Harvest()
            if on_applied is not None:
                on_applied(resend.resend)
            # stop-and-copy: what the last harvest found, what came since, the pinned pages
            t_pause = clock()
            paused = True
            pause()
            t_stopped = clock()
            t1 = clock()
            h = h | self.harvest() | resend
            harvest_s = clock() - t1
            final = _sorted(h.pages)
            if on_round_start is not None:
                on_round_start(rnd, len(final))
            t0 = clock()
            nbytes = self._send_round(sock, enc, final, on_sent, live=False)
            t_pages = clock()
            if state is not None:
                for name, blob in state():
                    nbytes += self._send(sock, enc.state_frame(name, blob))
            nbytes += self._send(sock, enc.end())
            t_state = clock()
            _tag, payload = ch.recv((control.DONE, control.RACK))
            while _tag == control.RACK:  # the final round's
                _tag, payload = ch.recv((control.DONE, control.RACK))
            t_done = clock()
            st = RoundStats(
                rnd, len(final), len(h.kvm), len(h.vfio), len(h.pinned), len(final), nbytes, t_done - t0, True,
                throttle=share, user=len(h.user), harvest_seconds=harvest_s, resent=len(h.resend),
            )
            rep.rounds.append(st)
            if on_round_end is not None:
                on_round_end(st)
            rep.dest_pages, rep.dest_rounds = control.parse_done(payload)
        except (OSError, control.ControlError) as e:
            if paused and resume is not None:
                resume()
            raise self._refusal(ch, e) from e
        finally:
            self.close_pipe()
        rep.sender_cpu_seconds = time.thread_time() - cpu0
        rep.send_api = ", ".join(sorted(self.sent_by))
        rep.bytes_sent = enc.bytes
        rep.pages_sent = enc.pages
        rep.total_seconds = t_done - t_start
        rep.downtime_seconds = t_done - t_pause
        rep.downtime_parts = {
            "vCPU stop": t_stopped - t_pause,
            "last pages": t_pages - t_stopped,
            "state": t_state - t_pages,
            "destination": t_done - t_state,
        }
        return rep

    def _refusal(self, ch: Channel, err: BaseException) -> MigrationFailed:
        """The error to raise: the destination's FAIL text if it sent one."""
        if isinstance(err, DmaError) and err.errno == errno.EPROTO and "refused" in str(err):
            return MigrationFailed(errno.EPROTO, f"destination refused the stream: {str(err).split('refused: ', 1)[-1]}")
        if not isinstance(err, TimeoutError) and getattr(err, "errno", None) != errno.ETIMEDOUT:
            try:  # a destination that refused and closed: its reason is waiting to be read
                ch.sock.settimeout(1.0)
                tag, payload = ch.recv()
                if tag == control.FAIL:
                    return MigrationFailed(errno.EPROTO, f"destination refused the stream: {payload.decode(errors='replace')}")
            except OSError:
                pass
        what = getattr(err, "strerror", None) or str(err)
        return MigrationFailed(getattr(err, "errno", None) or errno.EPIPE, f"destination lost, migration cancelled: {what}")

    def digests(self) -> bytes:
        """Every page's digest, in layout order (call with the writers paused)."""
        return page_digests(self.space, [(s.hva, s.size) for s in self.slots], self.page_size)


def _sorted(gfns: set[int]) -> np.ndarray:
    out = np.fromiter(gfns, dtype=np.int64, count=len(gfns))
    out.sort()
    return out


def send_file(sock: socket.socket, fd: int, offset: int, count: int) -> None:
    """``count`` bytes of file ``fd`` from ``offset`` to ``sock`` by ``sendfile`` (the kernel
    takes references to the pages, no copy here); honours the socket's timeout."""
    timeout = sock.gettimeout()
    done = 0
    while done < count:
        try:
            k = os.sendfile(sock.fileno(), fd, offset + done, count - done)
        except BlockingIOError:  # a socket with a timeout is non-blocking underneath
            _, w, _ = select.select([], [sock], [], timeout)
            if not w:
                raise TimeoutError(f"sendfile: the peer took no data for {timeout} s") from None
            continue
        if k == 0:
            raise DmaError(errno.EFAULT, f"sendfile: file ends at offset {offset + done:#x} ({count - done:#x} bytes short)")
        done += k


IOV_MAX = 1024  # the most buffers one sendmsg takes (Linux's UIO_MAXIOV)


def send_parts(sock: socket.socket, parts: list[bytes | memoryview]) -> int:
    """Write ``parts`` in order with scatter-gather ``sendmsg`` (no joining copy), at most
    :data:`IOV_MAX` buffers a call."""
    total = sum(len(p) for p in parts)
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    i = 0
    while i < len(views):
        n = sock.sendmsg(views[i : i + IOV_MAX])
        while i < len(views) and n >= len(views[i]):
            n -= len(views[i])
            i += 1
        if n:
            views[i] = views[i][n:]
    return total


def differing_pages(src: bytes, dst: bytes, layout: Layout, page_size: int, digest_size: int) -> list[int]:
    """The gpas whose digests differ (every page, if the lengths do not match)."""
    gpas = [g + o for g, s in layout for o in range(0, s, page_size)]
    if src == dst and len(src) == len(gpas) * digest_size:
        return []
    if len(src) != len(dst) or len(src) != len(gpas) * digest_size:
        return gpas
    out = []
    for i, gpa in enumerate(gpas):
        a = i * digest_size
        if src[a : a + digest_size] != dst[a : a + digest_size]:
            out.append(gpa)
    return out
