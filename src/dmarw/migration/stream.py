"""The migration stream: dmarw's own format, encoded and decoded without doing any I/O.

Like h11, neither side touches a socket: :class:`Encoder` returns bytes to write,
:class:`Decoder` is fed bytes (``receive_data``) and hands back events (``next_event``).
The receiver validates everything; anything it cannot prove correct raises
:class:`StreamError` and the decoder stays failed (every later call raises the same error).

Layout (all integers little-endian)::

    preamble  8s magic b"DMARWMIG", u16 version, u16 options             12 bytes
    frame     u16 kind, u16 flags, u32 seq, u32 length, u32 crc32c       16 bytes
              then ``length`` payload bytes
              then, when options has MAC (bit 0), a 16-byte tag

``seq`` counts frames from 0 with no gap; ``crc32c`` (CRC32C, Castagnoli: :mod:`dmarw.checksum`,
the native core's SSE4.2 loop when built, else the Python reference, same value) covers the
frame's first 12 bytes and its payload — for a PAGES frame, its payload up to the page
contents, which carry a CRC32C each.  Version 2 checked a PAGES frame's contents with the
frame's own CRC; version 1 used zlib's CRC-32: either is refused as a mismatch.  The CRC
catches accidents, not an impostor (anyone can recompute it).  A keyed stream therefore also
carries a tag per frame: HMAC-SHA256, keyed with the session key both ends derived in the
handshake (:mod:`.control`), over the frame's 16-byte head and its whole payload (page
contents included), truncated to 16 bytes.  The head holds ``seq``, so a frame replayed,
moved or taken from another session fails its tag.  A receiver that holds a key refuses a
stream without tags, and one without a key refuses a stream with them.  Frames:

* ``HEADER`` (first frame, exactly once): u32 page size, u32 region count, then per
  region u64 gpa, u64 size — the guest RAM layout.
* ``PAGES``: u32 round, u32 count (1..MAX_PAGES), count × u64 gpa (page aligned, inside
  the layout, each once), count × u32 CRC32C of each page's contents, then count × page-size bytes of
  page contents, in the same order.  Flag ``LIVE`` (bit 0): the pages were read from RAM
  the guest kept writing (pre-copy, zero-copy), so a page whose check fails may have been
  written while the kernel copied it; it is reported in the event (``bad``) instead of
  refused, and the source sends it again (the destination names it in its round
  acknowledgement).  Without ``LIVE``, and in any keyed stream, a failed check refuses the
  stream.
* ``ROUND``: u32 round, u32 pages — closes a round; ``pages`` must equal the pages of the
  round's PAGES frames.  Rounds are numbered 0, 1, 2, … with no gap.
* ``STATE``: u16 name length, the name (UTF-8, 1..64 bytes), then the blob (at most
  ``MAX_STATE`` bytes): the saved state of a vCPU or a device, sent after the last pages;
  each name at most once.
* ``END``: u32 rounds, u32 frames (before END), u64 pages — totals; nothing may follow.

Page contents go where the receiver says: a decoder built with a ``sink`` (gpa, bytes →
a writable view of its RAM) receives them straight into that memory (``receive_into`` lets
a socket's ``recv_into`` write there), then checks each page in place; without one they land
in a buffer of the frame's own, handed out with the event.

Errors name what is wrong and where (stream offset, frame seq): ``truncated`` (the bytes
stop before END), ``corrupt`` (checksum, impossible length or field), ``mismatch``
(magic, version, page size or RAM layout differs from what the receiver expects),
``protocol`` (frames out of order), ``unauthenticated`` (a tag that does not match, or a
stream without tags where the receiver holds a key).
"""

from __future__ import annotations

import errno
import hmac
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np

from ..checksum import crc32c, crc32c_pages
from ..errors import DmaError

MAGIC = b"DMARWMIG"
VERSION = 3  # 3: a CRC32C per page (2: one CRC32C over a whole frame; 1: zlib CRC-32)
MAX_PAGES = 1024  # pages per PAGES frame
_PREAMBLE = struct.Struct("<8sHH")
_FRAME = struct.Struct("<HHIII")
_CRC_SPAN = 12  # kind, flags, seq, length
_HEADER = struct.Struct("<II")
_REGION = struct.Struct("<QQ")
_PAGES = struct.Struct("<II")
_ROUND = struct.Struct("<II")
_END = struct.Struct("<IIQ")
MAX_REGIONS = 64
MAX_PAGE_SIZE = 1 << 21
MAX_STATE = 1 << 20
MAX_NAME = 64
_NAME = struct.Struct("<H")
OPT_MAC = 1  # preamble option: every frame carries a tag
LIVE = 1  # PAGES flag: read from RAM while the guest ran; a failed page check is reported
_CRC = struct.Struct("<I")
_GPA = struct.Struct("<Q")
TAG_SIZE = 16

