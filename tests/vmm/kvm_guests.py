"""The test guests, as assembly text (32-bit flat protected mode unless said), and helpers
to load and run them.  Conventions: code is linked and loaded at ``CODE`` (guest-physical);
inputs come in registers set with ``vcpu.set_regs``; results come out through a port
(``RESULT_PORT``, not served by any device so ``run()`` returns the ``io`` exit)."""

from __future__ import annotations

from kvm_asm import assemble

from dmarw import AddressSpace, KvmVm
from dmarw.vmm import Vcpu

CODE = 0x1000
MMIO_BASE = 0xD000_0000
DEV_PORT = 0x3F0
RESULT_PORT = 0xE9
TICK_PORT = 0x70

# esi = table of ecx 32-bit guest-physical addresses; stores ecx (a non-zero count) to each
STORE_TABLE = """
1:  test %ecx, %ecx
    jz 2f
    mov (%esi), %edi
    mov %ecx, (%edi)
    add $4, %esi
    dec %ecx
    jmp 1b
2:  hlt
"""

# STORE_TABLE with ~130 instructions between stores: on a hypervisor that emulates guest
# instructions in batches (PVM), few stores land in one batch, so a vCPU's dirty ring does
# not overshoot its soft limit by more than KVM's 64-entry reserve
STORE_TABLE_SPACED = """
1:  test %ecx, %ecx
    jz 2f
    mov (%esi), %edi
    mov %ecx, (%edi)
    mov $64, %edx
3:  dec %edx
    jnz 3b
    add $4, %esi
    dec %ecx
    jmp 1b
2:  hlt
"""

# MMIO and port traffic: a store, a load, 1/2/8-byte accesses, out/in, rep outsb
DEVICE_IO = f"""
    mov $0x11223344, %eax
    mov %eax, {MMIO_BASE:#x}           # mmio write 4 B at offset 0
    mov {MMIO_BASE + 8:#x}, %ebx       # mmio read 4 B at offset 8 -> ebx
    movb $0x5a, {MMIO_BASE + 0x10:#x}  # mmio write 1 B
    movw {MMIO_BASE + 0x12:#x}, %bp    # mmio read 2 B -> bp
    movq {MMIO_BASE + 0x20:#x}, %mm0   # mmio read 8 B (MMX: KVM emulates 0f 6f / 0f 7f)
    movq %mm0, {MMIO_BASE + 0x28:#x}   # mmio write 8 B (the same value back)
    mov $0xa5, %al
    mov ${DEV_PORT:#x}, %dx
    out %al, %dx                       # port write 1 B at offset 0
    mov ${DEV_PORT + 2:#x}, %dx
    in %dx, %ax                        # port read 2 B at offset 2 -> ax (low half of eax)
    mov %eax, %edx
    mov $msg, %esi
    mov $3, %ecx
    push %edx
    mov ${DEV_PORT + 4:#x}, %dx
    rep outsb                          # 3 port writes at offset 4
    pop %edx
    hlt
msg: .ascii "kvm"
"""

# An endless loop: only a kick ends run()
SPIN = """
1:  inc %eax
    jmp 1b
"""

# ecx iterations of integer, stack and memory state (general registers only: this
# machine's hypervisor emulates batches of instructions after an exit and its emulator has
# no SSE/MMX); every 4096 iterations an `out` to TICK_PORT; the end reports the mix of the
# registers and the memory sum on RESULT_PORT.
COMPUTE = f"""
    mov $0x12345, %eax
    xor %ebx, %ebx
    mov $0x9e3779b9, %ebp
    push $0x5bd1e995
1:  imul $1103515245, %eax, %eax
    add $12345, %eax
    mov %ebx, %edi
    and $255, %edi
    add %eax, 0x100000(,%edi,4)      # a 1 KiB array at 1 MiB
    xor %eax, %ebp
    rol $5, %ebp
    addl %ebp, (%esp)
    inc %ebx
    test $4095, %ebx
    jnz 2f
    out %eax, ${TICK_PORT:#x}
2:  cmp %ecx, %ebx
    jne 1b
    xor %ebp, %eax
    pop %edx
    xor %edx, %eax
    xor %edi, %edi
3:  add 0x100000(,%edi,4), %eax
    inc %edi
    cmp $256, %edi
    jne 3b
    out %eax, ${RESULT_PORT:#x}
    hlt
"""


def guest(space: AddressSpace, program: str, *, size: int = 4 << 20, dirty: str = "bitmap",
          ring_entries: int | None = None, dirty_log: bool = True) -> tuple[KvmVm, Vcpu, int]:
    """A VM with one slot of ``size`` bytes at gpa 0, ``program`` loaded at CODE, one
    protected-mode vCPU at its entry with the stack at the top; returns (vm, vcpu, hva)."""
    hva = space.mmap(size, backing="memfd")
    vm = KvmVm(space, dirty=dirty, ring_entries=ring_entries)
    vm.set_memslot(0, 0, size, hva, dirty_log=dirty_log)
    space.write(hva + CODE, assemble(program, CODE))
    vcpu = vm.create_vcpu()
    vcpu.set_regs(rip=CODE, rsp=size)  # the stack grows down from the top of RAM
    return vm, vcpu, hva
