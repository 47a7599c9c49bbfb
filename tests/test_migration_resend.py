"""A page torn while pre-copy read it, end to end: a real :class:`Source` and a forked
destination (replay VM, no KVM).  The tear is simulated by making the source's per-page
check of one chosen page wrong during round 0 (as if the guest wrote it between the CRC and
the copy); the destination names it in its acknowledgement of the last pre-copy round and
the final round sends it again, so the migration succeeds and every page verifies.  The
control ignores that acknowledgement: the destination refuses END naming the page."""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from dmarw.core import container as make_container
from dmarw.core import vm as make_vm
from dmarw.kvm import Vm
from dmarw.migration import control, dest, source
from dmarw.migration.channel import Channel
from dmarw.migration.harness import SourceGuest
from dmarw.migration.source import MigrationFailed, MigrationReport, Source, differing_pages
from dmarw.migration.stream import Encoder, Layout
from dmarw.migration.writers import fill
from dmarw.mm import AddressSpace
from dmarw.type1 import Container, Prot
from pages_stream import Tear

TIMEOUT = 60.0
KEY = bytes(range(32))


@dataclass
class Guest:
    vm: Vm
    container: Container
    gfns: list[int]  # every page, in layout order


@pytest.fixture
def one_slot() -> Iterator[Guest]:
    g = SourceGuest(4 << 20, 3, 4)  # 1024 pages, the last 4 pinned
    try:
        yield Guest(g.vm, g.container, list(range(1024)))
    finally:
        g.close()


def _two_slots(second: int) -> Iterator[Guest]:
    """1 MiB at gpa 0 and 1.5 MiB at gpa ``second``, each its own memfd."""
    space = AddressSpace()
    lo, hi = space.mmap(1 << 20, backing="memfd"), space.mmap(3 << 19, backing="memfd")
    fill(space, lo, 1 << 20, 5)
    fill(space, hi, 3 << 19, 5, base_gpa=second)
    vm = make_vm(space)
    vm.set_memslot(0, 0, 1 << 20, lo, dirty_log=True)
    vm.set_memslot(1, second, 3 << 19, hi, dirty_log=True)
    c = make_container()
    c.map_dma(0x4000_0000, 1 << 20, lo, space, Prot.READ | Prot.WRITE)
    c.map_dma(0x8000_0000, 3 << 19, hi, space, Prot.READ | Prot.WRITE)
    try:
        yield Guest(vm, c, [*range(256), *range(second >> 12, (second >> 12) + 384)])
    finally:
        c.unmap_dma(0x4000_0000, 1 << 20)
        c.unmap_dma(0x8000_0000, 3 << 19)
        vm.close()
        space.close()


@pytest.fixture
def two_slots() -> Iterator[Guest]:
    """The second slot at 4 GiB: a page's bitmap index is not its gfn."""
    yield from _two_slots(1 << 32)


@pytest.fixture
def adjacent_slots() -> Iterator[Guest]:
    """The second slot right after the first: a frame of consecutive gfns spans both
    memfds (two runs, so sendmsg), and the destination's regions meet."""
    yield from _two_slots(1 << 20)


def migrate(
    guest: Guest, tear: Tear, zero_copy: bool = True, splice: bool = True, **kw: Any
) -> tuple[MigrationReport, list[int]]:
    """Migrate to a forked destination; the report and the gpas whose digests differ."""
    src = Source(guest.vm, guest.container, **kw)
    src.zero_copy = zero_copy  # False: every frame by sendmsg of the RAM views
    src.splice = src.splice and splice  # False: whole runs by sendfile from the memfd
    proc, sock = dest.start(src.page_size, src.layout)
    sock.settimeout(TIMEOUT)
    ch = Channel(sock, "destination")
    try:
        rep = src.migrate(sock, lambda: None, ch=ch, on_round_start=tear.on_round_start)
        _tag, theirs = ch.recv(control.HASH)
    finally:
        sock.close()
        proc.join(TIMEOUT)
    assert proc.exitcode == 0
    return rep, differing_pages(src.digests(), theirs, src.layout, src.page_size, dest.DIGEST_SIZE)


def ignore_resend(monkeypatch: pytest.MonkeyPatch) -> None:
    """The source reads every RACK as naming no page (the control)."""
    real = control.parse_rack
    monkeypatch.setattr(source.control, "parse_rack", lambda payload: (real(payload)[0], b""))


CASES = [
    pytest.param("one_slot", 0x123, {}, id="one-slot-one-precopy-round"),
    pytest.param("one_slot", 0x3FB, {"threshold": 0, "max_rounds": 3}, id="one-slot-three-precopy-rounds"),
    pytest.param("one_slot", 0x200, {"threshold": 0, "max_rounds": 2, "zero_copy": False}, id="one-slot-sendmsg"),
    pytest.param("one_slot", 0x201, {"threshold": 0, "max_rounds": 2, "splice": False}, id="one-slot-sendfile"),
    pytest.param("two_slots", (1 << 20) + 0x17F, {}, id="two-slots-second"),
    pytest.param("two_slots", 0x0, {"threshold": 0, "max_rounds": 2}, id="two-slots-first"),
    pytest.param("adjacent_slots", 0x100, {}, id="adjacent-slots-first-of-second"),
    pytest.param("adjacent_slots", 0xFF, {}, id="adjacent-slots-last-of-first"),
]


