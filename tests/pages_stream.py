"""Stream pieces for the per-page check tests: a small layout, page contents that say which
copy they are, a sink over RAM of its own, and a PAGES frame whose page checks were taken
over other bytes (a page torn while it was read)."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from dmarw.checksum import crc32c_pages
from dmarw.migration import source
from dmarw.migration.stream import Encoder, Layout

PS = 512  # the smallest page the stream allows: many pages, little data
# two adjacent regions (a run must still stop at their boundary) and one far away
LAYOUT: Layout = ((0, 8 * PS), (8 * PS, 8 * PS), (0x100000, 8 * PS))
GPAS = [g + o for g, s in LAYOUT for o in range(0, s, PS)]
FILL = 0xA5  # what the sink's RAM holds before any page arrives


def content(gpa: int, copy: int, page_size: int = PS) -> bytes:
    """One page: the copy number and the gpa, over and over (every copy differs)."""
    return struct.pack("<QQ", copy, gpa) * (page_size // 16)


def torn(page: bytes) -> bytes:
    """The same page with one byte changed: what the guest wrote while it was read."""
    return page[:100] + bytes([page[100] ^ 0x5A]) + page[101:]


class RamSink:
    """RAM of its own, one buffer per region; ``__call__`` is a stream sink over it."""

    def __init__(self, layout: Layout = LAYOUT) -> None:
        self.layout = layout
        self.ram = [bytearray([FILL]) * s for _, s in layout]
        self.calls: list[tuple[int, int]] = []

    def __call__(self, gpa: int, n: int) -> memoryview:
        self.calls.append((gpa, n))
        for (g, s), buf in zip(self.layout, self.ram, strict=True):
            if g <= gpa and gpa + n <= g + s:
                return memoryview(buf)[gpa - g : gpa - g + n]
        raise AssertionError(f"sink asked for {gpa:#x}+{n:#x}, not inside one region")

    def page(self, gpa: int) -> bytes:
        for (g, s), buf in zip(self.layout, self.ram, strict=True):
            if g <= gpa < g + s:
                return bytes(buf[gpa - g : gpa - g + PS])
        raise KeyError(gpa)


def pages_frame(
    enc: Encoder,
    gpas: Sequence[int],
    pages: Sequence[bytes],
    *,
    bad: Sequence[int] = (),
    live: bool = False,
    runs: bool = False,
) -> list[bytes | memoryview]:
    """A PAGES frame of ``pages``; the check of each index in ``bad`` is taken over a torn
    copy of its page (so its contents fail the check); ``runs``: the data as one buffer per
    page instead of one buffer."""
    checked = [torn(p) if i in bad else p for i, p in enumerate(pages)]
    crcs = crc32c_pages(b"".join(checked), enc.page_size)
    data: bytes | list[memoryview] = [memoryview(p) for p in pages] if runs else b"".join(pages)
    return enc.pages_frame(list(gpas), data, crcs=crcs, live=live)


class Tear:
    """Stands in for ``source.crc32c_pages``: the check of page ``gfn`` comes out wrong in
    round ``rnd`` (calls come in gfn order within a round, each over whole pages)."""

    def __init__(self, gfn: int, gfn_of: list[int], rnd: int = 0) -> None:
        self.gfn, self.rnd = gfn, rnd
        self.gfn_of = gfn_of  # the round-0 order: every page of the layout
        self.round = -1
        self.seen = 0  # pages checked so far in the round
        self.torn = 0
        self.real = source.crc32c_pages

    def on_round_start(self, rnd: int, npages: int) -> None:
        self.round, self.seen = rnd, 0

    def __call__(self, data: Any, page_size: int) -> bytes:
        crcs = bytearray(self.real(data, page_size))
        n = len(crcs) // 4
        if self.round == self.rnd:
            for i in range(n):
                if self.gfn_of[self.seen + i] == self.gfn:
                    crcs[4 * i] ^= 0x01
                    self.torn += 1
        self.seen += n
        return bytes(crcs)
