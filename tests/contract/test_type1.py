"""The type1 container: map/unmap, dma_rw, dirty tracking and pinning.

Every test runs on each core (``core``) for each lock strategy x mm-ref mode
(``container_kwargs``).  Every failing
call is checked to leave mappings, pins, tracking and host memory exactly as they were;
where tracking is on, the next get shows the dirty bits were neither added nor lost.
"""

from __future__ import annotations

import array
import errno
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from dmarw import AddressSpace, Container, DmaError, Prot, bitmap_pages

P = 4096
NPAGES = 16
TOP = 1 << 64
RW = Prot.READ | Prot.WRITE
MakeContainer = Callable[..., Container]


def _pattern(n: int, seed: int = 0) -> bytes:
    return bytes((i * 131 + seed) & 0xFF for i in range(n))


@dataclass
class Env:
    c: Container
    space: AddressSpace
    hva: int  # NPAGES pages filled with _pattern
    spaces: list[AddressSpace] = field(default_factory=list)

    def state(self) -> tuple[object, ...]:
        mem: list[tuple[int, bytes]] = []
        for s in [self.space, *self.spaces]:
            if not s.released:
                mem.extend((r.hva, s.read(r.hva, r.size)) for r in s.regions())
        return (self.c.tracking, self.c.mappings(), self.c.pinned(), mem)

    def fails(self, err: int, fn: Callable[..., Any], *args: Any, **kw: Any) -> DmaError:
        before = self.state()
        with pytest.raises(DmaError) as info:
            fn(*args, **kw)
        assert info.value.errno == err, info.value
        assert isinstance(info.value, OSError)
        assert self.state() == before
        return info.value

    def host(self, page: int, n: int = P, off: int = 0) -> bytes:
        return self.space.read(self.hva + page * P + off, n)

    def dirty(self, iova: int, size: int) -> list[int]:
        return bitmap_pages(self.c.get_dirty_bitmap(iova, size))


@pytest.fixture
def env(make_container: MakeContainer, container_kwargs: dict[str, str]) -> Env:
    space = AddressSpace()
    hva = space.mmap(NPAGES * P)
    space.write(hva, _pattern(NPAGES * P))
    return Env(make_container(**container_kwargs), space, hva)


def _notifier(env: Env, *, unpin: bool = True) -> list[tuple[int, int]]:
    """Register a notifier that records (iova, size) and unpins every pin inside it."""
    calls: list[tuple[int, int]] = []

    def fn(iova: int, size: int) -> None:
        calls.append((iova, size))
        if unpin:
            for page, count in env.c.pinned().items():
                if iova <= page < iova + size:
                    for _ in range(count):
                        env.c.unpin_pages(page, 1)

    env.c.register_unmap_notifier(fn)
    return calls


# -- construction ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [{"pgsize": 2048}, {"pgsize": 3 * 4096}, {"lock": "spin"}, {"mm_ref": "borrow"}],
)
def test_container_arguments(make_container: MakeContainer, kwargs: dict[str, Any]) -> None:
    with pytest.raises(DmaError) as info:
        make_container(**kwargs)
    assert info.value.errno == errno.EINVAL


# -- map_dma --------------------------------------------------------------------------------


def test_map_dma_rules_einval(env: Env) -> None:
    c, h = env.c, env.hva
    c.map_dma(0, P, h, env.space)
    for iova, size, hva in [
        (P + 1, P, h),  # iova unaligned
        (P, P + 1, h),  # size unaligned
        (P, P, h + 8),  # hva unaligned
        (P, 0, h),  # zero
        (-P, P, h),
        (P, -P, h),
    ]:
        e = env.fails(errno.EINVAL, c.map_dma, iova, size, hva, env.space)
        assert "map_dma" in str(e)
    for iova in (TOP - P, TOP):  # the end (or the start) past 2**64
        e = env.fails(errno.EOVERFLOW, c.map_dma, iova, 2 * P, h, env.space)
        assert hex(iova) in str(e)
    env.fails(errno.EINVAL, c.map_dma, P, P, h, env.space, Prot(0))
    env.fails(errno.EINVAL, c.map_dma, P, P, h, env.space, 4)
    env.fails(errno.EINVAL, c.map_dma, P, P, h, env.space, 7)
    env.fails(errno.EINVAL, c.map_dma, P, P, h, env.space, -1)
    env.fails(errno.EINVAL, c.map_dma, P, P, h, env.space, "rw")
    env.fails(errno.EINVAL, c.map_dma, P, P, h, object())