Layout = tuple[tuple[int, int], ...]  # ((gpa, size), ...)
Sink = Callable[[int, int], memoryview]  # (gpa, nbytes) -> writable view of that RAM


class Kind(IntEnum):
    HEADER = 1
    PAGES = 2
    ROUND = 3
    END = 4
    STATE = 5


class StreamError(DmaError):
    """A refused stream: ``reason`` is truncated, corrupt, mismatch, protocol or unauthenticated."""

    _ERRNO = {
        "truncated": errno.ENODATA,
        "corrupt": errno.EBADMSG,
        "mismatch": errno.EINVAL,
        "protocol": errno.EPROTO,
        "unauthenticated": errno.EACCES,
    }

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(self._ERRNO[reason], f"migration stream {reason}: {message}")
        self.reason = reason


# -- events ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Header:
    version: int
    page_size: int
    layout: Layout


@dataclass(frozen=True)
class Pages:
    round: int
    gpas: Sequence[int]  # a range when the frame is one run of pages (the usual frame), else a tuple
    # without a sink: len(gpas) * page_size bytes, page i at data[i*page_size:] (read-only,
    # the frame's own buffer); with a sink: None, the contents are in the sink's memory
    data: memoryview | None
    bad: tuple[int, ...] = ()  # gpas whose check failed (LIVE frames only)
    live: bool = False


@dataclass(frozen=True)
class RoundEnd:
    round: int
    pages: int


@dataclass(frozen=True)
class End:
    rounds: int
    frames: int
    pages: int


@dataclass(frozen=True)
class State:
    name: str
    blob: bytes


Event = Header | Pages | RoundEnd | End | State


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


def check_layout(page_size: int, layout: Layout) -> None:
    """``EINVAL`` unless the page size is a power of two and regions are aligned and disjoint."""
    if not isinstance(page_size, int) or page_size < 512 or page_size > MAX_PAGE_SIZE or page_size & (page_size - 1):
        raise DmaError(errno.EINVAL, f"page size {page_size!r} is not a power of two in [512, {MAX_PAGE_SIZE}]")
    if not layout or len(layout) > MAX_REGIONS:
        raise DmaError(errno.EINVAL, f"RAM layout has {len(layout)} regions (1..{MAX_REGIONS})")
    end = 0
    for gpa, size in sorted(layout):
        if size <= 0 or (gpa | size) % page_size or gpa < end or gpa + size > 1 << 64:
            raise DmaError(errno.EINVAL, f"RAM region {gpa:#x}+{size:#x} is empty, unaligned or overlapping")
        end = gpa + size


def fmt_layout(layout: Layout) -> str:
    return "[" + ", ".join(f"{g:#x}+{s:#x}" for g, s in layout) + "]"


