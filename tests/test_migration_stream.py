"""The migration stream format: round trips, and every kind of bad stream refused (sans-I/O)."""

from __future__ import annotations

import errno
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmarw.checksum import crc32c
from dmarw.migration.dest import Destination
from dmarw.migration.stream import (
    NEED_DATA,
    Decoder,
    Encoder,
    End,
    Header,
    Pages,
    RoundEnd,
    StreamError,
)

PS = 4096
LAYOUT = ((0, 16 * PS), (0x100000, 8 * PS))


def page(tag: int) -> bytes:
    return bytes([tag & 0xFF]) * PS


def build(layout: tuple[tuple[int, int], ...] = LAYOUT, page_size: int = PS) -> tuple[bytes, dict[int, bytes]]:
    """A valid stream of three rounds; returns it and the final content of every sent page."""
    enc = Encoder(page_size, layout)
    parts: list[bytes | memoryview] = list(enc.start())
    final: dict[int, bytes] = {}
    rounds = [
        [g for g, s in layout for g in range(g, g + s, page_size)],  # round 0: every page
        [0x1000, 0x2000, 0x100000 + 0x3000],
        [0x2000],
    ]
    for r, gpas in enumerate(rounds):
        for i in range(0, len(gpas), 5):
            batch = gpas[i : i + 5]
            data = b"".join(bytes([(r * 31 + g // page_size) & 0xFF]) * page_size for g in batch)
            for k, g in enumerate(batch):
                final[g] = data[k * page_size : (k + 1) * page_size]
            parts += enc.pages_frame(batch, data)
        parts += enc.end_round()
    parts += enc.end()
    return b"".join(bytes(p) for p in parts), final


def decode_all(data: bytes, chunks: list[int] | None = None, **expect: object) -> list[object]:
    dec = Decoder(**expect)  # type: ignore[arg-type]
    out: list[object] = []
    pos = 0
    for n in chunks or []:
        dec.receive_data(data[pos : pos + n])
        pos += n
        out += dec.events()
    dec.receive_data(data[pos:])
    out += dec.events()
    dec.receive_data(b"")
    out += dec.events()
    return out


def test_round_trip_events() -> None:
    data, _ = build()
    evs = decode_all(data, page_size=PS, layout=LAYOUT)
    assert isinstance(evs[0], Header) and evs[0].page_size == PS and evs[0].layout == LAYOUT
    assert isinstance(evs[-1], End) and evs[-1].rounds == 3 and evs[-1].pages == 24 + 3 + 1
    assert [e.round for e in evs if isinstance(e, RoundEnd)] == [0, 1, 2]
    assert sum(len(e.gpas) for e in evs if isinstance(e, Pages)) == 28


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 9000), max_size=30))
def test_any_chunking_gives_the_same_events(chunks: list[int]) -> None:
    data, _ = build()
    assert decode_all(data, chunks) == decode_all(data)


def test_destination_applies_the_last_copy_of_each_page() -> None:
    data, final = build()
    dest = Destination(PS, LAYOUT)
    try:
        for i in range(0, len(data), 7777):
            dest.feed(data[i : i + 7777])
        dest.feed(b"")
        assert dest.complete and dest.error is None and dest.rounds == 3
        for gpa, content in final.items():
            assert dest.read(gpa, PS) == content
    finally:
        dest.close()


# -- truncated ------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(st.data())
def test_truncated_anywhere_is_refused(data: st.DataObject) -> None:
    stream, _ = build()
    cut = data.draw(st.integers(0, len(stream) - 1))
    dec = Decoder(PS, LAYOUT)
    if cut:  # receive_data(b"") is the end of input
        dec.receive_data(stream[:cut])
    evs = dec.events()
    assert not any(isinstance(e, End) for e in evs)
    dec.receive_data(b"")
    with pytest.raises(StreamError) as ei:
        dec.events()
    assert ei.value.reason == "truncated" and ei.value.errno == errno.ENODATA
    assert "no END frame" in str(ei.value)


def test_truncated_inside_a_frame_names_the_frame_and_bytes() -> None:
    stream, _ = build()
    dec = Decoder(PS, LAYOUT)
    dec.receive_data(stream[:200])
    dec.events()
    dec.receive_data(b"")
    with pytest.raises(StreamError, match=r"inside frame seq 1 at offset 0x44: 48 of 20480 bytes of page contents"):
        dec.next_event()


def test_destination_left_incomplete_by_a_truncated_stream() -> None:
    stream, final = build()
    dest = Destination(PS, LAYOUT)
    try:
        dest.feed(stream[: len(stream) - 10])
        with pytest.raises(StreamError):
            dest.feed(b"")
        assert not dest.complete and dest.error is not None and dest.error.reason == "truncated"
        assert dest.pages_applied > 0  # earlier frames were applied: memory is partial
    finally:
        dest.close()


# -- corrupted ------------------------------------------------------------------------------
@settings(max_examples=80, deadline=None)
@given(st.data())
def test_any_flipped_byte_is_refused(data: st.DataObject) -> None:
    stream, _ = build()
    pos = data.draw(st.integers(0, len(stream) - 1))
    flip = data.draw(st.integers(1, 255))
    bad = bytearray(stream)
    bad[pos] ^= flip
    dest = Destination(PS, LAYOUT)
    try:
        with pytest.raises(StreamError):
            dest.feed(bytes(bad))
            dest.feed(b"")
        assert not dest.complete
    finally:
        dest.close()


def test_flipped_payload_byte_is_a_checksum_error_naming_the_frame() -> None:
    stream, _ = build()
    bad = bytearray(stream)
    bad[12 + 16 + 40 + 16 + 30] ^= 0x01  # inside the first PAGES frame's page table
    dec = Decoder(PS, LAYOUT)
    dec.receive_data(bytes(bad))
    with pytest.raises(StreamError, match=r"checksum of frame at offset 0x44 \(seq 1\)") as ei:
        dec.events()
    assert ei.value.reason == "corrupt" and ei.value.errno == errno.EBADMSG
    with pytest.raises(StreamError):  # stays failed
        dec.next_event()


def test_flipped_page_byte_fails_that_pages_check_naming_its_gpa() -> None:
    stream, _ = build()
    bad = bytearray(stream)
    table = 8 + 12 * 5  # the first PAGES frame carries 5 pages
    bad[12 + 16 + 40 + 16 + table + 2 * PS + 7] ^= 0x80  # a byte of its third page
    dec = Decoder(PS, LAYOUT)
    dec.receive_data(bytes(bad))
    with pytest.raises(StreamError, match=r"frame seq 1 at offset 0x44: 1 page\(s\) fail their check, first gpa 0x2000") as ei:
        dec.events()
    assert ei.value.reason == "corrupt"


def test_impossible_length_refused_before_waiting_for_it() -> None:
    stream, _ = build()
    head = bytearray(stream[:12 + 16 + 40])
    head += struct.pack("<HHII", 2, 0, 1, 0x7FFFFFFF) + b"\0\0\0\0"
    dec = Decoder(PS, LAYOUT)
    dec.receive_data(bytes(head))
    with pytest.raises(StreamError, match="claims 0x7fffffff payload bytes") as ei:
        dec.events()
    assert ei.value.reason == "corrupt"


def _frame(kind: int, seq: int, payload: bytes) -> bytes:
    head = struct.pack("<HHII", kind, 0, seq, len(payload))
    return head + struct.pack("<I", crc32c(payload, crc32c(head))) + payload


def test_page_outside_the_layout_is_refused() -> None:
    enc = Encoder(PS, LAYOUT)
    data = b"".join(bytes(p) for p in enc.start())
    data += b"".join(bytes(p) for p in enc.pages_frame([0x200000], page(1)))
    dec = Decoder(PS, LAYOUT)
    dec.receive_data(data)
    with pytest.raises(StreamError, match=r"gpa 0x200000 is unaligned or outside the RAM layout"):
        dec.events()


def test_unknown_kind_refused() -> None:
    enc = Encoder(PS, LAYOUT)
    data = b"".join(bytes(p) for p in enc.start()) + _frame(9, 1, b"x")
    dec = Decoder()
    dec.receive_data(data)
    with pytest.raises(StreamError, match="unknown frame kind 9"):
        dec.events()


# -- mismatched -----------------------------------------------------------------------------
def test_page_size_mismatch() -> None:
    stream, _ = build(((0, 16 * 8192),), 8192)
    dec = Decoder(PS, ((0, 16 * 8192),))
    dec.receive_data(stream)
    with pytest.raises(StreamError, match="page size 0x2000, destination uses 0x1000") as ei:
        dec.events()
    assert ei.value.reason == "mismatch" and ei.value.errno == errno.EINVAL


def test_layout_mismatch_names_both_layouts() -> None:
    stream, _ = build()
    dec = Decoder(PS, ((0, 32 * PS),))
    dec.receive_data(stream)
    with pytest.raises(StreamError, match=r"RAM layout \[0x0\+0x10000, 0x100000\+0x8000\] differs .*\[0x0\+0x20000\]"):
        dec.events()


def test_magic_and_version_mismatch() -> None:
    stream, _ = build()
    dec = Decoder()
    dec.receive_data(b"NOTDMARW" + stream[8:])
    with pytest.raises(StreamError, match="not a dmarw migration stream"):
        dec.events()
    dec = Decoder()
    dec.receive_data(stream[:8] + struct.pack("<H", 7) + stream[10:])
    with pytest.raises(StreamError, match="stream version 7 .* speaks version 3") as ei:
        dec.events()
    assert ei.value.reason == "mismatch"
    for old in (1, 2):  # 1: zlib's CRC-32; 2: one CRC over a whole PAGES frame: refused, not misread
        dec = Decoder()
        dec.receive_data(stream[:8] + struct.pack("<H", old) + stream[10:])
        with pytest.raises(StreamError, match=f"stream version {old} .* speaks version 3"):
            dec.events()


def test_destination_refuses_a_mismatched_stream_and_stays_incomplete() -> None:
    stream, _ = build()
    dest = Destination(PS, ((0, 24 * PS),))
    try:
        with pytest.raises(StreamError, match="differs"):
            dest.feed(stream)
        assert not dest.complete and dest.pages_applied == 0
        assert dest.error is not None and dest.error.reason == "mismatch"
    finally:
        dest.close()


# -- protocol -------------------------------------------------------------------------------
def _frames(stream: bytes) -> tuple[bytes, list[bytes]]:
    pre, rest, out = stream[:12], stream[12:], []
    while rest:
        (n,) = struct.unpack_from("<I", rest, 8)
        out.append(rest[: 16 + n])
        rest = rest[16 + n :]
    return pre, out


def test_reordered_frames_refused() -> None:
    stream, _ = build()
    pre, frames = _frames(stream)
    frames[1], frames[2] = frames[2], frames[1]
    dec = Decoder(PS, LAYOUT)
    dec.receive_data(pre + b"".join(frames))
    with pytest.raises(StreamError, match="seq 2, expected 1 .*lost or reordered") as ei:
        dec.events()
    assert ei.value.reason == "protocol" and ei.value.errno == errno.EPROTO


def test_dropped_frame_refused() -> None:
    stream, _ = build()
    pre, frames = _frames(stream)
    del frames[3]
    dec = Decoder(PS, LAYOUT)
    dec.receive_data(pre + b"".join(frames))
    with pytest.raises(StreamError, match="expected 3"):
        dec.events()


def test_round_with_wrong_page_count_refused() -> None:
    enc = Encoder(PS, LAYOUT)
    parts = list(enc.start()) + list(enc.pages_frame([0], page(1)))
    enc.round_pages += 1  # the ROUND frame will claim a page that never came
    parts += enc.end_round()
    dec = Decoder(PS, LAYOUT)
    dec.receive_data(b"".join(bytes(p) for p in parts))
    with pytest.raises(StreamError, match="ROUND 0 with 2 pages, but round 0 carried 1"):
        dec.events()


def test_trailing_data_after_end_refused() -> None:
    stream, _ = build()
    dec = Decoder(PS, LAYOUT)
    dec.receive_data(stream + b"x")
    with pytest.raises(StreamError, match="1 bytes of trailing data"):
        dec.events()


def test_frames_before_header_refused() -> None:
    dec = Decoder()
    dec.receive_data(b"DMARWMIG\x03\x00\x00\x00" + _frame(4, 0, struct.pack("<IIQ", 0, 0, 0)))
    with pytest.raises(StreamError, match="before the HEADER frame"):
        dec.events()


def test_need_data_until_complete() -> None:
    stream, _ = build()
    dec = Decoder()
    assert dec.next_event() is NEED_DATA
    dec.receive_data(stream[:5])
    assert dec.next_event() is NEED_DATA


def test_pages_views_stay_valid_while_more_data_arrives() -> None:
    stream, _ = build()
    dec = Decoder(PS, LAYOUT)
    held: list[Pages] = []
    for i in range(0, len(stream), 3000):
        dec.receive_data(stream[i : i + 3000])
        held += [e for e in dec.events() if isinstance(e, Pages)]
    expect = [e for e in decode_all(stream) if isinstance(e, Pages)]
    assert held == expect
    assert all(bytes(e.data[:1]) * PS == bytes(e.data[:PS]) for e in held)


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 9000), min_size=1, max_size=40), hold=st.booleans())
def test_receive_into_equals_receive_data(sizes: list[int], hold: bool) -> None:
    """Input written straight into the decoder's buffer (as recv_into does, in pieces of
    any size, short writes included) decodes to the same events, and PAGES views held
    meanwhile keep their contents."""
    stream, _ = build()
    dec = Decoder(PS, LAYOUT)
    got: list[object] = []
    at = 0
    i = 0
    while at < len(stream):
        want = sizes[i % len(sizes)]
        i += 1

        def recv(room: memoryview, at: int = at, want: int = want) -> int:
            part = stream[at : at + min(want, len(room))]  # a short read may write less
            room[: len(part)] = part
            return len(part)

        at += dec.receive_into(recv, max(want, dec.wanted()))
        evs = dec.events()
        got += [e for e in evs if hold or not isinstance(e, Pages)]
        del evs
    assert dec.receive_into(lambda room: 0, 16) == 0  # end of input
    assert dec.events() == []
    expect = [e for e in decode_all(stream) if hold or not isinstance(e, Pages)]
    assert got == expect


