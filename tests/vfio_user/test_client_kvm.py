"""The guest on dmarw's KVM VM with its GPU-like device in a separate ``dmarw serve`` process.

The VM (real KVM, guest RAM a memfd, memslot 0 logging dirty pages) attaches the server's
device with :class:`dmarw.vfio_user.remote.RemoteDevice`: the guest's MMIO loads and stores
to the device window become REGION_READ / REGION_WRITE of the server's BAR0, and guest RAM
is offered by DMA_MAP with its memfd, so the device's DMA reaches it through the server's
own container.  The run must check out as an in-process run does: the checksum is the
Python model's, KVM's dirty log is the guest's own record of its stores, and the pages the
server's DMA logging reports are the device writes the guest recorded (and the model's).
Then the device migrates (STOP_COPY data) to a second server and the guest carries on.
"""

from __future__ import annotations

import errno
import functools
import sys
from pathlib import Path

import peer
import pytest

from dmarw import AddressSpace, DmaError
from dmarw.devices.gpu import REG_RING_TAIL
from dmarw.guest import ResultPort, load
from dmarw.guest.model import model_run
from dmarw.guest.params import DREC_GPA, LOAD_GPA, MMIO_GPA, RESULT_PORT, VREC_GPA, Params
from dmarw.vfio_user.remote import RemoteDevice

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(240)]

CLI = "import sys; from dmarw.cli import main; sys.exit(main())"
EXITS_MAX = 2_000_000


@functools.cache
def _kvm_unusable() -> str | None:
    from dmarw.vmm import native_available
    from dmarw.vmm.system import system

    if not native_available():
        return "the native vCPU loop dmarw._vmm is not built"
    try:
        system()
    except OSError as e:
        return f"KVM unusable: {e}"
    return None


@pytest.fixture(autouse=True)
def _need_kvm() -> None:
    why = _kvm_unusable()
    if why:
        pytest.skip(why)


def _pages(bm: bytes) -> set[int]:
    return {i * 8 + b for i, byte in enumerate(bm) if byte for b in range(8) if byte >> b & 1}


class Guest:
    """KvmVm + guest image + result port; the device is attached by the test."""

    def __init__(self, params: Params) -> None:
        from dmarw.vmm import KvmVm

        self.params = params
        self.space = AddressSpace()
        self.hva = self.space.mmap(params.ram_size, backing="memfd")
        self.vm = KvmVm(self.space, dirty="bitmap")
        self.vm.set_memslot(0, 0, params.ram_size, self.hva, dirty_log=True)
        self.port = ResultPort()
        self.vm.add_pio(RESULT_PORT, 4, self.port)
        load(lambda gpa, data: self.space.write(self.hva + gpa, data), params)
        self.vcpu = self.vm.create_vcpu("protected")
        self.vcpu.rip = LOAD_GPA
        self.kernel_log()  # clear what loading wrote

    def read(self, gpa: int, n: int) -> bytes:
        return self.space.read(self.hva + gpa, n)

    def kernel_log(self) -> set[int]:
        s = next(s for s in self.vm.memslots() if s.slot == 0)
        return _pages(bytes(self.vm.dirty_mode.harvest(0, s.npages)))

    def run(self, *, stop_on_intr: bool = False) -> str:
        """To ``hlt``; with ``stop_on_intr``, also back at a kick (``"intr"``)."""
        for _ in range(EXITS_MAX):
            ex = self.vcpu.run()
            if ex.reason == "hlt":
                return "hlt"
            if ex.reason != "intr":
                raise AssertionError(f"unexpected exit {ex}")
            if stop_on_intr:
                return "intr"
        raise AssertionError(f"{EXITS_MAX} exits without hlt")


    def close(self) -> None:
        self.vm.close()
        self.space.close()


class StopAtDoorbell(RemoteDevice):
    """Kicks the vCPU out of its run at the guest's ``stop_at``-th doorbell."""

    stop_at = 0
    vcpu: object = None

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        super().mmio_write(offset, size, value)
        if offset == REG_RING_TAIL:
            self.stop_at -= 1
            if self.stop_at == 0:
                self.vcpu.kick()  # type: ignore[attr-defined]


def _serve(tmp_path: Path, name: str) -> tuple[list[str], Path]:
    sock = tmp_path / f"{name}.sock"
    return [sys.executable, "-c", CLI, "serve", "--once", "--device", "gpu", str(sock)], sock


@pytest.mark.parametrize("post", [False, True], ids=["writes-waited", "writes-posted"])
def test_guest_with_its_device_in_another_process(tmp_path: Path, post: bool) -> None:
    """``post``: the guest's stores go NO_REPLY, as QEMU posts BAR writes of a device with
    no mmap-able region; a later load still sees them (the server handles in order)."""
    params = Params(seed=7, commands=60, ram_size=4 << 20, batch=4, probes=4)
    want = model_run(params)
    cmd, sock = _serve(tmp_path, "gpu")
    g = Guest(params)
    try:
        with peer.running(cmd, log=tmp_path / "serve.log") as srv:
            peer.wait_for_socket(sock, srv, timeout=30)
            dev = RemoteDevice(g.vm, sock, gpa=MMIO_GPA, post=post)
            assert dev.client.mappings() == [(0, params.ram_size, True)]
            assert g.run() == "hlt"
            result = g.port.result
            result.check()
            device_pages = dev.dirty_pages()
            kernel = g.kernel_log()
            vrec = _pages(g.read(VREC_GPA, params.record_bytes))
            drec = _pages(g.read(DREC_GPA, params.record_bytes))
            dev.close()
            with pytest.raises(DmaError) as gone:  # the window is dead once detached
                dev.mmio_read(0, 4)
            assert gone.value.errno == errno.ECONNRESET
            assert srv.wait(timeout=20) == 0, (tmp_path / "serve.log").read_text()
    finally:
        g.close()
    assert (result.commands, result.checksum) == (params.commands, want.checksum)
    assert kernel == vrec, "KVM's log is not the guest's record of its stores"
    assert want.vcpu_pages <= vrec  # the guest also records its own runtime pages
    assert device_pages == drec == want.device_pages, "the server's DMA log is not the device writes"
    assert device_pages, "the device wrote nothing"


