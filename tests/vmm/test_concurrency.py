"""Threads: harvests while a vCPU runs lose and duplicate nothing; two vCPUs run at once
(KVM_RUN releases the GIL) and both logs are reported; guest access from a device thread."""

from __future__ import annotations

import random
import struct
import threading

import pytest
from kvm_guests import CODE, STORE_TABLE, STORE_TABLE_SPACED, guest

from dmarw import AddressSpace, bitmap_pages
from dmarw.vmm.system import dirty_modes_usable, system

SIZE = 16 << 20
MODES = ("bitmap", "clear", "ring")


@pytest.mark.parametrize("mode", MODES)
def test_harvests_during_the_run_report_each_stored_page_exactly_once(space: AddressSpace, mode: str) -> None:
    if mode not in dirty_modes_usable(system()):
        pytest.skip(f"dirty={mode!r}: this KVM lacks the capability")
    vm, vcpu, hva = guest(space, STORE_TABLE_SPACED, size=SIZE, dirty=mode)
    pages = sorted(random.Random(5).sample(range(64, SIZE // 4096 - 16), 3000))
    space.write(hva + 0x2000, b"".join(struct.pack("<I", p << 12) for p in pages))
    vcpu.set_regs(rip=CODE, rsi=0x2000, rcx=len(pages))
    done = threading.Event()
    result: list[str] = []

    def vcpu_thread() -> None:
        result.append(vcpu.run().reason)
        done.set()

    t = threading.Thread(target=vcpu_thread)
    t.start()
    seen: list[int] = []
    harvests = 0
    while not done.is_set():
        seen += bitmap_pages(vm.get_dirty_log(0))
        harvests += 1
    t.join(60)
    seen += bitmap_pages(vm.get_dirty_log(0))
    assert result == ["hlt"]
    assert sorted(seen) == pages  # every page once: nothing lost, nothing reported twice
    assert harvests >= 2
    vm.close()


@pytest.mark.parametrize("mode", MODES)
def test_two_vcpus_in_two_threads(space: AddressSpace, mode: str) -> None:
    if mode not in dirty_modes_usable(system()):
        pytest.skip(f"dirty={mode!r}: this KVM lacks the capability")
    vm, v0, hva = guest(space, STORE_TABLE, size=SIZE, dirty=mode)
    v1 = vm.create_vcpu()
    rng = random.Random(9)
    both = rng.sample(range(64, SIZE // 4096 - 16), 2000)
    halves = (sorted(both[:1000]), sorted(both[1000:]))
    for i, (vcpu, half) in enumerate(zip((v0, v1), halves, strict=True)):
        table = 0x2000 + i * 0x1000
        space.write(hva + table, b"".join(struct.pack("<I", p << 12) for p in half))
        vcpu.set_regs(rip=CODE, rsi=table, rcx=len(half), rsp=SIZE - i * 0x1000)
    out: list[str] = []
    threads = [threading.Thread(target=lambda v=v: out.append(v.run().reason)) for v in (v0, v1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert out == ["hlt", "hlt"]
    assert bitmap_pages(vm.get_dirty_log(0)) == sorted(both)
    vm.close()


def test_device_thread_writes_while_the_vcpu_runs(space: AddressSpace) -> None:
    """write_guest from another thread during run(): logged in the user-space log and
    seen by get_dirty_log together with the vCPU's stores."""
    vm, vcpu, hva = guest(space, STORE_TABLE_SPACED, size=SIZE)
    guest_pages = list(range(100, 400))
    device_pages = list(range(1000, 1300))
    space.write(hva + 0x2000, b"".join(struct.pack("<I", p << 12) for p in guest_pages))
    vcpu.set_regs(rip=CODE, rsi=0x2000, rcx=len(guest_pages))
    t = threading.Thread(target=vcpu.run)
    t.start()
    for p in device_pages:
        vm.write_guest(p << 12, b"dev")
    t.join(60)
    assert bitmap_pages(vm.get_dirty_log(0)) == sorted(guest_pages + device_pages)
    assert vm.read_guest(1000 << 12, 3) == b"dev"
    vm.close()
