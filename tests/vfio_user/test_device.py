"""The Device API without a socket: config space and BAR sizing, regions, interrupts,
the migration state machine against a brute-force model."""

from __future__ import annotations

import errno
import itertools
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmarw import DmaError
from dmarw.vfio_user import Device, PciConfig, Region
from dmarw.vfio_user import protocol as p
from dmarw.vfio_user.device import DmaPort, Irqs, MigrationFsm, _arcs, mig_path
from dmarw.vfio_user.sample import SampleDevice

S = p.MigState


@settings(max_examples=300, deadline=None)
@given(st.integers(4, 31), st.integers(0, 2**32 - 1), st.sampled_from([0, 0x8, 0x1]))
def test_bar_sizing(log2: int, value: int, bits: int) -> None:
    """A BAR keeps only the address bits above its size; the flag bits stay fixed."""
    size = 1 << log2
    cfg = PciConfig(1, 2, bars={0: (size, bits)})
    cfg.write(0x10, struct.pack("<I", value))
    (got,) = struct.unpack("<I", cfg.read(0x10, 4))
    low = 0x3 if bits & 1 else 0xF
    assert got == (value & ~(size - 1) & 0xFFFFFFFF) | (bits & low)


def test_bar_sizing_rounds_up_and_byte_writes() -> None:
    cfg = PciConfig(1, 2, bars={1: (0x3000, 0)})  # 12 KiB decodes as 16 KiB
    cfg.write(0x14, b"\xff\xff\xff\xff")
    assert cfg.read(0x14, 4) == struct.pack("<I", 0xFFFFC000)
    cfg.write(0x16, b"\x12")  # one byte of the BAR
    assert struct.unpack("<I", cfg.read(0x14, 4))[0] == 0xFF12C000
    cfg.write(0x20, b"\xff\xff\xff\xff")  # no BAR4: reads 0
    assert cfg.read(0x20, 4) == bytes(4)


def test_config_read_only_fields() -> None:
    cfg = PciConfig(0xDEAD, 0xBEEF, 0xCAFE, 0xBABE, class_code=0x020000, revision=3)
    before = cfg.read(0, 64)
    cfg.write(0, b"\xff" * 4)
    cfg.write(0x08, b"\xff" * 4)
    cfg.write(0x2C, b"\xff" * 4)
    assert cfg.read(0, 64) == before
    assert struct.unpack_from("<I", before, 8)[0] == 0x02000003
    cfg.write(0x3C, b"\x0b")
    assert cfg.read(0x3C, 1) == b"\x0b"


def test_rom_bar() -> None:
    cfg = PciConfig(1, 2, rom_size=0x8000)
    cfg.write(0x30, b"\xff\xff\xff\xff")
    assert struct.unpack("<I", cfg.read(0x30, 4))[0] == 0xFFFF8001


def test_region_bounds_and_callbacks() -> None:
    seen: list[tuple[int, bytes]] = []
    r = Region(16, read=lambda o, n: bytes(range(o, o + n)), write=lambda o, d: seen.append((o, d)), name="bar")
    assert r.read(4, 4) == b"\4\5\6\7"
    r.write(8, b"xy")
    assert seen == [(8, b"xy")]
    for off, n in ((15, 2), (-1, 1), (0, 0), (16, 1)):
        with pytest.raises(DmaError) as e:
            r.read(off, n)
        assert e.value.errno == errno.EINVAL and "bar" in str(e.value)
    short = Region(8, read=lambda o, n: b"x")
    with pytest.raises(DmaError) as e:
        short.read(0, 4)
    assert e.value.errno == errno.EIO
    ro = Region(8, read=lambda o, n: bytes(n), writable=False)
    with pytest.raises(DmaError):
        ro.write(0, b"x")


