"""The dirty log in each mode: a guest that stores to pages P reports exactly P; the log is
get-and-clear; write_guest's pages are in it; the three modes report the same pages, also
when the vCPU's dirty ring fills mid-run."""

from __future__ import annotations

import errno
import random
import struct

import pytest
from kvm_guests import CODE, STORE_TABLE, STORE_TABLE_SPACED, guest

from dmarw import AddressSpace, DmaError, KvmVm, bitmap_pages
from dmarw.vmm.system import dirty_modes_usable, system

MODES = ("bitmap", "clear", "ring")
SIZE = 8 << 20
TABLE = 0x2000  # the address table lives in page 2 (written through the host mapping)


def usable(mode: str) -> None:
    if mode not in dirty_modes_usable(system()):
        pytest.skip(f"dirty={mode!r}: this KVM lacks the capability")


def store_pages(vm: KvmVm, hva: int, space: AddressSpace, pages: list[int], *, offset: int = 0x10) -> str:
    """Run STORE_TABLE over ``pages`` (page numbers of slot 0); returns the exit reason."""
    vcpu = vm.vcpus[0]
    space.write(hva + TABLE, b"".join(struct.pack("<I", (p << 12) + offset) for p in pages))
    vcpu.set_regs(rip=CODE, rsi=TABLE, rcx=len(pages))
    return vcpu.run().reason


