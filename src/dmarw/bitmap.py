"""Dirty bitmaps: a real one while tracking, a no-op one when tracking is off.

The hot path always calls ``dirty.mark(first, last)``; whether anything is recorded is the
object's business, not an ``if tracking:`` in the caller.

Atomicity (the Python core): ``set.update`` over a ``range`` and ``set.difference_update``
with a set of ints run entirely in C while holding the GIL, so a mark is never torn and a
get-and-clear removes exactly the pages it reports: a bit set by a write that completed is
either in the reported set or still in the bitmap, never lost.

Layout of the bytes handed out (both logs): one bit per page, bit k = page k of the window,
least significant bit first in little-endian u64 words (byte k//8, bit k%8), length
``ceil(npages/64)*8`` bytes.
"""

from __future__ import annotations

from collections.abc import Iterable


class DirtyBitmap:
    """Dirty pages of one mapping or memslot, as page indices relative to its start."""

    __slots__ = ("_pages",)
    tracking = True

    def __init__(self, pages: Iterable[int] = ()) -> None:
        self._pages: set[int] = set(pages)

    def mark(self, first: int, last: int) -> None:
        """Mark pages ``first`` through ``last`` inclusive."""
        self._pages.update(range(first, last + 1))

    def take(self, keep: Iterable[int] = ()) -> set[int]:
        """Get and clear; pages in ``keep`` (the pinned ones) are set again afterwards."""
        pages = self._pages.copy()
        self._pages.difference_update(pages)
        keep = list(keep)
        if keep:
            self._pages.update(keep)
            pages.update(keep)
        return pages

    def take_bytes(self, npages: int, keep: Iterable[int] = ()) -> bytes:
        """:meth:`take` in the kernel's layout for a window of ``npages`` pages."""
        return to_bytes(self.take(keep), npages)

    def peek(self) -> set[int]:
        return self._pages.copy()


class NoDirty:
    """The bitmap object used when tracking is off: marks are dropped."""

    __slots__ = ()
    tracking = False

    def mark(self, first: int, last: int) -> None:
        pass

    def take(self, keep: Iterable[int] = ()) -> set[int]:
        return set()

    def take_bytes(self, npages: int, keep: Iterable[int] = ()) -> bytes:
        return bytes(bitmap_bytes(npages))

    def peek(self) -> set[int]:
        return set()


NO_DIRTY = NoDirty()


def bitmap_bytes(npages: int) -> int:
    """Length of a bitmap covering ``npages`` pages: whole u64 words."""
    return (npages + 63) // 64 * 8


def to_bytes(pages: Iterable[int], npages: int, base: int = 0) -> bytes:
    """Encode page indices (``base + k`` → bit k) in the kernel's layout."""
    out = bytearray(bitmap_bytes(npages))
    set_bits(out, pages, base)
    return bytes(out)


def set_bits(out: bytearray, pages: Iterable[int], base: int = 0) -> None:
    """OR pages into an existing bitmap buffer."""
    for p in pages:
        k = p + base
        out[k >> 3] |= 1 << (k & 7)


def from_bytes(bitmap: bytes) -> list[int]:
    """Decode a bitmap to the sorted list of set bit indices (zero bytes skipped: linear)."""
    out: list[int] = []
    for i, byte in enumerate(bitmap):
        if byte:
            base = i << 3
            out.extend(base + bit for bit in range(8) if byte >> bit & 1)
    return out
