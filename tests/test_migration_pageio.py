"""The native core's page sender (``_native.send_pages``: vmsplice into a pipe, splice to
the socket): every byte arrives in order whatever the length, alignment and pipe size;
a peer that stops reading times out, one that hangs up is an error; bad arguments are
refused before anything is written; a source that cannot vmsplice falls back to sendfile
and says so."""

from __future__ import annotations

import errno
import mmap
import os
import socket
import threading
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmarw.core import native_available

pytestmark = pytest.mark.skipif(not native_available(), reason="dmarw._native is not built")
TIMEOUT = 30.0


def _drain(sock: socket.socket, want: int, out: bytearray) -> threading.Thread:
    def read() -> None:
        while len(out) < want:
            chunk = sock.recv(1 << 20)
            if not chunk:
                return
            out.extend(chunk)

    t = threading.Thread(target=read)
    t.start()
    return t


@settings(max_examples=40, deadline=None)
@given(
    length=st.integers(1, (3 << 20) + 4097),
    offset=st.integers(0, 4095),
    timeout=st.sampled_from([None, 20.0]),
    head=st.integers(0, 32 << 10),
    pipe=st.sampled_from([None, 0, 1 << 20]),
)
def test_every_byte_arrives_in_order(length: int, offset: int, timeout: float | None, head: int, pipe: int | None) -> None:
    """Lengths below, at and across the 1 MiB pipe, unaligned starts, blocking and
    non-blocking (timeout) sockets; a head sent first; the call's own pipe, or one the
    caller keeps (the kernel's 64 KiB default, which a head fills in part, or 1 MiB) for
    two sends in a row."""
    import fcntl

    from dmarw import _native

    m = mmap.mmap(-1, offset + length)
    for i in range(offset, offset + length, 509):
        m[i] = (i * 31) & 0xFF
    first = bytes((i * 7) & 0xFF for i in range(head)) if head else None
    kept = None
    if pipe is not None:
        kept = os.pipe2(os.O_CLOEXEC)
        if pipe:
            fcntl.fcntl(kept[1], fcntl.F_SETPIPE_SZ, pipe)
    sends = 2 if kept is not None else 1
    a, b = socket.socketpair()
    a.settimeout(timeout)
    got = bytearray()
    t = _drain(b, sends * (head + length), got)
    try:
        with memoryview(m) as mv:
            for _ in range(sends):
                assert _native.send_pages(a.fileno(), mv[offset : offset + length], a.gettimeout(), first, kept) == head + length
    finally:
        t.join(TIMEOUT)
        a.close()
        b.close()
        for fd in kept or ():
            os.close(fd)
    assert bytes(got) == sends * ((first or b"") + m[offset : offset + length])
    m.close()


def test_a_head_beyond_the_limit_is_refused_before_anything_is_sent() -> None:
    from dmarw import _native

    a, b = socket.socketpair()
    b.setblocking(False)
    try:
        with pytest.raises(ValueError, match="send_pages: a head of 32769 bytes"):
            _native.send_pages(a.fileno(), bytes(4096), None, bytes((32 << 10) + 1))
        with pytest.raises(BlockingIOError):
            b.recv(1)  # nothing arrived
    finally:
        a.close()
        b.close()


def test_a_peer_that_stops_reading_times_out() -> None:
    from dmarw import _native

    a, b = socket.socketpair()
    a.settimeout(0.2)
    data = bytes(16 << 20)  # far more than the socket buffers hold
    try:
        with pytest.raises(TimeoutError, match="send_pages: the peer took no data for 200 ms"):
            _native.send_pages(a.fileno(), data, a.gettimeout())
    finally:
        a.close()
        b.close()


def test_a_peer_that_hung_up_is_epipe() -> None:
    from dmarw import _native

    a, b = socket.socketpair()
    b.close()
    try:
        with pytest.raises(OSError) as ei:
            _native.send_pages(a.fileno(), bytes(1 << 16), None)
        assert ei.value.errno == errno.EPIPE
    finally:
        a.close()


