"""The client's memory as the server sees it: DMA regions, their fd mappings, dirty logging.

:class:`ClientMemory` keeps the client's DMA regions in the order they were mapped (slots
reused after unmap).  A region mapped with an fd is ``mmap``-ed into one
:class:`~dmarw.AddressSpace` per client and entered in a :class:`~dmarw.Container` at its
iova, so device DMA to it is the container's ``dma_rw`` (permission-checked,
dirty-tracked).  A region without an fd is reached with DMA_READ/DMA_WRITE messages
through ``send`` (the session's round trip to the client), split at the client's
``max_data_xfer_size``.

Dirty logging (DMA_LOGGING_START/REPORT/STOP) reads the container's bitmaps, per whole
mapping, into one set of dirty 4 KiB pages (so a report that cuts a mapping loses no bit)
and reports the asked range at the asked page size; writes made with messages are logged
there too.

After DMA_UNMAP returns, the mapping is gone from the container and ``munmap``-ed: no
access can reach the client's memory through it.

Threading: the session's thread only.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import heapq
import mmap
import os
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass

from .. import core
from ..bitmap import bitmap_bytes
from ..bitmap import from_bytes as bitmap_pages
from ..errors import fail, rng
from ..mm import AddressSpace, Region
from ..type1 import Prot
from .device import DmaPort
from .protocol import DEFAULT_MAX_DMA_MAPS, DMA_READ_FLAG, DMA_WRITE_FLAG, DmaMap

PAGE = 4096
SHIFT = 12
Buffer = bytes | bytearray | memoryview
# send(cmd, body) -> reply body: the session's server-to-client round trip
Sender = Callable[[int, bytes], bytes]


def _address_of(m: mmap.mmap) -> int:
    probe = ctypes.c_char.from_buffer(m)
    try:
        return ctypes.addressof(probe)
    finally:
        del probe


def map_fd(space: AddressSpace, fd: int, offset: int, size: int, writable: bool) -> int:
    """``mmap`` ``size`` bytes of ``fd`` at ``offset`` into ``space``; returns the hva.

    The file must hold the whole range (no SIGBUS later on a short file).  A read-only
    mapping is made copy-on-write so the host address exists; the container's ``prot``
    refuses writes to it.
    """
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise fail(errno.EINVAL, f"dma map fd {fd}: not a regular file or memfd")
    if offset % PAGE or size % PAGE or offset + size > st.st_size:
        raise fail(errno.EINVAL, f"dma map fd {fd}: file range {rng(offset, size)} not whole pages inside its {st.st_size:#x} bytes")
    try:
        m = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, offset=offset)
    except PermissionError:
        if writable:
            raise fail(errno.EACCES, f"dma map fd {fd}: {rng(offset, size)} cannot be mapped writable") from None
        m = mmap.mmap(fd, size, access=mmap.ACCESS_COPY, offset=offset)
    except OSError as e:
        raise fail(e.errno or errno.EINVAL, f"dma map fd {fd}: mmap {rng(offset, size)}: {e.strerror}") from e
    region = Region(_address_of(m), size, m, "fd")
    # AddressSpace has no public "adopt this mapping" yet: publish it the way mmap() does
    with space._map_lock:
        regions = sorted((*space._snap[0], region), key=lambda r: r.hva)
        space._snap = (tuple(regions), [r.hva for r in regions])
    return region.hva


@dataclass(eq=False)
class DmaRegion:
    iova: int
    size: int
    flags: int
    offset: int
    hva: int | None  # set when mapped through an fd

    @property
    def end(self) -> int:
        return self.iova + self.size


class ClientMemory(DmaPort):
    """One client's DMA regions; the device's :class:`DmaPort` while it is connected."""

    def __init__(self, send: Sender, *, max_xfer: int, max_maps: int = DEFAULT_MAX_DMA_MAPS, core_name: str | None = None) -> None:
        self._send = send
        self.max_xfer = max_xfer
        self.max_maps = max_maps
        self.space = AddressSpace()
        self.container = core.container(core_name)
        self.slots: list[DmaRegion | None] = []  # in mapping order, freed slots reused
        self._free: list[int] = []  # free slot indexes (a heap: lowest first)
        self._starts: list[int] = []  # sorted iovas of the live regions...
        self._by_start: dict[int, DmaRegion] = {}  # ...and the regions by iova
        self._slot_of: dict[int, int] = {}  # iova -> slot index
        self.logging = False
        self.log_page_size = PAGE
        self.dirty: set[int] = set()  # 4 KiB page numbers written while logging
        self.gone = False  # the client cannot be reached any more (no DMA)
        self.closed = False

    # -- map / unmap ------------------------------------------------------------------------
    def regions(self) -> list[DmaRegion]:
        return [r for r in self.slots if r is not None]

    def __len__(self) -> int:
        return len(self._starts)

    def mappings(self) -> list[tuple[int, int, int, bool]]:
        return [(r.iova, r.size, r.flags, r.hva is not None) for r in self.regions()]

    def _find(self, iova: int) -> DmaRegion | None:
        i = bisect.bisect_right(self._starts, iova) - 1
        if i >= 0:
            r = self._by_start[self._starts[i]]
            if iova < r.end:
                return r
        return None

    def map(self, req: DmaMap) -> None:
        """DMA_MAP: ``EEXIST`` on overlap, ``EINVAL`` unaligned, ``ENOSPC`` past max maps."""
        what = f"DMA_MAP {rng(req.addr, req.size)}"
        if req.addr % PAGE or req.size % PAGE:
            raise fail(errno.EINVAL, f"{what}: not aligned to {PAGE:#x}")
        if not req.flags & DMA_READ_FLAG:
            raise fail(errno.EINVAL, f"{what}: not readable (flags {req.flags:#x})")
        i = bisect.bisect_left(self._starts, req.addr + req.size) - 1  # the last region starting below the end
        if i >= 0:
            r = self._by_start[self._starts[i]]
            if r.end > req.addr:
                raise fail(errno.EEXIST, f"{what} overlaps {rng(r.iova, r.size)}")
        if len(self._starts) >= self.max_maps:
            raise fail(errno.ENOSPC, f"{what}: {self.max_maps} regions already mapped")
        hva = None
        if req.fd is not None:
            writable = bool(req.flags & DMA_WRITE_FLAG)
            hva = map_fd(self.space, req.fd, req.offset, req.size, writable)
            prot = Prot.READ | (Prot.WRITE if writable else 0)
            try:
                self.container.map_dma(req.addr, req.size, hva, self.space, Prot(prot))
            except BaseException:
                self.space.munmap(hva, req.size)
                raise
        region = DmaRegion(req.addr, req.size, req.flags, req.offset, hva)
        if self._free:
            j = heapq.heappop(self._free)
            self.slots[j] = region
        else:
            j = len(self.slots)
            self.slots.append(region)
        bisect.insort(self._starts, region.iova)
        self._by_start[region.iova] = region
        self._slot_of[region.iova] = j

    def _forget(self, r: DmaRegion) -> None:
        j = self._slot_of.pop(r.iova)
        del self._by_start[r.iova]
        self._starts.pop(bisect.bisect_left(self._starts, r.iova))
        self.slots[j] = None
        heapq.heappush(self._free, j)

    def unmap(self, addr: int, size: int, *, want_bitmap: bool = False, pgsize: int = PAGE) -> bytes:
        """DMA_UNMAP of exactly one region (``ENOENT`` otherwise); its dirty bitmap if asked."""
        r = self._by_start.get(addr)
        if r is None or r.size != size:
            raise fail(errno.ENOENT, f"DMA_UNMAP {rng(addr, size)}: no such DMA region")
        if want_bitmap and not self.logging:
            raise fail(errno.EINVAL, f"DMA_UNMAP {rng(addr, size)}: dirty bitmap asked but logging is off")
        bitmap = b""
        if want_bitmap:
            _check_pgsize(pgsize)
        self._drop(r)
        self._forget(r)
        if want_bitmap:
            bitmap = self.take_bitmap(addr, size, pgsize)
        return bitmap

    def _drop(self, r: DmaRegion) -> None:
        if r.hva is not None:
            if self.logging:
                _, bm = self.container.unmap_dma(r.iova, r.size, get_dirty_bitmap=True)  # type: ignore[misc]
                self.dirty.update((r.iova >> SHIFT) + p for p in bitmap_pages(bm))
            else:
                self.container.unmap_dma(r.iova, r.size)
            self.space.munmap(r.hva, r.size)
            r.hva = None

    def unmap_all(self) -> None:
        for r in self.regions():
            self._drop(r)
            self._forget(r)

    def close(self) -> None:
        """The client is gone: every region unmapped, the address space released."""
        if self.closed:
            return
        self.unmap_all()
        self.logging_stop()
        self.space.close()
        self.closed = self.gone = True

    # -- dirty logging ----------------------------------------------------------------------
    def logging_start(self, page_size: int) -> int:
        _check_pgsize(page_size)
        if self.logging:
            raise fail(errno.EBUSY, "DMA logging is already started")
        self.container.dirty_pages_start()
        self.logging = True
        self.log_page_size = page_size
        self.dirty.clear()
        return page_size

    def logging_stop(self) -> None:
        if self.logging:
            self.container.dirty_pages_stop()
        self.logging = False
        self.dirty.clear()

    def _harvest(self, iova: int, length: int) -> None:
        for r in self.regions():
            if r.hva is not None and r.iova < iova + length and iova < r.end:
                bm = self.container.get_dirty_bitmap(r.iova, r.size, PAGE)
                self.dirty.update((r.iova >> SHIFT) + p for p in bitmap_pages(bm))

    def take_bitmap(self, iova: int, length: int, page_size: int) -> bytes:
        """Get and clear the dirty pages of ``[iova, iova+length)`` as a bitmap of
        ``page_size`` bits (u64 words, bit k = ``iova + k*page_size``)."""
        if iova % PAGE or length % PAGE or length == 0:
            raise fail(errno.EINVAL, f"dirty report {rng(iova, length)}: not whole 4 KiB pages")
        _check_pgsize(page_size)
        nbits = -(-length // page_size)
        out = bytearray(bitmap_bytes(nbits))
        self._harvest(iova, length)
        first, last = iova >> SHIFT, (iova + length - 1) >> SHIFT
        hit = [p for p in self.dirty if first <= p <= last]
        for p in hit:
            self.dirty.discard(p)
            off = (p << SHIFT) - iova
            lo, hi = off // page_size, (off + PAGE - 1) // page_size
            for k in range(lo, min(hi, nbits - 1) + 1):
                out[k >> 3] |= 1 << (k & 7)
        return bytes(out)

    # -- device DMA -------------------------------------------------------------------------
    def rw(self, iova: int, buf: Buffer, write: bool, *, messages: bool = False) -> None:
        """Device DMA: all of it checked against the regions first (``EINVAL`` unmapped,
        ``EPERM`` read-only), then each piece through the container or messages."""
        if not messages and not self.gone:  # the common case: inside one fd mapping
            starts = self._starts
            i = bisect.bisect_right(starts, iova) - 1
            if i >= 0:
                hit = self._by_start[starts[i]]
                t = type(buf)
                plain = t is bytearray or t is bytes or (t is memoryview and buf.itemsize == 1 and buf.ndim == 1)  # type: ignore[union-attr]
                if plain and hit.hva is not None and iova + len(buf) <= hit.end:
                    self.container.dma_rw(iova, buf, write)  # checks the buffer itself
                    return
        if self.gone or self.closed:
            raise fail(errno.ENOTCONN, f"dma {rng(iova, memoryview(buf).nbytes)}: the client is gone")
        mv = buf if type(buf) is memoryview else memoryview(buf)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        n = mv.nbytes
        if n == 0:
            raise fail(errno.EINVAL, f"dma at iova {iova:#x}: zero length")
        if not write and mv.readonly:
            raise fail(errno.EINVAL, f"dma read {rng(iova, n)}: buffer is read-only")
        if iova < 0 or iova + n > 1 << 64:
            raise fail(errno.EOVERFLOW, f"dma {rng(iova, n)}: wraps past 2**64")
        pieces: list[tuple[DmaRegion, int, int]] = []
        pos = 0
        while pos < n:
            cur = iova + pos
            r = self._find(cur)
            if r is None:
                raise fail(errno.EINVAL, f"dma {rng(iova, n)}: iova {cur:#x} is not mapped")
            if write and not r.flags & DMA_WRITE_FLAG:
                raise fail(errno.EPERM, f"dma write {rng(iova, n)}: region {rng(r.iova, r.size)} is read-only")
            seg = min(n - pos, r.end - cur)
            pieces.append((r, pos, seg))
            pos += seg
        for r, pos, seg in pieces:
            part = mv[pos : pos + seg]
            if r.hva is not None and not messages:
                self.container.dma_rw(iova + pos, part, write)
            else:
                self._message_rw(iova + pos, part, write)

    def _message_rw(self, iova: int, mv: memoryview, write: bool) -> None:
        from .protocol import Command

        n = mv.nbytes
        step = self.max_xfer
        for pos in range(0, n, step):
            seg = min(step, n - pos)
            addr = iova + pos
            if write:
                reply = self._send(Command.DMA_WRITE, struct.pack("<QQ", addr, seg) + bytes(mv[pos : pos + seg]))
                if len(reply) < 16:
                    raise fail(errno.EIO, f"DMA_WRITE {rng(addr, seg)}: short reply of {len(reply)} bytes")
                if self.logging:
                    self.dirty.update(range(addr >> SHIFT, ((addr + seg - 1) >> SHIFT) + 1))
            else:
                reply = self._send(Command.DMA_READ, struct.pack("<QQ", addr, seg))
                if len(reply) != 16 + seg:
                    raise fail(errno.EIO, f"DMA_READ {rng(addr, seg)}: reply of {len(reply)} bytes, expected {16 + seg}")
                mv[pos : pos + seg] = reply[16:]


def _check_pgsize(page_size: int) -> None:
    if page_size <= 0 or page_size & (page_size - 1) or page_size > 1 << 40:
        raise fail(errno.EINVAL, f"page size {page_size:#x} is not a power of two")