def test_map_dma_message_names_the_range(env: Env) -> None:
    e = env.fails(errno.EINVAL, env.c.map_dma, 0x123000, 0x1001, env.hva, env.space)
    assert "0x123000" in str(e) and "0x1001" in str(e)


def test_map_dma_up_to_the_top_of_iova_space(env: Env) -> None:
    c = env.c
    c.map_dma(TOP - 2 * P, 2 * P, env.hva, env.space)  # iova + size == 2**64 is fine
    c.dma_write(TOP - 3, b"end")
    assert env.host(1, 3, P - 3) == b"end"
    assert c.dma_read(TOP - 2 * P, 2 * P) == env.host(0, 2 * P)
    env.fails(errno.EOVERFLOW, c.dma_rw, TOP - 2, bytearray(3), False)
    env.fails(errno.EOVERFLOW, c.dma_write, TOP - 1, b"ab")
    assert c.unmap_dma(TOP - 2 * P, 2 * P) == 2 * P
    assert c.mappings() == []


def test_map_dma_overlap_is_eexist(env: Env) -> None:
    c, h = env.c, env.hva
    c.map_dma(4 * P, 4 * P, h, env.space)
    for iova, size in [(4 * P, 4 * P), (2 * P, 3 * P), (7 * P, 2 * P), (0, 16 * P), (5 * P, P)]:
        e = env.fails(errno.EEXIST, c.map_dma, iova, size, h + 8 * P, env.space)
        assert hex(iova) in str(e)
    c.map_dma(0, 4 * P, h + 8 * P, env.space, Prot.READ)  # adjacent below
    c.map_dma(8 * P, P, h + 12 * P, env.space)  # adjacent above
    assert c.mappings() == [
        (0, 4 * P, h + 8 * P, Prot.READ),
        (4 * P, 4 * P, h, RW),
        (8 * P, P, h + 12 * P, RW),
    ]


def test_map_dma_hva_must_be_mapped(env: Env) -> None:
    c, h = env.c, env.hva
    env.fails(errno.EFAULT, c.map_dma, 0, P, h + NPAGES * P, env.space)  # just past the end
    env.fails(errno.EFAULT, c.map_dma, 0, 2 * P, h + (NPAGES - 1) * P, env.space)  # runs off
    env.fails(errno.EFAULT, c.map_dma, 0, P, h - P, env.space)
    other = AddressSpace()
    env.spaces.append(other)
    env.fails(errno.EFAULT, c.map_dma, 0, P, h, other)  # mapped, but in another process
    hva2 = env.space.mmap(P)
    env.space.munmap(hva2, P)
    env.fails(errno.EFAULT, c.map_dma, 0, P, hva2, env.space)


def test_map_dma_of_an_exited_owner_is_efault(env: Env) -> None:
    assert env.space.mmget_not_zero()  # keep the memory so the state can be compared
    env.space.close()
    env.fails(errno.EFAULT, env.c.map_dma, 0, P, env.hva, env.space)
    env.space.mmput()


def test_map_dma_larger_pgsize(make_container: MakeContainer, container_kwargs: dict[str, str]) -> None:
    c = make_container(pgsize=8192, **container_kwargs)
    space = AddressSpace()
    hva = space.mmap(8 * P)
    base = hva if hva % 8192 == 0 else hva + P
    for iova, size, h in [(P, 2 * P, base), (0, P, base), (0, 2 * P, base + P)]:
        with pytest.raises(DmaError) as info:
            c.map_dma(iova, size, h, space)
        assert info.value.errno == errno.EINVAL
    c.map_dma(0, 4 * P, base, space)
    c.dma_write(2 * P + 1, b"x")
    c.dirty_pages_start()
    c.dma_write(2 * P - 1, b"ab")  # crosses the 8 KiB page boundary: pages 0 and 1
    with pytest.raises(DmaError) as info:
        c.get_dirty_bitmap(0, 4 * P)  # pgsize 4096 is not the container's
    assert info.value.errno == errno.EINVAL
    with pytest.raises(DmaError) as info:
        c.get_dirty_bitmap(0, 3 * P, pgsize=8192)  # not aligned to 8 KiB
    assert info.value.errno == errno.EINVAL
    assert bitmap_pages(c.get_dirty_bitmap(0, 4 * P, pgsize=8192)) == [0, 1]
    c.register_unmap_notifier(lambda i, s: None)
    with pytest.raises(DmaError) as info:
        c.pin_pages(P, 1, Prot.READ)
    assert info.value.errno == errno.EINVAL
    assert c.pin_pages(8192, 1, Prot.READ) == [base + 8192]


