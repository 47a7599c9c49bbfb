"""Bad input to the API: a ``DmaError`` with the kernel's errno, named in hex, changing nothing.

Each case is one failing call on a small world (an address space, a container with a
read-write, a read-only and a write-only mapping, tracking on, a pin; a VM with a logging
slot; a group with a device and an external user).  On each core (``core``) a case must raise
``DmaError`` with its errno, name the offending value (addresses and sizes in hex, a non-int
by its repr, a prot as ``READ``/``WRITE``), and leave mappings, pins, tracking, host memory,
dirty bits, slots and the caller's buffer exactly as they were.  Run on both cores, the same
case must give the identical message: the messages are made in one place.

Host memory (``AddressSpace``) is one implementation both cores use: its cases run once.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import world
from world import World, build_world, close_world

from conftest import NATIVE_MISSING
from dmarw import AddressSpace, DmaError, Prot, vfio_dma_rw, vfio_pin_pages

P, TOP, RO_IOVA, WO_IOVA, HOST = world.P, world.TOP, world.RO_IOVA, world.WO_IOVA, world.HOST


@pytest.fixture
def a_world(core: str) -> Iterator[World]:
    w = build_world(core)
    yield w
    close_world(w)


@dataclass(frozen=True)
class Case:
    """``call(world)`` fails with ``err``; the message (its detail) contains each of ``names``."""

    id: str
    err: int
    call: Callable[[World], object]
    names: tuple[str, ...] = ()


def _buf(w: World) -> bytearray:
    return w.buf


NOT_INTS: list[tuple[str, object]] = [("float", 0.5), ("None", None), ("str", "0x0"), ("bool", True)]

CASES: list[Case] = [
    # a non-int address or size: EINVAL naming the value
    *[Case(f"dma_rw-iova-{k}", errno.EINVAL, lambda w, v=v: w.c.dma_rw(v, _buf(w), False), (repr(v),)) for k, v in NOT_INTS],
    *[Case(f"dma_write-iova-{k}", errno.EINVAL, lambda w, v=v: w.c.dma_write(v, b"data"), (repr(v),)) for k, v in NOT_INTS],
    *[Case(f"dma_read-iova-{k}", errno.EINVAL, lambda w, v=v: w.c.dma_read(v, 8), (repr(v),)) for k, v in NOT_INTS],
    *[Case(f"dma_read-size-{k}", errno.EINVAL, lambda w, v=v: w.c.dma_read(0, v), (repr(v),)) for k, v in NOT_INTS],
    *[Case(f"read_guest-gpa-{k}", errno.EINVAL, lambda w, v=v: w.vm.read_guest(v, 8), (repr(v),)) for k, v in NOT_INTS],
    *[Case(f"read_guest-size-{k}", errno.EINVAL, lambda w, v=v: w.vm.read_guest(0, v), (repr(v),)) for k, v in NOT_INTS],
    *[Case(f"write_guest-gpa-{k}", errno.EINVAL, lambda w, v=v: w.vm.write_guest(v, b"data"), (repr(v),)) for k, v in NOT_INTS],
    *[Case(f"read_guest_into-gpa-{k}", errno.EINVAL, lambda w, v=v: w.vm.read_guest_into(v, _buf(w)), (repr(v),)) for k, v in NOT_INTS],
    Case("read_guest-gpa-float-zero", errno.EINVAL, lambda w: w.vm.read_guest(0.0, 8), ("0.0",)),
    Case("user-dma_rw-iova-float", errno.EINVAL, lambda w: w.user.dma_rw(0.5, _buf(w), False), ("0.5",)),
    Case("user-dma_read-size-None", errno.EINVAL, lambda w: w.user.dma_read(0, None), ("None",)),
    Case("vfio_dma_rw-iova-str", errno.EINVAL, lambda w: vfio_dma_rw(w.dev, "0x0", _buf(w), False), ("'0x0'",)),
    Case("pin_pages-iova-float", errno.EINVAL, lambda w: w.c.pin_pages(0.5, 1, Prot.READ), ("0.5",)),
    Case("get_dirty_bitmap-iova-None", errno.EINVAL, lambda w: w.c.get_dirty_bitmap(None, P), ("None",)),
    # a negative length: EINVAL naming it
    Case("dma_read-negative-size", errno.EINVAL, lambda w: w.c.dma_read(0, -1), ("-0x1",)),
    Case("user-dma_read-negative-size", errno.EINVAL, lambda w: w.user.dma_read(0, -1), ("-0x1",)),
    Case("read_guest-negative-size", errno.EINVAL, lambda w: w.vm.read_guest(0, -1), ("-0x1",)),
    Case("read_guest-negative-size-big", errno.EINVAL, lambda w: w.vm.read_guest(0, -P), ("-0x1000",)),
    # a huge size is refused before anything of that size is allocated
    Case("dma_read-huge-size", errno.EINVAL, lambda w: w.c.dma_read(100 * P, 1 << 40), (f"{100 * P:#x}", f"{1 << 40:#x}")),
    Case("dma_read-size-2**63", errno.EINVAL, lambda w: w.c.dma_read(100 * P, 1 << 63), (f"{1 << 63:#x}",)),
    Case("read_guest-huge-size", errno.EFAULT, lambda w: w.vm.read_guest(0, 1 << 40), (f"{1 << 40:#x}",)),
    Case("user-dma_read-huge-size", errno.EINVAL, lambda w: w.user.dma_read(100 * P, 1 << 40), (f"{1 << 40:#x}",)),
    # a negative iova: EINVAL (not EOVERFLOW), named as given
    Case("dma_rw-negative-iova", errno.EINVAL, lambda w: w.c.dma_rw(-P, _buf(w), False), ("-0x1000",)),
    Case("dma_write-negative-iova", errno.EINVAL, lambda w: w.c.dma_write(-1, b"x"), ("-0x1",)),
    Case("user-dma_rw-negative-iova", errno.EINVAL, lambda w: w.user.dma_rw(-P, _buf(w), False), ("-0x1000",)),
    Case("vfio_dma_rw-negative-iova", errno.EINVAL, lambda w: vfio_dma_rw(w.dev, -P, b"x", True), ("-0x1000",)),
    Case("map_dma-negative-iova", errno.EINVAL, lambda w: w.c.map_dma(-P, P, w.hva, w.space), ("-0x1000",)),
    Case("unmap_dma-negative-iova", errno.EINVAL, lambda w: w.c.unmap_dma(-P, P), ("-0x1000",)),
    # an address or end past 2**64: EOVERFLOW naming the address given, in hex
    Case("dma_rw-iova-2**70", errno.EOVERFLOW, lambda w: w.c.dma_rw(1 << 70, _buf(w), False), (f"{1 << 70:#x}",)),
    Case("dma_rw-iova-2**64", errno.EOVERFLOW, lambda w: w.c.dma_rw(TOP, _buf(w), False), (f"{TOP:#x}",)),
    Case("dma_rw-end-past-2**64", errno.EOVERFLOW, lambda w: w.c.dma_rw(TOP - 4, _buf(w), False), (f"{TOP - 4:#x}",)),
    Case("dma_write-end-past-2**64", errno.EOVERFLOW, lambda w: w.c.dma_write(TOP - 1, b"ab"), (f"{TOP - 1:#x}",)),
    Case("user-dma_rw-iova-2**70", errno.EOVERFLOW, lambda w: w.user.dma_rw(1 << 70, _buf(w), False), (f"{1 << 70:#x}",)),
    # a gpa outside guest physical space is no slot (EFAULT, as KVM), named as given in hex
    Case("read_guest-negative-gpa", errno.EFAULT, lambda w: w.vm.read_guest(-P, 8), ("-0x1000",)),
    Case("read_guest-gpa-2**70", errno.EFAULT, lambda w: w.vm.read_guest(1 << 70, 8), (f"{1 << 70:#x}",)),
    Case("read_guest-end-past-2**64", errno.EFAULT, lambda w: w.vm.read_guest(TOP - 4, 8), (f"{TOP - 4:#x}",)),
    Case("write_guest-negative-gpa", errno.EFAULT, lambda w: w.vm.write_guest(-1, b"ab"), ("-0x1",)),
    # read-only destination buffers
    Case("dma_rw-read-into-bytes", errno.EINVAL, lambda w: w.c.dma_rw(0, b"12345678", False), ("read-only", "0x0+0x8")),
    Case("user-dma_rw-read-into-bytes", errno.EINVAL, lambda w: w.user.dma_rw(0, b"12345678", False), ("read-only",)),
    Case("read_guest_into-bytes", errno.EINVAL, lambda w: w.vm.read_guest_into(0, memoryview(b"12345678")), ("read-only", "0x0+0x8")),
    # prot printed by name
    Case("dma_write-read-only-mapping", errno.EPERM, lambda w: w.c.dma_write(RO_IOVA, b"w"), (f"{RO_IOVA:#x}", "READ")),
    Case("dma_read-write-only-mapping", errno.EPERM, lambda w: w.c.dma_read(WO_IOVA, 1), (f"{WO_IOVA:#x}", "WRITE")),
    Case("pin-write-of-read-only-mapping", errno.EPERM, lambda w: w.c.pin_pages(RO_IOVA, 1, Prot.READ | Prot.WRITE), (f"{RO_IOVA:#x}", "READ")),
    Case("vfio_pin-write-of-read-only-mapping", errno.EPERM, lambda w: vfio_pin_pages(w.dev, RO_IOVA, 1, Prot.WRITE), (f"{RO_IOVA:#x}",)),
    # addresses in hex in the other everyday failures too
    Case("dma_rw-unmapped", errno.EINVAL, lambda w: w.c.dma_rw(100 * P, _buf(w), False), (f"{100 * P:#x}",)),
    Case("map_dma-overlap", errno.EEXIST, lambda w: w.c.map_dma(P, P, w.hva, w.space), ("0x1000",)),
    Case("map_dma-unaligned", errno.EINVAL, lambda w: w.c.map_dma(0x123000, 0x1001, w.hva, w.space), ("0x123000", "0x1001")),
    Case("unmap_dma-cuts-a-mapping", errno.EINVAL, lambda w: w.c.unmap_dma(P, P), ("0x1000",)),
    Case("read_guest-no-slot", errno.EFAULT, lambda w: w.vm.read_guest(100 * P, 8), (f"{100 * P:#x}",)),
    Case("get_dirty_log-no-such-slot", errno.EINVAL, lambda w: w.vm.get_dirty_log(7), ()),
    Case("get_dirty_bitmap-cuts-a-mapping", errno.EINVAL, lambda w: w.c.get_dirty_bitmap(0, P), ("0x0",)),
    Case("unpin-not-pinned", errno.EINVAL, lambda w: w.c.unpin_pages(2 * P, 1), ("0x2000",)),
]
CASE_PARAMS = [pytest.param(c, id=c.id) for c in CASES]

_DECIMAL = re.compile(r"(?<![0-9a-fA-FxX.*])\d{2,}(?![0-9.])")


def decimals(detail: str) -> list[str]:
    """Numbers of two or more digits written in decimal (outside quotes and ``2**64``)."""
    text = re.sub(r"'[^']*'", "", detail.replace("2**64", ""))
    return _DECIMAL.findall(text)


def fails_unchanged(w: World, case: Case) -> DmaError:
    w.state()  # drain the dirty bitmaps
    before = w.state()
    with pytest.raises(DmaError) as info:
        case.call(w)
    assert w.state() == before, case.id
    return info.value


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_bad_input_is_a_dma_error_named_in_hex_changing_nothing(a_world: World, case: Case) -> None:
    e = fails_unchanged(a_world, case)
    assert isinstance(e, OSError)
    assert e.errno == case.err, str(e)
    for name in case.names:
        assert name in e.detail, (name, str(e))
    assert decimals(e.detail) == [], str(e)  # every address and size in hex
    assert "<Prot" not in str(e) and "Prot." not in str(e), str(e)  # prot by name: READ|WRITE


def _normalized(w: World, text: str) -> str:
    """``text`` with host addresses written relative to the world's memory (the two worlds'
    memory sits at different hvas)."""

    def rel(m: re.Match[str]) -> str:
        v = int(m.group(0), 16)
        return f"<hva+{v - w.hva:#x}>" if w.hva <= v <= w.hva + HOST else m.group(0)

    return re.sub(r"0x[0-9a-f]+", rel, text)


def _outcome(w: World, case: Case) -> tuple[object, ...]:
    try:
        case.call(w)
    except Exception as e:  # noqa: BLE001 - the type is part of what must be identical
        return (type(e).__name__, getattr(e, "errno", None), _normalized(w, str(e)))
    return ("returned",)


@pytest.mark.skipif(NATIVE_MISSING is not None, reason=str(NATIVE_MISSING))
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_both_cores_give_the_identical_message(case: Case) -> None:
    got = {}
    for core in ("python", "native"):
        w = build_world(core)
        try:
            got[core] = _outcome(w, case)
        finally:
            close_world(w)
    assert got["python"] == got["native"]


# -- buffers that are not plain contiguous bytes: the same on both cores ---------------------

STRIDED: list[tuple[str, Callable[[World, memoryview], object]]] = [
    ("dma_rw-read", lambda w, m: w.c.dma_rw(2 * P, m, False)),
    ("dma_rw-write", lambda w, m: w.c.dma_rw(2 * P, m, True)),
    ("dma_write", lambda w, m: w.c.dma_write(2 * P, m)),
    ("user-dma_rw-read", lambda w, m: w.user.dma_rw(2 * P, m, False)),
    ("vfio_dma_rw-write", lambda w, m: vfio_dma_rw(w.dev, 2 * P, m, True)),
    ("read_guest_into", lambda w, m: w.vm.read_guest_into(2 * P, m)),
    ("write_guest", lambda w, m: w.vm.write_guest(2 * P, m)),
]


def _strided_run(core: str, call: Callable[[World, memoryview], object]) -> tuple[object, ...]:
    """(outcome, the strided buffer after, host memory at 2P after) for a 16-byte buffer
    viewed with stride 2; a refusal must be a DmaError EINVAL that changes nothing."""
    w = build_world(core)
    try:
        backing = bytearray(range(0x40, 0x60))
        view = memoryview(backing)[::2]
        w.state()
        before = w.state()
        try:
            call(w, view)
        except DmaError as e:
            assert e.errno == errno.EINVAL, str(e)
            assert w.state() == before
            assert backing == bytearray(range(0x40, 0x60))
            return ("refused", str(e))
        host = w.space.read(w.hva + 2 * P, 16)
        return ("done", bytes(backing), host)
    finally:
        close_world(w)


@pytest.mark.parametrize(("what", "call"), STRIDED, ids=[s[0] for s in STRIDED])
def test_a_strided_buffer_is_used_or_refused_and_the_same_on_both_cores(
    what: str, call: Callable[[World, memoryview], object]
) -> None:
    cores = ["python"] + ([] if NATIVE_MISSING else ["native"])
    got = {core: _strided_run(core, call) for core in cores}
    ref = got["python"]
    if ref[0] == "done":  # used: the strided elements, in order, are what moved
        backing, host = ref[1], ref[2]
        assert isinstance(backing, bytes) and isinstance(host, bytes)
        if what.endswith("read") or what == "read_guest_into":
            assert backing[::2] == world.pattern(HOST)[2 * P : 2 * P + 8]
            assert backing[1::2] == bytes(range(0x41, 0x60, 2))
            assert host == world.pattern(HOST)[2 * P : 2 * P + 16]
        else:
            assert host == bytes(range(0x40, 0x60, 2)) + world.pattern(HOST)[2 * P + 8 : 2 * P + 16]
            assert backing == bytes(range(0x40, 0x60))
    if NATIVE_MISSING is None:
        assert got["native"] == ref


# -- host memory: one implementation under both cores -----------------------------------------


@pytest.mark.parametrize("size", [1 << 70, TOP, 1 << 48])
def test_mmap_of_an_impossible_size_is_enomem_and_maps_nothing(size: int) -> None:
    space = AddressSpace()
    try:
        with pytest.raises(DmaError) as info:
            space.mmap(size)
        assert info.value.errno == errno.ENOMEM, str(info.value)
        assert f"{size:#x}" in info.value.detail, str(info.value)
        assert space.regions() == ()
    finally:
        space.close()


@pytest.mark.parametrize(
    "backing", ["memfdd", "Anon", "memfd ", "", "guest.ram", b"memfd", None, 3], ids=repr
)
def test_mmap_backing_other_than_anon_memfd_or_a_path_is_einval_and_creates_no_file(
    backing: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    space = AddressSpace()
    try:
        with pytest.raises(DmaError) as info:
            space.mmap(P, backing=backing)  # type: ignore[arg-type]
        assert info.value.errno == errno.EINVAL, str(info.value)
        assert repr(backing) in info.value.detail, str(info.value)
        assert space.regions() == ()
        assert os.listdir(tmp_path) == []
    finally:
        space.close()


def test_mmap_backing_an_explicit_path_creates_that_file(tmp_path: Path) -> None:
    space = AddressSpace()
    try:
        hva = space.mmap(P, backing=tmp_path / "guest.ram")
        space.write(hva, b"ram")
        assert (tmp_path / "guest.ram").read_bytes()[:3] == b"ram"
    finally:
        space.close()


# -- faults under a mapping: the same message on both cores -----------------------------------

GONE_IOVA = 32 * P  # two mappings 32P..34P: the first over live memory, the second over gone


def _efault_calls() -> list[tuple[str, Callable[[World], object]]]:
    return [
        ("write-one-mapping", lambda w: w.c.dma_write(GONE_IOVA + P + 8, b"x")),
        ("write-two-mappings", lambda w: w.c.dma_write(GONE_IOVA + P - 4, b"y" * 8)),
        ("read-two-mappings", lambda w: w.c.dma_rw(GONE_IOVA + P - 4, bytearray(8), False)),
        ("user-read-one-mapping", lambda w: w.user.dma_read(GONE_IOVA + P, 8)),
        ("pin-across", lambda w: w.c.pin_pages(GONE_IOVA, 2, Prot.READ)),
        ("guest-read-two-slots", lambda w: w.vm.read_guest(GONE_IOVA + P - 4, 8)),
    ]


def _with_gone_memory(core: str, call: Callable[[World], object]) -> tuple[object, ...]:
    w = build_world(core)
    live, gone = w.space.mmap(P), w.space.mmap(P)
    try:
        w.c.map_dma(GONE_IOVA, P, live, w.space)
        w.c.map_dma(GONE_IOVA + P, P, gone, w.space)
        w.vm.set_memslot(1, GONE_IOVA, P, live)
        w.vm.set_memslot(2, GONE_IOVA + P, P, gone)
        w.space.munmap(gone, P)
        w.state()
        before = w.state()
        with pytest.raises(DmaError) as info:
            call(w)
        assert info.value.errno == errno.EFAULT, str(info.value)
        assert w.state() == before
        assert decimals(info.value.detail) == [], str(info.value)
        text = str(info.value).replace(f"{live:#x}", "<live>").replace(f"{gone:#x}", "<gone>")
        return ("DmaError", info.value.errno, _normalized(w, text))
    finally:
        w.vm.set_memslot(1, 0, 0, 0)
        w.vm.set_memslot(2, 0, 0, 0)
        w.c.unmap_dma(GONE_IOVA, 2 * P)
        w.space.munmap(live, P)
        close_world(w)


@pytest.mark.parametrize(("what", "call"), _efault_calls(), ids=[c[0] for c in _efault_calls()])
def test_host_memory_gone_is_efault_named_in_hex_and_the_same_on_both_cores(
    what: str, call: Callable[[World], object]
) -> None:
    cores = ["python"] + ([] if NATIVE_MISSING else ["native"])
    got = {core: _with_gone_memory(core, call) for core in cores}
    if NATIVE_MISSING is None:
        assert got["native"] == got["python"]
