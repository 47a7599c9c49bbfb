"""``/dev/kvm`` itself: the system fd, its capabilities, and what this machine offers.

One :class:`Kvm` per process (``system()``), opened on first use and kept: the VM fds are
created from it and the capability answers are cached (they do not change while the
module is loaded).  Thread-safe: the first opening is serialised by ``_lock``.
"""

from __future__ import annotations

import ctypes as C
import errno
import fcntl
import os
import threading
from dataclasses import dataclass, field
from typing import Any

from ..errors import fail
from . import uapi

# The architectural MSRs a guest of dmarw may touch and whose values save()/restore()
# carry; intersected with what KVM_GET_MSR_INDEX_LIST offers on this machine.
GUEST_MSRS = (
    0x10,  # IA32_TSC
    0x3B,  # IA32_TSC_ADJUST
    0x174, 0x175, 0x176,  # IA32_SYSENTER_CS/ESP/EIP
    0x1A0,  # IA32_MISC_ENABLE
    0x277,  # IA32_PAT
    0x2FF,  # IA32_MTRR_DEF_TYPE
    0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084,  # STAR, LSTAR, CSTAR, SFMASK
    0xC0000102,  # KERNEL_GS_BASE
    0xC0000103,  # TSC_AUX
)


@dataclass
class Kvm:
    """The open ``/dev/kvm``: ``fd``, the vCPU mmap size and cached capabilities."""

    fd: int
    vcpu_mmap_size: int
    _caps: dict[int, int] = field(default_factory=dict)
    _msrs: tuple[int, ...] | None = None
    _cpuid: bytes | None = None

    def cap(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION(cap)`` on the system fd (cached)."""
        if cap not in self._caps:
            self._caps[cap] = uapi.check_extension(self.fd, cap)
        return self._caps[cap]

    def require(self, cap_name: str, why: str) -> int:
        """The capability's value, or EOPNOTSUPP naming it and what needed it."""
        v = self.cap(uapi.CAPS[cap_name])
        if v <= 0:
            raise fail(errno.EOPNOTSUPP, f"{why} needs KVM_CAP_{cap_name}, which this KVM does not offer")
        return v

    def msr_index_list(self) -> tuple[int, ...]:
        """Every MSR index KVM can save and restore (``KVM_GET_MSR_INDEX_LIST``)."""
        if self._msrs is None:
            hdr = uapi.MsrListHeader(0)
            try:
                fcntl.ioctl(self.fd, uapi.KVM_GET_MSR_INDEX_LIST, hdr, True)
                n = 0
            except OSError as e:
                if e.errno != errno.E2BIG:
                    raise fail(e.errno or errno.EIO, "KVM_GET_MSR_INDEX_LIST failed") from None
                n = hdr.nmsrs

            class MsrList(C.Structure):
                _fields_ = [("nmsrs", C.c_uint32), ("indices", C.c_uint32 * max(n, 1))]

            lst = MsrList(n)
            if n:
                uapi.ioctl(self.fd, uapi.KVM_GET_MSR_INDEX_LIST, lst, "KVM_GET_MSR_INDEX_LIST")
            self._msrs = tuple(lst.indices[: lst.nmsrs])
        return self._msrs

    def guest_msrs(self) -> tuple[int, ...]:
        """The MSRs a vCPU's state carries: :data:`GUEST_MSRS` that this KVM offers."""
        offered = set(self.msr_index_list())
        return tuple(m for m in GUEST_MSRS if m in offered)

    def supported_cpuid(self) -> bytes:
        """``KVM_GET_SUPPORTED_CPUID`` as the raw ``struct kvm_cpuid2`` (header + entries)."""
        if self._cpuid is None:
            n = 64
            while True:
                class Cpuid2(C.Structure):
                    _fields_ = [("nent", C.c_uint32), ("padding", C.c_uint32), ("entries", uapi.CpuidEntry2 * n)]

                buf = Cpuid2(n)
                try:
                    fcntl.ioctl(self.fd, uapi.KVM_GET_SUPPORTED_CPUID, buf, True)
                except OSError as e:
                    if e.errno == errno.E2BIG and n < 4096:
                        n *= 2
                        continue
                    raise fail(e.errno or errno.EIO, "KVM_GET_SUPPORTED_CPUID failed") from None
                used = C.sizeof(uapi.Cpuid2Header) + buf.nent * C.sizeof(uapi.CpuidEntry2)
                self._cpuid = bytes(buf)[:used]
                break
        return self._cpuid


_lock = threading.Lock()
_kvm: Kvm | None = None


def system() -> Kvm:
    """The process's open ``/dev/kvm`` (ENODEV missing, EACCES not permitted)."""
    global _kvm
    with _lock:
        if _kvm is None:
            fd = uapi.open_kvm()
            size = fcntl.ioctl(fd, uapi.KVM_GET_VCPU_MMAP_SIZE, 0)
            _kvm = Kvm(fd, size)
        return _kvm


def dirty_modes_usable(k: Kvm) -> list[str]:
    """The ``dirty=`` modes this KVM supports."""
    out = ["bitmap"]
    if k.cap(uapi.CAP_MANUAL_DIRTY_LOG_PROTECT2) > 0:
        out.append("clear")
    if k.cap(uapi.CAP_DIRTY_LOG_RING_ACQ_REL) > 0 or k.cap(uapi.CAP_DIRTY_LOG_RING) > 0:
        out.append("ring")
    return out


def hypervisor() -> str:
    """Which KVM backend module this kernel has loaded (``kvm_intel``, ``kvm_amd``,
    ``kvm_pvm``), or ``"unknown"``."""
    found = [m for m in ("kvm_intel", "kvm_amd", "kvm_pvm") if os.path.isdir(f"/sys/module/{m}")]
    return ", ".join(found) or "unknown"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def info() -> dict[str, Any]:
    """What this machine offers: KVM's API version and capabilities, the usable dirty
    modes (or why KVM is unusable), for ``dmarw info``."""
    out: dict[str, Any] = {"dev": uapi.DEV_KVM}
    try:
        k = system()
    except OSError as e:
        out["available"] = False
        out["error"] = str(e)
        return out
    out["available"] = True
    out["module"] = hypervisor()
    out["cpu"] = cpu_model()
    out["api_version"] = fcntl.ioctl(k.fd, uapi.KVM_GET_API_VERSION, 0)
    out["vcpu_mmap_size"] = k.vcpu_mmap_size
    out["caps"] = {name: k.cap(num) for name, num in uapi.CAPS.items()}
    out["dirty_modes"] = dirty_modes_usable(k)
    out["guest_msrs"] = [f"{m:#x}" for m in k.guest_msrs()]
    return out
