"""The argument rules of guest-memory access against a plain model, on each core.

Hypothesis throws every kind of address and size at ``dma_read``/``dma_write``/``dma_rw`` and
``read_guest``/``read_guest_into``/``write_guest``: small and huge ints, negative ones, values
at and past the top of the 64-bit space, floats, None, str, bool.  A few lines of model say
what must happen, in this order:

* an address or size that is not a plain ``int`` (a bool is not): ``EINVAL``;
* a negative size: ``EINVAL``;
* type1: zero length ``EINVAL``; a negative iova ``EINVAL``; iova + size past 2**64
  ``EOVERFLOW``; then mapping by mapping in address order, the first byte not mapped is
  ``EINVAL`` and the first mapping lacking the access (READ for any, WRITE for writes) is
  ``EPERM``;
* KVM: a range not inside guest physical space ``[0, 2**64)`` or a page with no slot is
  ``EFAULT``; zero length reads nothing;
* otherwise the bytes move exactly as the model's bytearray says.

A failing call is a ``DmaError`` with the model's errno and changes nothing (the world's
``state()``), whatever the size asked for: a huge size is refused before anything of that
size is allocated.
"""

from __future__ import annotations

import errno
from typing import Any

import pytest
import world
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from world import World, build_world, close_world

from dmarw import DmaError

P, TOP = world.P, world.TOP
# the world's iova layout: [start, end) -> (readable, writable)
IOVA_MAP = [
    (0, world.RO_IOVA, True, True),
    (world.RO_IOVA, world.WO_IOVA, True, False),
    (world.WO_IOVA, world.WO_IOVA + P, False, True),
]
SLOT_END = world.SLOT_PAGES * P  # one slot, gpa [0, SLOT_END) -> host offset 0
MAX_DATA = 3 * P  # writes carry real bytes: at most this many

NOT_INTS = st.sampled_from([0.5, 0.0, 1.0, -1.5, None, "0x0", "8", True, False, b"\x00"])
ADDRESSES = st.one_of(
    st.integers(0, world.HOST + 2 * P),
    st.integers(TOP - 2 * P, TOP + P),
    st.integers(-(1 << 66), 1 << 66),
    st.integers(-P, -1),
    NOT_INTS,
)
SIZES = st.one_of(st.integers(-3, MAX_DATA), st.integers(-(1 << 66), 1 << 66), NOT_INTS)
KINDS = ["dma_read", "dma_rw_read", "dma_write", "user_dma_read", "read_guest", "read_guest_into", "write_guest"]
WRITES = {"dma_write", "write_guest"}


def _is_int(v: object) -> bool:
    return type(v) is int


def iova_outcome(iova: object, n: object, write: bool) -> int | None:
    """The errno the model expects for a type1 access, or None if it succeeds."""
    if not _is_int(iova) or not _is_int(n):
        return errno.EINVAL
    assert isinstance(iova, int) and isinstance(n, int)
    if n <= 0 or iova < 0:
        return errno.EINVAL
    if iova + n > TOP:
        return errno.EOVERFLOW
    pos = iova
    while pos < iova + n:
        m = next((m for m in IOVA_MAP if m[0] <= pos < m[1]), None)
        if m is None:
            return errno.EINVAL
        if not m[2] or (write and not m[3]):
            return errno.EPERM
        pos = m[1]
    return None


def gpa_outcome(gpa: object, n: object) -> int | None:
    """The errno the model expects for a KVM access, or None if it succeeds."""
    if not _is_int(gpa) or not _is_int(n):
        return errno.EINVAL
    assert isinstance(gpa, int) and isinstance(n, int)
    if n < 0:
        return errno.EINVAL
    if gpa < 0 or gpa + n > TOP:
        return errno.EFAULT
    if n and gpa + n > SLOT_END:
        return errno.EFAULT
    return None


def _call(w: World, kind: str, addr: Any, size: Any, data: bytes) -> bytes | None:
    if kind == "dma_read":
        return w.c.dma_read(addr, size)
    if kind == "user_dma_read":
        return w.user.dma_read(addr, size)
    if kind == "dma_rw_read":
        buf = bytearray(size) if _is_int(size) and 0 <= size <= MAX_DATA else bytearray(1)
        w.c.dma_rw(addr, buf, False)
        return bytes(buf)
    if kind == "dma_write":
        w.c.dma_write(addr, data)
        return None
    if kind == "read_guest":
        return w.vm.read_guest(addr, size)
    if kind == "read_guest_into":
        buf = bytearray(size) if _is_int(size) and 0 <= size <= MAX_DATA else bytearray(1)
        w.vm.read_guest_into(addr, buf)
        return bytes(buf)
    if kind == "write_guest":
        w.vm.write_guest(addr, data)
        return None
    raise AssertionError(kind)


OPS = st.lists(st.tuples(st.sampled_from(KINDS), ADDRESSES, SIZES), min_size=1, max_size=6)


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=OPS)
def test_argument_rules_match_the_model(core: str, ops: list[tuple[str, Any, Any]]) -> None:
    w = build_world(core)
    host = bytearray(world.pattern(world.HOST))  # the model's memory
    try:
        for kind, addr, size in ops:
            write = kind in WRITES
            data = b""
            if write:  # a write's size is its data's: a real buffer, of a size that can exist
                size = size if _is_int(size) and 0 <= size <= MAX_DATA else len(str(size)) % 5 + 1
                data = bytes((i * 13 + 1) & 0xFF for i in range(size))
            if kind in ("dma_rw_read", "read_guest_into") and not (_is_int(size) and 0 <= size <= MAX_DATA):
                size = 1  # the buffer made by _call
            guest = kind in ("read_guest", "read_guest_into", "write_guest")
            want = gpa_outcome(addr, size) if guest else iova_outcome(addr, size, write)
            w.state()  # drain dirty bits
            before = w.state()
            try:
                got = _call(w, kind, addr, size, data)
            except DmaError as e:
                assert want is not None, (kind, addr, size, str(e))
                assert e.errno == want, (kind, addr, size, str(e))
                assert w.state() == before, (kind, addr, size)
                continue
            assert want is None, (kind, addr, size, "succeeded")
            assert isinstance(addr, int) and isinstance(size, int)
            if write:
                host[addr : addr + size] = data
            else:
                assert got == bytes(host[addr : addr + size]), (kind, addr, size)
            assert w.space.read(w.hva, world.HOST) == host
    finally:
        close_world(w)


@pytest.mark.parametrize(
    ("iova", "n", "write", "want"),
    [
        (0, 8, False, None),
        (world.RO_IOVA - 4, 8, False, None),  # RW then RO: readable
        (world.RO_IOVA - 4, 8, True, errno.EPERM),
        (world.WO_IOVA - 4, 8, False, errno.EPERM),
        (world.WO_IOVA + P - 4, 8, False, errno.EPERM),  # WO first, then unmapped
        (world.WO_IOVA + P, 8, False, errno.EINVAL),
        (-1, 8, False, errno.EINVAL),
        (TOP - 4, 8, False, errno.EOVERFLOW),
        (True, 8, False, errno.EINVAL),
        (0, 0, False, errno.EINVAL),
    ],
)
def test_the_model_itself(iova: object, n: object, write: bool, want: int | None) -> None:
    """The model agrees with the rules as the suites state them."""
    assert iova_outcome(iova, n, write) == want
