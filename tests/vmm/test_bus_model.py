"""The device-bus rules against a plain model (hypothesis): ranges are accepted exactly
when they are non-empty, inside the space and overlap no range on the same bus (MMIO: and
no memslot); a refused add changes nothing; the guest reaches the device of each range."""

from __future__ import annotations

import errno

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kvm_asm import assemble
from kvm_guests import CODE, RESULT_PORT

from dmarw import AddressSpace, DmaError, KvmVm

RAM = 0x10000  # slot 0: [0, 64 KiB)
BASE = 0x8000  # MMIO ranges are drawn around the end of RAM: [BASE, BASE + 0x20000)


class Dev:
    def __init__(self, tag: int) -> None:
        self.tag = tag

    def mmio_read(self, offset: int, size: int) -> int:
        return (self.tag << 16) | offset

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        pass


ADDS = st.lists(
    st.tuples(st.integers(0, 0x20) .map(lambda k: BASE + k * 0x1000), st.sampled_from([0, 4, 0x1000, 0x3000])),
    min_size=1,
    max_size=10,
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(adds=ADDS)
def test_mmio_ranges_follow_the_model(adds: list[tuple[int, int]]) -> None:
    space = AddressSpace()
    hva = space.mmap(RAM)
    # esi = address: load the dword there and report it
    space.write(hva + CODE, assemble(f"mov (%esi), %eax\nout %eax, ${RESULT_PORT:#x}\nhlt\n", CODE))
    vm = KvmVm(space)
    vm.set_memslot(0, 0, RAM, hva)
    model: list[tuple[int, int, int]] = []  # (start, end, tag)
    for tag, (start, size) in enumerate(adds):
        if size == 0:
            want = errno.EINVAL
        elif start < RAM or any(start < e and s < start + size for s, e, _ in model):
            want = errno.EEXIST
        else:
            want = 0
        try:
            vm.add_mmio(start, size, Dev(tag))
            got = 0
        except DmaError as e:
            got = e.errno
        assert got == want, (start, size, model)
        if want == 0:
            model.append((start, start + size, tag))
        assert sorted((r.start, r.end) for r in vm.mmio.ranges()) == sorted((s, e) for s, e, _ in model)
    vcpu = vm.create_vcpu()
    for s, e, tag in model:
        if e - s < 4:
            continue
        vcpu.set_regs(rip=CODE, rsi=s)
        ex = vcpu.run()
        assert ex.reason == "io" and ex.data == tag << 16, (hex(s), ex)
    vm.close()
    space.close()
