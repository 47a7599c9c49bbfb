"""The KVM path: memslot rules, guest access across pages and slots, the dirty log.

Every test runs on each core (the ``vm`` fixture is built by ``make_vm``)."""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

import pytest

from dmarw import PAGE_SIZE, AddressSpace, DmaError, Vm, bitmap_pages

P = PAGE_SIZE
G = 1 << 30  # a gpa far from the others
MakeVm = Callable[[AddressSpace], Vm]


def _slots(vm: Vm) -> list[tuple[int, int, int, int, bool, bool]]:
    return [(s.slot, s.gpa, s.size, s.hva, s.readonly, s.dirty.tracking) for s in vm.memslots()]


def _state(vm: Vm) -> tuple[object, ...]:
    """Everything a failing call must leave alone: slots, their memory, their dirty bits."""
    space = vm.space
    mem = [(r.hva, space.read(r.hva, r.size)) for r in space.regions()]
    dirty = [(s.slot, sorted(s.dirty.peek())) for s in vm.memslots()]
    return (_slots(vm), mem, dirty)


def _fails(vm: Vm, err: int, fn: Callable[..., Any], *args: Any, **kw: Any) -> DmaError:
    before = _state(vm)
    with pytest.raises(DmaError) as info:
        fn(*args, **kw)
    assert info.value.errno == err, info.value
    assert _state(vm) == before
    return info.value


@pytest.fixture
def space() -> AddressSpace:
    return AddressSpace()


@pytest.fixture
def vm(make_vm: MakeVm, space: AddressSpace) -> Vm:
    return make_vm(space)


