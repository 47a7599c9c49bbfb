"""Bad peers: malformed, oversized, truncated and unknown messages, wrong fd counts, a
client that goes mid-DMA, never reads or never answers, a device model that raises; each
ends in the right errno or a clean hang-up, and the server serves the next client."""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator

import pytest
from fake_client import (
    DOORBELL,
    OP_MSG_READ,
    OP_MSG_WRITE,
    FakeClient,
    Harness,
    TestDevice,
    dma_map,
    maps_of,
    memfd,
    open_fds,
)

from dmarw.vfio_user import Region
from dmarw.vfio_user import protocol as p


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness(TestDevice(), io_timeout=2.0)
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


def test_unknown_command_and_bad_body_keep_the_session(client: FakeClient) -> None:
    assert client.err(p.frame(1, 99, b"abc")) == errno.ENOSYS
    assert client.err(p.frame(2, p.Command.DMA_READ, bytes(16))) == errno.EINVAL  # wrong direction
    assert client.err(p.frame(3, p.Command.DEVICE_GET_INFO, b"\0")) == errno.EINVAL
    assert client.err(p.frame(4, p.Command.REGION_WRITE, struct.pack("<QII", 0, 2, 8) + b"1234")) == errno.EINVAL
    client.region_write(2, 0, b"alive")


@pytest.mark.parametrize(
    "raw, err",
    [
        (struct.pack("<HHIII", 7, p.Command.DEVICE_GET_INFO, p.MAX_MSG_SIZE + 1, 0, 0), errno.E2BIG),
        (struct.pack("<HHIII", 7, p.Command.DEVICE_GET_INFO, 4, 0, 0), errno.EINVAL),
        (struct.pack("<HHIII", 7, p.Command.DEVICE_GET_INFO, 16, 0x80, 0), errno.EINVAL),
    ],
)
def test_malformed_header_disconnects_cleanly(harness: Harness, raw: bytes, err: int) -> None:
    c = harness.connect()
    c.negotiate()
    c.send_raw(raw)
    got = b""
    while chunk := c.sock.recv(64):  # an error reply, then the hang-up (no resync possible)
        got += chunk
    assert got == p.error_reply(7, p.Command.DEVICE_GET_INFO, err)
    assert harness.result() is False
    c2 = harness.connect()  # the next client is served
    c2.negotiate()
    c2.region_write(2, 0, b"next")
    assert harness.finish(c2)


def test_truncated_message_then_next_client(harness: Harness) -> None:
    c = harness.connect()
    c.negotiate()
    data, _ = p.encode_request(1, p.RegionWrite(2, 0, 64, bytes(64)))
    c.send_raw(data[:40])
    assert harness.finish(c) is False
    c2 = harness.connect()
    c2.negotiate()
    assert harness.finish(c2)


def test_client_disconnects_mid_dma(harness: Harness) -> None:
    fd, m = memfd(0x1000, "vfu-middma")
    c = harness.connect()
    c.negotiate()
    dma_map(c, 0x10000, 0x1000, fd)
    dma_map(c, 0x20000, 0x1000, None)
    os.close(fd)
    c.answer_dma = False
    data, _ = p.encode_request(77, p.RegionWrite(0, 0, 16, DOORBELL.pack(0x20000, 64, OP_MSG_WRITE)))
    c.send_raw(data)
    msg = c.recv()
    assert msg.header.cmd == p.Command.DMA_WRITE and not msg.header.is_reply
    assert harness.finish(c) is False  # gone without answering: the session ends
    assert isinstance(harness.device, TestDevice)
    assert harness.device.dma_error is not None and harness.device.dma_error.errno == errno.ENOTCONN
    assert maps_of("vfu-middma") == 1  # its fd mapping went with it
    assert harness.device.dma.mappings() == []
    c2 = harness.connect()
    c2.negotiate()
    c2.region_write(2, 0, b"alive")
    assert harness.finish(c2)
    m.close()


def test_client_that_never_reads(harness: Harness) -> None:
    harness.server.io_timeout = 0.3
    c = harness.connect()
    c.negotiate()
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    req, _ = p.encode_request(1, p.RegionRead(2, 0, 0x2000))
    for _ in range(400):  # 3.2 MiB of replies nobody reads
        try:
            c.sock.send(req, socket.MSG_DONTWAIT)
        except BlockingIOError:
            break
    assert harness.result() is False
    c.sock.close()
    c2 = harness.connect()
    c2.negotiate()
    assert harness.finish(c2)


def test_client_that_never_answers_dma(harness: Harness) -> None:
    harness.server.io_timeout = 0.3
    c = harness.connect()
    c.negotiate()
    dma_map(c, 0x20000, 0x1000, None)
    c.answer_dma = False
    data, _ = p.encode_request(5, p.RegionWrite(0, 0, 16, DOORBELL.pack(0x20000, 8, OP_MSG_READ)))
    c.send_raw(data)
    assert c.recv().header.cmd == p.Command.DMA_READ
    assert harness.result() is False
    c.sock.close()


def test_fds_with_the_wrong_command_are_closed(client: FakeClient) -> None:
    efd = os.eventfd(0)
    before = open_fds()
    try:
        assert client.err(p.DeviceInfo(), [efd]) == errno.EINVAL
        assert client.err(p.RegionRead(2, 0, 4), [efd, efd]) == errno.EINVAL
        assert open_fds() == before
    finally:
        os.close(efd)


def test_a_model_bug_is_eio_not_a_crash(harness: Harness) -> None:
    dev = harness.device

    def boom(offset: int, count: int) -> bytes:
        raise ZeroDivisionError("model bug")

    def boom_write(offset: int, data: bytes) -> None:
        raise TypeError("model bug")

    dev.regions[4] = Region(8, read=boom, write=boom_write)
    c = harness.connect()
    c.negotiate()
    assert c.err(p.RegionRead(4, 0, 4)) == errno.EIO
    assert c.err(p.RegionWrite(4, 0, 4, b"abcd")) == errno.EIO  # the hot path too
    c.region_write(2, 0, b"ok")
    assert harness.finish(c)


def test_a_timer_bug_does_not_stop_the_server() -> None:
    import time

    class Buggy(TestDevice):
        fired = 0

        def deadline(self) -> float | None:
            return time.monotonic() if not self.fired else None

        def tick(self) -> None:
            self.fired += 1
            raise KeyError("model bug in a timer")

    h = Harness(Buggy(), io_timeout=2.0)
    c = h.connect()
    c.negotiate()
    c.region_write(2, 0, b"still")  # served after the timer raised
    assert c.region_read(2, 0, 5) == b"still"
    assert isinstance(h.device, Buggy) and h.device.fired == 1
    assert h.finish(c) is False  # the session reports the model's error
    h.device.close()