@pytest.mark.parametrize(
    ("args", "exc", "match"),
    [
        ((-1, b"x", None), ValueError, "send_pages: fd -1"),
        ((3, b"x", -1.0), ValueError, "timeout -1.0 must be None or in 0..86400 s"),
        ((3, b"x", "soon"), TypeError, "must be real number"),
        ((3, 17, None), TypeError, "a bytes-like object is required"),
        ((3, b"x"), TypeError, "three to five arguments"),
        ((3, b"x", None, None, (3,)), TypeError, "must be None or \\(read fd, write fd\\)"),
        ((3, b"x", None, None, (3, -1)), ValueError, "send_pages: pipe \\(3, -1\\)"),
        ((3, b"x", None, 17), TypeError, "a bytes-like object is required"),
    ],
)
def test_bad_arguments_are_refused(args: tuple[object, ...], exc: type[Exception], match: str) -> None:
    from dmarw import _native

    with pytest.raises(exc, match=match):
        _native.send_pages(*args)


def test_a_descriptor_that_takes_no_data_is_an_oserror() -> None:
    """A pipe's read end: splice refuses, the errno says why."""
    from dmarw import _native

    pr, pw = os.pipe()
    try:
        with pytest.raises(OSError) as ei:
            _native.send_pages(pr, bytes(4096), None)  # the read end: nothing can be written
        assert ei.value.errno in (errno.EBADF, errno.EINVAL)
    finally:
        os.close(pr)
        os.close(pw)


def _migrate(src: Any) -> tuple[Any, list[int]]:
    """Migrate ``src`` (a Source) to a forked destination: the report and the differing gpas."""
    from dmarw.migration import control, dest
    from dmarw.migration.channel import Channel
    from dmarw.migration.source import differing_pages

    proc, sock = dest.start(src.page_size, src.layout)
    sock.settimeout(TIMEOUT)
    ch = Channel(sock, "destination")
    try:
        rep = src.migrate(sock, lambda: None, ch=ch)
        _tag, theirs = ch.recv(control.HASH)
    finally:
        sock.close()
        proc.join(TIMEOUT)
    assert proc.exitcode == 0
    return rep, differing_pages(src.digests(), theirs, src.layout, src.page_size, dest.DIGEST_SIZE)


def test_a_source_without_vmsplice_falls_back_to_sendfile(monkeypatch: pytest.MonkeyPatch) -> None:
    """vmsplice refused (as a seccomp filter would: EPERM): the frame goes by sendfile,
    the source stops asking, and the migration verifies."""
    from dmarw import _native
    from dmarw.migration.harness import SourceGuest
    from dmarw.migration.source import Source

    calls = [0]

    def refuse(*args: object) -> int:
        calls[0] += 1
        raise PermissionError(errno.EPERM, "vmsplice: Operation not permitted")

    monkeypatch.setattr(_native, "send_pages", refuse)
    g = SourceGuest(8 << 20, 3, 0)
    try:
        src = Source(g.vm, g.container)
        assert src.splice
        rep, differing = _migrate(src)
        assert calls[0] == 1 and not src.splice
        assert "sendfile" in rep.send_api and "vmsplice" not in rep.send_api
        assert differing == []
    finally:
        g.close()


def test_anonymous_ram_goes_by_vmsplice_and_by_a_copy_when_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """RAM with no memfd (sendfile cannot read it): vmsplice sends it without a copy; where
    vmsplice is refused the frame's contents are written by sendmsg.  Both verify."""
    from dmarw import _native
    from dmarw.core import container as make_container
    from dmarw.core import vm as make_vm
    from dmarw.migration.source import Source
    from dmarw.migration.writers import fill
    from dmarw.mm import AddressSpace
    from dmarw.type1 import Prot

    def refuse(*args: object) -> int:
        raise OSError(errno.ENOSYS, "vmsplice: Function not implemented")

    ram = 4 << 20
    for refused in (False, True):
        if refused:
            monkeypatch.setattr(_native, "send_pages", refuse)
        space = AddressSpace()
        hva = space.mmap(ram, backing="anon")
        fill(space, hva, ram, 11)
        vm = make_vm(space, None)
        vm.set_memslot(0, 0, ram, hva, dirty_log=True)
        c = make_container(None)
        c.map_dma(0, ram, hva, space, Prot.READ | Prot.WRITE)
        try:
            src = Source(vm, c)
            rep, differing = _migrate(src)
            assert src.splice is not refused
            assert rep.send_api == ("sendmsg from RAM" if refused else "vmsplice + splice")
            assert differing == []
        finally:
            c.unmap_dma(0, ram)
            vm.close()
            space.close()
