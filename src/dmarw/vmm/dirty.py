"""How the kernel's dirty log is harvested: one object per ``dirty=`` mode, one interface.

Each mode turns "the pages vCPUs stored to in slot S since the last harvest" into a bitmap
in the kernel's layout (bit k = page k of the slot, LSB first, u64 words) and clears what
it reported, so a page stored to again after the harvest is reported by the next one:

- ``bitmap``: ``KVM_GET_DIRTY_LOG`` (the kernel gets, clears and write-protects at once).
- ``clear``: ``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2``: ``KVM_GET_DIRTY_LOG`` only reads; the
  pages it reported are cleared and re-protected by ``KVM_CLEAR_DIRTY_LOG`` of that bitmap.
- ``ring``: ``KVM_CAP_DIRTY_LOG_RING[_ACQ_REL]``: each vCPU has a ring of (slot, page)
  entries; a harvest walks every ring (``dmarw._vmm.ring_harvest``) into per-slot pending
  bitmaps, hands the entries back and issues ``KVM_RESET_DIRTY_RINGS``; a vCPU whose ring
  fills exits with ``KVM_EXIT_DIRTY_RING_FULL`` and its ``run()`` harvests and resumes.

Ring overrun: KVM asks a vCPU to exit once its ring holds ``entries - 64`` entries, and a
hypervisor that emulates guest instructions in batches (PVM does, ``pvm_emul_batch``)
can push more than those 64 before the exit; a full ring is overwritten and pages are
lost.  A harvest that finds the whole ring dirty, or a ring-full exit with nothing to
harvest, is that overrun: it raises ``DmaError(EOVERFLOW)`` (from ``run()`` or
``get_dirty_log``) and the ring mode stays failed, rather than under-report.

Locking: ``lock`` serialises harvests (a ring-full exit on a vCPU thread against
``get_dirty_log`` on another); the rings themselves are shared with the kernel through
acquire/release on each entry's flags.
"""

from __future__ import annotations

import ctypes as C
import errno
import mmap
import threading
from typing import Any

from ..bitmap import bitmap_bytes
from ..errors import fail
from . import uapi
from .system import Kvm

try:
    from .. import _vmm
except ImportError:  # pragma: no cover - reported by KvmVm
    _vmm = None  # type: ignore[assignment]


def _address(buf: bytearray) -> int:
    return C.addressof((C.c_char * len(buf)).from_buffer(buf))


class DirtyMode:
    """The interface: :meth:`enable` once on the new VM, :meth:`add_vcpu` per vCPU,
    :meth:`harvest` per ``get_dirty_log``, :meth:`forget` when a slot goes away."""

    name = ""

    def __init__(self, kvm: Kvm, vm_fd: int) -> None:
        self.kvm = kvm
        self.vm_fd = vm_fd
        self.lock = threading.Lock()

    def enable(self) -> None:
        pass

    def add_vcpu(self, vcpu_fd: int) -> None:
        pass

    def ring_full(self) -> Any:
        """The callable the exit loop runs on KVM_EXIT_DIRTY_RING_FULL (None: not a ring)."""
        return None

    def harvest(self, slot: int, npages: int) -> bytearray:
        """Get and clear the kernel's log of ``slot`` (``npages`` pages)."""
        raise NotImplementedError

    def forget(self, slot: int) -> None:
        pass

    def close(self) -> None:
        pass

    def _get(self, slot: int, npages: int) -> bytearray:
        buf = bytearray(bitmap_bytes(npages))
        log = uapi.DirtyLog(slot=slot, dirty_bitmap=_address(buf))
        uapi.ioctl(self.vm_fd, uapi.KVM_GET_DIRTY_LOG, log, f"KVM_GET_DIRTY_LOG slot {slot}")
        return buf


class BitmapMode(DirtyMode):
    name = "bitmap"

    def harvest(self, slot: int, npages: int) -> bytearray:
        with self.lock:
            return self._get(slot, npages)


class ClearMode(DirtyMode):
    name = "clear"

    def enable(self) -> None:
        self.kvm.require("MANUAL_DIRTY_LOG_PROTECT2", 'dirty="clear"')
        cap = uapi.EnableCap(cap=uapi.CAP_MANUAL_DIRTY_LOG_PROTECT2)
        cap.args[0] = uapi.DIRTY_LOG_MANUAL_PROTECT_ENABLE  # not INITIALLY_SET: starts empty
        uapi.ioctl(self.vm_fd, uapi.KVM_ENABLE_CAP, cap, "KVM_ENABLE_CAP MANUAL_DIRTY_LOG_PROTECT2")

    def harvest(self, slot: int, npages: int) -> bytearray:
        with self.lock:
            buf = self._get(slot, npages)
            if _vmm.any_set(buf):  # re-protect exactly what was reported
                clr = uapi.ClearDirtyLog(slot=slot, num_pages=npages, first_page=0, dirty_bitmap=_address(buf))
                uapi.ioctl(self.vm_fd, uapi.KVM_CLEAR_DIRTY_LOG, clr, f"KVM_CLEAR_DIRTY_LOG slot {slot}")
            return buf


