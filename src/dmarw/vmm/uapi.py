"""The KVM user-space ABI (x86-64) that dmarw.vmm speaks: ioctl numbers, structs, constants.

Numbers follow ``<linux/kvm.h>``; the ioctl numbers are built from the struct sizes the
way ``_IOW``/``_IOR`` build them, and the test suite checks them against the header's
values as compiled into ``dmarw._vmm``.
"""

from __future__ import annotations

import ctypes as C
import errno
import fcntl
import os

from ..errors import DmaError, fail

KVMIO = 0xAE
API_VERSION = 12

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _iow(nr: int, t: type) -> int:
    return _ioc(_IOC_WRITE, nr, C.sizeof(t))


def _ior(nr: int, t: type) -> int:
    return _ioc(_IOC_READ, nr, C.sizeof(t))


def _iowr(nr: int, t: type) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, C.sizeof(t))


u8, u16, u32, u64 = C.c_uint8, C.c_uint16, C.c_uint32, C.c_uint64


class UserspaceMemoryRegion(C.Structure):
    _fields_ = [("slot", u32), ("flags", u32), ("guest_phys_addr", u64),
                ("memory_size", u64), ("userspace_addr", u64)]


class DirtyLog(C.Structure):
    _fields_ = [("slot", u32), ("padding1", u32), ("dirty_bitmap", u64)]


class ClearDirtyLog(C.Structure):
    _fields_ = [("slot", u32), ("num_pages", u32), ("first_page", u64), ("dirty_bitmap", u64)]


class EnableCap(C.Structure):
    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


REG_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")


class Regs(C.Structure):
    _fields_ = [(n, u64) for n in REG_NAMES]


class Segment(C.Structure):
    _fields_ = [("base", u64), ("limit", u32), ("selector", u16), ("type", u8),
                ("present", u8), ("dpl", u8), ("db", u8), ("s", u8), ("l", u8), ("g", u8),
                ("avl", u8), ("unusable", u8), ("padding", u8)]


