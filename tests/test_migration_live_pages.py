"""Pages read while the guest ran (flag ``LIVE``): a page failing its check is reported, not
refused; the destination keeps it outstanding, names it in its round acknowledgement
(``RACK``'s bitmap) until a good copy arrives, and refuses END while any is left.  Without
``LIVE``, and in any keyed stream, a failed page check refuses the stream (sans-I/O)."""

from __future__ import annotations

import errno
import hashlib
import hmac
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmarw.checksum import crc32c, crc32c_pages
from dmarw.errors import DmaError
from dmarw.migration import control
from dmarw.migration.dest import Destination
from dmarw.migration.stream import LIVE, TAG_SIZE, Decoder, Encoder, End, Layout, Pages, StreamError
from pages_stream import LAYOUT, PS, RamSink, content, pages_frame, torn

KEY = bytes(range(32))


def joined(parts: list[bytes | memoryview]) -> bytes:
    return b"".join(bytes(p) for p in parts)


def decode(stream: bytes, sink: RamSink | None = None, key: bytes | None = None) -> list[object]:
    dec = Decoder(PS, LAYOUT, key, sink=sink)
    dec.receive_data(stream)
    out: list[object] = list(dec.events())
    dec.receive_data(b"")
    return out + dec.events()


def one_frame_stream(bad: list[int], live: bool, runs: bool = False) -> tuple[bytes, list[int]]:
    gpas = [0, PS, 2 * PS, 0x100000 + 3 * PS, 9 * PS]
    enc = Encoder(PS, LAYOUT)
    pages = [content(g, 1) for g in gpas]
    parts = [*enc.start(), *pages_frame(enc, gpas, pages, bad=bad, live=live, runs=runs), *enc.end_round(), *enc.end()]
    return joined(parts), gpas


# -- the decoder ---------------------------------------------------------------------------
@pytest.mark.parametrize("runs", [False, True])
@pytest.mark.parametrize("use_sink", [False, True])
def test_live_frame_reports_the_page_whose_check_fails(use_sink: bool, runs: bool) -> None:
    stream, gpas = one_frame_stream([3], live=True, runs=runs)
    evs = decode(stream, RamSink() if use_sink else None)
    pages = [e for e in evs if isinstance(e, Pages)]
    assert len(pages) == 1
    assert pages[0].live and pages[0].bad == (gpas[3],) and tuple(pages[0].gpas) == tuple(gpas)
    assert isinstance(evs[-1], End)  # and nothing refused


def test_live_frame_lists_every_failing_page_in_frame_order() -> None:
    stream, gpas = one_frame_stream([4, 0, 2], live=True)
    (p,) = [e for e in decode(stream) if isinstance(e, Pages)]
    assert p.bad == (gpas[0], gpas[2], gpas[4])


def test_live_frame_whose_pages_all_check_reports_none() -> None:
    stream, _ = one_frame_stream([], live=True)
    (p,) = [e for e in decode(stream) if isinstance(e, Pages)]
    assert p.live and p.bad == ()


@pytest.mark.parametrize("use_sink", [False, True])
def test_the_same_frame_without_live_is_refused_naming_the_page(use_sink: bool) -> None:
    stream, gpas = one_frame_stream([3, 4], live=False)
    dec = Decoder(PS, LAYOUT, sink=RamSink() if use_sink else None)
    dec.receive_data(stream)
    with pytest.raises(StreamError, match=rf"2 page\(s\) fail their check, first gpa {gpas[3]:#x} ") as ei:
        dec.events()
    assert ei.value.reason == "corrupt" and ei.value.errno == errno.EBADMSG
    with pytest.raises(StreamError, match="fail their check"):  # and it stays failed
        dec.next_event()


def test_a_keyed_encoder_sends_no_live_frame() -> None:
    enc = Encoder(PS, LAYOUT, mac_key=KEY)
    enc.start()
    with pytest.raises(DmaError, match="keyed stream sends no LIVE frame") as ei:
        enc.pages_frame([0], content(0, 1), live=True)
    assert ei.value.errno == errno.EINVAL
    assert enc.pages == 0 and enc.seq == 1  # nothing of the refused frame was counted


def test_pages_frame_with_runs_that_split_a_page_is_einval() -> None:
    """Runs given without their checks must each be whole pages (the encoder takes one
    check per page of each run): bad input to the encoder is DmaError EINVAL like the rest."""
    enc = Encoder(PS, LAYOUT)
    enc.start()
    with pytest.raises(DmaError) as ei:
        enc.pages_frame([0, PS], [memoryview(bytes(PS + 100)), memoryview(bytes(PS - 100))])
    assert ei.value.errno == errno.EINVAL
    assert enc.pages == 0 and enc.seq == 1


