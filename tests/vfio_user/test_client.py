"""``dmarw.vfio_user.Client`` against servers that misbehave, and its own input checks.

A scripted server (a thread on a socketpair-like UNIX socket) plays each case: no reply,
a disconnect mid-request, a broken frame, a reply for another command, the server's DMA
requests to unmapped, read-only or oversized ranges.  Every wait is bounded: the client
raises ETIMEDOUT / ECONNRESET / EPROTO, never hangs, and answers the server's bad DMA with
the errno QEMU's client uses.
"""

from __future__ import annotations

import errno
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from dmarw import AddressSpace, DmaError
from dmarw.vfio_user import Client
from dmarw.vfio_user import protocol as P

pytestmark = pytest.mark.timeout(30)

HDR = struct.Struct("<HHIII")
Script = Callable[["Peer"], None]


class Peer:
    """The server side of one connection, for a script to drive."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.framer = P.Connection()

    def recv(self) -> P.Message | None:
        while (m := self.framer.next_message()) is None:
            data, anc, _f, _a = self.conn.recvmsg(1 << 16, socket.CMSG_SPACE(4 * 8))
            fds = []
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds += list(struct.unpack(f"{len(cdata) // 4}i", cdata[: len(cdata) // 4 * 4]))
            if not data:
                return None
            self.framer.receive_data(data, fds)
        return m

    def reply(self, m: P.Message, body: bytes = b"", *, cmd: int | None = None, err: int = 0) -> None:
        flags = P.F_TYPE_REPLY | (P.F_ERROR if err else 0)
        h = m.header
        self.conn.sendall(HDR.pack(h.msg_id, h.cmd if cmd is None else cmd, HDR.size + len(body), flags, err) + body)

    def request(self, mid: int, cmd: int, body: bytes, flags: int = 0) -> None:
        self.conn.sendall(HDR.pack(mid, cmd, HDR.size + len(body), flags, 0) + body)

    def negotiate(self) -> None:
        m = self.recv()
        assert m is not None and m.header.cmd == P.Command.VERSION
        self.reply(m, P.Version(0, 2, {"max_msg_fds": 8, "max_data_xfer_size": 4096}).encode()[0])


def serve(tmp_path: Path, script: Script) -> tuple[Path, threading.Thread, list[BaseException]]:
    path = tmp_path / "fake.sock"
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(str(path))
    lsock.listen(1)
    lsock.settimeout(10)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            conn, _ = lsock.accept()
            conn.settimeout(10)
            with conn:
                script(Peer(conn))
        except BaseException as e:  # surfaced by the test
            errors.append(e)
        finally:
            lsock.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return path, t, errors


def test_negotiates_the_lower_limits(tmp_path: Path) -> None:
    def script(p: Peer) -> None:
        m = p.recv()
        assert m is not None
        v = P.Version.decode(m.body)
        assert v.capabilities["max_msg_fds"] == 16 and v.capabilities["migration"]["pgsize"] == 4096
        p.reply(m, P.Version(0, 1, {"max_msg_fds": 4, "max_data_xfer_size": 2048}).encode()[0])
        assert p.recv() is None

    path, t, errors = serve(tmp_path, script)
    with Client(path, timeout=5) as c:
        assert c.server_version == (0, 1)
        assert (c.max_msg_fds, c.max_data_xfer_size) == (4, 2048)
        with pytest.raises(DmaError) as e:  # over the negotiated limit: refused before sending
            c.region_read(0, 0, 4096)
        assert e.value.errno == errno.E2BIG
    t.join(5)
    assert not errors


@pytest.mark.parametrize("major, minor", [(1, 0), (0, 3)])
def test_refuses_an_incompatible_version(tmp_path: Path, major: int, minor: int) -> None:
    def script(p: Peer) -> None:
        m = p.recv()
        assert m is not None
        p.reply(m, P.Version(major, minor, {}).encode()[0])
        p.recv()

    path, t, _ = serve(tmp_path, script)
    with pytest.raises(DmaError) as e:
        Client(path, timeout=5)
    assert e.value.errno == errno.EPROTO and f"{major}.{minor}" in str(e.value)
    t.join(5)


def test_no_reply_times_out(tmp_path: Path) -> None:
    done = threading.Event()

    def script(p: Peer) -> None:
        p.negotiate()
        assert p.recv() is not None  # DEVICE_GET_INFO, never answered
        done.wait(10)

    path, t, _ = serve(tmp_path, script)
    with Client(path, timeout=0.3) as c:
        with pytest.raises(DmaError) as e:
            c.device_info()
        assert e.value.errno == errno.ETIMEDOUT and "DEVICE_GET_INFO" in str(e.value)
    done.set()
    t.join(5)


def test_disconnect_mid_request_fails_the_waiter(tmp_path: Path) -> None:
    def script(p: Peer) -> None:
        p.negotiate()
        assert p.recv() is not None  # and hang up without answering

    path, t, _ = serve(tmp_path, script)
    with Client(path, timeout=5) as c:
        with pytest.raises(DmaError) as e:
            c.region_info(1)
        assert e.value.errno == errno.ECONNRESET
        assert not c.connected
        with pytest.raises(DmaError) as e2:  # and every later call, at once
            c.device_info()
        assert e2.value.errno == errno.ECONNRESET
    t.join(5)


@pytest.mark.parametrize("frame", [
    HDR.pack(0, 4, 8, 1, 0),  # size below the header
    HDR.pack(0, 4, 1 << 30, 1, 0),  # size beyond any message
    HDR.pack(0, 4, 16, 0x7, 0),  # unknown type bits
])
def test_broken_framing_drops_the_connection(tmp_path: Path, frame: bytes) -> None:
    def script(p: Peer) -> None:
        p.negotiate()
        m = p.recv()
        assert m is not None
        p.conn.sendall(frame)
        p.recv()

    path, t, _ = serve(tmp_path, script)
    with Client(path, timeout=5) as c:
        with pytest.raises(DmaError) as e:
            c.device_info()
        assert e.value.errno == errno.ECONNRESET and "framing" in str(e.value)
    t.join(5)


def test_reply_for_another_command_or_malformed_is_eproto(tmp_path: Path) -> None:
    def script(p: Peer) -> None:
        p.negotiate()
        m = p.recv()
        assert m is not None
        p.reply(m, b"\0" * 16, cmd=P.Command.DEVICE_GET_IRQ_INFO)
        m = p.recv()
        assert m is not None
        p.reply(m, b"\0" * 5)  # DEVICE_GET_INFO reply of 5 bytes
        m = p.recv()
        assert m is not None
        p.reply(m, err=errno.ENODEV)
        p.recv()

    path, t, errors = serve(tmp_path, script)
    with Client(path, timeout=5) as c:
        for want in (errno.EPROTO, errno.EPROTO, errno.ENODEV):
            with pytest.raises(DmaError) as e:
                c.device_info()
            assert e.value.errno == want
    t.join(5)
    assert not errors


def test_serves_the_servers_dma_and_refuses_bad_ranges(tmp_path: Path) -> None:
    got: dict[str, P.Message] = {}
    dma_done = threading.Event()

    def script(p: Peer) -> None:
        p.negotiate()
        for _ in range(2):  # the two DMA_MAPs
            m = p.recv()
            assert m is not None and m.header.cmd == P.Command.DMA_MAP
            assert len(m.fds) == 0
            p.reply(m)
        cases = [
            ("write", P.Command.DMA_WRITE, struct.pack("<QQ", 0x1010, 4) + b"abcd"),
            ("read", P.Command.DMA_READ, struct.pack("<QQ", 0x1010, 4)),
            ("unmapped", P.Command.DMA_READ, struct.pack("<QQ", 0x9000, 4)),
            ("straddle", P.Command.DMA_READ, struct.pack("<QQ", 0x1FFE, 4)),
            ("readonly", P.Command.DMA_WRITE, struct.pack("<QQ", 0x3000, 1) + b"x"),
            ("big", P.Command.DMA_READ, struct.pack("<QQ", 0x1000, 1 << 20)),
            ("short", P.Command.DMA_WRITE, struct.pack("<QQ", 0x1000, 8) + b"abc"),
            ("unknown", P.Command.DEVICE_RESET, b""),
        ]
        for i, (name, cmd, body) in enumerate(cases):
            p.request(0x100 + i, cmd, body)
            m = p.recv()
            assert m is not None and m.header.is_reply and m.header.msg_id == 0x100 + i
            got[name] = m
        p.request(0x200, P.Command.DMA_WRITE, struct.pack("<QQ", 0x1020, 2) + b"zz", P.F_NO_REPLY)
        dma_done.set()
        m = p.recv()  # the client's next request, no reply in between
        assert m is not None and m.header.cmd == P.Command.DEVICE_GET_INFO
        p.reply(m, P.DeviceInfo(16, 3, 9, 5).encode()[0])
        p.recv()

    path, t, errors = serve(tmp_path, script)
    space = AddressSpace()
    rw = space.mmap(0x1000, backing="anon")
    ro = space.mmap(0x1000, backing="anon")
    try:
        with Client(path, timeout=5) as c:
            c.dma_map(0x1000, 0x1000, space, rw, with_fd=False)
            c.dma_map(0x3000, 0x1000, space, ro, with_fd=False, prot=P.DMA_READ_FLAG)
            assert dma_done.wait(10), errors
            info = c.device_info()
            assert info is not None and info.num_regions == 9
            assert space.read(rw + 0x10, 4) == b"abcd" and space.read(rw + 0x20, 2) == b"zz"
            assert c.take_message_dirty() == {1}
            assert c.requests_refused == 6
    finally:
        space.close()
    t.join(5)
    assert not errors
    assert not got["write"].header.is_error
    assert got["read"].body[16:] == b"abcd"
    want = {"unmapped": errno.EFAULT, "straddle": errno.EFAULT, "readonly": errno.EPERM,
            "big": errno.E2BIG, "short": errno.EINVAL, "unknown": errno.ENOSYS}
    assert {k: got[k].header.error for k in want} == want


def test_dma_map_checks_before_sending(tmp_path: Path) -> None:
    seen: list[int] = []

    def script(p: Peer) -> None:
        p.negotiate()
        while (m := p.recv()) is not None:
            seen.append(m.header.cmd)
            p.reply(m)

    path, t, _ = serve(tmp_path, script)
    space = AddressSpace()
    anon = space.mmap(0x2000, backing="anon")
    try:
        with Client(path, timeout=5) as c:
            with pytest.raises(DmaError) as e:  # anonymous memory has no fd to send
                c.dma_map(0, 0x1000, space, anon, with_fd=True)
            assert e.value.errno == errno.EINVAL
            with pytest.raises(DmaError):  # outside the address space
                c.dma_map(0, 0x1000, space, anon + 0x10000, with_fd=False)
            with pytest.raises(DmaError):
                c.dma_map(0, 0, space, anon, with_fd=False)
            c.dma_map(0, 0x2000, space, anon, with_fd=False)
            with pytest.raises(DmaError) as e:
                c.dma_map(0x1000, 0x1000, space, anon, with_fd=False)
            assert e.value.errno == errno.EEXIST
    finally:
        space.close()
    t.join(5)
    assert seen == [P.Command.DMA_MAP]


def test_connect_to_nothing_is_one_error(tmp_path: Path) -> None:
    with pytest.raises(DmaError) as e:
        Client(tmp_path / "none.sock", timeout=0.2)
    assert e.value.errno == errno.ENOENT and "none.sock" in str(e.value)
