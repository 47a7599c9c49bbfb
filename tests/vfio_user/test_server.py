"""The server driven by a fake client over a socketpair (``fake_client.py``): negotiation,
regions and config space, interrupts, DMA through fds and messages, logging, migration;
every reply checked."""

from __future__ import annotations

import errno
import mmap
import os
import struct
from collections.abc import Iterator

import pytest
from fake_client import (
    OP_MSG_WRITE,
    OP_READ,
    OP_WRITE,
    FakeClient,
    Harness,
    TestDevice,
    dirty_report,
    dma_map,
    doorbell,
    maps_of,
    memfd,
    open_fds,
)

from dmarw.errors import fail
from dmarw.vfio_user import protocol as p
from dmarw.vfio_user.sample import SampleDevice


@pytest.fixture(params=["native", "python"])
def harness(request: pytest.FixtureRequest) -> Iterator[Harness]:
    """A server on each core: the client's fd mappings live in that core's container."""
    h = Harness(TestDevice(), io_timeout=2.0, core=request.param)
    yield h
    for t in h.threads:
        t.join(10)
    h.device.close()


@pytest.fixture
def client(harness: Harness) -> Iterator[FakeClient]:
    c = harness.connect()
    c.negotiate()
    yield c
    c.sock.close()


# -- negotiation ----------------------------------------------------------------------------


def test_version_negotiation(harness: Harness) -> None:
    c = harness.connect()
    v = c.negotiate(max_msg_fds=4, max_data_xfer_size=4096, twin_socket={"supported": True})
    assert (v.major, v.minor) == (0, 2)
    caps = v.capabilities
    assert caps["max_msg_fds"] == 8 and caps["max_data_xfer_size"] == 1 << 20 and caps["pgsizes"] == 4096
    assert caps["write_multiple"] is True and "twin_socket" not in caps
    assert c.err(p.Version(0, 2, {})) == errno.EINVAL  # only once
    assert harness.finish(c)


def test_minor_is_the_lower(harness: Harness) -> None:
    c = harness.connect()
    v = c.ok(p.Version(0, 1, {}))
    assert isinstance(v, p.Version) and v.minor == 1
    assert harness.finish(c)


def test_wrong_major_and_command_before_version(harness: Harness) -> None:
    c = harness.connect()
    assert c.err(p.Version(1, 0, {})) == errno.ENOTSUP
    c.sock.close()
    c = harness.connect()
    assert c.err(p.DeviceInfo()) == errno.EINVAL
    assert c.sock.recv(16) == b""  # and the server hung up
    assert harness.result() is False
    c = harness.connect()  # alive for the next client
    c.negotiate()
    assert harness.finish(c)


# -- device info, regions, config space -------------------------------------------------------


def test_device_and_region_info(client: FakeClient) -> None:
    info = client.ok(p.DeviceInfo())
    assert info == p.DeviceInfo(16, p.DEVICE_FLAGS_PCI | p.DEVICE_FLAGS_RESET, 9, 5)
    r0 = client.ok(p.RegionInfo(0))
    assert isinstance(r0, p.RegionInfo) and r0.size == 16 and r0.flags == 3 and r0.fd is None
    cfg = client.ok(p.RegionInfo(p.CONFIG_REGION))
    assert isinstance(cfg, p.RegionInfo) and cfg.size == 256
    absent = client.ok(p.RegionInfo(5))
    assert isinstance(absent, p.RegionInfo) and absent.size == 0 and absent.flags == 0
    assert client.err(p.RegionInfo(9)) == errno.EINVAL
    short = client.call(p.RegionInfo(2, 32))
    assert short.fds == [] and len(short.body) == 32
    full = struct.unpack_from("<I", short.body)[0]
    r2 = client.ok(p.RegionInfo(2, full))
    assert isinstance(r2, p.RegionInfo) and r2.flags & p.REGION_FLAG_MMAP and r2.flags & p.REGION_FLAG_CAPS
    assert r2.sparse == [p.SparseArea(0x1000, 0x1000)] and r2.fd is not None
    with mmap.mmap(r2.fd, 0x1000, offset=0x1000) as m:  # the client maps the area...
        m[:5] = b"hello"
        assert client.region_read(2, 0x1000, 5) == b"hello"  # ...and the device sees it
        client.region_write(2, 0x1004, b"!")
        assert m[:5] == b"hell!"
    os.close(r2.fd)