def test_region_memory_and_areas() -> None:
    r = Region(0x3000, mmap_areas=[(0, 0x1000), (0x2000, 0x1000)])
    assert r.flags == p.REGION_FLAG_READ | p.REGION_FLAG_WRITE | p.REGION_FLAG_MMAP
    assert r.fd is not None and os.fstat(r.fd).st_size == 0x3000
    r.write(0x2FFE, b"ok")
    assert r.read(0x2FFE, 2) == b"ok"
    r.close()
    with pytest.raises(DmaError):
        Region(0x2000, mmap_areas=[(0x800, 0x1000)])
    with pytest.raises(DmaError):
        Region(0x1000, mmap_areas=[(0, 0x2000)])


def test_device_regions() -> None:
    d = Device(PciConfig(1, 2), irqs={p.INTX: 1})
    d.add_region(0, Region(0x1000, memory=True))
    assert d.config.read(0x3D, 1) == b"\1"  # INTA#
    assert d.region(p.CONFIG_REGION) is d.config_region
    with pytest.raises(DmaError):
        d.add_region(p.CONFIG_REGION, Region(4))
    with pytest.raises(DmaError):
        d.add_region(9, Region(4))
    with pytest.raises(DmaError) as e:
        DmaPort().write(0x1000, b"x")
    assert e.value.errno == errno.ENODEV
    d.close()


def test_irqs() -> None:
    irqs = Irqs({p.MSIX: 2})
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    irqs.set_fd(p.MSIX, 1, efd)
    assert not irqs.trigger(p.MSIX, 0)  # no eventfd
    assert irqs.trigger(p.MSIX, 1) and os.eventfd_read(efd) == 1
    with pytest.raises(DmaError):
        irqs.trigger(p.MSIX, 2)
    with pytest.raises(DmaError):
        irqs.trigger(p.INTX)
    irqs.close()
    with pytest.raises(OSError):
        os.fstat(efd)  # the server's copy is closed


# -- migration ------------------------------------------------------------------------------

FLAGS = [
    p.MIGRATION_STOP_COPY,
    p.MIGRATION_STOP_COPY | p.MIGRATION_PRE_COPY,
    p.MIGRATION_STOP_COPY | p.MIGRATION_P2P,
    p.MIGRATION_STOP_COPY | p.MIGRATION_P2P | p.MIGRATION_PRE_COPY,
]
SAVING = {S.PRE_COPY, S.STOP_COPY, S.PRE_COPY_P2P}


def _model(cur: S, new: S, flags: int) -> int | None:
    """Brute force: the length of the shortest arc path whose interior avoids the saving
    states (None: no path, or a transition the rules forbid)."""
    arcs = _arcs(flags)
    states = {s for s, out in arcs.items() if out} | {S.RUNNING}
    if new == S.ERROR or cur == S.ERROR or new not in states:
        return None
    if cur == S.STOP_COPY and new in (S.PRE_COPY, S.PRE_COPY_P2P):
        return None
    if cur == new:
        return 0
    for n in range(1, 6):
        for mid in itertools.product(sorted(states - SAVING - {S.RESUMING}), repeat=n - 1):
            path = [cur, *mid, new]
            if all(b in arcs[a] for a, b in itertools.pairwise(path)):
                return n
    return None


@pytest.mark.parametrize("flags", FLAGS)
def test_mig_path_against_the_model(flags: int) -> None:
    arcs = _arcs(flags)
    for cur, new in itertools.product(S, repeat=2):
        want = _model(cur, new, flags)
        if want is None:
            with pytest.raises(DmaError) as e:
                mig_path(cur, new, flags)
            assert e.value.errno == errno.EINVAL
            continue
        path = mig_path(cur, new, flags)
        assert len(path) == want, (cur, new)
        full = [cur, *path]
        assert all(b in arcs[a] for a, b in itertools.pairwise(full))
        assert not SAVING & set(full[1:-1])


def test_mig_paths_named_in_the_spec() -> None:
    f = p.MIGRATION_STOP_COPY | p.MIGRATION_PRE_COPY
    assert mig_path(S.RUNNING, S.STOP_COPY, f) == [S.STOP, S.STOP_COPY]
    assert mig_path(S.PRE_COPY, S.STOP_COPY, f) == [S.STOP_COPY]
    assert mig_path(S.STOP_COPY, S.RUNNING, f) == [S.STOP, S.RUNNING]
    assert mig_path(S.RESUMING, S.RUNNING, f) == [S.STOP, S.RUNNING]
    assert mig_path(S.PRE_COPY, S.RESUMING, f) == [S.RUNNING, S.STOP, S.RESUMING]
    with pytest.raises(DmaError):
        mig_path(S.RUNNING, S.PRE_COPY, p.MIGRATION_STOP_COPY)  # no PRE_COPY support