class RingMode(DirtyMode):
    name = "ring"

    def __init__(self, kvm: Kvm, vm_fd: int, entries: int | None) -> None:
        super().__init__(kvm, vm_fd)
        self.entries = entries or 0  # 0: the default, set by enable()
        self.acq_rel = False
        self._rings: list[tuple[mmap.mmap, int, list[int]]] = []  # (map, address, [fetch])
        self._pending: dict[int, bytearray] = {}
        self._npages: dict[int, int] = {}
        self.harvests = 0
        self.full_exits = 0
        self.overrun: str | None = None

    def enable(self) -> None:
        limit = self.kvm.cap(uapi.CAP_DIRTY_LOG_RING_ACQ_REL)
        cap_num = uapi.CAP_DIRTY_LOG_RING_ACQ_REL
        if limit > 0:
            self.acq_rel = True
        else:
            limit = self.kvm.require("DIRTY_LOG_RING", 'dirty="ring"')
            cap_num = uapi.CAP_DIRTY_LOG_RING
        if not self.entries:  # the default: the largest ring KVM allows, up to 65536 entries
            self.entries = min(DEFAULT_RING_ENTRIES, limit // C.sizeof(uapi.DirtyGfn))
        size = self.entries * C.sizeof(uapi.DirtyGfn)
        e = self.entries
        if e < 1 or e & (e - 1) or size < mmap.PAGESIZE or size > limit:
            raise fail(
                errno.EINVAL,
                f"ring_entries {e}: a power of two from {mmap.PAGESIZE // 16} to {limit // 16} on this KVM",
            )
        cap = uapi.EnableCap(cap=cap_num)
        cap.args[0] = size
        uapi.ioctl(self.vm_fd, uapi.KVM_ENABLE_CAP, cap, f"KVM_ENABLE_CAP DIRTY_LOG_RING {size:#x} bytes")

    def add_vcpu(self, vcpu_fd: int) -> None:
        size = self.entries * C.sizeof(uapi.DirtyGfn)
        m = mmap.mmap(vcpu_fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                      offset=uapi.DIRTY_LOG_PAGE_OFFSET * mmap.PAGESIZE)
        addr = C.addressof(C.c_char.from_buffer(m))
        with self.lock:
            self._rings.append((m, addr, [0]))

    def track(self, slot: int, npages: int) -> None:
        with self.lock:
            self._pending[slot] = bytearray(bitmap_bytes(npages))
            self._npages[slot] = npages

    def forget(self, slot: int) -> None:
        with self.lock:
            self._pending.pop(slot, None)
            self._npages.pop(slot, None)

    def _collect(self) -> int:
        """Walk every ring into the pending bitmaps and reset them (call with ``lock``)."""
        if self.overrun:
            raise fail(errno.EOVERFLOW, self.overrun)
        n = 0
        for i, (_m, addr, fetch) in enumerate(self._rings):
            fetch[0], got = _vmm.ring_harvest(addr, self.entries, fetch[0], self._pending)
            n += got
            if got >= self.entries:
                self.overrun = (
                    f"vcpu {i}'s dirty ring of {self.entries} entries overran (KVM pushed past its "
                    "soft limit; dirty pages were lost): use a larger ring_entries or another dirty= mode"
                )
        if n:
            uapi.ioctl(self.vm_fd, uapi.KVM_RESET_DIRTY_RINGS, 0, "KVM_RESET_DIRTY_RINGS")
        self.harvests += 1
        if self.overrun:
            raise fail(errno.EOVERFLOW, self.overrun)
        return n

    def _on_full(self) -> None:
        with self.lock:
            self.full_exits += 1
            if self._collect() == 0:  # KVM says full, the rings say empty: out of step
                self.overrun = (
                    f"a dirty ring of {self.entries} entries is out of step with KVM after an "
                    "overrun (dirty pages were lost): use a larger ring_entries or another dirty= mode"
                )
                raise fail(errno.EOVERFLOW, self.overrun)

    def ring_full(self) -> Any:
        return self._on_full

    def harvest(self, slot: int, npages: int) -> bytearray:
        with self.lock:
            self._collect()
            buf = self._pending.get(slot)
            if buf is None:
                return bytearray(bitmap_bytes(npages))
            self._pending[slot] = bytearray(len(buf))
            return buf

    def close(self) -> None:
        with self.lock:
            rings, self._rings = self._rings, []
        for m, _addr, _f in rings:
            try:
                m.close()
            except BufferError:  # pragma: no cover - a live export; the GC unmaps it
                pass


MODES = ("bitmap", "clear", "ring")
DEFAULT_RING_ENTRIES = 65536  # 1 MiB per vCPU: a 256 MiB working set between harvests


def make(name: str, kvm: Kvm, vm_fd: int, ring_entries: int | None) -> DirtyMode:
    if name == "bitmap":
        return BitmapMode(kvm, vm_fd)
    if name == "clear":
        return ClearMode(kvm, vm_fd)
    if name == "ring":
        return RingMode(kvm, vm_fd, ring_entries)
    raise fail(errno.EINVAL, f"dirty={name!r}: one of {', '.join(MODES)}")