def test_config_space_ids_and_bar_sizing(client: FakeClient) -> None:
    cfg = client.region_read(p.CONFIG_REGION, 0, 64)
    assert struct.unpack_from("<HH", cfg, 0) == (0x1AF4, 0x10F0)
    assert struct.unpack_from("<HH", cfg, 0x2C) == (0x1AF4, 0x1100)
    assert cfg[0x0E] == 0 and cfg[0x3D] == 1  # header type 0, INTA#
    client.region_write(p.CONFIG_REGION, 0, b"\xff\xff\xff\xff")  # IDs are read-only
    assert client.region_read(p.CONFIG_REGION, 0, 4) == cfg[:4]
    for bar, size, bits in ((0, 16, 0), (2, 0x2000, 0x8), (1, 0, 0)):
        client.region_write(p.CONFIG_REGION, 0x10 + 4 * bar, b"\xff\xff\xff\xff")
        (v,) = struct.unpack("<I", client.region_read(p.CONFIG_REGION, 0x10 + 4 * bar, 4))
        assert v == ((~(size - 1) & 0xFFFFFFFF) | bits if size else 0), (bar, hex(v))
    client.region_write(p.CONFIG_REGION, 0x18, struct.pack("<I", 0xFEB00000))
    assert struct.unpack("<I", client.region_read(p.CONFIG_REGION, 0x18, 4))[0] == 0xFEB00008
    client.region_write(p.CONFIG_REGION, 4, b"\x06\x00")  # memory + bus master
    assert client.region_read(p.CONFIG_REGION, 4, 2) == b"\x06\x00"


def test_region_access_errors(client: FakeClient) -> None:
    assert client.err(p.RegionRead(0xDEADBEEF, 0, 4)) == errno.EINVAL
    assert client.err(p.RegionRead(2, 0x1FFF, 2)) == errno.EINVAL  # past the end
    assert client.err(p.RegionRead(p.CONFIG_REGION, 0xFF, 2)) == errno.EINVAL
    assert client.err(p.RegionWrite(2, 0x2000, 1, b"x")) == errno.EINVAL
    assert client.err(p.RegionRead(3, 0, 4)) == errno.EINVAL  # no BAR3
    client.region_write(2, 0, b"ok")  # the session goes on


def test_write_multi(client: FakeClient, harness: Harness) -> None:
    r = client.ok(p.WriteMulti([(2, 0, b"abcd"), (2, 8, b"12345678")]))
    assert r == p.WriteMultiDone(2)
    assert client.region_read(2, 0, 16) == b"abcd\0\0\0\x0012345678"


def test_reset(client: FakeClient, harness: Harness) -> None:
    assert client.ok(p.Reset()) == p.Empty(p.Command.DEVICE_RESET)
    assert isinstance(harness.device, TestDevice) and harness.device.resets == 1


def test_no_reply_flag(client: FakeClient) -> None:
    data, _ = p.encode_request(5, p.RegionWrite(2, 0, 2, b"nr"), no_reply=True)
    client.send_raw(data)
    assert client.region_read(2, 0, 2) == b"nr"  # the next reply is the read's


# -- interrupts -------------------------------------------------------------------------------


def test_irq_info_and_eventfd_trigger(client: FakeClient, harness: Harness) -> None:
    counts = {}
    for i in range(5):
        info = client.ok(p.IrqInfo(i))
        assert isinstance(info, p.IrqInfo) and info.flags & p.IRQ_INFO_EVENTFD
        counts[i] = info.count
    assert counts == {0: 1, 1: 4, 2: 8, 3: 0, 4: 0}
    assert client.err(p.IrqInfo(5)) == errno.EINVAL
    efds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(3)]
    try:
        flags = p.IRQ_SET_DATA_EVENTFD | p.IRQ_SET_ACTION_TRIGGER
        client.ok(p.SetIrqs(flags, p.MSIX, 2, 3, fds=efds))
        irqs = harness.device.irqs
        assert irqs.trigger(p.MSIX, 3)
        assert os.eventfd_read(efds[1]) == 1
        # the client triggers it itself: DATA_BOOL picks sub-index 4 only
        client.ok(p.SetIrqs(p.IRQ_SET_DATA_BOOL | p.IRQ_SET_ACTION_TRIGGER, p.MSIX, 2, 3, b"\0\0\1"))
        assert os.eventfd_read(efds[2]) == 1
        with pytest.raises(BlockingIOError):
            os.eventfd_read(efds[0])
        # disable the index: the server drops its copies
        client.ok(p.SetIrqs(p.IRQ_SET_DATA_NONE | p.IRQ_SET_ACTION_TRIGGER, p.MSIX, 0, 0))
        assert not irqs.trigger(p.MSIX, 3)
    finally:
        for fd in efds:
            os.close(fd)