# -- unmap_dma ------------------------------------------------------------------------------


def test_unmap_returns_bytes_and_removes_every_mapping_inside(env: Env) -> None:
    c, h = env.c, env.hva
    c.map_dma(0, P, h, env.space)
    c.map_dma(2 * P, 2 * P, h + P, env.space)
    c.map_dma(5 * P, 3 * P, h + 3 * P, env.space)
    c.map_dma(8 * P, P, h + 6 * P, env.space)
    assert c.unmap_dma(P, 7 * P) == 5 * P  # the middle two, and the holes around them
    assert c.mappings() == [(0, P, h, RW), (8 * P, P, h + 6 * P, RW)]
    env.fails(errno.EINVAL, c.dma_read, 2 * P, 1)
    assert c.unmap_dma(P, 7 * P) == 0  # nothing left there
    assert c.unmap_dma(0, TOP) == 2 * P  # the whole iova space
    assert c.mappings() == []
    assert env.host(0, NPAGES * P) == _pattern(NPAGES * P)  # host memory is untouched


def test_unmap_partial_overlap_removes_nothing(env: Env) -> None:
    c, h = env.c, env.hva
    c.map_dma(0, 2 * P, h, env.space)
    c.map_dma(2 * P, 4 * P, h + 2 * P, env.space)
    for iova, size in [(0, P), (P, 2 * P), (0, 3 * P), (3 * P, P), (5 * P, 4 * P), (P, 8 * P)]:
        e = env.fails(errno.EINVAL, c.unmap_dma, iova, size)
        assert "cuts" in str(e)
    assert len(c.mappings()) == 2


def test_unmap_rules_einval(env: Env) -> None:
    c = env.c
    c.map_dma(0, 2 * P, env.hva, env.space)
    for iova, size in [(1, P), (0, P + 1), (0, 0), (-P, 2 * P)]:
        env.fails(errno.EINVAL, c.unmap_dma, iova, size)
    env.fails(errno.EOVERFLOW, c.unmap_dma, TOP - P, 2 * P)
    env.fails(errno.EINVAL, c.unmap_dma, 0, 2 * P, get_dirty_bitmap=True)  # tracking off


def test_unmap_with_dirty_bitmap(env: Env) -> None:
    c, h = env.c, env.hva
    c.map_dma(2 * P, 2 * P, h, env.space)
    c.map_dma(6 * P, 3 * P, h + 2 * P, env.space)
    c.dirty_pages_start()
    c.dma_write(3 * P + 5, b"a")  # page 1 of the range below
    c.dma_write(8 * P - 1, b"bc")  # pages 5 and 6
    got, bitmap = c.unmap_dma(P, 9 * P, get_dirty_bitmap=True)
    assert got == 5 * P
    assert len(bitmap) == 8
    assert bitmap_pages(bitmap) == [2, 6, 7]
    assert c.mappings() == []
    c.map_dma(2 * P, 2 * P, h, env.space)  # a fresh mapping starts clean
    assert c.unmap_dma(2 * P, 2 * P, get_dirty_bitmap=True) == (2 * P, bytes(8))


# -- dma_rw ---------------------------------------------------------------------------------


def test_dma_rw_rules(env: Env) -> None:
    c, h = env.c, env.hva
    c.map_dma(0, 2 * P, h, env.space)
    c.map_dma(3 * P, 2 * P, h + 4 * P, env.space)  # a hole at 2P..3P
    env.fails(errno.EINVAL, c.dma_rw, 0, bytearray(), False)
    env.fails(errno.EINVAL, c.dma_rw, 0, b"", True)
    e = env.fails(errno.EINVAL, c.dma_rw, 2 * P - 2, b"four", True)  # last bytes unmapped
    assert hex(2 * P - 2) in str(e)
    env.fails(errno.EINVAL, c.dma_rw, 2 * P, bytearray(1), False)  # first byte unmapped
    env.fails(errno.EINVAL, c.dma_rw, P, bytes(3 * P), True)  # hole in the middle
    env.fails(errno.EINVAL, c.dma_rw, 5 * P - 1, bytearray(2), False)  # runs off the end
    env.fails(errno.EINVAL, c.dma_rw, 100 * P, bytearray(8), False)
    env.fails(errno.EOVERFLOW, c.dma_rw, TOP - 4, bytearray(8), False)
    env.fails(errno.EOVERFLOW, c.dma_rw, TOP - 1, b"xy", True)


