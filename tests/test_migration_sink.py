"""Page contents received straight into the receiver's memory (a decoder's ``sink``): for any
stream, any way of cutting it and any sizes ``recv_into`` writes, the events are those of a
decoder without a sink (``data`` None instead of the frame's buffer), and the sink's memory
ends up with the last copy of every page sent and nothing else changed (sans-I/O)."""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmarw.errors import DmaError
from dmarw.migration.stream import TAG_SIZE, Decoder, Encoder, Event, Pages, StreamError
from pages_stream import FILL, GPAS, LAYOUT, PS, RamSink, content, pages_frame

Frame = tuple[list[int], bool, bool, set[int]]  # gpas, live, runs, indices torn

frames_st = st.lists(  # rounds
    st.lists(  # frames of a round
        st.tuples(
            st.lists(st.sampled_from(GPAS), min_size=1, max_size=10, unique=True),  # any order
            st.booleans(),  # LIVE
            st.booleans(),  # data as one buffer per page
            st.sets(st.integers(0, 9), max_size=2),  # pages torn (LIVE frames only)
        ),
        max_size=5,
    ),
    min_size=1,
    max_size=4,
)


@dataclasses.dataclass
class Built:
    stream: bytes
    copies: list[list[bytes]]  # the page contents of each PAGES frame, in order
    final: dict[int, bytes]  # the last copy of each gpa sent
    bad: list[tuple[int, ...]]  # the gpas of each PAGES frame whose check fails


KEY = bytes(range(32))


def build(rounds: list[list[Frame]], key: bytes | None = None) -> Built:
    """The stream of ``rounds``; keyed, every frame is sent strict (no LIVE, no tear)."""
    enc = Encoder(PS, LAYOUT, key)
    parts: list[bytes | memoryview] = [*enc.start()]
    copies: list[list[bytes]] = []
    final: dict[int, bytes] = {}
    bads: list[tuple[int, ...]] = []
    n = 0
    for frames in rounds:
        for gpas, live_asked, runs, torn_at in frames:
            live = live_asked and key is None
            pages = []
            for g in gpas:
                n += 1
                pages.append(content(g, n))
                final[g] = pages[-1]
            bad = {i for i in torn_at if i < len(gpas)} if live else set()
            parts += pages_frame(enc, gpas, pages, bad=sorted(bad), live=live, runs=runs)
            copies.append(pages)
            bads.append(tuple(g for i, g in enumerate(gpas) if i in bad))
        parts += enc.end_round()
    parts += enc.state_frame("vcpu0", b"regs")
    parts += enc.end()
    return Built(b"".join(bytes(p) for p in parts), copies, final, bads)


def strip(events: list[Event]) -> list[Event]:
    return [dataclasses.replace(e, data=None) if isinstance(e, Pages) else e for e in events]


def by_cuts(stream: bytes, cuts: list[int], sink: RamSink | None, key: bytes | None = None) -> list[Event]:
    dec = Decoder(PS, LAYOUT, key, sink=sink)
    out: list[Event] = []
    at = 0
    for c in [*sorted(cuts), len(stream)]:
        dec.receive_data(stream[at:c])  # an empty piece would mean end of input: none here
        at = c
        out += dec.events()
    dec.receive_data(b"")
    out += dec.events()
    assert dec.ended
    return out


def by_recv_into(stream: bytes, sizes: list[int], ns: list[int], sink: RamSink | None, key: bytes | None = None) -> list[Event]:
    """``recv`` writes at most ``sizes[i]`` bytes (a short read) into the room the decoder
    gives, which is at most ``ns[i]`` bytes."""
    dec = Decoder(PS, LAYOUT, key, sink=sink)
    out: list[Event] = []
    at = 0
    i = 0
    while at < len(stream):
        cap, n = sizes[i % len(sizes)], ns[i % len(ns)]
        i += 1

        def recv(room: memoryview, at: int = at, cap: int = cap) -> int:
            part = stream[at : at + min(cap, len(room))]
            room[: len(part)] = part
            return len(part)

        got = dec.receive_into(recv, n)
        assert 0 < got <= min(cap, n)
        at += got
        out += dec.events()
    assert dec.receive_into(lambda room: 0, 16) == 0
    out += dec.events()
    assert dec.ended
    return out


