"""The device side of vfio-user: what a Python device model implements.

A :class:`Device` is a PCI function: a config space (:class:`PciConfig`, header type 0,
BARs sized the way a guest's enumeration probes them), regions (:class:`Region`: read/write
callbacks, optionally backed by a memfd the client may ``mmap`` in sparse areas),
interrupts (:class:`Irqs`: eventfds per index and sub-index, masking), reset, and the
migration v2 state machine (:class:`MigrationFsm`) with the model's state/data callbacks.
DMA goes through :attr:`Device.dma`, a :class:`DmaPort` the server installs while a
client is connected.

Threading: one thread.  The server calls every callback from its serve loop; a model that
starts threads of its own serialises their use of the device.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..errors import DmaError, fail, rng
from .protocol import (
    BAR0,
    CONFIG_REGION,
    INTX,
    IRQ_INFO_EVENTFD,
    IRQ_INFO_MASKABLE,
    IRQ_INFO_NORESIZE,
    MIGRATION_P2P,
    MIGRATION_PRE_COPY,
    MIGRATION_STOP_COPY,
    MSI,
    MSIX,
    PCI_NUM_IRQS,
    PCI_NUM_REGIONS,
    REGION_FLAG_MMAP,
    REGION_FLAG_READ,
    REGION_FLAG_WRITE,
    ROM_REGION,
    MigState,
)

ReadFn = Callable[[int, int], bytes]
WriteFn = Callable[[int, bytes], None]
PAGE = 4096


def _page_up(n: int) -> int:
    return -(-n // PAGE) * PAGE


# -- regions --------------------------------------------------------------------------------


@dataclass(frozen=True)
class MmapArea:
    offset: int
    size: int


class Region:
    """A device region of ``size`` bytes.

    Accesses go to ``read(offset, count) -> bytes`` / ``write(offset, data)``; without them
    to the region's memory (``mem``), which exists when ``mmap_areas`` is given (or
    ``memory=True``): a memfd of the size rounded up to a page, offered to the client with
    a sparse-mmap capability listing ``mmap_areas``.  Bounds are checked before a callback
    runs (``EINVAL`` naming the region, offset and count).
    """

    def __init__(
        self,
        size: int,
        *,
        read: ReadFn | None = None,
        write: WriteFn | None = None,
        readable: bool = True,
        writable: bool = True,
        mmap_areas: Iterable[tuple[int, int]] | None = None,
        memory: bool = False,
        name: str = "",
    ) -> None:
        if not isinstance(size, int) or size < 0:
            raise fail(errno.EINVAL, f"region size {size!r} is not a non-negative integer")
        self.size = size
        self.name = name
        self.readable, self.writable = readable, writable
        self.areas = [MmapArea(o, s) for o, s in (mmap_areas or ())]
        for a in self.areas:
            if a.offset % PAGE or a.size <= 0 or a.size % PAGE or a.offset + a.size > _page_up(size):
                raise fail(errno.EINVAL, f"region {name or size}: mmap area {rng(a.offset, a.size)} is not whole pages inside it")
        self.fd: int | None = None
        self.mem: mmap.mmap | None = None
        if self.areas or memory:
            self.fd = os.memfd_create(f"dmarw-region-{name}", os.MFD_CLOEXEC)
            os.ftruncate(self.fd, max(_page_up(size), PAGE))
            self.mem = mmap.mmap(self.fd, max(_page_up(size), PAGE), flags=mmap.MAP_SHARED)
        self._read = read or (self._mem_read if self.mem is not None else None)
        self._write = write or (self._mem_write if self.mem is not None else None)

    @property
    def flags(self) -> int:
        f = (REGION_FLAG_READ if self.readable else 0) | (REGION_FLAG_WRITE if self.writable else 0)
        return f | (REGION_FLAG_MMAP if self.areas else 0)

    def _mem_read(self, offset: int, count: int) -> bytes:
        assert self.mem is not None
        return self.mem[offset : offset + count]

    def _mem_write(self, offset: int, data: bytes) -> None:
        assert self.mem is not None
        self.mem[offset : offset + len(data)] = data

    def _check(self, what: str, offset: int, count: int) -> None:
        if count <= 0 or offset < 0 or offset + count > self.size:
            raise fail(errno.EINVAL, f"{what} {self.name or 'region'} {rng(offset, count)} outside its {self.size:#x} bytes")

    def read(self, offset: int, count: int) -> bytes:
        self._check("read", offset, count)
        if not self.readable or self._read is None:
            raise fail(errno.EINVAL, f"read {self.name or 'region'} {rng(offset, count)}: not readable")
        data = self._read(offset, count)
        if len(data) != count:
            raise fail(errno.EIO, f"read {self.name or 'region'} {rng(offset, count)}: the model returned {len(data)} bytes")
        return data

    def write(self, offset: int, data: bytes) -> None:
        self._check("write", offset, len(data))
        if not self.writable or self._write is None:
            raise fail(errno.EINVAL, f"write {self.name or 'region'} {rng(offset, len(data))}: not writable")
        self._write(offset, data)

    def close(self) -> None:
        if self.mem is not None:
            try:
                self.mem.close()
            except BufferError:
                pass
            self.mem = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# -- PCI config space -----------------------------------------------------------------------

PCI_CONFIG_SIZE = 256
BAR_MEM_64 = 0x4
BAR_PREFETCH = 0x8
BAR_IO = 0x1
CMD_WRITABLE = 0x0547  # io, mem, master, parity, serr, intx-disable
STATUS_CAP_LIST = 0x10
CAP_ID_MSI = 0x05
CAP_ID_MSIX = 0x11


class PciConfig:
    """A type-0 configuration header with BAR sizing.

    Writes to a BAR keep only the bits above its size (rounded up to a power of two), so
    writing all-ones reads back the size mask, as enumeration expects; read-only fields
    ignore writes.  ``data`` is the raw 256 bytes (a model may add capabilities there and
    open bits in ``wmask``).
    """

    def __init__(
        self,
        vendor: int,
        device: int,
        subsys_vendor: int = 0,
        subsys: int = 0,
        *,
        class_code: int = 0xFF0000,
        revision: int = 0,
        bars: dict[int, tuple[int, int]] | None = None,
        rom_size: int = 0,
        intx_pin: int = 0,
    ) -> None:
        self.data = bytearray(PCI_CONFIG_SIZE)
        self.wmask = bytearray(PCI_CONFIG_SIZE)
        struct.pack_into("<HH", self.data, 0, vendor, device)
        struct.pack_into("<I", self.data, 8, (class_code << 8) | revision)
        struct.pack_into("<HH", self.data, 0x2C, subsys_vendor, subsys)
        self.data[0x0E] = 0  # header type 0
        self.data[0x3D] = intx_pin
        struct.pack_into("<H", self.wmask, 4, CMD_WRITABLE)
        self.wmask[0x0C] = 0xFF  # cache line size
        self.wmask[0x0D] = 0xFF  # latency timer
        self.wmask[0x3C] = 0xFF  # interrupt line
        self.bars: dict[int, tuple[int, int]] = dict(bars or {})  # index -> (size, low flag bits)
        self.rom_size = rom_size
        self._cap_last = 0  # offset of the last capability in the list (0: none yet)
        self._cap_end = 0x40  # where the next one goes
        for i, (_size, bits) in self.bars.items():
            struct.pack_into("<I", self.data, 0x10 + 4 * i, bits)

    def _bar_mask(self, size: int) -> int:
        return ~(max(1 << (size - 1).bit_length(), 16) - 1) & 0xFFFFFFFF if size else 0

    def read(self, offset: int, count: int) -> bytes:
        return bytes(self.data[offset : offset + count])

    def write(self, offset: int, data: bytes) -> None:
        for k, b in enumerate(data):
            o = offset + k
            m = self.wmask[o]
            self.data[o] = (self.data[o] & ~m) | (b & m)
        lo, hi = offset, offset + len(data)
        for i in range(6):  # BARs: keep the bits above the size, the flag bits fixed
            base = 0x10 + 4 * i
            if base < hi and base + 4 > lo:
                raw = bytearray(self.data[base : base + 4])
                for k in range(max(lo, base), min(hi, base + 4)):
                    raw[k - base] = data[k - lo]
                (v,) = struct.unpack("<I", raw)
                size, bits = self.bars.get(i, (0, 0))
                if bits & BAR_IO:
                    mask = ~(max(1 << (size - 1).bit_length(), 4) - 1) & 0xFFFFFFFF if size else 0
                    val = (v & mask) | (bits & 0x3)
                else:
                    val = (v & self._bar_mask(size)) | (bits & 0xF) if size else 0
                struct.pack_into("<I", self.data, base, val)
        if 0x30 < hi and 0x34 > lo:  # expansion ROM: size mask plus the enable bit
            raw = bytearray(self.data[0x30:0x34])
            for k in range(max(lo, 0x30), min(hi, 0x34)):
                raw[k - 0x30] = data[k - lo]
            (v,) = struct.unpack("<I", raw)
            val = (v & self._bar_mask(self.rom_size) & ~0x7FF) | (v & 1) if self.rom_size else 0
            struct.pack_into("<I", self.data, 0x30, val)

    @property
    def command(self) -> int:
        return int(struct.unpack_from("<H", self.data, 4)[0])

    # -- capabilities -------------------------------------------------------------------------
    def add_capability(self, cap_id: int, body: bytes, wmask: bytes = b"") -> int:
        """Append a capability (``cap_id``, next pointer, then ``body``) to the list at
        0x34, 4-byte aligned after the last one; ``wmask`` opens bits of ``body`` to the
        guest.  Returns its offset; ``ENOSPC`` when the 256 bytes are full."""
        offset = self._cap_end
        end = offset + 2 + len(body)
        if end > PCI_CONFIG_SIZE:
            raise fail(errno.ENOSPC, f"capability {cap_id:#x} of {2 + len(body)} bytes does not fit at {offset:#x}")
        self.data[offset] = cap_id
        self.data[offset + 1] = 0
        self.data[offset + 2 : end] = body
        self.wmask[offset + 2 : offset + 2 + len(wmask)] = wmask
        if self._cap_last:
            self.data[self._cap_last + 1] = offset
        else:
            self.data[0x34] = offset
            struct.pack_into("<H", self.data, 6, self.status | STATUS_CAP_LIST)
        self._cap_last = offset
        self._cap_end = (end + 3) & ~3
        return offset

    def add_msix(self, count: int, table_bar: int, table_offset: int, pba_bar: int, pba_offset: int) -> int:
        """The MSI-X capability for ``count`` vectors whose table and PBA live in the given
        BARs at the given offsets (the VMM emulates the table and programs the vectors with
        SET_IRQS); enable and function-mask are the guest's to write."""
        if not 1 <= count <= 2048 or table_offset & 7 or pba_offset & 7 or table_bar > 5 or pba_bar > 5:
            raise fail(errno.EINVAL, f"MSI-X of {count} vectors, table {table_bar}:{table_offset:#x}, pba {pba_bar}:{pba_offset:#x}")
        body = struct.pack("<HII", count - 1, table_offset | table_bar, pba_offset | pba_bar)
        return self.add_capability(CAP_ID_MSIX, body, wmask=struct.pack("<H", 0xC000))

    def add_msi(self, vectors_log2: int = 0) -> int:
        """A 64-bit MSI capability offering ``2**vectors_log2`` vectors (at most 32)."""
        if not 0 <= vectors_log2 <= 5:
            raise fail(errno.EINVAL, f"MSI with 2**{vectors_log2} vectors: at most 32")
        control = (vectors_log2 << 1) | 0x80  # multiple message capable, 64-bit
        body = struct.pack("<HIIH", control, 0, 0, 0)
        wm = struct.pack("<HIIH", 0x71, 0xFFFFFFFC, 0xFFFFFFFF, 0xFFFF)  # enable, mme, address, data
        return self.add_capability(CAP_ID_MSI, body, wmask=wm)

    @property
    def status(self) -> int:
        return int(struct.unpack_from("<H", self.data, 6)[0])

    def capabilities(self) -> list[tuple[int, int]]:
        """(id, offset) of each capability, walking the list from 0x34 (loops cut)."""
        out: list[tuple[int, int]] = []
        if not self.status & STATUS_CAP_LIST:
            return out
        pos = self.data[0x34] & ~3
        while pos and len(out) < 48:
            out.append((self.data[pos], pos))
            pos = self.data[pos + 1] & ~3
        return out


