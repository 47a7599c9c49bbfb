"""Lock statistics: exact counts, block windows that nest and overlap across threads, schema.

Each test uses its own lock class names, so suites running beside it cannot disturb the
rows it asserts on.
"""

from __future__ import annotations

import itertools
import threading
from typing import Any

import pytest

from dmarw import lockstat
from dmarw.locks import Mutex, Rcu, RwSem

ROW_KEYS = {"name", "count", "total_ns", "avg_ns", "total_cycles", "avg_cycles"}
_ids = itertools.count()


def fresh(kind: str = "mutex") -> str:
    """A lock class name no other test uses."""
    return f"test.{kind}.{next(_ids)}.{threading.get_ident()}"


def take(lock: Mutex, n: int) -> None:
    for _ in range(n):
        with lock:
            pass


def row(stats: lockstat.Stats, name: str) -> dict[str, float | int | str]:
    rows = [r for r in stats.table() if r["name"] == name]
    assert len(rows) == 1, stats.table()
    return rows[0]


def test_table_schema_and_exact_count() -> None:
    m = Mutex(fresh())
    with lockstat.collect() as stats:
        take(m, 5)
    r = row(stats, m.name)
    assert set(r) == ROW_KEYS
    assert r["count"] == 5
    assert isinstance(r["count"], int) and isinstance(r["total_ns"], int)
    assert isinstance(r["avg_ns"], float) and isinstance(r["avg_cycles"], float)
    assert r["total_ns"] >= 0
    assert r["avg_ns"] == pytest.approx(r["total_ns"] / 5)
    assert r["total_cycles"] == pytest.approx(lockstat.ns_to_cycles(r["total_ns"]))
    assert r["avg_cycles"] == pytest.approx(lockstat.ns_to_cycles(r["total_ns"]) / 5)
    assert stats.counts()[m.name] == 5


def test_only_acquisitions_inside_the_block() -> None:
    m = Mutex(fresh())
    take(m, 3)  # before: not counted
    with lockstat.collect() as stats:
        take(m, 4)
        assert stats.counts()[m.name] == 4  # a table read inside the block sees so far
    take(m, 6)  # after: not counted, the block's table is frozen at exit
    assert row(stats, m.name)["count"] == 4
    assert stats.counts()[m.name] == 4


def test_empty_block_has_no_rows_for_untouched_classes() -> None:
    m = Mutex(fresh())
    take(m, 1)
    with lockstat.collect() as stats:
        pass
    assert m.name not in stats.counts()
    assert all(r["name"] != m.name for r in stats.table())


def test_blocks_nest() -> None:
    m = Mutex(fresh())
    with lockstat.collect() as outer:
        take(m, 2)
        with lockstat.collect() as inner:
            take(m, 3)
        assert lockstat.collecting()  # the outer block is still open
        take(m, 4)
    assert not lockstat.collecting()
    assert inner.counts()[m.name] == 3
    assert outer.counts()[m.name] == 9


def test_block_ends_on_exception() -> None:
    m = Mutex(fresh())
    with pytest.raises(RuntimeError):
        with lockstat.collect() as stats:
            take(m, 2)
            raise RuntimeError("inside")
    assert not lockstat.collecting()
    assert stats.counts() == {m.name: 2}


def test_counting_is_always_on_timing_only_while_collecting() -> None:
    m = Mutex(fresh())
    cls = lockstat.lock_class(m.name)
    take(m, 3)
    count, timed, total = cls.snapshot()
    assert (count, timed, total) == (3, 0, 0)
    with lockstat.collect():
        take(m, 2)
    count, timed, _ = cls.snapshot()
    assert (count, timed) == (5, 2)


def test_same_name_is_one_class() -> None:
    name = fresh()
    a, b = Mutex(name), Mutex(name)
    with lockstat.collect() as stats:
        take(a, 2)
        take(b, 3)
    assert stats.counts() == {name: 5}


def test_rwsem_and_rcu_count_every_acquisition() -> None:
    s = RwSem(fresh("rwsem"))
    r = Rcu(fresh("rcu"))
    with lockstat.collect() as stats:
        for _ in range(4):
            s.down_read()
            s.up_read()
        s.down_write()
        s.up_write()
        for _ in range(3):
            r.read_unlock(r.read_lock())
    assert stats.counts() == {s.name: 5, r.name: 3}


