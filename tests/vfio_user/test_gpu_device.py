"""``dmarw serve --device gpu``'s device: the GPU-like engine behind vfio-user regions."""

from __future__ import annotations

import struct

from fake_client import FakeClient, Harness, dirty_report, dma_map, memfd

from dmarw.devices import gpu as g
from dmarw.vfio_user import protocol as p
from dmarw.vfio_user.gpu import DEVICE, VENDOR, GpuVfioDevice

RING, HWSP, DATA = 0x10000, 0x11000, 0x12000


def _reg(c: FakeClient, reg: int, value: int) -> None:
    c.region_write(p.BAR0, reg, struct.pack("<I", value))


def _get(c: FakeClient, reg: int) -> int:
    return int(struct.unpack("<I", c.region_read(p.BAR0, reg, 4))[0])


def _program(c: FakeClient, mem: bytearray | memoryview, cmds: list[tuple[int, int, int, int, int]]) -> None:
    for i, (op, size, addr, seqno, kind) in enumerate(cmds):
        mem[i * 32 : (i + 1) * 32] = g.CMD.pack(op, size, addr, seqno, kind, 0)
    _reg(c, g.REG_RING_BASE_LO, RING)
    _reg(c, g.REG_RING_BASE_HI, 0)
    _reg(c, g.REG_RING_SIZE, 16)
    _reg(c, g.REG_HWSP_LO, HWSP)
    _reg(c, g.REG_CTRL, g.CTRL_ENABLE)
    _reg(c, g.REG_RING_TAIL, len(cmds))  # the doorbell: the ring runs in this write


def test_gpu_over_vfio_user() -> None:
    dev = GpuVfioDevice()
    h = Harness(dev, io_timeout=2.0)
    c = h.connect()
    c.negotiate()
    cfg = c.region_read(p.CONFIG_REGION, 0, 4)
    assert struct.unpack("<HH", cfg) == (VENDOR, DEVICE)
    info = c.ok(p.RegionInfo(p.BAR0))
    assert isinstance(info, p.RegionInfo) and info.size == g.MMIO_SIZE  # a power of two
    assert _get(c, g.REG_ID) == g.DEVICE_ID
    assert c.region_read(p.BAR0, 1, 2) == struct.pack("<I", g.DEVICE_ID)[1:3]
    fd, m = memfd(0x4000)
    dma_map(c, RING, 0x4000, fd)
    m[0x2000:0x2100] = bytes(range(256))
    c.ok(p.feature_logging(True, 4096))
    _program(c, memoryview(m), [
        (g.OP_READ, 256, DATA, 0, 0),
        (g.OP_WRITE, 64, DATA + 0x1000, 0, 1),
        (g.OP_FENCE, 4, HWSP, 7, 4),
    ])
    assert _get(c, g.REG_FENCE) == 7 and _get(c, g.REG_RING_HEAD) == 3
    assert _get(c, g.REG_STATUS) & g.STATUS_ERROR == 0
    assert struct.unpack_from("<I", m, 0x1000)[0] == 7  # the fence landed in guest memory
    assert m[0x3000:0x3040] != bytes(64)  # the write command
    assert dirty_report(c, RING, 0x4000) == [1, 3]  # HWSP and the written page, nothing read
    _reg(c, g.REG_WAIT, 99)  # never holds the serve loop
    # migrate: STOP_COPY data is the saved registers, restored on a second server
    c.ok(p.feature_mig_state(p.MigState.STOP_COPY))
    data = b""
    while True:
        r = c.ok(p.MigDataRead(512, argsz=8 + 512))
        assert isinstance(r, p.MigData)
        data += r.data
        if r.size < 512:
            break
    assert data == dev.gpu.save()
    dst_dev = GpuVfioDevice()
    dst = Harness(dst_dev, io_timeout=2.0)
    c2 = dst.connect()
    c2.negotiate()
    c2.ok(p.feature_mig_state(p.MigState.RESUMING))
    c2.ok(p.MigDataWrite(len(data), data, argsz=8 + len(data)))
    c2.ok(p.feature_mig_state(p.MigState.RUNNING))
    assert _get(c2, g.REG_FENCE) == 7 and dst_dev.gpu.state == dev.gpu.state
    c2.ok(p.feature_mig_state(p.MigState.STOP))
    c2.ok(p.feature_mig_state(p.MigState.RESUMING))
    c2.ok(p.MigDataWrite(4, b"junk", argsz=12))
    assert c2.err(p.feature_mig_state(p.MigState.STOP)) == 22  # bad state data refused
    assert dst.finish(c2)
    assert h.finish(c)
    m.close()
    dev.close()
    dst_dev.close()