def test_fsm_error_state_and_reset() -> None:
    def arc(old: S, new: S) -> None:
        if new == S.STOP_COPY:
            raise DmaError(errno.EIO, "device broke")

    fsm = MigrationFsm(p.MIGRATION_STOP_COPY, arc)
    with pytest.raises(DmaError):
        fsm.set(S.STOP_COPY)
    assert fsm.state == S.ERROR
    with pytest.raises(DmaError):
        fsm.set(S.RUNNING)
    fsm.reset()
    assert fsm.state == S.RUNNING


def test_sample_migration_stream_round_trip() -> None:
    src, dst = SampleDevice(), SampleDevice()
    assert src.bar1.mem is not None and dst.bar1.mem is not None
    src.bar1.mem[:5] = b"hello"
    src.bar0 = 0x1122334455
    src.migration.set(S.PRE_COPY)
    pre = b"".join(src.migration_read(1024) for _ in range(12))
    assert pre == src.bar1.mem[:0x3000]
    src.migration.set(S.STOP_COPY)
    chunks = [src.migration_read(1024) for _ in range(13)]
    assert [len(c) for c in chunks] == [1024] * 12 + [8]
    src.migration.set(S.STOP)
    dst.migration.set(S.RESUMING)
    for c in chunks:
        dst.migration_write(c)
    dst.migration.set(S.STOP)
    assert dst.bar1.mem[:0x3000] == src.bar1.mem[:0x3000] and dst.bar0 == src.bar0
    dst.migration.set(S.RUNNING)
    assert dst.timer is not None  # re-armed for the stored time
    bad = SampleDevice()
    bad.migration.set(S.RESUMING)
    bad.migration_write(b"short")
    with pytest.raises(DmaError) as e:
        bad.migration.set(S.STOP)
    assert e.value.errno == errno.EINVAL
    for d in (src, dst, bad):
        d.close()


def test_capability_list_msi_and_msix() -> None:
    cfg = PciConfig(1, 2)
    assert cfg.capabilities() == [] and not cfg.status & 0x10
    msix = cfg.add_msix(8, table_bar=2, table_offset=0x1000, pba_bar=2, pba_offset=0x1800)
    msi = cfg.add_msi(2)
    assert cfg.status & 0x10 and cfg.read(0x34, 1) == bytes([msix])
    assert cfg.capabilities() == [(0x11, msix), (0x05, msi)]
    control, table, pba = struct.unpack_from("<HII", cfg.read(msix + 2, 10))
    assert control == 7 and table == 0x1002 and pba == 0x1802
    cfg.write(msix + 2, b"\xff\xff")  # only enable and function-mask are the guest's
    assert struct.unpack_from("<H", cfg.read(msix + 2, 2))[0] == 0xC007
    cfg.write(msix + 4, b"\xff\xff\xff\xff")  # the table location is read-only
    assert struct.unpack_from("<I", cfg.read(msix + 4, 4))[0] == 0x1002
    cfg.write(msi + 4, b"\xff\xff\xff\xff")  # the MSI address is writable, dword aligned
    assert struct.unpack_from("<I", cfg.read(msi + 4, 4))[0] == 0xFFFFFFFC
    cfg.write(0x34, b"\x00")  # the pointer is read-only
    assert cfg.read(0x34, 1) == bytes([msix])
    with pytest.raises(DmaError):
        cfg.add_msix(0, 0, 0, 0, 0)
    for _ in range(40):
        try:
            cfg.add_capability(0x09, bytes(14))
        except DmaError as e:
            assert e.errno == errno.ENOSPC
            break
    else:
        raise AssertionError("the config space never filled up")
