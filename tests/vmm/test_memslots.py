"""Memslots against the kernel: the rules of dmarw.Vm (a property test drives both with
the same operations), the kernel's own refusals, read-only slots, and guest access
through the slots in both directions."""

from __future__ import annotations

import errno

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kvm_asm import assemble
from kvm_guests import CODE, RESULT_PORT

from dmarw import AddressSpace, DmaError, KvmVm, Vm

PAGE = 4096
# esi = address; loads the dword there, reports it, stores edx there, halts
LOAD_STORE = f"""
    mov (%esi), %eax
    out %eax, ${RESULT_PORT:#x}
    mov %edx, (%esi)
    hlt
"""


def code_vm(space: AddressSpace) -> tuple[KvmVm, int]:
    """A KvmVm with LOAD_STORE in slot 0 (64 KiB at gpa 0) and one vCPU."""
    hva = space.mmap(0x10000)
    space.write(hva + CODE, assemble(LOAD_STORE, CODE))
    vm = KvmVm(space)
    vm.set_memslot(0, 0, 0x10000, hva)
    vm.create_vcpu()
    return vm, hva


def guest_load_store(vm: KvmVm, gpa: int, value: int) -> tuple[int, str]:
    """The guest loads the dword at gpa (returned) and stores value there; (loaded, last exit)."""
    vcpu = vm.vcpus[0]
    vcpu.set_regs(rip=CODE, rsi=gpa, rdx=value)
    ex = vcpu.run()
    assert ex.reason == "io" and ex.port == RESULT_PORT, ex
    loaded = ex.data
    assert loaded is not None
    return loaded, vcpu.run().reason


def test_guest_and_user_space_see_the_same_memory(space: AddressSpace) -> None:
    vm, _ = code_vm(space)
    hva = space.mmap(0x4000)
    vm.set_memslot(3, 0x100000, 0x4000, hva)
    vm.write_guest(0x102000, (0xABCD1234).to_bytes(4, "little"))
    loaded, last = guest_load_store(vm, 0x102000, 0x55AA55AA)
    assert (loaded, last) == (0xABCD1234, "hlt")
    assert vm.read_guest(0x102000, 4) == (0x55AA55AA).to_bytes(4, "little")
    buf = bytearray(4)
    vm.read_guest_into(0x102000, buf)
    assert bytes(buf) == space.read(hva + 0x2000, 4)
    vm.close()


def test_memslot_rules(space: AddressSpace) -> None:
    vm, _ = code_vm(space)
    hva = space.mmap(0x10000)
    cases = [
        ((1, 0x100800, 0x1000, hva), errno.EINVAL),  # gpa not aligned
        ((1, 0x100000, 0x1800, hva), errno.EINVAL),  # size not aligned
        ((1, 0x100000, 0x1000, hva + 8), errno.EINVAL),  # hva not aligned
        ((1, 0x8000, 0x10000, hva), errno.EEXIST),  # overlaps slot 0
        ((1, 0x100000, 0x20000, hva), errno.EFAULT),  # past the mapping
        ((5, 0, 0, 0), errno.EINVAL),  # delete a slot that does not exist
        ((vm.max_slots, 0x100000, 0x1000, hva), errno.EINVAL),  # past KVM's slot ids
        ((1, 1 << 52, 0x1000, hva), errno.EINVAL),  # the kernel refuses: past the guest's physical bits
    ]
    for args, err in cases:
        with pytest.raises(DmaError) as ei:
            vm.set_memslot(*args)
        assert ei.value.errno == err, (args, ei.value)
        assert [s.slot for s in vm.memslots()] == [0], args  # nothing changed
    vm.set_memslot(1, 0x100000, 0x1000, hva)
    vm.set_memslot(1, 0, 0, 0)  # size 0 deletes
    assert [s.slot for s in vm.memslots()] == [0]
    vm.close()