def test_pages_frame_with_runs_that_split_a_page_and_their_checks_decodes() -> None:
    """With the checks given, how the contents are cut does not matter: the wire is the same."""
    enc = Encoder(PS, LAYOUT)
    pages = [content(0, 1), content(PS, 1)]
    whole = b"".join(pages)
    parts = [
        *enc.start(),
        *enc.pages_frame([0, PS], [memoryview(whole)[: PS + 100], memoryview(whole)[PS + 100 :]], crcs=crc32c_pages(whole, PS)),
        *enc.end_round(),
        *enc.end(),
    ]
    (p,) = [e for e in decode(joined(parts)) if isinstance(e, Pages)]
    assert p.data is not None and bytes(p.data) == whole and p.bad == ()


def keyed_live_stream(bad: list[int]) -> tuple[bytes, list[int]]:
    """A keyed stream whose PAGES frame is flagged LIVE by hand (the encoder refuses to):
    the flag set, the frame CRC and the tag recomputed with the key, so only the page
    checks decide."""
    gpas = [0, PS, 0x100000]
    pages = [content(g, 1) for g in gpas]
    enc = Encoder(PS, LAYOUT, mac_key=KEY)
    start = joined(enc.start())
    frame = bytearray(joined(pages_frame(enc, gpas, pages, bad=bad)))
    rest = joined([*enc.end_round(), *enc.end()])
    table = 8 + 12 * len(gpas)
    struct.pack_into("<H", frame, 2, LIVE)
    struct.pack_into("<I", frame, 12, crc32c(bytes(frame[16 : 16 + table]), crc32c(bytes(frame[:12]))))
    frame[-TAG_SIZE:] = hmac.new(KEY, bytes(frame[:-TAG_SIZE]), hashlib.sha256).digest()[:TAG_SIZE]
    return start + bytes(frame) + rest, gpas


def test_handmade_keyed_live_frame_is_well_formed() -> None:
    """The control of the next test: the hand-made frame with sound pages is accepted
    (so its flag, CRC and tag are right, and only the page check can refuse the next)."""
    stream, gpas = keyed_live_stream([])
    (p,) = [e for e in decode(stream, key=KEY) if isinstance(e, Pages)]
    assert p.live and p.bad == () and tuple(p.gpas) == tuple(gpas)


def test_keyed_decoder_refuses_a_failed_page_check_even_in_a_live_frame() -> None:
    stream, gpas = keyed_live_stream([1])
    with pytest.raises(StreamError, match=rf"1 page\(s\) fail their check, first gpa {gpas[1]:#x} ") as ei:
        decode(stream, key=KEY)
    assert ei.value.reason == "corrupt"  # the tag is sound: the page check refuses it
    d = Destination(PS, LAYOUT, mac_key=KEY)
    try:
        with pytest.raises(StreamError, match="fail their check"):
            d.feed(stream)
        assert not d.complete and d.outstanding == set() and d.error is not None
    finally:
        d.close()


# -- the destination ----------------------------------------------------------------------
DPS = 4096
DLAYOUT: Layout = ((0, 64 * DPS), (0x100000, 8 * DPS))  # 72 pages: two bitmap words


def layout_gpas(layout: Layout, ps: int) -> list[int]:
    return [g + o for g, s in layout for o in range(0, s, ps)]


def bitmap_gpas(bitmap: bytes, layout: Layout = DLAYOUT, ps: int = DPS) -> list[int]:
    """The gpas a RACK bitmap names: u64 little-endian words, bit k = the layout's k-th page."""
    assert len(bitmap) % 8 == 0
    bits = int.from_bytes(bitmap, "little")
    return [g for k, g in enumerate(layout_gpas(layout, ps)) if bits >> k & 1]


class Feeder:
    """A destination and the encoder of the stream it is fed, frame by frame."""

    def __init__(self) -> None:
        self.dest = Destination(DPS, DLAYOUT)
        self.enc = Encoder(DPS, DLAYOUT)
        self.copies = 0
        self.acks: list[tuple[int, list[int]]] = []
        self.dest.on_round = lambda rnd: self.acks.append((rnd, bitmap_gpas(self.dest.resend_bitmap())))
        self.dest.feed(joined(self.enc.start()))

    def pages(self, gpas: list[int], bad: list[int] | tuple[int, ...] = (), live: bool = True) -> list[bytes]:
        pages = []
        for g in gpas:
            self.copies += 1
            pages.append(content(g, self.copies, DPS))
        idx = [gpas.index(g) for g in bad]
        self.dest.feed(joined(pages_frame(self.enc, gpas, pages, bad=idx, live=live)))
        return pages

    def end_round(self) -> None:
        self.dest.feed(joined(self.enc.end_round()))

    def end(self) -> None:
        self.dest.feed(joined(self.enc.end()))


