"""The sans-I/O protocol: round trips of every message kind, strict validation, a fuzz."""

from __future__ import annotations

import errno
import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmarw import DmaError
from dmarw.vfio_user import protocol as p


def _roundtrip_request(payload: p.Payload, msg_id: int = 7) -> p.Payload:
    data, fds = p.encode_request(msg_id, payload)
    conn = p.Connection()
    conn.receive_data(data, fds)
    msg = conn.next_message()
    assert msg is not None and conn.next_message() is None
    assert msg.header.msg_id == msg_id and msg.header.cmd == payload.CMD
    assert msg.header.size == len(data) and not msg.header.is_reply
    return p.decode_request(msg)


REQUESTS = [
    p.Version(0, 2, {"max_msg_fds": 8, "max_data_xfer_size": 4096, "pgsizes": 4096}),
    p.Version(0, 1, {}),
    p.DmaMap(p.DMA_READ_FLAG | p.DMA_WRITE_FLAG, 0x2000, 0x10000, 0x4000, fd=5),
    p.DmaMap(p.DMA_READ_FLAG, 0, 0x10000, 0x1000),
    p.DmaUnmap(0, 0x10000, 0x1000),
    p.DmaUnmap(p.UNMAP_ALL, 0, 0),
    p.DmaUnmap(p.UNMAP_GET_DIRTY_BITMAP, 0x10000, 0x8000, argsz=48, pgsize=4096, bitmap_size=8),
    p.DeviceInfo(16),
    p.RegionInfo(3, 32),
    p.IoFdsRequest(1, 64),
    p.IrqInfo(2, 16),
    p.SetIrqs(p.IRQ_SET_DATA_EVENTFD | p.IRQ_SET_ACTION_TRIGGER, p.INTX, 0, 1, fds=[9], argsz=20),
    p.SetIrqs(p.IRQ_SET_DATA_BOOL | p.IRQ_SET_ACTION_MASK, p.MSIX, 2, 3, b"\1\0\1", argsz=23),
    p.SetIrqs(p.IRQ_SET_DATA_NONE | p.IRQ_SET_ACTION_TRIGGER, p.MSI, 0, 0, argsz=20),
    p.RegionRead(0, 0x10, 8),
    p.RegionWrite(1, 0x20, 4, b"abcd"),
    p.DmaRead(0x1000, 64),
    p.DmaWrite(0x1000, 3, b"xyz"),
    p.Reset(),
    p.WriteMulti([(0, 0, b"\1\2\3\4"), (2, 8, b"12345678")]),
    p.feature_mig_state(p.MigState.STOP_COPY),
    p.feature_mig_state(0, get=True),
    p.feature_logging(True, 4096, [(0, 0x10000), (0x20000, 0x1000)]),
    p.feature_logging(False, 4096),
    p.feature_report(0x10000, 0x8000, 4096),
    p.Feature(p.FEATURE_MIGRATION | p.FEATURE_GET, b"", 16),
    p.Feature(p.FEATURE_DMA_LOGGING_START | p.FEATURE_PROBE | p.FEATURE_SET, b"", 8),
    p.MigDataRead(1024, argsz=8 + 1024),
    p.MigDataWrite(3, b"abc", argsz=11),
]


@pytest.mark.parametrize("payload", REQUESTS, ids=lambda x: type(x).__name__)
def test_request_round_trip(payload: p.Payload) -> None:
    assert _roundtrip_request(payload) == payload


def test_every_command_has_a_request_type() -> None:
    assert set(p.REQUESTS) == set(p.COMMANDS)
    assert {type(r).CMD for r in REQUESTS} == set(p.COMMANDS)


def _reply(cmd: int, payload: p.Payload | bytes | None, msg_id: int = 3) -> p.Payload:
    data, fds = p.encode_reply(msg_id, cmd, payload)
    conn = p.Connection()
    conn.receive_data(data, fds)
    msg = conn.next_message()
    assert msg is not None and msg.header.is_reply and not msg.header.is_error
    return p.decode_reply(msg)


