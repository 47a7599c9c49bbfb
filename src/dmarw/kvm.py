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
from dataclasses import dataclass

from .bitmap import NO_DIRTY, DirtyBitmap, NoDirty, to_bytes
from .errors import fail, rng
from .locks import Mutex, Rcu
from .mm import PAGE_SHIFT, PAGE_SIZE, AddressSpace, Region

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
    dirty: DirtyBitmap | NoDirty

    @property
    def end(self) -> int:
        return self.gpa + self.size

    @property
    def npages(self) -> int:
        return self.size >> PAGE_SHIFT


class Vm:
    """A VM's guest-physical view of an :class:`AddressSpace`."""

    def __init__(self, space: AddressSpace) -> None:
        if not space.mmget_not_zero():
            raise fail(errno.EPERM, "Vm: the address space's owner has exited")
        self.space = space
        self.srcu = Rcu("kvm.srcu")
        self.slots_lock = Mutex("kvm.slots_lock")
        # one snapshot, published whole: (slots sorted by gpa, their start gpas)
        self._table: tuple[tuple[Memslot, ...], list[int]] = ((), [])
        self._closed = False

    def close(self) -> None:
        """Drop the VM's reference on the address space (idempotent)."""
        with self.slots_lock:
            if self._closed:
                return
            self._closed = True
            self._table = ((), [])
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
        for name, v in (("slot", slot), ("gpa", gpa), ("size", size), ("hva", hva)):
            if not isinstance(v, int) or v < 0:
                raise fail(errno.EINVAL, f"set_memslot: {name} {v!r} must be a non-negative int")
        if (gpa | size | hva) & _PAGE_MASK:
            raise fail(errno.EINVAL, f"set_memslot {slot}: gpa {rng(gpa, size)} hva {hva:#x} not page aligned")
        if gpa + size > 1 << 64:
            raise fail(errno.EINVAL, f"set_memslot {slot}: gpa {rng(gpa, size)} wraps")
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
                dirty: DirtyBitmap | NoDirty = DirtyBitmap() if dirty_log else NO_DIRTY
                new = [*others, Memslot(slot, gpa, size, hva, region, offset, readonly, dirty)]
            new.sort(key=lambda s: s.gpa)
            self._table = (tuple(new), [s.gpa for s in new])
            self.srcu.synchronize()

    @staticmethod
    def _find(table: tuple[tuple[Memslot, ...], list[int]], gpa: int) -> Memslot | None:
        slots, starts = table
        i = bisect.bisect_right(starts, gpa) - 1
        if i >= 0:
            s = slots[i]
            if gpa < s.end:
                return s
        return None

    # -- access ------------------------------------------------------------------------
    def _pages(self, gpa: int, n: int, write: bool) -> list[tuple[Memslot, int, int]]:
        """(slot, offset in slot, length) for each guest page of the range, or EFAULT."""
        if not isinstance(gpa, int) or gpa < 0 or gpa + n > 1 << 64:
            raise fail(errno.EFAULT, f"gpa {gpa!r}+{n:#x} is outside guest physical space")
        table = self._table
        out = []
        pos = 0
        prev: Memslot | None = None
        while pos < n:
            g = gpa + pos
            seg = min(n - pos, PAGE_SIZE - (g & _PAGE_MASK))
            s = self._find(table, g)
            if s is None:
                raise fail(errno.EFAULT, f"gpa {g:#x} (access {rng(gpa, n)}): no memslot")
            if s is not prev:  # once per slot: a slot whose host memory is gone faults up front
                if write and s.readonly:
                    raise fail(errno.EFAULT, f"gpa {g:#x} (access {rng(gpa, n)}): slot {s.slot} is read-only")
                if s.region.released:
                    raise fail(errno.EFAULT, f"gpa {g:#x} (access {rng(gpa, n)}): slot {s.slot} host memory is gone")
                prev = s
            out.append((s, g - s.gpa, seg))
            pos += seg
        return out

    def read_guest_into(self, gpa: int, buf: bytearray | memoryview) -> None:
        """Fill ``buf`` from guest memory at ``gpa`` (a read-only ``buf`` is ``EINVAL``)."""
        mv = memoryview(buf).cast("B")
        n = len(mv)
        if mv.readonly:
            raise fail(errno.EINVAL, f"read_guest_into gpa {gpa:#x}+{n:#x}: buffer is read-only")
        rec = self.srcu.read_lock()
        try:
            pages = self._pages(gpa, n, False)
            pos = 0
            try:
                for s, off, seg in pages:
                    o = s.offset + off
                    mv[pos : pos + seg] = s.region.map[o : o + seg]
                    pos += seg
            except ValueError as e:
                raise fail(errno.EFAULT, f"gpa {rng(gpa, n)}: backing mapping gone") from e
        finally:
            rec.ctr = 0

    def read_guest(self, gpa: int, n: int) -> bytes:
        buf = bytearray(n)
        self.read_guest_into(gpa, buf)
        return bytes(buf)

    def write_guest(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` to guest memory at ``gpa``, marking each page in the dirty log."""
        mv = memoryview(data).cast("B")
        n = len(mv)
        rec = self.srcu.read_lock()
        try:
            pages = self._pages(gpa, n, True)
            pos = 0
            try:
                for s, off, seg in pages:
                    o = s.offset + off
                    s.region.map[o : o + seg] = mv[pos : pos + seg]
                    pfn = off >> PAGE_SHIFT
                    s.dirty.mark(pfn, pfn)
                    pos += seg
            except ValueError as e:
                raise fail(errno.EFAULT, f"gpa {rng(gpa, n)}: backing mapping gone") from e
        finally:
            rec.ctr = 0

    # -- dirty log ---------------------------------------------------------------------
    def get_dirty_log(self, slot: int) -> bytes:
        """Get and clear slot ``slot``'s dirty log (``ENXIO`` if it does not log)."""
        rec = self.srcu.read_lock()
        try:
            s = self._logging_slot(slot)
            return to_bytes(s.dirty.take(), s.npages)
        finally:
            rec.ctr = 0

    def _logging_slot(self, slot: int) -> Memslot:
        """Memslot ``slot``, which must log dirty pages (``EINVAL`` no such slot, ``ENXIO``
        not logging); called inside the read side by each core's :meth:`get_dirty_log`."""
        for s in self._table[0]:
            if s.slot == slot:
                break
        else:
            raise fail(errno.EINVAL, f"get_dirty_log: no memslot {slot}")
        if not s.dirty.tracking:
            raise fail(errno.ENXIO, f"get_dirty_log: slot {slot} {rng(s.gpa, s.size)} does not log dirty pages")
        return s
