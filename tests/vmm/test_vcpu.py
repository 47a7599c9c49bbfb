"""vCPUs: registers, the two start modes, the exits, and kick() from another thread."""

from __future__ import annotations

import errno
import threading

import pytest
from kvm_asm import assemble
from kvm_guests import CODE, MMIO_BASE, RESULT_PORT, SPIN, guest

from dmarw import AddressSpace, DmaError, KvmVm


def test_registers_round_trip_and_bad_input_changes_nothing(space: AddressSpace) -> None:
    vm, vcpu, _ = guest(space, SPIN)
    vcpu.set_regs(rax=1, rbx=2, r15=(1 << 64) - 1, rflags=0x202)
    regs = vcpu.get_regs()
    assert (regs["rax"], regs["rbx"], regs["r15"], regs["rflags"], regs["rip"]) == (1, 2, (1 << 64) - 1, 0x202, CODE)
    vcpu.rip = 0x2000
    assert vcpu.rip == 0x2000
    for bad in ({"rax": 5, "eax": 1}, {"rax": 5, "rbx": -1}, {"rax": 5, "rcx": 1 << 64}, {"rax": 5, "rdx": 1.0}):
        with pytest.raises(DmaError) as ei:
            vcpu.set_regs(**bad)  # type: ignore[arg-type]
        assert ei.value.errno == errno.EINVAL
    assert vcpu.get_regs()["rax"] == 1  # nothing was set
    vm.close()


def test_protected_mode_is_32_bit_flat(space: AddressSpace) -> None:
    vm, vcpu, _ = guest(space, SPIN)
    s = vcpu.get_sregs()
    assert s.cr0 & 1 and not s.cr0 & (1 << 31)  # PE on, paging off
    for seg in (s.cs, s.ds, s.es, s.fs, s.gs, s.ss):
        assert (seg.base, seg.limit, seg.present, seg.db, seg.g) == (0, 0xFFFFFFFF, 1, 1, 1)
    assert s.cs.type & 0x8 and not s.ds.type & 0x8  # code, data
    vm.close()


def test_real_mode_guest(space: AddressSpace) -> None:
    hva = space.mmap(1 << 20)
    vm = KvmVm(space)
    vm.set_memslot(0, 0, 1 << 20, hva)
    program = f"""
        mov $0x1234, %ax
        add %cs:0x10, %ax       # a load through CS: base 0 in real mode
        out %ax, ${RESULT_PORT:#x}
        hlt
    """
    space.write(hva + CODE, assemble(program, CODE, bits=16))
    space.write(hva + 0x10, (0x1111).to_bytes(2, "little"))
    vcpu = vm.create_vcpu("real")
    assert not vcpu.get_sregs().cr0 & 1
    vcpu.rip = CODE
    ex = vcpu.run()
    assert (ex.reason, ex.port, ex.size, ex.is_write, ex.data) == ("io", RESULT_PORT, 2, True, 0x2345)
    assert vcpu.run().reason == "hlt"
    vm.close()


def test_shutdown_exit_on_a_triple_fault(space: AddressSpace) -> None:
    vm, vcpu, _ = guest(space, "ud2\n")  # #UD with no IDT: #DF, then a triple fault
    s = vcpu.get_sregs()
    s.idt.base, s.idt.limit = 0, 0
    vcpu.set_sregs(s)
    assert vcpu.run().reason == "shutdown"
    vm.close()


def test_bad_mode_and_closed_vcpu(space: AddressSpace) -> None:
    vm, vcpu, _ = guest(space, SPIN)
    with pytest.raises(DmaError) as ei:
        vm.create_vcpu("long")
    assert ei.value.errno == errno.EINVAL
    vcpu.close()
    with pytest.raises(DmaError) as ei:
        vcpu.run()
    assert ei.value.errno == errno.EBADF
    vm.close()
    with pytest.raises(DmaError):
        vm.create_vcpu()


class Started:
    """An MMIO device whose first write says the guest is running."""

    def __init__(self) -> None:
        self.running = threading.Event()

    def mmio_read(self, offset: int, size: int) -> int:
        return 0

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        self.running.set()


