"""AddressSpace: mappings, backings, byte access and the owner/user lifetime.

Host memory is one implementation that both cores read and write through; the tests where a
core holds the memory (a VM keeping it alive) run on each core (``make_vm``).
"""

from __future__ import annotations

import array
import errno
import mmap
import os
import pickle
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dmarw import PAGE_SIZE, AddressSpace, DmaError, Vm

P = PAGE_SIZE


def _raises(err: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> DmaError:
    with pytest.raises(DmaError) as info:
        fn(*args, **kwargs)
    assert info.value.errno == err, info.value
    assert isinstance(info.value, OSError)
    return info.value


def _memory(space: AddressSpace) -> list[tuple[int, bytes]]:
    return [(r.hva, space.read(r.hva, r.size)) for r in space.regions()]


# -- errors ---------------------------------------------------------------------------------


def test_dma_error_is_an_oserror_with_the_errno_and_survives_pickling() -> None:
    e = DmaError(errno.EFAULT, "hva 0x1000+0x10 is not mapped")
    assert isinstance(e, OSError) and e.errno == errno.EFAULT
    assert "0x1000" in str(e) and os.strerror(errno.EFAULT) in str(e)
    f = pickle.loads(pickle.dumps(e))
    assert type(f) is DmaError
    assert (f.errno, f.detail, f.args, str(f)) == (e.errno, e.detail, e.args, str(e))


# -- mmap sizes and backings ----------------------------------------------------------------


@pytest.mark.parametrize("size", [0, -P, 1, P - 1, P + 1, 3 * P // 2, float(P), "4096", None])
def test_mmap_size_must_be_positive_page_multiple(size: object) -> None:
    space = AddressSpace()
    e = _raises(errno.EINVAL, space.mmap, size)
    assert "4096" in str(e)
    assert space.regions() == ()


@pytest.mark.parametrize("backing", ["anon", "memfd"])
def test_mmap_returns_page_aligned_zeroed_memory(backing: str) -> None:
    space = AddressSpace()
    hva = space.mmap(3 * P, backing=backing)
    assert hva % P == 0
    assert space.read(hva, 3 * P) == bytes(3 * P)
    space.write(hva + P - 2, b"wxyz")  # crosses a page boundary
    assert space.read(hva + P - 2, 4) == b"wxyz"
    assert space.read(hva, 3 * P).count(0) == 3 * P - 4


def test_write_takes_any_buffer() -> None:
    space = AddressSpace()
    hva = space.mmap(P)
    words = array.array("I", [0x11223344, 0x55667788])
    space.write(hva + 8, words)  # counted in bytes, not items
    assert space.read(hva + 8, 8) == words.tobytes()
    space.write(hva, memoryview(b"view"))
    space.write(hva + 4, bytearray(b"ba"))
    assert space.read(hva, 6) == b"viewba"


def test_two_mappings_are_distinct() -> None:
    space = AddressSpace()
    a = space.mmap(P)
    b = space.mmap(2 * P)
    assert a != b
    space.write(a, b"A" * P)
    space.write(b, b"B" * 2 * P)
    assert space.read(a, P) == b"A" * P
    assert space.read(b, 2 * P) == b"B" * 2 * P
    assert sorted(r.hva for r in space.regions()) == sorted([a, b])


def test_memfd_fd_is_shared_with_pwrite_and_a_second_mmap() -> None:
    space = AddressSpace()
    hva = space.mmap(2 * P, backing="memfd")
    fd = space.fd(hva)
    assert fd == space.fd(hva + P + 5)  # any hva inside the mapping
    os.pwrite(fd, b"from-the-fd", P - 3)
    assert space.read(hva + P - 3, 11) == b"from-the-fd"
    space.write(hva + 100, b"from-the-space")
    assert os.pread(fd, 14, 100) == b"from-the-space"
    other = mmap.mmap(fd, 2 * P, flags=mmap.MAP_SHARED)
    try:
        assert other[100:114] == b"from-the-space"
        other[2 * P - 4 : 2 * P] = b"tail"
        assert space.read(hva + 2 * P - 4, 4) == b"tail"
    finally:
        other.close()


def test_memfd_is_shared_with_a_forked_child() -> None:
    space = AddressSpace()
    hva = space.mmap(P, backing="memfd")
    fd = space.fd(hva)
    space.write(hva, b"parent")
    pid = os.fork()
    if pid == 0:  # child: only raw syscalls, then leave without running Python cleanup
        ok = os.pread(fd, 6, 0) == b"parent"
        os.pwrite(fd, b"child!", 64)
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert space.read(hva + 64, 6) == b"child!"


def test_anon_mapping_is_shared_with_a_forked_child() -> None:
    space = AddressSpace()
    hva = space.mmap(P)
    pid = os.fork()
    if pid == 0:
        try:
            space.write(hva + 8, b"child")
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert space.read(hva + 8, 5) == b"child"


def test_anon_mapping_has_no_fd() -> None:
    space = AddressSpace()
    hva = space.mmap(P)
    _raises(errno.EINVAL, space.fd, hva)
    _raises(errno.EFAULT, space.fd, hva + P)


def test_file_backing(tmp_path: Path) -> None:
    path = tmp_path / "guest.ram"
    path.write_bytes(b"preexisting" + bytes(10))
    space = AddressSpace()
    hva = space.mmap(2 * P, backing=path)  # a file backing is an explicit Path
    assert space.read(hva, 11) == b"preexisting"
    assert path.stat().st_size == 2 * P  # grown to the mapping size
    space.write(hva + P, b"written")
    fd = space.fd(hva)
    assert os.pread(fd, 7, P) == b"written"
    assert path.read_bytes()[P : P + 7] == b"written"


def test_file_backing_bad_path_is_an_error(tmp_path: Path) -> None:
    space = AddressSpace()
    with pytest.raises(DmaError) as info:
        space.mmap(P, backing=tmp_path / "no" / "such" / "dir")
    assert info.value.errno == errno.ENOENT
    assert space.regions() == ()


# -- byte access outside a mapping ----------------------------------------------------------


def test_read_write_outside_a_mapping_is_efault_and_changes_nothing() -> None:
    space = AddressSpace()
    hva = space.mmap(2 * P)
    space.write(hva, bytes(range(256)) * (2 * P // 256))
    before = _memory(space)
    e = _raises(errno.EFAULT, space.read, hva + 2 * P - 1, 2)  # last byte + one past the end
    assert hex(hva + 2 * P - 1) in str(e)
    _raises(errno.EFAULT, space.read, hva - P, 1)
    _raises(errno.EFAULT, space.read, 0, 1)
    _raises(errno.EFAULT, space.write, hva + 2 * P - 3, b"four")
    _raises(errno.EFAULT, space.write, hva + 2 * P, b"x")
    _raises(errno.EFAULT, space.write, hva - 1, b"xy")
    assert _memory(space) == before


def test_access_spanning_two_mappings_is_efault() -> None:
    space = AddressSpace()
    a = space.mmap(P)
    b = space.mmap(P)
    lo = min(a, b)
    _raises(errno.EFAULT, space.read, lo + P - 1, 2)


# -- munmap ---------------------------------------------------------------------------------


def test_munmap_whole_mapping_only() -> None:
    space = AddressSpace()
    hva = space.mmap(2 * P)
    keep = space.mmap(P)
    space.write(keep, b"keep")
    _raises(errno.EINVAL, space.munmap, hva, P)  # part of a mapping
    _raises(errno.EINVAL, space.munmap, hva + P, P)
    _raises(errno.EINVAL, space.munmap, hva, 3 * P)
    assert space.read(hva, 1) == b"\0"
    (region,) = [r for r in space.regions() if r.hva == hva]
    space.munmap(hva, 2 * P)
    assert region.released and region.map.closed  # really unmapped, not just forgotten
    _raises(errno.EFAULT, space.read, hva, 1)
    _raises(errno.EFAULT, space.write, hva, b"x")
    _raises(errno.EINVAL, space.munmap, hva, 2 * P)  # already gone
    assert [r.hva for r in space.regions()] == [keep]
    assert space.read(keep, 4) == b"keep"


def test_munmap_closes_memfd() -> None:
    space = AddressSpace()
    hva = space.mmap(P, backing="memfd")
    fd = space.fd(hva)
    space.munmap(hva, P)
    with pytest.raises(OSError):
        os.fstat(fd)


# -- lifetime -------------------------------------------------------------------------------


def test_close_refuses_new_users_and_releases_when_owner_was_last() -> None:
    space = AddressSpace()
    hva = space.mmap(P)
    assert space.users == 1 and not space.closed and not space.released
    space.close()
    assert space.closed and space.released and space.users == 0
    assert space.mmget_not_zero() is False
    assert space.get_task_mm() is False
    assert space.users == 0
    _raises(errno.EFAULT, space.read, hva, 1)  # never touches freed memory
    _raises(errno.EFAULT, space.write, hva, b"x")
    _raises(errno.EFAULT, space.mmap, P)
    space.close()  # idempotent
    assert space.users == 0


def test_memory_outlives_the_owner_while_a_reference_is_held() -> None:
    space = AddressSpace()
    hva = space.mmap(P, backing="memfd")
    space.write(hva, b"alive")
    assert space.mmget_not_zero() is True  # an in-flight user
    assert space.users == 2
    space.close()
    assert space.closed and not space.released and space.users == 1
    assert space.mmget_not_zero() is False and space.get_task_mm() is False
    assert space.read(hva, 5) == b"alive"  # still mapped for the user that holds it
    regions = space.regions()
    space.mmput()
    assert space.released and space.users == 0
    assert all(r.released and r.map.closed for r in regions)
    _raises(errno.EFAULT, space.read, hva, 5)


def test_get_task_mm_counts_a_user_and_refuses_kernel_threads() -> None:
    space = AddressSpace()
    assert space.get_task_mm() is True
    assert space.users == 2
    space.mmput()
    kthread = AddressSpace(kthread=True)
    assert kthread.get_task_mm() is False
    assert kthread.mmget_not_zero() is True  # the upstream path does not care
    kthread.mmput()
    assert kthread.users == 1


def test_mmput_without_a_user_is_einval() -> None:
    space = AddressSpace()
    space.close()
    _raises(errno.EINVAL, space.mmput)
    assert space.users == 0


def test_vm_holds_the_memory_after_the_owner_exits(make_vm: Callable[[AddressSpace], Vm]) -> None:
    space = AddressSpace()
    hva = space.mmap(P)
    vm = make_vm(space)
    vm.set_memslot(0, 0, P, hva)
    vm.write_guest(0, b"guest")
    space.close()
    assert not space.released
    assert vm.read_guest(0, 5) == b"guest"
    vm.close()
    assert space.released
    _raises(errno.EFAULT, space.read, hva, 1)


def test_concurrent_users_count_exactly() -> None:
    space = AddressSpace()
    rounds = 2000

    def user() -> None:
        for _ in range(rounds):
            assert space.mmget_not_zero()
            space.mmput()
            assert space.get_task_mm()
            space.mmput()

    threads = [threading.Thread(target=user) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert space.users == 1


def test_lookups_stay_consistent_while_other_mappings_come_and_go() -> None:
    """A lock-free lookup never pairs one snapshot's starts with another's regions."""
    space = AddressSpace()
    stable = space.mmap(P)
    space.write(stable, b"stable")
    errors: list[BaseException] = []
    done = threading.Event()

    def churn() -> None:
        try:
            for _ in range(300):
                h = space.mmap(P)
                space.munmap(h, P)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)
        finally:
            done.set()

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # many more thread switches: more interleavings per run
    t = threading.Thread(target=churn)
    t.start()
    reads = 0
    while not done.is_set() or reads == 0:
        try:
            assert space.read(stable, 6) == b"stable"
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)
            break
        reads += 1
    t.join()
    sys.setswitchinterval(old_interval)
    assert errors == []


def _close_race_round(ref: str) -> None:
    space = AddressSpace()
    hva = space.mmap(P)
    space.write(hva, b"live")
    get = getattr(space, ref)
    errors: list[BaseException] = []
    granted = threading.Semaphore(0)

    def user() -> None:
        first = True
        try:
            for _ in range(100_000):
                if not get():
                    break
                try:
                    assert space.read(hva, 4) == b"live"
                finally:
                    space.mmput()
                if first:
                    first = False
                    granted.release()
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)
        finally:
            if first:
                granted.release()

    threads = [threading.Thread(target=user) for _ in range(3)]
    for t in threads:
        t.start()
    for _ in threads:
        granted.acquire()
    space.close()
    for t in threads:
        t.join()
    assert errors == []
    assert space.released and space.users == 0
    assert not get()


@pytest.mark.parametrize("ref", ["mmget_not_zero", "get_task_mm"])
def test_close_racing_users_never_exposes_freed_memory(ref: str) -> None:
    """A user that got its reference can always read; after close no reference is granted."""
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        for _ in range(20):
            _close_race_round(ref)
    finally:
        sys.setswitchinterval(old_interval)