def _pattern(n: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


# -- construction ---------------------------------------------------------------------------


def test_vm_takes_a_user_reference(make_vm: MakeVm, space: AddressSpace) -> None:
    vm = make_vm(space)
    assert space.users == 2
    vm.close()
    vm.close()  # idempotent
    assert space.users == 1


def test_vm_on_an_exited_owner_is_eperm(make_vm: MakeVm, space: AddressSpace) -> None:
    space.close()
    with pytest.raises(DmaError) as info:
        make_vm(space)
    assert info.value.errno == errno.EPERM


# -- set_memslot ----------------------------------------------------------------------------


def test_set_memslot_unaligned_is_einval(vm: Vm, space: AddressSpace) -> None:
    hva = space.mmap(4 * P)
    vm.set_memslot(0, 0, P, hva)
    _fails(vm, errno.EINVAL, vm.set_memslot, 1, G + 1, P, hva)
    _fails(vm, errno.EINVAL, vm.set_memslot, 1, G, P + 1, hva)
    _fails(vm, errno.EINVAL, vm.set_memslot, 1, G, P, hva + 8)
    _fails(vm, errno.EINVAL, vm.set_memslot, 1, -P, P, hva)
    _fails(vm, errno.EOVERFLOW, vm.set_memslot, 1, (1 << 64) - P, 2 * P, hva)  # wraps
    _fails(vm, errno.EINVAL, vm.set_memslot, 0, G, P // 2, hva)  # replace, still checked


def test_set_memslot_overlap_is_eexist(vm: Vm, space: AddressSpace) -> None:
    hva = space.mmap(8 * P)
    vm.set_memslot(0, 2 * P, 2 * P, hva)
    for gpa, size in [(2 * P, 2 * P), (P, 2 * P), (3 * P, 2 * P), (0, 8 * P), (3 * P, P)]:
        e = _fails(vm, errno.EEXIST, vm.set_memslot, 1, gpa, size, hva + 4 * P)
        assert hex(gpa) in str(e)
    vm.set_memslot(1, 0, 2 * P, hva + 4 * P)  # touching is not overlapping
    vm.set_memslot(2, 4 * P, P, hva + 6 * P)
    assert [s[:3] for s in _slots(vm)] == [(1, 0, 2 * P), (0, 2 * P, 2 * P), (2, 4 * P, P)]


def test_set_memslot_hva_must_be_mapped(vm: Vm, space: AddressSpace) -> None:
    hva = space.mmap(2 * P)
    _fails(vm, errno.EFAULT, vm.set_memslot, 0, 0, 3 * P, hva)
    assert vm.memslots() == ()


def test_delete_with_size_zero(vm: Vm, space: AddressSpace) -> None:
    hva = space.mmap(2 * P)
    vm.set_memslot(0, 0, P, hva)
    vm.set_memslot(1, P, P, hva + P)
    vm.write_guest(0, b"zero")
    vm.set_memslot(0, 0, 0, 0)
    assert [s[0] for s in _slots(vm)] == [1]
    _fails(vm, errno.EFAULT, vm.read_guest, 0, 1)
    assert space.read(hva, 4) == b"zero"  # the memory is the process's, not the slot's
    _fails(vm, errno.EINVAL, vm.set_memslot, 0, 0, 0, 0)  # no such slot any more
    vm.set_memslot(5, 0, P, hva)  # the gpa is free again
    assert vm.read_guest(0, 4) == b"zero"


def test_replace_moves_a_slot(vm: Vm, space: AddressSpace) -> None:
    a = space.mmap(2 * P)
    b = space.mmap(2 * P)
    space.write(a, b"AAAA")
    space.write(b, b"BBBB")
    vm.set_memslot(0, 0, 2 * P, a)
    vm.set_memslot(0, P, 2 * P, b)  # overlaps only itself: a replace
    assert _slots(vm) == [(0, P, 2 * P, b, False, False)]
    _fails(vm, errno.EFAULT, vm.read_guest, 0, 1)
    assert vm.read_guest(P, 4) == b"BBBB"
    vm.set_memslot(0, G, P, a, readonly=True, dirty_log=True)
    assert _slots(vm) == [(0, G, P, a, True, True)]


# -- guest access ---------------------------------------------------------------------------


def test_read_write_cross_pages_and_slots(vm: Vm, space: AddressSpace) -> None:
    a = space.mmap(2 * P)
    b = space.mmap(3 * P)
    vm.set_memslot(0, 0, 2 * P, a)
    vm.set_memslot(1, 2 * P, 3 * P, b)  # contiguous in gpa, not in hva
    data = _pattern(3 * P + 17, seed=3)
    vm.write_guest(P - 5, data)  # page 0 .. page 4 of the guest, both slots
    assert vm.read_guest(P - 5, len(data)) == data
    n_a = 2 * P - (P - 5)
    assert space.read(a + P - 5, n_a) == data[:n_a]
    assert space.read(b, len(data) - n_a) == data[n_a:]
    buf = bytearray(len(data))
    vm.read_guest_into(P - 5, buf)
    assert buf == data
    mv = memoryview(bytearray(100))
    vm.read_guest_into(2 * P - 50, mv)
    assert mv.tobytes() == data[n_a - 50 : n_a + 50]
    vm.write_guest(2 * P - 1, memoryview(b"xy"))
    assert space.read(a + 2 * P - 1, 1) == b"x" and space.read(b, 1) == b"y"


def test_access_through_a_slot_at_an_offset_in_the_mapping(vm: Vm, space: AddressSpace) -> None:
    hva = space.mmap(4 * P)
    vm.set_memslot(3, G, 2 * P, hva + 2 * P)
    vm.write_guest(G + 10, b"offset")
    assert space.read(hva + 2 * P + 10, 6) == b"offset"
    assert space.read(hva + 10, 6) == bytes(6)


def test_no_slot_is_efault_and_moves_no_byte(vm: Vm, space: AddressSpace) -> None:
    hva = space.mmap(4 * P)
    space.write(hva, _pattern(4 * P))
    vm.set_memslot(0, 0, P, hva)
    vm.set_memslot(1, 2 * P, P, hva + 2 * P)  # a hole at gpa P
    e = _fails(vm, errno.EFAULT, vm.write_guest, P - 4, b"12345678")
    assert hex(P) in str(e)
    _fails(vm, errno.EFAULT, vm.write_guest, 0, bytes(3 * P))  # hole in the middle
    _fails(vm, errno.EFAULT, vm.write_guest, 3 * P - 1, b"ab")  # runs past the end
    _fails(vm, errno.EFAULT, vm.read_guest, G, 1)
    buf = bytearray(b"\xee" * 3 * P)
    _fails(vm, errno.EFAULT, vm.read_guest_into, 0, buf)
    assert buf == b"\xee" * 3 * P
    _fails(vm, errno.EFAULT, vm.read_guest, (1 << 64) - 1, 2)  # outside guest physical space
    _fails(vm, errno.EFAULT, vm.read_guest, -P, 1)


def test_readonly_slot(vm: Vm, space: AddressSpace) -> None:
    hva = space.mmap(2 * P)
    space.write(hva + P, b"rom")
    vm.set_memslot(0, 0, P, hva, dirty_log=True)
    vm.set_memslot(1, P, P, hva + P, readonly=True, dirty_log=True)
    assert vm.read_guest(P, 3) == b"rom"
    _fails(vm, errno.EFAULT, vm.write_guest, P, b"x")
    _fails(vm, errno.EFAULT, vm.write_guest, P - 2, b"abcd")  # the writable part moves nothing
    assert vm.get_dirty_log(0) == bytes(8)
    assert vm.get_dirty_log(1) == bytes(8)


def test_read_into_a_read_only_buffer_is_einval(vm: Vm, space: AddressSpace) -> None:
    hva = space.mmap(P)
    vm.set_memslot(0, 0, P, hva, dirty_log=True)
    vm.write_guest(0, b"guest")
    vm.get_dirty_log(0)
    dst = b"\x00" * 5
    with pytest.raises(DmaError) as ei:
        vm.read_guest_into(0, dst)
    assert ei.value.errno == errno.EINVAL and "read-only" in str(ei.value) and "0x0+0x5" in str(ei.value)
    assert dst == b"\x00" * 5 and vm.read_guest(0, 5) == b"guest"
    assert vm.get_dirty_log(0) == bytes(8)


# -- dirty log ------------------------------------------------------------------------------


def test_dirty_log_get_and_clear(vm: Vm, space: AddressSpace) -> None:
    hva = space.mmap(4 * P)
    vm.set_memslot(0, G, 4 * P, hva, dirty_log=True)
    vm.write_guest(G + P - 1, b"ab")  # pages 0 and 1
    vm.write_guest(G + 3 * P, b"c")  # page 3
    vm.read_guest(G + 2 * P, P)  # reads do not dirty
    log = vm.get_dirty_log(0)
    assert len(log) == 8
    assert log == bytes([0b1011]) + bytes(7)
    assert vm.get_dirty_log(0) == bytes(8)
    vm.write_guest(G + 2 * P, bytes(P))  # exactly one page
    assert bitmap_pages(vm.get_dirty_log(0)) == [2]


def test_dirty_log_layout(vm: Vm, space: AddressSpace) -> None:
    npages = 130
    hva = space.mmap(npages * P)
    vm.set_memslot(7, 0, npages * P, hva, dirty_log=True)
    pages = [0, 7, 8, 63, 64, 65, 127, 128, 129]
    for p in pages:
        vm.write_guest(p * P + 100, b"d")
    log = vm.get_dirty_log(7)
    assert len(log) == (npages + 63) // 64 * 8 == 24
    expect = bytearray(24)
    for k in pages:
        expect[k // 8] |= 1 << (k % 8)
    assert log == bytes(expect)
    words = [int.from_bytes(log[i : i + 8], "little") for i in range(0, 24, 8)]
    assert words == [(1 << 0) | (1 << 7) | (1 << 8) | (1 << 63), 0b11 | (1 << 63), 0b11]
    assert bitmap_pages(log) == pages


def test_dirty_log_per_slot_and_enxio(vm: Vm, space: AddressSpace) -> None:
    hva = space.mmap(3 * P)
    vm.set_memslot(0, 0, P, hva, dirty_log=True)
    vm.set_memslot(1, P, 2 * P, hva + P)
    vm.write_guest(P - 1, b"xyz")  # dirties slot 0 page 0; slot 1 does not log
    _fails(vm, errno.ENXIO, vm.get_dirty_log, 1)
    with pytest.raises(DmaError) as info:
        vm.get_dirty_log(9)
    assert info.value.errno == errno.EINVAL
    assert vm.get_dirty_log(0) == b"\x01" + bytes(7)


def test_replacing_a_slot_resets_its_log(vm: Vm, space: AddressSpace) -> None:
    hva = space.mmap(P)
    vm.set_memslot(0, 0, P, hva, dirty_log=True)
    vm.write_guest(0, b"x")
    vm.set_memslot(0, 0, P, hva, dirty_log=False)
    _fails(vm, errno.ENXIO, vm.get_dirty_log, 0)
    vm.set_memslot(0, 0, P, hva, dirty_log=True)
    assert vm.get_dirty_log(0) == bytes(8)


def test_closed_vm_has_no_slots(vm: Vm, space: AddressSpace) -> None:
    hva = space.mmap(P)
    vm.set_memslot(0, 0, P, hva)
    vm.close()
    with pytest.raises(DmaError) as info:
        vm.read_guest(0, 1)
    assert info.value.errno == errno.EFAULT
    with pytest.raises(DmaError):
        vm.set_memslot(1, P, P, hva)


def test_host_munmap_under_a_slot_is_efault_and_moves_no_byte(vm: Vm, space: AddressSpace) -> None:
    live = space.mmap(P)
    gone = space.mmap(P)
    space.write(live, _pattern(P))
    vm.set_memslot(0, 0, P, live, dirty_log=True)
    vm.set_memslot(1, P, P, gone, dirty_log=True)
    space.munmap(gone, P)
    _fails(vm, errno.EFAULT, vm.write_guest, P - 4, b"12345678")  # the live page must not move
    buf = bytearray(b"\x55" * 16)
    _fails(vm, errno.EFAULT, vm.read_guest_into, P - 8, buf)
    assert buf == b"\x55" * 16
    assert vm.get_dirty_log(0) == bytes(8)
    assert vm.read_guest(0, 8) == _pattern(8)
