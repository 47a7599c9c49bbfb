"""The typed vfio-user messages: one dataclass per request/reply layout.

Each class has ``CMD``, ``encode() -> (body, fds)`` and ``decode(body, fds)``, which checks
the body's size against the layout, argsz, counts and the fds allowed with it, raising
:class:`~dmarw.vfio_user.protocol.wire.ProtocolError`.
"""

from __future__ import annotations

import errno
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .wire import (
    CAP_SPARSE_MMAP,
    CAP_TYPE,
    DMA_READ_FLAG,
    DMA_WRITE_FLAG,
    FEATURE_DMA_LOGGING_REPORT,
    FEATURE_DMA_LOGGING_START,
    FEATURE_DMA_LOGGING_STOP,
    FEATURE_GET,
    FEATURE_MASK,
    FEATURE_MIG_DEVICE_STATE,
    FEATURE_PROBE,
    FEATURE_SET,
    IRQ_SET_ACTION_MASK,
    IRQ_SET_ACTION_MASK_ALL,
    IRQ_SET_ACTION_TRIGGER,
    IRQ_SET_ACTION_UNMASK,
    IRQ_SET_DATA_BOOL,
    IRQ_SET_DATA_EVENTFD,
    IRQ_SET_DATA_MASK,
    IRQ_SET_DATA_NONE,
    MAX_IRQ_COUNT,
    MAX_LOGGING_RANGES,
    MAX_MSG_FDS,
    MAX_WRITE_MULTI,
    REGION_FLAG_CAPS,
    UNMAP_ALL,
    UNMAP_GET_DIRTY_BITMAP,
    VERSION_MAJOR,
    VERSION_MINOR,
    Command,
    _name,
    _need,
    perr,
)


class Payload:
    CMD: ClassVar[Command]
    NFDS: ClassVar[tuple[int, int]] = (0, 0)  # fds allowed with this message (min, max)

    def encode(self) -> tuple[bytes, list[int]]:
        raise NotImplementedError

    @classmethod
    def decode(cls, body: bytes, fds: Sequence[int] = ()) -> Payload:
        raise NotImplementedError


def _exact(cls: type, body: bytes, n: int) -> None:
    if len(body) != n:
        raise perr(errno.EINVAL, f"{cls.__name__}: body of {len(body)} bytes, expected {n}")


def _atleast(cls: type, body: bytes, n: int) -> None:
    if len(body) < n:
        raise perr(errno.EINVAL, f"{cls.__name__}: body of {len(body)} bytes, expected at least {n}")


def _fds(cls: type, fds: Sequence[int], lo: int, hi: int) -> None:
    if not lo <= len(fds) <= hi:
        want = f"{lo}" if lo == hi else f"{lo}..{hi}"
        raise perr(errno.EINVAL, f"{cls.__name__}: {len(fds)} fds, expected {want}")


_CAP_INT = ("max_msg_fds", "max_data_xfer_size", "max_dma_maps", "pgsizes")


@dataclass
class Version(Payload):
    """VERSION request and reply: version and the JSON capabilities (NUL-terminated)."""

    CMD = Command.VERSION
    major: int = VERSION_MAJOR
    minor: int = VERSION_MINOR
    capabilities: dict[str, Any] = field(default_factory=dict)

    FMT: ClassVar[struct.Struct] = struct.Struct("<HH")

    def encode(self) -> tuple[bytes, list[int]]:
        data = b""
        if self.capabilities is not None:
            data = json.dumps({"capabilities": self.capabilities}, separators=(",", ":")).encode() + b"\0"
        return self.FMT.pack(self.major, self.minor) + data, []

    @classmethod
    def decode(cls, body: bytes, fds: Sequence[int] = ()) -> Version:
        _atleast(cls, body, 4)
        _fds(cls, fds, 0, 0)
        major, minor = cls.FMT.unpack_from(body)
        caps: dict[str, Any] = {}
        data = body[4:]
        if data:
            if data[-1:] != b"\0":
                raise perr(errno.EINVAL, "VERSION: capability JSON is not NUL-terminated")
            try:
                doc = json.loads(data[:-1].decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError) as e:
                raise perr(errno.EINVAL, f"VERSION: capability JSON does not parse: {e}") from e
            _need(isinstance(doc, dict), "VERSION: capability JSON is not an object")
            raw = doc.get("capabilities", {})
            _need(isinstance(raw, dict), "VERSION: 'capabilities' is not an object")
            caps = dict(raw)
            for k in _CAP_INT:
                if k in caps:
                    v = caps[k]
                    _need(type(v) is int and 0 <= v < 1 << 64, f"VERSION: capability {k}={v!r} is not a non-negative integer")
            if "max_data_xfer_size" in caps:
                _need(caps["max_data_xfer_size"] > 0, "VERSION: max_data_xfer_size is 0")
            if "write_multiple" in caps:
                _need(type(caps["write_multiple"]) is bool, "VERSION: write_multiple is not a boolean")
            for k in ("migration", "twin_socket"):
                if k in caps:
                    _need(isinstance(caps[k], dict), f"VERSION: capability {k} is not an object")
            mig = caps.get("migration", {})
            for k in ("pgsize", "max_bitmap_size"):
                if k in mig:
                    _need(type(mig[k]) is int and mig[k] > 0, f"VERSION: migration.{k}={mig[k]!r} is not a positive integer")
        return cls(major, minor, caps)