def test_dma_rw_failure_moves_no_byte(env: Env) -> None:
    c, h = env.c, env.hva
    c.map_dma(0, 2 * P, h, env.space)
    c.map_dma(2 * P, P, h + 2 * P, env.space, Prot.READ)
    buf = bytearray(b"\xaa" * (2 * P + 1))
    env.fails(errno.EINVAL, c.dma_rw, P, buf, False)  # the whole read was refused
    assert buf == b"\xaa" * (2 * P + 1)
    env.fails(errno.EPERM, c.dma_write, P, b"\xbb" * (2 * P))  # RW then READ-only
    assert env.host(0, 3 * P) == _pattern(3 * P)


def test_dma_rw_permissions(env: Env) -> None:
    c, h = env.c, env.hva
    c.map_dma(0, P, h, env.space, Prot.READ)
    c.map_dma(P, P, h + P, env.space, Prot.WRITE)
    c.map_dma(2 * P, P, h + 2 * P, env.space, RW)
    assert c.dma_read(0, 4) == env.host(0, 4)
    e = env.fails(errno.EPERM, c.dma_write, 0, b"w")  # no WRITE
    assert "0x0" in str(e)
    env.fails(errno.EPERM, c.dma_write, P, b"w")  # write-only is unusable: no READ
    env.fails(errno.EPERM, c.dma_read, P, 1)
    env.fails(errno.EPERM, c.dma_read, P - 1, 2)  # READ then WRITE-only
    env.fails(errno.EPERM, c.dma_read, 2 * P - 1, 2)  # WRITE-only then RW
    c.dma_write(2 * P, b"ok")
    assert env.host(2, 2) == b"ok"


def test_dma_rw_owner_closed_is_eperm(env: Env) -> None:
    c = env.c
    c.map_dma(0, P, env.hva, env.space)
    c.map_dma(P, P, env.hva + P, env.space)
    assert env.space.mmget_not_zero()  # the test's own reference keeps memory comparable
    env.space.close()
    env.fails(errno.EPERM, c.dma_read, 0, 8)
    env.fails(errno.EPERM, c.dma_write, P - 4, b"12345678")
    env.space.mmput()
    assert env.space.released
    with pytest.raises(DmaError) as info:
        c.dma_read(0, 1)
    assert info.value.errno == errno.EPERM


def test_dma_rw_kernel_thread_owner(make_container: MakeContainer, container_kwargs: dict[str, str]) -> None:
    c = make_container(**container_kwargs)
    space = AddressSpace(kthread=True)
    hva = space.mmap(P)
    c.map_dma(0, P, hva, space)
    if container_kwargs["mm_ref"] == "get_task_mm":  # the 2020 path refuses a kthread owner
        with pytest.raises(DmaError) as info:
            c.dma_write(0, b"x")
        assert info.value.errno == errno.EPERM
        assert space.read(hva, 1) == b"\0"
    else:
        c.dma_write(0, b"x")
        assert space.read(hva, 1) == b"x"
    assert space.users == 1


def test_dma_rw_crosses_pages_and_mappings(env: Env) -> None:
    c, h = env.c, env.hva
    other = env.space.mmap(4 * P, backing="memfd")
    # iova-contiguous, host-discontiguous: [0, 3P) -> h + 8P, [3P, 7P) -> other
    c.map_dma(0, 3 * P, h + 8 * P, env.space)
    c.map_dma(3 * P, 4 * P, other, env.space)
    data = _pattern(5 * P + 3, seed=9)
    c.dma_write(P + 7, data)
    assert c.dma_read(P + 7, len(data)) == data
    n1 = 3 * P - (P + 7)
    assert env.host(8, n1, P + 7) == data[:n1]
    assert env.space.read(other, len(data) - n1) == data[n1:]
    assert env.host(0, 8 * P) == _pattern(8 * P)  # nothing else moved
    buf = bytearray(2 * P)
    c.dma_rw(2 * P, buf, False)
    assert buf == c.dma_read(2 * P, 2 * P)
    mv = memoryview(bytearray(10))
    c.dma_rw(3 * P - 5, mv, False)
    assert mv.tobytes() == c.dma_read(3 * P - 5, 10)