# 100000 iterations, an MMIO write (the device learns the guest runs), then spin
SPIN_AFTER_MMIO = f"""
1:  inc %eax
    cmp $100000, %eax
    jne 1b
    movl $1, {MMIO_BASE:#x}
{SPIN}
"""


def test_kick_from_another_thread_stops_a_spinning_guest(space: AddressSpace) -> None:
    vm, vcpu, _ = guest(space, SPIN_AFTER_MMIO)
    dev = Started()
    vm.add_mmio(MMIO_BASE, 0x1000, dev)
    out: list[str] = []
    t = threading.Thread(target=lambda: out.append(vcpu.run().reason))
    t.start()
    assert dev.running.wait(30)
    vcpu.kick()
    t.join(30)
    assert not t.is_alive() and out == ["intr"]
    assert vcpu.get_regs()["rax"] >= 100000  # it ran up to the MMIO write
    # the vCPU resumes after an intr; a kick from a timer thread stops it again
    threading.Timer(0.05, vcpu.kick).start()
    assert vcpu.run().reason == "intr"
    vm.close()


def test_no_kick_is_lost_before_run(space: AddressSpace) -> None:
    vm, vcpu, _ = guest(space, SPIN)
    vcpu.kick()  # before run(): the next run returns at once, the guest does not move
    assert vcpu.run().reason == "intr"
    assert vcpu.rip == CODE
    out: list[str] = []
    for _ in range(20):  # a kick racing with the thread's entry into KVM_RUN
        t = threading.Thread(target=lambda: out.append(vcpu.run().reason))
        t.start()
        vcpu.kick()
        t.join(30)
    assert out == ["intr"] * 20
    vm.close()


def test_close_releases_every_fd_and_mapping() -> None:
    import os

    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    def maps() -> int:
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)

    for mode in ("bitmap", "ring"):  # the ring adds a mapping per vCPU
        sp = AddressSpace()
        vm, _v, _ = guest(sp, SPIN, dirty=mode)
        vm.close()
        sp.close()
    before_fds, before_maps = fds(), maps()
    for mode in ("bitmap", "ring"):
        sp = AddressSpace()
        vm, _v, _ = guest(sp, SPIN, dirty=mode)
        vm.create_vcpu()
        vm.close()
        vm.close()  # idempotent
        sp.close()
    assert fds() == before_fds
    assert maps() <= before_maps


def test_one_thread_runs_a_vcpu_and_a_running_vm_does_not_close(space: AddressSpace) -> None:
    vm, vcpu, _ = guest(space, SPIN_AFTER_MMIO)
    dev = Started()
    vm.add_mmio(MMIO_BASE, 0x1000, dev)
    out: list[str] = []
    t = threading.Thread(target=lambda: out.append(vcpu.run().reason))
    t.start()
    assert dev.running.wait(30)
    for call in (vcpu.run, vcpu.close, vm.close):
        with pytest.raises(DmaError) as ei:
            call()
        assert ei.value.errno == errno.EBUSY
    assert vcpu.running
    vcpu.kick()
    t.join(30)
    assert out == ["intr"] and not vcpu.running
    vm.close()


def test_a_callback_that_replaces_the_bus_mid_rep(space: AddressSpace) -> None:
    """rep outsb into a device whose first write removes its own range: the remaining
    items of that exit still reach it (the loop holds the range), later exits do not."""
    program = """
        mov $msg, %esi
        mov $4, %ecx
        mov $0x3f8, %dx
        rep outsb
        hlt
    msg: .ascii "abcd"
    """
    vm, vcpu, _ = guest(space, program)
    got: list[int] = []

    class SelfRemoving:
        def pio_read(self, offset: int, size: int) -> int:
            return 0

        def pio_write(self, offset: int, size: int, value: int) -> None:
            got.append(value)
            if len(got) == 1:
                vm.remove_pio(0x3F8)

    vm.add_pio(0x3F8, 1, SelfRemoving())
    exits = []
    while (ex := vcpu.run()).reason == "io":
        exits.append(ex.data)
    assert ex.reason == "hlt"
    assert bytes(got + exits) == b"abcd"  # every item once, to the device or returned
    vm.close()