# -- interrupts -----------------------------------------------------------------------------


class Irqs:
    """Per index: ``count`` sub-indexes, an eventfd each (or none), a mask and a pending bit.

    :meth:`trigger` signals the eventfd (writes 1) unless masked; a masked trigger is
    remembered and delivered on unmask.
    """

    def __init__(self, counts: dict[int, int]) -> None:
        self.counts = [counts.get(i, 0) for i in range(PCI_NUM_IRQS)]
        self.fds: list[list[int | None]] = [[None] * n for n in self.counts]
        self.masked: list[list[bool]] = [[False] * n for n in self.counts]
        self.pending: list[list[bool]] = [[False] * n for n in self.counts]
        self.fired = [0] * PCI_NUM_IRQS  # triggers delivered, per index

    def info_flags(self, index: int) -> int:
        if index == INTX:
            return IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE
        if index in (MSI, MSIX):
            return IRQ_INFO_EVENTFD | IRQ_INFO_NORESIZE
        return IRQ_INFO_EVENTFD

    def trigger(self, index: int, sub: int = 0) -> bool:
        """Raise interrupt ``index``/``sub``; True if an eventfd was signalled."""
        if not 0 <= index < PCI_NUM_IRQS or not 0 <= sub < self.counts[index]:
            raise fail(errno.EINVAL, f"irq {index}[{sub}] does not exist")
        if self.masked[index][sub]:
            self.pending[index][sub] = True
            return False
        fd = self.fds[index][sub]
        if fd is None:
            return False
        os.eventfd_write(fd, 1)
        self.fired[index] += 1
        return True

    def set_fd(self, index: int, sub: int, fd: int | None) -> None:
        old = self.fds[index][sub]
        if old is not None and old != fd:
            os.close(old)
        self.fds[index][sub] = fd

    def set_mask(self, index: int, sub: int, masked: bool) -> None:
        self.masked[index][sub] = masked
        if not masked and self.pending[index][sub]:
            self.pending[index][sub] = False
            self.trigger(index, sub)

    def close(self) -> None:
        """Drop every eventfd (the client's; closed when it goes)."""
        for index, subs in enumerate(self.fds):
            for sub in range(len(subs)):
                self.set_fd(index, sub, None)


