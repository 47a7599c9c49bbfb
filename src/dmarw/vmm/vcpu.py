"""A vCPU: its registers, its start mode, ``run()`` through the native exit loop, ``kick()``.

Start modes: ``"protected"`` is 32-bit flat (CR0.PE|ET|NE, paging off, CS a 32-bit code
segment and DS/ES/FS/GS/SS 32-bit data segments, all base 0, limit 4 GiB, granular; CR4
OSFXSR|OSXMMEXCPT so SSE works);
``"real"`` is real mode with every segment at base 0 (so ``rip`` is the guest-physical
address).  Both start with ``rflags`` = 0x2 and ``rip`` = 0; set ``rip`` to the entry.

Threads: ``run()`` belongs to one thread at a time (the vCPU thread); ``kick()`` may come
from any thread and makes the running ``run()`` (or, if none runs, the next one) return
an ``"intr"`` exit.  ``save()``/``restore()``/register access need the vCPU stopped.
"""

from __future__ import annotations

import ctypes as C
import errno
import os
from typing import TYPE_CHECKING, Any

from ..errors import DmaError, fail
from . import state, uapi
from .exits import Exit, decode

if TYPE_CHECKING:
    from .vm import KvmVm

MODES = ("protected", "real")
_U64 = 1 << 64