# -- encoder -----------------------------------------------------------------------------
class Encoder:
    """Builds the frames of one stream; keeps the sequence number and the totals.

    Not thread-safe: one sender owns it.
    """

    def __init__(self, page_size: int, layout: Layout, mac_key: bytes | None = None) -> None:
        check_layout(page_size, layout)
        self._mac = hmac.new(mac_key, digestmod="sha256") if mac_key is not None else None
        self.page_size = page_size
        self.layout = tuple(layout)
        self.seq = 0
        self.round = 0
        self.round_pages = 0
        self.pages = 0
        self.bytes = 0
        self.ended = False

    @property
    def keyed(self) -> bool:
        return self._mac is not None

    def _frame(
        self, kind: Kind, checked: tuple[bytes | memoryview, ...], rest: tuple[bytes | memoryview, ...] = (), flags: int = 0
    ) -> list[bytes | memoryview]:
        """Head + ``checked`` (the payload the frame CRC covers) + ``rest`` (page contents,
        checked per page) + the tag of a keyed stream, over all of it."""
        if self.ended:
            raise DmaError(errno.EPROTO, f"encode {kind.name}: the stream has ended")
        length = sum(len(p) for p in checked) + sum(len(p) for p in rest)
        head = struct.pack("<HHII", kind, flags, self.seq, length)
        crc = crc32c(head)
        for p in checked:
            crc = crc32c(p, crc)
        head += struct.pack("<I", crc)
        self.seq += 1
        self.bytes += _FRAME.size + length
        if self._mac is None:
            return [head, *checked, *rest]
        m = self._mac.copy()
        m.update(head)
        for p in (*checked, *rest):
            m.update(p)
        self.bytes += TAG_SIZE
        return [head, *checked, *rest, m.digest()[:TAG_SIZE]]

    def start(self) -> list[bytes | memoryview]:
        """The preamble and the HEADER frame."""
        pre = _PREAMBLE.pack(MAGIC, VERSION, OPT_MAC if self._mac is not None else 0)
        self.bytes += len(pre)
        body = _HEADER.pack(self.page_size, len(self.layout)) + b"".join(
            _REGION.pack(g, s) for g, s in self.layout
        )
        return [pre, *self._frame(Kind.HEADER, (body,))]

    def pages_frame(
        self,
        gpas: list[int] | tuple[int, ...] | np.ndarray,
        data: bytes | memoryview | list[memoryview],
        *,
        crcs: bytes | None = None,
        live: bool = False,
    ) -> list[bytes | memoryview]:
        """A PAGES frame of the current round.  ``data``: the pages' contents in order, one
        buffer or a list of them (runs); ``crcs``: their per-page CRC32Cs when the caller has
        them (:func:`dmarw.checksum.crc32c_pages`), else computed here.  ``live``: read
        from RAM the guest may be writing (flag ``LIVE``; never in a keyed stream)."""
        runs = data if isinstance(data, list) else [memoryview(data)]
        n = len(gpas)
        nbytes = sum(len(r) for r in runs)
        split = crcs is None and any(len(r) % self.page_size for r in runs)  # checks are made per run
        if not 1 <= n <= MAX_PAGES or nbytes != n * self.page_size or split:
            raise DmaError(errno.EINVAL, f"encode PAGES: {n} pages with {nbytes} bytes of data in runs of "
                           f"{', '.join(str(len(r)) for r in runs[:4])}{', ...' if len(runs) > 4 else ''} bytes "
                           f"(whole {self.page_size}-byte pages)")
        if crcs is None:
            crcs = b"".join(crc32c_pages(r, self.page_size) for r in runs)
        if len(crcs) != 4 * n:
            raise DmaError(errno.EINVAL, f"encode PAGES: {len(crcs)} bytes of page checks for {n} pages")
        if live and self._mac is not None:
            raise DmaError(errno.EINVAL, "encode PAGES: a keyed stream sends no LIVE frame (its tag covers the contents)")
        table = np.asarray(gpas, dtype="<u8").tobytes() if isinstance(gpas, np.ndarray) else struct.pack(f"<{n}Q", *gpas)
        head = _PAGES.pack(self.round, n) + table + crcs
        self.round_pages += n
        self.pages += n
        return self._frame(Kind.PAGES, (head,), tuple(runs), LIVE if live else 0)

    def end_round(self) -> list[bytes | memoryview]:
        """Close the current round and start the next."""
        out = self._frame(Kind.ROUND, (_ROUND.pack(self.round, self.round_pages),))
        self.round += 1
        self.round_pages = 0
        return out

    def state_frame(self, name: str, blob: bytes) -> list[bytes | memoryview]:
        """A STATE frame: ``blob`` saved under ``name``."""
        raw = name.encode()
        if not 1 <= len(raw) <= MAX_NAME or len(blob) > MAX_STATE:
            raise DmaError(errno.EINVAL, f"encode STATE {name!r}: name of {len(raw)} bytes, blob of {len(blob):#x}")
        return self._frame(Kind.STATE, (_NAME.pack(len(raw)) + raw, blob))

    def end(self) -> list[bytes | memoryview]:
        """The END frame with the totals."""
        out = self._frame(Kind.END, (_END.pack(self.round, self.seq, self.pages),))
        self.ended = True
        return out