class DTable(C.Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


class Sregs(C.Structure):
    _fields_ = [("cs", Segment), ("ds", Segment), ("es", Segment), ("fs", Segment),
                ("gs", Segment), ("ss", Segment), ("tr", Segment), ("ldt", Segment),
                ("gdt", DTable), ("idt", DTable), ("cr0", u64), ("cr2", u64), ("cr3", u64),
                ("cr4", u64), ("cr8", u64), ("efer", u64), ("apic_base", u64),
                ("interrupt_bitmap", u64 * 4)]


class Fpu(C.Structure):
    _fields_ = [("fpr", u8 * 128), ("fcw", u16), ("fsw", u16), ("ftwx", u8), ("pad1", u8),
                ("last_opcode", u16), ("last_ip", u64), ("last_dp", u64), ("xmm", u8 * 256),
                ("mxcsr", u32), ("pad2", u32)]


class Xsave(C.Structure):
    _fields_ = [("region", u32 * 1024)]


class Xcr(C.Structure):
    _fields_ = [("xcr", u32), ("reserved", u32), ("value", u64)]


class Xcrs(C.Structure):
    _fields_ = [("nr_xcrs", u32), ("flags", u32), ("xcrs", Xcr * 16), ("padding", u64 * 16)]


class VcpuEvents(C.Structure):
    _fields_ = [("raw", u8 * 64)]


class DebugRegs(C.Structure):
    _fields_ = [("db", u64 * 4), ("dr6", u64), ("dr7", u64), ("flags", u64), ("reserved", u64 * 9)]


class MsrEntry(C.Structure):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class MsrsHeader(C.Structure):
    _fields_ = [("nmsrs", u32), ("pad", u32)]


class MsrListHeader(C.Structure):
    _fields_ = [("nmsrs", u32)]


class CpuidEntry2(C.Structure):
    _fields_ = [("function", u32), ("index", u32), ("flags", u32), ("eax", u32), ("ebx", u32),
                ("ecx", u32), ("edx", u32), ("padding", u32 * 3)]


class Cpuid2Header(C.Structure):
    _fields_ = [("nent", u32), ("padding", u32)]


class DirtyGfn(C.Structure):
    _fields_ = [("flags", u32), ("slot", u32), ("offset", u64)]


# -- ioctls -------------------------------------------------------------------------------
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_GET_MSR_INDEX_LIST = _iowr(0x02, MsrListHeader)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, Cpuid2Header)
KVM_CREATE_VCPU = _io(0x41)
KVM_GET_DIRTY_LOG = _iow(0x42, DirtyLog)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, UserspaceMemoryRegion)
KVM_SET_TSS_ADDR = _io(0x47)
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, Regs)
KVM_SET_REGS = _iow(0x82, Regs)
KVM_GET_SREGS = _ior(0x83, Sregs)
KVM_SET_SREGS = _iow(0x84, Sregs)
KVM_GET_MSRS = _iowr(0x88, MsrsHeader)
KVM_SET_MSRS = _iow(0x89, MsrsHeader)
KVM_GET_FPU = _ior(0x8C, Fpu)
KVM_SET_FPU = _iow(0x8D, Fpu)
KVM_SET_CPUID2 = _iow(0x90, Cpuid2Header)
KVM_GET_VCPU_EVENTS = _ior(0x9F, VcpuEvents)
KVM_SET_VCPU_EVENTS = _iow(0xA0, VcpuEvents)
KVM_GET_DEBUGREGS = _ior(0xA1, DebugRegs)
KVM_SET_DEBUGREGS = _iow(0xA2, DebugRegs)
KVM_ENABLE_CAP = _iow(0xA3, EnableCap)
KVM_GET_XSAVE = _ior(0xA4, Xsave)
KVM_SET_XSAVE = _iow(0xA5, Xsave)
KVM_GET_XCRS = _ior(0xA6, Xcrs)
KVM_SET_XCRS = _iow(0xA7, Xcrs)
KVM_CLEAR_DIRTY_LOG = _iowr(0xC0, ClearDirtyLog)
KVM_RESET_DIRTY_RINGS = _io(0xC7)
KVM_GET_XSAVE2 = _ior(0xCF, Xsave)

# -- capabilities -------------------------------------------------------------------------
CAPS = {
    "USER_MEMORY": 3,
    "SET_TSS_ADDR": 4,
    "EXT_CPUID": 7,
    "NR_VCPUS": 9,
    "NR_MEMSLOTS": 10,
    "SYNC_MMU": 16,
    "VCPU_EVENTS": 41,
    "DEBUGREGS": 50,
    "XSAVE": 55,
    "XCRS": 56,
    "READONLY_MEM": 81,
    "IMMEDIATE_EXIT": 136,
    "MANUAL_DIRTY_LOG_PROTECT2": 168,
    "DIRTY_LOG_RING": 192,
    "XSAVE2": 208,
    "DIRTY_LOG_RING_ACQ_REL": 223,
}
CAP_VCPU_EVENTS = CAPS["VCPU_EVENTS"]
CAP_DEBUGREGS = CAPS["DEBUGREGS"]
CAP_XSAVE = CAPS["XSAVE"]
CAP_XCRS = CAPS["XCRS"]
CAP_XSAVE2 = CAPS["XSAVE2"]
CAP_READONLY_MEM = CAPS["READONLY_MEM"]
CAP_IMMEDIATE_EXIT = CAPS["IMMEDIATE_EXIT"]
CAP_MANUAL_DIRTY_LOG_PROTECT2 = CAPS["MANUAL_DIRTY_LOG_PROTECT2"]
CAP_DIRTY_LOG_RING = CAPS["DIRTY_LOG_RING"]
CAP_DIRTY_LOG_RING_ACQ_REL = CAPS["DIRTY_LOG_RING_ACQ_REL"]
CAP_NR_MEMSLOTS = CAPS["NR_MEMSLOTS"]

