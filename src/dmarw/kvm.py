"""The KVM path: memslots, ``read_guest``/``write_guest`` page by page, the dirty log.

Locking: lookups run inside ``kvm.srcu`` read sections (lock class ``kvm.srcu``) over an
immutable memslot snapshot; :meth:`Vm.set_memslot` serialises on ``kvm.slots_lock``,
publishes a new snapshot and waits for an SRCU grace period, like ``kvm_set_memslot``.

Access rules (``kvm_read_guest``/``kvm_write_guest``): the range is walked one guest page at
a time; a page with no slot, or a write to a read-only slot, is ``EFAULT``.  Unlike the
kernel, dmarw checks every page before copying any, so a failing call moves no byte.
A write marks each page it touched in its slot's dirty log when the slot logs.
"""

from __future__ import annotations

import bisect
import errno
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from . import core as _core
from .backend import DirtyLog, IommuLock
from .bitmap import NO_DIRTY, DirtyBitmap
from .errors import addr, check_access, check_rw, error, fail, rng
from .locks import Mutex, SrcuStrategy
from .mm import PAGE_SHIFT, PAGE_SIZE, AddressSpace, Region, zeroed

_PAGE_MASK = PAGE_SIZE - 1


@dataclass(frozen=True, eq=False)
class Memslot:
    """Guest range ``[gpa, gpa+size)`` backed by ``region`` at ``offset``."""

    slot: int
    gpa: int
    size: int
    hva: int
    region: Region
    offset: int
    readonly: bool
    dirty: DirtyLog

    @property
    def end(self) -> int:
        return self.gpa + self.size

    @property
    def npages(self) -> int:
        return self.size >> PAGE_SHIFT


Snapshot = tuple[tuple[Memslot, ...], list[int]]  # (slots sorted by gpa, their start gpas)


