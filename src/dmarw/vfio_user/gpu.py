"""The GPU-like device (:class:`dmarw.devices.gpu.GpuDevice`) as a vfio-user device.

BAR0 is the device's 4 KiB register window, reached with REGION_READ/REGION_WRITE (32-bit
registers; narrower reads return the addressed bytes, narrower writes are ignored, as the
device's MMIO transport does).  The engine runs inline: a doorbell (RING_TAIL) store runs
the ring in the REGION_WRITE that carries it, its DMA going through the session's port
(the client's fd mappings through the container, dirty-logged; or DMA messages).  A WAIT
store never holds the serve loop: inline, the ring has already run when it arrives.

Migration (STOP_COPY): an arc into STOP pauses the engine, into RUNNING resumes it; the
STOP_COPY data is :meth:`GpuDevice.save`'s bytes, restored when RESUMING ends (``EINVAL``
for bad data, the device then unchanged).  Guest memory the engine wrote is the client's
to move, from the DMA logging report.
"""

from __future__ import annotations

import errno
import struct

from ..devices.gpu import CTRL_RESET, MMIO_SIZE, REG_CTRL, REG_WAIT, GpuDevice
from ..errors import fail
from .device import MIGRATION_STOP_COPY, Device, PciConfig, Region
from .protocol import BAR0, INTX, MigState

VENDOR, DEVICE = 0x4744, 0x5550  # "DG" "PU": a lab device, no real vendor's ID
CLASS_DISPLAY_OTHER = 0x038000


class GpuVfioDevice(Device):
    migration_flags = MIGRATION_STOP_COPY

    def __init__(self) -> None:
        super().__init__(PciConfig(VENDOR, DEVICE, VENDOR, DEVICE, class_code=CLASS_DISPLAY_OTHER), irqs={INTX: 1})
        self.gpu = GpuDevice(lambda addr, buf, write: self.dma.rw(addr, buf, write))
        self.add_region(BAR0, Region(MMIO_SIZE, read=self._read, write=self._write, name="gpu-mmio"))
        self._out = bytearray()  # STOP_COPY data left to read
        self._in = bytearray()  # RESUMING data received

    def _read(self, offset: int, count: int) -> bytes:
        out = bytearray()
        for reg in range(offset & ~3, offset + count, 4):
            out += struct.pack("<I", self.gpu.reg_read(reg))
        skip = offset & 3
        return bytes(out[skip : skip + count])

    def _write(self, offset: int, data: bytes) -> None:
        if offset & 3 or len(data) % 4:
            return  # 32-bit registers: other stores are ignored
        for k in range(0, len(data), 4):
            reg = offset + k
            (value,) = struct.unpack_from("<I", data, k)
            if reg == REG_WAIT:
                continue
            self.gpu.reg_write(reg, value)

    def reset(self) -> None:
        self.gpu.reg_write(REG_CTRL, CTRL_RESET)

    # -- migration ----------------------------------------------------------------------------
    def migration_arc(self, old: MigState, new: MigState) -> None:
        if new == MigState.STOP:
            if old == MigState.RESUMING:
                self.gpu.restore(bytes(self._in))  # EINVAL on bad data, nothing changed
                self._in.clear()
            self.gpu.pause()
        elif new == MigState.RUNNING:
            self.gpu.resume()
        elif new == MigState.STOP_COPY:
            self._out = bytearray(self.gpu.save())
        elif new == MigState.RESUMING:
            self._in.clear()

    def migration_read(self, size: int) -> bytes:
        data = bytes(self._out[:size])
        del self._out[:size]
        return data

    def migration_write(self, data: bytes) -> None:
        if len(self._in) + len(data) > 4096:
            raise fail(errno.EINVAL, f"gpu migration data: {len(self._in) + len(data)} bytes is more than a saved state")
        self._in += data
