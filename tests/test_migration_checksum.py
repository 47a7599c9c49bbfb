"""The stream's check, CRC32C: known vectors, and the native core against the Python
reference for random data, lengths, offsets, start values and chaining."""

from __future__ import annotations

import mmap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmarw import checksum
from dmarw.checksum import crc32c_python
from dmarw.core import native_available

needs_native = pytest.mark.skipif(not native_available(), reason="dmarw._native is not built")

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
@settings(max_examples=300, deadline=None)
@given(
    data=st.binary(max_size=20000),
    offset=st.integers(0, 15),
    start=st.integers(0, 0xFFFFFFFF),
    cut=st.integers(0, 20000),
)
def test_native_equals_python(data: bytes, offset: int, start: int, cut: int) -> None:
    from dmarw import _native

    view = memoryview(data)[min(offset, len(data)):]  # unaligned starts
    want = crc32c_python(view, start)
    assert _native.crc32c(view, start) == want
    assert _native.crc32c_portable(view, start) == want
    cut = min(cut, len(view))
    assert _native.crc32c(view[cut:], _native.crc32c(view[:cut], start)) == want


@needs_native
def test_large_buffer_lanes_and_mmap() -> None:
    """Lengths around the 3-lane blocks (3 x 32 KiB, 3 x 2 KiB) and above the GIL threshold, read
    straight from an mmap, as the sender reads guest RAM."""
    from dmarw import _native

    m = mmap.mmap(-1, 1 << 20)
    for i in range(0, 1 << 20, 4093):
        m[i] = (i * 7) & 0xFF
    view = memoryview(m)
    for n in (6143, 6144, 6145, 12288 + 13, 65536, 98303, 98304, 98305, 98304 + 6144 + 5, (1 << 20) - 3):
        for off in (0, 1, 7):
            part = view[off : off + n]
            assert _native.crc32c(part) == _native.crc32c_portable(part)
            part.release()
    assert _native.crc32c(view[: 1 << 18]) == crc32c_python(view[: 1 << 18])
    with pytest.raises(BufferError):
        _native.crc32c(view[::2])
    view.release()
    m.close()
