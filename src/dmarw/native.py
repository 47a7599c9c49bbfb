"""The native core's Python side: the Python core's classes with the hot path in C.

:class:`NativeContainer` and :class:`NativeVm` subclass :class:`~dmarw.type1.Container`
and :class:`~dmarw.kvm.Vm`; every rule, check and errno of the slow paths (map, unmap,
pin, dirty start/stop/get, memslots) is the Python core's own code.  What changes:

* the hot calls — ``dma_rw`` / ``dma_read`` / ``dma_write`` and ``read_guest`` /
  ``read_guest_into`` / ``write_guest`` — are one call into :mod:`dmarw._native`:
  translate + check the whole range + count the address-space user + copy + dirty-mark;
* the container's iommu lock (``mutex``, ``rwsem``, ``rcu``) and ``kvm.srcu`` are native
  (futex mutex / writer-preferring pthread rwlock / epoch-counted grace period), so the
  native readers and the Python writers share one lock;
* every snapshot the Python core publishes (``self._table = ...``) is converted on the way
  in: plain :class:`~dmarw.bitmap.DirtyBitmap` objects become :class:`NativeDirtyBitmap`
  (u64 words marked with atomic ``fetch_or``), and a native ``Table`` is built from the
  snapshot and installed before the grace period, under the writer's lock;
* the address-space user reference is a real atomic (:class:`dmarw._native.MmRef`, one per
  :class:`~dmarw.mm.AddressSpace`), refused once ``space.closed``; the native table holds a
  buffer export on each mapping's mmap, so its memory stays mapped while any reader may
  use it (``mmap.close`` refuses; :class:`~dmarw.mm.Region` leaves it to the GC).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from . import _native, lockstat  # type: ignore[attr-defined]
from .bitmap import DirtyBitmap, NoDirty, bitmap_bytes, from_bytes, to_bytes
from .errors import DmaError
from .kvm import Memslot, Vm
from .mm import PAGE_SHIFT, AddressSpace
from .type1 import Buffer, Container, _Table

_native.set_error_type(DmaError)
_native.set_lockstat(lockstat.__dict__)

cycles = _native.cycles
tsc_hz = _native.tsc_hz
counter_kind = _native.counter_kind
set_gil_threshold = _native.set_gil_threshold

_MM_ATTR = "_dmarw_native_mm"


def mm_ref(space: AddressSpace) -> Any:
    """The native user count of ``space`` (created on first use, kept on the space)."""
    ref = space.__dict__.get(_MM_ATTR)
    if ref is None:
        ref = space.__dict__.setdefault(_MM_ATTR, _native.MmRef())
    return ref


class NativeDirtyBitmap:
    """A dirty bitmap of ``npages`` pages as little-endian u64 words, marked atomically.

    Same interface as :class:`~dmarw.bitmap.DirtyBitmap`.  ``mark`` is one ``fetch_or``
    per word of the range; ``take`` one ``exchange`` per non-zero word, so a bit set by a
    write that completed is either reported or still set, never lost.  No lock.
    """

    __slots__ = ("npages", "words")
    tracking = True

    def __init__(self, npages: int, pages: Iterable[int] = (), words: Any = None) -> None:
        """``words``: a writable buffer of ``bitmap_bytes(npages)`` bytes to keep the bits in
        (e.g. a slice of a shared ``mmap``, so another process can harvest); default a new
        ``bytearray``."""
        self.npages = npages
        self.words = bytearray(bitmap_bytes(npages)) if words is None else words
        if len(memoryview(self.words).cast("B")) != bitmap_bytes(npages):
            raise ValueError(f"bitmap of {npages} pages needs {bitmap_bytes(npages)} bytes")
        for p in pages:
            _native.bitmap_mark(self.words, p, p)

    def mark(self, first: int, last: int) -> None:
        """Mark pages ``first`` through ``last`` inclusive."""
        _native.bitmap_mark(self.words, first, last)

    def take_bytes(self, keep: Iterable[int] = ()) -> bytes:
        """Get and clear in the kernel layout; pages in ``keep`` are set again (and reported)."""
        return bytes(_native.bitmap_take(self.words, list(keep)))

    def take(self, keep: Iterable[int] = ()) -> set[int]:
        """Get and clear; pages in ``keep`` (the pinned ones) are set again afterwards."""
        return set(from_bytes(self.take_bytes(keep)))

    def peek(self) -> set[int]:
        return set(from_bytes(_native.bitmap_peek(self.words)))


def _native_dirty(dirty: DirtyBitmap | NoDirty | NativeDirtyBitmap, npages: int) -> Any:
    """A fresh Python-core bitmap becomes a native one (same pages); others are kept."""
    if type(dirty) is DirtyBitmap:
        return NativeDirtyBitmap(npages, dirty.peek())
    return dirty


def _words(dirty: object) -> Any:
    return dirty.words if isinstance(dirty, NativeDirtyBitmap) else None


class NativeContainer(Container):
    """:class:`~dmarw.type1.Container` with the native lock and the one-call ``dma_rw``."""

    def __init__(self, *, pgsize: int = 4096, lock: str = "mutex", mm_ref: str = "mmget_not_zero") -> None:
        self._core: Any = None
        self._py_table = _Table()
        super().__init__(pgsize=pgsize, lock=lock, mm_ref=mm_ref)
        self._core = _native.Core(
            lock=lock,
            mm_ref=mm_ref,
            kvm=False,
            shift=self.shift,
            name=lock,
            read_class=lockstat.lock_class("iommu.rcu" if lock == "rcu" else "iommu.lock"),
            write_class=lockstat.lock_class("iommu.lock"),
            task_class=lockstat.lock_class("task_lock"),
        )
        self._lock = self._core  # the same lock for Python writers and native readers
        self._install(self._py_table)
        # the hot path: a bound C method, no Python frame in between (ExternalUser uses
        # native_dma_rw the same way while it is open)
        self.dma_rw = self._core.dma_rw  # type: ignore[method-assign]
        self.native_dma_rw = self._core.dma_rw

    @property
    def _table(self) -> _Table:
        return self._py_table

    @_table.setter
    def _table(self, table: _Table) -> None:
        """Called by the Python core's ``_publish`` under the write side, before the grace period."""
        if self._core is None:  # Container.__init__'s empty table
            self._py_table = table
            return
        self._install(table)

    def _install(self, table: _Table) -> None:
        dmas = tuple(
            dataclasses.replace(d, dirty=_native_dirty(d.dirty, d.size >> self.shift))
            if type(d.dirty) is DirtyBitmap
            else d
            for d in table.dmas
        )
        table = _Table(dmas, table.starts, table.tracking)
        entries = [
            (d.iova, d.size, d.region.map, d.roff, int(d.prot), _words(d.dirty), d.region, d.space, mm_ref(d.space))
            for d in dmas
        ]
        self._core.set_table(_native.Table(entries))
        self._py_table = table

    def dma_rw(self, iova: int, buf: Buffer, write: bool) -> None:
        """The native ``dma_rw`` (replaced per instance by the bound C method, which the
        inherited ``dma_read``/``dma_write`` then call: one C call each)."""
        self._core.dma_rw(iova, buf, write)

    def get_dirty_bitmap(self, iova: int, size: int, pgsize: int = 4096) -> bytes:
        """As the Python core; a single whole mapping is returned straight from its words."""
        if pgsize == self.pgsize and isinstance(iova, int) and isinstance(size, int):
            table = self._py_table
            d = table.find(iova) if table.tracking else None
            if d is not None and d.iova == iova and d.size == size and isinstance(d.dirty, NativeDirtyBitmap):
                token = self._lock.read_acquire()
                try:
                    cur = self._py_table.find(iova)
                    if cur is d:
                        return d.dirty.take_bytes(list(d.pins))
                finally:
                    self._lock.read_release(token)
        return super().get_dirty_bitmap(iova, size, pgsize)

    def lock_stats(self) -> dict[str, int]:
        """Acquisitions of the native iommu lock: ``reads`` and ``writes``."""
        stats: dict[str, int] = self._core.stats()
        return stats