# -- migration ------------------------------------------------------------------------------

_SAVING = frozenset((MigState.PRE_COPY, MigState.STOP_COPY, MigState.PRE_COPY_P2P))


def _arcs(flags: int) -> dict[MigState, list[MigState]]:
    """The direct arcs of the v2 state machine for a device with migration ``flags``."""
    S = MigState
    p2p, pre = bool(flags & MIGRATION_P2P), bool(flags & MIGRATION_PRE_COPY)
    arcs: dict[MigState, list[MigState]] = {s: [] for s in S}
    arcs[S.STOP] += [S.STOP_COPY, S.RESUMING, S.RUNNING_P2P if p2p else S.RUNNING]
    arcs[S.STOP_COPY] += [S.STOP]
    arcs[S.RESUMING] += [S.STOP]
    arcs[S.RUNNING] += [S.RUNNING_P2P if p2p else S.STOP]
    if p2p:
        arcs[S.RUNNING_P2P] += [S.STOP, S.RUNNING]
    if pre:
        arcs[S.RUNNING] += [S.PRE_COPY]
        arcs[S.PRE_COPY] += [S.RUNNING, S.PRE_COPY_P2P if p2p else S.STOP_COPY]
        if p2p:
            arcs[S.RUNNING_P2P] += [S.PRE_COPY_P2P]
            arcs[S.PRE_COPY_P2P] += [S.PRE_COPY, S.RUNNING_P2P, S.STOP_COPY]
    return arcs


