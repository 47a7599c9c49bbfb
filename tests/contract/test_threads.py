"""Thread safety of the container and the VM: the unmap fence and no lost dirty bit.

* Once ``unmap_dma`` returns, no ``dma_rw`` reaches that memory: right after it returns the
  test writes a sentinel into the host memory (``space.write``) and then frees it
  (``space.munmap``); a racing writer would overwrite the sentinel, a racing reader would
  return it, and either would fail with ``EFAULT`` on freed memory.
* No dirty bit set by a completed write is lost by a concurrent get: the union of every get
  (and of the unmap's bitmap) covers every page written by a write that returned.

Every loop is bounded by a count; nothing depends on wall-clock time.  The interpreter's
switch interval is shortened while the threads run so that they interleave finely.  Every
race runs on each core (``make_container`` / ``make_vm`` of the core under test).
"""

from __future__ import annotations

import errno
import gc
import random
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from functools import partial

import pytest

from dmarw import AddressSpace, Container, DmaError, Prot, Vm, bitmap_pages
from dmarw.locks import Rcu

P = 4096
LOCKS = ["mutex", "rwsem", "rcu"]
SENTINEL = b"\xc3"
MakeContainer = Callable[..., Container]
MakeVm = Callable[[AddressSpace], Vm]


@pytest.fixture(autouse=True)
def fine_switching() -> Iterator[None]:
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def _start(targets: Sequence[Callable[[], None]]) -> list[threading.Thread]:
    threads = [threading.Thread(target=t, daemon=True) for t in targets]
    for t in threads:
        t.start()
    return threads


def _caught(errors: list[BaseException], fn: Callable[[], None]) -> Callable[[], None]:
    """``fn``, keeping any exception it raises in ``errors`` (the test asserts it empty)."""

    def run() -> None:
        try:
            fn()
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    return run


def _race(
    errors: list[BaseException],
    workers: Sequence[Callable[[], None]],
    others: Sequence[Callable[[], None]],
    done: threading.Event,
) -> None:
    """Run ``workers`` and ``others`` in threads (exceptions kept in ``errors``); once every
    worker has returned, set ``done``, which ends the others' loops, and wait for them."""
    ws = _start([_caught(errors, f) for f in workers])
    os_ = _start([_caught(errors, f) for f in others])
    for t in ws:
        t.join()
    done.set()
    for t in os_:
        t.join()


