"""The source's scatter-gather send: a frame of scattered pages is one buffer per run, and
one ``sendmsg`` takes at most IOV_MAX of them.  A round that dirties every other page (each
page a run of its own, a frame's worth far more than IOV_MAX) migrates and verifies."""

from __future__ import annotations

import socket
import threading

from dmarw.migration import control, dest
from dmarw.migration.channel import Channel
from dmarw.migration.harness import SourceGuest
from dmarw.migration.source import IOV_MAX, Source, differing_pages, send_parts
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
        assert differing_pages(src.digests(), theirs, src.layout, src.page_size, dest.DIGEST_SIZE) == []
    finally:
        g.close()