@pytest.mark.parametrize(("which", "gfn", "kw"), CASES)
def test_page_torn_in_precopy_is_sent_again_and_verifies(
    which: str, gfn: int, kw: dict[str, Any], request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    guest: Guest = request.getfixturevalue(which)
    tear = Tear(gfn, guest.gfns)
    monkeypatch.setattr(source, "crc32c_pages", tear)
    rep, differing = migrate(guest, tear, **kw)
    assert tear.torn == 1  # the tear happened, once
    final = rep.rounds[-1]
    assert final.final and final.resent == 1
    assert all(st.resent == 0 for st in rep.rounds[:-1])
    if which == "one_slot" and kw.get("threshold") == 0:  # the pinned pages keep pre-copy going
        assert len(rep.rounds) == kw["max_rounds"] + 1  # the page stayed outstanding through them
    assert differing == []
    assert rep.dest_pages == rep.pages_sent


def test_without_a_tear_nothing_is_resent(one_slot: Guest, monkeypatch: pytest.MonkeyPatch) -> None:
    tear = Tear(-1, one_slot.gfns)  # a page that does not exist: checks all sound
    monkeypatch.setattr(source, "crc32c_pages", tear)
    rep, differing = migrate(one_slot, tear)
    assert tear.torn == 0 and differing == []
    assert [st.resent for st in rep.rounds] == [0] * len(rep.rounds)


@pytest.mark.parametrize(("which", "gfn", "kw"), CASES)
def test_page_torn_and_not_sent_again_is_refused_at_end(
    which: str, gfn: int, kw: dict[str, Any], request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    guest: Guest = request.getfixturevalue(which)
    tear = Tear(gfn, guest.gfns)
    monkeypatch.setattr(source, "crc32c_pages", tear)
    ignore_resend(monkeypatch)
    kw = dict(kw)  # the case's own dict is shared by both tests
    zero_copy = bool(kw.pop("zero_copy", True))
    splice = bool(kw.pop("splice", True))
    src = Source(guest.vm, guest.container, **kw)
    src.zero_copy = zero_copy
    src.splice = src.splice and splice
    proc, sock = dest.start(src.page_size, src.layout)
    sock.settimeout(TIMEOUT)
    try:
        with pytest.raises(MigrationFailed) as ei:
            src.migrate(sock, lambda: None, on_round_start=tear.on_round_start)
    finally:
        sock.close()
        proc.join(TIMEOUT)
    assert tear.torn == 1
    msg = str(ei.value)
    assert ei.value.errno == errno.EPROTO
    assert "destination refused the stream" in msg
    assert f"1 page(s) failed their check while the guest ran and were not sent again: {gfn << 12:#x}" in msg
    assert proc.exitcode == 1


class Recording(Encoder):
    """The source's encoder, noting the round and the LIVE flag of every PAGES frame."""

    frames: list[tuple[int, bool]] = []

    def pages_frame(self, gpas: Any, data: Any, *, crcs: bytes | None = None, live: bool = False) -> list[bytes | memoryview]:
        Recording.frames.append((self.round, live))
        return super().pages_frame(gpas, data, crcs=crcs, live=live)


def _keyed_child(sock: socket.socket, page_size: int, layout: Layout) -> None:
    """The destination process of a keyed stream (the session key given, no handshake)."""
    rc = dest.serve(sock, page_size, layout, KEY)
    sock.close()
    raise SystemExit(rc)


@pytest.mark.parametrize("keyed", [False, True], ids=["unkeyed", "keyed"])
def test_precopy_frames_are_live_the_final_round_strict_and_keyed_never_live(
    keyed: bool, one_slot: Guest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unkeyed: every pre-copy frame LIVE, every final one not.  Keyed: none LIVE, and the
    pages are staged in a copy whose checks the encoder takes itself (a wrong check of the
    RAM read, as in the tests above, cannot happen: the source's own never runs)."""
    Recording.frames = []
    monkeypatch.setattr(source, "Encoder", Recording)
    tear = Tear(0x10, one_slot.gfns)
    monkeypatch.setattr(source, "crc32c_pages", tear)
    src = Source(one_slot.vm, one_slot.container, threshold=0, max_rounds=3)
    if keyed:
        proc, sock = dest.start(src.page_size, src.layout, target=_keyed_child)
    else:
        proc, sock = dest.start(src.page_size, src.layout)
    sock.settimeout(TIMEOUT)
    ch = Channel(sock, "destination")
    try:
        rep = src.migrate(sock, lambda: None, ch=ch, mac_key=KEY if keyed else None, on_round_start=tear.on_round_start)
        _tag, theirs = ch.recv(control.HASH)
    finally:
        sock.close()
        proc.join(TIMEOUT)
    assert proc.exitcode == 0
    assert differing_pages(src.digests(), theirs, src.layout, src.page_size, dest.DIGEST_SIZE) == []
    final = rep.rounds[-1].round
    assert {r for r, _ in Recording.frames} == set(range(final + 1)) and final == 3
    if keyed:
        assert [live for _, live in Recording.frames] == [False] * len(Recording.frames)
        assert tear.torn == 0 and rep.rounds[-1].resent == 0
    else:
        assert all(live == (r < final) for r, live in Recording.frames), Recording.frames
        assert tear.torn == 1 and rep.rounds[-1].resent == 1