def test_reply_round_trips() -> None:
    assert _reply(p.Command.VERSION, p.Version(0, 2, {"max_msg_fds": 4})) == p.Version(0, 2, {"max_msg_fds": 4})
    assert _reply(p.Command.DMA_MAP, None) == p.Empty(p.Command.DMA_MAP)
    assert _reply(p.Command.DEVICE_GET_INFO, p.DeviceInfo(16, 3, 9, 5)) == p.DeviceInfo(16, 3, 9, 5)
    assert _reply(p.Command.DEVICE_GET_IRQ_INFO, p.IrqInfo(0, 16, 1, 1)) == p.IrqInfo(0, 16, 1, 1)
    assert _reply(p.Command.REGION_READ, p.RegionRead(1, 0, 2, b"hi")) == p.RegionAccess(1, 0, 2, b"hi")
    assert _reply(p.Command.DMA_READ, p.DmaRead(8, 2, b"ok")) == p.DmaAccess(8, 2, b"ok")
    assert _reply(p.Command.REGION_WRITE_MULTI, p.WriteMultiDone(4)) == p.WriteMultiDone(4)
    got = _reply(p.Command.MIG_DATA_READ, p.MigData(3, b"abc" + bytes(5), argsz=16))
    assert got == p.MigData(3, b"abc", 16)
    unmap = p.DmaUnmap(p.UNMAP_GET_DIRTY_BITMAP, 0, 0x2000, 48, 4096, 8, b"\3" + bytes(7))
    assert _reply(p.Command.DMA_UNMAP, unmap) == unmap


def test_region_info_with_capabilities() -> None:
    info = p.RegionInfo(1, flags=p.REGION_FLAG_READ | p.REGION_FLAG_WRITE | p.REGION_FLAG_MMAP,
                        size=0x3000, sparse=[p.SparseArea(0, 0x1000), p.SparseArea(0x2000, 0x1000)],
                        type=(0x8086, 7), fd=11)
    full = info.full_size()
    assert full == 32 + (8 + 8 + 32) + (8 + 8)
    short, fds = info.encode_reply(32)
    assert len(short) == 32 and fds == []  # cut to the asked size, no fd
    argsz, flags = struct.unpack_from("<II", short)
    assert argsz == full and flags & p.REGION_FLAG_CAPS
    body, fds = info.encode_reply(full)
    assert len(body) == full and fds == [11]
    back = p.RegionInfo.decode_reply(body, fds)
    assert back.sparse == info.sparse and back.type == (0x8086, 7) and back.fd == 11
    assert back.size == 0x3000 and back.argsz == full


def test_io_fds_reply() -> None:
    r = p.IoFdsReply(0, [(0, 4, 0, 0, 0, 0), (8, 4, 1, 0, 1, 7)], [20, 21])
    body, fds = r.encode_reply(1000)
    back = p.IoFdsReply.decode(body, fds)
    assert back.subregions == r.subregions and back.fds == [20, 21] and back.argsz == 16 + 80
    short, nfds = r.encode_reply(16)
    assert len(short) == 16 and nfds == []


def test_error_reply_raises_its_errno() -> None:
    conn = p.Connection()
    conn.receive_data(p.error_reply(5, p.Command.REGION_READ, errno.EINVAL))
    msg = conn.next_message()
    assert msg is not None and msg.header.is_error and msg.header.error == errno.EINVAL
    with pytest.raises(p.ProtocolError) as e:
        p.decode_reply(msg)
    assert e.value.errno == errno.EINVAL
    assert isinstance(e.value, DmaError)


def test_framing_split_and_coalesced() -> None:
    """Messages cut at every byte boundary and glued together frame the same."""
    a, _ = p.encode_request(1, p.RegionWrite(0, 0, 4, b"wxyz"))
    b, _ = p.encode_request(2, p.Reset())
    stream = a + b
    for cut in range(len(stream) + 1):
        conn = p.Connection()
        got = []
        for part in (stream[:cut], stream[cut:]):
            if part:
                conn.receive_data(part)
            while (m := conn.next_message()) is not None:
                got.append(m.header.msg_id)
        assert got == [1, 2]


def test_fds_belong_to_the_message_they_came_with() -> None:
    a, _ = p.encode_request(1, p.Reset())
    b, _ = p.encode_request(2, p.DmaMap(3, 0, 0, 0x1000, fd=40))
    conn = p.Connection()
    conn.receive_data(a)
    conn.receive_data(b, [40])
    m1, m2 = conn.next_message(), conn.next_message()
    assert m1 is not None and m2 is not None
    assert m1.fds == [] and m2.fds == [40]


