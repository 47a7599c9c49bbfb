"""The GPU-like device against the guest's Python model, on the simulated Vm/Container
(no KVM): every path gives one checksum and dirty sets equal to the guest's record; the
register rules; faults; save/restore.  About 2 s."""

from __future__ import annotations

import errno

import pytest

from dmarw import DmaError, bitmap_pages
from dmarw.devices import gpu
from dmarw.devices.gpu import GpuDevice
from dmarw.devices.paths import PATH_NAMES, dma_rw_for, path_env
from dmarw.guest.model import ModelGuest, model_run
from dmarw.guest.params import HWSP_GPA, RING_GPA, Params

P = Params(seed=5, commands=240, ram_size=4 << 20, batch=16)


def run_model(path: str, params: Params = P, **dev_kw: object) -> tuple:
    env = path_env(path, params.ram_size)
    try:
        dev = GpuDevice(dma_rw_for(env), **dev_kw)  # type: ignore[arg-type]
        dev.start()
        try:
            g = ModelGuest(params, lambda a, n: env.space.read(env.hva + a, n), env.vm.write_guest,
                           dev.reg_read, dev.reg_write)
            res = g.run()
        finally:
            dev.stop()
        vlog = set(bitmap_pages(env.vm.get_dirty_log(0)))
        clog = set(bitmap_pages(env.container.get_dirty_bitmap(0, params.ram_size)))
        return res, vlog, clog, dev
    finally:
        env.close()


REFERENCE = model_run(P).checksum


