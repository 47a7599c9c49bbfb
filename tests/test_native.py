"""The native core's own pieces: what only it has, beside the contract suites.

The behaviour suites under ``tests/contract/`` run on both cores (the ``core`` fixture), and
``tests/contract/test_differential.py`` runs identical random sequences on both; this file
holds the native-only pieces: the bitmap primitives, the counter, core selection, memory
safety when host memory goes away under a mapping, concurrent readers against unmap and
dirty gets, the replay entry points, the native VFIO group layer.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
from typing import Any

import pytest

pytest.importorskip("dmarw._native", reason="the native core dmarw._native is not built")

from dmarw import AddressSpace, Container, DmaError, Prot, Vm, _native, bitmap_pages, core  # noqa: E402
from dmarw.bitmap import DirtyBitmap, bitmap_bytes, to_bytes  # noqa: E402
from dmarw.native import NativeContainer, NativeDirtyBitmap, NativeVm, mm_ref  # noqa: E402
from dmarw.native import replay as native_replay  # noqa: E402

P = 4096
RW = Prot.READ | Prot.WRITE

# -- bitmaps ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "first,last",
    [(0, 0), (0, 63), (63, 64), (1, 62), (5, 200), (64, 127), (0, 255), (130, 130), (70, 250)],
)
def test_bitmap_mark_ranges(first: int, last: int) -> None:
    words = bytearray(bitmap_bytes(256))
    _native.bitmap_mark(words, first, last)
    assert bitmap_pages(bytes(words)) == list(range(first, last + 1))


def test_bitmap_mark_bounds_and_alignment() -> None:
    words = bytearray(16)
    with pytest.raises(ValueError):
        _native.bitmap_mark(words, 0, 128)
    with pytest.raises(ValueError):
        _native.bitmap_mark(words, 5, 4)
    with pytest.raises(ValueError):
        _native.bitmap_mark(bytearray(12), 0, 1)
    with pytest.raises(BufferError):
        _native.bitmap_mark(b"\0" * 8, 0, 1)  # read-only


def test_bitmap_take_clears_and_keeps() -> None:
    words = bytearray(bitmap_bytes(200))
    _native.bitmap_mark(words, 3, 70)
    out = _native.bitmap_take(words, keep=[150, 4])
    assert bitmap_pages(out) == [*range(3, 71), 150]
    assert bitmap_pages(bytes(words)) == [4, 150]
    assert bitmap_pages(_native.bitmap_take(words)) == [4, 150]
    assert bytes(words) == bytes(len(words))
    with pytest.raises(ValueError):
        _native.bitmap_take(words, keep=[200 * 64])


def test_native_dirty_bitmap_interface_matches_python() -> None:
    py, nat = DirtyBitmap([1, 2]), NativeDirtyBitmap(100, [1, 2])
    for b in (py, nat):
        b.mark(10, 70)
        b.mark(99, 99)
    assert py.peek() == nat.peek()
    assert py.take([5]) == nat.take([5])
    assert py.peek() == nat.peek() == {5}
    assert nat.take_bytes() == to_bytes({5}, 100)
    assert nat.tracking is True


def test_bitmap_no_mark_is_lost_under_concurrent_take() -> None:
    """Writers mark disjoint pages while a harvester takes: every page is seen exactly once."""
    npages = 64 * 64
    words = bytearray(bitmap_bytes(npages))
    seen: list[bytes] = []
    stop = threading.Event()

    def writer(base: int) -> None:
        for p in range(base, npages, 4):
            _native.bitmap_mark(words, p, p)

    def harvester() -> None:
        while not stop.is_set():
            seen.append(_native.bitmap_take(words))

    h = threading.Thread(target=harvester)
    h.start()
    ws = [threading.Thread(target=writer, args=(b,)) for b in range(4)]
    for w in ws:
        w.start()
    for w in ws:
        w.join()
    stop.set()
    h.join()
    seen.append(_native.bitmap_take(words))
    total = [0] * npages
    for b in seen:
        for p in bitmap_pages(b):
            total[p] += 1
    assert total == [1] * npages


# -- counter, copies, selection -----------------------------------------------------------
def test_counter_is_monotonic_and_calibrated() -> None:
    a = _native.cycles()
    b = _native.cycles()
    assert b >= a
    assert _native.counter_kind() in ("rdtsc", "clock_monotonic")
    assert _native.tsc_hz() > 1e6


def test_hva_copies_and_gil_threshold() -> None:
    space = AddressSpace()
    hva = space.mmap(16 * P)
    old = _native.set_gil_threshold(P)
    try:
        for n in (1, P - 1, P, 8 * P):  # below and above the threshold
            data = bytes(range(256)) * (n // 256) + bytes(n % 256)
            _native.hva_write(hva, data)
            assert space.read(hva, n) == data
            out = bytearray(n)
            _native.hva_read(hva, out)
            assert bytes(out) == data
    finally:
        _native.set_gil_threshold(old)
        space.close()


def test_core_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DMARW_CORE", raising=False)
    assert core.resolve() == "native"
    assert core.classes() == (NativeContainer, NativeVm)
    monkeypatch.setenv("DMARW_CORE", "python")
    assert core.classes() == (Container, Vm)
    assert type(core.container(lock="rcu")) is Container
    monkeypatch.setenv("DMARW_CORE", "native")
    assert type(core.container(lock="rcu")) is NativeContainer
    monkeypatch.setenv("DMARW_CORE", "fortran")
    with pytest.raises(core.CoreUnavailable):
        core.resolve()
    assert core.cycles_source("native")[0] == _native.counter_kind()


def test_native_forced_without_the_extension_fails_loudly(tmp_path: Any) -> None:
    """A copy of the package without the .so: DMARW_CORE=native raises, python still works."""
    import shutil

    import dmarw

    pkg = tmp_path / "dmarw"
    shutil.copytree(os.path.dirname(dmarw.__file__), pkg, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    code = (
        "import dmarw.core as c\n"
        "assert c.resolve('python') == 'python' and c.resolve(None) == 'python'\n"
        "try:\n    c.resolve('native')\nexcept c.CoreUnavailable as e:\n    print('LOUD', e)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "DMARW_CORE": ""}
    out = subprocess.run([sys.executable, "-S", "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert "LOUD" in out.stdout, out.stderr


# -- native-only behaviour ----------------------------------------------------------------
@pytest.mark.parametrize("lock", ["mutex", "rwsem", "rcu"])
def test_host_munmap_under_a_mapping_is_efault_not_a_crash(lock: str) -> None:
    space = AddressSpace()
    hva = space.mmap(4 * P)
    c = NativeContainer(lock=lock)
    c.map_dma(0, 4 * P, hva, space)
    c.dma_write(0, b"x" * 10)
    space.munmap(hva, 4 * P)  # the table's buffer export keeps the pages mapped
    with pytest.raises(DmaError) as info:
        c.dma_read(0, 10)
    assert info.value.errno == errno.EFAULT
    vm = NativeVm(space)
    hva2 = space.mmap(4 * P)
    vm.set_memslot(0, 0, 4 * P, hva2)
    space.munmap(hva2, 4 * P)
    with pytest.raises(DmaError) as info:
        vm.read_guest(0, 8)
    assert info.value.errno == errno.EFAULT
    c.unmap_dma(0, 4 * P)
    vm.close()
    space.close()
    assert space.released


def test_mm_user_count_is_native_and_balanced() -> None:
    space = AddressSpace()
    hva = space.mmap(4 * P)
    for mode in ("get_task_mm", "mmget_not_zero"):
        c = NativeContainer(mm_ref=mode)
        c.map_dma(0, 4 * P, hva, space)
        c.dma_write(P - 2, b"abcd")  # two pages, one mapping
        assert mm_ref(space).users == 0
        c.unmap_dma(0, 4 * P)
    space.close()


@pytest.mark.parametrize("lock", ["mutex", "rwsem", "rcu"])
@pytest.mark.parametrize("size", [64, 3 * P + 5, 96 * 1024])
def test_readers_race_unmap_and_dirty_gets(lock: str, size: int) -> None:
    """Readers and writers against map/unmap and gets: no crash, no lost dirty bit, and
    after unmap_dma returns, memory written through the old mapping stays untouched."""
    old = _native.set_gil_threshold(32 * 1024)  # 96 KiB copies run without the GIL
    space = AddressSpace()
    npages = 64
    hva = space.mmap(npages * P)
    c = NativeContainer(lock=lock)
    c.dirty_pages_start()
    stop = threading.Event()
    errors: list[BaseException] = []
    written: set[int] = set()
    lock_w = threading.Lock()
    iters = [0, 0]

    def device(k: int) -> None:
        buf = bytearray(size)
        i = 0
        while not stop.is_set():
            iters[k] += 1
            iova = ((i * 7 + k) % (npages - (size + P - 1) // P)) * P
            try:
                c.dma_rw(iova, buf, True)
                with lock_w:
                    written.update(range(iova // P, (iova + size - 1) // P + 1))
            except DmaError as e:
                if e.errno != errno.EINVAL:
                    errors.append(e)
            i += 1

    threads = [threading.Thread(target=device, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    harvested: set[int] = set()
    try:
        for _ in range(30):
            c.map_dma(0, npages * P, hva, space)
            harvested.update(bitmap_pages(c.get_dirty_bitmap(0, npages * P)))
            _, bm = c.unmap_dma(0, npages * P, get_dirty_bitmap=True)  # type: ignore[misc]
            harvested.update(bitmap_pages(bm))
        # unmapped now: whatever the devices still try must not reach the memory
        space.write(hva, bytes(npages * P))
        seen = list(iters)
        while min(a - b for a, b in zip(iters, seen, strict=True)) < 20:
            os.sched_yield()
        stop.set()
    finally:
        stop.set()
        for t in threads:
            t.join()
        _native.set_gil_threshold(old)
    assert not errors
    assert written <= harvested  # every completed write's pages were reported
    assert space.read(hva, npages * P) == bytes(npages * P)  # nothing wrote after unmap
    space.close()


def test_large_read_releases_the_gil_and_stays_correct() -> None:
    old = _native.set_gil_threshold(0)
    try:
        space = AddressSpace()
        hva = space.mmap(256 * P)
        data = os.urandom(256 * P)
        space.write(hva, data)
        c = NativeContainer(lock="rcu")
        c.map_dma(0, 128 * P, hva, space)
        c.map_dma(128 * P, 128 * P, hva + 128 * P, space)  # a copy across two mappings
        assert c.dma_read(5, 200 * P) == data[5 : 5 + 200 * P]
        vm = NativeVm(space)
        vm.set_memslot(1, 0, 256 * P, hva)
        assert vm.read_guest(7, 100 * P) == data[7 : 7 + 100 * P]
        vm.close()
        c.unmap_dma(0, 256 * P)
        space.close()
    finally:
        _native.set_gil_threshold(old)


# -- the native core's own entry points ---------------------------------------------------
def test_replay_runs_the_records_through_the_path() -> None:
    from array import array

    space = AddressSpace()
    hva = space.mmap(16 * P)
    c = NativeContainer(lock="rcu")
    c.map_dma(0, 16 * P, hva, space)
    c.dirty_pages_start()
    vm = NativeVm(space)
    vm.set_memslot(0, 0, 16 * P, hva, dirty_log=True)
    buf = bytearray(b"z" * P)
    writes, addrs, sizes = array("B", [1, 0, 1]), array("Q", [5 * P - 8, 0, 9 * P]), array("I", [16, P, 1])
    rc, rn, wc, wn = c.replay(writes, addrs, sizes, buf)
    assert (rn, wn) == (1, 2) and rc > 0 and wc > 0
    assert bitmap_pages(c.get_dirty_bitmap(0, 16 * P)) == [4, 5, 9]
    assert space.read(hva + 5 * P - 8, 16) == b"z" * 16
    got = native_replay(vm, writes, addrs, sizes)
    assert (got["reads"], got["writes"]) == (1, 2) and got["avg"] > 0
    assert bitmap_pages(vm.get_dirty_log(0)) == [4, 5, 9]
    with pytest.raises(DmaError) as info:  # the first failing record raises, as the call would
        c.replay(array("B", [0]), array("Q", [16 * P]), array("I", [8]), buf)
    assert info.value.errno == errno.EINVAL
    with pytest.raises(ValueError):
        c.replay(array("B", [0]), array("Q", [0, 1]), array("I", [8]), buf)
    for addr, size, err in (((1 << 64) - 4, 8, errno.EOVERFLOW), (0, 0, errno.EINVAL)):
        with pytest.raises(DmaError) as info:  # the argument rules of dma_rw apply too
            c.replay(array("B", [1]), array("Q", [addr]), array("I", [size]), buf)
        assert info.value.errno == err
        with pytest.raises(DmaError) as info:
            c.dma_rw(addr, bytearray(size), True)
        assert info.value.errno == err
    assert not hasattr(vm, "dma_rw")  # a KVM core has no type1 path
    with pytest.raises(TypeError):
        native_replay(Container(core="python"), writes, addrs, sizes)  # the Python core has no replay
    assert _native.timer_overhead(1000) >= 0
    vm.close()
    c.unmap_dma(0, 16 * P)
    space.close()


@pytest.mark.parametrize("lock", ["mutex", "rwsem", "rcu", "srcu"])
def test_core_lock_protocol(lock: str) -> None:
    """read_acquire/read_release nest for rcu; a grace period waits for a reader in another
    thread and returns once it leaves; the counts land in the lock classes."""
    from dmarw import lockstat

    core_: Any
    if lock == "srcu":
        core_ = NativeVm(AddressSpace())
        cls = lockstat.lock_class("kvm.srcu")
    else:
        core_ = NativeContainer(lock=lock)
        cls = lockstat.lock_class("iommu.rcu" if lock == "rcu" else "iommu.lock")
    before = cls.count
    tok = core_.read_acquire()
    if lock in ("rcu", "srcu"):
        inner = core_.read_acquire() if lock == "rcu" else None
        done = threading.Event()

        def writer() -> None:
            core_.synchronize()
            done.set()

        t = threading.Thread(target=writer)
        t.start()
        if inner is not None:
            core_.read_release(inner)
        assert not done.wait(0.05)  # still inside the outer section: the writer waits
        core_.read_release(tok)
        t.join()
        assert done.is_set()
    else:
        core_.read_release(tok)
        core_.write_acquire()
        core_.write_release()
    assert cls.count > before
    with lockstat.collect() as stats:
        core_.read_release(core_.read_acquire())
    assert stats.counts().get(cls.name) == 1


def test_rcu_reader_in_a_forked_child_is_not_waited_for() -> None:
    """A fork resets other threads' reader slots in the child: its grace periods finish."""
    c = NativeContainer(lock="rcu")
    space = AddressSpace()
    hva = space.mmap(4 * P)
    inside = threading.Event()
    leave = threading.Event()

    def reader() -> None:
        tok = c.read_acquire()
        inside.set()
        leave.wait()
        c.read_release(tok)

    t = threading.Thread(target=reader)
    t.start()
    inside.wait()
    pid = os.fork()
    if pid == 0:  # child: map (a grace period) and exit
        try:
            c.map_dma(0, 4 * P, hva, space)
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    leave.set()
    t.join()
    assert os.WEXITSTATUS(status) == 0
    space.close()


