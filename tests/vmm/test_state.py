"""save()/restore(): a guest stopped mid-computation, saved, restored into a new KvmVm in
another process, resumes and ends with the checksum of an uninterrupted run; a blob that
is not this version, size or format is EINVAL and loads nothing."""

from __future__ import annotations

import errno
import multiprocessing
import struct

import pytest
from kvm_guests import COMPUTE, RESULT_PORT, TICK_PORT, guest

from dmarw import AddressSpace, DmaError
from dmarw.vmm.state import MAGIC, VERSION

SIZE = 4 << 20
ITERATIONS = 6 * 4096 + 123


def run_to_result(vcpu: object) -> tuple[int, int]:
    """Run, stepping over the tick exits, until the result; (checksum, ticks seen)."""
    ticks = 0
    while True:
        ex = vcpu.run()  # type: ignore[attr-defined]
        if ex.reason == "io" and ex.port == TICK_PORT:
            ticks += 1
            continue
        assert ex.reason == "io" and ex.port == RESULT_PORT, ex
        return ex.data, ticks


def resume_elsewhere(memory: bytes, state: bytes) -> tuple[int, int]:
    """In a fresh process: a new address space and KvmVm, guest RAM copied in, the vCPU
    restored from ``state``; runs to the result."""
    sp = AddressSpace()
    vm, vcpu, hva = guest(sp, COMPUTE, size=SIZE)
    sp.write(hva, memory)
    vcpu.restore(state)
    out = run_to_result(vcpu)
    vm.close()
    sp.close()
    return out


def test_save_restore_in_another_process_ends_with_the_same_checksum() -> None:
    sp = AddressSpace()
    vm, vcpu, _ = guest(sp, COMPUTE, size=SIZE)
    vcpu.set_regs(rcx=ITERATIONS)
    expected, ticks = run_to_result(vcpu)
    assert ticks == 6
    vm.close()
    sp.close()

    sp = AddressSpace()
    vm, vcpu, hva = guest(sp, COMPUTE, size=SIZE)
    vcpu.set_regs(rcx=ITERATIONS)
    for _ in range(3):  # stop at the third tick: mid-loop, SSE and memory state live
        ex = vcpu.run()
        assert ex.reason == "io" and ex.port == TICK_PORT
    state = vcpu.save()
    memory = sp.read(hva, SIZE)
    vm.close()
    sp.close()
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        checksum, later_ticks = pool.apply(resume_elsewhere, (memory, state))
    assert later_ticks == 3
    assert checksum == expected


def test_restore_rejects_bad_blobs_and_loads_nothing(space: AddressSpace) -> None:
    vm, vcpu, _ = guest(space, COMPUTE, size=SIZE)
    vcpu.set_regs(rax=7)
    good = vcpu.save()
    magic, version, nsec, length, crc = struct.unpack_from("<8sHHII", good)
    assert (magic, version) == (MAGIC, VERSION)
    body = good[20:]
    bad = {
        "empty": b"",
        "garbage": b"\x00" * 64,
        "other magic": b"XXXXXXXX" + good[8:],
        "newer version": struct.pack("<8sHHII", MAGIC, VERSION + 1, nsec, length, crc) + body,
        "truncated": good[:-1],
        "trailing byte": good + b"\x00",
        "flipped bit": good[:-10] + bytes([good[-10] ^ 1]) + good[-9:],
        "a section fewer": struct.pack("<8sHHII", MAGIC, VERSION, nsec - 1, length, crc) + body,
    }
    vcpu.set_regs(rax=9)
    for name, blob in bad.items():
        with pytest.raises(DmaError) as ei:
            vcpu.restore(blob)
        assert ei.value.errno == errno.EINVAL, name
    with pytest.raises(DmaError) as ei:
        vcpu.restore("not bytes")  # type: ignore[arg-type]
    assert ei.value.errno == errno.EINVAL
    assert vcpu.get_regs()["rax"] == 9  # nothing was loaded
    vcpu.restore(good)
    assert vcpu.get_regs()["rax"] == 7
    vm.close()


def test_state_carries_regs_sregs_fpu_and_msrs(space: AddressSpace) -> None:
    vm, vcpu, _ = guest(space, COMPUTE, size=SIZE)
    blob = vcpu.save()
    from dmarw.vmm.state import parse

    sections = parse(vcpu, blob)
    assert {b"REGS", b"SREG", b"MSRS"} <= set(sections)
    assert b"XSAV" in sections or b"FPU_" in sections
    (nmsrs,) = struct.unpack_from("<I", sections[b"MSRS"])
    assert nmsrs >= 1  # at least the TSC
    vm.close()