@dataclass
class DmaMap(Payload):
    CMD = Command.DMA_MAP
    NFDS = (0, 1)
    flags: int
    offset: int
    addr: int
    size: int
    fd: int | None = None
    argsz: int = 32

    FMT: ClassVar[struct.Struct] = struct.Struct("<IIQQQ")

    def encode(self) -> tuple[bytes, list[int]]:
        return self.FMT.pack(self.argsz, self.flags, self.offset, self.addr, self.size), (
            [] if self.fd is None else [self.fd]
        )

    @classmethod
    def decode(cls, body: bytes, fds: Sequence[int] = ()) -> DmaMap:
        _exact(cls, body, 32)
        _fds(cls, fds, 0, 1)
        argsz, flags, offset, addr, size = cls.FMT.unpack(body)
        _need(argsz == 32, f"DMA_MAP: argsz {argsz} is not 32")
        _need(not flags & ~(DMA_READ_FLAG | DMA_WRITE_FLAG), f"DMA_MAP {addr:#x}+{size:#x}: unknown flags {flags:#x}")
        _need(size > 0, f"DMA_MAP at {addr:#x}: size 0")
        _need(addr + size <= 1 << 64, f"DMA_MAP {addr:#x}+{size:#x} wraps past 2**64", errno.EOVERFLOW)
        return cls(flags, offset, addr, size, fds[0] if fds else None, argsz)


@dataclass
class DmaUnmap(Payload):
    """DMA_UNMAP request and reply; ``bitmap`` (pgsize, size) asks for the dirty pages."""

    CMD = Command.DMA_UNMAP
    flags: int
    addr: int
    size: int
    argsz: int = 24
    pgsize: int = 0
    bitmap_size: int = 0
    bitmap: bytes = b""  # reply only

    FMT: ClassVar[struct.Struct] = struct.Struct("<IIQQ")
    BM: ClassVar[struct.Struct] = struct.Struct("<QQ")

    def encode(self) -> tuple[bytes, list[int]]:
        out = self.FMT.pack(self.argsz, self.flags, self.addr, self.size)
        if self.flags & UNMAP_GET_DIRTY_BITMAP:
            out += self.BM.pack(self.pgsize, self.bitmap_size) + self.bitmap
        return out, []

    @classmethod
    def decode(cls, body: bytes, fds: Sequence[int] = ()) -> DmaUnmap:
        _atleast(cls, body, 24)
        _fds(cls, fds, 0, 0)
        argsz, flags, addr, size = cls.FMT.unpack_from(body)
        _need(not flags & ~(UNMAP_GET_DIRTY_BITMAP | UNMAP_ALL), f"DMA_UNMAP: unknown flags {flags:#x}")
        if flags & UNMAP_ALL:
            _need(addr == 0 and size == 0, f"DMA_UNMAP all: addr {addr:#x} size {size:#x} must be 0")
            _need(not flags & UNMAP_GET_DIRTY_BITMAP, "DMA_UNMAP all: cannot return a dirty bitmap")
        else:
            _need(addr + size <= 1 << 64, f"DMA_UNMAP {addr:#x}+{size:#x} wraps past 2**64", errno.EOVERFLOW)
        if flags & UNMAP_GET_DIRTY_BITMAP:
            _atleast(cls, body, 40)
            pgsize, bsize = cls.BM.unpack_from(body, 24)
            rest = body[40:]
            _need(len(rest) in (0, bsize), f"DMA_UNMAP: {len(rest)} bitmap bytes, expected 0 or {bsize}")
            _need(argsz >= 40 + bsize, f"DMA_UNMAP: argsz {argsz} cannot hold a {bsize}-byte bitmap")
            return cls(flags, addr, size, argsz, pgsize, bsize, rest)
        _exact(cls, body, 24)
        _need(argsz >= 24, f"DMA_UNMAP: argsz {argsz} is smaller than 24")
        return cls(flags, addr, size, argsz)