def mig_path(cur: MigState, new: MigState, flags: int) -> list[MigState]:
    """The arcs from ``cur`` to ``new`` (excluding ``cur``): the shortest path whose
    interior avoids the saving states; ``EINVAL`` when there is none (``ERROR`` as a target,
    an unsupported state, ``STOP_COPY -> PRE_COPY``)."""
    arcs = _arcs(flags)
    supported = {s for s, out in arcs.items() if out} | {MigState.RUNNING}
    if new == MigState.ERROR or new not in supported or cur == MigState.ERROR:
        raise fail(errno.EINVAL, f"migration state {cur.name} -> {new.name}: not a valid transition")
    if cur == MigState.STOP_COPY and new in (MigState.PRE_COPY, MigState.PRE_COPY_P2P):
        raise fail(errno.EINVAL, f"migration state {cur.name} -> {new.name}: not allowed")
    if cur == new:
        return []
    prev: dict[MigState, MigState] = {cur: cur}
    queue: deque[MigState] = deque([cur])
    while queue:
        s = queue.popleft()
        for t in arcs[s]:
            if t in prev:
                continue
            prev[t] = s
            if t == new:
                path: list[MigState] = [t]
                while prev[path[-1]] != cur:
                    path.append(prev[path[-1]])
                return path[::-1]
            if t not in _SAVING and t != MigState.RESUMING:
                queue.append(t)
    raise fail(errno.EINVAL, f"migration state {cur.name} -> {new.name}: not a valid transition")


