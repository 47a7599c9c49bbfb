"""A pure-Python fake vfio-user client and a test device, for driving the server in tests.

The server runs in a thread of the test process (``Server.serve_connection`` on one end of
a socketpair); :class:`FakeClient` speaks the wire format with
:mod:`dmarw.vfio_user.protocol` and answers the server's DMA_READ/DMA_WRITE from its own
memory.  :class:`TestDevice` has a doorbell that makes the device DMA on demand.
"""

from __future__ import annotations

import itertools
import mmap
import os
import select
import socket
import struct
import threading
from typing import Any

from dmarw import DmaError
from dmarw.vfio_user import Device, PciConfig, Region, Server
from dmarw.vfio_user import protocol as p

RECV = 1 << 21


class FakeClient:
    """The VMM side, minimal: frames, sends, answers DMA messages from ``memory``."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.conn = p.Connection(max_msg_size=p.MAX_MSG_SIZE + 64)
        self.ids = itertools.count(0x100)
        self.memory: dict[int, bytearray] = {}  # iova -> bytes, the fd-less regions
        self.dma_seen: list[tuple[int, int, int]] = []  # (cmd, addr, count)
        self.answer_dma = True

    def send_raw(self, data: bytes, fds: list[int] | None = None) -> None:
        if fds:
            self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))])
        else:
            self.sock.sendall(data)

    def recv(self, timeout: float = 10.0) -> p.Message:
        while True:
            m = self.conn.next_message()
            if m is not None:
                return m
            r, _, _ = select.select([self.sock], [], [], timeout)
            assert r, "the server did not answer"
            data, anc, _flags, _ = self.sock.recvmsg(RECV, socket.CMSG_SPACE(64 * 4))
            fds: list[int] = []
            for level, kind, raw in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.extend(struct.unpack(f"{len(raw) // 4}i", raw[: len(raw) - len(raw) % 4]))
            self.conn.receive_data(data, fds)

    def _serve_dma(self, m: p.Message) -> None:
        req = p.DmaAccess.decode(m.body)
        self.dma_seen.append((m.header.cmd, req.addr, req.count))
        if not self.answer_dma:
            return
        base = max(a for a in self.memory if a <= req.addr)
        mem, off = self.memory[base], req.addr - base
        if m.header.cmd == p.Command.DMA_WRITE:
            mem[off : off + req.count] = req.data
            body = struct.pack("<QQ", req.addr, req.count)
        else:
            body = struct.pack("<QQ", req.addr, req.count) + bytes(mem[off : off + req.count])
        self.send_raw(p.frame(m.header.msg_id, m.header.cmd, body, flags=p.F_TYPE_REPLY))

    def call_raw(self, data: bytes, fds: list[int] | None = None) -> p.Message:
        msg_id = struct.unpack_from("<H", data)[0]
        self.send_raw(data, fds)
        while True:
            m = self.recv()
            if not m.header.is_reply:
                self._serve_dma(m)
                continue
            assert m.header.msg_id == msg_id
            return m

    def call(self, payload: p.Payload, fds: list[int] | None = None) -> p.Message:
        data, pfds = p.encode_request(next(self.ids), payload)
        return self.call_raw(data, fds if fds is not None else pfds)

    def ok(self, payload: p.Payload, fds: list[int] | None = None) -> p.Payload:
        return p.decode_reply(self.call(payload, fds))

    def err(self, payload: p.Payload | bytes, fds: list[int] | None = None) -> int:
        m = self.call_raw(payload, fds) if isinstance(payload, bytes) else self.call(payload, fds)
        assert m.header.is_error, f"expected an error reply, got {m.body!r}"
        assert m.header.size == 16
        return m.header.error

    def negotiate(self, **caps: Any) -> p.Version:
        v = self.ok(p.Version(0, 2, caps or {"max_msg_fds": 8, "max_data_xfer_size": 1024}))
        assert isinstance(v, p.Version)
        return v

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        r = self.ok(p.RegionRead(index, offset, count))
        assert isinstance(r, p.RegionAccess) and r.count == count
        return r.data

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        r = self.ok(p.RegionWrite(index, offset, len(data), data))
        assert isinstance(r, p.RegionAccess) and (r.region, r.offset, r.count) == (index, offset, len(data))


DOORBELL = struct.Struct("<QII")  # iova, length, op
OP_WRITE, OP_READ, OP_MSG_WRITE, OP_MSG_READ = 1, 2, 3, 4


class TestDevice(Device):
    """BAR0: a 16-byte doorbell (DMA on write); BAR2: 8 KiB of memory, the second page
    mmap-able; INTx, 4 MSI, 8 MSI-X; migration of BAR2's memory."""

    migration_flags = p.MIGRATION_STOP_COPY | p.MIGRATION_PRE_COPY

    __test__ = False

    def __init__(self) -> None:
        super().__init__(PciConfig(0x1AF4, 0x10F0, 0x1AF4, 0x1100, class_code=0x058000),
                         irqs={p.INTX: 1, p.MSI: 4, p.MSIX: 8})
        self.add_region(p.BAR0, Region(16, write=self.doorbell, read=lambda o, n: bytes(n)))
        self.bar2 = self.add_region(p.BAR2, Region(0x2000, mmap_areas=[(0x1000, 0x1000)]), bar_flags=0x8)
        self.read_back = b""
        self.dma_error: DmaError | None = None
        self.arcs: list[tuple[p.MigState, p.MigState]] = []
        self.pos = 0
        self.resets = 0

    def doorbell(self, offset: int, data: bytes) -> None:
        iova, length, op = DOORBELL.unpack(data)
        pattern = bytes((iova + i) & 0xFF for i in range(length))
        try:
            if op in (OP_WRITE, OP_MSG_WRITE):
                self.dma.write(iova, pattern, messages=op == OP_MSG_WRITE)
            else:
                self.read_back = self.dma.read(iova, length, messages=op == OP_MSG_READ)
        except DmaError as e:
            self.dma_error = e
            raise

    def reset(self) -> None:
        self.resets += 1

    def migration_arc(self, old: p.MigState, new: p.MigState) -> None:
        self.arcs.append((old, new))
        self.pos = 0

    def migration_read(self, size: int) -> bytes:
        assert self.bar2.mem is not None
        out = self.bar2.mem[self.pos : min(self.pos + size, 0x2000)]
        self.pos += len(out)
        return out

    def migration_write(self, data: bytes) -> None:
        assert self.bar2.mem is not None
        self.bar2.mem[self.pos : self.pos + len(data)] = data
        self.pos += len(data)