@pytest.mark.parametrize("path", PATH_NAMES)
@pytest.mark.parametrize("threaded", [False, True], ids=["inline", "threaded"])
def test_each_path_same_checksum_and_dirty_sets(path: str, threaded: bool) -> None:
    res, vlog, clog, dev = run_model(path, threaded=threaded)
    assert res.checksum == REFERENCE
    assert res.commands == P.commands
    assert dev.regs.commands == P.commands and dev.regs.fence == -(-P.commands // P.batch)
    if path == "kvm":  # the model's stores and the device's writes share the VM's log
        assert vlog == res.vcpu_pages | res.device_pages
        assert clog == set()
    else:
        assert vlog == res.vcpu_pages
        assert clog == res.device_pages
    assert dev.stats.commands == P.commands
    assert dev.stats.reads + dev.stats.writes == P.commands


def test_checksum_depends_on_seed_and_is_deterministic() -> None:
    assert model_run(P).checksum == REFERENCE
    others = {model_run(Params(seed=s, commands=240, ram_size=4 << 20)).checksum
              for s in (0, 1, 4, 6, 1 << 32, (5 | 1 << 40))}
    assert len(others) == 6 and REFERENCE not in others


def test_mix_follows_the_glmark2_profile() -> None:
    res, _, _, dev = run_model("vfio-external-user", Params(seed=1, commands=4000, ram_size=8 << 20),
                               record=True)
    st = dev.stats
    assert 0.58 < st.reads / st.commands < 0.68
    page = st.by_kind["page-read"][0]
    assert 0.42 < page / st.reads < 0.54
    # every command's access stays inside one page, as the lab's workload (ring fetches,
    # reads of up to batch+1 entries, may cross the ring's page boundary)
    ring = range(RING_GPA, RING_GPA + 256 * 32)
    cmd = [(w, a, s) for w, a, s in dev.accesses if a not in ring]
    assert len(cmd) == st.commands + st.fences
    assert all((a % 4096) + s <= 4096 for _, a, s in cmd)


def test_lost_write_changes_the_checksum() -> None:
    res, _, _, _ = run_model("vfio-mutex", drop_write=7)
    assert res.checksum != REFERENCE


def test_bypassing_dma_rw_is_seen_in_the_container_bitmap() -> None:
    env = path_env("vfio-mutex", P.ram_size)
    try:
        def raw(addr: int, data: bytes) -> None:
            env.space.write(env.hva + addr, data)

        dev = GpuDevice(dma_rw_for(env), bypass=raw)
        res = ModelGuest(P, lambda a, n: env.space.read(env.hva + a, n), env.vm.write_guest,
                         dev.reg_read, dev.reg_write).run()
        clog = set(bitmap_pages(env.container.get_dirty_bitmap(0, P.ram_size)))
        assert res.checksum == REFERENCE  # the data arrived ...
        assert clog == {HWSP_GPA >> 12}  # ... but only the fences went through dma_rw
        assert clog != res.device_pages
    finally:
        env.close()


class FlatRam:
    def __init__(self, size: int) -> None:
        self.b = bytearray(size)

    def read(self, a: int, n: int) -> bytes:
        return bytes(self.b[a : a + n])

    def write(self, a: int, d: bytes) -> None:
        self.b[a : a + len(d)] = d

    def dma(self, a: int, m: memoryview, w: bool) -> None:
        if not 0 <= a <= len(self.b) - len(m):
            raise DmaError(errno.EFAULT, f"iova {a:#x}+{len(m):#x}: not mapped")
        if w:
            self.b[a : a + len(m)] = m
        else:
            m[:] = self.b[a : a + len(m)]


def test_save_restore_mid_run_same_checksum() -> None:
    ram = FlatRam(P.ram_size)
    dev = GpuDevice(ram.dma)
    saved: list[bytes] = []
    calls = {"n": 0}

    def reg_write(off: int, val: int) -> None:
        nonlocal dev
        dev.reg_write(off, val)
        calls["n"] += 1
        if off == gpu.REG_RING_TAIL and calls["n"] > 12 and not saved:
            # save the device mid-run, then carry on in a brand-new device
            dev.pause()
            saved.append(dev.save())
            new = GpuDevice(ram.dma)
            new.pause()
            new.restore(saved[0])
            new.resume()
            dev = new

    res = ModelGuest(P, ram.read, ram.write, lambda o: dev.reg_read(o), reg_write).run()
    assert saved and res.checksum == REFERENCE


def test_pending_commands_run_after_restore() -> None:
    ram = FlatRam(P.ram_size)
    dev = GpuDevice(ram.dma)
    dev.stop_at(5)
    ModelGuest(Params(seed=5, commands=16, ram_size=4 << 20), ram.read, ram.write, dev.reg_read,
               lambda o, v: dev.reg_write(o, v) if dev.regs.commands < 5 or o != gpu.REG_WAIT else None)
    # drive by hand: ring of 8 reads, doorbell, engine stops after 5
    dev.reg_write(gpu.REG_RING_BASE_LO, RING_GPA)
    dev.reg_write(gpu.REG_RING_SIZE, 64)
    dev.reg_write(gpu.REG_CTRL, gpu.CTRL_ENABLE)
    for i in range(8):
        ram.write(RING_GPA + 32 * i, gpu.CMD.pack(gpu.OP_READ, 64, 0x100000 + 64 * i, i, 2, 0))
    dev.reg_write(gpu.REG_RING_TAIL, 8)
    assert dev.regs.commands == 5 and dev.regs.head == 5
    blob = dev.save()
    other = GpuDevice(ram.dma)
    other.restore(blob)  # inline and not paused: the three pending commands run now
    assert other.regs.commands == 8 and other.regs.head == 8
    dev.resume()
    assert dev.regs.commands == 8 and dev.state == other.state


def test_restore_refuses_bad_blobs() -> None:
    dev = GpuDevice(FlatRam(4096).dma)
    blob = dev.save()
    for bad, what in ((blob[:-1], "bytes"), (b"X" + blob[1:], "magic"),
                      (blob[:4] + b"\x09" + blob[5:], "version")):
        with pytest.raises(DmaError) as e:
            dev.restore(bad)
        assert e.value.errno == errno.EINVAL and what in str(e.value)
    regs = gpu.GpuRegs(ring_size=8, head=9)
    with pytest.raises(DmaError, match="head 9"):
        dev.restore(blob[:16] + regs.pack())
    assert dev.regs == gpu.GpuRegs()  # nothing changed


def test_register_rules() -> None:
    ram = FlatRam(1 << 20)
    dev = GpuDevice(ram.dma)
    assert dev.mmio_read(gpu.REG_ID, 4) == gpu.DEVICE_ID
    assert dev.mmio_read(gpu.REG_ID + 1, 1) == (gpu.DEVICE_ID >> 8) & 0xFF
    dev.mmio_write(gpu.REG_RING_SIZE, 2, 8)  # narrow stores are ignored
    assert dev.regs.ring_size == 0
    dev.reg_write(gpu.REG_RING_SIZE, gpu.RING_MAX + 1)
    assert dev.reg_read(gpu.REG_STATUS) & gpu.STATUS_ERROR and dev.reg_read(gpu.REG_ERROR) == gpu.ERR_RING
    assert "ring size" in dev.last_error
    dev.reg_write(gpu.REG_CTRL, gpu.CTRL_RESET)
    assert dev.regs == gpu.GpuRegs() and dev.last_error == ""
    dev.reg_write(gpu.REG_RING_SIZE, 8)
    dev.reg_write(gpu.REG_RING_TAIL, 8)
    assert dev.regs.error == gpu.ERR_RING and "tail 8" in dev.last_error


@pytest.mark.parametrize("entry, code, text", [
    ((9, 4, 0x1000, 0, 0, 0), gpu.ERR_OP, "op 9"),
    ((gpu.OP_READ, 4097, 0x1000, 0, 3, 0), gpu.ERR_SIZE, "0x1001"),
    ((gpu.OP_WRITE, 64, 0xFFFF0, 0, 6, 0), gpu.ERR_DMA, "0xffff0"),
    ((gpu.OP_FENCE, 8, 0x2000, 1, 0, 0), gpu.ERR_SIZE, "fence"),
])
def test_bad_commands_stop_the_engine_with_an_error(entry: tuple, code: int, text: str) -> None:
    ram = FlatRam(1 << 20)
    dev = GpuDevice(ram.dma)
    ram.write(0x8000, gpu.CMD.pack(*entry) + gpu.CMD.pack(gpu.OP_READ, 4, 0, 0, 2, 0))
    dev.reg_write(gpu.REG_RING_BASE_LO, 0x8000)
    dev.reg_write(gpu.REG_RING_SIZE, 4)
    dev.reg_write(gpu.REG_CTRL, gpu.CTRL_ENABLE)
    dev.reg_write(gpu.REG_RING_TAIL, 2)
    assert dev.regs.status & gpu.STATUS_ERROR and dev.regs.error == code
    assert text in dev.last_error
    assert dev.regs.head == 0 and dev.regs.commands == 0  # the second command never ran