def test_device_migrates_to_a_second_server_mid_run(tmp_path: Path) -> None:
    params = Params(seed=11, commands=80, ram_size=4 << 20, batch=4, probes=4)
    want = model_run(params)
    cmd1, sock1 = _serve(tmp_path, "src")
    cmd2, sock2 = _serve(tmp_path, "dst")
    g = Guest(params)
    try:
        with peer.running(cmd1, log=tmp_path / "src.log") as s1, \
                peer.running(cmd2, log=tmp_path / "dst.log") as s2:
            peer.wait_for_socket(sock1, s1, timeout=30)
            peer.wait_for_socket(sock2, s2, timeout=30)
            StopAtDoorbell.stop_at, StopAtDoorbell.vcpu = 8, g.vcpu
            dev = StopAtDoorbell(g.vm, sock1, gpa=MMIO_GPA)
            assert g.run(stop_on_intr=True) == "intr"  # at the 8th of 20 doorbells
            assert not g.port.result.done
            dirty = dev.dirty_pages()  # the source's log, before its state moves
            assert dev.migrate_to(sock2) > 0
            assert s1.wait(timeout=20) == 0, (tmp_path / "src.log").read_text()
            assert g.run() == "hlt"
            g.port.result.check()
            dirty |= dev.dirty_pages()
            dev.close()
            assert s2.wait(timeout=20) == 0, (tmp_path / "dst.log").read_text()
    finally:
        g.close()
    assert (g.port.result.commands, g.port.result.checksum) == (params.commands, want.checksum)
    assert dirty == want.device_pages


def _copy(src: Guest, dst: Guest, pages: set[int]) -> None:
    for pg in pages:
        dst.space.write(dst.hva + pg * 4096, src.read(pg * 4096, 4096))


@pytest.mark.parametrize("device_log", [True, False], ids=["with-device-log", "negative-control"])
def test_vm_live_migrates_with_its_remote_device(tmp_path: Path, device_log: bool) -> None:
    """Pre-copy of guest RAM between two VMs while the guest runs between rounds: each round
    copies KVM's log (the vCPU's stores) plus the server's DMA log (the device's writes);
    stop-and-copy moves the vCPU and the device (MIG_DATA into a second server).  Verified
    two ways: RAM identical at switchover, and the destination finishes with the model's
    checksum.  The negative control leaves out the device's log: the RAM check must fail."""
    params = Params(seed=5, commands=96, ram_size=4 << 20, batch=4, probes=4)
    want = model_run(params)
    cmd1, sock1 = _serve(tmp_path, "src")
    cmd2, sock2 = _serve(tmp_path, "dst")
    src, dst = Guest(params), Guest(params)
    npages = params.ram_size // 4096
    try:
        with peer.running(cmd1, log=tmp_path / "src.log") as s1, \
                peer.running(cmd2, log=tmp_path / "dst.log") as s2:
            peer.wait_for_socket(sock1, s1, timeout=30)
            peer.wait_for_socket(sock2, s2, timeout=30)
            StopAtDoorbell.stop_at, StopAtDoorbell.vcpu = 5, src.vcpu
            dev = StopAtDoorbell(src.vm, sock1, gpa=MMIO_GPA)
            pages = set(range(npages))  # round 0: everything
            for _round in range(3):
                assert src.run(stop_on_intr=True) == "intr"
                _copy(src, dst, pages)
                pages = src.kernel_log() | (dev.dirty_pages() if device_log else set())
                StopAtDoorbell.stop_at = dev.stop_at = 5
            # stop and copy: the guest is out of KVM_RUN; the last dirty pages, then state
            _copy(src, dst, pages | src.kernel_log() | (dev.dirty_pages() if device_log else set()))
            vcpu_state, port_state = src.vcpu.save(), src.port.save()
            same_ram = src.read(0, params.ram_size) == dst.read(0, params.ram_size)
            state = dev.save()
            dev.close()
            assert s1.wait(timeout=20) == 0
            dst.vcpu.restore(vcpu_state)
            dst.port.restore(port_state)
            ddev = RemoteDevice(dst.vm, sock2, gpa=MMIO_GPA)
            ddev.restore(state)
            if same_ram:
                assert dst.run() == "hlt"
                result = dst.port.result
                result.check()
            ddev.close()
            assert s2.wait(timeout=20) == 0
    finally:
        src.close()
        dst.close()
    if device_log:
        assert same_ram, "RAM differs at switchover"
        assert (result.commands, result.checksum) == (params.commands, want.checksum)
    else:
        assert not same_ram, "without the device's log the copy missed nothing: the check cannot fail"