@pytest.mark.parametrize(
    "raw, err",
    [
        (struct.pack("<HHIII", 1, 4, 8, 0, 0), errno.EINVAL),  # size below the header
        (struct.pack("<HHIII", 1, 4, p.MAX_MSG_SIZE + 1, 0, 0), errno.E2BIG),
        (struct.pack("<HHIII", 1, 4, 16, 0x7, 0), errno.EINVAL),  # type 7
        (struct.pack("<HHIII", 1, 4, 16, 0x100, 0), errno.EINVAL),  # unknown flag bit
    ],
)
def test_bad_headers_are_fatal(raw: bytes, err: int) -> None:
    conn = p.Connection()
    conn.receive_data(raw)
    with pytest.raises(p.ProtocolError) as e:
        conn.next_message()
    assert e.value.errno == err and e.value.fatal


def test_truncated_stream_at_eof() -> None:
    data, _ = p.encode_request(1, p.RegionWrite(0, 0, 8, bytes(8)))
    conn = p.Connection()
    conn.receive_data(data[:20])
    assert conn.next_message() is None
    conn.receive_data(b"")
    with pytest.raises(p.ProtocolError) as e:
        conn.next_message()
    assert e.value.errno == errno.ECONNRESET and e.value.fatal


def _msg(cmd: int, body: bytes, fds: list[int] | None = None, flags: int = 0) -> p.Message:
    return p.Message(p.Header(1, cmd, 16 + len(body), flags), body, fds or [])