def test_bad_live_page_is_outstanding_until_a_good_copy_comes() -> None:
    f = Feeder()
    try:
        bad = 0x100000 + 6 * DPS  # the second region's 7th page: bit 70, in the second word
        f.pages([0x3F000, 0x100000 + 5 * DPS, bad, 0x100000 + 7 * DPS], bad=[bad])
        assert f.dest.outstanding == {bad}
        bm = f.dest.resend_bitmap()
        assert len(bm) == 16 and bitmap_gpas(bm) == [bad]
        assert bm[:8] == bytes(8) and bm[8:] == (1 << 6).to_bytes(8, "little")
        f.end_round()
        assert f.acks == [(0, [bad])]  # the round's acknowledgement names it
        f.pages([0, DPS])  # other pages, good: it stays outstanding
        assert f.dest.outstanding == {bad}
        f.end_round()
        good = f.pages([bad], live=False)
        assert f.dest.outstanding == set() and f.dest.resend_bitmap() == b""
        f.end_round()
        assert f.acks[-1] == (2, [])
        f.end()
        assert f.dest.complete and f.dest.error is None
        assert f.dest.read(bad, DPS) == good[0]
    finally:
        f.dest.close()


def test_end_with_an_outstanding_page_is_refused_naming_it() -> None:
    f = Feeder()
    try:
        bad = [0x2000, 0x100000]
        f.pages([0x1000, 0x2000, 0x100000], bad=bad)
        f.end_round()
        with pytest.raises(StreamError, match="2 page.s. failed their check while the guest ran and were not sent again: 0x2000, 0x100000$") as ei:
            f.end()
        assert ei.value.reason == "corrupt"
        assert not f.dest.complete and f.dest.error is ei.value
    finally:
        f.dest.close()


def test_end_names_at_most_eight_outstanding_pages() -> None:
    f = Feeder()
    try:
        gpas = [k * DPS for k in range(10)]
        f.pages(gpas, bad=gpas)
        f.end_round()
        with pytest.raises(StreamError, match=r"10 page.s. .* 0x0, 0x1000, .*, 0x7000, \.\.\.$"):
            f.end()
        assert bitmap_gpas(f.dest.resend_bitmap()) == gpas
    finally:
        f.dest.close()


FEW = [0, 0x3F000, 0x100000, 0x107000]  # first and last page of each region
ops_st = st.lists(
    st.tuples(
        st.lists(st.sampled_from(FEW), min_size=1, max_size=4, unique=True),  # a frame's pages
        st.sets(st.sampled_from(FEW)),  # those torn (when in the frame)
        st.booleans(),  # LIVE
        st.booleans(),  # the round ends after it
    ),
    max_size=12,
)


@settings(max_examples=60, deadline=None)
@given(ops=ops_st)
def test_outstanding_pages_follow_the_model(ops: list[tuple[list[int], set[int], bool, bool]]) -> None:
    """Model: a frame's pages leave the outstanding set, and those of them whose check
    failed (LIVE only) join it; a failed check without LIVE refuses the stream; END is
    refused while the set is not empty."""
    f = Feeder()
    model: set[int] = set()
    last: dict[int, bytes] = {}
    try:
        for gpas, torn_set, live, close in ops:
            bad = [g for g in gpas if g in torn_set]
            if bad and not live:
                with pytest.raises(StreamError, match=rf"{len(bad)} page\(s\) fail their check, first gpa {bad[0]:#x} "):
                    f.pages(gpas, bad=bad, live=False)
                assert not f.dest.complete and f.dest.error is not None
                return
            pages = f.pages(gpas, bad=bad, live=live)
            model = (model - set(gpas)) | set(bad)
            last.update(zip(gpas, pages, strict=True))
            assert f.dest.outstanding == model
            assert bitmap_gpas(f.dest.resend_bitmap()) == sorted(model)
            assert (f.dest.resend_bitmap() == b"") == (not model)
            if close:
                f.end_round()
                assert f.acks[-1][1] == sorted(model)
        if f.enc.round_pages:
            f.end_round()
        if model:
            with pytest.raises(StreamError, match=", ".join(f"{g:#x}" for g in sorted(model)) + "$"):
                f.end()
            assert not f.dest.complete
        else:
            f.end()
            assert f.dest.complete
        for g, page in last.items():
            if g not in model:
                assert f.dest.read(g, DPS) == page
    finally:
        f.dest.close()


# -- RACK ----------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(rnd=st.integers(0, 0xFFFFFFFF), words=st.binary(max_size=64).map(lambda b: b[: len(b) // 8 * 8]))
def test_rack_round_trips_through_the_reader(rnd: int, words: bytes) -> None:
    msg = control.rack(rnd, words)
    r = control.Reader()
    r.receive_data(msg)
    tag, payload = r.next_message() or (b"", b"")
    assert tag == control.RACK
    assert control.parse_rack(payload) == (rnd, words)
    assert r.next_message() is None


