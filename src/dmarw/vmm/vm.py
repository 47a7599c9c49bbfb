"""``KvmVm``: a real KVM VM over an :class:`~dmarw.mm.AddressSpace`.

Memory: the memslot API and rules of :class:`dmarw.Vm` (which ``KvmVm`` keeps inside as its
user-space view and validator): ``set_memslot`` (size 0 deletes; unaligned EINVAL; overlap
EEXIST; a slot over an MMIO range EEXIST; a slot id at or past KVM's limit EINVAL) is
applied to that view first, then to the kernel (``KVM_SET_USER_MEMORY_REGION``), and a
kernel refusal undoes the view and raises the kernel's errno.  Replacing a slot with
other geometry is a delete and a create in the kernel (a running vCPU may see the gap).

Guest access: ``read_guest``/``read_guest_into``/``write_guest`` go through the view, as a
VMM's device model reaches guest RAM through its own mapping.  KVM does not see those
writes, so the view logs them itself; ``get_dirty_log(slot)`` is the get-and-clear of the
union of the kernel's log (vCPU stores, harvested per ``dirty=`` mode) and that log.

Locking: ``_lock`` serialises memslot and bus changes and vCPU creation; guest access and
dirty-log harvests take no VM lock (the view and the mode have their own).
"""

from __future__ import annotations

import errno
import os
import threading
from typing import Any

from .. import core as cores
from ..errors import fail, rng
from ..mm import AddressSpace
from . import dirty as dirty_modes
from . import uapi
from .bus import DeviceBus
from .system import Kvm, dirty_modes_usable, system
from .vcpu import MODES, Vcpu

try:
    from .. import _vmm
except ImportError:  # pragma: no cover - the extension is optional at install time
    _vmm = None  # type: ignore[assignment]

# The harvest measured fastest at 1 % dirty pages of a 1 GiB guest (bench/vmm_harvest.py,
# docs/vmm.md); where KVM lacks its capability the default falls back to "bitmap".
DEFAULT_DIRTY = "clear"
_TSS_ADDR = 0xFFFBD000  # three pages just under the BIOS area, as QEMU places them


def native_available() -> bool:
    return _vmm is not None


