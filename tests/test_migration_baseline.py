"""The throughput baseline's plain copies: one forked receiver for any number of copies by
either API, over a socketpair or TCP; bad requests refused before a byte is sent; the
receiver gone, reaped, once the copier is closed."""

from __future__ import annotations

import errno
import math
import multiprocessing
import os
from collections.abc import Iterator

import pytest

from dmarw.errors import DmaError
from dmarw.migration.baseline import PlainCopier, PlainCopy, plain_copy
from dmarw.mm import AddressSpace

SIZE = (2 << 20) + 3 * 4096  # not a whole number of the sender's 1 MiB writes


@pytest.fixture
def space() -> Iterator[AddressSpace]:
    s = AddressSpace()
    yield s
    s.close()


def ram(space: AddressSpace, backing: str) -> int:
    hva = space.mmap(SIZE, backing=backing)
    space.write(hva, bytes(range(256)) * (SIZE // 256))
    return hva


def gone(c: PlainCopier) -> None:
    """The receiver exited by itself, with status 0, and was reaped."""
    assert c.proc.exitcode == 0
    assert c.proc not in multiprocessing.active_children()
    assert c.proc.pid is not None
    with pytest.raises(ChildProcessError):
        os.waitpid(c.proc.pid, os.WNOHANG)  # not a child of ours any more: nothing left to reap


@pytest.mark.parametrize("tcp", [False, True], ids=["socketpair", "tcp"])
def test_both_apis_move_the_whole_size_to_one_receiver(space: AddressSpace, tcp: bool) -> None:
    hva = ram(space, "memfd")
    c = PlainCopier(SIZE, tcp=tcp)
    try:
        got = [
            c.copy(space, hva, "before", api="write"),
            c.copy(space, hva, "while", api="sendfile"),
            c.copy(space, hva, "again", api="write", chunk=12345),
        ]
        assert c.proc.is_alive()  # the same receiver answered all three
    finally:
        c.close()
    assert [(p.bytes, p.api, p.when) for p in got] == [
        (SIZE, "write", "before"),
        (SIZE, "sendfile", "while"),
        (SIZE, "write", "again"),
    ]
    assert all(p.seconds > 0 and p.rate > 0 for p in got)
    # each end's CPU seconds came back (the receiver's in its answer): measured, not judged
    assert all(math.isfinite(p.sender_cpu) and math.isfinite(p.receiver_cpu) for p in got)
    assert all(p.sender_cpu >= 0 and p.receiver_cpu >= 0 for p in got)
    gone(c)


def test_write_from_anonymous_ram(space: AddressSpace) -> None:
    hva = ram(space, "anon")
    c = PlainCopier(SIZE)
    try:
        p = c.copy(space, hva, "before")
    finally:
        c.close()
    assert p.bytes == SIZE and p.api == "write" and p.seconds > 0
    gone(c)


@pytest.mark.parametrize(
    ("backing", "api"),
    [("anon", "sendfile"), ("memfd", "splice"), ("memfd", ""), ("memfd", "Write")],
)
def test_bad_api_is_einval_and_the_copier_still_works(space: AddressSpace, backing: str, api: str) -> None:
    hva = ram(space, backing)
    c = PlainCopier(SIZE)
    try:
        with pytest.raises(DmaError, match=f"plain copy by {api!r}: 'write', or 'sendfile' from a memfd") as ei:
            c.copy(space, hva, "before", api=api)
        assert ei.value.errno == errno.EINVAL
        assert c.copy(space, hva, "after").bytes == SIZE  # nothing of the refused one was sent
    finally:
        c.close()
    gone(c)


def test_several_runs_give_the_median_and_the_spread(space: AddressSpace) -> None:
    hva = ram(space, "memfd")
    c = PlainCopier(SIZE)
    try:
        one = c.copy(space, hva, "once")
        p = c.copy(space, hva, "thrice", api="sendfile", runs=3)
        for bad in (0, 16):
            with pytest.raises(DmaError, match=f"plain copy runs {bad}: 1..15") as ei:
                c.copy(space, hva, "never", runs=bad)
            assert ei.value.errno == errno.EINVAL
        assert c.copy(space, hva, "after").bytes == SIZE  # nothing of the refused ones was sent
    finally:
        c.close()
    assert (one.runs, one.fastest, one.slowest) == (1, one.seconds, one.seconds)
    assert (p.runs, p.bytes, p.api, p.when) == (3, SIZE, "sendfile", "thrice")
    assert 0 < p.fastest <= p.seconds <= p.slowest
    gone(c)


def test_receiver_exits_when_closed_before_any_copy() -> None:
    c = PlainCopier(SIZE, tcp=True)
    c.close()
    gone(c)
    c.close()  # a second close finds the socket closed and the receiver gone: no error


def test_receiver_exits_cleanly_when_the_socket_just_closes() -> None:
    """A sender that goes away without saying so (its socket closed, no ``Q``)."""
    c = PlainCopier(SIZE)
    c.sock.close()
    c.proc.join(30)
    gone(c)


def test_plain_copy_is_one_copy_by_write_and_leaves_no_receiver(space: AddressSpace) -> None:
    hva = ram(space, "memfd")
    before = set(multiprocessing.active_children())
    p = plain_copy(space, hva, SIZE)
    assert isinstance(p, PlainCopy)
    assert (p.bytes, p.api, p.when) == (SIZE, "write", "before the writers started") and p.seconds > 0
    assert set(multiprocessing.active_children()) <= before