def test_rack_without_a_bitmap_is_the_bare_round() -> None:
    assert control.rack(7) == control.HEADER.pack(control.RACK, 4) + (7).to_bytes(4, "little")
    assert control.parse_rack((7).to_bytes(4, "little")) == (7, b"")


@pytest.mark.parametrize("n", [0, 1, 3, 5, 11, 4 + 7, 4 + 9, 4 + 15])
def test_rack_payload_not_a_round_and_whole_words_is_refused(n: int) -> None:
    with pytest.raises(control.ControlError, match=f"RACK payload of {n} bytes") as ei:
        control.parse_rack(bytes(n))
    assert ei.value.errno == errno.EBADMSG


def test_rack_refuses_to_build_a_bitmap_its_parser_refuses() -> None:
    """A bitmap that is not whole u64 words makes a RACK every receiver refuses (EBADMSG):
    the sender is told at once instead (EINVAL), as for a payload over the limit."""
    for n in (7, 9):
        with pytest.raises(control.ControlError) as ei:
            control.rack(0, bytes(n))
        assert ei.value.errno == errno.EINVAL


def test_rack_bitmap_of_the_largest_guest_fits_and_one_word_more_does_not() -> None:
    most = control.LIMITS[control.RACK] - 4
    assert control.parse_rack(control.rack(1, bytes(most))[8:]) == (1, bytes(most))
    with pytest.raises(control.ControlError, match="RACK payload") as ei:
        control.rack(1, bytes(most + 8))
    assert ei.value.errno == errno.EINVAL


def test_destination_bitmap_is_what_parse_rack_gives_back() -> None:
    f = Feeder()
    try:
        f.pages([0x5000, 0x100000 + 2 * DPS], bad=[0x100000 + 2 * DPS])
        rnd, bm = control.parse_rack(control.rack(0, f.dest.resend_bitmap())[8:])
        assert rnd == 0 and bitmap_gpas(bm) == [0x100000 + 2 * DPS]
    finally:
        f.dest.close()


def test_crcs_helper_tears_the_check_only() -> None:
    """The frames above: a torn page's contents are sent as they are; only its check was
    taken over other bytes."""
    page = content(0, 1)
    assert torn(page) != page and len(torn(page)) == len(page)
    assert crc32c_pages(torn(page), PS) != crc32c_pages(page, PS)


# -- the flag itself -----------------------------------------------------------------------
def _reflag(stream: bytes, frame_at: int, flags: int, table: int) -> bytes:
    """Set a frame's flags and recompute its CRC over the head and ``table`` payload bytes."""
    s = bytearray(stream)
    struct.pack_into("<H", s, frame_at + 2, flags)
    crc = crc32c(bytes(s[frame_at + 16 : frame_at + 16 + table]), crc32c(bytes(s[frame_at : frame_at + 12])))
    struct.pack_into("<I", s, frame_at + 12, crc)
    return bytes(s)


HEADER_END = 12 + 16 + 8 + 16 * len(LAYOUT)  # preamble, HEADER frame


@pytest.mark.parametrize("flags", [0x2, 0x8000, LIVE | 0x4])
def test_pages_frame_with_an_unknown_flag_is_refused(flags: int) -> None:
    stream, _ = one_frame_stream([], live=True)
    bad = _reflag(stream, HEADER_END, flags, 8 + 12 * 5)
    with pytest.raises(StreamError, match=f"frame at offset {HEADER_END:#x} has flags {flags:#x}") as ei:
        decode(bad)
    assert ei.value.reason == "corrupt"


def test_live_flag_on_a_round_frame_is_refused() -> None:
    stream, _ = one_frame_stream([], live=False)
    round_at = HEADER_END + 16 + 8 + 12 * 5 + 5 * PS
    assert struct.unpack_from("<H", stream, round_at)[0] == 3  # ROUND
    bad = _reflag(stream, round_at, LIVE, 8)
    with pytest.raises(StreamError, match=f"frame at offset {round_at:#x} has flags 0x1") as ei:
        decode(bad)
    assert ei.value.reason == "corrupt"


def test_live_flag_set_by_hand_on_a_sound_frame_changes_nothing_but_the_event() -> None:
    strict, _ = one_frame_stream([], live=False)
    live, _ = one_frame_stream([], live=True)
    assert _reflag(strict, HEADER_END, LIVE, 8 + 12 * 5) == live  # the flag is the only difference
    a, b = decode(strict), decode(live)
    assert [type(e) for e in a] == [type(e) for e in b]
    pa, pb = (next(e for e in evs if isinstance(e, Pages)) for evs in (a, b))
    assert (pa.live, pb.live) == (False, True) and pa.data == pb.data and pa.bad == pb.bad == ()