@dataclass
class DeviceInfo(Payload):
    CMD = Command.DEVICE_GET_INFO
    argsz: int = 16
    flags: int = 0
    num_regions: int = 0
    num_irqs: int = 0

    FMT: ClassVar[struct.Struct] = struct.Struct("<IIII")

    def encode(self) -> tuple[bytes, list[int]]:
        return self.FMT.pack(self.argsz, self.flags, self.num_regions, self.num_irqs), []

    @classmethod
    def decode(cls, body: bytes, fds: Sequence[int] = ()) -> DeviceInfo:
        _exact(cls, body, 16)
        _fds(cls, fds, 0, 0)
        return cls(*cls.FMT.unpack(body))


@dataclass
class SparseArea:
    offset: int
    size: int


@dataclass
class RegionInfo(Payload):
    """GET_REGION_INFO request (``index``, ``argsz``) and reply (with capabilities).

    Capabilities: ``sparse`` (mmap areas) and ``type`` (``(type, subtype)``).  In a reply
    ``argsz`` is the full size; the body is cut to the request's argsz when that is smaller,
    and the fd is sent only with a full reply.
    """

    CMD = Command.DEVICE_GET_REGION_INFO
    NFDS = (0, 1)
    index: int
    argsz: int = 32
    flags: int = 0
    cap_offset: int = 0
    size: int = 0
    offset: int = 0
    sparse: list[SparseArea] | None = None
    type: tuple[int, int] | None = None
    fd: int | None = None

    FMT: ClassVar[struct.Struct] = struct.Struct("<IIIIQQ")

    def caps(self) -> bytes:
        """The capability chain (``next`` and ``cap_offset`` relative to the info struct)."""
        chunks: list[tuple[int, bytes]] = []
        if self.sparse is not None:
            body = struct.pack("<II", len(self.sparse), 0) + b"".join(
                struct.pack("<QQ", a.offset, a.size) for a in self.sparse
            )
            chunks.append((CAP_SPARSE_MMAP, body))
        if self.type is not None:
            chunks.append((CAP_TYPE, struct.pack("<II", *self.type)))
        out = bytearray()
        pos = 32
        for i, (cid, body) in enumerate(chunks):
            nxt = pos + 8 + len(body) if i + 1 < len(chunks) else 0
            out += struct.pack("<HHI", cid, 1, nxt) + body
            pos += 8 + len(body)
        return bytes(out)

    def full_size(self) -> int:
        return 32 + len(self.caps())

    def encode_reply(self, max_argsz: int) -> tuple[bytes, list[int]]:
        """The reply to a request of ``max_argsz``: cut to it, fd only when whole."""
        caps = self.caps()
        full = 32 + len(caps)
        flags = self.flags | (REGION_FLAG_CAPS if caps else 0)
        head = self.FMT.pack(full, flags, self.index, 32 if caps else 0, self.size, self.offset)
        if max_argsz < full:
            return head, []
        return head + caps, ([] if self.fd is None else [self.fd])

    def encode(self) -> tuple[bytes, list[int]]:
        return self.FMT.pack(self.argsz, self.flags, self.index, self.cap_offset, self.size, self.offset), []

    @classmethod
    def decode(cls, body: bytes, fds: Sequence[int] = ()) -> RegionInfo:
        """A request: argsz >= 32, 32 bytes (or up to argsz: clients send their whole
        buffer, the zeroed room for capabilities included), no fds."""
        _atleast(cls, body, 32)
        _fds(cls, fds, 0, 0)
        argsz, flags, index, cap_offset, size, offset = cls.FMT.unpack_from(body)
        _need(argsz >= 32, f"GET_REGION_INFO {index}: argsz {argsz} is smaller than 32")
        _need(len(body) <= argsz, f"GET_REGION_INFO {index}: {len(body)} bytes exceed argsz {argsz}")
        return cls(index, argsz, flags, cap_offset, size, offset)

    @classmethod
    def decode_reply(cls, body: bytes, fds: Sequence[int] = ()) -> RegionInfo:
        _atleast(cls, body, 32)
        _fds(cls, fds, 0, 1)
        argsz, flags, index, cap_offset, size, offset = cls.FMT.unpack_from(body)
        info = cls(index, argsz, flags, cap_offset, size, offset, fd=fds[0] if fds else None)
        if flags & REGION_FLAG_CAPS and len(body) >= argsz:
            _need(argsz == len(body), f"GET_REGION_INFO {index}: argsz {argsz} but {len(body)} bytes")
            pos, seen = cap_offset, 0
            while pos:
                _need(32 <= pos and pos + 8 <= len(body), f"GET_REGION_INFO {index}: capability at {pos} outside the reply")
                cid, _ver, nxt = struct.unpack_from("<HHI", body, pos)
                if cid == CAP_SPARSE_MMAP:
                    _need(pos + 16 <= len(body), f"GET_REGION_INFO {index}: sparse capability truncated")
                    (nr,) = struct.unpack_from("<I", body, pos + 8)
                    _need(pos + 16 + 16 * nr <= len(body), f"GET_REGION_INFO {index}: {nr} sparse areas do not fit")
                    info.sparse = [SparseArea(*struct.unpack_from("<QQ", body, pos + 16 + 16 * i)) for i in range(nr)]
                elif cid == CAP_TYPE:
                    _need(pos + 16 <= len(body), f"GET_REGION_INFO {index}: type capability truncated")
                    info.type = struct.unpack_from("<II", body, pos + 8)
                seen += 1
                _need(seen <= 64 and (nxt == 0 or nxt > pos), f"GET_REGION_INFO {index}: capability chain loops")
                pos = nxt
        return info