class NativeVm(Vm):
    """:class:`~dmarw.kvm.Vm` with native ``kvm.srcu`` and one-call guest access."""

    def __init__(self, space: AddressSpace) -> None:
        self._core: Any = None
        self._py_table: tuple[tuple[Memslot, ...], list[int]] = ((), [])
        super().__init__(space)
        self._core = _native.Core(
            lock="srcu", kvm=True, shift=PAGE_SHIFT, name="kvm.srcu", read_class=lockstat.lock_class("kvm.srcu")
        )
        self.srcu = self._core
        self.read_guest = self._core.read_guest  # type: ignore[method-assign]
        self.read_guest_into = self._core.read_guest_into  # type: ignore[method-assign]
        self.write_guest = self._core.write_guest  # type: ignore[method-assign]

    @property
    def _table(self) -> tuple[tuple[Memslot, ...], list[int]]:
        return self._py_table

    @_table.setter
    def _table(self, table: tuple[tuple[Memslot, ...], list[int]]) -> None:
        """Called by ``set_memslot``/``close`` under ``slots_lock``, before the grace period."""
        slots = tuple(
            dataclasses.replace(s, dirty=_native_dirty(s.dirty, s.npages)) if type(s.dirty) is DirtyBitmap else s
            for s in table[0]
        )
        if self._core is not None:
            entries = [
                (s.gpa, s.size, s.region.map, s.offset, 1 if s.readonly else 3, _words(s.dirty), s.region, None, None)
                for s in slots
            ]
            self._core.set_table(_native.Table(entries))
        self._py_table = (slots, list(table[1]))

    def read_guest(self, gpa: int, n: int) -> bytes:
        """Native (replaced per instance by the bound C method)."""
        data: bytes = self._core.read_guest(gpa, n)
        return data

    def read_guest_into(self, gpa: int, buf: bytearray | memoryview) -> None:
        self._core.read_guest_into(gpa, buf)

    def write_guest(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self._core.write_guest(gpa, data)

    def get_dirty_log(self, slot: int) -> bytes:
        """Get and clear slot ``slot``'s dirty log (``ENXIO`` if it does not log)."""
        token = self._core.read_acquire()
        try:
            s = self._logging_slot(slot)
            if isinstance(s.dirty, NativeDirtyBitmap):
                return s.dirty.take_bytes()
            return to_bytes(s.dirty.take(), s.npages)
        finally:
            self._core.read_release(token)


def replay(target: Any, writes: Any, addrs: Any, sizes: Any, buf: Any = None) -> dict[str, float]:
    """Run recorded accesses through ``target``'s native path, each call timed in C.

    ``target``: a :class:`NativeVm` (``read_guest_into``/``write_guest`` rules), a
    :class:`NativeContainer` or an open ``ExternalUser`` on one (``dma_rw`` rules).
    ``writes``/``addrs``/``sizes``: u8/u64/u32 arrays (the lab's ``Records`` fields); ``buf``
    the data buffer (default: the largest size).  Returns the cycle totals and counts
    (``read_cycles``, ``reads``, ``write_cycles``, ``writes``), the per-call averages
    (``read_avg``, ``write_avg``, ``avg``) and the counter's ``timer_overhead`` (cycles of
    one counter pair, included in every call's figure).  The first failing access raises.
    """
    c = getattr(target, "container", target)
    core_ = getattr(c, "_core", None)
    if core_ is None:
        raise TypeError(f"replay: {type(target).__name__} is not on the native core")
    if buf is None:
        buf = bytearray(max(sizes, default=1))
    rc, rn, wc, wn = core_.replay(writes, addrs, sizes, buf)
    return {
        "read_cycles": rc,
        "reads": rn,
        "write_cycles": wc,
        "writes": wn,
        "read_avg": rc / rn if rn else 0.0,
        "write_avg": wc / wn if wn else 0.0,
        "avg": (rc + wc) / (rn + wn) if rn + wn else 0.0,
        "timer_overhead": _native.timer_overhead(10001),
    }


__all__ = [
    "NativeContainer",
    "NativeDirtyBitmap",
    "NativeVm",
    "counter_kind",
    "cycles",
    "mm_ref",
    "replay",
    "set_gil_threshold",
    "tsc_hz",
]
