"""MMIO and port dispatch inside run(): values read by the guest come from the device,
writes carry the guest's value, the vCPU resumes; the bus rules (EEXIST, EINVAL)."""

from __future__ import annotations

import errno
import threading

import pytest

from dmarw import AddressSpace, DmaError

from .kvm_guests import CODE, DEV_PORT, DEVICE_IO, MMIO_BASE, guest


class Recorder:
    """A device that answers reads from a table and records every access."""

    def __init__(self, values: dict[int, int] | None = None) -> None:
        self.values = values or {}
        self.log: list[tuple[str, int, int, int | None]] = []

    def mmio_read(self, offset: int, size: int) -> int:
        self.log.append(("r", offset, size, None))
        return self.values.get(offset, 0)

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        self.log.append(("w", offset, size, value))

    pio_read = mmio_read
    pio_write = mmio_write


def test_mmio_and_port_dispatch(space: AddressSpace) -> None:
    vm, vcpu, _ = guest(space, DEVICE_IO)
    mmio = Recorder({8: 0xCAFEF00D, 0x12: 0xBEEF, 0x20: 0x0123456789ABCDEF})
    pio = Recorder({2: 0x7E57})
    vm.add_mmio(MMIO_BASE, 0x1000, mmio)
    vm.add_pio(DEV_PORT, 8, pio)
    ex = vcpu.run()
    assert ex.reason == "hlt"
    regs = vcpu.get_regs()
    assert regs["rbx"] == 0xCAFEF00D
    assert regs["rbp"] & 0xFFFF == 0xBEEF
    assert regs["rdx"] & 0xFFFF == 0x7E57  # in %dx,%ax then mov %eax,%edx
    assert mmio.log == [
        ("w", 0, 4, 0x11223344),
        ("r", 8, 4, None),
        ("w", 0x10, 1, 0x5A),
        ("r", 0x12, 2, None),
        ("r", 0x20, 8, None),
        ("w", 0x28, 8, 0x0123456789ABCDEF),
    ]
    assert pio.log == [("w", 0, 1, 0xA5), ("r", 2, 2, None), ("w", 4, 1, ord("k")), ("w", 4, 1, ord("v")),
                       ("w", 4, 1, ord("m"))]
    st = vcpu.stats
    # rep outsb: KVM may batch the three items into one exit (count 3) or exit per item
    assert st["mmio"] == 6 and 3 <= st["pio"] <= 5
    vm.close()


def test_unserved_access_returns_and_complete_answers(space: AddressSpace) -> None:
    vm, vcpu, _ = guest(space, DEVICE_IO)
    ex = vcpu.run()
    assert (ex.reason, ex.address, ex.size, ex.is_write, ex.data) == ("mmio", MMIO_BASE, 4, True, 0x11223344)
    ex = vcpu.run()
    assert (ex.reason, ex.address, ex.size, ex.is_write, ex.data) == ("mmio", MMIO_BASE + 8, 4, False, None)
    vcpu.complete(0x600DF00D)
    with pytest.raises(DmaError) as ei:
        vcpu.complete(1 << 32)  # does not fit 4 bytes
    assert ei.value.errno == errno.EINVAL
    ex = vcpu.run()
    assert ex.reason == "mmio" and ex.is_write and ex.size == 1
    with pytest.raises(DmaError) as ei:
        vcpu.complete(1)  # the last exit is a write
    assert ei.value.errno == errno.EINVAL
    assert vcpu.get_regs()["rbx"] == 0x600DF00D
    vm.close()


def test_device_added_between_runs_serves_the_next_access(space: AddressSpace) -> None:
    vm, vcpu, _ = guest(space, DEVICE_IO)
    assert vcpu.run().reason == "mmio"  # nothing there yet
    dev = Recorder({8: 5})
    vm.add_mmio(MMIO_BASE, 0x1000, dev)
    assert vcpu.run().reason == "io"  # the port range is still empty
    assert [e[0] for e in dev.log] == ["r", "w", "r", "r", "w"]
    vm.close()


def test_device_exception_propagates_from_run(space: AddressSpace) -> None:
    class Broken(Recorder):
        def mmio_write(self, offset: int, size: int, value: int) -> None:
            raise RuntimeError("device fault")

    vm, vcpu, _ = guest(space, DEVICE_IO)
    vm.add_mmio(MMIO_BASE, 0x1000, Broken())
    with pytest.raises(RuntimeError, match="device fault"):
        vcpu.run()
    vm.close()


def test_bus_rules(space: AddressSpace) -> None:
    vm, _vcpu, _ = guest(space, DEVICE_IO, size=1 << 20)
    dev = Recorder()
    vm.add_mmio(MMIO_BASE, 0x1000, dev)
    cases = [
        (lambda: vm.add_mmio(MMIO_BASE + 0xFFF, 2, dev), errno.EEXIST),  # overlaps the range
        (lambda: vm.add_mmio(0x8000, 0x1000, dev), errno.EEXIST),  # over memslot 0
        (lambda: vm.add_mmio(MMIO_BASE + 0x1000, 0, dev), errno.EINVAL),
        (lambda: vm.add_mmio(-1, 4, dev), errno.EINVAL),
        (lambda: vm.add_mmio((1 << 64) - 4, 8, dev), errno.EINVAL),
        (lambda: vm.add_mmio(MMIO_BASE + 0x2000, 4, object()), errno.EINVAL),  # no mmio_read
        (lambda: vm.add_pio(0xFFFF, 2, dev), errno.EINVAL),  # past port 0xffff
        (lambda: vm.set_memslot(1, MMIO_BASE, 0x2000, space.mmap(0x2000)), errno.EEXIST),  # slot over MMIO
        (lambda: vm.remove_mmio(0x1234), errno.ENOENT),
    ]
    vm.add_pio(0x60, 4, dev)
    cases.append((lambda: vm.add_pio(0x63, 1, dev), errno.EEXIST))
    for call, err in cases:
        with pytest.raises(DmaError) as ei:
            call()
        assert ei.value.errno == err, ei.value
    assert [r.start for r in vm.mmio.ranges()] == [MMIO_BASE]
    assert [r.start for r in vm.pio.ranges()] == [0x60]
    assert [s.slot for s in vm.memslots()] == [0]
    vm.remove_mmio(MMIO_BASE)
    vm.add_mmio(MMIO_BASE, 0x10, dev)  # the range is free again
    vm.close()


def test_device_called_on_the_vcpu_thread(space: AddressSpace) -> None:
    seen: list[int] = []

    class Dev(Recorder):
        def mmio_read(self, offset: int, size: int) -> int:
            seen.append(threading.get_ident())
            return 0

    vm, vcpu, _ = guest(space, DEVICE_IO)
    vm.add_mmio(MMIO_BASE, 0x1000, Dev())
    vm.add_pio(DEV_PORT, 8, Recorder())
    result: list[str] = []
    t = threading.Thread(target=lambda: result.append(vcpu.run().reason))
    t.start()
    t.join(30)
    assert result == ["hlt"]
    assert seen and set(seen) == {t.ident}
    assert CODE  # the program is loaded at CODE
    vm.close()