class Vcpu:
    """One vCPU of a :class:`~dmarw.vmm.vm.KvmVm` (create with ``vm.create_vcpu()``)."""

    def __init__(self, vm: KvmVm, index: int, fd: int, loop: Any, mode: str) -> None:
        self.vm = vm
        self.index = index
        self.fd = fd
        self.mode = mode
        self._loop = loop
        self._closed = False
        self._set_cpuid()
        self._set_mode(mode)

    # -- set-up ---------------------------------------------------------------------------
    def _set_cpuid(self) -> None:
        raw = bytearray(self.vm.kvm.supported_cpuid())
        buf = (C.c_char * len(raw)).from_buffer(raw)
        uapi.ioctl(self.fd, uapi.KVM_SET_CPUID2, buf, "KVM_SET_CPUID2")

    def _set_mode(self, mode: str) -> None:
        s = self.get_sregs()
        for name in ("cs", "ds", "es", "fs", "gs", "ss"):
            seg: uapi.Segment = getattr(s, name)
            seg.base = 0
            if mode == "protected":
                seg.limit, seg.g, seg.db, seg.s, seg.present, seg.dpl, seg.l = 0xFFFFFFFF, 1, 1, 1, 1, 0, 0
                seg.selector, seg.type = (0x8, 0xB) if name == "cs" else (0x10, 0x3)
            else:
                seg.selector, seg.limit = 0, 0xFFFF
        if mode == "protected":
            s.cr0 = 0x31  # PE | ET | NE; PG off
            s.cr4 = 0x600  # OSFXSR | OSXMMEXCPT: SSE usable
        self.set_sregs(s)
        regs = uapi.Regs()
        regs.rflags = 0x2
        self._put_regs(regs)

    # -- registers ------------------------------------------------------------------------
    def _regs(self) -> uapi.Regs:
        r = uapi.Regs()
        uapi.ioctl(self.fd, uapi.KVM_GET_REGS, r, "KVM_GET_REGS")
        return r

    def _put_regs(self, r: uapi.Regs) -> None:
        uapi.ioctl(self.fd, uapi.KVM_SET_REGS, r, "KVM_SET_REGS")

    def get_regs(self) -> dict[str, int]:
        """The general registers, ``rip`` and ``rflags``, by name (``rax`` … ``r15``)."""
        r = self._regs()
        return {n: getattr(r, n) for n in uapi.REG_NAMES}

    def set_regs(self, **regs: int) -> None:
        """Set the named registers, leaving the others (unknown name or a value outside
        u64: EINVAL, nothing set)."""
        for name, v in regs.items():
            if name not in uapi.REG_NAMES:
                raise fail(errno.EINVAL, f"set_regs: no register {name!r} (one of {', '.join(uapi.REG_NAMES)})")
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < _U64:
                raise fail(errno.EINVAL, f"set_regs: {name}={v!r} is not a u64")
        r = self._regs()
        for name, v in regs.items():
            setattr(r, name, v)
        self._put_regs(r)

    @property
    def rip(self) -> int:
        return self._regs().rip

    @rip.setter
    def rip(self, value: int) -> None:
        self.set_regs(rip=value)

    def get_sregs(self) -> uapi.Sregs:
        s = uapi.Sregs()
        uapi.ioctl(self.fd, uapi.KVM_GET_SREGS, s, "KVM_GET_SREGS")
        return s

    def set_sregs(self, s: uapi.Sregs) -> None:
        uapi.ioctl(self.fd, uapi.KVM_SET_SREGS, s, "KVM_SET_SREGS")

    # -- running --------------------------------------------------------------------------
    def run(self) -> Exit:
        """Run until an exit that no device serves; MMIO and port accesses in a range of
        ``vm.add_mmio``/``vm.add_pio`` and full dirty rings are handled inside."""
        self._check()
        try:
            return decode(self._loop.run())
        except DmaError:
            raise
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise fail(errno.EBUSY, f"vcpu {self.index} is already running in another thread") from None
            raise fail(e.errno or errno.EIO, f"KVM_RUN vcpu {self.index} (refused by KVM)") from None

    def run_bare(self) -> Exit:
        """As :meth:`run` but every MMIO/port exit is served in C without a device (reads
        load 0): the floor the benchmarks compare device dispatch against."""
        self._check()
        return decode(self._loop.run_bare())

    def kick(self) -> None:
        """Make the running (or the next) :meth:`run` return ``"intr"``; any thread."""
        self._check()
        self._loop.kick()

    def complete(self, value: int | bytes) -> None:
        """Answer the read exit just returned (MMIO read or port ``in``): the guest loads
        ``value`` (an int of the access's size, or the raw little-endian bytes; EINVAL
        when the last exit is no read or the size differs)."""
        self._check()
        size = self._loop.pending_read
        if size == 0:
            name = uapi.EXIT_NAMES.get(self._loop.exit_reason, "?")
            raise fail(errno.EINVAL, f"complete: the last exit ({name}) is no pending read")
        data = value
        if isinstance(value, int):
            try:
                data = value.to_bytes(size, "little")
            except OverflowError:
                raise fail(errno.EINVAL, f"complete: {value:#x} does not fit the {size}-byte read") from None
        try:
            self._loop.complete(data)
        except (ValueError, TypeError) as e:
            raise fail(errno.EINVAL, str(e)) from None

    @property
    def stats(self) -> dict[str, int]:
        """Exits served inside ``run()`` (mmio, pio, ring_full) and KVM_RUN entries."""
        return dict(self._loop.stats())

    # -- state ----------------------------------------------------------------------------
    def save(self) -> bytes:
        """The vCPU's state as a versioned blob (see :mod:`dmarw.vmm.state`).  A pending
        MMIO/port completion is first finished with an immediate-exit KVM_RUN, as the KVM
        API asks before state is read."""
        self._check()
        self._loop.immediate_exit = 1
        self._loop.run()  # returns at once ("intr"); clears immediate_exit
        return state.save(self)

    def restore(self, data: bytes) -> None:
        """Load a blob from :meth:`save` (wrong version, size or garbage: EINVAL, nothing
        loaded)."""
        self._check()
        state.restore(self, data)

    def _check(self) -> None:
        if self._closed:
            raise fail(errno.EBADF, f"vcpu {self.index} is closed")

    @property
    def running(self) -> bool:
        """True while a thread is inside :meth:`run`."""
        return not self._closed and bool(self._loop.running)

    def close(self) -> None:
        """Unmap and close (idempotent); EBUSY while a thread is in :meth:`run` — kick it
        and join that thread first."""
        if self._closed:
            return
        if self._loop.running:
            raise fail(errno.EBUSY, f"close: vcpu {self.index} is running; kick() it and join its thread first")
        self._closed = True
        self._loop.close()
        os.close(self.fd)