def test_intx_mask_defers(client: FakeClient, harness: Harness) -> None:
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        client.ok(p.SetIrqs(p.IRQ_SET_DATA_EVENTFD | p.IRQ_SET_ACTION_TRIGGER, p.INTX, 0, 1, fds=[efd]))
        client.ok(p.SetIrqs(p.IRQ_SET_DATA_NONE | p.IRQ_SET_ACTION_MASK, p.INTX, 0, 1))
        assert not harness.device.irqs.trigger(p.INTX)
        with pytest.raises(BlockingIOError):
            os.eventfd_read(efd)
        client.ok(p.SetIrqs(p.IRQ_SET_DATA_NONE | p.IRQ_SET_ACTION_UNMASK, p.INTX, 0, 1))
        assert os.eventfd_read(efd) == 1  # delivered on unmask
    finally:
        os.close(efd)


def test_set_irqs_bad(client: FakeClient) -> None:
    efd = os.eventfd(0)
    before = open_fds()
    try:
        flags = p.IRQ_SET_DATA_EVENTFD | p.IRQ_SET_ACTION_TRIGGER
        assert client.err(p.SetIrqs(flags, p.INTX, 0, 2, fds=[efd, efd])) == errno.EINVAL  # 1 INTx
        assert client.err(p.SetIrqs(flags, p.ERR_IRQ, 0, 1, fds=[efd])) == errno.EINVAL  # count 0
        assert client.err(p.SetIrqs(flags, 7, 0, 1, fds=[efd])) == errno.EINVAL
        assert client.err(p.SetIrqs(p.IRQ_SET_DATA_NONE | p.IRQ_SET_ACTION_MASK, p.MSI, 0, 1)) == errno.EINVAL
        raw = struct.pack("<IIIII", 20, flags, p.MSI, 0, 2)  # 2 sub-indexes, 1 fd
        assert client.err(p.frame(9, p.Command.DEVICE_SET_IRQS, raw), [efd]) == errno.EINVAL
        assert open_fds() == before  # every fd the server received was closed
    finally:
        os.close(efd)


# -- DMA ----------------------------------------------------------------------------------



def test_dma_through_the_fd_mapping(client: FakeClient, harness: Harness) -> None:
    fd, m = memfd(0x10000)
    dma_map(client, 0x100000, 0x4000, fd, offset=0x2000)
    os.close(fd)
    assert not doorbell(client, 0x101000, 0x1800, OP_WRITE).header.is_error
    assert m[0x3000:0x3000 + 0x1800] == bytes((0x101000 + i) & 0xFF for i in range(0x1800))
    m[0x2000:0x2004] = b"gpa!"
    assert not doorbell(client, 0x100000, 4, OP_READ).header.is_error
    assert isinstance(harness.device, TestDevice) and harness.device.read_back == b"gpa!"
    assert client.dma_seen == []  # no message was needed
    m.close()


def test_dma_messages_split_at_the_client_max(harness: Harness) -> None:
    c = harness.connect()
    c.negotiate(max_data_xfer_size=1024)
    dma_map(c, 0x40000, 0x2000, None)
    c.memory[0x40000] = bytearray(0x2000)
    assert not doorbell(c, 0x40100, 3000, OP_WRITE).header.is_error
    assert [x[2] for x in c.dma_seen] == [1024, 1024, 952]
    assert all(x[0] == p.Command.DMA_WRITE for x in c.dma_seen)
    assert c.memory[0x40000][0x100:0x100 + 3000] == bytes((0x40100 + i) & 0xFF for i in range(3000))
    c.dma_seen.clear()
    assert not doorbell(c, 0x40100, 3000, OP_READ).header.is_error
    assert [x[:2] for x in c.dma_seen] == [(p.Command.DMA_READ, 0x40100), (p.Command.DMA_READ, 0x40500), (p.Command.DMA_READ, 0x40900)]
    assert isinstance(harness.device, TestDevice)
    assert harness.device.read_back == bytes((0x40100 + i) & 0xFF for i in range(3000))
    assert harness.finish(c)