class Vm:
    """A VM's guest-physical view of an :class:`AddressSpace`.

    ``Vm(space)`` builds the selected core's VM (:mod:`dmarw.core`; ``core=`` overrides);
    ``vm.core`` says which.  This class holds the rules and is the Python core's backend
    (:mod:`dmarw.backend`); the native core is a subclass with C hooks.
    """

    core = "python"

    def __new__(cls, *args: Any, core: str | None = None, **kwargs: Any) -> Vm:
        if cls is Vm and _core.resolve(core) == "native":
            from .native import NativeVm

            return NativeVm.__new__(NativeVm)
        return super().__new__(cls)

    def __init__(self, space: AddressSpace, *, core: str | None = None) -> None:
        if core is not None and _core.resolve(core) != self.core:
            raise fail(errno.EINVAL, f"core={core!r}: this is the {self.core} core's VM")
        if not isinstance(space, AddressSpace):
            raise fail(errno.EINVAL, f"Vm: {type(space).__name__} is not an AddressSpace")
        if not space.mmget_not_zero():
            raise fail(errno.EPERM, "Vm: the address space's owner has exited")
        self.space = space
        self.slots_lock = Mutex("kvm.slots_lock")
        # one snapshot, published whole
        self._table: Snapshot = ((), [])
        self.srcu: IommuLock = self._new_lock()
        self._closed = False

    # -- the backend hooks (dmarw.backend.KvmBackend): the Python core's -------------------
    def _new_lock(self) -> IommuLock:
        """``kvm.srcu``: the read side of guest accesses and the grace period of updates."""
        return SrcuStrategy()

    def _new_dirty(self, npages: int, pages: Iterable[int]) -> DirtyLog:
        return DirtyBitmap(pages)

    def _install(self, table: Snapshot) -> None:
        """Make ``table`` the one readers see (``slots_lock`` held, before the grace period)."""
        self._table = table

    def close(self) -> None:
        """Drop the VM's reference on the address space (idempotent)."""
        with self.slots_lock:
            if self._closed:
                return
            self._closed = True
            self._install(((), []))
        self.srcu.synchronize()
        self.space.mmput()

    # -- memslots ------------------------------------------------------------------------
    def memslots(self) -> tuple[Memslot, ...]:
        return self._table[0]

    def set_memslot(
        self,
        slot: int,
        gpa: int,
        size: int,
        hva: int,
        *,
        readonly: bool = False,
        dirty_log: bool = False,
    ) -> None:
        """Create, replace (same id) or, with ``size == 0``, delete memslot ``slot``."""
        for name, v in (("slot", slot), ("hva", hva)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise fail(errno.EINVAL, f"set_memslot: {name} {addr(v)} must be a non-negative int")
        check_access(f"set_memslot {slot}", gpa, size, "gpa", True)
        if (gpa | size | hva) & _PAGE_MASK:
            raise fail(errno.EINVAL, f"set_memslot {slot}: gpa {rng(gpa, size)} hva {hva:#x} not page aligned")
        with self.slots_lock:
            if self._closed:
                raise fail(errno.EFAULT, "set_memslot: the VM is closed")
            current = self._table[0]
            others = [s for s in current if s.slot != slot]
            if size == 0:
                if len(others) == len(current):
                    raise fail(errno.EINVAL, f"delete memslot {slot}: no such slot")
                new = others
            else:
                for s in others:
                    if gpa < s.end and s.gpa < gpa + size:
                        raise fail(
                            errno.EEXIST,
                            f"memslot {slot} gpa {rng(gpa, size)} overlaps slot {s.slot} {rng(s.gpa, s.size)}",
                        )
                region, offset = self.space.region(hva, size)
                dirty = self._new_dirty(size >> PAGE_SHIFT, ()) if dirty_log else NO_DIRTY
                new = [*others, Memslot(slot, gpa, size, hva, region, offset, readonly, dirty)]
            new.sort(key=lambda s: s.gpa)
            self._install((tuple(new), [s.gpa for s in new]))
            self.srcu.synchronize()

    @staticmethod
    def _find(table: Snapshot, gpa: int) -> Memslot | None:
        slots, starts = table
        i = bisect.bisect_right(starts, gpa) - 1
        if i >= 0:
            s = slots[i]
            if gpa < s.end:
                return s
        return None

    # -- access ------------------------------------------------------------------------
    def _pages(self, op: str, gpa: int, n: int, write: bool) -> list[tuple[Memslot, int, int]]:
        """(slot, offset in slot, length) for each guest page of the range, or EFAULT."""
        table = self._table
        out = []
        pos = 0
        prev: Memslot | None = None
        while pos < n:
            g = gpa + pos
            seg = min(n - pos, PAGE_SIZE - (g & _PAGE_MASK))
            s = self._find(table, g)
            if s is None:
                raise error("no_memslot", op, gpa, n, g)
            if s is not prev:  # once per slot: a slot whose host memory is gone faults up front
                if write and s.readonly:
                    raise error("slot_read_only", op, gpa, n, g, s.slot)
                if s.region.released:
                    raise error("slot_gone", op, gpa, n, g, s.slot)
                prev = s
            out.append((s, g - s.gpa, seg))
            pos += seg
        return out

    def _access(self, op: str, gpa: int, mv: memoryview, write: bool) -> None:
        """Under ``kvm.srcu``: every page checked (:meth:`_pages`), then copied; a write
        marks each page in its slot's dirty log."""
        n = mv.nbytes
        token = self.srcu.read_acquire()
        try:
            pages = self._pages(op, gpa, n, write)
            pos = 0
            for s, off, seg in pages:
                o = s.offset + off
                try:
                    if write:
                        s.region.map[o : o + seg] = mv[pos : pos + seg]
                        pfn = off >> PAGE_SHIFT
                        s.dirty.mark(pfn, pfn)
                    else:
                        mv[pos : pos + seg] = s.region.map[o : o + seg]
                except ValueError:
                    raise error("slot_gone", op, gpa, n, gpa + pos, s.slot) from None
                pos += seg
        finally:
            self.srcu.read_release(token)

    def read_guest_into(self, gpa: int, buf: bytearray | memoryview) -> None:
        """Fill ``buf`` from guest memory at ``gpa`` (a read-only ``buf`` is ``EINVAL``)."""
        self._access("read_guest_into", gpa, check_rw("read_guest_into", gpa, buf, True, "gpa", True, True), False)

    def read_guest(self, gpa: int, n: int) -> bytes:
        """``n`` bytes of guest memory at ``gpa``."""
        check_access("read_guest", gpa, n, "gpa", True, True)
        buf = zeroed("read_guest", gpa, n)
        self._access("read_guest", gpa, memoryview(buf), False)
        return bytes(buf)

    def write_guest(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` to guest memory at ``gpa``, marking each page in the dirty log."""
        self._access("write_guest", gpa, check_rw("write_guest", gpa, data, False, "gpa", True, True), True)

    # -- dirty log ---------------------------------------------------------------------
    def get_dirty_log(self, slot: int) -> bytes:
        """Get and clear slot ``slot``'s dirty log (``ENXIO`` if it does not log)."""
        token = self.srcu.read_acquire()
        try:
            s = self._logging_slot(slot)
            return s.dirty.take_bytes(s.npages)
        finally:
            self.srcu.read_release(token)

    def _logging_slot(self, slot: int) -> Memslot:
        """Memslot ``slot``, which must log dirty pages (``EINVAL`` no such slot, ``ENXIO``
        not logging); called inside the read side."""
        if not isinstance(slot, int) or isinstance(slot, bool):
            raise fail(errno.EINVAL, f"get_dirty_log: slot {slot!r} is not an int")
        for s in self._table[0]:
            if s.slot == slot:
                break
        else:
            raise fail(errno.EINVAL, f"get_dirty_log: no memslot {slot}")
        if not s.dirty.tracking:
            raise fail(errno.ENXIO, f"get_dirty_log: slot {slot} {rng(s.gpa, s.size)} does not log dirty pages")
        return s
