"""The stream's check, CRC32C: known vectors, and the native core against the Python
reference for random data, lengths, offsets, start values and chaining, run the native
core's every way this CPU has (folded by carry-less multiplies, SSE4.2 lanes, table)."""

from __future__ import annotations

import mmap
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmarw import checksum
from dmarw.checksum import crc32c_python
from dmarw.core import native_available

needs_native = pytest.mark.skipif(not native_available(), reason="dmarw._native is not built")


def _native_ways() -> list[str]:
    if not native_available():
        return ["table"]
    from dmarw import _native

    out = []
    for name in ("table", "sse4.2", "vpclmulqdq"):
        try:
            _native.crc32c_select(_native.crc32c_select(name))
        except ValueError:  # this CPU lacks it
            continue
        out.append(name)
    return out


@pytest.fixture(params=_native_ways())
def way(request: pytest.FixtureRequest) -> Iterator[str]:
    """The native crc32c and crc32c_pages run ``request.param``'s way for the test."""
    if not native_available():
        pytest.skip("dmarw._native is not built")
    from dmarw import _native

    was = _native.crc32c_select(request.param)
    try:
        yield request.param
    finally:
        _native.crc32c_select(was)

# (data, CRC32C): RFC 3720 B.4 and the usual check value
VECTORS = [
    (b"", 0x00000000),
    (b"123456789", 0xE3069283),
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
]


def _impls() -> list[object]:
    out: list[object] = [crc32c_python]
    if native_available():
        from dmarw import _native

        out += [_native.crc32c, _native.crc32c_portable]
    return out


@pytest.mark.parametrize("fn", _impls())
@pytest.mark.parametrize(("data", "want"), VECTORS)
def test_known_vectors(fn, data: bytes, want: int) -> None:  # type: ignore[no-untyped-def]
    assert fn(data) == want
    assert fn(bytearray(data)) == want
    assert fn(memoryview(data)) == want


@pytest.mark.parametrize("fn", _impls())
def test_chaining_and_bad_start(fn) -> None:  # type: ignore[no-untyped-def]
    assert fn(b"56789", fn(b"1234")) == 0xE3069283
    with pytest.raises(OverflowError):
        fn(b"x", 1 << 32)


def test_picked_one_names_itself() -> None:
    assert checksum.crc32c(b"123456789") == 0xE3069283
    assert checksum.IMPL == ("python" if not native_available() else checksum.IMPL)
    assert checksum.IMPL.split()[0] in ("native", "python")


@needs_native
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.binary(max_size=20000),
    offset=st.integers(0, 15),
    start=st.integers(0, 0xFFFFFFFF),
    cut=st.integers(0, 20000),
)
def test_native_equals_python(way: str, data: bytes, offset: int, start: int, cut: int) -> None:
    from dmarw import _native

    view = memoryview(data)[min(offset, len(data)):]  # unaligned starts
    want = crc32c_python(view, start)
    assert _native.crc32c(view, start) == want
    assert _native.crc32c_portable(view, start) == want
    cut = min(cut, len(view))
    assert _native.crc32c(view[cut:], _native.crc32c(view[:cut], start)) == want


@needs_native
def test_large_buffer_lanes_and_mmap(way: str) -> None:
    """Lengths around the 3-lane blocks (3 x 32 KiB, 3 x 2 KiB), around the folding steps (256,
    64 and 16 bytes) and above the GIL threshold, read straight from an mmap, as the sender
    reads guest RAM."""
    from dmarw import _native

    m = mmap.mmap(-1, 1 << 20)
    for i in range(0, 1 << 20, 4093):
        m[i] = (i * 7) & 0xFF
    view = memoryview(m)
    folds = [255, 256, 257, 271, 272, 319, 320, 511, 512, 512 + 64 + 16 + 15, 4096]
    for n in (*folds, 6143, 6144, 6145, 12288 + 13, 65536, 98303, 98304, 98305, 98304 + 6144 + 5, (1 << 20) - 3):
        for off in (0, 1, 7):
            part = view[off : off + n]
            assert _native.crc32c(part) == _native.crc32c_portable(part)
            part.release()
    assert _native.crc32c(view[: 1 << 18]) == crc32c_python(view[: 1 << 18])
    with pytest.raises(BufferError):
        _native.crc32c(view[::2])
    view.release()
    m.close()