def test_feeding_exactly_what_the_decoder_wants_gives_one_event_per_feed() -> None:
    stream, _ = build()
    dec = Decoder(PS, LAYOUT)
    at, events = 0, []
    while at < len(stream):
        n = dec.wanted()
        assert n >= 1
        dec.receive_data(stream[at : at + n])
        at += n
        got = dec.events()
        assert len(got) <= 1
        events += got
    assert events == decode_all(stream)


@settings(max_examples=60, deadline=None)
@given(st.sets(st.integers(0, 4095), max_size=300), st.integers(1, 4096))
def test_dirty_indices_equal_the_one_bitmap_decoder(pages: set[int], npages: int) -> None:
    from dmarw.bitmap import from_bytes, to_bytes
    from dmarw.migration.source import dirty_indices

    pages = {p for p in pages if p < npages}
    bm = to_bytes(pages, npages)
    assert dirty_indices(bm) == from_bytes(bm) == sorted(pages)
    assert dirty_indices(bm + b"\x81") == from_bytes(bm + b"\x81")  # a tail shorter than a word


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 63), max_size=40),
    st.sampled_from([4096, 8192, 65536]),
    st.lists(st.tuples(st.integers(0, 15), st.integers(1, 12)), min_size=1, max_size=3),
)
def test_gfns_of_hvas_are_the_guest_pages_behind_each_range(idx: list[int], size: int, slots: list[tuple[int, int]]) -> None:
    """The harvest's vectorised hva -> gfn mapping against a page-by-page model, over slots
    that may leave holes, and container pages that span several guest pages."""
    import types

    import numpy as np

    from dmarw.migration.source import Source, _Slot

    base = 0x7F0000000000
    fake = types.SimpleNamespace(slots=[
        _Slot(i, (16 * i + start) << 12, n << 12, base + ((16 * i + start) << 12) + (i << 30))
        for i, (start, n) in enumerate(slots)
    ])
    hvas = [s.hva + (k << 12) for s in fake.slots for k in idx]  # inside, past the end, between slots
    want = [(s.gpa + p - s.hva) >> 12 for h in hvas for p in range(h, h + size, 4096)
            for s in fake.slots if s.hva <= p < s.hva + s.size]
    got = Source._gfns_of_hvas(fake, np.array(hvas, dtype=np.int64), size)  # type: ignore[arg-type]
    assert sorted(got) == sorted(want)
