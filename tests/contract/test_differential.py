"""Differential: identical random operation sequences on both cores.

Random map/unmap/dma_rw (also at the top of the iova space)/pin/unpin/dirty/memslot/guest
access sequences run on the reference and on the native core; results, errnos, mappings,
pins, host memory and every bitmap must be identical.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import NATIVE_MISSING, new_container, new_vm
from dmarw import AddressSpace, DmaError, Prot

pytestmark = pytest.mark.skipif(NATIVE_MISSING is not None, reason=str(NATIVE_MISSING))

P = 4096
NP = 16  # pages of guest RAM in the differential runs

addr_page = st.integers(0, NP + 2)
npg = st.integers(0, 6)
op = st.one_of(
    st.tuples(st.just("map"), addr_page, st.integers(1, 6), st.integers(0, NP - 1), st.sampled_from([1, 2, 3])),
    st.tuples(st.just("unmap"), addr_page, npg, st.booleans()),
    st.tuples(st.just("rw"), st.integers(0, (NP + 2) * P), st.integers(0, 3 * P), st.booleans(), st.integers(0, 255)),
    st.tuples(st.just("rw_top"), st.integers(0, 8), st.integers(0, 16), st.booleans()),
    st.tuples(st.just("pin"), addr_page, npg, st.sampled_from([1, 2, 3])),
    st.tuples(st.just("unpin"), addr_page, npg),
    st.tuples(st.just("bitmap"), addr_page, npg),
    st.tuples(st.just("start"),),
    st.tuples(st.just("stop"),),
    st.tuples(st.just("slot"), st.integers(0, 2), addr_page, st.integers(0, 4), st.integers(0, NP - 1), st.booleans(), st.booleans()),
    st.tuples(st.just("guest"), st.integers(0, (NP + 2) * P), st.integers(0, 2 * P), st.booleans(), st.integers(0, 255)),
    st.tuples(st.just("log"), st.integers(0, 2)),
)


# a starting point where most accesses succeed: mappings of every prot, two memslots (one
# read-only, one logging), tracking on; the random operations then change all of it
PROLOGUE: list[tuple[Any, ...]] = [
    ("map", 0, 4, 0, 3),
    ("map", 4, 2, 6, 1),
    ("map", 6, 2, 2, 2),
    ("map", 8, 6, 8, 3),
    ("slot", 0, 0, 8, 0, False, True),
    ("slot", 1, 8, 4, 8, True, False),
    ("start",),
    ("pin", 1, 2, 3),
]


def _run(core: str, lock: str, mm: str, ops: list[tuple[Any, ...]]) -> list[Any]:
    space = AddressSpace()
    hva = space.mmap(NP * P, backing="memfd")
    space.write(hva, bytes(i * 7 & 0xFF for i in range(NP * P)))
    c = new_container(core, lock=lock, mm_ref=mm)
    vm = new_vm(space, core)
    c.register_unmap_notifier(lambda iova, size: [
        c.unpin_pages(p, 1) for p, n in sorted(c.pinned().items()) if iova <= p < iova + size for _ in range(n)
    ])
    trace: list[Any] = []

    def call(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        try:
            r = fn(*args, **kw)
        except DmaError as e:
            return ("err", e.errno)
        return ("ok", r)

    for o in ops:
        kind = o[0]
        if kind == "map":
            trace.append(call(c.map_dma, o[1] * P, o[2] * P, hva + min(o[3], NP - o[2]) * P if o[2] <= NP else hva, space, Prot(o[4])))
        elif kind == "unmap":
            trace.append(call(c.unmap_dma, o[1] * P, o[2] * P, get_dirty_bitmap=o[3]))
        elif kind in ("rw", "rw_top"):
            if kind == "rw":
                iova, n, write, seed = o[1], o[2], o[3], o[4]
            else:
                iova, n, write, seed = (1 << 64) - o[1], o[2], o[3], 1
            buf = bytearray((seed + i) & 0xFF for i in range(n))
            r = call(c.dma_rw, iova, buf, write)
            trace.append((r, bytes(buf)))
        elif kind == "pin":
            r = call(c.pin_pages, o[1] * P, o[2], Prot(o[3]))
            trace.append(("ok", [h - hva for h in r[1]]) if r[0] == "ok" else r)
        elif kind == "unpin":
            trace.append(call(c.unpin_pages, o[1] * P, o[2]))
        elif kind == "bitmap":
            trace.append(call(c.get_dirty_bitmap, o[1] * P, o[2] * P))
        elif kind == "start":
            trace.append(call(c.dirty_pages_start))
        elif kind == "stop":
            trace.append(call(c.dirty_pages_stop))
        elif kind == "slot":
            _, slot, gpa_pg, n, hpg, ro, log = o
            trace.append(call(vm.set_memslot, slot, gpa_pg * P, n * P, hva + min(hpg, NP - n) * P, readonly=ro, dirty_log=log))
        elif kind == "guest":
            _, gpa, n, write, seed = o
            if write:
                trace.append(call(vm.write_guest, gpa, bytes((seed + i) & 0xFF for i in range(n))))
            else:
                trace.append(call(vm.read_guest, gpa, n))
        elif kind == "log":
            trace.append(call(vm.get_dirty_log, o[1]))
        # hva relative to the guest RAM: the two runs' mappings may sit at different addresses
        trace.append(([(i, n, h - hva, pr) for i, n, h, pr in c.mappings()], c.pinned(), c.tracking))
    trace.append(space.read(hva, NP * P))
    if c.tracking:
        trace.append([(d[0], call(c.get_dirty_bitmap, d[0], d[1])) for d in c.mappings()])
    trace.append([(s.slot, call(vm.get_dirty_log, s.slot)) for s in vm.memslots()])
    vm.close()
    for iova, size, _, _ in c.mappings():
        for p, n in list(c.pinned().items()):
            if iova <= p < iova + size:
                for _ in range(n):
                    c.unpin_pages(p, 1)
        c.unmap_dma(iova, size)
    space.close()
    return trace


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lock=st.sampled_from(["mutex", "rwsem", "rcu"]),
    mm=st.sampled_from(["get_task_mm", "mmget_not_zero"]),
    ops=st.lists(op, min_size=1, max_size=40),
)
def test_differential_python_vs_native(lock: str, mm: str, ops: list[tuple[Any, ...]]) -> None:
    ops = PROLOGUE + ops
    ref = _run("python", lock, mm, ops)
    got = _run("native", lock, mm, ops)
    assert len(ref) == len(got)
    for i, (a, b) in enumerate(zip(ref, got, strict=True)):
        assert a == b, f"divergence at step {i}: {ops[i // 2] if i // 2 < len(ops) else 'final'}"