def test_dma_rw_buffer_kinds(env: Env) -> None:
    c = env.c
    c.map_dma(0, 2 * P, env.hva, env.space)
    words = array.array("I", [0x01020304, 0x05060708])
    c.dma_rw(P - 4, words, True)  # any buffer; bytes counted, not items
    assert env.host(0, 8, P - 4) == words.tobytes()
    out = array.array("I", [0, 0])
    c.dma_rw(P - 4, out, False)
    assert out == words
    c.dma_rw(10, memoryview(b"view"), True)
    assert c.dma_read(10, 4) == b"view"
    env.fails(errno.EINVAL, c.dma_rw, 0, b"readonly", False)  # cannot fill bytes


# -- dirty tracking -------------------------------------------------------------------------


def test_dirty_start_stop(env: Env) -> None:
    c = env.c
    c.map_dma(0, 4 * P, env.hva, env.space)
    assert not c.tracking
    c.dma_write(0, b"before")  # not tracked
    c.dirty_pages_start()
    assert c.tracking
    c.dma_write(P, b"x")
    c.dirty_pages_start()  # idempotent: keeps the bits
    assert env.dirty(0, 4 * P) == [1]
    c.dma_write(2 * P, b"y")
    c.dirty_pages_stop()
    assert not c.tracking
    env.fails(errno.EINVAL, c.get_dirty_bitmap, 0, 4 * P)
    c.dirty_pages_stop()  # idempotent
    c.dirty_pages_start()  # fresh bitmaps: the bit of page 2 was dropped with the old ones
    assert env.dirty(0, 4 * P) == []


def test_dirty_get_rules(env: Env) -> None:
    c = env.c
    c.map_dma(2 * P, 4 * P, env.hva, env.space)
    c.dirty_pages_start()
    c.dma_write(3 * P, b"d")
    for args in [
        (2 * P, 4 * P, 8192),  # pgsize must be the container's
        (2 * P, 4 * P, 2048),
        (2 * P, 4 * P, None),  # not even a number: still EINVAL, not a TypeError
        (None, 4 * P),
        (2 * P + 1, 4 * P),
        (2 * P, 4 * P - 1),
        (2 * P, 0),
        (3 * P, 3 * P),  # cuts the mapping's start
        (2 * P, 3 * P),  # cuts its end
        (0, 3 * P),
    ]:
        env.fails(errno.EINVAL, c.get_dirty_bitmap, *args)
    env.fails(errno.EOVERFLOW, c.get_dirty_bitmap, TOP - P, 2 * P)
    assert env.dirty(0, 8 * P) == [3]  # the failed gets cleared nothing
    assert env.dirty(2 * P, 4 * P) == []
    assert c.get_dirty_bitmap(10 * P, 64 * P) == bytes(8)  # no mapping: all clear


def test_dirty_bitmap_size_limit(env: Env) -> None:
    """A bitmap over more than INT_MAX pages is EINVAL, not a giant allocation."""
    c = env.c
    c.map_dma(0, 2 * P, env.hva, env.space)
    c.dirty_pages_start()
    c.dma_write(0, b"x")
    env.fails(errno.EINVAL, c.get_dirty_bitmap, 0, TOP - P)
    env.fails(errno.EINVAL, c.get_dirty_bitmap, 0, (1 << 31) * P)
    env.fails(errno.EINVAL, c.unmap_dma, 0, TOP - P, get_dirty_bitmap=True)
    assert env.dirty(0, 2 * P) == [0]
    assert c.unmap_dma(0, TOP - P) == 2 * P  # without the bitmap any size is fine