# -- one CRC32C per page ----------------------------------------------------------------------
def _pages_impls() -> list[object]:
    out: list[object] = [checksum.crc32c_pages_python]
    if native_available():
        from dmarw import _native

        out.append(_native.crc32c_pages)
    return out


@needs_native
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    page_size=st.one_of(st.sampled_from([8, 256, 512, 4096]), st.integers(1, 700)),
    npages=st.integers(0, 10),
    offset=st.integers(0, 15),
    seed=st.binary(min_size=1, max_size=64),
)
def test_crc32c_pages_native_equals_python(way: str, page_size: int, npages: int, offset: int, seed: bytes) -> None:
    """Page sizes that are and are not multiples of 8 (the three-lane loop and the tail),
    below and above the folding's 256 bytes, page counts around multiples of 3, unaligned
    starts."""
    from dmarw import _native

    raw = (seed * (offset + page_size * npages // len(seed) + 1))[: offset + page_size * npages]
    view = memoryview(raw)[offset:]
    want = checksum.crc32c_pages_python(view, page_size)
    assert _native.crc32c_pages(view, page_size) == want
    assert len(want) == 4 * npages
    for i in range(npages):  # each u32 is the CRC32C of that page alone
        page = view[i * page_size : (i + 1) * page_size]
        assert int.from_bytes(want[4 * i : 4 * i + 4], "little") == crc32c_python(page)


@pytest.mark.parametrize("fn", _pages_impls())
def test_crc32c_pages_of_guest_ram_sized_buffers(fn) -> None:  # type: ignore[no-untyped-def]
    """4 KiB pages of an mmap (as the source reads RAM), enough to release the GIL; a page
    changed changes its own CRC only."""
    m = mmap.mmap(-1, 64 * 4096)
    for i in range(0, len(m), 997):
        m[i] = (i * 13) & 0xFF
    view = memoryview(m)
    crcs = fn(view, 4096)
    assert [int.from_bytes(crcs[i : i + 4], "little") for i in range(0, len(crcs), 4)] == [
        checksum.crc32c(view[o : o + 4096]) for o in range(0, len(m), 4096)
    ]
    m[5 * 4096 + 17] ^= 0xFF
    again = fn(view, 4096)
    differ = [i for i in range(64) if again[4 * i : 4 * i + 4] != crcs[4 * i : 4 * i + 4]]
    assert differ == [5]
    view.release()
    m.close()


@pytest.mark.parametrize("fn", _pages_impls())
@pytest.mark.parametrize(("length", "page_size"), [(4095, 4096), (4097, 4096), (8192 + 512, 4096), (10, 3), (1, 0), (0, 0), (8, -8)])
def test_crc32c_pages_refuses_a_partial_page(fn, length: int, page_size: int) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="not a whole number of"):
        fn(bytes(length), page_size)


@pytest.mark.parametrize("fn", _pages_impls())
def test_crc32c_pages_of_nothing_is_empty(fn) -> None:  # type: ignore[no-untyped-def]
    assert fn(b"", 4096) == b""
    assert fn(b"123456789", 9) == (0xE3069283).to_bytes(4, "little")


def test_the_best_way_is_picked_and_an_unknown_one_refused() -> None:
    ways = _native_ways()
    if not native_available():
        pytest.skip("dmarw._native is not built")
    from dmarw import _native

    assert _native.crc32c_impl() == ways[-1]
    assert checksum.IMPL == f"native {ways[-1]}"
    with pytest.raises(ValueError, match="not one of this CPU's"):
        _native.crc32c_select("avx1024")
    assert _native.crc32c_impl() == ways[-1]


def test_crc32c_pages_picked_one_is_the_native_when_built() -> None:
    if native_available():
        from dmarw import _native

        assert checksum.crc32c_pages is _native.crc32c_pages
    else:
        assert checksum.crc32c_pages is checksum.crc32c_pages_python
