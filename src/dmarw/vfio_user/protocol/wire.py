"""vfio-user framing: constants, the header, the error type and the stream framer.

:class:`Connection` frames a received byte stream into :class:`Message` objects (header +
body + the fds that came with it) without doing any I/O.  Framing violations (a size below
the header or above the maximum, unknown type bits, a stream that ends inside a message)
are ``fatal`` :class:`ProtocolError` s: the stream cannot be resynchronised after them.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from ...errors import DmaError

# -- constants ------------------------------------------------------------------------------


class Command(IntEnum):
    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18


COMMANDS = frozenset(int(c) for c in Command)
SERVER_TO_CLIENT = frozenset((Command.DMA_READ, Command.DMA_WRITE))

HEADER = struct.Struct("<HHIII")  # msg_id, cmd, msg_size, flags, error_no
HEADER_SIZE = HEADER.size
F_TYPE_MASK = 0xF
F_TYPE_COMMAND = 0x0
F_TYPE_REPLY = 0x1
F_NO_REPLY = 0x10
F_ERROR = 0x20
F_KNOWN = F_TYPE_MASK | F_NO_REPLY | F_ERROR

VERSION_MAJOR = 0
VERSION_MINOR = 2

DEFAULT_MAX_DATA_XFER_SIZE = 1 << 20  # the spec's default when a peer does not say
DEFAULT_MAX_MSG_FDS = 1
DEFAULT_MAX_DMA_MAPS = 65535
DEFAULT_PGSIZES = 4096
MAX_MSG_FDS = 253  # SCM_MAX_FD: the most one sendmsg can carry
# the largest message either side accepts: a maximal data transfer plus its access header
MAX_MSG_SIZE = HEADER_SIZE + 16 + DEFAULT_MAX_DATA_XFER_SIZE
MAX_WRITE_MULTI = 1024  # writes one REGION_WRITE_MULTI may carry (QEMU sends <= 200)
MAX_IRQ_COUNT = 2048  # MSI-X's limit: sub-indexes one SET_IRQS may name

# device info / region info / irq info flags (linux/vfio.h)
DEVICE_FLAGS_RESET = 1 << 0
DEVICE_FLAGS_PCI = 1 << 1
REGION_FLAG_READ = 1 << 0
REGION_FLAG_WRITE = 1 << 1
REGION_FLAG_MMAP = 1 << 2
REGION_FLAG_CAPS = 1 << 3
CAP_SPARSE_MMAP = 1
CAP_TYPE = 2
IRQ_INFO_EVENTFD = 1 << 0
IRQ_INFO_MASKABLE = 1 << 1
IRQ_INFO_AUTOMASKED = 1 << 2
IRQ_INFO_NORESIZE = 1 << 3

# SET_IRQS: exactly one DATA_* and one ACTION_* flag
IRQ_SET_DATA_NONE = 1 << 0
IRQ_SET_DATA_BOOL = 1 << 1
IRQ_SET_DATA_EVENTFD = 1 << 2
IRQ_SET_ACTION_MASK = 1 << 3
IRQ_SET_ACTION_UNMASK = 1 << 4
IRQ_SET_ACTION_TRIGGER = 1 << 5
IRQ_SET_DATA_MASK = IRQ_SET_DATA_NONE | IRQ_SET_DATA_BOOL | IRQ_SET_DATA_EVENTFD
IRQ_SET_ACTION_MASK_ALL = IRQ_SET_ACTION_MASK | IRQ_SET_ACTION_UNMASK | IRQ_SET_ACTION_TRIGGER

# DMA map / unmap
DMA_READ_FLAG = 1 << 0
DMA_WRITE_FLAG = 1 << 1
UNMAP_GET_DIRTY_BITMAP = 1 << 0
UNMAP_ALL = 1 << 1

# PCI region and irq indexes
BAR0, BAR1, BAR2, BAR3, BAR4, BAR5, ROM_REGION, CONFIG_REGION, VGA_REGION = range(9)
PCI_NUM_REGIONS = 9
INTX, MSI, MSIX, ERR_IRQ, REQ_IRQ = range(5)
PCI_NUM_IRQS = 5

# DEVICE_FEATURE
FEATURE_MASK = 0xFFFF
FEATURE_GET = 1 << 16
FEATURE_SET = 1 << 17
FEATURE_PROBE = 1 << 18
FEATURE_MIGRATION = 1
FEATURE_MIG_DEVICE_STATE = 2
FEATURE_DMA_LOGGING_START = 6
FEATURE_DMA_LOGGING_STOP = 7
FEATURE_DMA_LOGGING_REPORT = 8
MIGRATION_STOP_COPY = 1 << 0
MIGRATION_P2P = 1 << 1
MIGRATION_PRE_COPY = 1 << 2
MAX_LOGGING_RANGES = 1024


class MigState(IntEnum):
    ERROR = 0
    STOP = 1
    RUNNING = 2
    STOP_COPY = 3
    RESUMING = 4
    RUNNING_P2P = 5
    PRE_COPY = 6
    PRE_COPY_P2P = 7


# -- errors ---------------------------------------------------------------------------------


class ProtocolError(DmaError):
    """A message that breaks the protocol; ``errno`` is what the error reply carries.

    ``fatal``: the framing itself is broken (size, type), so the stream cannot continue.
    """

    def __init__(self, err: int, message: str, *, fatal: bool = False) -> None:
        super().__init__(err, message)
        self.fatal = fatal
        self.header: Header | None = None  # the offending header, when it could be read

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (self.errno or 0, self.detail, self.fatal))


def _rebuild(err: int, message: str, fatal: bool) -> ProtocolError:  # for pickle
    return ProtocolError(err, message, fatal=fatal)


def perr(err: int, message: str, *, fatal: bool = False) -> ProtocolError:
    return ProtocolError(err, message, fatal=fatal)


def _need(cond: bool, what: str, err: int = errno.EINVAL) -> None:
    if not cond:
        raise perr(err, what)


# -- framing --------------------------------------------------------------------------------


@dataclass(slots=True)
class Header:
    msg_id: int
    cmd: int
    size: int
    flags: int = 0
    error: int = 0

    @property
    def is_reply(self) -> bool:
        return self.flags & F_TYPE_MASK == F_TYPE_REPLY

    @property
    def no_reply(self) -> bool:
        return bool(self.flags & F_NO_REPLY)

    @property
    def is_error(self) -> bool:
        return bool(self.flags & F_ERROR)

    def pack(self) -> bytes:
        return HEADER.pack(self.msg_id, self.cmd, self.size, self.flags, self.error)


def _name(cmd: int) -> str:
    try:
        return Command(cmd).name
    except ValueError:
        return f"command {cmd}"


@dataclass(slots=True)
class Message:
    """One framed message: its header, its body (the bytes after the header) and fds."""

    header: Header
    body: bytes
    fds: list[int] = field(default_factory=list)

    def close_fds(self, keep: Sequence[int] = ()) -> None:
        """Close every fd of this message not in ``keep`` (the consumer's cleanup)."""
        import os

        for fd in self.fds:
            if fd not in keep:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.fds = [fd for fd in self.fds if fd in keep]


_unpack_header = HEADER.unpack_from
_GOOD_FLAGS = F_KNOWN


def parse_header(data: bytes | bytearray | memoryview, *, max_size: int = MAX_MSG_SIZE) -> Header:
    """The header at the start of ``data``; framing rules checked (fatal on violation)."""
    if len(data) < HEADER_SIZE:
        raise perr(errno.EINVAL, f"header truncated: {len(data)} of {HEADER_SIZE} bytes", fatal=True)
    h = Header(*HEADER.unpack_from(data, 0))
    err = None
    if h.size < HEADER_SIZE:
        err = perr(errno.EINVAL, f"msg {h.msg_id:#x}: size {h.size:#x} is smaller than the header", fatal=True)
    elif h.size > max_size:
        err = perr(errno.E2BIG, f"msg {h.msg_id:#x}: size {h.size:#x} exceeds the maximum {max_size:#x}", fatal=True)
    elif h.flags & F_TYPE_MASK not in (F_TYPE_COMMAND, F_TYPE_REPLY) or h.flags & ~F_KNOWN:
        err = perr(errno.EINVAL, f"msg {h.msg_id:#x}: bad flags {h.flags:#x}", fatal=True)
    if err is not None:
        err.header = h
        raise err
    return h


class Connection:
    """Frames a received byte stream into :class:`Message` objects (no I/O).

    Feed with :meth:`receive_data` (the bytes and fds one ``recvmsg`` returned); pull with
    :meth:`next_message` until it returns ``None``.  Fds arrive with the first bytes of the
    sender's ``sendmsg``, which begins with the header: they belong to the message whose
    header starts the chunk they came with (or the one being assembled).
    """

    def __init__(self, *, max_msg_size: int = MAX_MSG_SIZE) -> None:
        self.max_msg_size = max_msg_size
        self._buf = bytearray()
        self._pos = 0
        # (stream offset of the chunk's first byte, fds)
        self._fds: list[tuple[int, list[int]]] = []
        self._consumed = 0  # stream offset of _buf[_pos]
        self.eof = False

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def receive_data(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Append received bytes (``b""`` means the peer closed) and the fds that came with them."""
        if not data:
            self.eof = True
            if fds:
                self._fds.append((self._consumed + self.buffered, list(fds)))
            return
        if fds:
            self._fds.append((self._consumed + self.buffered, list(fds)))
        if self._pos and self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        self._buf += data

    def next_message(self) -> Message | None:
        """The next complete message, or ``None`` until more bytes arrive."""
        avail = len(self._buf) - self._pos
        if avail < HEADER_SIZE:
            if self.eof and avail:
                raise perr(errno.ECONNRESET, f"peer closed inside a header ({avail} bytes)", fatal=True)
            return None
        start = self._pos
        msg_id, cmd, size, flags, error = _unpack_header(self._buf, start)
        if size < HEADER_SIZE or size > self.max_msg_size or flags & ~_GOOD_FLAGS or flags & F_TYPE_MASK > 1:
            parse_header(self._buf[start : start + HEADER_SIZE], max_size=self.max_msg_size)  # raises
        h = Header(msg_id, cmd, size, flags, error)
        if avail < h.size:
            if self.eof:
                raise perr(errno.ECONNRESET, f"msg {h.msg_id:#x}: peer closed after {avail} of {h.size:#x} bytes", fatal=True)
            return None
        body = bytes(self._buf[start + HEADER_SIZE : start + h.size])
        end = self._consumed + h.size
        fds: list[int] = []
        while self._fds and self._fds[0][0] < end:  # fds sent with this message's bytes
            fds.extend(self._fds.pop(0)[1])
        self._pos += h.size
        self._consumed += h.size
        if self._pos > 1 << 16 and self._pos * 2 > len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0
        msg = Message(h, body, fds)
        return msg

    def leftover_fds(self) -> list[int]:
        """Fds received but attached to no complete message (the caller closes them)."""
        out = [fd for _, chunk in self._fds for fd in chunk]
        self._fds.clear()
        return out


def frame(msg_id: int, cmd: int, body: bytes | bytearray | memoryview = b"", *, flags: int = 0, error: int = 0) -> bytes:
    """Header + body as one bytes object."""
    return HEADER.pack(msg_id & 0xFFFF, cmd, HEADER_SIZE + len(body), flags, error) + body


def error_reply(msg_id: int, cmd: int, err: int) -> bytes:
    """A reply carrying only the header, the error flag and ``err``."""
    return HEADER.pack(msg_id & 0xFFFF, cmd, HEADER_SIZE, F_TYPE_REPLY | F_ERROR, err)
