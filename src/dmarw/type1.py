"""The type1 IOMMU container: DMA map/unmap, ``dma_rw``, dirty tracking, pinning.

One structure per concept, as in ``vfio_iommu_type1.c``: :class:`Dma` is a mapping
(``vfio_dma``), :class:`Container` the IOMMU (``vfio_iommu``); pins are a per-mapping
refcount per page (``vfio_pfn``).

Locking (the container's iommu lock, strategy chosen at construction, see
:mod:`dmarw.locks`): readers — :meth:`Container.dma_rw` and
:meth:`Container.get_dirty_bitmap` — hold the read side; every change — map, unmap, pin,
unpin, tracking start/stop — holds the write side, publishes a new immutable
:class:`_Table` and waits for a grace period (a no-op for ``mutex``/``rwsem``).  Unmap
notifiers are called with no container lock held.  Address-space references
(``get_task_mm`` or ``mmget_not_zero``) are taken inside the read side, per call.
"""

from __future__ import annotations

import bisect
import dataclasses
import errno
import itertools
import mmap
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import IntFlag
from typing import Any

from . import core as _core
from .backend import DirtyLog, IommuLock
from .bitmap import NO_DIRTY, DirtyBitmap, bitmap_bytes, set_bits
from .errors import addr, check_access, check_rw, error, fail, prot_str, rng
from .locks import STRATEGIES
from .mm import AddressSpace, Region, zeroed

IOVA_LIMIT = 1 << 64
PIN_MAX = 512  # entries per pin/unpin call, as VFIO_PIN_PAGES_MAX_ENTRIES
BITMAP_PAGES_MAX = (1 << 31) - 1  # pages one dirty bitmap may cover (INT_MAX, 256 MiB of bits)
MM_REFS = ("get_task_mm", "mmget_not_zero")

Buffer = bytes | bytearray | memoryview | mmap.mmap


class Prot(IntFlag):
    READ = 1
    WRITE = 2

    def __str__(self) -> str:
        return prot_str(self)


RW = Prot.READ | Prot.WRITE
_NEED_READ, _NEED_WRITE = int(Prot.READ), int(RW)  # what dma_rw needs, as plain ints


@dataclass(frozen=True, eq=False)
class Dma:
    """A mapping ``[iova, iova+size)`` → ``hva`` in ``space`` (``vfio_dma``)."""

    iova: int
    size: int
    hva: int
    space: AddressSpace
    region: Region
    roff: int  # offset of hva inside region
    prot: Prot
    dirty: DirtyLog = NO_DIRTY
    pins: dict[int, int] = field(default_factory=dict)  # page index → pin count
    # the access bits ``prot`` lacks, as a plain int, set once per mapping: the per-call
    # check ``need & lacks`` is then int arithmetic (an IntFlag ``&``/``~`` runs enum code
    # in Python, ~0.7 µs a call)
    lacks: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "lacks", int(RW) & ~int(self.prot))

    @property
    def end(self) -> int:
        return self.iova + self.size


@dataclass(frozen=True)
class _Table:
    """An immutable snapshot of the mappings, sorted by iova."""

    dmas: tuple[Dma, ...] = ()
    starts: tuple[int, ...] = ()
    tracking: bool = False

    @staticmethod
    def of(dmas: list[Dma], tracking: bool) -> _Table:
        dmas = sorted(dmas, key=lambda d: d.iova)
        return _Table(tuple(dmas), tuple(d.iova for d in dmas), tracking)

    def find(self, iova: int) -> Dma | None:
        i = bisect.bisect_right(self.starts, iova) - 1
        if i >= 0:
            d = self.dmas[i]
            if iova < d.end:
                return d
        return None

    def overlapping(self, iova: int, size: int) -> list[Dma]:
        end = iova + size
        i = max(bisect.bisect_right(self.starts, iova) - 1, 0)
        out = []
        for d in self.dmas[i:]:
            if d.iova >= end:
                break
            if d.end > iova:
                out.append(d)
        return out