class MigrationFsm:
    """The device's migration state; :meth:`set` walks the arcs calling ``on_arc(old, new)``.

    A failing arc leaves the state at the last one reached (``ERROR`` if the callback says
    so by raising with ``errno.EIO``), and the error goes back to the client.
    """

    def __init__(self, flags: int, on_arc: Callable[[MigState, MigState], None]) -> None:
        self.flags = flags
        self.state = MigState.RUNNING
        self._on_arc = on_arc

    def set(self, new: int) -> None:
        try:
            target = MigState(new)
        except ValueError:
            raise fail(errno.EINVAL, f"migration state {new} does not exist") from None
        for step in mig_path(self.state, target, self.flags):
            old = self.state
            try:
                self._on_arc(old, step)
            except DmaError as e:
                if e.errno == errno.EIO:
                    self.state = MigState.ERROR
                raise
            self.state = step

    def reset(self) -> None:
        self.state = MigState.RUNNING


# -- DMA, the device's view -----------------------------------------------------------------


class DmaPort:
    """Device-side DMA: ``rw(iova, buf, write)`` as :meth:`dmarw.Container.dma_rw`.

    The server's port reaches fd-backed mappings directly (dirty-tracked by the container)
    and the rest with DMA_READ/DMA_WRITE messages; ``messages=True`` forces messages.  This
    base class is the port of a device with no client: every access is ``ENODEV``.
    """

    def rw(self, iova: int, buf: bytes | bytearray | memoryview, write: bool, *, messages: bool = False) -> None:
        raise fail(errno.ENODEV, f"dma {rng(iova, memoryview(buf).nbytes)}: no client is connected")

    def read(self, iova: int, n: int, *, messages: bool = False) -> bytes:
        buf = bytearray(n)
        self.rw(iova, buf, False, messages=messages)
        return bytes(buf)

    def write(self, iova: int, data: bytes | bytearray | memoryview, *, messages: bool = False) -> None:
        self.rw(iova, data, True, messages=messages)

    def mappings(self) -> list[tuple[int, int, int, bool]]:
        """(iova, size, flags, has_fd) of the client's DMA regions, in the order mapped."""
        return []