@dataclass
class IoFdsRequest(Payload):
    CMD = Command.DEVICE_GET_REGION_IO_FDS
    index: int
    argsz: int = 16
    flags: int = 0
    count: int = 0

    FMT: ClassVar[struct.Struct] = struct.Struct("<IIII")

    def encode(self) -> tuple[bytes, list[int]]:
        return self.FMT.pack(self.argsz, self.flags, self.index, self.count), []

    @classmethod
    def decode(cls, body: bytes, fds: Sequence[int] = ()) -> IoFdsRequest:
        _exact(cls, body, 16)
        _fds(cls, fds, 0, 0)
        argsz, flags, index, count = cls.FMT.unpack(body)
        _need(argsz >= 16, f"GET_REGION_IO_FDS {index}: argsz {argsz} is smaller than 16")
        _need(flags == 0 and count == 0, f"GET_REGION_IO_FDS {index}: flags {flags:#x} count {count} must be 0")
        return cls(index, argsz, flags, count)


@dataclass
class IoFdsReply(Payload):
    """The reply: sub-regions ``(offset, size, fd_index, type, flags, datamatch)``."""

    CMD = Command.DEVICE_GET_REGION_IO_FDS
    NFDS = (0, MAX_MSG_FDS)
    index: int
    subregions: list[tuple[int, int, int, int, int, int]] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)
    argsz: int = 0

    FMT: ClassVar[struct.Struct] = struct.Struct("<IIII")
    SUB: ClassVar[struct.Struct] = struct.Struct("<QQIIIIQ")

    def encode_reply(self, max_argsz: int) -> tuple[bytes, list[int]]:
        full = 16 + self.SUB.size * len(self.subregions)
        head = self.FMT.pack(full, 0, self.index, len(self.subregions))
        if max_argsz < full:
            return head, []
        subs = b"".join(self.SUB.pack(o, s, fi, t, f, 0, d) for o, s, fi, t, f, d in self.subregions)
        return head + subs, list(self.fds)

    def encode(self) -> tuple[bytes, list[int]]:
        return self.encode_reply(1 << 32)

    @classmethod
    def decode(cls, body: bytes, fds: Sequence[int] = ()) -> IoFdsReply:
        _atleast(cls, body, 16)
        argsz, _flags, index, count = cls.FMT.unpack_from(body)
        subs = []
        if len(body) >= argsz and count:
            _need(16 + cls.SUB.size * count <= len(body), f"GET_REGION_IO_FDS {index}: {count} sub-regions do not fit")
            for i in range(count):
                o, s, fi, t, f, _pad, d = cls.SUB.unpack_from(body, 16 + cls.SUB.size * i)
                _need(fi < len(fds), f"GET_REGION_IO_FDS {index}: fd_index {fi} without an fd")
                subs.append((o, s, fi, t, f, d))
        return cls(index, subs, list(fds), argsz)