@pytest.mark.parametrize(
    "cmd, body, fds, err",
    [
        (99, b"", [], errno.ENOSYS),
        (p.Command.VERSION, b"\0", [], errno.EINVAL),
        (p.Command.VERSION, struct.pack("<HH", 0, 2) + b'{"capabilities":{}}', [], errno.EINVAL),  # no NUL
        (p.Command.VERSION, struct.pack("<HH", 0, 2) + b"[1]\0", [], errno.EINVAL),
        (p.Command.VERSION, struct.pack("<HH", 0, 2) + b'{"capabilities":{"max_msg_fds":-1}}\0', [], errno.EINVAL),
        (p.Command.VERSION, struct.pack("<HH", 0, 2) + b'{"capabilities":{"max_data_xfer_size":0}}\0', [], errno.EINVAL),
        (p.Command.VERSION, struct.pack("<HH", 0, 2) + b"\xff\0", [], errno.EINVAL),
        (p.Command.DMA_MAP, struct.pack("<IIQQQ", 32, 3, 0, 0, 0x1000), [1, 2], errno.EINVAL),  # 2 fds
        (p.Command.DMA_MAP, struct.pack("<IIQQQ", 24, 3, 0, 0, 0x1000), [], errno.EINVAL),  # argsz
        (p.Command.DMA_MAP, struct.pack("<IIQQQ", 32, 4, 0, 0, 0x1000), [], errno.EINVAL),  # flags
        (p.Command.DMA_MAP, struct.pack("<IIQQQ", 32, 3, 0, 0, 0), [], errno.EINVAL),  # size 0
        (p.Command.DMA_MAP, struct.pack("<IIQQQ", 32, 3, 0, 2**64 - 4096, 0x2000), [], errno.EOVERFLOW),
        (p.Command.DMA_MAP, struct.pack("<IIQQ", 32, 3, 0, 0), [], errno.EINVAL),  # truncated
        (p.Command.DMA_UNMAP, struct.pack("<IIQQ", 24, 2, 0x1000, 0), [], errno.EINVAL),  # all + addr
        (p.Command.DMA_UNMAP, struct.pack("<IIQQ", 24, 8, 0, 0x1000), [], errno.EINVAL),
        (p.Command.DMA_UNMAP, struct.pack("<IIQQ", 24, 1, 0, 0x1000), [], errno.EINVAL),  # no bitmap
        (p.Command.DMA_UNMAP, struct.pack("<IIQQQQ", 40, 1, 0, 0x1000, 4096, 8), [], errno.EINVAL),  # argsz
        (p.Command.DEVICE_GET_INFO, struct.pack("<I", 16), [], errno.EINVAL),
        (p.Command.DEVICE_GET_INFO, bytes(16), [3], errno.EINVAL),
        (p.Command.DEVICE_GET_REGION_INFO, struct.pack("<IIIIQQ", 16, 0, 0, 0, 0, 0), [], errno.EINVAL),
        (p.Command.DEVICE_GET_IRQ_INFO, struct.pack("<IIII", 8, 0, 0, 0), [], errno.EINVAL),
        (p.Command.DEVICE_SET_IRQS, struct.pack("<IIIII", 20, 0x24 | 1, 0, 0, 1), [5], errno.EINVAL),  # 2 data
        (p.Command.DEVICE_SET_IRQS, struct.pack("<IIIII", 20, 0x4 | 0x18, 0, 0, 1), [5], errno.EINVAL),  # 2 actions
        (p.Command.DEVICE_SET_IRQS, struct.pack("<IIIII", 20, 0x24, 0, 0, 2), [5], errno.EINVAL),  # 1 of 2 fds
        (p.Command.DEVICE_SET_IRQS, struct.pack("<IIIII", 22, 0x22, 0, 0, 3) + b"\1\1", [], errno.EINVAL),
        (p.Command.DEVICE_SET_IRQS, struct.pack("<IIIII", 20, 0x21, 0, 0, 1), [5], errno.EINVAL),  # fd w/o EVENTFD
        (p.Command.DEVICE_SET_IRQS, struct.pack("<IIIII", 20, 0x21, 0, 0, 1 << 20), [], errno.EINVAL),
        (p.Command.REGION_READ, struct.pack("<QII", 0, 0, 8) + b"x", [], errno.EINVAL),
        (p.Command.REGION_WRITE, struct.pack("<QII", 0, 0, 8) + b"1234", [], errno.EINVAL),
        (p.Command.REGION_WRITE, struct.pack("<QII", 0, 0, 1) + b"1", [4], errno.EINVAL),
        (p.Command.DEVICE_RESET, b"x", [], errno.EINVAL),
        (p.Command.REGION_WRITE_MULTI, struct.pack("<Q", 0), [], errno.EINVAL),
        (p.Command.REGION_WRITE_MULTI, struct.pack("<Q", 2) + bytes(24), [], errno.EINVAL),
        (p.Command.REGION_WRITE_MULTI, struct.pack("<QQII8s", 1, 0, 0, 9, b""), [], errno.EINVAL),
        (p.Command.DEVICE_FEATURE, struct.pack("<II", 8, 2 | p.FEATURE_GET | p.FEATURE_SET), [], errno.EINVAL),
        (p.Command.DEVICE_FEATURE, struct.pack("<II", 8, 2), [], errno.EINVAL),  # no GET/SET/PROBE
        (p.Command.DEVICE_FEATURE, struct.pack("<II", 8, 1 << 20), [], errno.EINVAL),
        (p.Command.MIG_DATA_READ, struct.pack("<II", 8, 16), [], errno.EINVAL),  # argsz < 8 + size
        (p.Command.MIG_DATA_WRITE, struct.pack("<II", 12, 4) + b"ab", [], errno.EINVAL),
    ],
)
def test_bad_requests(cmd: int, body: bytes, fds: list[int], err: int) -> None:
    with pytest.raises(p.ProtocolError) as e:
        p.decode_request(_msg(cmd, body, fds))
    assert e.value.errno == err and not e.value.fatal


def test_a_reply_is_not_a_request() -> None:
    with pytest.raises(p.ProtocolError):
        p.decode_request(_msg(p.Command.DEVICE_RESET, b"", flags=p.F_TYPE_REPLY))


def test_feature_views() -> None:
    f = p.feature_logging(True, 8192, [(0x1000, 0x2000)])
    assert f.logging_control() == (8192, [p.LoggingRange(0x1000, 0x2000)])
    assert p.feature_mig_state(p.MigState.RESUMING).mig_state() == (4, 0)
    assert p.feature_report(0, 0x3000, 4096).logging_report() == (0, 0x3000, 4096)
    bad = p.Feature(p.FEATURE_DMA_LOGGING_START | p.FEATURE_SET, struct.pack("<QII", 4096, 2, 0) + bytes(16))
    with pytest.raises(p.ProtocolError):
        bad.logging_control()
    with pytest.raises(p.ProtocolError):
        p.Feature(p.FEATURE_MIG_DEVICE_STATE | p.FEATURE_SET, b"\1").mig_state()