def test_replacing_a_slot_remaps_it_for_the_guest(space: AddressSpace) -> None:
    vm, _ = code_vm(space)
    a, b = space.mmap(0x2000), space.mmap(0x4000)
    space.write(a, b"AAAA")
    space.write(b, b"BBBB")
    vm.set_memslot(1, 0x100000, 0x2000, a)
    assert guest_load_store(vm, 0x100000, 0)[0] == int.from_bytes(b"AAAA", "little")
    vm.set_memslot(1, 0x200000, 0x4000, b)  # another gpa, size and hva: delete + create
    assert guest_load_store(vm, 0x200000, 0)[0] == int.from_bytes(b"BBBB", "little")
    vcpu = vm.vcpus[0]
    vcpu.set_regs(rip=CODE, rsi=0x100000)
    ex = vcpu.run()
    assert ex.reason == "mmio" and ex.address == 0x100000  # the old range is gone
    vm.close()


def test_read_only_slot(space: AddressSpace) -> None:
    vm, _ = code_vm(space)
    hva = space.mmap(0x1000)
    space.write(hva, b"\x11\x22\x33\x44")
    vm.set_memslot(2, 0x300000, 0x1000, hva, readonly=True)
    vcpu = vm.vcpus[0]
    vcpu.set_regs(rip=CODE, rsi=0x300000, rdx=0x99)
    assert vcpu.run().data == 0x44332211  # loads work
    ex = vcpu.run()  # the store exits as MMIO, memory unchanged
    assert (ex.reason, ex.address, ex.is_write, ex.data) == ("mmio", 0x300000, True, 0x99)
    assert space.read(hva, 4) == b"\x11\x22\x33\x44"
    with pytest.raises(DmaError) as ei:
        vm.write_guest(0x300000, b"x")
    assert ei.value.errno == errno.EFAULT
    vm.close()


OPS = st.lists(
    st.tuples(
        st.integers(0, 3),  # slot
        st.integers(0, 40).map(lambda p: p * PAGE) | st.just(0x800),  # gpa (sometimes unaligned)
        st.sampled_from([0, PAGE, 2 * PAGE, 8 * PAGE, 0x1800]),  # size (0 deletes)
        st.integers(0, 8),  # page of the mapping
        st.booleans(),  # readonly
        st.booleans(),  # dirty_log
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_kvmvm_follows_the_vm_model(ops: list[tuple[int, int, int, int, bool, bool]]) -> None:
    """The same set_memslot sequence on dmarw.Vm (the model) and KvmVm: the same errnos
    and slots; then the guest reads each slot's first dword from the right host memory."""
    space = AddressSpace()
    hva = space.mmap(16 * PAGE)
    for p in range(16):
        space.write(hva + p * PAGE, (0x1000 + p).to_bytes(4, "little"))
    model, real = Vm(space), KvmVm(space)
    code = space.mmap(PAGE)
    space.write(code, assemble(LOAD_STORE.replace("mov %edx, (%esi)\n", ""), 0xF0000000))
    real.set_memslot(100, 0xF0000000, PAGE, code)  # the program, out of the way
    model.set_memslot(100, 0xF0000000, PAGE, code)
    for slot, gpa, size, page, ro, log in ops:
        args = (slot, gpa + 0x100000, size, hva + page * PAGE)
        errs = []
        for vm in (model, real):
            try:
                vm.set_memslot(*args, readonly=ro, dirty_log=log)
                errs.append(0)
            except DmaError as e:
                errs.append(e.errno)
        assert errs[0] == errs[1], (args, errs)
        assert [(s.slot, s.gpa, s.size, s.hva, s.readonly) for s in model.memslots()] == [
            (s.slot, s.gpa, s.size, s.hva, s.readonly) for s in real.memslots()
        ]
    vcpu = real.create_vcpu()
    for s in real.memslots():
        if s.slot == 100:
            continue
        vcpu.set_regs(rip=0xF0000000, rsi=s.gpa)
        ex = vcpu.run()
        assert ex.reason == "io" and ex.data == int.from_bytes(space.read(s.hva, 4), "little")
        assert vcpu.run().reason == "hlt"
    real.close()
    model.close()
    space.close()
