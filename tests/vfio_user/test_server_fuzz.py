"""A live server fed random and mutated message streams (with real fds attached): every
session ends without an exception escaping, every fd it was sent is closed, and the next
client is served."""

from __future__ import annotations

import os
import socket
import struct

from fake_client import Harness, TestDevice, open_fds
from hypothesis import given, settings
from hypothesis import strategies as st

from dmarw.vfio_user import protocol as p

VALID = [
    p.Version(0, 2, {"max_msg_fds": 4}),
    p.DeviceInfo(),
    p.RegionInfo(2, 200),
    p.IrqInfo(2),
    p.SetIrqs(p.IRQ_SET_DATA_EVENTFD | p.IRQ_SET_ACTION_TRIGGER, p.MSIX, 0, 2, argsz=20),
    p.SetIrqs(p.IRQ_SET_DATA_NONE | p.IRQ_SET_ACTION_TRIGGER, p.MSIX, 0, 0, argsz=20),
    p.DmaMap(3, 0, 0x10000, 0x1000),
    p.DmaUnmap(0, 0x10000, 0x1000),
    p.DmaUnmap(p.UNMAP_ALL, 0, 0),
    p.RegionRead(2, 0, 8),
    p.RegionWrite(0, 0, 16, struct.pack("<QII", 0x10000, 64, 1)),  # the doorbell: DMA
    p.RegionWrite(2, 0, 4, b"abcd"),
    p.WriteMulti([(2, 0, b"xy")]),
    p.Reset(),
    p.feature_logging(True, 4096),
    p.feature_report(0x10000, 0x1000, 4096),
    p.feature_mig_state(p.MigState.STOP_COPY),
    p.MigDataRead(64, argsz=72),
    p.MigDataWrite(2, b"hi", argsz=10),
]


@st.composite
def _stream(draw: st.DrawFn) -> list[tuple[bytes, int]]:
    """(message bytes, number of fds to attach) pairs, starting with VERSION mostly."""
    out: list[tuple[bytes, int]] = []
    if draw(st.integers(0, 9)):
        data, _ = p.encode_request(1, VALID[0])
        out.append((data, 0))
    for _ in range(draw(st.integers(1, 12))):
        payload = draw(st.sampled_from(VALID))
        data, _ = p.encode_request(draw(st.integers(0, 0xFFFF)), payload, no_reply=draw(st.booleans()))
        mut = draw(st.integers(0, 4))
        if mut == 1:
            i = draw(st.integers(0, len(data) - 1))
            data = data[:i] + bytes([draw(st.integers(0, 255))]) + data[i + 1 :]
        elif mut == 2:
            data = data[: draw(st.integers(0, len(data)))]
        elif mut == 3:
            data = draw(st.binary(min_size=16, max_size=64))
        nfds = draw(st.sampled_from([0, 0, 0, 1, 2]))
        out.append((data, nfds))
    return out


@settings(max_examples=120, deadline=None)
@given(_stream())
def test_random_streams_never_break_the_server(stream: list[tuple[bytes, int]]) -> None:
    h = Harness(TestDevice(), io_timeout=0.5)
    before = open_fds()
    c = h.connect()
    c.sock.settimeout(2.0)
    try:
        for data, nfds in stream:
            fds = [os.eventfd(0) for _ in range(nfds)]
            try:
                if fds:
                    c.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{nfds}i", *fds))])
                else:
                    c.sock.sendall(data)
            except OSError:
                break  # the server hung up
            finally:
                for fd in fds:
                    os.close(fd)
    finally:
        c.sock.close()
    ok = h.result()  # the session ended and returned (a thread exception would leave none)
    assert ok in (True, False)
    assert open_fds() == before  # nothing the client sent is kept once it is gone
    c2 = h.connect()  # and the next client is served
    c2.negotiate()
    c2.region_write(2, 0, b"next")
    assert h.finish(c2)
    h.device.close()