class Harness:
    def __init__(self, device: Device, **kw: Any) -> None:
        self.device = device
        self.server = Server("/nonexistent/unused.sock", device, **kw)
        self._results: dict[int, bool] = {}
        self.threads: list[threading.Thread] = []

    def connect(self) -> FakeClient:
        for t in self.threads:  # one client at a time, as the server serves them
            t.join(10)
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        k = len(self.threads)

        def serve() -> None:
            self._results[k] = self.server.serve_connection(b)

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        self.threads.append(t)
        return FakeClient(a)

    def result(self) -> bool:
        """The last session's outcome, once it has ended."""
        self.threads[-1].join(20)
        assert not self.threads[-1].is_alive(), "the session did not end"
        return self._results[len(self.threads) - 1]

    def finish(self, client: FakeClient) -> bool:
        client.sock.close()
        return self.result()


def memfd(size: int, name: str = "vfu-test-guest") -> tuple[int, mmap.mmap]:
    fd = os.memfd_create(name)
    os.ftruncate(fd, size)
    return fd, mmap.mmap(fd, size)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def dma_map(client: FakeClient, iova: int, size: int, fd: int | None, offset: int = 0, flags: int = 3) -> None:
    assert client.ok(p.DmaMap(flags, offset, iova, size, fd)) == p.Empty(p.Command.DMA_MAP)


def doorbell(client: FakeClient, iova: int, length: int, op: int) -> p.Message:
    return client.call(p.RegionWrite(0, 0, 16, DOORBELL.pack(iova, length, op)))


def maps_of(name: str) -> int:
    with open("/proc/self/maps") as f:
        return sum(name in line for line in f)


def dirty_report(client: FakeClient, iova: int, length: int, page_size: int = 4096) -> list[int]:
    f = p.feature_report(iova, length, page_size)
    r = client.ok(f)
    assert isinstance(r, p.Feature) and r.data[:24] == f.data
    bm = r.data[24:]
    assert len(bm) == f.argsz - 32
    return [k for k in range(len(bm) * 8) if bm[k >> 3] >> (k & 7) & 1]
