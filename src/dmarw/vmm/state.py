"""A vCPU's saved state: what KVM exposes that the guest needs, in a versioned blob.

Layout (little-endian)::

    magic  b"DMARWCPU"                 8 bytes
    version u16, nsections u16         (VERSION)
    length  u32                        bytes of all sections that follow
    crc32   u32                        of those bytes
    section* : tag (4 ASCII bytes), length u32, payload

Sections: ``REGS`` (kvm_regs), ``SREG`` (kvm_sregs), ``XSAV`` (the xsave area, this
machine's size, or ``FPU_`` kvm_fpu where KVM lacks XSAVE), ``XCRS`` (kvm_xcrs),
``MSRS`` (u32 count, then kvm_msr_entry × count: the MSRs of
:data:`~dmarw.vmm.system.GUEST_MSRS` this KVM offers), ``EVNT`` (kvm_vcpu_events),
``DBGR`` (kvm_debugregs).  No in-kernel irqchip is created, so there is no LAPIC to carry.

Validation happens whole before anything is loaded: a bad magic, version, length, CRC,
tag, duplicate, missing ``REGS``/``SREG``, or a payload size that is not this machine's is
``DmaError(EINVAL)`` naming it.  Restore order: sregs, regs, FPU/xsave, xcrs, MSRs, events,
debug registers (QEMU's order: MSRs after sregs so EFER-dependent ones are accepted).
"""

from __future__ import annotations

import ctypes as C
import errno
import fcntl
import struct
import zlib
from typing import TYPE_CHECKING

from ..errors import fail
from . import uapi

if TYPE_CHECKING:
    from .vcpu import Vcpu

MAGIC = b"DMARWCPU"
VERSION = 1
_HDR = struct.Struct("<8sHHII")
_SEC = struct.Struct("<4sI")

_FIXED: dict[bytes, type[C.Structure]] = {
    b"REGS": uapi.Regs,
    b"SREG": uapi.Sregs,
    b"FPU_": uapi.Fpu,
    b"XCRS": uapi.Xcrs,
    b"EVNT": uapi.VcpuEvents,
    b"DBGR": uapi.DebugRegs,
}
_GET = {
    b"REGS": uapi.KVM_GET_REGS, b"SREG": uapi.KVM_GET_SREGS, b"FPU_": uapi.KVM_GET_FPU,
    b"XCRS": uapi.KVM_GET_XCRS, b"EVNT": uapi.KVM_GET_VCPU_EVENTS, b"DBGR": uapi.KVM_GET_DEBUGREGS,
}
_SET = {
    b"REGS": uapi.KVM_SET_REGS, b"SREG": uapi.KVM_SET_SREGS, b"FPU_": uapi.KVM_SET_FPU,
    b"XCRS": uapi.KVM_SET_XCRS, b"EVNT": uapi.KVM_SET_VCPU_EVENTS, b"DBGR": uapi.KVM_SET_DEBUGREGS,
}
_ORDER = (b"SREG", b"REGS", b"FPU_", b"XSAV", b"XCRS", b"MSRS", b"EVNT", b"DBGR")


def _sections(vcpu: Vcpu) -> list[bytes]:
    """The tags this machine's vCPU state consists of."""
    k = vcpu.vm.kvm
    tags = [b"REGS", b"SREG"]
    tags.append(b"XSAV" if k.cap(uapi.CAP_XSAVE) > 0 else b"FPU_")
    if k.cap(uapi.CAP_XCRS) > 0:
        tags.append(b"XCRS")
    tags.append(b"MSRS")
    if k.cap(uapi.CAP_VCPU_EVENTS) > 0:
        tags.append(b"EVNT")
    if k.cap(uapi.CAP_DEBUGREGS) > 0:
        tags.append(b"DBGR")
    return tags


def xsave_size(vcpu: Vcpu) -> int:
    return max(vcpu.vm.kvm.cap(uapi.CAP_XSAVE2), C.sizeof(uapi.Xsave))


def _get_msrs(vcpu: Vcpu) -> bytes:
    """The guest MSRs this vCPU reads back (an index KVM refuses is dropped)."""
    want = list(vcpu.vm.kvm.guest_msrs())
    while True:
        entries = (uapi.MsrEntry * max(len(want), 1))()
        for i, m in enumerate(want):
            entries[i].index = m
        raw = bytearray(struct.pack("<II", len(want), 0)) + bytearray(bytes(entries)[: 16 * len(want)])
        got = fcntl.ioctl(vcpu.fd, uapi.KVM_GET_MSRS, raw, True)
        if got == len(want):
            return struct.pack("<I", got) + bytes(raw[8:])
        del want[got]  # the one at `got` failed; retry without it