# -- the device -----------------------------------------------------------------------------


class Device:
    """A PCI device model served over vfio-user.  Subclass it, or build one and add regions.

    ``regions`` maps index → :class:`Region` (0-5 BARs, 6 ROM, 7 config space is built
    from ``config``, 8 VGA, more are device-specific).  ``irqs`` holds the counts per
    index.  ``migration_flags`` (``MIGRATION_STOP_COPY`` at least, to migrate) enables the
    migration feature; the model then implements :meth:`migration_arc`,
    :meth:`migration_read` and :meth:`migration_write`.

    Hooks, all optional: :meth:`reset`, :meth:`connected`, :meth:`disconnected`,
    :meth:`deadline` / :meth:`tick` (a timer the serve loop honours).
    """

    migration_flags = 0

    def __init__(self, config: PciConfig, *, irqs: dict[int, int] | None = None, num_regions: int = PCI_NUM_REGIONS) -> None:
        self.config = config
        self.regions: dict[int, Region] = {}
        self.num_regions = num_regions
        self.irqs = Irqs(irqs or {})
        if self.irqs.counts[INTX] and not config.data[0x3D]:
            config.data[0x3D] = 1  # INTA#
        self.dma: DmaPort = DmaPort()
        self.migration = MigrationFsm(self.migration_flags, self.migration_arc)
        self.config_region = Region(PCI_CONFIG_SIZE, read=config.read, write=config.write, name="config")

    def add_region(self, index: int, region: Region, *, bar_flags: int = 0) -> Region:
        """Install ``region`` at ``index``; a BAR (0-5) or ROM (6) is sized in config space."""
        if not 0 <= index < self.num_regions or index == CONFIG_REGION:
            raise fail(errno.EINVAL, f"region index {index} is not free (0..{self.num_regions - 1}, not {CONFIG_REGION})")
        region.name = region.name or (f"BAR{index}" if index <= 5 else f"region{index}")
        self.regions[index] = region
        if BAR0 <= index <= 5:
            self.config.bars[index] = (region.size, bar_flags)
            struct.pack_into("<I", self.config.data, 0x10 + 4 * index, bar_flags)
        elif index == ROM_REGION:
            self.config.rom_size = region.size
        return region

    def region(self, index: int) -> Region | None:
        if index == CONFIG_REGION:
            return self.config_region
        return self.regions.get(index)

    # -- hooks ------------------------------------------------------------------------------
    def reset(self) -> None:
        """DEVICE_RESET: put the model back to its power-on state (default: nothing)."""

    def connected(self) -> None:
        """A client has negotiated; ``self.dma`` is its port."""

    def disconnected(self) -> None:
        """The client is gone (its mappings and eventfds are already dropped)."""

    def deadline(self) -> float | None:
        """``time.monotonic()`` value at which :meth:`tick` wants to run, or None."""
        return None

    def tick(self) -> None:
        """Called by the serve loop once :meth:`deadline` has passed."""

    # -- migration hooks --------------------------------------------------------------------
    def migration_arc(self, old: MigState, new: MigState) -> None:
        """One arc of the state machine (``old -> new``); raise DmaError to refuse it."""

    def migration_read(self, size: int) -> bytes:
        """Up to ``size`` bytes of migration data in a saving state (``b""``: no more)."""
        raise fail(errno.EINVAL, "the device has no migration data")

    def migration_write(self, data: bytes) -> None:
        """Migration data received in RESUMING."""
        raise fail(errno.EINVAL, "the device takes no migration data")

    def close(self) -> None:
        self.irqs.close()
        for r in self.regions.values():
            r.close()


def now() -> float:
    return time.monotonic()


__all__ = [
    "MIGRATION_PRE_COPY",
    "MIGRATION_STOP_COPY",
    "Device",
    "DmaPort",
    "Irqs",
    "MigrationFsm",
    "PciConfig",
    "Region",
    "mig_path",
]
