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


def test_a_server_that_stops_reading_cannot_block_a_send(tmp_path: Path) -> None:
    done = threading.Event()

    def script(p: Peer) -> None:
        m = p.recv()
        assert m is not None
        p.reply(m, P.Version(0, 2, {"max_msg_fds": 8, "max_data_xfer_size": 1 << 20}).encode()[0])
        done.wait(10)  # and never read again

    path, t, _ = serve(tmp_path, script)
    with Client(path, timeout=0.5) as c:
        with pytest.raises(DmaError) as e:
            for _ in range(64):  # until the socket buffers are full
                c.region_write(0, 0, bytes(1 << 20), post=True)
        assert e.value.errno == errno.ETIMEDOUT and "read nothing" in str(e.value)
        assert not c.connected
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


# -- the client's DMA serving against a model ---------------------------------------------
MAPS = [  # iova, size, prot, with_fd
    (0x1000, 0x2000, P.DMA_READ_FLAG | P.DMA_WRITE_FLAG, False),
    (0x8000, 0x1000, P.DMA_READ_FLAG, False),
    (0x10000, 0x1000, P.DMA_READ_FLAG | P.DMA_WRITE_FLAG, True),
]
XFER = 4096


def _expect(iova: int, count: int, write: bool) -> int:
    """The errno the client must answer with (0: served), by the rules it follows."""
    if count > XFER:
        return errno.E2BIG
    m = next((m for m in MAPS if m[0] <= iova and iova + count <= m[0] + m[1]), None)
    if m is None:
        return errno.EFAULT
    if write and not m[2] & P.DMA_WRITE_FLAG:
        return errno.EPERM
    return 0


def test_dma_serving_matches_a_model(tmp_path: Path) -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    path = tmp_path / "model.sock"
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(str(path))
    lsock.listen(1)
    lsock.settimeout(10)
    holder: list[Peer] = []

    def setup() -> None:  # negotiation and the DMA_MAPs; then the test drives this end
        conn, _ = lsock.accept()
        conn.settimeout(10)
        p = Peer(conn)
        m = p.recv()
        assert m is not None
        p.reply(m, P.Version(0, 2, {"max_msg_fds": 8, "max_data_xfer_size": XFER}).encode()[0])
        for _ in MAPS:
            m = p.recv()
            assert m is not None and m.header.cmd == P.Command.DMA_MAP
            m.close_fds()
            p.reply(m)
        holder.append(p)

    t = threading.Thread(target=setup, daemon=True)
    t.start()
    space = AddressSpace()
    model = {iova: bytearray(size) for iova, size, _p, _f in MAPS}
    hvas = {}
    written: set[int] = set()
    try:
        with Client(path, timeout=5) as c:
            for iova, size, prot, with_fd in MAPS:
                hvas[iova] = space.mmap(size, backing="memfd" if with_fd else "anon")
                c.dma_map(iova, size, space, hvas[iova], with_fd=with_fd, prot=prot)
            t.join(10)
            p = holder[0]
            edges = sorted({x for iova, size, _p, _f in MAPS for x in (iova, iova + size)})
            addr = st.one_of(st.integers(0, 0x12000), st.sampled_from(edges).flatmap(
                lambda e: st.integers(max(0, e - 8), e + 8)))
            op = st.tuples(st.booleans(), addr, st.one_of(st.integers(1, 64), st.integers(1, XFER + 64)))
            mid = [0x300]

            @settings(max_examples=60, deadline=None)
            @given(st.lists(op, min_size=1, max_size=8), st.randoms(use_true_random=False))
            def run(ops: list[tuple[bool, int, int]], rnd: object) -> None:
                for write, iova, count in ops:
                    data = bytes(rnd.getrandbits(8) for _ in range(count)) if write else b""  # type: ignore[attr-defined]
                    cmd = P.Command.DMA_WRITE if write else P.Command.DMA_READ
                    mid[0] = (mid[0] + 1) & 0xFFFF
                    p.request(mid[0], cmd, struct.pack("<QQ", iova, count) + data)
                    r = p.recv()
                    assert r is not None and r.header.msg_id == mid[0] and r.header.is_reply
                    want = _expect(iova, count, write)
                    assert r.header.error == want, (write, hex(iova), count)
                    if want:
                        assert r.header.is_error and r.body == b""
                        continue
                    base = next(m[0] for m in MAPS if m[0] <= iova < m[0] + m[1])
                    lo = iova - base
                    if write:
                        model[base][lo : lo + count] = data
                        written.update(range(iova // 4096, (iova + count - 1) // 4096 + 1))
                        assert r.body == struct.pack("<QQ", iova, count)
                    else:
                        assert r.body == struct.pack("<QQ", iova, count) + bytes(model[base][lo : lo + count])

            run()
            for iova, size, _p, _f in MAPS:
                assert space.read(hvas[iova], size) == bytes(model[iova])
            assert c.take_message_dirty() == written
    finally:
        space.close()
        lsock.close()
