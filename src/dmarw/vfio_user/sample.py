"""The sample device: what libvfio-user's ``samples/client`` expects of a server.

PCI IDs 0xdead:0xbeef, subsystem 0xcafe:0xbabe; nine regions, of which BAR0 (8 bytes, a
time register, messages only) and BAR1 (12 KiB of memory, its first and last pages
mmap-able); one INTx; migration with PRE_COPY.

BAR0: a write of a ``time_t`` (only offset 0, 8 bytes) while RUNNING arms a timer for that
wall-clock second; a read returns the seconds since the stored value.  When the timer
fires (it waits while the device is not RUNNING) the device raises INTx and does its DMA:
through its mapping, 4 KiB written to the client's second DMA region in 1 KiB pieces and
read back in 2 KiB pieces; then the same on the first region with DMA_WRITE/DMA_READ
messages (4 of each at the client's 1 KiB ``max_data_xfer_size``).  Both must read back
what was written.

Migration data: in PRE_COPY the BAR1 contents; in STOP_COPY BAR1 then BAR0's value; the
destination (RESUMING) takes the same 12 KiB + 8 bytes and, on RUNNING, re-arms the timer
for the stored time, as the source would have fired it.
"""

from __future__ import annotations

import errno
import struct
import time

from ..errors import fail
from .device import (
    MIGRATION_PRE_COPY,
    MIGRATION_STOP_COPY,
    Device,
    PciConfig,
    Region,
)
from .protocol import BAR0, BAR1, INTX, MigState

BAR1_SIZE = 0x3000
TIME = struct.Struct("<q")


class SampleDevice(Device):
    migration_flags = MIGRATION_STOP_COPY | MIGRATION_PRE_COPY

    def __init__(self) -> None:
        super().__init__(PciConfig(0xDEAD, 0xBEEF, 0xCAFE, 0xBABE), irqs={INTX: 1})
        self.bar0 = 0  # the time_t last written
        self.add_region(BAR0, Region(TIME.size, read=self._bar0_read, write=self._bar0_write))
        self.bar1 = self.add_region(BAR1, Region(BAR1_SIZE, mmap_areas=[(0, 0x1000), (0x2000, 0x1000)]))
        self.timer: float | None = None  # monotonic deadline
        self.moved = 0  # migration bytes read or written since the saving/resuming state began
        self.dma_rounds = 0  # completed timer DMA rounds (tests look)
        self.resets = 0

    # -- BAR0 -------------------------------------------------------------------------------
    def _bar0_write(self, offset: int, data: bytes) -> None:
        if offset != 0 or len(data) != TIME.size:
            raise fail(errno.EINVAL, f"BAR0 access {offset:#x}+{len(data):#x}: only 8 bytes at 0")
        (t,) = TIME.unpack(data)
        if self.migration.state == MigState.RUNNING:
            self._arm(t)
        self.bar0 = t

    def _bar0_read(self, offset: int, count: int) -> bytes:
        if offset != 0 or count != TIME.size:
            raise fail(errno.EINVAL, f"BAR0 access {offset:#x}+{count:#x}: only 8 bytes at 0")
        return TIME.pack(int(time.time()) - self.bar0)

    def _arm(self, t: int) -> None:
        self.timer = time.monotonic() + max(0.0, t - time.time())

    # -- the timer: INTx, then DMA ------------------------------------------------------------
    def deadline(self) -> float | None:
        # only while RUNNING: in PRE_COPY the client is busy reading migration data and a
        # DMA message then would interleave with its replies (STOP_COPY drops the timer,
        # the destination re-arms it)
        return self.timer if self.migration.state == MigState.RUNNING else None

    def tick(self) -> None:
        self.timer = None
        self.irqs.trigger(INTX)
        regions = [(iova, size) for iova, size, _flags, _fd in self.dma.mappings()]
        if len(regions) < 2:
            raise fail(errno.EINVAL, f"sample DMA needs two DMA regions, the client mapped {len(regions)}")
        self._dma_round(regions[1][0], messages=False)
        self._dma_round(regions[0][0], messages=True)
        self.dma_rounds += 1

    def _dma_round(self, iova: int, *, messages: bool) -> None:
        size, count = 1024, 4
        written = b"".join(bytes([0x41 + i]) * size for i in range(count))
        for i in range(count):
            self.dma.write(iova + i * size, written[i * size : (i + 1) * size], messages=messages)
        back = b"".join(self.dma.read(iova + i * size, 2 * size, messages=messages) for i in range(0, count, 2))
        if back != written:
            raise fail(errno.EIO, f"sample DMA at {iova:#x}: read back differs from what was written")

    def reset(self) -> None:
        self.resets += 1

    # -- migration ----------------------------------------------------------------------------
    def migration_arc(self, old: MigState, new: MigState) -> None:
        if new in (MigState.PRE_COPY, MigState.RESUMING):
            self.moved = 0
        elif new == MigState.STOP_COPY:
            self.timer = None
            self.moved = 0
        elif new == MigState.STOP and old in (MigState.STOP_COPY, MigState.RESUMING):
            want = BAR1_SIZE + TIME.size
            if self.moved != want:
                raise fail(errno.EINVAL, f"migration: {self.moved} bytes moved in {old.name}, expected {want}")
        elif new == MigState.RUNNING and old == MigState.STOP:
            self._arm(self.bar0)

    def _stream(self) -> bytes:
        mem = self.bar1.mem
        assert mem is not None
        data = mem[:BAR1_SIZE]
        if self.migration.state == MigState.STOP_COPY:
            data += TIME.pack(self.bar0)
        return data

    def migration_read(self, size: int) -> bytes:
        data = self._stream()[self.moved : self.moved + size]
        self.moved += len(data)
        return data

    def migration_write(self, data: bytes) -> None:
        total = BAR1_SIZE + TIME.size
        if self.moved + len(data) > total:
            raise fail(errno.EINVAL, f"migration: {self.moved + len(data)} bytes exceed the {total}-byte state")
        mem = self.bar1.mem
        assert mem is not None
        for k, b in enumerate(data):  # small: 12 KiB + 8 in 1 KiB pieces
            pos = self.moved + k
            if pos < BAR1_SIZE:
                mem[pos] = b
        tail = self.moved + len(data) - BAR1_SIZE
        if tail > 0:
            t = bytearray(TIME.pack(self.bar0))
            start = max(0, self.moved - BAR1_SIZE)
            t[start:tail] = data[len(data) - (tail - start) :]
            (self.bar0,) = TIME.unpack(bytes(t))
        self.moved += len(data)
