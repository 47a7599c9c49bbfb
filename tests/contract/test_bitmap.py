"""Dirty bitmaps: one generic suite over every implementation, plus the byte layout.

Like vm-memory's ``Bitmap`` tests, the same checks run against every implementation (the
``make_bitmap`` fixture: :class:`DirtyBitmap`, :class:`NoDirty` and its shared instance, the
native core's atomic bitmap) and say, per implementation, what it must record: a tracking
bitmap records, :class:`NoDirty` (tracking off) records nothing and never fails.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import BITMAP_KINDS, NATIVE_MISSING, TRACKING_BITMAP_KINDS, new_bitmap
from dmarw import bitmap_pages
from dmarw.bitmap import (
    NO_DIRTY,
    DirtyBitmap,
    NoDirty,
    bitmap_bytes,
    from_bytes,
    set_bits,
    to_bytes,
)

Factory = Callable[[], DirtyBitmap | NoDirty]


def _records(b: DirtyBitmap | NoDirty, pages: set[int]) -> set[int]:
    """What ``b`` must report for ``pages``: all of them if it tracks, none otherwise."""
    return set(pages) if b.tracking else set()


def test_new_bitmap_is_clean(make_bitmap: Factory) -> None:
    b = make_bitmap()
    assert b.peek() == set()
    assert b.take() == set()


@pytest.mark.parametrize(
    "bitmap_kind",
    [
        *BITMAP_KINDS[:3],
        pytest.param(
            "native",
            marks=[
                pytest.mark.skipif(NATIVE_MISSING is not None, reason=str(NATIVE_MISSING)),
                pytest.mark.xfail(
                    strict=True,
                    raises=ValueError,
                    reason="NativeDirtyBitmap.mark(5, 4) raises ValueError ('outside 32768 "
                    "bits') where the other bitmaps mark nothing for an empty range",
                ),
            ],
        ),
    ],
)
def test_mark_is_inclusive(make_bitmap: Factory) -> None:
    b = make_bitmap()
    b.mark(3, 5)
    b.mark(9, 9)
    assert b.peek() == _records(b, {3, 4, 5, 9})
    b.mark(5, 4)  # an empty range marks nothing
    assert b.peek() == _records(b, {3, 4, 5, 9})


def test_take_clears(make_bitmap: Factory) -> None:
    b = make_bitmap()
    b.mark(0, 1)
    assert b.take() == _records(b, {0, 1})
    assert b.take() == set()
    assert b.peek() == set()


def test_take_keeps_pinned_pages(make_bitmap: Factory) -> None:
    b = make_bitmap()
    b.mark(1, 2)
    assert b.take(keep=[7, 2]) == _records(b, {1, 2, 7})
    assert b.peek() == _records(b, {2, 7})  # set again for the next get
    assert b.take(keep=iter([7])) == _records(b, {2, 7})
    assert b.take() == _records(b, {7})
    assert b.take() == set()


def test_peek_does_not_clear(make_bitmap: Factory) -> None:
    b = make_bitmap()
    b.mark(4, 4)
    assert b.peek() == b.peek() == _records(b, {4})
    got = b.peek()
    got.add(99)  # a copy, not the bitmap itself
    assert b.peek() == _records(b, {4})


def test_dirty_bitmap_initial_pages() -> None:
    assert DirtyBitmap([1, 5]).peek() == {1, 5}
    assert DirtyBitmap().tracking is True
    assert NoDirty().tracking is False and NO_DIRTY.tracking is False


@pytest.mark.parametrize("bitmap_kind", TRACKING_BITMAP_KINDS)
def test_tracking_bitmap_initial_pages(bitmap_kind: str) -> None:
    b = new_bitmap(bitmap_kind, [1, 5])
    assert b.tracking is True
    assert b.peek() == {1, 5}
    assert b.take() == {1, 5} and b.peek() == set()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 8), st.booleans()), max_size=30))
def test_matches_a_set(make_bitmap: Factory, ops: list[tuple[int, int, bool]]) -> None:
    b = make_bitmap()
    model: set[int] = set()
    for first, n, take in ops:
        if take:
            keep = {first, first + n}
            assert b.take(keep) == _records(b, model | keep)
            model = keep
        else:
            b.mark(first, first + n)
            model.update(range(first, first + n + 1))
        assert b.peek() == _records(b, model)


@pytest.mark.parametrize("bitmap_kind", TRACKING_BITMAP_KINDS)
def test_no_mark_lost_by_concurrent_take(make_bitmap: Factory) -> None:
    b = make_bitmap()
    taken: set[int] = set()
    done = threading.Event()

    def marker(base: int) -> None:
        for i in range(3000):
            b.mark(base + i, base + i)

    def taker() -> None:
        while not done.is_set():
            taken.update(b.take())

    t = threading.Thread(target=taker)
    t.start()
    markers = [threading.Thread(target=marker, args=(k * 10000,)) for k in range(3)]
    for m in markers:
        m.start()
    for m in markers:
        m.join()
    done.set()
    t.join()
    taken.update(b.take())
    assert taken == {k * 10000 + i for k in range(3) for i in range(3000)}


# -- byte layout ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("npages", "nbytes"), [(0, 0), (1, 8), (63, 8), (64, 8), (65, 16), (128, 16), (129, 24)]
)
def test_bitmap_bytes_is_whole_u64_words(npages: int, nbytes: int) -> None:
    assert bitmap_bytes(npages) == nbytes
    assert len(to_bytes([], npages)) == nbytes


def test_layout_lsb_first_in_little_endian_words() -> None:
    pages = [0, 7, 8, 63, 64, 100, 129]
    bm = to_bytes(pages, 130)
    assert len(bm) == 24
    for k in range(130):
        assert bool(bm[k // 8] >> (k % 8) & 1) == (k in pages)
    words = struct.unpack("<3Q", bm)
    for k in range(130):
        assert bool(words[k // 64] >> (k % 64) & 1) == (k in pages)
    assert bm[0] == 0x81 and bm[1] == 0x01 and bm[7] == 0x80


def test_to_bytes_with_base() -> None:
    assert to_bytes([0, 1], 16, base=3) == bytes([0b11000]) + bytes(7)


def test_set_bits_ors_into_a_buffer() -> None:
    out = bytearray(to_bytes([1], 64))
    set_bits(out, [0, 1], base=8)
    assert from_bytes(bytes(out)) == [1, 8, 9]


def test_from_bytes_decodes_sorted_indices() -> None:
    assert from_bytes(b"") == []
    assert from_bytes(bytes(16)) == []
    assert from_bytes(b"\x05" + bytes(6) + b"\x80") == [0, 2, 63]
    assert bitmap_pages is from_bytes


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 300).flatmap(lambda n: st.tuples(st.just(n), st.sets(st.integers(0, max(n - 1, 0))))))
def test_round_trip(case: tuple[int, set[int]]) -> None:
    npages, pages = case
    pages = {p for p in pages if p < npages}
    bm = to_bytes(pages, npages)
    assert len(bm) == (npages + 63) // 64 * 8
    assert from_bytes(bm) == sorted(pages)