def test_dma_spanning_an_fd_region_and_a_message_region(client: FakeClient) -> None:
    fd, m = memfd(0x1000)
    dma_map(client, 0x10000, 0x1000, fd)
    os.close(fd)
    dma_map(client, 0x11000, 0x1000, None)
    client.memory[0x11000] = bytearray(0x1000)
    assert not doorbell(client, 0x10F00, 0x200, OP_WRITE).header.is_error
    want = bytes((0x10F00 + i) & 0xFF for i in range(0x200))
    assert m[0xF00:] + client.memory[0x11000][:0x100] == want
    assert client.dma_seen == [(p.Command.DMA_WRITE, 0x11000, 0x100)]
    m.close()


def test_dma_map_errors(client: FakeClient) -> None:
    fd, m = memfd(0x4000)
    before = open_fds()
    try:
        dma_map(client, 0x10000, 0x2000, fd)
        assert client.err(p.DmaMap(3, 0, 0x11000, 0x1000, fd)) == errno.EEXIST
        assert client.err(p.DmaMap(3, 0, 0x20800, 0x1000, fd)) == errno.EINVAL  # unaligned
        assert client.err(p.DmaMap(3, 0x3000, 0x30000, 0x2000, fd)) == errno.EINVAL  # past the file
        raw = struct.pack("<IIQQQ", 32, 3, 0, 0x40000, 0x1000)
        assert client.err(p.frame(3, p.Command.DMA_MAP, raw), [fd, fd]) == errno.EINVAL  # 2 fds
        assert open_fds() == before + 1  # the one mapping (Python's mmap keeps a dup); refused fds closed
    finally:
        os.close(fd)
        m.close()


def test_unmap_unknown_and_dma_to_unmapped_iova(client: FakeClient, harness: Harness) -> None:
    assert client.err(p.DmaUnmap(0, 0x90000, 0x1000)) == errno.ENOENT
    fd, m = memfd(0x2000)
    dma_map(client, 0x10000, 0x2000, fd)
    os.close(fd)
    assert client.err(p.DmaUnmap(0, 0x10000, 0x1000)) == errno.ENOENT  # not the whole region
    assert doorbell(client, 0x50000, 16, OP_WRITE).header.error == errno.EINVAL
    assert isinstance(harness.device, TestDevice) and harness.device.dma_error is not None
    assert "0x50000" in str(harness.device.dma_error)
    m.close()



def test_no_memory_touched_after_unmap(client: FakeClient, harness: Harness) -> None:
    fd, m = memfd(0x2000, "vfu-unmap-probe")
    dma_map(client, 0x10000, 0x2000, fd)
    os.close(fd)
    assert maps_of("vfu-unmap-probe") == 2  # ours and the server's
    r = client.ok(p.DmaUnmap(0, 0x10000, 0x2000))
    assert r == p.DmaUnmap(0, 0x10000, 0x2000)
    assert maps_of("vfu-unmap-probe") == 1  # the server's mapping is gone
    assert doorbell(client, 0x10000, 16, OP_WRITE).header.error == errno.EINVAL
    assert m[:] == bytes(0x2000)
    m.close()


def test_unmap_all(client: FakeClient, harness: Harness) -> None:
    fd, m = memfd(0x3000, "vfu-unmap-all")
    for i in range(3):
        dma_map(client, 0x10000 * (i + 1), 0x1000, fd, offset=0x1000 * i)
    os.close(fd)
    assert client.ok(p.DmaUnmap(p.UNMAP_ALL, 0, 0)) == p.DmaUnmap(p.UNMAP_ALL, 0, 0)
    assert harness.device.dma.mappings() == []
    assert maps_of("vfu-unmap-all") == 1
    m.close()


def test_read_only_dma_region(client: FakeClient) -> None:
    fd, m = memfd(0x1000)
    dma_map(client, 0x10000, 0x1000, fd, flags=p.DMA_READ_FLAG)
    os.close(fd)
    assert doorbell(client, 0x10000, 8, OP_WRITE).header.error == errno.EPERM
    assert not doorbell(client, 0x10000, 8, OP_READ).header.is_error
    assert m[:8] == bytes(8)
    m.close()


# -- dirty logging -----------------------------------------------------------------------------