def test_negotiate() -> None:
    client = p.Version(0, 5, {"max_msg_fds": 32, "max_data_xfer_size": 1024})
    reply, session = p.negotiate(client, {"max_msg_fds": 8, "twin_socket": {"supported": True}})
    assert reply.major == 0 and reply.minor == p.VERSION_MINOR
    assert "twin_socket" not in reply.capabilities
    assert session["client_max_data_xfer_size"] == 1024 and session["client_max_msg_fds"] == 32
    _, session = p.negotiate(p.Version(0, 0, {}), {})
    assert session["client_max_msg_fds"] == 1
    assert session["client_max_data_xfer_size"] == p.DEFAULT_MAX_DATA_XFER_SIZE
    with pytest.raises(p.ProtocolError) as e:
        p.negotiate(p.Version(1, 0, {}), {})
    assert e.value.errno == errno.ENOTSUP


def test_version_json_is_nul_terminated_compact() -> None:
    body, _ = p.Version(0, 2, {"max_msg_fds": 1}).encode()
    assert body[4:].endswith(b"\0")
    assert json.loads(body[4:-1]) == {"capabilities": {"max_msg_fds": 1}}


def test_protocol_error_pickles() -> None:
    import pickle

    e = pickle.loads(pickle.dumps(p.ProtocolError(errno.E2BIG, "big", fatal=True)))
    assert e.errno == errno.E2BIG and e.fatal and e.detail == "big"


# -- fuzz -----------------------------------------------------------------------------------

_cmds = st.sampled_from(sorted(p.COMMANDS) + [0, 14, 19, 0xFFFF])


@st.composite
def _messages(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    """A header with a plausible command and flags and a random or near-valid body."""
    cmd = draw(_cmds)
    flags = draw(st.sampled_from([0, 0, 0, 1, 0x10, 0x20, 0x21, 0x3, 0x40]))
    if draw(st.booleans()) and cmd in p.REQUESTS:
        valid = [r for r in REQUESTS if r.CMD == cmd]
        body, _ = draw(st.sampled_from(valid)).encode()
        mutate = draw(st.integers(0, 3))
        if mutate == 1 and body:
            i = draw(st.integers(0, len(body) - 1))
            body = body[:i] + bytes([draw(st.integers(0, 255))]) + body[i + 1 :]
        elif mutate == 2:
            body = body[: draw(st.integers(0, len(body)))]
        elif mutate == 3:
            body = body + draw(st.binary(max_size=16))
    else:
        body = draw(st.binary(max_size=96))
    size = 16 + len(body)
    if draw(st.integers(0, 9)) == 0:
        size = draw(st.integers(0, 0xFFFFFFFF))
    fds = draw(st.lists(st.integers(1000, 1010), max_size=3))
    return struct.pack("<HHIII", draw(st.integers(0, 0xFFFF)), cmd, size, flags, 0) + body, fds


@settings(max_examples=800, deadline=None)
@given(st.lists(_messages(), min_size=1, max_size=4), st.integers(1, 64))
def test_fuzz_decoder_raises_only_protocol_error(msgs: list[tuple[bytes, list[int]]], chunk: int) -> None:
    """Any byte stream: framing and decoding either succeed or raise ProtocolError."""
    conn = p.Connection()
    stream = b"".join(m for m, _ in msgs)
    fds = [fd for _, f in msgs for fd in f]
    try:
        for i in range(0, len(stream), chunk):
            conn.receive_data(stream[i : i + chunk], fds if i == 0 else ())
            while (msg := conn.next_message()) is not None:
                try:
                    if msg.header.is_reply:
                        p.decode_reply(msg)
                    else:
                        got = p.decode_request(msg)
                        again, _ = got.encode()  # what decodes re-encodes
                        assert isinstance(again, bytes)
                except p.ProtocolError as e:
                    assert not e.fatal and e.errno
        conn.receive_data(b"")
        conn.next_message()
    except p.ProtocolError as e:
        assert e.errno


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 0xFFFF), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.binary(max_size=64))
def test_fuzz_region_write_round_trip(msg_id: int, region: int, offset: int, data: bytes) -> None:
    w = p.RegionWrite(region, offset, len(data), data)
    assert _roundtrip_request(w, msg_id) == w