def test_worker_threads_inside_one_block_count_exactly() -> None:
    m = Mutex(fresh())
    threads, each = 6, 200
    go = threading.Barrier(threads)

    def work() -> None:
        go.wait()
        take(m, each)

    with lockstat.collect() as stats:
        ts = [threading.Thread(target=work) for _ in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    r = row(stats, m.name)
    assert r["count"] == threads * each
    assert r["avg_ns"] == pytest.approx(r["total_ns"] / (threads * each))


def test_overlapping_blocks_in_several_threads_each_see_their_window() -> None:
    """Each thread opens its own block; all blocks are open at once (a barrier inside)."""
    threads, each = 4, 150
    locks = [Mutex(fresh()) for _ in range(threads)]
    inside = threading.Barrier(threads)
    done = threading.Barrier(threads)
    seen: dict[int, dict[str, int]] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            with lockstat.collect() as stats:
                inside.wait()  # every block is open now
                take(locks[i], each)
                done.wait()  # every thread has finished its acquisitions
            seen[i] = stats.counts()
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors
    for i in range(threads):
        # all windows overlap completely: each block saw every thread's acquisitions, exactly
        assert {k: seen[i].get(k) for k in (lk.name for lk in locks)} == {
            lk.name: each for lk in locks
        }
    assert not lockstat.collecting()


def test_disjoint_blocks_in_threads_do_not_see_each_other() -> None:
    a, b = Mutex(fresh()), Mutex(fresh())
    first_done = threading.Event()
    seen: dict[str, dict[str, int]] = {}

    def first() -> None:
        with lockstat.collect() as stats:
            take(a, 7)
        seen["first"] = stats.counts()
        first_done.set()

    def second() -> None:
        first_done.wait()
        take(a, 5)  # outside any block of this thread, after the first block closed
        with lockstat.collect() as stats:
            take(b, 9)
        seen["second"] = stats.counts()

    ts = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert seen["first"] == {a.name: 7}
    assert seen["second"] == {b.name: 9}


def test_rows_follow_the_seed_order_then_by_name() -> None:
    names = ["iommu.lock", "vfio.group_lock", "group.mutex", "task_lock"]
    extra = fresh()
    locks = [Mutex(n) for n in names] + [Mutex(extra)]
    with lockstat.collect() as stats:
        for lk in reversed(locks):
            take(lk, 1)
    got = [r["name"] for r in stats.table()]
    assert got == ["vfio.group_lock", "group.mutex", "iommu.lock", "task_lock", extra]


def test_cycles_and_timer_overhead_are_reported() -> None:
    assert lockstat.cpu_hz() > 0
    assert lockstat.ns_to_cycles(1000) == pytest.approx(lockstat.cpu_hz() / 1e6)
    src = lockstat.cycles_source()
    assert "MHz" in src and "(" in src
    assert lockstat.timer_overhead_ns(101) >= 0


def test_bench_lockstat_overhead_runs_and_writes_json(tmp_path: Any, load_bench: Any) -> None:
    """A tiny run of bench/lockstat_overhead.py (its numbers are not asserted, only its shape)."""
    import json


    mod = load_bench("lockstat_overhead")
    out = tmp_path / "overhead.json"
    assert mod.main(["--rounds", "3", "--calls", "50", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["median_ns"]) == set(mod.ROWS)
    assert all(len(v) == 3 for v in data["samples_ns"].values())


def test_timing_is_swapped_in_only_while_a_block_is_open() -> None:
    """Off, the locks only count; timed only while collecting (``lockstat.TIMING``), until
    the last of nested blocks closes; counts are kept either way."""
    from dmarw.locks import Mutex

    def timed() -> list[bool]:
        return [lockstat.TIMING.on] * 5

    m = Mutex("test.swap")
    assert timed() == [False] * 5
    before = lockstat.lock_class("test.swap").count
    timed_before = lockstat.lock_class("test.swap").snapshot()[1]
    with m:
        pass
    with lockstat.collect() as outer:
        assert timed() == [True] * 5
        with lockstat.collect():
            assert timed() == [True] * 5
        assert timed() == [True] * 5
        with m:
            pass
    assert timed() == [False] * 5
    assert lockstat.lock_class("test.swap").count == before + 2
    assert lockstat.lock_class("test.swap").snapshot()[1] == timed_before + 1  # only the inner one
    (row,) = [r for r in outer.table() if r["name"] == "test.swap"]
    assert row["count"] == 1