def guest_pages(rng: random.Random, n: int) -> list[int]:
    """n distinct pages of the slot, away from the code, table and stack pages."""
    return sorted(rng.sample(range(16, SIZE // 4096 - 16), n))


@pytest.mark.parametrize("mode", MODES)
def test_guest_stores_report_exactly_those_pages_then_clear(space: AddressSpace, mode: str) -> None:
    usable(mode)
    vm, _vcpu, hva = guest(space, STORE_TABLE, size=SIZE, dirty=mode)
    assert bitmap_pages(vm.get_dirty_log(0)) == []  # nothing stored yet (host writes are invisible)
    rng = random.Random(10)
    p = guest_pages(rng, 300)
    assert store_pages(vm, hva, space, p) == "hlt"
    assert bitmap_pages(vm.get_dirty_log(0)) == p
    assert bitmap_pages(vm.get_dirty_log(0)) == []  # get-and-clear
    q = guest_pages(rng, 40)  # stored again, some pages overlapping the first round's
    assert store_pages(vm, hva, space, q, offset=0x20) == "hlt"
    assert bitmap_pages(vm.get_dirty_log(0)) == q
    vm.close()


@pytest.mark.parametrize("mode", MODES)
def test_user_space_writes_are_logged_with_the_guests(space: AddressSpace, mode: str) -> None:
    usable(mode)
    vm, _vcpu, hva = guest(space, STORE_TABLE, size=SIZE, dirty=mode)
    p = [100, 101, 500]
    assert store_pages(vm, hva, space, p) == "hlt"
    vm.write_guest(200 << 12, b"x")  # one page
    vm.write_guest((300 << 12) + 4000, bytes(200))  # crosses into page 301
    vm.write_guest(101 << 12, b"y")  # also a guest page: reported once
    assert bitmap_pages(vm.get_dirty_log(0)) == [100, 101, 200, 300, 301, 500]
    assert bitmap_pages(vm.get_dirty_log(0)) == []
    # the same round, the two logs apart
    assert store_pages(vm, hva, space, p, offset=0x40) == "hlt"
    vm.write_guest(200 << 12, b"x")
    vm.write_guest(101 << 12, b"y")
    kernel, user = vm.get_dirty_logs(0)
    assert (bitmap_pages(kernel), bitmap_pages(user)) == (p, [101, 200])
    assert vm.get_dirty_logs(0) == (bytes(len(kernel)), bytes(len(user)))
    assert vm.read_guest((300 << 12) + 4000, 4) == bytes(4)
    vm.close()


def test_the_three_modes_agree_including_a_full_ring() -> None:
    """The same guest run (more pages than the ring holds) in each usable mode."""
    rng = random.Random(7)
    rounds = [guest_pages(rng, n) for n in (1500, 10, 700)]
    results: dict[str, list[list[int]]] = {}
    full_exits = 0
    for mode in dirty_modes_usable(system()):
        sp = AddressSpace()
        vm, vcpu, hva = guest(sp, STORE_TABLE_SPACED, size=SIZE, dirty=mode, ring_entries=512)
        got = []
        for pages in rounds:
            assert store_pages(vm, hva, sp, pages) == "hlt"
            got.append(bitmap_pages(vm.get_dirty_log(0)))
        results[mode] = got
        if mode == "ring":
            full_exits = vcpu.stats["ring_full"]
        vm.close()
        sp.close()
    assert all(r == rounds for r in results.values()), {m: [len(x) for x in r] for m, r in results.items()}
    if "ring" in results:
        assert full_exits >= 2  # 1500 and 700 stores into a 512-entry ring: it filled inside run()


def test_two_slots_are_logged_apart(space: AddressSpace) -> None:
    vm, _vcpu, hva = guest(space, STORE_TABLE, size=SIZE)
    hva2 = space.mmap(1 << 20)
    vm.set_memslot(1, 0x4000_0000, 1 << 20, hva2, dirty_log=True)
    vcpu = vm.vcpus[0]
    space.write(hva + TABLE, struct.pack("<III", 0x4000_0000 + (3 << 12), 50 << 12, 0x4000_0000 + (255 << 12)))
    vcpu.set_regs(rip=CODE, rsi=TABLE, rcx=3)
    assert vcpu.run().reason == "hlt"
    assert bitmap_pages(vm.get_dirty_log(1)) == [3, 255]
    assert bitmap_pages(vm.get_dirty_log(0)) == [50]
    assert len(vm.get_dirty_log(1)) == (256 + 63) // 64 * 8  # the layout of dmarw.Vm
    vm.close()


def test_dirty_log_errors(space: AddressSpace) -> None:
    vm, _vcpu, hva = guest(space, STORE_TABLE, size=SIZE, dirty_log=False)
    with pytest.raises(DmaError) as ei:
        vm.get_dirty_log(0)  # the slot does not log
    assert ei.value.errno == errno.ENXIO
    with pytest.raises(DmaError) as ei:
        vm.get_dirty_log(7)  # no such slot
    assert ei.value.errno == errno.EINVAL
    vm.set_memslot(0, 0, SIZE, hva, dirty_log=True)  # logging switched on: starts empty
    assert bitmap_pages(vm.get_dirty_log(0)) == []
    vm.close()


@pytest.mark.parametrize(("kw", "err"), [
    ({"dirty": "bogus"}, errno.EINVAL),
    ({"dirty": "ring", "ring_entries": 1000}, errno.EINVAL),  # not a power of two
    ({"dirty": "ring", "ring_entries": 16}, errno.EINVAL),  # smaller than a page
    ({"dirty": "ring", "ring_entries": 1 << 30}, errno.EINVAL),  # past KVM's maximum
])
def test_bad_dirty_arguments(space: AddressSpace, kw: dict[str, object], err: int) -> None:
    if kw.get("dirty") == "ring":
        usable("ring")
    with pytest.raises(DmaError) as ei:
        KvmVm(space, **kw)  # type: ignore[arg-type]
    assert ei.value.errno == err
    assert space.users == 1  # nothing was taken


def test_a_ring_overrun_is_an_error_never_a_silent_loss(space: AddressSpace) -> None:
    """Dense stores into a small ring: where KVM overshoots the ring's soft limit (an
    emulating hypervisor), run() or get_dirty_log raises EOVERFLOW; otherwise the log is
    exact.  Either way no harvest reports fewer pages than were stored."""
    usable("ring")
    vm, _vcpu, hva = guest(space, STORE_TABLE, size=SIZE, dirty="ring", ring_entries=256)
    rng = random.Random(3)
    for _ in range(3):
        p = guest_pages(rng, 1200)
        try:
            assert store_pages(vm, hva, space, p) == "hlt"
            got = bitmap_pages(vm.get_dirty_log(0))
        except DmaError as e:
            assert e.errno == errno.EOVERFLOW, e
            with pytest.raises(DmaError) as ei:  # the mode stays failed
                vm.get_dirty_log(0)
            assert ei.value.errno == errno.EOVERFLOW
            break
        assert got == p
    vm.close()


def test_default_mode_is_the_measured_fastest_where_offered(space: AddressSpace) -> None:
    from dmarw.vmm import DEFAULT_DIRTY

    vm = KvmVm(space)
    expected = DEFAULT_DIRTY if DEFAULT_DIRTY in dirty_modes_usable(system()) else "bitmap"
    assert vm.dirty == expected
    vm.close()