class Round:
    """One mapping raced by accessors: ``unmapping`` is set just before ``unmap_dma``."""

    def __init__(self, c: Container, space: AddressSpace, npages: int) -> None:
        self.c = c
        self.space = space
        self.size = npages * P
        self.hva = space.mmap(self.size)
        c.map_dma(0, self.size, self.hva, space)
        self.unmapping = threading.Event()
        self.unmapped = threading.Event()  # set once unmap_dma has returned
        self.accessed = threading.Semaphore(0)  # one release per accessor's first success
        self.violations: list[str] = []
        self.written: set[int] = set()  # pages of writes that returned successfully
        self.lock = threading.Lock()

    def writer(self, seed: int) -> None:
        rng = random.Random(seed)
        first = True
        for _ in range(200_000):
            off = rng.randrange(self.size)
            n = rng.randint(1, min(2 * P, self.size - off))
            late = self.unmapped.is_set()  # unmap_dma had returned before this call began
            try:
                self.c.dma_write(off, b"W" * n)
            except DmaError as e:
                if e.errno == errno.EINVAL and self.unmapping.is_set():
                    break  # the mapping is gone: what we expect after unmap
                self.violations.append(f"write {off:#x}+{n:#x}: {e}")
                break
            if late:
                self.violations.append(f"write {off:#x}+{n:#x} began after unmap and succeeded")
            with self.lock:
                self.written.update(range(off // P, (off + n - 1) // P + 1))
            if first:
                first = False
                self.accessed.release()
        if first:
            self.accessed.release()

    def reader(self, seed: int) -> None:
        rng = random.Random(seed)
        first = True
        for _ in range(200_000):
            off = rng.randrange(self.size)
            n = rng.randint(1, min(2 * P, self.size - off))
            late = self.unmapped.is_set()
            try:
                data = self.c.dma_read(off, n)
            except DmaError as e:
                if e.errno == errno.EINVAL and self.unmapping.is_set():
                    break
                self.violations.append(f"read {off:#x}+{n:#x}: {e}")
                break
            if SENTINEL in data or late:
                self.violations.append(f"read {off:#x}+{n:#x} succeeded after unmap returned")
            if first:
                first = False
                self.accessed.release()
        if first:
            self.accessed.release()

    def unmap_and_fence(self, naccessors: int, get_dirty_bitmap: bool = False) -> bytes:
        """Wait until every accessor has succeeded once, unmap, then poison and free."""
        for _ in range(naccessors):
            self.accessed.acquire()
        self.unmapping.set()
        out = self.c.unmap_dma(0, self.size, get_dirty_bitmap=get_dirty_bitmap)
        self.unmapped.set()
        self.space.write(self.hva, SENTINEL * self.size)
        bitmap = b""
        if get_dirty_bitmap:
            assert isinstance(out, tuple)
            total, bitmap = out
        else:
            total = out
        assert total == self.size
        return bitmap

    def finish(self, threads: list[threading.Thread]) -> None:
        for t in threads:
            t.join()
        assert self.space.read(self.hva, self.size) == SENTINEL * self.size, "a write landed after unmap"
        self.space.munmap(self.hva, self.size)
        assert self.violations == []


@pytest.mark.parametrize("lock", LOCKS)
def test_no_write_lands_after_unmap_returns(make_container: MakeContainer, lock: str) -> None:
    c = make_container(lock=lock)
    space = AddressSpace()
    for rnd in range(15):
        r = Round(c, space, npages=4)
        threads = _start([partial(r.writer, s) for s in range(rnd * 10, rnd * 10 + 3)])
        r.unmap_and_fence(3)
        r.finish(threads)
    assert c.mappings() == []


@pytest.mark.parametrize("lock", LOCKS)
def test_unmap_bitmap_holds_every_completed_write(make_container: MakeContainer, lock: str) -> None:
    c = make_container(lock=lock)
    c.dirty_pages_start()
    space = AddressSpace()
    for rnd in range(15):
        r = Round(c, space, npages=8)
        threads = _start(
            [partial(r.writer, s) for s in range(rnd * 10, rnd * 10 + 2)]
            + [partial(r.reader, rnd * 10 + 9)]
        )
        bitmap = r.unmap_and_fence(3, get_dirty_bitmap=True)
        r.finish(threads)
        assert r.written, "the writers never wrote"
        assert r.written <= set(bitmap_pages(bitmap))


@pytest.mark.parametrize("lock", LOCKS)
def test_no_dirty_bit_lost_to_concurrent_gets(make_container: MakeContainer, lock: str) -> None:
    """Each writer dirties its own pages, each about once: a bit lost is never set again."""
    c = make_container(lock=lock)
    space = AddressSpace()
    per_writer, nwriters = 400, 3
    npages = per_writer * nwriters
    hva = space.mmap(npages * P + 4 * P)
    c.map_dma(0, npages * P, hva, space)
    c.dirty_pages_start()
    written: list[set[int]] = [set() for _ in range(nwriters)]
    reported: set[int] = set()
    errors: list[BaseException] = []
    writers_done = threading.Event()

    def writer(k: int) -> None:
        rng = random.Random(k)
        for i in range(per_writer):
            page = k * per_writer + i
            if i % 4 == 3 and i + 1 < per_writer:  # now and then straddle two pages
                off, n = page * P + P - 8, 16
            else:
                n = rng.randint(1, P)
                off = page * P + rng.randrange(P - n + 1)
            c.dma_write(off, b"d" * n)
            written[k].update(range(off // P, (off + n - 1) // P + 1))

    def getter() -> None:
        for _ in range(100_000):
            if writers_done.is_set():
                break
            reported.update(bitmap_pages(c.get_dirty_bitmap(0, npages * P)))

    def churn() -> None:  # map/unmap elsewhere in iova space, racing the same lock
        for i in range(200):
            c.map_dma(1 << 30, 4 * P, hva + npages * P, space)
            c.dma_write((1 << 30) + (i % 4) * P, b"c")
            assert c.unmap_dma(1 << 30, 4 * P) == 4 * P

    _race(errors, [partial(writer, k) for k in range(nwriters)], [getter, getter, churn], writers_done)
    reported.update(bitmap_pages(c.get_dirty_bitmap(0, npages * P)))
    assert errors == []
    all_written = set().union(*written)
    assert len(all_written) == npages
    assert all_written - reported == set()
    assert reported <= set(range(npages))


def test_rcu_readers_never_touch_memory_after_unmap_returns(make_container: MakeContainer) -> None:
    """rcu readers take no lock: the grace period alone must fence them off freed memory."""
    c = make_container(lock="rcu")
    space = AddressSpace()
    for rnd in range(25):
        r = Round(c, space, npages=2)
        threads = _start([partial(r.reader, s) for s in range(rnd * 10, rnd * 10 + 4)])
        r.unmap_and_fence(4)
        # free the host memory at once: a reader still inside would now fault (EFAULT)
        snapshot = space.read(r.hva, r.size)
        space.munmap(r.hva, r.size)
        for t in threads:
            t.join()
        assert snapshot == SENTINEL * r.size
        assert r.violations == []


@pytest.mark.parametrize("lock", LOCKS)
def test_pin_counts_stay_exact_under_concurrency(make_container: MakeContainer, lock: str) -> None:
    c = make_container(lock=lock)
    c.register_unmap_notifier(lambda iova, size: None)
    space = AddressSpace()
    hva = space.mmap(8 * P)
    c.map_dma(0, 8 * P, hva, space)
    c.dirty_pages_start()
    errors: list[BaseException] = []
    reported: set[int] = set()
    done = threading.Event()

    def pinner(k: int) -> None:
        for i in range(300):
            iova = ((k + i) % 7) * P
            assert c.pin_pages(iova, 2, Prot.READ) == [hva + iova, hva + iova + P]
            c.unpin_pages(iova, 2)

    def getter() -> None:
        for _ in range(100_000):
            if done.is_set():
                break
            reported.update(bitmap_pages(c.get_dirty_bitmap(0, 8 * P)))

    _race(errors, [partial(pinner, k) for k in range(4)], [getter], done)
    reported.update(bitmap_pages(c.get_dirty_bitmap(0, 8 * P)))
    assert errors == []
    assert c.pinned() == {}
    assert reported == set(range(8))  # every page was pinned while tracking: all dirty
    assert c.unmap_dma(0, 8 * P) == 8 * P


class PinRace:
    """One round of pinners racing an unmap whose notifier unpins."""

    def __init__(self, c: Container) -> None:
        self.c = c
        self.space = AddressSpace()
        self.hva = self.space.mmap(4 * P)
        self.c.map_dma(0, 4 * P, self.hva, self.space)
        self.unmapping = threading.Event()
        self.pinned_once = threading.Semaphore(0)
        self.violations: list[str] = []
        self.c.register_unmap_notifier(self.notifier)

    def notifier(self, iova: int, size: int) -> None:
        for page, count in self.c.pinned().items():
            if iova <= page < iova + size:
                for _ in range(count):
                    try:
                        self.c.unpin_pages(page, 1)
                    except DmaError as e:  # a pinner's own unpin got there first
                        if e.errno != errno.EINVAL:
                            self.violations.append(f"notifier unpin {page:#x}: {e}")

    def pinner(self, seed: int) -> None:
        rng = random.Random(seed)
        first = True
        try:
            for _ in range(100_000):
                page = rng.randrange(4) * P
                try:
                    self.c.pin_pages(page, 1, Prot.READ)
                except DmaError as e:
                    if e.errno == errno.EINVAL and self.unmapping.is_set():
                        break  # the mapping is gone
                    self.violations.append(f"pin {page:#x}: {e}")
                    break
                if first:
                    first = False
                    self.pinned_once.release()
                try:
                    self.c.unpin_pages(page, 1)
                except DmaError as e:
                    if e.errno != errno.EINVAL:  # the notifier may have dropped it
                        self.violations.append(f"unpin {page:#x}: {e}")
        finally:
            if first:
                self.pinned_once.release()


@pytest.mark.parametrize("lock", LOCKS)
def test_unmap_never_removes_a_pinned_mapping_while_pins_race(make_container: MakeContainer, lock: str) -> None:
    """Pinners race an unmap whose notifier unpins: the unmap may be EBUSY, never wrong."""
    for rnd in range(10):
        r = PinRace(make_container(lock=lock))
        threads = _start([partial(r.pinner, rnd * 10 + k) for k in range(3)])
        for _ in threads:
            r.pinned_once.acquire()
        r.unmapping.set()
        for _ in range(10_000):
            try:
                assert r.c.unmap_dma(0, 4 * P) == 4 * P
                break
            except DmaError as e:
                assert e.errno == errno.EBUSY  # re-pinned after the notifier: try again
                assert r.c.mappings() == [(0, 4 * P, r.hva, Prot.READ | Prot.WRITE)]
        else:  # pragma: no cover
            pytest.fail("unmap_dma never got through")
        for t in threads:
            t.join()
        assert r.violations == []
        assert r.c.mappings() == []
        assert r.c.pinned() == {}  # unmap succeeded only without pins; none possible after


@pytest.mark.parametrize("lock", LOCKS)
def test_tracking_start_stop_racing_writers(make_container: MakeContainer, lock: str) -> None:
    c = make_container(lock=lock)
    space = AddressSpace()
    hva = space.mmap(16 * P)
    c.map_dma(0, 16 * P, hva, space)
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        for i in range(2000):
            c.dma_write(((k * 5 + i) % 16) * P + 1, b"w" * 100)

    def toggler() -> None:
        for _ in range(150):
            c.dirty_pages_start()
            try:
                bitmap_pages(c.get_dirty_bitmap(0, 16 * P))
            except DmaError as e:  # only if stopped in between, which nobody does
                errors.append(e)
            c.dirty_pages_stop()

    threads = _start([_caught(errors, partial(writer, k)) for k in range(3)] + [_caught(errors, toggler)])
    for t in threads:
        t.join()
    assert errors == []
    assert not c.tracking
    c.dirty_pages_start()
    assert c.get_dirty_bitmap(0, 16 * P) == bytes(8)  # fresh bitmaps after a restart
    c.dma_write(15 * P, b"z")
    assert bitmap_pages(c.get_dirty_bitmap(0, 16 * P)) == [15]


class SlotRace:
    """One round of guest writers racing a memslot move (or delete)."""

    def __init__(self, vm: Vm, move: bool) -> None:
        self.vm = vm
        self.move = move
        self.old = vm.space.mmap(2 * P)
        self.new = vm.space.mmap(2 * P)
        vm.set_memslot(0, 0, 2 * P, self.old)
        self.changing = threading.Event()  # set just before set_memslot
        self.changed = threading.Event()  # set once it has returned
        self.wrote = threading.Semaphore(0)
        self.violations: list[str] = []

    def writer(self, seed: int) -> None:
        rng = random.Random(seed)
        first, after = True, 0
        try:
            for _ in range(200_000):
                off = rng.randrange(2 * P - 64)
                late = self.changed.is_set()
                try:
                    self.vm.write_guest(off, b"G" * 64)
                except DmaError as e:
                    if e.errno == errno.EFAULT and self.changing.is_set() and not self.move:
                        break  # the slot was deleted
                    self.violations.append(f"write_guest {off:#x}: {e}")
                    break
                if first:
                    first = False
                    self.wrote.release()
                if late:
                    after += 1
                    if after >= 50:
                        break
        finally:
            if first:
                self.wrote.release()


@pytest.mark.parametrize("move", [True, False], ids=["move", "delete"])
def test_no_guest_write_lands_after_set_memslot_returns(make_vm: MakeVm, move: bool) -> None:
    """KVM: once a slot is moved away (or deleted), no write_guest reaches its old memory."""
    space = AddressSpace()
    vm = make_vm(space)
    for rnd in range(15):
        r = SlotRace(vm, move)
        threads = _start([partial(r.writer, rnd * 10 + k) for k in range(3)])
        for _ in threads:
            r.wrote.acquire()
        r.changing.set()
        if move:
            vm.set_memslot(0, 0, 2 * P, r.new)
        else:
            vm.set_memslot(0, 0, 0, 0)
        r.changed.set()
        space.write(r.old, SENTINEL * 2 * P)
        for t in threads:
            t.join()
        assert r.violations == []
        assert space.read(r.old, 2 * P) == SENTINEL * 2 * P, "a guest write landed in the old slot"
        if move:
            assert b"G" in space.read(r.new, 2 * P)
            vm.set_memslot(0, 0, 0, 0)
        space.munmap(r.old, 2 * P)
        space.munmap(r.new, 2 * P)
    vm.close()


def test_rcu_forgets_readers_of_exited_threads() -> None:
    """Each thread's reader record dies with the thread: synchronize() scans live ones only."""
    rcu = Rcu("test.rcu")

    def read_once() -> None:
        rcu.read_unlock(rcu.read_lock())

    for _ in range(40):
        t = threading.Thread(target=read_once)
        t.start()
        t.join()
    gc.collect()
    assert len(rcu._readers) == 0  # white-box: the registry the grace period scans
    rec = rcu.read_lock()  # a live reader is still waited for
    done = threading.Event()
    t = threading.Thread(target=lambda: (rcu.synchronize(), done.set()))
    t.start()
    assert not done.is_set()  # cannot finish while this reader is inside
    rcu.read_unlock(rec)
    t.join()
    assert done.is_set()


def test_no_kvm_dirty_bit_lost_to_concurrent_get_dirty_log(make_vm: MakeVm) -> None:
    """The KVM log: every page written by a completed write_guest shows up in some get."""
    space = AddressSpace()
    vm = make_vm(space)
    per_writer, nwriters = 300, 3
    npages = per_writer * nwriters
    hva = space.mmap(npages * P)
    vm.set_memslot(0, 0, npages * P, hva, dirty_log=True)
    reported: set[int] = set()
    errors: list[BaseException] = []
    writers_done = threading.Event()

    def writer(k: int) -> None:
        rng = random.Random(k)
        for i in range(per_writer):
            page = k * per_writer + i
            n = rng.randint(1, P)
            vm.write_guest(page * P + rng.randrange(P - n + 1), b"k" * n)

    def getter() -> None:
        for _ in range(100_000):
            if writers_done.is_set():
                break
            reported.update(bitmap_pages(vm.get_dirty_log(0)))

    _race(errors, [partial(writer, k) for k in range(nwriters)], [getter, getter], writers_done)
    reported.update(bitmap_pages(vm.get_dirty_log(0)))
    assert errors == []
    assert reported == set(range(npages))
    vm.close()