@dataclass
class IrqInfo(Payload):
    CMD = Command.DEVICE_GET_IRQ_INFO
    index: int
    argsz: int = 16
    flags: int = 0
    count: int = 0

    FMT: ClassVar[struct.Struct] = struct.Struct("<IIII")

    def encode(self) -> tuple[bytes, list[int]]:
        return self.FMT.pack(self.argsz, self.flags, self.index, self.count), []

    @classmethod
    def decode(cls, body: bytes, fds: Sequence[int] = ()) -> IrqInfo:
        _exact(cls, body, 16)
        _fds(cls, fds, 0, 0)
        argsz, flags, index, count = cls.FMT.unpack(body)
        _need(argsz >= 16, f"GET_IRQ_INFO {index}: argsz {argsz} is smaller than 16")
        return cls(index, argsz, flags, count)


@dataclass
class SetIrqs(Payload):
    """SET_IRQS: one DATA_* and one ACTION_* flag; BOOL data is ``count`` bytes; EVENTFD
    data is ``count`` fds (or none: de-assign)."""

    CMD = Command.DEVICE_SET_IRQS
    NFDS = (0, MAX_IRQ_COUNT)
    flags: int
    index: int
    start: int
    count: int
    data: bytes = b""
    fds: list[int] = field(default_factory=list)
    argsz: int = 0

    FMT: ClassVar[struct.Struct] = struct.Struct("<IIIII")

    @property
    def data_kind(self) -> int:
        return self.flags & IRQ_SET_DATA_MASK

    @property
    def action(self) -> int:
        return self.flags & IRQ_SET_ACTION_MASK_ALL

    def encode(self) -> tuple[bytes, list[int]]:
        argsz = self.argsz or 20 + len(self.data)
        return self.FMT.pack(argsz, self.flags, self.index, self.start, self.count) + self.data, list(self.fds)

    @classmethod
    def decode(cls, body: bytes, fds: Sequence[int] = ()) -> SetIrqs:
        _atleast(cls, body, 20)
        argsz, flags, index, start, count = cls.FMT.unpack_from(body)
        data = body[20:]
        what = f"SET_IRQS {index}[{start}:+{count}]"
        _need(not flags & ~(IRQ_SET_DATA_MASK | IRQ_SET_ACTION_MASK_ALL), f"{what}: unknown flags {flags:#x}")
        kind, action = flags & IRQ_SET_DATA_MASK, flags & IRQ_SET_ACTION_MASK_ALL
        _need(kind in (IRQ_SET_DATA_NONE, IRQ_SET_DATA_BOOL, IRQ_SET_DATA_EVENTFD), f"{what}: data flags {kind:#x} not exactly one")
        _need(action in (IRQ_SET_ACTION_MASK, IRQ_SET_ACTION_UNMASK, IRQ_SET_ACTION_TRIGGER), f"{what}: action flags {action:#x} not exactly one")
        _need(count <= MAX_IRQ_COUNT and start + count <= MAX_IRQ_COUNT, f"{what}: beyond {MAX_IRQ_COUNT} sub-indexes")
        _need(argsz >= 20 + len(data), f"{what}: argsz {argsz} smaller than the {20 + len(data)}-byte request")
        if kind == IRQ_SET_DATA_BOOL:
            _need(len(data) == count, f"{what}: {len(data)} bool bytes, expected {count}")
            _fds(cls, fds, 0, 0)
        else:
            _need(not data, f"{what}: {len(data)} unexpected data bytes")
            if kind == IRQ_SET_DATA_EVENTFD:
                _need(len(fds) in (0, count), f"{what}: {len(fds)} eventfds, expected {count} or 0")
            else:
                _fds(cls, fds, 0, 0)
        return cls(flags, index, start, count, data, list(fds), argsz)