u16, u32, u64 = st.integers(0, 0xFFFF), st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1)
pages = st.integers(1, 2**20).map(lambda n: n * 4096)


@st.composite
def _dma_map(draw: st.DrawFn) -> p.DmaMap:
    size = draw(pages)
    addr = draw(st.integers(0, 2**64 - size))
    return p.DmaMap(draw(st.integers(0, 3)), draw(u64), addr, size, draw(st.none() | st.integers(3, 100)))


@st.composite
def _set_irqs(draw: st.DrawFn) -> p.SetIrqs:
    count = draw(st.integers(0, 16))
    start = draw(st.integers(0, 64))
    kind = draw(st.sampled_from([p.IRQ_SET_DATA_NONE, p.IRQ_SET_DATA_BOOL, p.IRQ_SET_DATA_EVENTFD]))
    action = draw(st.sampled_from([p.IRQ_SET_ACTION_MASK, p.IRQ_SET_ACTION_UNMASK, p.IRQ_SET_ACTION_TRIGGER]))
    data = draw(st.binary(min_size=count, max_size=count)) if kind == p.IRQ_SET_DATA_BOOL else b""
    fds = list(range(10, 10 + count)) if kind == p.IRQ_SET_DATA_EVENTFD and draw(st.booleans()) else []
    return p.SetIrqs(kind | action, draw(st.integers(0, 4)), start, count, data, fds, 20 + len(data))


@st.composite
def _feature(draw: st.DrawFn) -> p.Feature:
    kind = draw(st.integers(0, 2))
    if kind == 0:
        return p.feature_mig_state(draw(st.integers(0, 7)))
    if kind == 1:
        ranges = draw(st.lists(st.tuples(st.integers(0, 2**40), st.integers(1, 2**30)), max_size=8))
        return p.feature_logging(draw(st.booleans()), 1 << draw(st.integers(12, 30)), ranges)
    return p.feature_report(draw(st.integers(0, 2**40)), draw(st.integers(1, 2**30)), 1 << draw(st.integers(12, 21)))


caps = st.fixed_dictionaries({}, optional={
    "max_msg_fds": st.integers(0, 253), "max_data_xfer_size": st.integers(1, 2**40),
    "pgsizes": st.integers(0, 2**40), "max_dma_maps": u16, "write_multiple": st.booleans(),
    "migration": st.fixed_dictionaries({"pgsize": st.just(4096)}),
})

ANY_REQUEST = st.one_of(
    st.builds(p.Version, u16, u16, caps),
    _dma_map(),
    st.builds(lambda f, a, s: p.DmaUnmap(f, a, s), st.just(0), st.integers(0, 2**63), st.integers(0, 2**62)),
    st.builds(p.DeviceInfo, u32, u32, u32, u32),
    st.builds(p.RegionInfo, u32, st.integers(32, 2**32 - 1)),
    st.builds(p.IoFdsRequest, u32, st.integers(16, 2**32 - 1)),
    st.builds(p.IrqInfo, u32, st.integers(16, 2**32 - 1), u32, u32),
    _set_irqs(),
    st.builds(p.RegionRead, u32, u64, u32),
    st.binary(max_size=256).flatmap(lambda d: st.builds(p.RegionWrite, u32, u64, st.just(len(d)), st.just(d))),
    st.builds(p.DmaRead, u64, u64),
    st.binary(max_size=256).flatmap(lambda d: st.builds(p.DmaWrite, u64, st.just(len(d)), st.just(d))),
    st.just(p.Reset()),
    st.lists(st.tuples(u32, u64, st.binary(min_size=1, max_size=8)), min_size=1, max_size=20).map(p.WriteMulti),
    _feature(),
    st.integers(0, 2**20).map(lambda n: p.MigDataRead(n, argsz=8 + n)),
    st.binary(max_size=256).map(lambda d: p.MigDataWrite(len(d), d, argsz=8 + len(d))),
)


@settings(max_examples=600, deadline=None)
@given(ANY_REQUEST, u16)
def test_fuzz_every_request_round_trips(payload: p.Payload, msg_id: int) -> None:
    """decode(encode(x)) == x for random instances of every request kind."""
    assert _roundtrip_request(payload, msg_id) == payload