def _set_msrs(vcpu: Vcpu, payload: bytes) -> None:
    (n,) = struct.unpack_from("<I", payload)
    raw = bytearray(struct.pack("<II", n, 0)) + bytearray(payload[4:])
    done = fcntl.ioctl(vcpu.fd, uapi.KVM_SET_MSRS, raw, True)
    if done != n:
        index = struct.unpack_from("<I", payload, 4 + 16 * done)[0]
        raise fail(errno.EINVAL, f"restore: KVM_SET_MSRS refused MSR {index:#x} ({done} of {n} set)")


def save(vcpu: Vcpu) -> bytes:
    body = bytearray()
    tags = _sections(vcpu)
    for tag in tags:
        if tag == b"MSRS":
            payload = _get_msrs(vcpu)
        elif tag == b"XSAV":
            size = xsave_size(vcpu)
            buf = bytearray(size)
            req = uapi.KVM_GET_XSAVE2 if size > C.sizeof(uapi.Xsave) else uapi.KVM_GET_XSAVE
            try:
                fcntl.ioctl(vcpu.fd, req, buf, True)
            except OSError as e:
                raise fail(e.errno or errno.EIO, "save: KVM_GET_XSAVE failed") from None
            payload = bytes(buf)
        else:
            obj = _FIXED[tag]()
            uapi.ioctl(vcpu.fd, _GET[tag], obj, f"save: {tag.decode()}")
            payload = bytes(obj)
        body += _SEC.pack(tag, len(payload)) + payload
    return _HDR.pack(MAGIC, VERSION, len(tags), len(body), zlib.crc32(body)) + bytes(body)


def parse(vcpu: Vcpu, data: bytes) -> dict[bytes, bytes]:
    """Check a blob whole against this machine's state layout; its sections by tag."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise fail(errno.EINVAL, f"restore: state must be bytes, not {type(data).__name__}")
    data = bytes(data)
    if len(data) < _HDR.size:
        raise fail(errno.EINVAL, f"restore: {len(data)} bytes is shorter than the {_HDR.size}-byte header")
    magic, version, nsec, length, crc = _HDR.unpack_from(data)
    if magic != MAGIC:
        raise fail(errno.EINVAL, f"restore: not a dmarw vCPU state (magic {magic!r})")
    if version != VERSION:
        raise fail(errno.EINVAL, f"restore: state version {version}, this dmarw reads version {VERSION}")
    body = data[_HDR.size :]
    if len(body) != length:
        raise fail(errno.EINVAL, f"restore: header says {length:#x} bytes of sections, blob has {len(body):#x}")
    if zlib.crc32(body) != crc:
        raise fail(errno.EINVAL, "restore: CRC mismatch (the state is corrupt)")
    out: dict[bytes, bytes] = {}
    pos = 0
    for _ in range(nsec):
        if pos + _SEC.size > len(body):
            raise fail(errno.EINVAL, f"restore: section header past the end at {pos:#x}")
        tag, n = _SEC.unpack_from(body, pos)
        pos += _SEC.size
        if tag in out or tag not in (*_FIXED, b"XSAV", b"MSRS"):
            raise fail(errno.EINVAL, f"restore: unknown or repeated section {tag!r}")
        if pos + n > len(body):
            raise fail(errno.EINVAL, f"restore: section {tag!r} of {n:#x} bytes runs past the end")
        out[tag] = body[pos : pos + n]
        pos += n
    if pos != len(body):
        raise fail(errno.EINVAL, f"restore: {len(body) - pos:#x} trailing bytes after the sections")
    expected = _sections(vcpu)
    if set(out) != set(expected):
        raise fail(errno.EINVAL, f"restore: sections {sorted(out)} do not match this machine's {sorted(expected)}")
    for tag, payload in out.items():
        size = (xsave_size(vcpu) if tag == b"XSAV" else None) if tag not in _FIXED else C.sizeof(_FIXED[tag])
        if tag == b"MSRS":
            if len(payload) < 4 or len(payload) != 4 + 16 * struct.unpack_from("<I", payload)[0]:
                raise fail(errno.EINVAL, f"restore: MSRS section of {len(payload):#x} bytes is malformed")
        elif len(payload) != size:
            raise fail(errno.EINVAL, f"restore: section {tag.decode()} is {len(payload):#x} bytes, this machine's is {size:#x}")
    return out


def restore(vcpu: Vcpu, data: bytes) -> None:
    sections = parse(vcpu, data)
    for tag in _ORDER:
        payload = sections.get(tag)
        if payload is None:
            continue
        if tag == b"MSRS":
            _set_msrs(vcpu, payload)
        elif tag == b"XSAV":
            buf = bytearray(payload)
            try:
                fcntl.ioctl(vcpu.fd, uapi.KVM_SET_XSAVE, buf, True)
            except OSError as e:
                raise fail(e.errno or errno.EINVAL, "restore: KVM_SET_XSAVE refused the xsave area") from None
        else:
            obj = _FIXED[tag].from_buffer_copy(payload)
            uapi.ioctl(vcpu.fd, _SET[tag], obj, f"restore: {tag.decode()}")
