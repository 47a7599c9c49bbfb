"""A stateful differential test: the container against a plain reference model.

Hypothesis drives random map/unmap/pin/unpin/dma_rw (reads and writes, across page and
mapping boundaries)/get_dirty_bitmap/start/stop sequences.  The reference model is a dict of
mappings, a bytearray of host memory, a dict of pins and a set of dirty iova pages.  After
every step the results, errnos, mappings, pins, tracking flag and host memory must agree.
One machine per lock strategy, and one for the KVM path, each run on every core: the machines
take the ``make_container`` / ``make_vm`` of the core under test.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from dmarw import AddressSpace, Container, DmaError, Prot, Vm, bitmap_pages

P = 4096
IOVA_PAGES = 12  # the iova window the machine plays in
HOST_PAGES = 8  # host memory behind it (mappings may alias the same host pages)
R, W, RW = Prot.READ, Prot.WRITE, Prot.READ | Prot.WRITE


@dataclass(frozen=True)
class M:
    """A model mapping: iova range → host page offset ``hpage``."""

    iova: int
    size: int
    hpage: int
    prot: Prot

    @property
    def end(self) -> int:
        return self.iova + self.size

    def pages(self) -> range:
        return range(self.iova, self.end, P)


Outcome = tuple[str, Any]


def _run(fn: Callable[..., Any], *args: Any, **kw: Any) -> Outcome:
    name = getattr(fn, "__name__", "call")
    try:
        out: Outcome = ("ok", fn(*args, **kw))
    except DmaError as e:
        out = ("err", e.errno)
    event(f"{name}: {out[0] if out[0] == 'ok' else errno.errorcode[out[1]]}")
    return out


class CoreMachine(RuleBasedStateMachine):
    def __init__(self, make_container: Callable[..., Container], lock: str, mm_ref: str) -> None:
        super().__init__()
        self.space = AddressSpace()
        self.hva = self.space.mmap(HOST_PAGES * P)
        self.c = make_container(lock=lock, mm_ref=mm_ref)
        self.c.register_unmap_notifier(self._notify)
        self.notifier_unpins = True
        self.notified: list[tuple[int, int]] = []
        # the reference model
        self.maps: dict[int, M] = {}
        self.host = bytearray(HOST_PAGES * P)
        self.pins: dict[int, int] = {}
        self.tracking = False
        self.dirty: set[int] = set()  # iova of each dirty page
        self.closed = False  # the owner has exited (the machine keeps one user reference)

    def teardown(self) -> None:
        if self.closed:
            self.space.mmput()
        else:
            self.space.close()

    # -- the driver's notifier ------------------------------------------------------------
    def _notify(self, iova: int, size: int) -> None:
        self.notified.append((iova, size))
        if self.notifier_unpins:
            for page, count in self.c.pinned().items():
                if iova <= page < iova + size:
                    for _ in range(count):
                        self.c.unpin_pages(page, 1)

    # -- model helpers --------------------------------------------------------------------
    def find(self, iova: int) -> M | None:
        for m in self.maps.values():
            if m.iova <= iova < m.end:
                return m
        return None

    def overlapping(self, iova: int, size: int) -> list[M]:
        return sorted(
            (m for m in self.maps.values() if m.iova < iova + size and iova < m.end),
            key=lambda m: m.iova,
        )

    def expect(self, got: Outcome, want: Outcome) -> None:
        assert got == want, f"container {got!r} != model {want!r}"

    # -- rules ----------------------------------------------------------------------------
    @initialize()
    def some_mappings(self) -> None:
        """Start from a few mappings (one aliasing another's host pages) and a pattern."""
        pattern = bytes((i * 7) & 0xFF for i in range(HOST_PAGES * P))
        self.space.write(self.hva, pattern)
        self.host[:] = pattern
        for ipage, npages, hpage, prot in [(0, 3, 0, RW), (3, 2, 3, R), (6, 2, 1, RW)]:
            self.c.map_dma(ipage * P, npages * P, self.hva + hpage * P, self.space, prot)
            self.maps[ipage * P] = M(ipage * P, npages * P, hpage, prot)

    @rule(
        ipage=st.integers(0, IOVA_PAGES - 1),
        npages=st.integers(1, 4),
        hpage=st.integers(0, HOST_PAGES - 1),
        prot=st.sampled_from([R, W, RW, RW]),
    )
    def map_dma(self, ipage: int, npages: int, hpage: int, prot: Prot) -> None:
        iova, size = ipage * P, npages * P
        got = _run(self.c.map_dma, iova, size, self.hva + hpage * P, self.space, prot)
        if self.overlapping(iova, size):
            want: Outcome = ("err", errno.EEXIST)
        elif hpage + npages > HOST_PAGES or self.closed:
            want = ("err", errno.EFAULT)
        else:
            want = ("ok", None)
            self.maps[iova] = M(iova, size, hpage, prot)
        self.expect(got, want)

    @rule(
        ipage=st.integers(0, IOVA_PAGES),
        npages=st.integers(1, IOVA_PAGES),
        flag=st.booleans(),
    )
    def unmap_dma(self, ipage: int, npages: int, flag: bool) -> None:
        iova, size = ipage * P, npages * P
        self.notified.clear()
        got = _run(self.c.unmap_dma, iova, size, get_dirty_bitmap=flag)
        victims = self.overlapping(iova, size)
        busy = [(m.iova, m.size) for m in victims if any(p in self.pins for p in m.pages())]
        want: Outcome
        if flag and not self.tracking:
            want = ("err", errno.EINVAL)
        elif any(m.iova < iova or m.end > iova + size for m in victims):
            want = ("err", errno.EINVAL)
        elif busy and not self.notifier_unpins:
            want = ("err", errno.EBUSY)
        else:
            for m in victims:
                for p in m.pages():
                    self.pins.pop(p, None)
            total = sum(m.size for m in victims)
            if flag:
                bits = sorted((p - iova) // P for p in self.dirty if iova <= p < iova + size)
                want = ("ok", (total, bits))
            else:
                want = ("ok", total)
            for m in victims:
                del self.maps[m.iova]
                self.dirty.difference_update(m.pages())
        if got[0] == "ok" and flag:
            total_got, bm = got[1]
            assert len(bm) == (npages + 63) // 64 * 8
            got = ("ok", (total_got, bitmap_pages(bm)))
        self.expect(got, want)
        if want[0] == "err" and want[1] == errno.EINVAL:
            assert self.notified == []
        else:
            assert sorted(self.notified) == sorted(busy)
            if busy:
                event(f"unmap_dma of pinned mappings: {'ok' if want[0] == 'ok' else 'EBUSY'}")

    @precondition(lambda self: bool(self.maps))
    @rule(data=st.data(), flag=st.booleans())
    def unmap_a_mapping(self, data: st.DataObject, flag: bool) -> None:
        """Unmap exactly one existing mapping: hits the pinned/notifier/EBUSY paths."""
        m = data.draw(st.sampled_from(sorted(self.maps.values(), key=lambda m: m.iova)))
        self.unmap_dma(m.iova // P, m.size // P, flag)

    @rule(ipage=st.integers(0, IOVA_PAGES - 1), npage=st.integers(1, 3), prot=st.sampled_from([R, W, RW]))
    def pin_pages(self, ipage: int, npage: int, prot: Prot) -> None:
        pages = [(ipage + i) * P for i in range(npage)]
        got = _run(self.c.pin_pages, pages[0], npage, prot)
        found = [self.find(p) for p in pages]
        want: Outcome
        if any(m is None for m in found):
            want = ("err", errno.EINVAL)
        elif any(prot & ~m.prot for m in found if m is not None) or self.closed:
            want = ("err", errno.EPERM)
        else:
            hvas = []
            for p, m in zip(pages, found, strict=True):
                assert m is not None
                hvas.append(self.hva + m.hpage * P + (p - m.iova))
                self.pins[p] = self.pins.get(p, 0) + 1
                if self.tracking:
                    self.dirty.add(p)
            want = ("ok", hvas)
        self.expect(got, want)

    @precondition(lambda self: bool(self.maps))
    @rule(data=st.data(), npage=st.integers(1, 2), prot=st.sampled_from([R, W, RW]))
    def pin_a_mapped_page(self, data: st.DataObject, npage: int, prot: Prot) -> None:
        pages = sorted(p for m in self.maps.values() for p in m.pages())
        self.pin_pages(data.draw(st.sampled_from(pages)) // P, npage, prot)

    def _unpin(self, iova: int, npage: int) -> None:
        pages = [iova + i * P for i in range(npage)]
        got = _run(self.c.unpin_pages, iova, npage)
        want: Outcome
        if any(self.find(p) is None or p not in self.pins for p in pages):
            want = ("err", errno.EINVAL)
        else:
            for p in pages:
                self.pins[p] -= 1
                if not self.pins[p]:
                    del self.pins[p]
            want = ("ok", None)
        self.expect(got, want)

    @rule(ipage=st.integers(0, IOVA_PAGES - 1), npage=st.integers(1, 3))
    def unpin_pages(self, ipage: int, npage: int) -> None:
        self._unpin(ipage * P, npage)

    @precondition(lambda self: bool(self.pins))
    @rule(data=st.data())
    def unpin_a_pinned_page(self, data: st.DataObject) -> None:
        self._unpin(data.draw(st.sampled_from(sorted(self.pins))), 1)

    @rule(
        ipage=st.integers(0, IOVA_PAGES - 1),
        off=st.sampled_from([0, 1, 7, P // 2, P - 3, P - 1]),
        n=st.sampled_from([1, 2, 3, 100, P - 1, P, P + 1, 2 * P + 5, 3 * P]),
        write=st.booleans(),
        seed=st.integers(0, 255),
    )
    def dma_rw(self, ipage: int, off: int, n: int, write: bool, seed: int) -> None:
        self._dma_rw(ipage * P + off, n, write, seed)

    @precondition(lambda self: bool(self.maps))
    @rule(data=st.data(), write=st.booleans(), seed=st.integers(0, 255))
    def dma_rw_from_a_mapping(self, data: st.DataObject, write: bool, seed: int) -> None:
        """Start inside a mapping, often near its end, so accesses cross into the next one."""
        m = data.draw(st.sampled_from(sorted(self.maps.values(), key=lambda m: m.iova)))
        back = data.draw(st.sampled_from([1, 2, 5, P - 1, P, P + 3, m.size]))
        start = max(m.iova, m.end - back)
        n = data.draw(st.sampled_from([1, 2, 7, P, P + 1, 2 * P, 3 * P + 5]))
        self._dma_rw(start, n, write, seed)

    def _dma_rw(self, iova: int, n: int, write: bool, seed: int) -> None:
        data = bytes((seed + i * 31) & 0xFF for i in range(n))
        buf = bytearray(data) if write else bytearray(b"\x5a" * n)
        got = _run(self.c.dma_rw, iova, buf, write)
        need = RW if write else R
        chunks: list[tuple[M, int, int]] = []
        pos, end = iova, iova + n
        want: Outcome = ("ok", None)
        while pos < end:
            m = self.find(pos)
            if m is None:
                want = ("err", errno.EINVAL)
                break
            if need & ~m.prot:
                want = ("err", errno.EPERM)
                break
            seg = min(end, m.end) - pos
            chunks.append((m, pos, seg))
            pos += seg
        if want[0] == "ok" and self.closed:
            want = ("err", errno.EPERM)
        if want[0] == "ok":
            expect_buf = bytearray()
            for m, at, seg in chunks:
                h = m.hpage * P + (at - m.iova)
                if write:
                    done = at - iova
                    self.host[h : h + seg] = data[done : done + seg]
                    if self.tracking:
                        first = (at - m.iova) // P
                        last = (at - m.iova + seg - 1) // P
                        self.dirty.update(m.iova + k * P for k in range(first, last + 1))
                else:
                    expect_buf += self.host[h : h + seg]
            if not write:
                assert buf == expect_buf
        else:
            assert buf == (data if write else b"\x5a" * n)  # nothing moved into the buffer
        self.expect(got, want)

    @rule(ipage=st.integers(0, IOVA_PAGES), npages=st.integers(1, IOVA_PAGES))
    def get_dirty_bitmap(self, ipage: int, npages: int) -> None:
        iova, size = ipage * P, npages * P
        got = _run(self.c.get_dirty_bitmap, iova, size)
        want: Outcome
        if not self.tracking:
            want = ("err", errno.EINVAL)
        elif any(m.iova < iova or m.end > iova + size for m in self.overlapping(iova, size)):
            want = ("err", errno.EINVAL)
        else:
            inside = {p for p in self.dirty if iova <= p < iova + size}
            want = ("ok", sorted((p - iova) // P for p in inside))
            self.dirty -= inside
            self.dirty |= {p for p in self.pins if iova <= p < iova + size}
        if got[0] == "ok":
            assert len(got[1]) == (npages + 63) // 64 * 8
            got = ("ok", bitmap_pages(got[1]))
        self.expect(got, want)

    @rule()
    def dirty_pages_start(self) -> None:
        self.expect(_run(self.c.dirty_pages_start), ("ok", None))
        if not self.tracking:
            self.tracking = True
            self.dirty = set(self.pins)

    @rule()
    def dirty_pages_stop(self) -> None:
        self.expect(_run(self.c.dirty_pages_stop), ("ok", None))
        self.tracking = False
        self.dirty = set()

    @precondition(lambda self: not self.closed)
    @rule(roll=st.integers(0, 7))
    def owner_exits(self, roll: int) -> None:
        """The VMM exits (rarely); an in-flight user keeps its memory and the invariant alive."""
        if roll:
            return
        assert self.space.mmget_not_zero()
        self.space.close()
        self.closed = True

    @rule()
    def toggle_notifier(self) -> None:
        self.notifier_unpins = not self.notifier_unpins

    @rule(hpage=st.integers(0, HOST_PAGES - 1), seed=st.integers(0, 255))
    def host_write(self, hpage: int, seed: int) -> None:
        """The VMM itself writes guest RAM: seen by dma_rw, never marked dirty by the IOMMU."""
        data = bytes([seed]) * 64
        self.space.write(self.hva + hpage * P + 100, data)
        self.host[hpage * P + 100 : hpage * P + 164] = data

    # -- invariants -----------------------------------------------------------------------
    @invariant()
    def same_state(self) -> None:
        want_maps = [
            (m.iova, m.size, self.hva + m.hpage * P, m.prot)
            for m in sorted(self.maps.values(), key=lambda m: m.iova)
        ]
        assert self.c.mappings() == want_maps
        assert self.c.pinned() == self.pins
        assert self.c.tracking == self.tracking
        assert self.space.read(self.hva, HOST_PAGES * P) == self.host


@dataclass(frozen=True)
class S:
    """A model memslot."""

    gpa: int
    size: int
    hpage: int
    readonly: bool
    log: bool

    @property
    def end(self) -> int:
        return self.gpa + self.size


class VmMachine(RuleBasedStateMachine):
    """The KVM path against the same kind of model: slots, host bytes, per-slot dirty pages."""

    def __init__(self, make_vm: Callable[[AddressSpace], Vm]) -> None:
        super().__init__()
        self.space = AddressSpace()
        self.hva = self.space.mmap(HOST_PAGES * P)
        self.vm = make_vm(self.space)
        self.slots: dict[int, S] = {}
        self.host = bytearray(HOST_PAGES * P)
        self.dirty: dict[int, set[int]] = {}  # slot -> page indices within the slot

    def teardown(self) -> None:
        self.vm.close()
        self.space.close()

    def find(self, gpa: int) -> tuple[int, S] | None:
        for k, sl in self.slots.items():
            if sl.gpa <= gpa < sl.end:
                return k, sl
        return None

    @initialize()
    def some_slots(self) -> None:
        pattern = bytes((i * 13) & 0xFF for i in range(HOST_PAGES * P))
        self.space.write(self.hva, pattern)
        self.host[:] = pattern
        for k, (gpage, npages, hpage, ro, log) in enumerate([(0, 3, 0, False, True), (3, 2, 5, True, True), (6, 3, 2, False, False)]):
            self.vm.set_memslot(k, gpage * P, npages * P, self.hva + hpage * P, readonly=ro, dirty_log=log)
            self.slots[k] = S(gpage * P, npages * P, hpage, ro, log)
            self.dirty[k] = set()

    @rule(
        slot=st.integers(0, 3),
        gpage=st.integers(0, IOVA_PAGES - 1),
        npages=st.integers(0, 4),
        hpage=st.integers(0, HOST_PAGES - 1),
        readonly=st.booleans(),
        log=st.booleans(),
    )
    def set_memslot(self, slot: int, gpage: int, npages: int, hpage: int, readonly: bool, log: bool) -> None:
        gpa, size = gpage * P, npages * P
        got = _run(self.vm.set_memslot, slot, gpa, size, self.hva + hpage * P, readonly=readonly, dirty_log=log)
        want: Outcome
        others = {k: sl for k, sl in self.slots.items() if k != slot}
        if size == 0:
            if slot in self.slots:
                want = ("ok", None)
                del self.slots[slot]
                del self.dirty[slot]
            else:
                want = ("err", errno.EINVAL)
        elif any(sl.gpa < gpa + size and gpa < sl.end for sl in others.values()):
            want = ("err", errno.EEXIST)
        elif hpage + npages > HOST_PAGES:
            want = ("err", errno.EFAULT)
        else:
            want = ("ok", None)
            self.slots[slot] = S(gpa, size, hpage, readonly, log)
            self.dirty[slot] = set()
        assert got == want, f"vm {got!r} != model {want!r}"

    def _walk(self, gpa: int, n: int, write: bool) -> list[tuple[int, S, int, int]] | None:
        out = []
        pos = 0
        while pos < n:
            g = gpa + pos
            seg = min(n - pos, P - g % P)
            found = self.find(g)
            if found is None or (write and found[1].readonly):
                return None
            out.append((found[0], found[1], g - found[1].gpa, seg))
            pos += seg
        return out

    @rule(
        gpage=st.integers(0, IOVA_PAGES - 1),
        off=st.sampled_from([0, 1, P // 2, P - 2, P - 1]),
        n=st.sampled_from([1, 2, 5, P - 1, P, P + 1, 2 * P + 3]),
        write=st.booleans(),
        seed=st.integers(0, 255),
    )
    def guest_access(self, gpage: int, off: int, n: int, write: bool, seed: int) -> None:
        gpa = gpage * P + off
        pages = self._walk(gpa, n, write)
        if write:
            data = bytes((seed + i * 5) & 0xFF for i in range(n))
            got = _run(self.vm.write_guest, gpa, data)
            if pages is None:
                assert got == ("err", errno.EFAULT)
                return
            assert got == ("ok", None)
            pos = 0
            for k, sl, o, seg in pages:
                h = sl.hpage * P + o
                self.host[h : h + seg] = data[pos : pos + seg]
                if sl.log:
                    self.dirty[k].add(o // P)
                pos += seg
        else:
            buf = bytearray(b"\xa5" * n)
            got = _run(self.vm.read_guest_into, gpa, buf)
            if pages is None:
                assert got == ("err", errno.EFAULT)
                assert buf == b"\xa5" * n
                return
            assert got == ("ok", None)
            want = b"".join(bytes(self.host[sl.hpage * P + o : sl.hpage * P + o + seg]) for _, sl, o, seg in pages)
            assert buf == want

    @rule(slot=st.integers(0, 3))
    def get_dirty_log(self, slot: int) -> None:
        got = _run(self.vm.get_dirty_log, slot)
        if slot not in self.slots:
            assert got == ("err", errno.EINVAL)
        elif not self.slots[slot].log:
            assert got == ("err", errno.ENXIO)
        else:
            npages = self.slots[slot].size // P
            assert got[0] == "ok" and len(got[1]) == (npages + 63) // 64 * 8
            assert bitmap_pages(got[1]) == sorted(self.dirty[slot])
            self.dirty[slot] = set()

    @invariant()
    def same_state(self) -> None:
        want = sorted((sl.gpa, k, sl.size, self.hva + sl.hpage * P, sl.readonly, sl.log) for k, sl in self.slots.items())
        got = [(m.gpa, m.slot, m.size, m.hva, m.readonly, m.dirty.tracking) for m in self.vm.memslots()]
        assert got == want
        assert self.space.read(self.hva, HOST_PAGES * P) == self.host


SETTINGS = settings(
    max_examples=60,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.mark.parametrize(
    ("lock", "mm_ref"),
    [("mutex", "get_task_mm"), ("rwsem", "mmget_not_zero"), ("rcu", "mmget_not_zero")],
)
def test_container_matches_the_model(
    make_container: Callable[..., Container], lock: str, mm_ref: str
) -> None:
    run_state_machine_as_test(lambda: CoreMachine(make_container, lock, mm_ref), settings=SETTINGS)


def test_vm_matches_the_model(make_vm: Callable[[AddressSpace], Vm]) -> None:
    run_state_machine_as_test(lambda: VmMachine(make_vm), settings=SETTINGS)