def test_dirty_bits_at_both_ends_of_a_write(env: Env) -> None:
    c = env.c
    c.map_dma(0, 8 * P, env.hva, env.space)
    c.dirty_pages_start()
    c.dma_write(P - 1, b"ab")
    assert env.dirty(0, 8 * P) == [0, 1]
    c.dma_write(3 * P - 1, b"z")
    assert env.dirty(0, 8 * P) == [2]
    c.dma_write(3 * P + 1, bytes(P))  # unaligned full page: two pages
    assert env.dirty(0, 8 * P) == [3, 4]
    c.dma_write(5 * P, bytes(P))  # aligned full page: one
    assert env.dirty(0, 8 * P) == [5]
    c.dma_write(P + 1, bytes(5 * P))
    assert env.dirty(0, 8 * P) == [1, 2, 3, 4, 5, 6]
    c.dma_read(0, 8 * P)  # reads do not dirty
    assert env.dirty(0, 8 * P) == []
    env.fails(errno.EINVAL, c.dma_write, 7 * P, bytes(P + 1))  # failed writes do not either
    assert env.dirty(0, 8 * P) == []


def test_dirty_write_across_mappings(env: Env) -> None:
    c, h = env.c, env.hva
    c.map_dma(0, 2 * P, h + 4 * P, env.space)
    c.map_dma(2 * P, 2 * P, h, env.space)
    c.dirty_pages_start()
    c.dma_write(2 * P - 1, b"xy")  # last page of one mapping, first page of the next
    assert env.dirty(0, 4 * P) == [1, 2]
    assert env.dirty(0, 2 * P) == []


def test_mappings_made_while_tracking_are_tracked(env: Env) -> None:
    c, h = env.c, env.hva
    c.dirty_pages_start()
    c.map_dma(4 * P, 2 * P, h, env.space)
    c.dma_write(5 * P + 9, b"t")
    assert env.dirty(4 * P, 2 * P) == [1]
    assert env.dirty(0, 8 * P) == []