# region access: offset u64, region u32, count u32 (+ data)
ACCESS = struct.Struct("<QII")
DMA_ACCESS = struct.Struct("<QQ")


@dataclass
class RegionAccess(Payload):
    """REGION_READ/REGION_WRITE request and reply (``data``: written, or read back)."""

    CMD = Command.REGION_READ
    region: int
    offset: int
    count: int
    data: bytes = b""

    def encode(self) -> tuple[bytes, list[int]]:
        return ACCESS.pack(self.offset, self.region, self.count) + self.data, []

    @classmethod
    def decode(cls, body: bytes, fds: Sequence[int] = ()) -> RegionAccess:
        _atleast(cls, body, 16)
        _fds(cls, fds, 0, 0)
        offset, region, count = ACCESS.unpack_from(body)
        return cls(region, offset, count, body[16:])


class RegionRead(RegionAccess):
    CMD = Command.REGION_READ

    @classmethod
    def decode(cls, body: bytes, fds: Sequence[int] = ()) -> RegionRead:
        _exact(cls, body, 16)
        _fds(cls, fds, 0, 0)
        offset, region, count = ACCESS.unpack(body)
        return cls(region, offset, count)


class RegionWrite(RegionAccess):
    CMD = Command.REGION_WRITE

    @classmethod
    def decode(cls, body: bytes, fds: Sequence[int] = ()) -> RegionWrite:
        _atleast(cls, body, 16)
        _fds(cls, fds, 0, 0)
        offset, region, count = ACCESS.unpack_from(body)
        _need(len(body) == 16 + count, f"REGION_WRITE region {region} {offset:#x}+{count:#x}: {len(body) - 16} data bytes")
        return cls(region, offset, count, body[16:])


@dataclass
class DmaAccess(Payload):
    """DMA_READ/DMA_WRITE (server → client) request and reply."""

    CMD = Command.DMA_READ
    addr: int
    count: int
    data: bytes = b""

    def encode(self) -> tuple[bytes, list[int]]:
        return DMA_ACCESS.pack(self.addr, self.count) + self.data, []

    @classmethod
    def decode(cls, body: bytes, fds: Sequence[int] = ()) -> DmaAccess:
        _atleast(cls, body, 16)
        _fds(cls, fds, 0, 0)
        addr, count = DMA_ACCESS.unpack_from(body)
        return cls(addr, count, body[16:])


class DmaRead(DmaAccess):
    CMD = Command.DMA_READ


class DmaWrite(DmaAccess):
    CMD = Command.DMA_WRITE


@dataclass
class Reset(Payload):
    CMD = Command.DEVICE_RESET

    def encode(self) -> tuple[bytes, list[int]]:
        return b"", []

    @classmethod
    def decode(cls, body: bytes, fds: Sequence[int] = ()) -> Reset:
        _exact(cls, body, 0)
        _fds(cls, fds, 0, 0)
        return cls()


WRITE1 = struct.Struct("<QII8s")


