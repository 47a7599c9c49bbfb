"""dmarw's client drives libvfio-user's ``samples/server`` (a peer nobody here wrote), and
the same script drives ``dmarw serve --device sample`` (the Python device that offers what
that sample does), so the two servers are compared on one client's view.

Negotiation, device/region/IRQ info, config space, region I/O (and BAR1 through the fd the
region info hands over), DMA with and without fds (the server DMAs into the fd mapping
directly and through DMA_READ/DMA_WRITE messages into the other), DMA logging, and the
device's migration to a second sample server, whose BAR1 then matches and which DMAs again.
"""

from __future__ import annotations

import errno
import mmap
import os
import select
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

import peer
import pytest

from dmarw import AddressSpace, DmaError
from dmarw.vfio_user import Client
from dmarw.vfio_user import protocol as P
from dmarw.vfio_user.client import region_flag_names

peer_build = peer.peer_build  # the session fixture (this folder has no conftest)

pytestmark = pytest.mark.timeout(120)

CLI = "import sys; from dmarw.cli import main; sys.exit(main())"
ServerCmd = Callable[[Path], list[str]]


@pytest.fixture(params=[pytest.param("libvfio-user", marks=pytest.mark.peer), "dmarw"])
def server_cmd(request: pytest.FixtureRequest) -> ServerCmd:
    """How to start one sample server on a socket: the peer's, or dmarw's."""
    if request.param == "libvfio-user":
        build: peer.PeerBuild = request.getfixturevalue("peer_build")
        return lambda sock: [str(build.server), "-v", str(sock)]
    return lambda sock: [sys.executable, "-c", CLI, "serve", "--once", "--device", "sample", str(sock)]

BAR1_SIZE = 0x3000
PAGE = 0x1000


def _wait_irq(fd: int, timeout: float = 10.0) -> None:
    r, _, _ = select.select([fd], [], [], timeout)
    assert r, f"no interrupt within {timeout} s"
    os.eventfd_read(fd)


def _wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _pattern() -> bytes:
    return bytes((i * 7 + 3) & 0xFF for i in range(BAR1_SIZE))


def _expected_dma() -> bytes:
    return b"".join(bytes([ord("A") + i]) * 1024 for i in range(4))


def _arm(c: Client, seconds: int) -> None:
    """The sample's BAR0: a write of an absolute time arms its interrupt timer."""
    c.region_write(0, 0, struct.pack("<q", int(time.time()) + seconds))


def _offer_dma(c: Client, space: AddressSpace, base: int) -> tuple[int, int]:
    """Two pages: ``base`` without an fd (messages), ``base + PAGE`` with its memfd."""
    h_msg = space.mmap(PAGE, backing="anon")
    h_fd = space.mmap(PAGE, backing="memfd")
    c.dma_map(base, PAGE, space, h_msg, with_fd=False)
    c.dma_map(base + PAGE, PAGE, space, h_fd, with_fd=True)
    return h_msg, h_fd


def _device_dmas(c: Client, space: AddressSpace, h_msg: int, h_fd: int, irq: int) -> None:
    """Arm the timer, take the interrupt, see the device's DMA in both mappings."""
    before = dict(c.dma_requests)
    _arm(c, 2)  # whole seconds: +1 could land on the server's "now" across a second boundary
    _wait_irq(irq)
    _wait_until(lambda: c.dma_requests[P.Command.DMA_READ] >= before[P.Command.DMA_READ] + 2,
                10, "the device's DMA_READ messages")
    assert c.dma_requests[P.Command.DMA_WRITE] == before[P.Command.DMA_WRITE] + 4
    assert space.read(h_fd, PAGE) == _expected_dma()  # written straight into the memfd
    assert space.read(h_msg, PAGE) == _expected_dma()  # written by DMA_WRITE messages