def frame_ends(stream: bytes, key: bytes | None) -> list[int]:
    """The stream offset just after the preamble and after each frame."""
    ends = [12]
    while ends[-1] < len(stream):
        (length,) = struct.unpack_from("<I", stream, ends[-1] + 8)
        ends.append(ends[-1] + 16 + length + (TAG_SIZE if key is not None else 0))
    assert ends[-1] == len(stream)
    return ends


def by_wanted(stream: bytes, sink: RamSink | None, key: bytes | None = None) -> list[Event]:
    """A receiver that waits for exactly ``wanted()`` bytes (MSG_WAITALL) at each step: it
    must never be told to wait past the end of the frame it is in (the source may send
    nothing more until it has the destination's answer to that frame: a ROUND's RACK)."""
    dec = Decoder(PS, LAYOUT, key, sink=sink)
    ends = frame_ends(stream, key)
    out: list[Event] = []
    at = 0
    while at < len(stream):
        n = dec.wanted()
        end = next(e for e in ends if e > at)
        assert 1 <= n <= end - at, (at, n, end)

        def recv(room: memoryview, at: int = at) -> int:
            room[:] = stream[at : at + len(room)]
            return len(room)

        at += dec.receive_into(recv, n)
        out += dec.events()
        # every frame received whole has given its event (a ROUND's: the RACK goes out now)
        assert len(out) == sum(1 for e in ends[1:] if e <= at), (at, out[-1:])
    assert dec.ended
    return out


def check_sink(sink: RamSink, built: Built) -> None:
    for g in GPAS:
        want = built.final.get(g, bytes([FILL]) * PS)  # a page never sent: untouched
        assert sink.page(g) == want, hex(g)
    for gpa, n in sink.calls:
        assert n > 0 and n % PS == 0 and gpa % PS == 0


def check_plain(events: list[Event], built: Built) -> None:
    """Without a sink, each PAGES event holds its frame's contents, read-only."""
    pages = [e for e in events if isinstance(e, Pages)]
    assert len(pages) == len(built.copies)
    for e, copies, bad in zip(pages, built.copies, built.bad, strict=True):
        assert e.data is not None and e.data.readonly
        assert bytes(e.data) == b"".join(copies)
        assert e.bad == bad


@settings(max_examples=60, deadline=None)
@given(rounds=frames_st, data=st.data())
def test_sink_gets_the_events_and_the_last_copy_of_every_page(rounds: list[list[Frame]], data: st.DataObject) -> None:
    built = build(rounds)
    cuts = data.draw(st.lists(st.integers(1, len(built.stream) - 1), max_size=12, unique=True))
    plain = by_cuts(built.stream, cuts, None)
    check_plain(plain, built)
    want = strip(plain)
    sink = RamSink()
    got = by_cuts(built.stream, cuts, sink)
    assert all(e.data is None for e in got if isinstance(e, Pages))
    assert got == want
    check_sink(sink, built)
    assert by_cuts(built.stream, [], None) == plain  # the cuts change nothing without a sink either


@settings(max_examples=60, deadline=None)
@given(
    rounds=frames_st,
    sizes=st.lists(st.integers(1, 3 * PS), min_size=1, max_size=20),
    ns=st.lists(st.integers(1, 4 * PS), min_size=1, max_size=20),
    use_sink=st.booleans(),
    keyed=st.booleans(),
)
def test_receive_into_equals_receive_data_with_and_without_a_sink(
    rounds: list[list[Frame]], sizes: list[int], ns: list[int], use_sink: bool, keyed: bool
) -> None:
    key = KEY if keyed else None
    built = build(rounds, key)
    sink = RamSink() if use_sink else None
    got = by_recv_into(built.stream, sizes, ns, sink, key)
    want = by_cuts(built.stream, [], None, key)
    if sink is None:
        assert got == want
    else:
        assert got == strip(want)
        check_sink(sink, built)