@dataclass
class WriteMulti(Payload):
    """REGION_WRITE_MULTI: ``writes`` of ``(region, offset, data)`` with len(data) <= 8."""

    CMD = Command.REGION_WRITE_MULTI
    writes: list[tuple[int, int, bytes]] = field(default_factory=list)

    def encode(self) -> tuple[bytes, list[int]]:
        return struct.pack("<Q", len(self.writes)) + b"".join(
            WRITE1.pack(off, reg, len(d), d) for reg, off, d in self.writes
        ), []

    @classmethod
    def decode(cls, body: bytes, fds: Sequence[int] = ()) -> WriteMulti:
        _atleast(cls, body, 8)
        _fds(cls, fds, 0, 0)
        (n,) = struct.unpack_from("<Q", body)
        _need(0 < n <= MAX_WRITE_MULTI, f"REGION_WRITE_MULTI: wr_cnt {n} not in 1..{MAX_WRITE_MULTI}")
        _exact(cls, body, 8 + WRITE1.size * n)
        writes = []
        for i in range(n):
            off, reg, count, data = WRITE1.unpack_from(body, 8 + WRITE1.size * i)
            _need(0 < count <= 8, f"REGION_WRITE_MULTI write {i}: count {count} not in 1..8")
            writes.append((reg, off, data[:count]))
        return cls(writes)


@dataclass
class WriteMultiDone(Payload):
    """The REGION_WRITE_MULTI reply: how many writes were completed."""

    CMD = Command.REGION_WRITE_MULTI
    count: int

    def encode(self) -> tuple[bytes, list[int]]:
        return struct.pack("<Q", self.count), []

    @classmethod
    def decode(cls, body: bytes, fds: Sequence[int] = ()) -> WriteMultiDone:
        _exact(cls, body, 8)
        _fds(cls, fds, 0, 0)
        return cls(struct.unpack("<Q", body)[0])


@dataclass
class LoggingRange:
    iova: int
    length: int


@dataclass
class Feature(Payload):
    """DEVICE_FEATURE: ``flags`` = feature index | GET/SET/PROBE, ``data`` the feature's.

    The typed views of ``data``: :meth:`mig_state`, :meth:`logging_control`,
    :meth:`logging_report`; builders :func:`feature_*`.
    """

    CMD = Command.DEVICE_FEATURE
    flags: int
    data: bytes = b""
    argsz: int = 0

    FMT: ClassVar[struct.Struct] = struct.Struct("<II")

    @property
    def feature(self) -> int:
        return self.flags & FEATURE_MASK

    @property
    def get(self) -> bool:
        return bool(self.flags & FEATURE_GET)

    @property
    def set(self) -> bool:
        return bool(self.flags & FEATURE_SET)

    @property
    def probe(self) -> bool:
        return bool(self.flags & FEATURE_PROBE)

    def encode(self) -> tuple[bytes, list[int]]:
        argsz = self.argsz or 8 + len(self.data)
        return self.FMT.pack(argsz, self.flags) + self.data, []

    @classmethod
    def decode(cls, body: bytes, fds: Sequence[int] = ()) -> Feature:
        _atleast(cls, body, 8)
        _fds(cls, fds, 0, 0)
        argsz, flags = cls.FMT.unpack_from(body)
        f = cls(flags, body[8:], argsz)
        _need(not flags & ~(FEATURE_MASK | FEATURE_GET | FEATURE_SET | FEATURE_PROBE), f"DEVICE_FEATURE: unknown flags {flags:#x}")
        _need(not (f.get and f.set) or f.probe, f"DEVICE_FEATURE {f.feature}: GET and SET together without PROBE")
        _need(f.get or f.set or f.probe, f"DEVICE_FEATURE {f.feature}: none of GET, SET, PROBE")
        _need(argsz >= 8, f"DEVICE_FEATURE {f.feature}: argsz {argsz} is smaller than 8")
        return f

    def mig_state(self) -> tuple[int, int]:
        """(device_state, data_fd) of a MIG_DEVICE_STATE SET (or a GET reply)."""
        _need(len(self.data) == 8, f"MIG_DEVICE_STATE: {len(self.data)} data bytes, expected 8")
        state, data_fd = struct.unpack("<II", self.data)
        return state, data_fd

    def logging_control(self) -> tuple[int, list[LoggingRange]]:
        """(page_size, ranges) of a DMA_LOGGING_START/STOP SET."""
        _need(len(self.data) >= 16, f"DMA_LOGGING: {len(self.data)} data bytes, expected at least 16")
        page_size, n, _reserved = struct.unpack_from("<QII", self.data)
        _need(n <= MAX_LOGGING_RANGES, f"DMA_LOGGING: {n} ranges exceed {MAX_LOGGING_RANGES}")
        _need(len(self.data) == 16 + 16 * n, f"DMA_LOGGING: {len(self.data)} data bytes for {n} ranges")
        ranges = [LoggingRange(*struct.unpack_from("<QQ", self.data, 16 + 16 * i)) for i in range(n)]
        for r in ranges:
            _need(r.length > 0 and r.iova + r.length <= 1 << 64, f"DMA_LOGGING: range {r.iova:#x}+{r.length:#x} is empty or wraps")
        return page_size, ranges

    def logging_report(self) -> tuple[int, int, int]:
        """(iova, length, page_size) of a DMA_LOGGING_REPORT GET."""
        _need(len(self.data) >= 24, f"DMA_LOGGING_REPORT: {len(self.data)} data bytes, expected 24")
        iova, length, page_size = struct.unpack_from("<QQQ", self.data)
        return iova, length, page_size