def test_dma_logging(client: FakeClient) -> None:
    fd, m = memfd(0x8000)
    dma_map(client, 0x100000, 0x8000, fd)
    os.close(fd)
    dma_map(client, 0x200000, 0x2000, None)
    client.memory[0x200000] = bytearray(0x2000)
    assert client.err(p.feature_report(0x100000, 0x8000, 4096)) == errno.EINVAL  # not started
    start = p.feature_logging(True, 4096)
    assert client.ok(start) == start
    assert client.err(start) == errno.EBUSY
    doorbell(client, 0x101ff0, 0x20, OP_WRITE)  # pages 1 and 2
    doorbell(client, 0x106000, 4, OP_WRITE)  # page 6
    doorbell(client, 0x201000, 4, OP_MSG_WRITE)  # a message write, logged too
    doorbell(client, 0x104000, 4, OP_READ)  # reads are not logged
    assert dirty_report(client, 0x100000, 0x4000) == [1, 2]  # cuts the mapping: page 6 kept
    assert dirty_report(client, 0x100000, 0x8000) == [6]
    assert dirty_report(client, 0x100000, 0x8000) == []  # reported pages are cleared
    assert dirty_report(client, 0x200000, 0x2000) == [1]
    doorbell(client, 0x107000, 4, OP_WRITE)
    doorbell(client, 0x100000, 4, OP_WRITE)
    assert dirty_report(client, 0x100000, 0x8000, 0x2000) == [0, 3]  # 8 KiB bits: pages 0 and 7
    doorbell(client, 0x101000, 4, OP_WRITE)
    assert dirty_report(client, 0x100000, 0x2000, 0x800) == [2, 3]  # 2 KiB bits: page 1 -> bits 2, 3
    assert client.err(p.feature_report(0x100000, 0x8000, 3000)) == errno.EINVAL
    stop = p.feature_logging(False, 4096)
    assert client.ok(stop) == stop
    assert client.err(stop) == errno.EINVAL
    m.close()


def test_unmap_with_dirty_bitmap(client: FakeClient) -> None:
    fd, m = memfd(0x4000)
    dma_map(client, 0x10000, 0x4000, fd)
    os.close(fd)
    req = p.DmaUnmap(p.UNMAP_GET_DIRTY_BITMAP, 0x10000, 0x4000, 48, 4096, 8)
    assert client.err(req) == errno.EINVAL  # logging is off
    client.ok(p.feature_logging(True, 4096))
    doorbell(client, 0x12000, 8, OP_WRITE)
    r = client.ok(req)
    assert isinstance(r, p.DmaUnmap) and r.bitmap == b"\x04" + bytes(7)
    m.close()


def test_feature_probe_and_unknown(client: FakeClient) -> None:
    probe = p.Feature(p.FEATURE_DMA_LOGGING_START | p.FEATURE_PROBE | p.FEATURE_SET, b"", 8)
    assert client.ok(probe) == probe
    bad = p.Feature(p.FEATURE_DMA_LOGGING_START | p.FEATURE_PROBE | p.FEATURE_GET, b"", 8)
    assert client.err(bad) == errno.EINVAL
    assert client.err(p.Feature(3 | p.FEATURE_GET, b"", 8)) == errno.ENOTTY
    mig = client.ok(p.Feature(p.FEATURE_MIGRATION | p.FEATURE_GET, b"", 16))
    assert isinstance(mig, p.Feature)
    assert struct.unpack("<Q", mig.data)[0] == p.MIGRATION_STOP_COPY | p.MIGRATION_PRE_COPY


# -- migration ---------------------------------------------------------------------------------


def _mig_state(client: FakeClient) -> int:
    r = client.ok(p.feature_mig_state(0, get=True))
    assert isinstance(r, p.Feature)
    return r.mig_state()[0]