def test_external_user_calls_the_native_entry_until_closed() -> None:
    from dmarw import ExternalUser, Group

    space = AddressSpace()
    hva = space.mmap(4 * P)
    c = NativeContainer(lock="rcu")
    c.map_dma(0, 4 * P, hva, space)
    g = Group(f"native-eu-{id(c)}")
    dev = g.add_device("0000:00:02.0")
    g.set_container(c)
    user = ExternalUser.from_device(dev)
    assert type(user).dma_rw is _native.Handle.dma_rw  # the C method: no Python frame
    user.dma_rw(P, b"abc", True)
    assert c.dma_read(P, 3) == b"abc"
    user.close()
    with pytest.raises(DmaError) as info:
        user.dma_rw(P, bytearray(3), False)
    assert info.value.errno == errno.EINVAL
    g.unset_container()
    g.remove()
    c.unmap_dma(0, 4 * P)
    space.close()


def test_bitmap_in_shared_memory_is_harvested_by_another_process() -> None:
    """Words in a MAP_SHARED mapping: a child process marks, the parent gets and clears."""
    import mmap

    npages = 300
    m = mmap.mmap(-1, bitmap_bytes(npages), flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    words = memoryview(m)
    parent = NativeDirtyBitmap(npages, words=words)
    pid = os.fork()
    if pid == 0:
        try:
            child = NativeDirtyBitmap(npages, words=words)
            child.mark(3, 70)
            child.mark(299, 299)
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    assert parent.take() == {*range(3, 71), 299}
    assert parent.peek() == set()
    with pytest.raises(ValueError):
        NativeDirtyBitmap(npages + 64, words=words)
    del parent, words
    m.close()


@pytest.mark.parametrize("mm", ["get_task_mm", "mmget_not_zero"])
def test_cached_flags_follow_the_python_objects(mm: str) -> None:
    """The native core caches the owner's exit flag and the region's released flag until
    their object changes: a call after the change sees it."""
    space = AddressSpace()
    hva = space.mmap(8 * P)
    hva2 = space.mmap(4 * P)
    c = NativeContainer(mm_ref=mm)
    c.map_dma(0, 8 * P, hva, space)
    c.map_dma(8 * P, 4 * P, hva2, space)
    for _ in range(3):
        c.dma_write(8 * P, b"ok")  # flags read and cached
        c.dma_read(0, 4)
    space.munmap(hva2, 4 * P)
    with pytest.raises(DmaError) as info:
        c.dma_read(8 * P, 2)
    assert info.value.errno == errno.EFAULT
    c.dma_read(0, 4)  # the other mapping is still fine
    space.close()
    with pytest.raises(DmaError) as info:
        c.dma_read(0, 4)
    assert info.value.errno == errno.EPERM


def test_native_entries_take_keywords_like_the_python_methods() -> None:
    import functools

    space = AddressSpace()
    hva = space.mmap(4 * P)
    c = NativeContainer()
    c.map_dma(0, 4 * P, hva, space)
    write = functools.partial(c.dma_rw, write=True)  # as the lab binds its paths
    write(P, b"kw")
    buf = bytearray(2)
    c.dma_rw(iova=P, buf=buf, write=False)
    assert buf == b"kw"
    vm = NativeVm(space)
    vm.set_memslot(0, 0, 4 * P, hva)
    vm.write_guest(gpa=2 * P, data=b"vm")
    assert vm.read_guest(gpa=2 * P, n=2) == b"vm"
    vm.read_guest_into(2 * P, buf=buf)
    assert buf == b"vm"
    with pytest.raises(TypeError):
        c.dma_rw(P, buf, False, write=True)
    with pytest.raises(TypeError):
        c.dma_rw(P, buf)
    with pytest.raises(TypeError):
        vm.read_guest(0, size=3)
    vm.close()
    c.unmap_dma(0, 4 * P)
    space.close()


# -- the native VFIO group layer ----------------------------------------------------------
needs_native_groups = pytest.mark.skipif(
    core.resolve() != "native", reason="groups are Python (DMARW_CORE=python)"
)


def _native_group_env(lock: str = "mutex", mm: str = "get_task_mm") -> tuple[Any, ...]:
    from dmarw import Group

    space = AddressSpace()
    hva = space.mmap(16 * P)
    c = NativeContainer(lock=lock, mm_ref=mm)
    c.map_dma(0, 16 * P, hva, space)
    c.dirty_pages_start()
    g = Group(f"native-group-{id(c)}-{threading.get_ident()}")
    dev = g.add_device("0000:00:02.0")
    g.set_container(c)
    return space, hva, c, g, dev


def _native_group_close(space: Any, c: Any, g: Any) -> None:
    g.unset_container()
    g.remove()
    c.unmap_dma(0, 16 * P)
    space.close()


@needs_native_groups
def test_per_call_path_is_one_native_call_without_a_python_frame() -> None:
    """On a native group and container, vfio_dma_rw runs no Python function at all; the
    group's locks and counters are the native ones, shared with the Python methods."""
    from dmarw import vfio, vfio_dma_rw

    space, hva, c, g, dev = _native_group_env()
    assert vfio_dma_rw is _native.vfio_dma_rw
    assert isinstance(g.mutex, _native.Lock) and isinstance(vfio._registry.lock, _native.Lock)
    assert g._state.unbound_lock is g.unbound_lock and g._state.refs is g.refs
    events: list[tuple[str, str]] = []
    sys.setprofile(lambda frame, ev, arg: events.append((ev, frame.f_code.co_name)))
    try:
        vfio_dma_rw(dev, P, b"native", True)
    finally:
        sys.setprofile(None)
    assert [e for e in events if e[0] == "call"] == []  # only C calls
    assert space.read(hva + P, 6) == b"native"
    dev.unbind()
    assert (g._state.unbound, g._state.devices_unbound) == (1, 1)
    dev.bind()
    assert (g._state.unbound, g._state.devices_unbound) == (0, 0)
    assert g._state.container is c
    _native_group_close(space, c, g)
    assert g._state.container is None


@needs_native_groups
def test_vfio_replay_runs_the_per_call_path_per_record() -> None:
    from array import array

    from dmarw import lockstat

    space, hva, c, g, dev = _native_group_env()
    buf = bytearray(b"q" * P)
    writes, addrs, sizes = array("B", [1, 0, 1, 0]), array("Q", [2 * P, 0, 7 * P - 4, P]), array("I", [8, P, 8, 64])
    deltas = array("Q", bytes(8 * 4))
    with lockstat.collect() as stats:
        rc, rn, wc, wn = _native.vfio_replay(dev, writes, addrs, sizes, buf, deltas)
    assert (rn, wn) == (2, 2) and rc + wc == sum(deltas) and min(deltas) > 0
    want = dict.fromkeys(("vfio.group_lock", "group.unbound_lock", "group.device_lock", "group.mutex"), 4)
    want.update({"iommu.lock": 4, "task_lock": 4})
    assert stats.counts() == want
    assert bitmap_pages(c.get_dirty_bitmap(0, 16 * P)) == [2, 6, 7]  # the last one crosses
    assert space.read(hva + 2 * P, 8) == b"q" * 8  # written before the first read refilled buf
    assert g.refs.value == 1 and g.container_users.value == 0
    dev.unbind()
    with pytest.raises(DmaError) as info:  # not viable: EINVAL, references dropped
        _native.vfio_replay(dev, writes, addrs, sizes, buf)
    assert info.value.errno == errno.EINVAL and g.refs.value == 1
    dev.bind()
    rc, rn, wc, wn = c.replay(writes, addrs, sizes, buf, deltas)
    assert rc + wc == sum(deltas)
    _native_group_close(space, c, g)
    with pytest.raises(DmaError) as info:  # detached
        _native.vfio_replay(dev, writes, addrs, sizes, buf)
    assert info.value.errno == errno.ENODEV


def test_process_shared_lock_excludes_across_processes() -> None:
    """Two processes increment a shared counter with a non-atomic read-modify-write under a
    process-shared native Lock made before fork: no increment is lost."""
    import mmap

    from dmarw import lockstat

    lock = _native.Lock(lockstat.lock_class("test.shared_lock"), shared=True)
    assert lock.shared and lock.name == "test.shared_lock"
    mem = mmap.mmap(-1, 8)
    each = 3000

    def work() -> None:
        for _ in range(each):
            with lock:
                v = int.from_bytes(mem[0:8], "little")
                mem[0:8] = (v + 1).to_bytes(8, "little")

    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            work()
        finally:
            os._exit(0)
    before = lockstat.lock_class("test.shared_lock").count
    work()
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert int.from_bytes(mem[0:8], "little") == 2 * each
    assert lockstat.lock_class("test.shared_lock").count - before == each  # this process's own


@needs_native_groups
def test_set_group_lock_takes_a_process_shared_native_lock() -> None:
    from dmarw import lockstat, new_group_lock, set_group_lock, vfio, vfio_dma_rw

    space, hva, c, g, dev = _native_group_env()
    saved = vfio._registry.lock
    shared = new_group_lock()
    assert isinstance(shared, _native.Lock) and shared.shared
    set_group_lock(shared)
    try:
        events: list[str] = []
        sys.setprofile(lambda frame, ev, arg: events.append(ev))
        try:
            vfio_dma_rw(dev, 0, b"shared", True)
        finally:
            sys.setprofile(None)
        assert "call" not in events  # still the native path
        with lockstat.collect() as stats:  # (timing reports through LockClass.timed, Python)
            vfio_dma_rw(dev, 0, b"shared", True)
        assert stats.counts()["vfio.group_lock"] == 1
        assert space.read(hva, 6) == b"shared"
    finally:
        set_group_lock(saved)
    _native_group_close(space, c, g)