def test_client_drives_the_sample_server(server_cmd: ServerCmd, tmp_path: Path) -> None:
    src_sock, dst_sock = tmp_path / "src.sock", tmp_path / "dst.sock"
    space = AddressSpace()
    irq = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        with peer.running(server_cmd(src_sock), log=tmp_path / "src.log") as srv:
            peer.wait_for_socket(src_sock, srv, timeout=20)
            c = Client(src_sock, timeout=10)
            assert c.server_version == (0, 2)
            assert c.max_data_xfer_size >= 1024

            info = c.device_info()
            assert (info.num_regions, info.num_irqs) == (9, 5)
            assert info.flags & P.DEVICE_FLAGS_PCI
            cfg = c.config_read(0, 64)
            assert struct.unpack_from("<HH", cfg, 0) == (0xDEAD, 0xBEEF)
            assert struct.unpack_from("<HH", cfg, 0x2C) == (0xCAFE, 0xBABE)
            with pytest.raises(DmaError) as bad:
                c.region_read(0xDEADBEEF, 0, 8)
            assert bad.value.errno == errno.EINVAL

            bar0 = c.region_info(0)
            assert bar0.size == 8 and region_flag_names(bar0.flags) == "RW--"
            bar1 = c.region_info(1, keep_fd=True)
            assert bar1.size == BAR1_SIZE and region_flag_names(bar1.flags) == "RWMC"
            assert [(a.offset, a.size) for a in bar1.sparse or []] == [(0, PAGE), (2 * PAGE, PAGE)]
            assert bar1.fd is not None
            for i in range(P.PCI_NUM_IRQS):
                c.irq_info(i)

            # region I/O, and the same bytes through BAR1's fd
            c.region_write(1, 0, _pattern())
            assert c.region_read(1, 0, BAR1_SIZE) == _pattern()
            with mmap.mmap(bar1.fd, PAGE, offset=bar1.offset) as m:
                assert m[:PAGE] == _pattern()[:PAGE]
            os.close(bar1.fd)

            # DMA both ways, dirty logging of what the device wrote through its mapping
            h_msg, h_fd = _offer_dma(c, space, 0)
            c.set_irq_eventfds(P.INTX, [irq])
            c.dma_logging_start(page_size=PAGE)
            _device_dmas(c, space, h_msg, h_fd, irq)
            assert c.dma_logging_report(PAGE, PAGE, PAGE) == {1}
            assert c.dma_logging_report(PAGE, PAGE, PAGE) == set()  # a report clears
            assert c.take_message_dirty() == {0}  # the message-path page is the client's
            c.dma_logging_stop()
            with pytest.raises(DmaError):  # logging is off: no report
                c.dma_logging_report(PAGE, PAGE, PAGE)
            c.dma_unmap(0, PAGE)
            assert c.mappings() == [(PAGE, PAGE, True)]

            # migrate the device: its state out of this server ...
            assert c.migration_flags() & (P.MIGRATION_STOP_COPY | P.MIGRATION_PRE_COPY) == 5
            _arm(c, 10)  # the timer the device state carries
            pre, stop = c.save_state()
            assert c.mig_state() == P.MigState.STOP
            assert pre == _pattern()
            assert len(stop) == BAR1_SIZE + 8 and stop[:BAR1_SIZE] == _pattern()
            c.close()
            assert srv.wait(timeout=10) == 0

        # ... and into a second one, which then works as the first did
        with peer.running(server_cmd(dst_sock), log=tmp_path / "dst.log") as dst:
            peer.wait_for_socket(dst_sock, dst, timeout=20)
            d = Client(dst_sock, timeout=10)
            assert d.region_read(1, 0, BAR1_SIZE) != _pattern()
            d.load_state(stop)
            assert d.mig_state() == P.MigState.RUNNING
            assert d.region_read(1, 0, BAR1_SIZE) == _pattern()
            h_msg, h_fd = _offer_dma(d, space, 0x10000)
            d.set_irq_eventfds(P.INTX, [irq])
            _device_dmas(d, space, h_msg, h_fd, irq)
            d.dma_unmap_all()
            assert d.mappings() == []
            d.close()
            assert dst.wait(timeout=10) == 0
    finally:
        os.close(irq)
        space.close()