# -- decoder -----------------------------------------------------------------------------
class Decoder:
    """Validates a stream fed in pieces; ``expect`` (page size, layout) must match the header.

    ``receive_data(b"")`` means end of input.  ``next_event()`` returns an event, or
    :data:`NEED_DATA`, or raises :class:`StreamError`.
    """

    def __init__(
        self,
        page_size: int | None = None,
        layout: Layout | None = None,
        mac_key: bytes | None = None,
        sink: Sink | None = None,
    ) -> None:
        self._mac = hmac.new(mac_key, digestmod="sha256") if mac_key is not None else None
        self._sink = sink
        self._fill: _Fill | None = None  # the PAGES frame whose contents are arriving
        self._tag = TAG_SIZE if mac_key is not None else 0
        self.expect_page_size = page_size
        self.expect_layout = tuple(layout) if layout is not None else None
        self._buf = bytearray()  # input at _buf[_pos:_end]; the rest is room for more
        self._pos = 0
        self._end = 0
        self.offset = 0  # stream offset of _buf[_pos]
        self._eof = False
        self._error: StreamError | None = None
        self.header: Header | None = None
        self.seq = 0
        self.round = 0
        self.round_pages = 0
        self.pages = 0
        self.ended = False
        self._preamble_done = False
        self._regions: list[tuple[int, int]] = []
        self.states: set[str] = set()

    @property
    def failed(self) -> StreamError | None:
        return self._error

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Append input; empty ``data`` marks the end of the stream."""
        self._check_open()
        if not data:
            self._eof = True
            return
        mv = memoryview(data).cast("B")
        if self._fill is not None and self._fill.remaining and not self._avail():
            k = min(len(mv), self._fill.remaining)
            self._fill_from(mv[:k])
            mv = mv[k:]
        n = len(mv)
        if n:
            self._room(n)
            self._buf[self._end : self._end + n] = mv
            self._end += n

    def receive_into(self, recv: Callable[[memoryview], int], n: int) -> int:
        """Let ``recv`` write up to ``n`` bytes of input straight into the decoder's buffer
        (a socket's ``recv_into``: no copy through a buffer of the caller's); returns the
        bytes it wrote, 0 meaning end of input (as ``receive_data(b"")``)."""
        self._check_open()
        f = self._fill
        if f is not None and f.remaining and not self._avail():  # page contents: into the sink
            with f.view()[f.run_filled :] as room, room[: min(n, len(room))] as target:
                got = recv(target)
                if not 0 <= got <= len(target):
                    raise DmaError(errno.EINVAL, f"receive_into: recv wrote {got} bytes into room for {len(target)}")
            self._advance(got)
        else:
            self._room(n)
            with memoryview(self._buf) as whole, whole[self._end : self._end + n] as tail:
                got = recv(tail)
            if not 0 <= got <= n:
                raise DmaError(errno.EINVAL, f"receive_into: recv wrote {got} bytes into room for {n}")
            self._end += got
        if got == 0:
            self._eof = True
        return got

    def _check_open(self) -> None:
        if self._error is not None:
            raise self._error
        if self._eof:
            raise self._fail("protocol", "data received after end of input")

    def _room(self, n: int) -> None:
        """Make room for ``n`` more bytes after ``_end``, reusing the buffer: consumed bytes
        are dropped in place and it grows only when a frame needs more than it ever had.
        No view of this buffer outlives a call (a PAGES event's contents are the frame's
        own buffer or the sink's memory), so it may always be moved or resized."""
        if self._pos == self._end:  # all consumed (the usual case): start over in place
            self._pos = self._end = 0
        if len(self._buf) - self._end >= n:
            return
        if self._pos:
            live = self._end - self._pos
            del self._buf[: self._pos]
            self._pos, self._end = 0, live
        del self._buf[self._end :]
        self._buf += bytes(n)

    def _fail(self, reason: str, message: str) -> StreamError:
        self._error = StreamError(reason, message)
        return self._error

    def _avail(self) -> int:
        return self._end - self._pos

    def _truncated(self, what: str) -> StreamError:
        return self._fail(
            "truncated",
            f"input ends at offset {self.offset + self._avail():#x} {what} (no END frame; destination incomplete)",
        )

    def wanted(self) -> int:
        """Bytes still missing before the next event can be decoded (at least 1): a
        receiver may wait for exactly that many (``MSG_WAITALL``) and feed them at once."""
        avail = self._avail()
        if not self._preamble_done:
            return max(1, _PREAMBLE.size - avail)
        if self._fill is not None:
            return self._fill.remaining or max(1, self._tag - avail)
        if avail < _FRAME.size:
            return _FRAME.size - avail
        length = int.from_bytes(self._buf[self._pos + 8 : self._pos + 12], "little")
        if length > self._max_length():
            return 1  # next_event refuses it; do not wait for it
        if self.header is not None and int.from_bytes(self._buf[self._pos : self._pos + 2], "little") == Kind.PAGES:
            if avail < _FRAME.size + _PAGES.size:  # the head and table at once (n follows from the length)
                n, rest = divmod(length - _PAGES.size, 12 + self.header.page_size)
                if rest or not 1 <= n <= MAX_PAGES:  # not a whole PAGES frame: its head first
                    return _FRAME.size + _PAGES.size - avail
                return _FRAME.size + _PAGES.size + 12 * n - avail
            n = int.from_bytes(self._buf[self._pos + 20 : self._pos + 24], "little")
            return max(1, _FRAME.size + _PAGES.size + 12 * min(n, MAX_PAGES) - avail)
        return max(1, _FRAME.size + length + self._tag - avail)

    def next_event(self) -> Event | _NeedData:
        if self._error is not None:
            raise self._error
        if not self._preamble_done:
            if self._avail() < _PREAMBLE.size:
                if self._eof:
                    raise self._truncated("inside the preamble")
                return NEED_DATA
            magic, version, reserved = _PREAMBLE.unpack_from(self._buf, self._pos)
            if magic != MAGIC:
                raise self._fail("mismatch", f"magic {magic!r} at offset 0 is not {MAGIC!r}: not a dmarw migration stream")
            if version != VERSION:
                raise self._fail("mismatch", f"stream version {version} at offset 0x8, this receiver speaks version {VERSION}")
            if reserved & ~OPT_MAC:
                raise self._fail("corrupt", f"preamble options {reserved:#x} at offset 0xa: unknown bits")
            if self._mac is not None and not reserved & OPT_MAC:
                raise self._fail("unauthenticated", "the stream carries no tags, and this receiver requires the shared key")
            if self._mac is None and reserved & OPT_MAC:
                raise self._fail("mismatch", "the stream carries tags, and this receiver has no key to check them")
            self._consume(_PREAMBLE.size)
            self._preamble_done = True
        if self._fill is not None:
            return self._finish_pages()
        if self.ended:
            if self._avail():
                raise self._fail("protocol", f"{self._avail()} bytes of trailing data at offset {self.offset:#x} after the END frame")
            return NEED_DATA
        if self._avail() < _FRAME.size:
            if self._eof:
                raise self._truncated(f"before frame seq {self.seq}" if not self._avail() else f"inside the head of frame seq {self.seq}")
            return NEED_DATA
        kind, flags, seq, length, crc = _FRAME.unpack_from(self._buf, self._pos)
        at = self.offset
        limit = self._max_length()
        if length > limit:
            raise self._fail("corrupt", f"frame at offset {at:#x} (seq {self.seq}) claims {length:#x} payload bytes, more than {limit:#x}")
        if kind == Kind.PAGES and self.header is not None:
            return self._start_pages(flags, seq, length, crc, at)
        if self._avail() < _FRAME.size + length + self._tag:
            if self._eof:
                raise self._truncated(
                    f"inside frame seq {self.seq} at offset {at:#x}: "
                    f"{min(length, self._avail() - _FRAME.size)} of {length} payload bytes"
                    + (f" and {max(0, self._avail() - _FRAME.size - length)} of {self._tag} tag bytes" if self._tag else "")
                )
            return NEED_DATA
        start = self._pos + _FRAME.size
        mv = memoryview(self._buf)
        got = crc32c(mv[start : start + length], crc32c(mv[self._pos : self._pos + _CRC_SPAN]))
        if got != crc:
            raise self._fail("corrupt", f"checksum of frame at offset {at:#x} (seq {self.seq}) is {got:#010x}, frame says {crc:#010x}")
        if self._mac is not None:
            m = self._mac.copy()
            m.update(mv[self._pos : start + length])
            if not hmac.compare_digest(m.digest()[:TAG_SIZE], bytes(mv[start + length : start + length + TAG_SIZE])):
                raise self._fail(
                    "unauthenticated",
                    f"tag of frame at offset {at:#x} (seq {self.seq}) does not match: altered in flight or not sent by the key holder",
                )
        if flags != 0:
            raise self._fail("corrupt", f"frame at offset {at:#x} has flags {flags:#x}")
        if seq != self.seq:
            raise self._fail("protocol", f"frame at offset {at:#x} has seq {seq}, expected {self.seq} (frame lost or reordered)")
        event = self._parse(kind, mv[start : start + length], at)
        self.seq += 1
        self._consume(_FRAME.size + length + self._tag)
        return event

    def _consume(self, n: int) -> None:
        self._pos += n
        self.offset += n

    def _max_length(self) -> int:
        if self.header is None:
            return _HEADER.size + MAX_REGIONS * _REGION.size
        return max(_PAGES.size + MAX_PAGES * (12 + self.header.page_size), _NAME.size + MAX_NAME + MAX_STATE)

    def _parse(self, kind: int, p: memoryview, at: int) -> Event:
        where = f"frame seq {self.seq} at offset {at:#x}"
        if self.header is None and kind != Kind.HEADER:
            raise self._fail("protocol", f"{where}: kind {kind} before the HEADER frame")
        if kind == Kind.HEADER:
            return self._parse_header(p, where)
        if kind == Kind.ROUND:
            if len(p) != _ROUND.size:
                raise self._fail("corrupt", f"{where}: ROUND payload of {len(p)} bytes")
            rnd, pages = _ROUND.unpack(p)
            if rnd != self.round or pages != self.round_pages:
                raise self._fail(
                    "protocol",
                    f"{where}: ROUND {rnd} with {pages} pages, but round {self.round} carried {self.round_pages}",
                )
            self.round += 1
            self.round_pages = 0
            return RoundEnd(rnd, pages)
        if kind == Kind.END:
            if len(p) != _END.size:
                raise self._fail("corrupt", f"{where}: END payload of {len(p)} bytes")
            rounds, frames, pages = _END.unpack(p)
            if self.round_pages:
                raise self._fail("protocol", f"{where}: END inside round {self.round} (no ROUND frame)")
            if (rounds, frames, pages) != (self.round, self.seq, self.pages):
                raise self._fail(
                    "protocol",
                    f"{where}: END says {rounds} rounds, {frames} frames, {pages} pages; "
                    f"received {self.round}, {self.seq}, {self.pages}",
                )
            self.ended = True
            return End(rounds, frames, pages)
        if kind == Kind.STATE:
            return self._parse_state(p, where)
        raise self._fail("corrupt", f"{where}: unknown frame kind {kind}")

    def _parse_state(self, p: memoryview, where: str) -> State:
        if len(p) < _NAME.size:
            raise self._fail("corrupt", f"{where}: STATE payload of {len(p)} bytes")
        (n,) = _NAME.unpack_from(p)
        if not 1 <= n <= MAX_NAME or len(p) < _NAME.size + n or len(p) - _NAME.size - n > MAX_STATE:
            raise self._fail("corrupt", f"{where}: STATE with a {n}-byte name in {len(p)} bytes")
        try:
            name = bytes(p[_NAME.size : _NAME.size + n]).decode()
        except UnicodeDecodeError:
            raise self._fail("corrupt", f"{where}: STATE name is not UTF-8") from None
        if name in self.states:
            raise self._fail("protocol", f"{where}: a second STATE {name!r}")
        self.states.add(name)
        return State(name, bytes(p[_NAME.size + n :]))

    def _parse_header(self, p: memoryview, where: str) -> Header:
        if self.header is not None:
            raise self._fail("protocol", f"{where}: a second HEADER frame")
        if len(p) < _HEADER.size:
            raise self._fail("corrupt", f"{where}: HEADER payload of {len(p)} bytes")
        page_size, n = _HEADER.unpack_from(p)
        if len(p) != _HEADER.size + n * _REGION.size:
            raise self._fail("corrupt", f"{where}: HEADER with {n} regions has {len(p)} bytes")
        layout = tuple(_REGION.unpack_from(p, _HEADER.size + i * _REGION.size) for i in range(n))
        try:
            check_layout(page_size, layout)
        except DmaError as e:
            raise self._fail("corrupt", f"{where}: {e.detail}") from None
        if self.expect_page_size is not None and page_size != self.expect_page_size:
            raise self._fail("mismatch", f"{where}: page size {page_size:#x}, destination uses {self.expect_page_size:#x}")
        if self.expect_layout is not None and tuple(sorted(layout)) != tuple(sorted(self.expect_layout)):
            raise self._fail(
                "mismatch",
                f"{where}: RAM layout {fmt_layout(layout)} differs from the destination's {fmt_layout(self.expect_layout)}",
            )
        self._regions = sorted(layout)
        self.header = Header(VERSION, page_size, layout)
        return self.header

    def _one_run(self, first: int, last: int, n: int, table: bytes, ps: int) -> bool:
        """True when the ``n`` gpas of ``table`` (u64s, the first and the last already read)
        are aligned, consecutive and all inside one region (checked at C speed: the table's
        bytes against those of a range)."""
        if first % ps or last != first + (n - 1) * ps:
            return False
        if not any(g <= first and last + ps <= g + s for g, s in self._regions):
            return False
        return np.arange(first, last + 1, ps, dtype="<u8").tobytes() == table

    # -- PAGES: head and table from the buffer, contents into the sink --------------------
    def _start_pages(self, flags: int, seq: int, length: int, crc: int, at: int) -> Pages | _NeedData:
        assert self.header is not None
        ps = self.header.page_size
        where = f"frame seq {self.seq} at offset {at:#x}"
        avail = self._avail()
        if avail < _FRAME.size + _PAGES.size:
            if self._eof:
                raise self._truncated(f"inside the head of frame seq {self.seq}")
            return NEED_DATA
        top = self._pos + _FRAME.size
        rnd, n = _PAGES.unpack_from(self._buf, top)
        if not 1 <= n <= MAX_PAGES or length != _PAGES.size + n * (12 + ps):
            raise self._fail("corrupt", f"{where}: PAGES of {n} pages has {length} payload bytes")
        table = _PAGES.size + 12 * n
        if avail < _FRAME.size + table:
            if self._eof:
                raise self._truncated(f"inside the page table of frame seq {self.seq} at offset {at:#x}")
            return NEED_DATA
        with memoryview(self._buf) as mv:
            got = crc32c(mv[top : top + table], crc32c(mv[self._pos : self._pos + _CRC_SPAN]))
            if got != crc:
                raise self._fail("corrupt", f"checksum of frame at offset {at:#x} (seq {self.seq}) is {got:#010x}, frame says {crc:#010x}")
            if flags & ~LIVE:
                raise self._fail("corrupt", f"frame at offset {at:#x} has flags {flags:#x}")
            if seq != self.seq:
                raise self._fail("protocol", f"frame at offset {at:#x} has seq {seq}, expected {self.seq} (frame lost or reordered)")
            if rnd != self.round:
                raise self._fail("protocol", f"{where}: PAGES of round {rnd} while round {self.round} is open")
            at_table = top + _PAGES.size
            (first,), (last,) = _GPA.unpack_from(self._buf, at_table), _GPA.unpack_from(self._buf, at_table + 8 * (n - 1))
            gpas: Sequence[int]
            if self._one_run(first, last, n, bytes(mv[at_table : at_table + 8 * n]), ps):  # the usual frame
                gpas, runs = range(first, last + ps, ps), [(first, n * ps)]
            else:
                gpas = struct.unpack_from(f"<{n}Q", self._buf, at_table)
                runs = self._runs(gpas, ps, where)
            mac = None
            if self._mac is not None:
                mac = self._mac.copy()
                mac.update(mv[self._pos : top + table])
            crcs = bytes(mv[top + _PAGES.size + 8 * n : top + table])
        self._consume(_FRAME.size + table)
        scratch = bytearray(n * ps) if self._sink is None else None
        self._fill = _Fill(rnd, gpas, crcs, bool(flags & LIVE), where, runs, n * ps, mac, self._sink, scratch)
        self._fill.at = at
        if self._avail():  # contents already buffered with the head: into the sink
            k = min(self._avail(), self._fill.remaining)
            with memoryview(self._buf) as mv, mv[self._pos : self._pos + k] as part:
                self._fill_from(part, consumed=True)
        return self._finish_pages()

    def _runs(self, gpas: tuple[int, ...], ps: int, where: str) -> list[tuple[int, int]]:
        """``gpas`` (not one run) as (gpa, bytes) runs of consecutive pages inside one region."""
        runs: list[tuple[int, int]] = []
        end = -1
        seen: set[int] = set()
        for g in gpas:
            if g in seen:  # with a sink its second copy would land on the first before the check
                raise self._fail("corrupt", f"{where}: page gpa {g:#x} appears twice in one frame")
            seen.add(g)
            region = next(((rg, rs) for rg, rs in self._regions if rg <= g and g + ps <= rg + rs), None)
            if g % ps or region is None:
                raise self._fail("corrupt", f"{where}: page gpa {g:#x} is unaligned or outside the RAM layout")
            if g == end and g < region[0] + region[1] and runs[-1][0] >= region[0]:
                runs[-1] = (runs[-1][0], runs[-1][1] + ps)
            else:
                runs.append((g, ps))
            end = g + ps
        return runs

    def _fill_from(self, data: memoryview, consumed: bool = False) -> None:
        """Copy ``data`` (at most what the frame still needs) into the sink, run by run;
        ``consumed``: it is the decoder's own buffered input, dropped as it goes."""
        f = self._fill
        assert f is not None
        at = 0
        while at < len(data):
            with f.view()[f.run_filled :] as room:
                k = min(len(room), len(data) - at)
                room[:k] = data[at : at + k]
            at += k
            self._advance(k, consumed)

    def _advance(self, k: int, consumed: bool = False) -> None:
        f = self._fill
        assert f is not None
        f.advance(k)
        if consumed:
            self._pos += k
        self.offset += k

    def _finish_pages(self) -> Pages | _NeedData:
        f = self._fill
        assert f is not None and self.header is not None
        ps = self.header.page_size
        if f.remaining:
            if self._eof:
                raise self._truncated(f"inside {f.where}: {f.total - f.remaining} of {f.total} bytes of page contents")
            return NEED_DATA
        if f.mac is not None:
            if self._avail() < TAG_SIZE:
                if self._eof:
                    raise self._truncated(f"inside {f.where}: {self._avail()} of {TAG_SIZE} tag bytes")
                return NEED_DATA
            for v in f.views:
                f.mac.update(v)
            tag = bytes(self._buf[self._pos : self._pos + TAG_SIZE])
            if not hmac.compare_digest(f.mac.digest()[:TAG_SIZE], tag):
                raise self._fail(
                    "unauthenticated",
                    f"tag of frame at offset {f.at:#x} (seq {self.seq}) does not match: altered in flight or not sent by the key holder",
                )
            self._consume(TAG_SIZE)
        got = b"".join(crc32c_pages(v, ps) for v in f.views)
        bad: tuple[int, ...] = ()
        if got != f.crcs:
            bad = tuple(g for i, g in enumerate(f.gpas) if got[4 * i : 4 * i + 4] != f.crcs[4 * i : 4 * i + 4])
            if not f.live or self._mac is not None:
                i = f.gpas.index(bad[0])
                (want,), (have,) = _CRC.unpack_from(f.crcs, 4 * i), _CRC.unpack_from(got, 4 * i)
                raise self._fail(
                    "corrupt",
                    f"{f.where}: {len(bad)} page(s) fail their check, first gpa {bad[0]:#x} "
                    f"(contents {have:#010x}, frame says {want:#010x})",
                )
        self._fill = None
        self.seq += 1
        self.round_pages += len(f.gpas)
        self.pages += len(f.gpas)
        data = memoryview(f.scratch).toreadonly() if f.scratch is not None else None
        return Pages(f.round, f.gpas, data, bad, f.live)

    def release(self) -> None:
        """Drop a frame cut short: its views of the sink's memory are released."""
        f, self._fill = self._fill, None
        if f is not None:
            for v in f.views:
                v.release()

    def events(self) -> list[Event]:
        """Every event available now (stops at NEED_DATA)."""
        out: list[Event] = []
        while True:
            ev = self.next_event()
            if isinstance(ev, _NeedData):
                return out
            out.append(ev)


class _Fill:
    """A PAGES frame whose contents are arriving: where each run goes, how far it got."""

    def __init__(
        self,
        rnd: int,
        gpas: Sequence[int],
        crcs: bytes,
        live: bool,
        where: str,
        runs: list[tuple[int, int]],
        total: int,
        mac: Any,
        sink: Sink | None,
        scratch: bytearray | None,
    ) -> None:
        self.round, self.gpas, self.crcs, self.live, self.where = rnd, gpas, crcs, live, where
        self.runs, self.total, self.remaining, self.mac = runs, total, total, mac
        self._sink, self.scratch = sink, scratch
        self.views: list[memoryview] = []  # one per run begun, in order
        self.run_filled = 0
        self.at = 0  # stream offset of the frame

    def view(self) -> memoryview:
        """The current run's memory (got from the sink when the run begins)."""
        i = len(self.views)
        if self.views and self.run_filled < len(self.views[-1]):
            return self.views[-1]
        gpa, n = self.runs[i]
        if self._sink is None:
            assert self.scratch is not None
            at = self.total - self.remaining
            v = memoryview(self.scratch)[at : at + n]
        else:
            v = self._sink(gpa, n)
            if len(v) != n or v.readonly:
                raise DmaError(errno.EINVAL, f"stream sink for gpa {gpa:#x}+{n:#x} gave {len(v)} bytes, readonly {v.readonly}")
        self.views.append(v)
        self.run_filled = 0
        return v

    def advance(self, k: int) -> None:
        self.run_filled += k
        self.remaining -= k