@settings(max_examples=40, deadline=None)
@given(rounds=frames_st, use_sink=st.booleans(), keyed=st.booleans())
def test_waiting_for_what_the_decoder_wants_never_waits_past_the_frame(rounds: list[list[Frame]], use_sink: bool, keyed: bool) -> None:
    key = KEY if keyed else None
    built = build(rounds, key)
    sink = RamSink() if use_sink else None
    got = by_wanted(built.stream, sink, key)
    want = by_cuts(built.stream, [], None, key)
    assert got == (strip(want) if sink is not None else want)
    if sink is not None:
        check_sink(sink, built)


def _one_frame_stream() -> bytes:
    enc = Encoder(PS, LAYOUT)
    parts = [*enc.start(), *enc.pages_frame([0, PS, 2 * PS], b"".join(content(g, 1) for g in (0, PS, 2 * PS)))]
    return b"".join(bytes(p) for p in parts)


@pytest.mark.parametrize(
    ("bad_sink", "match"),
    [
        (lambda gpa, n: memoryview(bytearray(n - 1)), "gave 1535 bytes"),
        (lambda gpa, n: memoryview(bytes(n)), "readonly True"),
    ],
)
def test_a_sink_giving_the_wrong_memory_is_refused(bad_sink: Callable[[int, int], memoryview], match: str) -> None:
    dec = Decoder(PS, LAYOUT, sink=bad_sink)
    with pytest.raises(DmaError, match=match):
        dec.receive_data(_one_frame_stream())
        dec.events()


def test_release_drops_the_sink_views_of_a_frame_cut_short() -> None:
    """A frame cut in its contents holds views of the sink's memory until ``release()``;
    the cut itself is refused as truncated, naming how much arrived."""
    stream = _one_frame_stream()
    ram = bytearray(3 * PS)
    held: list[memoryview] = []

    def sink(gpa: int, n: int) -> memoryview:
        v = memoryview(ram)[gpa : gpa + n]
        held.append(v)
        return v

    dec = Decoder(PS, LAYOUT, sink=sink)
    dec.receive_data(stream[:-PS])  # two of the three pages
    assert [type(e).__name__ for e in dec.events()] == ["Header"]
    with pytest.raises(BufferError):
        ram.append(0)  # the sink's memory is held by the frame being filled
    dec.receive_data(b"")
    with pytest.raises(StreamError, match=f"{2 * PS} of {3 * PS} bytes of page contents") as ei:
        dec.events()
    assert ei.value.reason == "truncated"
    dec.release()
    for v in held:  # released: the views can no longer reach the memory
        with pytest.raises(ValueError):
            v.tobytes()
    held.clear()
    ram.append(0)  # nothing holds it any more
    assert bytes(ram[: 2 * PS]) == content(0, 1) + content(PS, 1)


def _decode_or_error(stream: bytes, sink: RamSink | None) -> list[Event] | tuple[str, str]:
    try:
        return by_cuts(stream, [], sink)
    except StreamError as e:
        return (e.reason, str(e))


def test_a_frame_repeating_a_gpa_is_refused_alike_with_and_without_a_sink() -> None:
    """Each gpa once per PAGES frame: received into RAM, a second copy would overwrite the
    first before the first was checked.  With or without a sink the decoder refuses it,
    naming the gpa, before any of its contents reach the sink."""
    enc = Encoder(PS, LAYOUT)
    first, second = content(PS, 1), content(PS, 2)
    parts = [*enc.start(), *enc.pages_frame([0, PS, PS], content(0, 1) + first + second), *enc.end_round(), *enc.end()]
    stream = b"".join(bytes(p) for p in parts)
    plain = _decode_or_error(stream, None)
    sink = RamSink()
    got = _decode_or_error(stream, sink)
    assert got == plain
    assert isinstance(got, tuple) and got[0] == "corrupt" and f"page gpa {PS:#x} appears twice in one frame" in got[1]
    assert sink.calls == [] and sink.page(0) == bytes([FILL]) * PS
