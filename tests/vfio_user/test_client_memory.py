"""The server's view of client memory (``vfio_user.dma.ClientMemory``) against a model:
random maps (with and without fds), unmaps, device DMA and dirty reports at random page
sizes, on both cores; the messages answered by an in-test "client" (no socket)."""

from __future__ import annotations

import errno
import mmap
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmarw import DmaError
from dmarw.vfio_user import protocol as p
from dmarw.vfio_user.dma import ClientMemory

PAGE = 4096
SLOTS = 8  # iova space: 8 slots of 4 pages


class Model:
    """What the client's memory should hold and which 4 KiB pages should be dirty."""

    def __init__(self) -> None:
        self.fd = os.memfd_create("vfu-model")
        os.ftruncate(self.fd, SLOTS * 4 * PAGE)
        self.file = mmap.mmap(self.fd, SLOTS * 4 * PAGE)
        self.msg_mem = bytearray(SLOTS * 4 * PAGE)  # fd-less regions live here
        self.maps: dict[int, tuple[int, bool, bool]] = {}  # iova -> (size, has_fd, writable)
        self.dirty: set[int] = set()
        self.logging = False
        self.messages = 0

    def send(self, cmd: int, body: bytes) -> bytes:
        """The client side of DMA_READ/DMA_WRITE."""
        self.messages += 1
        addr, count = struct.unpack_from("<QQ", body)
        if cmd == p.Command.DMA_WRITE:
            self.msg_mem[addr : addr + count] = body[16:]
            return body[:16]
        return body[:16] + bytes(self.msg_mem[addr : addr + count])

    def region(self, iova: int) -> tuple[int, int, bool, bool] | None:
        for base, (size, fd, w) in self.maps.items():
            if base <= iova < base + size:
                return base, size, fd, w
        return None

    def covered(self, iova: int, n: int, write: bool) -> int | None:
        """None if the access is legal, else the errno it must fail with."""
        probes = sorted({iova, iova + n - 1, *range((iova // PAGE + 1) * PAGE, iova + n, PAGE)})
        for a in probes:  # regions are whole pages: these suffice; the first bad piece decides
            r = self.region(a)
            if r is None:
                return errno.EINVAL
            if write and not r[3]:
                return errno.EPERM
        return None

    def write(self, iova: int, data: bytes) -> None:
        for k, b in enumerate(data):
            a = iova + k
            r = self.region(a)
            assert r is not None
            (self.file if r[2] else self.msg_mem)[a] = b
        if self.logging:
            self.dirty.update(range(iova // PAGE, (iova + len(data) - 1) // PAGE + 1))

    def read(self, iova: int, n: int) -> bytes:
        out = bytearray()
        for a in range(iova, iova + n):
            r = self.region(a)
            assert r is not None
            out.append((self.file if r[2] else self.msg_mem)[a])
        return bytes(out)

    def report(self, iova: int, length: int, page_size: int) -> list[int]:
        bits = set()
        for pg in [q for q in self.dirty if iova // PAGE <= q < (iova + length) // PAGE]:
            self.dirty.discard(pg)
            off = pg * PAGE - iova
            for k in range(off // page_size, (off + PAGE - 1) // page_size + 1):
                if k < -(-length // page_size):
                    bits.add(k)
        return sorted(bits)

    def close(self) -> None:
        self.file.close()
        os.close(self.fd)


ops = st.lists(
    st.one_of(
        st.tuples(st.just("map"), st.integers(0, SLOTS - 1), st.integers(1, 4), st.booleans(), st.booleans()),
        st.tuples(st.just("unmap"), st.integers(0, SLOTS - 1)),
        st.tuples(st.just("map"), st.integers(0, SLOTS - 1), st.integers(1, 4), st.booleans(), st.booleans()),
        st.tuples(st.just("write"), st.integers(0, SLOTS - 1), st.integers(0, 4 * PAGE - 1), st.integers(1, 2 * PAGE), st.booleans()),
        st.tuples(st.just("write"), st.integers(0, SLOTS - 1), st.integers(0, 4 * PAGE - 1), st.integers(1, 64), st.booleans()),
        st.tuples(st.just("read"), st.integers(0, SLOTS - 1), st.integers(0, 4 * PAGE - 1), st.integers(1, 2 * PAGE), st.booleans()),
        st.tuples(st.just("log"), st.just(True)),
        st.tuples(st.just("log"), st.booleans()),
        st.tuples(st.just("report"), st.integers(0, SLOTS * 4 - 1), st.integers(1, 16), st.sampled_from([1024, 2048, 4096, 8192, 16384])),
        st.tuples(st.just("report"), st.just(0), st.just(SLOTS * 4), st.sampled_from([2048, 4096, 8192])),
    ),
    min_size=2,
    max_size=40,
)


setup = st.lists(
    st.tuples(st.just("map"), st.integers(0, SLOTS - 1), st.integers(1, 4), st.booleans(), st.just(True)),
    min_size=1, max_size=5,
)


@pytest.mark.parametrize("core", ["python", "native"])
@settings(max_examples=80, deadline=None)
@given(maps=setup, program=ops)
def test_client_memory_against_the_model(core: str, maps: list[tuple], program: list[tuple]) -> None:
    model = Model()
    mem = ClientMemory(model.send, max_xfer=1024, core_name=core)
    try:
        for op in [*maps, ("log", True), *program]:
            kind = op[0]
            if kind == "map":
                _, slot, pages, has_fd, writable = op
                iova, size = slot * 4 * PAGE, pages * PAGE
                req = p.DmaMap(p.DMA_READ_FLAG | (p.DMA_WRITE_FLAG if writable else 0), iova, iova, size,
                               os.dup(model.fd) if has_fd else None)
                clash = any(b < iova + size and iova < b + s for b, (s, _f, _w) in model.maps.items())
                try:
                    mem.map(req)
                    assert not clash
                    model.maps[iova] = (size, has_fd, writable)
                except DmaError as e:
                    assert clash and e.errno == errno.EEXIST
                finally:
                    if req.fd is not None:
                        os.close(req.fd)
            elif kind == "unmap":
                iova = op[1] * 4 * PAGE
                if iova in model.maps:
                    size = model.maps.pop(iova)[0]
                    mem.unmap(iova, size)
                else:
                    with pytest.raises(DmaError) as e:
                        mem.unmap(iova, PAGE)
                    assert e.value.errno == errno.ENOENT
            elif kind in ("write", "read"):
                _, slot, off, n, messages = op
                iova = slot * 4 * PAGE + off
                n = min(n, SLOTS * 4 * PAGE - iova)
                want = model.covered(iova, n, kind == "write")
                data = bytes((iova + k) * 7 & 0xFF for k in range(n))
                try:
                    if kind == "write":
                        mem.write(iova, data, messages=messages)
                    else:
                        got = mem.read(iova, n, messages=messages)
                    assert want is None, f"{kind} {iova:#x}+{n:#x} should fail"
                except DmaError as e:
                    assert e.errno == want, (kind, hex(iova), n, e)
                    continue
                if kind == "write":
                    model.write(iova, data)
                else:
                    assert got == model.read(iova, n)
            elif kind == "log":
                if op[1]:
                    if model.logging:
                        with pytest.raises(DmaError):
                            mem.logging_start(PAGE)
                    else:
                        mem.logging_start(PAGE)
                        model.logging, model.dirty = True, set()
                else:
                    mem.logging_stop()
                    model.logging, model.dirty = False, set()
            elif kind == "report" and model.logging:
                _, first, pages, page_size = op
                iova, length = first * PAGE, min(pages, SLOTS * 4 - first) * PAGE
                bm = mem.take_bitmap(iova, length, page_size)
                got = [k for k in range(len(bm) * 8) if bm[k >> 3] >> (k & 7) & 1]
                assert got == model.report(iova, length, page_size)
                assert len(bm) == (-(-length // page_size) + 63) // 64 * 8
                assert not any(mem.take_bitmap(iova, length, page_size))  # reported: cleared
        # the file holds what the model says (fd regions were reached through the container)
        with mmap.mmap(model.fd, SLOTS * 4 * PAGE) as fresh:
            assert fresh[:] == model.file[:]
    finally:
        mem.close()
        model.close()


def test_messages_split_and_counted() -> None:
    model = Model()
    mem = ClientMemory(model.send, max_xfer=1024, core_name="python")
    mem.map(p.DmaMap(3, 0, 0, 4 * PAGE))
    mem.write(100, bytes(5000))
    assert model.messages == 5  # 1024 x 4 + 904
    mem.close()
    with pytest.raises(DmaError) as e:
        mem.write(0, b"x")
    assert e.value.errno == errno.ENOTCONN
    model.close()