def _prot_ok(prot: object) -> bool:
    """READ and/or WRITE, nothing else; checked on the int (``Prot(-1)`` and ``~RW`` would
    silently drop unknown bits)."""
    return isinstance(prot, int) and 0 < int(prot) and not int(prot) & ~3


def _check_range(what: str, iova: int, size: int, mask: int) -> None:
    """The shared argument rules (:func:`~dmarw.errors.check_access`), then alignment."""
    check_access(what, iova, size, empty=False)
    if (iova | size) & mask:
        raise fail(errno.EINVAL, f"{what} {rng(iova, size)}: not aligned to {mask + 1:#x}")


def _check_bitmap_pages(what: str, iova: int, size: int, shift: int) -> None:
    """A range whose bitmap would exceed ``BITMAP_PAGES_MAX`` bits is ``EINVAL`` (the kernel's
    ``verify_bitmap_size``), rather than an attempt to allocate it."""
    if size >> shift > BITMAP_PAGES_MAX:
        raise fail(errno.EINVAL, f"{what} {rng(iova, size)}: dirty bitmap over {BITMAP_PAGES_MAX} pages")


class Container:
    """A VFIO type1 container (``vfio_iommu``).  See the module docstring for locking.

    ``Container(...)`` builds the selected core's container (:mod:`dmarw.core`: the
    ``core=`` keyword, else ``$DMARW_CORE``, else native when built); ``c.core`` says which.
    This class holds the rules and is the Python core's backend (:mod:`dmarw.backend`);
    the native core is a subclass with C hooks.
    """

    core = "python"

    def __new__(cls, *args: Any, core: str | None = None, **kwargs: Any) -> Container:
        if cls is Container and _core.resolve(core) == "native":
            from .native import NativeContainer

            return NativeContainer.__new__(NativeContainer)
        return super().__new__(cls)

    def __init__(
        self,
        *,
        pgsize: int = 4096,
        lock: str = "mutex",
        mm_ref: str = "mmget_not_zero",
        core: str | None = None,
    ) -> None:
        if core is not None and _core.resolve(core) != self.core:
            raise fail(errno.EINVAL, f"core={core!r}: this is the {self.core} core's container")
        if not isinstance(pgsize, int) or pgsize < 4096 or pgsize & (pgsize - 1):
            raise fail(errno.EINVAL, f"pgsize {addr(pgsize)} must be a power of two >= 0x1000")
        if lock not in STRATEGIES:
            raise fail(errno.EINVAL, f"lock strategy {lock!r} not one of {sorted(STRATEGIES)}")
        if mm_ref not in MM_REFS:
            raise fail(errno.EINVAL, f"mm_ref {mm_ref!r} not one of {MM_REFS}")
        self.pgsize = pgsize
        self.shift = pgsize.bit_length() - 1
        self._mask = pgsize - 1
        self.lock_strategy = lock
        self.mm_ref = mm_ref
        self._table = _Table()
        self._lock: IommuLock = self._new_lock(lock, mm_ref)
        self._notifiers: dict[int, Callable[[int, int], object]] = {}
        self._notifier_ids = itertools.count(1)
        self._notifier_lock = threading.Lock()
        if mm_ref == "get_task_mm":
            self._mmget: Callable[[AddressSpace], bool] = AddressSpace.get_task_mm
        else:
            self._mmget = AddressSpace.mmget_not_zero

    # -- introspection -------------------------------------------------------------------
    @property
    def tracking(self) -> bool:
        return self._table.tracking

    def mappings(self) -> list[tuple[int, int, int, Prot]]:
        """(iova, size, hva, prot) of every mapping, sorted by iova."""
        return [(d.iova, d.size, d.hva, d.prot) for d in self._table.dmas]

    def pinned(self) -> dict[int, int]:
        """iova of each pinned page → its pin count."""
        return {
            d.iova + (p << self.shift): c for d in self._table.dmas for p, c in list(d.pins.items())
        }

    # -- the backend hooks (dmarw.backend.Type1Backend): the Python core's -----------------
    def _new_lock(self, strategy: str, mm_ref: str) -> IommuLock:
        """The iommu lock of ``strategy`` (:data:`dmarw.locks.STRATEGIES`)."""
        return STRATEGIES[strategy]()

    def _new_dirty(self, npages: int, pages: Iterable[int]) -> DirtyLog:
        """A dirty log of ``npages`` pages with ``pages`` set."""
        return DirtyBitmap(pages)

    def _install(self, table: _Table) -> None:
        """Make ``table`` the one readers see (write side held, before the grace period)."""
        self._table = table

    # -- write side helpers ---------------------------------------------------------------
    def _publish(self, table: _Table) -> None:
        """Under the write lock: make ``table`` current and wait out older readers."""
        self._install(table)
        self._lock.synchronize()

    # -- map / unmap ---------------------------------------------------------------------
    def map_dma(
        self, iova: int, size: int, hva: int, space: AddressSpace, prot: Prot = RW
    ) -> None:
        """Map ``[iova, iova+size)`` to ``hva`` in ``space`` (``VFIO_IOMMU_MAP_DMA``)."""
        _check_range("map_dma", iova, size, self._mask)
        if not isinstance(hva, int) or hva < 0 or hva & self._mask:
            raise fail(errno.EINVAL, f"map_dma {rng(iova, size)}: hva {addr(hva)} not aligned to {self.pgsize:#x}")
        if not _prot_ok(prot):
            raise fail(errno.EINVAL, f"map_dma {rng(iova, size)}: bad prot {addr(prot)} (READ, WRITE or READ|WRITE)")
        prot = Prot(prot)
        if not isinstance(space, AddressSpace):
            raise fail(errno.EINVAL, f"map_dma {rng(iova, size)}: space is not an AddressSpace")
        self._lock.write_acquire()
        try:
            table = self._table
            clash = table.overlapping(iova, size)
            if clash:
                d = clash[0]
                raise fail(errno.EEXIST, f"map_dma {rng(iova, size)} overlaps mapping {rng(d.iova, d.size)}")
            if space.closed:
                raise fail(errno.EFAULT, f"map_dma {rng(iova, size)}: hva {hva:#x}: the owner has exited")
            try:
                region, roff = space.region(hva, size)
            except OSError as e:
                raise fail(errno.EFAULT, f"map_dma {rng(iova, size)}: hva {rng(hva, size)} is not mapped") from e
            dirty = self._new_dirty(size >> self.shift, ()) if table.tracking else NO_DIRTY
            dma = Dma(iova, size, hva, space, region, roff, prot, dirty)
            self._publish(_Table.of([*table.dmas, dma], table.tracking))
        finally:
            self._lock.write_release()

    def unmap_dma(
        self, iova: int, size: int, *, get_dirty_bitmap: bool = False
    ) -> int | tuple[int, bytes]:
        """Remove every mapping inside the range; returns bytes unmapped (and the bitmap).

        Mappings with pinned pages: notifiers are called with each such mapping's (iova,
        size), without the lock; if pages are still pinned afterwards, ``EBUSY`` and nothing
        is unmapped.
        """
        _check_range("unmap_dma", iova, size, self._mask)
        if get_dirty_bitmap:
            _check_bitmap_pages("unmap_dma", iova, size, self.shift)
        for attempt in range(2):
            self._lock.write_acquire()
            try:
                table = self._table
                if get_dirty_bitmap and not table.tracking:
                    raise fail(errno.EINVAL, f"unmap_dma {rng(iova, size)}: dirty bitmap requested but tracking is off")
                victims = table.overlapping(iova, size)
                for d in victims:
                    if d.iova < iova or d.end > iova + size:
                        raise fail(
                            errno.EINVAL,
                            f"unmap_dma {rng(iova, size)} cuts mapping {rng(d.iova, d.size)}",
                        )
                busy = [(d.iova, d.size) for d in victims if d.pins]
                if not busy:
                    gone = {id(d) for d in victims}
                    if victims:  # after the grace period no reader can still mark them
                        self._publish(
                            _Table.of([d for d in table.dmas if id(d) not in gone], table.tracking)
                        )
                    bitmap = b""
                    if get_dirty_bitmap:
                        out = bytearray(bitmap_bytes(size >> self.shift))
                        for d in victims:
                            set_bits(out, d.dirty.take(), (d.iova - iova) >> self.shift)
                        bitmap = bytes(out)
                    total = sum(d.size for d in victims)
                    return (total, bitmap) if get_dirty_bitmap else total
            finally:
                self._lock.write_release()
            if attempt == 1:
                break
            with self._notifier_lock:
                notifiers = list(self._notifiers.values())
            for fn in notifiers:
                for b_iova, b_size in busy:
                    fn(b_iova, b_size)
        first = busy[0]
        raise fail(errno.EBUSY, f"unmap_dma {rng(iova, size)}: mapping {rng(*first)} still has pinned pages")

    # -- dma_rw ---------------------------------------------------------------------------
    def dma_rw(self, iova: int, buf: Buffer, write: bool) -> None:
        """Copy ``buf`` to (write) or fill it from (read) IOVA space; all-or-nothing.

        Arguments (:func:`~dmarw.errors.check_rw`): ``EINVAL`` a non-int iova, a
        non-buffer, a strided buffer, an empty one, a read into a read-only one;
        ``EOVERFLOW`` iova+len past 2**64.  Then ``EINVAL`` an uncovered byte; ``EPERM``
        missing READ (any access) or WRITE (writes), or the owner has exited; ``EFAULT``
        the host memory is gone.  A write marks pages ``off >> shift`` ..
        ``(off+len-1) >> shift`` of each mapping it touched.
        """
        mv = check_rw("dma_rw", iova, buf, fill=not write)
        n = mv.nbytes
        need = _NEED_WRITE if write else _NEED_READ
        lock = self._lock
        token = lock.read_acquire()
        try:
            table = self._table
            d = table.find(iova)
            if d is not None and iova + n <= d.end and not need & d.lacks:  # one mapping
                space = d.space
                if not self._mmget(space):
                    raise error("owner_exited", "dma_rw", iova, n)
                try:
                    if d.region.released:
                        raise error("host_gone", "dma_rw", iova, n, d.iova, d.size)
                    off = iova - d.iova
                    o = d.roff + off
                    try:
                        if write:
                            d.region.map[o : o + n] = mv
                            d.dirty.mark(off >> self.shift, (off + n - 1) >> self.shift)
                        else:
                            mv[:] = d.region.map[o : o + n]
                    except ValueError:
                        raise error("host_gone", "dma_rw", iova, n, d.iova, d.size) from None
                finally:
                    space.mmput()
                return
            self._dma_rw_chunks(table, iova, mv, n, write, need)
        finally:
            lock.read_release(token)

    def _dma_rw_chunks(
        self, table: _Table, iova: int, mv: memoryview, n: int, write: bool, need: int
    ) -> None:
        """The general case: one chunk per mapping, every chunk checked before any copy."""
        chunks: list[tuple[Dma, int, int]] = []
        pos = 0
        while pos < n:
            cur = iova + pos
            d = table.find(cur)
            if d is None:
                raise error("not_mapped", "dma_rw", iova, n, cur)
            if need & d.lacks:
                raise error("no_perm", "dma_rw", iova, n, d.iova, d.size, d.prot)
            seg = min(n - pos, d.end - cur)
            chunks.append((d, cur - d.iova, seg))
            pos += seg
        spaces: list[AddressSpace] = []
        try:
            for d, _, _ in chunks:
                if not any(s is d.space for s in spaces):
                    if not self._mmget(d.space):
                        raise error("owner_exited", "dma_rw", iova, n)
                    spaces.append(d.space)
            for d, _, _ in chunks:  # host memory munmapped under a mapping: fault before copying
                if d.region.released:
                    raise error("host_gone", "dma_rw", iova, n, d.iova, d.size)
            pos = 0
            for d, off, seg in chunks:
                o = d.roff + off
                try:
                    if write:
                        d.region.map[o : o + seg] = mv[pos : pos + seg]
                    else:
                        mv[pos : pos + seg] = d.region.map[o : o + seg]
                except ValueError:
                    raise error("host_gone", "dma_rw", iova, n, d.iova, d.size) from None
                pos += seg
            if write:
                for d, off, seg in chunks:
                    d.dirty.mark(off >> self.shift, (off + seg - 1) >> self.shift)
        finally:
            for s in spaces:
                s.mmput()

    def dma_read(self, iova: int, n: int) -> bytes:
        """Read ``n`` bytes at ``iova`` (the rules of :meth:`dma_rw`)."""
        check_access("dma_rw", iova, n, empty=False)
        buf = zeroed("dma_rw", iova, n)
        self.dma_rw(iova, buf, False)
        return bytes(buf)

    def dma_write(self, iova: int, data: Buffer) -> None:
        """Write ``data`` at ``iova`` (the rules of :meth:`dma_rw`)."""
        self.dma_rw(iova, data, True)

    # -- dirty tracking --------------------------------------------------------------------
    def dirty_pages_start(self) -> None:
        """Start tracking (idempotent): a bitmap per mapping, pinned pages pre-set."""
        self._set_tracking(True)

    def dirty_pages_stop(self) -> None:
        """Stop tracking and drop the bitmaps (idempotent)."""
        self._set_tracking(False)

    def _set_tracking(self, on: bool) -> None:
        """Under the write side: publish every mapping with a fresh bitmap (``on``) or none."""
        self._lock.write_acquire()
        try:
            table = self._table
            if table.tracking == on:
                return
            dmas = [
                dataclasses.replace(d, dirty=self._new_dirty(d.size >> self.shift, list(d.pins)) if on else NO_DIRTY)
                for d in table.dmas
            ]
            self._publish(_Table.of(dmas, on))
        finally:
            self._lock.write_release()

    def get_dirty_bitmap(self, iova: int, size: int, pgsize: int = 4096) -> bytes:
        """Get and clear the dirty bits of ``[iova, iova+size)``; pinned pages stay set."""
        _check_range("get_dirty_bitmap", iova, size, self._mask)
        if pgsize != self.pgsize:
            raise fail(errno.EINVAL, f"get_dirty_bitmap {rng(iova, size)}: pgsize {addr(pgsize)} is not the container's {self.pgsize:#x}")
        _check_bitmap_pages("get_dirty_bitmap", iova, size, self.shift)
        token = self._lock.read_acquire()
        try:
            table = self._table
            if not table.tracking:
                raise fail(errno.EINVAL, f"get_dirty_bitmap {rng(iova, size)}: dirty tracking is off")
            dmas = table.overlapping(iova, size)
            for d in dmas:
                if d.iova < iova or d.end > iova + size:
                    raise fail(errno.EINVAL, f"get_dirty_bitmap {rng(iova, size)} cuts mapping {rng(d.iova, d.size)}")
            if len(dmas) == 1 and dmas[0].iova == iova and dmas[0].size == size:  # one whole mapping
                d = dmas[0]
                return d.dirty.take_bytes(size >> self.shift, list(d.pins))
            out = bytearray(bitmap_bytes(size >> self.shift))
            for d in dmas:
                set_bits(out, d.dirty.take(list(d.pins)), (d.iova - iova) >> self.shift)
            return bytes(out)
        finally:
            self._lock.read_release(token)

    # -- pinning ---------------------------------------------------------------------------
    def register_unmap_notifier(self, fn: Callable[[int, int], object]) -> int:
        """Register ``fn(iova, size)``, called when a mapping with pins is being unmapped."""
        if not callable(fn):
            raise fail(errno.EINVAL, "register_unmap_notifier: not callable")
        with self._notifier_lock:
            handle = next(self._notifier_ids)
            self._notifiers[handle] = fn
        return handle

    def unregister_unmap_notifier(self, handle: int) -> None:
        with self._notifier_lock:
            if handle not in self._notifiers:
                raise fail(errno.EINVAL, f"unregister_unmap_notifier: no notifier {handle!r}")
            del self._notifiers[handle]

    def _pin_range(self, what: str, iova: int, npage: int) -> list[tuple[Dma, int]]:
        """(mapping, page index) of each page, after the argument checks."""
        if not isinstance(iova, int) or not isinstance(npage, int) or iova < 0 or npage <= 0:
            raise fail(errno.EINVAL, f"{what} iova {addr(iova)} npage {npage!r}: iova and npage must be ints, npage > 0")
        if iova & self._mask:
            raise fail(errno.EINVAL, f"{what} iova {iova:#x}: not aligned to {self.pgsize:#x}")
        if npage > PIN_MAX:
            raise fail(errno.E2BIG, f"{what} {rng(iova, npage << self.shift)}: {npage} pages > {PIN_MAX}")
        out = []
        table = self._table
        for i in range(npage):
            p = iova + (i << self.shift)
            d = table.find(p)
            if d is None:
                raise fail(errno.EINVAL, f"{what} {rng(iova, npage << self.shift)}: iova {p:#x} is not mapped")
            out.append((d, (p - d.iova) >> self.shift))
        return out

    def pin_pages(self, iova: int, npage: int, prot: Prot) -> list[int]:
        """Pin ``npage`` pages from ``iova``; returns each page's hva.  All or nothing."""
        size = (npage << self.shift) if isinstance(npage, int) else 0
        if not _prot_ok(prot):
            raise fail(errno.EINVAL, f"pin_pages iova {addr(iova)}: bad prot {addr(prot)} (READ, WRITE or READ|WRITE)")
        prot = Prot(prot)
        self._lock.write_acquire()
        try:
            if not self._notifiers:
                raise fail(errno.EINVAL, f"pin_pages iova {addr(iova)}: no unmap notifier registered")
            pages = self._pin_range("pin_pages", iova, npage)
            want = int(prot)
            for d, _ in pages:
                if want & d.lacks:
                    raise fail(errno.EPERM, f"pin_pages {rng(iova, size)}: mapping {rng(d.iova, d.size)} is {prot_str(d.prot)}")
            spaces: list[AddressSpace] = []
            try:
                for d, _ in pages:
                    if not any(s is d.space for s in spaces):
                        if not self._mmget(d.space):
                            raise fail(errno.EPERM, f"pin_pages {rng(iova, size)}: the owner has exited")
                        spaces.append(d.space)
                for d, _ in pages:  # get_user_pages on memory the VMM munmapped: EFAULT
                    if d.region.released:
                        raise fail(errno.EFAULT, f"pin_pages {rng(iova, size)}: host memory of mapping {rng(d.iova, d.size)} is gone")
            finally:
                for s in spaces:
                    s.mmput()
            for d, p in pages:
                d.pins[p] = d.pins.get(p, 0) + 1
                d.dirty.mark(p, p)
            return [d.hva + (p << self.shift) for d, p in pages]
        finally:
            self._lock.write_release()

    def unpin_pages(self, iova: int, npage: int) -> None:
        """Drop one pin on each page; a page not pinned is ``EINVAL`` and nothing changes."""
        self._lock.write_acquire()
        try:
            pages = self._pin_range("unpin_pages", iova, npage)
            for d, p in pages:
                if d.pins.get(p, 0) <= 0:
                    raise fail(errno.EINVAL, f"unpin_pages: iova {d.iova + (p << self.shift):#x} is not pinned")
            for d, p in pages:
                c = d.pins[p] - 1
                if c:
                    d.pins[p] = c
                else:
                    del d.pins[p]
        finally:
            self._lock.write_release()