MEM_LOG_DIRTY_PAGES = 1 << 0
MEM_READONLY = 1 << 1
DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
DIRTY_GFN_F_DIRTY = 1 << 0
DIRTY_GFN_F_RESET = 1 << 1
DIRTY_LOG_PAGE_OFFSET = 64  # x86: the rings are mapped at this page offset of the vCPU fd

# -- exit reasons -------------------------------------------------------------------------
EXIT_NAMES = {
    0: "unknown", 1: "exception", 2: "io", 3: "hypercall", 4: "debug", 5: "hlt", 6: "mmio",
    7: "irq-window-open", 8: "shutdown", 9: "fail-entry", 10: "intr", 11: "set-tpr",
    12: "tpr-access", 16: "nmi", 17: "internal-error", 24: "system-event",
    31: "dirty-ring-full",
}
EXIT_IO, EXIT_HLT, EXIT_MMIO, EXIT_INTR = 2, 5, 6, 10
EXIT_SHUTDOWN, EXIT_FAIL_ENTRY, EXIT_INTERNAL_ERROR, EXIT_DIRTY_RING_FULL = 8, 9, 17, 31

DEV_KVM = "/dev/kvm"


def ioctl(fd: int, request: int, arg: int | C.Structure | C.Array[C.c_char] = 0, what: str = "") -> int:
    """``ioctl(2)`` on a KVM fd: a ctypes object is passed by address and filled in place;
    a failure is :class:`DmaError` with the kernel's errno and ``what`` in the message."""
    try:
        if isinstance(arg, int):
            return fcntl.ioctl(fd, request, arg)
        buf = (C.c_char * C.sizeof(arg)).from_buffer(arg)
        return fcntl.ioctl(fd, request, buf, True)
    except OSError as e:
        raise fail(e.errno or errno.EIO, f"{what or hex(request)} (refused by KVM)") from None


_libc = C.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [C.c_int, C.c_ulong, C.c_ulong]
_libc.ioctl.restype = C.c_int


def ioctl_ulong(fd: int, request: int, value: int, what: str = "") -> int:
    """``ioctl(2)`` whose argument is an unsigned long value (``fcntl.ioctl`` passes a C int)."""
    r = _libc.ioctl(fd, request, value)
    if r < 0:
        err = C.get_errno()
        raise fail(err, f"{what or hex(request)} (refused by KVM)")
    return int(r)


def open_kvm() -> int:
    """Open ``/dev/kvm``: ENODEV where it is missing, EACCES where it is not permitted."""
    try:
        fd = os.open(DEV_KVM, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise fail(errno.ENODEV, f"{DEV_KVM} is missing: this machine offers no KVM") from None
    except PermissionError:
        raise fail(errno.EACCES, f"{DEV_KVM}: not permitted (join the kvm group or run as root)") from None
    except OSError as e:
        raise fail(e.errno or errno.ENODEV, f"{DEV_KVM}: {os.strerror(e.errno or 0)}") from None
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION, 0)
    except OSError as e:
        os.close(fd)
        raise fail(errno.ENODEV, f"{DEV_KVM}: KVM_GET_API_VERSION failed ({os.strerror(e.errno or 0)})") from None
    if version != API_VERSION:
        os.close(fd)
        raise fail(errno.EOPNOTSUPP, f"{DEV_KVM}: KVM API version {version}, dmarw speaks {API_VERSION}")
    return fd


def check_extension(fd: int, cap: int) -> int:
    """``KVM_CHECK_EXTENSION`` (0 when absent)."""
    try:
        return fcntl.ioctl(fd, KVM_CHECK_EXTENSION, cap)
    except OSError:
        return 0


__all__ = ["DmaError", "check_extension", "ioctl", "open_kvm"]