def feature_mig_state(state: int, *, get: bool = False) -> Feature:
    flags = FEATURE_MIG_DEVICE_STATE | (FEATURE_GET if get else FEATURE_SET)
    data = b"" if get else struct.pack("<II", state, 0)
    return Feature(flags, data, 16)


def feature_logging(start: bool, page_size: int, ranges: Sequence[tuple[int, int]] = ()) -> Feature:
    idx = FEATURE_DMA_LOGGING_START if start else FEATURE_DMA_LOGGING_STOP
    data = struct.pack("<QII", page_size, len(ranges), 0) + b"".join(struct.pack("<QQ", i, n) for i, n in ranges)
    return Feature(idx | FEATURE_SET, data, 8 + len(data))


def feature_report(iova: int, length: int, page_size: int) -> Feature:
    data = struct.pack("<QQQ", iova, length, page_size)
    nbits = -(-length // page_size)
    return Feature(FEATURE_DMA_LOGGING_REPORT | FEATURE_GET, data, 8 + 24 + (nbits + 63) // 64 * 8)


@dataclass
class MigData(Payload):
    """MIG_DATA_READ (request: argsz, size) / MIG_DATA_WRITE (with data) and the read reply."""

    CMD = Command.MIG_DATA_READ
    size: int
    data: bytes = b""
    argsz: int = 0

    FMT: ClassVar[struct.Struct] = struct.Struct("<II")

    def encode(self) -> tuple[bytes, list[int]]:
        argsz = self.argsz or 8 + len(self.data)
        return self.FMT.pack(argsz, self.size) + self.data, []

    @classmethod
    def decode(cls, body: bytes, fds: Sequence[int] = ()) -> MigData:
        _atleast(cls, body, 8)
        _fds(cls, fds, 0, 0)
        argsz, size = cls.FMT.unpack_from(body)
        return cls(size, body[8:], argsz)


class MigDataRead(MigData):
    CMD = Command.MIG_DATA_READ

    @classmethod
    def decode(cls, body: bytes, fds: Sequence[int] = ()) -> MigDataRead:
        _exact(cls, body, 8)
        _fds(cls, fds, 0, 0)
        argsz, size = cls.FMT.unpack(body)
        _need(argsz >= 8 + size, f"MIG_DATA_READ: argsz {argsz} cannot hold {size} bytes")
        return cls(size, b"", argsz)


class MigDataWrite(MigData):
    CMD = Command.MIG_DATA_WRITE

    @classmethod
    def decode(cls, body: bytes, fds: Sequence[int] = ()) -> MigDataWrite:
        _atleast(cls, body, 8)
        _fds(cls, fds, 0, 0)
        argsz, size = cls.FMT.unpack_from(body)
        _need(len(body) == 8 + size, f"MIG_DATA_WRITE: size {size} but {len(body) - 8} data bytes")
        return cls(size, body[8:], argsz)


class Empty(Payload):
    """A reply with no payload (DMA_MAP, SET_IRQS, DEVICE_RESET, MIG_DATA_WRITE)."""

    def __init__(self, cmd: int) -> None:
        self.cmd = cmd

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Empty) and other.cmd == self.cmd

    def __repr__(self) -> str:
        return f"Empty({_name(self.cmd)})"

    def encode(self) -> tuple[bytes, list[int]]:
        return b"", []