def test_dirty_bitmap_layout(env: Env) -> None:
    c = env.c
    npages = 130
    space = AddressSpace()
    hva = space.mmap(npages * P)
    c.map_dma(64 * P, npages * P, hva, space)
    c.dirty_pages_start()
    pages = [0, 7, 8, 63, 64, 65, 127, 129]
    for p in pages:
        c.dma_write((64 + p) * P + 11, b"b")
    bm = c.get_dirty_bitmap(64 * P, npages * P)
    assert len(bm) == (npages + 63) // 64 * 8 == 24
    expect = bytearray(24)
    for k in pages:
        expect[k // 8] |= 1 << (k % 8)
    assert bm == bytes(expect)
    words = [int.from_bytes(bm[i : i + 8], "little") for i in range(0, 24, 8)]
    assert words[0] == (1 << 0) | (1 << 7) | (1 << 8) | (1 << 63)
    c.dma_write((64 + 2) * P, b"c")
    bm = c.get_dirty_bitmap(0, 256 * P)  # a wider window: bit k is page iova + k*pgsize
    assert len(bm) == 32
    assert bitmap_pages(bm) == [66]


def test_dirty_get_spans_several_mappings(env: Env) -> None:
    c, h = env.c, env.hva
    c.map_dma(P, P, h, env.space)
    c.map_dma(3 * P, 2 * P, h + P, env.space)
    c.dirty_pages_start()
    c.dma_write(P, b"1")
    c.dma_write(4 * P, b"2")
    assert env.dirty(0, 8 * P) == [1, 4]


def test_pinned_pages_are_reported_on_every_get(env: Env) -> None:
    c = env.c
    c.map_dma(0, 4 * P, env.hva, env.space)
    _notifier(env)
    c.pin_pages(P, 1, Prot.READ)
    c.dirty_pages_start()  # pre-populated from the pins
    assert env.dirty(0, 4 * P) == [1]
    assert env.dirty(0, 4 * P) == [1]
    c.pin_pages(3 * P, 1, Prot.READ)  # pinning while tracking marks the page
    c.dma_write(0, b"w")
    assert env.dirty(0, 4 * P) == [0, 1, 3]
    c.unpin_pages(P, 1)
    c.unpin_pages(3 * P, 1)
    assert env.dirty(0, 4 * P) == [1, 3]  # the bits re-set by the last get
    assert env.dirty(0, 4 * P) == []


# -- pinning --------------------------------------------------------------------------------


def test_pin_requires_a_notifier(env: Env) -> None:
    c = env.c
    c.map_dma(0, 4 * P, env.hva, env.space)
    env.fails(errno.EINVAL, c.pin_pages, 0, 1, Prot.READ)
    handle = c.register_unmap_notifier(lambda iova, size: None)
    assert c.pin_pages(0, 1, Prot.READ) == [env.hva]
    c.unpin_pages(0, 1)
    c.unregister_unmap_notifier(handle)
    env.fails(errno.EINVAL, c.pin_pages, 0, 1, Prot.READ)
    env.fails(errno.EINVAL, c.unregister_unmap_notifier, handle)
    env.fails(errno.EINVAL, c.register_unmap_notifier, "not callable")


def test_pin_rules(env: Env) -> None:
    c, h = env.c, env.hva
    c.map_dma(0, 2 * P, h, env.space, Prot.READ)
    c.map_dma(2 * P, 2 * P, h + 2 * P, env.space)
    _notifier(env)
    c.pin_pages(0, 1, Prot.READ)  # a pin already there must survive every failure below
    env.fails(errno.EINVAL, c.pin_pages, 1, 1, Prot.READ)
    env.fails(errno.EINVAL, c.pin_pages, 0, 0, Prot.READ)
    env.fails(errno.EINVAL, c.pin_pages, 0, -1, Prot.READ)
    env.fails(errno.E2BIG, c.pin_pages, 0, 513, Prot.READ)
    env.fails(errno.EINVAL, c.pin_pages, 3 * P, 2, Prot.READ)  # second page unmapped
    env.fails(errno.EINVAL, c.pin_pages, 8 * P, 1, Prot.READ)
    env.fails(errno.EPERM, c.pin_pages, P, 2, Prot.WRITE)  # READ-only mapping first
    env.fails(errno.EPERM, c.pin_pages, P, 1, RW)
    env.fails(errno.EINVAL, c.pin_pages, 0, 1, Prot(0))
    env.fails(errno.EINVAL, c.pin_pages, 0, 1, 8)
    env.fails(errno.EINVAL, c.pin_pages, 0, 1, -1)
    env.fails(errno.EINVAL, c.pin_pages, 0, 1, Prot.READ | 4)
    assert c.pinned() == {0: 1}


def test_pin_returns_hvas_across_mappings(env: Env) -> None:
    c, h = env.c, env.hva
    c.map_dma(0, 2 * P, h + 10 * P, env.space)
    c.map_dma(2 * P, 2 * P, h, env.space)
    _notifier(env)
    assert c.pin_pages(P, 2, Prot.WRITE) == [h + 11 * P, h]
    assert c.pinned() == {P: 1, 2 * P: 1}


def test_pin_512_pages(env: Env) -> None:
    c = env.c
    space = AddressSpace()
    hva = space.mmap(512 * P)
    c.map_dma(0, 512 * P, hva, space)
    _notifier(env)
    hvas = c.pin_pages(0, 512, Prot.READ)
    assert hvas == [hva + i * P for i in range(512)]
    assert len(c.pinned()) == 512
    c.unpin_pages(0, 512)
    assert c.pinned() == {}
    with pytest.raises(DmaError) as info:
        c.unpin_pages(0, 513)
    assert info.value.errno == errno.E2BIG


def test_pins_are_refcounted(env: Env) -> None:
    c = env.c
    c.map_dma(0, 4 * P, env.hva, env.space)
    _notifier(env)
    c.pin_pages(0, 2, Prot.READ)
    c.pin_pages(P, 2, RW)
    assert c.pinned() == {0: 1, P: 2, 2 * P: 1}
    c.unpin_pages(0, 3)
    assert c.pinned() == {P: 1}
    c.unpin_pages(P, 1)
    assert c.pinned() == {}


def test_unpin_of_a_page_not_pinned_changes_nothing(env: Env) -> None:
    c = env.c
    c.map_dma(0, 4 * P, env.hva, env.space)
    _notifier(env)
    c.pin_pages(0, 1, Prot.READ)
    e = env.fails(errno.EINVAL, c.unpin_pages, 0, 2)  # page 0 pinned, page 1 not
    assert hex(P) in str(e)
    env.fails(errno.EINVAL, c.unpin_pages, 8 * P, 1)  # not even mapped
    env.fails(errno.EINVAL, c.unpin_pages, 1, 1)
    env.fails(errno.EINVAL, c.unpin_pages, 0, 0)
    assert c.pinned() == {0: 1}


def test_pin_after_owner_exit_eperm_unpin_still_works(env: Env) -> None:
    c = env.c
    c.map_dma(0, 4 * P, env.hva, env.space)
    _notifier(env)
    c.pin_pages(0, 2, Prot.READ)
    env.space.close()
    assert env.space.released
    with pytest.raises(DmaError) as info:
        c.pin_pages(2 * P, 1, Prot.READ)
    assert info.value.errno == errno.EPERM
    assert c.pinned() == {0: 1, P: 1}
    c.unpin_pages(0, 2)  # pins can always be released
    assert c.pinned() == {}
    assert c.unmap_dma(0, 4 * P) == 4 * P


def test_unmap_notifies_without_the_lock_and_the_notifier_unpins(env: Env) -> None:
    c, h = env.c, env.hva
    c.map_dma(0, 4 * P, h, env.space)
    c.map_dma(4 * P, 2 * P, h + 4 * P, env.space)
    c.map_dma(8 * P, P, h + 8 * P, env.space)
    calls = _notifier(env)  # calls unpin_pages from inside: deadlocks if the lock were held
    seen: list[tuple[int, int]] = []

    def second(iova: int, size: int) -> None:
        seen.append((iova, size))
        assert c.dma_read(iova, 1) is not None  # readers and mappings() work too
        assert c.mappings()

    c.register_unmap_notifier(second)
    c.pin_pages(P, 2, Prot.READ)
    c.pin_pages(2 * P, 1, Prot.READ)
    c.pin_pages(4 * P, 1, RW)
    assert c.unmap_dma(0, 8 * P) == 6 * P
    assert sorted(calls) == [(0, 4 * P), (4 * P, 2 * P)]  # each mapping with pins, whole
    assert sorted(seen) == sorted(calls)
    assert c.mappings() == [(8 * P, P, h + 8 * P, RW)]
    assert c.pinned() == {}


def test_unmap_ebusy_when_the_notifier_does_not_unpin(env: Env) -> None:
    c, h = env.c, env.hva
    c.map_dma(0, 2 * P, h, env.space)
    c.map_dma(2 * P, 2 * P, h + 2 * P, env.space)
    calls = _notifier(env, unpin=False)
    c.pin_pages(3 * P, 1, Prot.READ)
    e = env.fails(errno.EBUSY, c.unmap_dma, 0, 4 * P)  # the unpinned mapping stays too
    assert hex(2 * P) in str(e)
    assert calls == [(2 * P, 2 * P)]
    c.dirty_pages_start()
    env.fails(errno.EBUSY, c.unmap_dma, 0, 4 * P, get_dirty_bitmap=True)
    assert env.dirty(0, 4 * P) == [3]  # pin still reported: nothing consumed by the failure
    c.unpin_pages(3 * P, 1)
    assert c.unmap_dma(0, 4 * P) == 4 * P


def test_unmap_with_bitmap_after_notifier_unpins(env: Env) -> None:
    c = env.c
    c.map_dma(0, 4 * P, env.hva, env.space)
    _notifier(env)
    c.dirty_pages_start()
    c.pin_pages(2 * P, 1, RW)
    c.dma_write(0, b"w")
    total, bm = c.unmap_dma(0, 4 * P, get_dirty_bitmap=True)
    assert total == 4 * P
    assert bitmap_pages(bm) == [0, 2]


def test_host_munmap_under_a_mapping_is_efault_and_moves_no_byte(env: Env) -> None:
    """The VMM munmaps memory still mapped for DMA: access faults, and nothing moves."""
    c, h = env.c, env.hva
    gone = env.space.mmap(2 * P)
    c.map_dma(0, 2 * P, h, env.space)
    c.map_dma(2 * P, 2 * P, gone, env.space)
    c.dirty_pages_start()
    env.space.munmap(gone, 2 * P)
    env.fails(errno.EFAULT, c.dma_write, 2 * P + 8, b"x")  # only the gone mapping
    env.fails(errno.EFAULT, c.dma_write, P, b"y" * 2 * P)  # the first chunk must not move
    buf = bytearray(b"\x77" * 2 * P)
    env.fails(errno.EFAULT, c.dma_rw, P, buf, False)
    assert buf == b"\x77" * 2 * P
    assert env.dirty(0, 4 * P) == []
    assert c.dma_read(0, 8) == _pattern(8)  # the live mapping still works
    _notifier(env)
    env.fails(errno.EFAULT, c.pin_pages, P, 2, Prot.READ)  # nothing pinned, not even page 1
    assert c.pin_pages(P, 1, Prot.READ) == [h + P]
    assert c.unmap_dma(0, 4 * P) == 4 * P