class KvmVm:
    """A KVM VM: memslots, guest access with a user-space dirty log, devices, vCPUs.

    ``dirty``: ``"bitmap"``, ``"clear"`` or ``"ring"`` (see :mod:`dmarw.vmm.dirty`); None is
    :data:`DEFAULT_DIRTY` where KVM offers it, else ``"bitmap"``.  ``ring_entries``: the
    per-vCPU ring of ``"ring"`` (a power of two; default the largest KVM allows, at most
    65536).  ``core``: the core of the user-space view (``dmarw.core``'s selection).
    """

    def __init__(self, space: AddressSpace, *, dirty: str | None = None, ring_entries: int | None = None,
                 core: str | None = None) -> None:
        if _vmm is None:
            raise fail(errno.EOPNOTSUPP, "KvmVm needs the native vCPU loop dmarw._vmm, which is not built")
        if dirty is not None and dirty not in dirty_modes.MODES:
            raise fail(errno.EINVAL, f"dirty={dirty!r}: one of {', '.join(dirty_modes.MODES)}")
        if ring_entries is not None and (not isinstance(ring_entries, int) or isinstance(ring_entries, bool)):
            raise fail(errno.EINVAL, f"ring_entries {ring_entries!r} must be an int")
        self.kvm: Kvm = system()
        if dirty is None:
            dirty = DEFAULT_DIRTY if DEFAULT_DIRTY in dirty_modes_usable(self.kvm) else "bitmap"
        try:
            self.fd = uapi.ioctl(self.kvm.fd, uapi.KVM_CREATE_VM, 0, "KVM_CREATE_VM")
        except OSError as e:
            raise fail(e.errno or errno.ENODEV, f"KVM_CREATE_VM: {os.strerror(e.errno or 0)}") from None
        self._lock = threading.Lock()
        self._vcpus: list[Vcpu] = []
        self._kslots: dict[int, tuple[int, int, int, int]] = {}  # slot -> (gpa, size, hva, flags)
        self._closed = False
        try:
            try:
                uapi.ioctl_ulong(self.fd, uapi.KVM_SET_TSS_ADDR, _TSS_ADDR, "KVM_SET_TSS_ADDR")
            except OSError:
                pass  # only real mode on VMX without unrestricted guest needs it
            self.dirty_mode = dirty_modes.make(dirty, self.kvm, self.fd, ring_entries)
            self.dirty_mode.enable()
            self.max_slots = self.kvm.cap(uapi.CAP_NR_MEMSLOTS) or 32
            self.mmio = DeviceBus("mmio", 1 << 64, _vmm.Bus())
            self.pio = DeviceBus("pio", 1 << 16, _vmm.Bus())
            self.view = cores.vm(space, core)
        except BaseException:
            os.close(self.fd)
            raise
        self.space = space
        # the view's guest access, bound once (the native core's are C functions)
        self.read_guest = self.view.read_guest
        self.read_guest_into = self.view.read_guest_into
        self.write_guest = self.view.write_guest

    @property
    def dirty(self) -> str:
        return self.dirty_mode.name

    # -- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
        """Close the vCPUs and the VM and drop the address-space reference (idempotent;
        EBUSY, changing nothing, while a vCPU is running)."""
        with self._lock:
            if self._closed:
                return
            busy = [v.index for v in self._vcpus if v.running]
            if busy:
                raise fail(errno.EBUSY, f"close: vcpus {busy} are running; kick() them and join their threads first")
            self._closed = True
            vcpus, self._vcpus = self._vcpus, []
        for v in vcpus:
            v.close()
        self.dirty_mode.close()
        os.close(self.fd)
        self.view.close()

    def __enter__(self) -> KvmVm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise fail(errno.EFAULT, f"{what}: the VM is closed")

    # -- memslots -------------------------------------------------------------------------
    def memslots(self) -> tuple[Any, ...]:
        return self.view.memslots()

    def set_memslot(self, slot: int, gpa: int, size: int, hva: int, *, readonly: bool = False,
                    dirty_log: bool = False) -> None:
        """Create, replace (same id) or, with ``size == 0``, delete memslot ``slot``."""
        with self._lock:
            self._check_open("set_memslot")
            if isinstance(slot, int) and not isinstance(slot, bool) and slot >= self.max_slots:
                raise fail(errno.EINVAL, f"set_memslot {slot}: KVM allows slot ids below {self.max_slots}")
            if readonly and size and self.kvm.cap(uapi.CAP_READONLY_MEM) <= 0:
                raise fail(errno.EOPNOTSUPP, f"set_memslot {slot}: read-only slots need KVM_CAP_READONLY_MEM")
            if isinstance(gpa, int) and isinstance(size, int) and size > 0 and gpa >= 0:
                dev = self.mmio.overlapping(gpa, size)
                if dev is not None:
                    raise fail(errno.EEXIST, f"memslot {slot} gpa {rng(gpa, size)} overlaps MMIO range {rng(dev.start, dev.size)}")
            old = next((s for s in self.view.memslots() if s.slot == slot), None)
            self.view.set_memslot(slot, gpa, size, hva, readonly=readonly, dirty_log=dirty_log)
            flags = (uapi.MEM_LOG_DIRTY_PAGES if dirty_log else 0) | (uapi.MEM_READONLY if readonly else 0)
            try:
                self._kernel_set(slot, gpa, size, hva, flags)
            except OSError:
                if old is None:
                    self.view.set_memslot(slot, 0, 0, 0)
                else:
                    self.view.set_memslot(old.slot, old.gpa, old.size, old.hva, readonly=old.readonly,
                                          dirty_log=old.dirty.tracking)
                raise

    def _kernel_set(self, slot: int, gpa: int, size: int, hva: int, flags: int) -> None:
        old = self._kslots.get(slot)
        mode = self.dirty_mode
        if old is not None and (size == 0 or old[:3] != (gpa, size, hva) or (old[3] ^ flags) & uapi.MEM_READONLY):
            self._region(slot, 0, 0, 0, 0)
            del self._kslots[slot]
            mode.forget(slot)
            old = None
        if size == 0:
            return
        try:
            self._region(slot, gpa, size, hva, flags)
        except OSError:
            if old is None and slot in self._kslots:  # pragma: no cover - defensive
                del self._kslots[slot]
            raise
        self._kslots[slot] = (gpa, size, hva, flags)
        if isinstance(mode, dirty_modes.RingMode):
            if flags & uapi.MEM_LOG_DIRTY_PAGES:
                mode.track(slot, size >> 12)
            else:
                mode.forget(slot)

    def _region(self, slot: int, gpa: int, size: int, hva: int, flags: int) -> None:
        r = uapi.UserspaceMemoryRegion(slot=slot, flags=flags, guest_phys_addr=gpa, memory_size=size,
                                       userspace_addr=hva)
        uapi.ioctl(self.fd, uapi.KVM_SET_USER_MEMORY_REGION, r,
                   f"KVM_SET_USER_MEMORY_REGION slot {slot} gpa {rng(gpa, size)} hva {hva:#x}")

    # -- dirty log ------------------------------------------------------------------------
    def get_dirty_log(self, slot: int) -> bytes:
        """Get and clear slot ``slot``'s log: the pages vCPUs stored to (the kernel's log)
        OR the pages ``write_guest`` wrote (EINVAL no such slot, ENXIO not logging)."""
        kernel, user = self._harvest(slot)
        if _vmm.any_set(user):
            _vmm.or_into(kernel, user)
        return bytes(kernel)

    def get_dirty_logs(self, slot: int) -> tuple[bytes, bytes]:
        """As :meth:`get_dirty_log`, the two logs apart: ``(kernel, user)`` — the pages
        vCPUs stored to and the pages ``write_guest`` wrote, both got and cleared."""
        kernel, user = self._harvest(slot)
        return bytes(kernel), bytes(user)

    def _harvest(self, slot: int) -> tuple[bytearray, bytes]:
        user = self.view.get_dirty_log(slot)  # validates: EINVAL / ENXIO
        s = next(s for s in self.view.memslots() if s.slot == slot)
        return self.dirty_mode.harvest(slot, s.npages), user

    # -- devices --------------------------------------------------------------------------
    def add_mmio(self, gpa: int, size: int, device: Any) -> None:
        """Serve guest accesses to ``[gpa, gpa+size)`` with ``device.mmio_read(offset, size)
        -> int`` / ``device.mmio_write(offset, size, value)`` (EEXIST over a memslot or
        another MMIO range)."""
        with self._lock:
            self._check_open("add_mmio")
            self.mmio.check(gpa, size, device)
            for s in self.view.memslots():
                if gpa < s.gpa + s.size and s.gpa < gpa + size:
                    raise fail(errno.EEXIST, f"add_mmio {rng(gpa, size)} overlaps memslot {s.slot} {rng(s.gpa, s.size)}")
            self.mmio.add(gpa, size, device)

    def add_pio(self, port: int, count: int, device: Any) -> None:
        """Serve ports ``[port, port+count)`` with ``device.pio_read(offset, size) -> int`` /
        ``device.pio_write(offset, size, value)`` (EEXIST over another port range)."""
        with self._lock:
            self._check_open("add_pio")
            self.pio.add(port, count, device)

    def remove_mmio(self, gpa: int) -> None:
        with self._lock:
            self.mmio.remove(gpa)

    def remove_pio(self, port: int) -> None:
        with self._lock:
            self.pio.remove(port)

    # -- vCPUs ----------------------------------------------------------------------------
    def create_vcpu(self, mode: str = "protected") -> Vcpu:
        """A new vCPU in ``mode`` (``"protected"``: 32-bit flat; ``"real"``)."""
        if mode not in MODES:
            raise fail(errno.EINVAL, f"create_vcpu: mode {mode!r} is one of {', '.join(MODES)}")
        with self._lock:
            self._check_open("create_vcpu")
            index = len(self._vcpus)
            fd = uapi.ioctl(self.fd, uapi.KVM_CREATE_VCPU, index, f"KVM_CREATE_VCPU {index}")
            try:
                loop = _vmm.VcpuLoop(fd, self.kvm.vcpu_mmap_size, self.mmio.native, self.pio.native,
                                     self.dirty_mode.ring_full())
                self.dirty_mode.add_vcpu(fd)
                vcpu = Vcpu(self, index, fd, loop, mode)
            except BaseException:
                os.close(fd)
                raise
            self._vcpus.append(vcpu)
            return vcpu

    @property
    def vcpus(self) -> tuple[Vcpu, ...]:
        return tuple(self._vcpus)
