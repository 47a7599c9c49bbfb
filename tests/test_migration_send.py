"""The source's sends: ``send_parts`` writes more buffers than one ``sendmsg`` takes (at
most IOV_MAX each) in order; a frame of scattered pages is gathered into one buffer (a
round that dirties every other page, each page a run of its own, migrates and verifies);
a bandwidth cap holds pre-copy back and leaves the final round alone."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import pytest

from dmarw.errors import DmaError
from dmarw.migration import control, dest
from dmarw.migration.channel import Channel
from dmarw.migration.harness import SourceGuest
from dmarw.migration.source import IOV_MAX, MigrationReport, Source, differing_pages, send_parts
from dmarw.migration.stream import MAX_PAGES
from dmarw.mm import PAGE_SIZE

TIMEOUT = 60.0


def test_send_parts_writes_more_buffers_than_one_sendmsg_takes_in_order() -> None:
    a, b = socket.socketpair()
    parts: list[bytes | memoryview] = [bytes([i % 251]) * (i % 7 + 1) for i in range(3 * IOV_MAX + 5)]
    want = b"".join(bytes(p) for p in parts)
    got = bytearray()

    def read() -> None:
        while len(got) < len(want):
            got.extend(b.recv(1 << 16))

    t = threading.Thread(target=read)
    t.start()
    try:
        assert send_parts(a, parts) == len(want)
    finally:
        t.join(TIMEOUT)
        a.close()
        b.close()
    assert bytes(got) == want


def test_a_frame_of_more_runs_than_iov_max_migrates_and_verifies() -> None:
    npages = 2 * MAX_PAGES + 64
    g = SourceGuest(npages * PAGE_SIZE, 5, 0)
    try:
        src = Source(g.vm, g.container, threshold=0, max_rounds=2)
        dirtied = [0]

        def scatter(st: object) -> None:  # after round 0: every other page, by the vCPU path
            if getattr(st, "round", None) == 0:
                for gfn in range(0, npages, 2):
                    g.vm.write_guest(gfn * PAGE_SIZE, b"\x5a" * 8)
                    dirtied[0] += 1

        proc, sock = dest.start(src.page_size, src.layout)
        sock.settimeout(TIMEOUT)
        ch = Channel(sock, "destination")
        try:
            rep = src.migrate(sock, lambda: None, ch=ch, on_round_end=scatter)
            _tag, theirs = ch.recv(control.HASH)
        finally:
            sock.close()
            proc.join(TIMEOUT)
        assert proc.exitcode == 0
        assert rep.rounds[1].sent >= npages // 2 > IOV_MAX  # one frame held MAX_PAGES runs
        assert "staged copy, sendmsg" in rep.send_api
        assert differing_pages(src.digests(), theirs, src.layout, src.page_size, dest.DIGEST_SIZE) == []
    finally:
        g.close()


def _migrate(src: Source, **kw: Any) -> tuple[MigrationReport, bytes]:
    proc, sock = dest.start(src.page_size, src.layout)
    sock.settimeout(TIMEOUT)
    ch = Channel(sock, "destination")
    try:
        rep = src.migrate(sock, lambda: None, ch=ch, **kw)
        _tag, theirs = ch.recv(control.HASH)
    finally:
        sock.close()
        proc.join(TIMEOUT)
    assert proc.exitcode == 0
    return rep, theirs


class _Clock:
    """The source module's ``time`` in a test: a clock that only its ``sleep`` moves, and
    the sleeps asked for, per round (no wall-clock time is measured or waited)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[tuple[int, float]] = []
        self.round = 0
        self.thread_time = time.thread_time

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        assert s > 0
        self.sleeps.append((self.round, s))
        self.now += s


def test_a_bandwidth_cap_holds_pre_copy_back_and_not_the_final_round(monkeypatch: pytest.MonkeyPatch) -> None:
    """8 MiB at 16 MiB/s: round 0 waits, frame by frame, for exactly what its pages are due
    (half a second on the source's clock); the final round, with 1 MiB dirtied, does not
    wait; the RAM arrives whole."""
    from dmarw.migration import source as source_mod

    ram, cap = 8 << 20, 16 << 20
    clock = _Clock()
    monkeypatch.setattr(source_mod, "time", clock)
    g = SourceGuest(ram, 7, 0)
    try:
        src = Source(g.vm, g.container, threshold=4096, max_bandwidth=cap)

        def start(rnd: int, pages: int) -> None:
            clock.round = rnd

        def dirty(st: object) -> None:  # after round 0: the final round gets 1 MiB
            if getattr(st, "round", None) == 0 and not getattr(st, "final", False):
                for gfn in range(256):
                    g.vm.write_guest(gfn * PAGE_SIZE, b"\xa5" * 8)

        r, theirs = _migrate(src, on_round_start=start, on_round_end=dirty)
        assert [st.final for st in r.rounds] == [False, True] and r.rounds[-1].sent >= 256
        waited = sum(s for _, s in clock.sleeps)
        assert len(clock.sleeps) == ram // (4 << 20) and all(rnd == 0 for rnd, _ in clock.sleeps)  # a wait a frame
        # the round's PAGES frames are due at the cap; its closing ROUND frame (under 64 bytes) is not paced
        assert (r.rounds[0].bytes - 64) / cap <= waited <= r.rounds[0].bytes / cap, (waited, r.rounds[0].bytes / cap)
        assert differing_pages(src.digests(), theirs, src.layout, src.page_size, dest.DIGEST_SIZE) == []
    finally:
        g.close()


@pytest.mark.parametrize("bad", [0, 1000.0, -1, float("nan")])
def test_a_bandwidth_cap_under_1_mib_s_is_refused(bad: float) -> None:
    g = SourceGuest(1 << 20, 1, 0)
    try:
        with pytest.raises(DmaError, match="max_bandwidth .* bytes/s must be at least 1,048,576"):
            Source(g.vm, g.container, max_bandwidth=bad)
    finally:
        g.close()