def test_migration_state_machine_over_the_wire(client: FakeClient, harness: Harness) -> None:
    dev = harness.device
    assert isinstance(dev, TestDevice)
    S = p.MigState
    assert _mig_state(client) == S.RUNNING
    req = p.feature_mig_state(S.STOP_COPY)
    m = client.call(req)
    assert not m.header.is_error and m.body == req.encode()[0]  # echoed byte for byte
    assert dev.arcs == [(S.RUNNING, S.STOP), (S.STOP, S.STOP_COPY)]
    assert client.err(p.feature_mig_state(S.PRE_COPY)) == errno.EINVAL
    assert client.err(p.feature_mig_state(S.ERROR)) == errno.EINVAL
    assert client.err(p.feature_mig_state(9)) == errno.EINVAL
    assert client.err(p.MigDataWrite(1, b"x", argsz=9)) == errno.EINVAL  # not RESUMING
    client.ok(p.feature_mig_state(S.RUNNING))
    assert _mig_state(client) == S.RUNNING
    assert client.err(p.MigDataRead(16, argsz=24)) == errno.EINVAL  # not saving


def test_migration_data_between_two_servers(client: FakeClient, harness: Harness) -> None:
    S = p.MigState
    client.region_write(2, 0, b"state" * 100)
    client.ok(p.feature_mig_state(S.PRE_COPY))
    chunks = []
    while True:
        r = client.ok(p.MigDataRead(3000, argsz=8 + 3000))
        assert isinstance(r, p.MigData)
        chunks.append(r.data)
        if r.size < 3000:
            break
    assert b"".join(chunks) == harness.device.bar2.mem[:0x2000]  # type: ignore[attr-defined]
    dst = Harness(TestDevice(), io_timeout=2.0)
    c2 = dst.connect()
    c2.negotiate()
    c2.ok(p.feature_mig_state(S.RESUMING))
    for ch in chunks:
        assert c2.ok(p.MigDataWrite(len(ch), ch, argsz=8 + len(ch))) == p.Empty(p.Command.MIG_DATA_WRITE)
    c2.ok(p.feature_mig_state(S.RUNNING))
    assert c2.region_read(2, 0, 500) == b"state" * 100
    assert dst.finish(c2)
    dst.device.close()



# -- the sample device, in process --------------------------------------------------------------


def test_sample_device_timer_dma(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sample's flow in miniature: BAR0 arms the timer, INTx fires, DMA both ways."""
    dev = SampleDevice()
    h = Harness(dev, io_timeout=2.0)
    c = h.connect()
    c.negotiate(max_msg_fds=8, max_data_xfer_size=1024)
    fd, m = memfd(0x2000)
    dma_map(c, 0, 0x1000, fd)
    dma_map(c, 0x1000, 0x1000, fd, offset=0x1000)
    os.close(fd)
    efd = os.eventfd(0)
    c.ok(p.SetIrqs(p.IRQ_SET_DATA_EVENTFD | p.IRQ_SET_ACTION_TRIGGER, p.INTX, 0, 1, fds=[efd]))
    c.ok(p.feature_logging(True, 4096))
    import time

    c.region_write(0, 0, struct.pack("<q", int(time.time()) - 5))  # already due
    assert os.eventfd_read(efd) == 1
    c.memory[0] = bytearray(m[:0x1000])  # answer the messages from the same bytes
    for _ in range(8):
        msg = c.recv()
        c._serve_dma(msg)
    assert [x[0] for x in c.dma_seen] == [p.Command.DMA_WRITE] * 4 + [p.Command.DMA_READ] * 4
    assert m[0x1000:0x2000] == b"".join(bytes([0x41 + i]) * 1024 for i in range(4))
    assert dirty_report(c, 0x1000, 0x1000) == [0]  # written through the mapping: the server logs it
    assert dev.dma_rounds == 1
    assert h.finish(c)
    os.close(efd)
    m.close()
    dev.close()


def test_errors_name_the_address() -> None:
    e = fail(errno.EINVAL, "dma 0x50000+0x10: iova 0x50000 is not mapped")
    assert isinstance(e, OSError) and "0x50000" in str(e)


def test_max_dma_maps_is_enforced() -> None:
    h = Harness(TestDevice(), io_timeout=2.0, max_dma_maps=3)
    c = h.connect()
    v = c.negotiate()
    assert v.capabilities["max_dma_maps"] == 3
    for i in range(3):
        dma_map(c, 0x1000 * i, 0x1000, None)
    assert c.err(p.DmaMap(3, 0, 0x10000, 0x1000)) == errno.ENOSPC
    c.ok(p.DmaUnmap(0, 0x1000, 0x1000))
    dma_map(c, 0x10000, 0x1000, None)  # a freed slot is reusable
    assert [m[0] for m in h.device.dma.mappings()] == [0, 0x10000, 0x2000]  # in slot order
    assert h.finish(c)
    h.device.close()


