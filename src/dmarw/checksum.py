"""CRC32C (Castagnoli), the check of the migration stream, on both cores.

``crc32c(data, value=0)`` is the standard CRC32C (reflected polynomial 0x82F63B78, initial
and final inversion), chainable like ``zlib.crc32``: ``crc32c(b, crc32c(a)) ==
crc32c(a + b)``.  It is the native core's ``_native.crc32c`` (SSE4.2, memory speed, GIL
released for large buffers) when that is built, else :func:`crc32c_python`, a table-driven
reference that is correct and slow (a few MB/s).  Both give the same value for the same
bytes, so a stream written by one core is read by the other.  ``crc32c_pages(data,
page_size)`` gives one CRC32C per page as little-endian u32s (the stream's per-page check;
natively three pages at once).  No lock: pure functions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .core import native_available

POLY = 0x82F63B78


def _table() -> tuple[int, ...]:
    out = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ (POLY if c & 1 else 0)
        out.append(c)
    return tuple(out)


_TABLE = _table()


def crc32c_python(data: Any, value: int = 0) -> int:
    """CRC32C of the bytes of ``data`` (any contiguous buffer), chained from ``value``."""
    if not 0 <= value <= 0xFFFFFFFF:
        raise OverflowError("crc32c value must be in 0..0xffffffff")
    t = _TABLE
    c = value ^ 0xFFFFFFFF
    for b in memoryview(data).cast("B"):
        c = t[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def crc32c_pages_python(data: Any, page_size: int) -> bytes:
    """The CRC32C of each ``page_size`` page of ``data``, as little-endian u32s."""
    mv = memoryview(data).cast("B")
    if page_size <= 0 or len(mv) % page_size:
        raise ValueError(f"crc32c_pages: {len(mv)} bytes are not a whole number of {page_size}-byte pages")
    return b"".join(crc32c_python(mv[o : o + page_size]).to_bytes(4, "little") for o in range(0, len(mv), page_size))


def _pick() -> tuple[Callable[..., int], str]:
    if native_available():
        from . import _native

        return _native.crc32c, "native " + _native.crc32c_impl()
    return crc32c_python, "python"


crc32c, IMPL = _pick()
crc32c_pages: Callable[[Any, int], bytes] = crc32c_pages_python
if native_available():
    from . import _native

    crc32c_pages = _native.crc32c_pages
"""``crc32c(data, value=0) -> int``; ``IMPL`` says which one runs ("native sse4.2", "native
table" or "python")."""
