"""Run a path in one or more VM processes and time every access.

Each VM is a forked OS process with its own :class:`~dmarw.lab.paths.VmEnv` (guest RAM, Vm,
container, group).  The host-global ``vfio.group_lock`` is one ``multiprocessing.Lock``
made here and installed in every VM process with :func:`dmarw.set_group_lock`, so VMs
contend on it as on the kernel's.  VMs start each pass together (a barrier).

Per VM, in order: set up, prefault guest RAM, warm up (untimed), measure the timer's own
cost, the timed pass (reads and writes apart; the timer cost is subtracted per op when
results are combined), the uncontended-mutex probe, a lock-statistics pass
(:func:`dmarw.lockstat.collect`), and the dirty log harvest.  Nothing here waits on a
clock: the parent blocks on the result pipes.

How each op is timed depends on the core:

* Python core: ``perf_counter_ns`` read in Python around each call; the timer's cost is
  :func:`dmarw.lockstat.timer_overhead_ns`.
* native core: the path's C replay (:meth:`VmEnv.replayer`) runs the records and reads the
  native counter (rdtsc with an invariant TSC) around each call in C, as the 2020 thread timed
  ``vfio_dma_rw`` with ``get_cycles()``; the timer's cost is ``_native.timer_overhead``
  (median counter pair, measured in C).  Ticks become ns at the counter's rate.  The lock
  statistics come from the native locks, timed with the same counter.
"""

from __future__ import annotations

import bisect
import gc
import multiprocessing as mp
import os
import random
import signal
import statistics
import time
import traceback
from array import array
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from .. import lockstat
from ..locks import Mutex
from ..mm import PAGE_SIZE
from ..vfio import new_group_lock, set_group_lock
from .paths import PATHS, Accessor, Replayer, VmEnv, resolve_core
from .workload import Workload

MAX_ACCESS = 20 * PAGE_SIZE  # largest access any run makes (the size sweep's top)
PROGRESS_EVERY = 1024
BARRIER_TIMEOUT = 300.0  # a VM that died leaves the others a way out

_ctx = mp.get_context("fork")
Progress = Callable[[int, int], None]  # (done, total)


OUTLIER_FACTOR = 20  # an op slower than this many times its class's median was descheduled
OUTLIER_FLOOR_NS = 20_000  # ... and never below this, so a cheap class keeps its slow tail
LOCK_BLOCKS = 16  # the lock-statistics pass runs in this many collect() blocks


@dataclass
class ClassStats:
    """One op class (reads or writes) of a timed pass: raw ns, timer not yet subtracted.

    An op longer than ``max(OUTLIER_FACTOR * median, OUTLIER_FLOOR_NS)`` spanned a
    deschedule of the VM process (the host is shared); it is counted in ``dropped`` and
    left out of ``kept_ns``, the figure the tables use.
    """

    count: int = 0
    total_ns: float = 0
    kept: int = 0
    kept_ns: float = 0
    dropped: int = 0
    dropped_ns: float = 0
    p50_ns: float = 0.0
    p90_ns: float = 0.0
    p99_ns: float = 0.0

    @staticmethod
    def of(deltas: Sequence[float]) -> ClassStats:
        """From per-op durations in ns (ints from perf_counter_ns, floats from the native
        counter's ticks)."""
        if not deltas:
            return ClassStats()
        srt = sorted(deltas)
        n = len(srt)
        med = srt[n // 2]
        limit = max(OUTLIER_FACTOR * med, OUTLIER_FLOOR_NS)
        cut = bisect.bisect_right(srt, limit)
        kept_ns = sum(srt[:cut])
        total = kept_ns + sum(srt[cut:])
        return ClassStats(n, total, cut, kept_ns, n - cut, total - kept_ns, float(med),
                          float(srt[min(n - 1, n * 9 // 10)]), float(srt[min(n - 1, n * 99 // 100)]))


@dataclass
class PassResult:
    """One VM's timed pass: reads and writes apart."""

    reads: ClassStats
    writes: ClassStats


@dataclass
class VmResult:
    vm: int
    pid: int
    seed: int
    timed: PassResult
    timer_overhead_ns: float
    mutex_probe: dict[str, float]
    locks: list[dict[str, Any]]
    lock_ops: int
    dirty_pages: int
    wall_ns: int


@dataclass
class RunResult:
    """One configuration: ``path`` on ``vms`` VMs; per-op costs are per VM-op averages."""

    path: str
    vms: int
    ops_per_vm: int
    seeds: list[int]
    reads: int
    writes: int
    read_ns: float
    write_ns: float
    avg_ns: float
    timer_overhead_ns: float
    uncontended_mutex_ns: float
    uncontended_mutex_cycles: float
    locks: list[dict[str, Any]]
    dirty_pages: list[int]
    dropped: int = 0  # ops left out: they spanned a deschedule (see ClassStats)
    dropped_share: float = 0.0  # share of the measured time those ops took
    per_vm: list[dict[str, Any]] = field(default_factory=list)

    @property
    def read_cycles(self) -> float:
        return lockstat.ns_to_cycles(self.read_ns)

    @property
    def write_cycles(self) -> float:
        return lockstat.ns_to_cycles(self.write_ns)

    @property
    def avg_cycles(self) -> float:
        return lockstat.ns_to_cycles(self.avg_ns)

    def lock(self, name: str) -> dict[str, Any] | None:
        for row in self.locks:
            if row["name"] == name:
                return row
        return None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(read_cycles=self.read_cycles, write_cycles=self.write_cycles, avg_cycles=self.avg_cycles)
        return d


def _pattern() -> bytes:
    """:data:`MAX_ACCESS` bytes of the non-zero pattern the writes carry, on either core."""
    return bytes(range(256)) * (MAX_ACCESS // 256)


def _buffers() -> tuple[memoryview, memoryview]:
    """A read buffer and a write buffer (the pattern) of :data:`MAX_ACCESS` bytes."""
    return memoryview(bytearray(MAX_ACCESS)), memoryview(_pattern())


def _prepare(wl: Workload) -> list[tuple[bool, int, memoryview]]:
    """(is write, addr, buffer slice) per record; slices made once per size, outside timing."""
    rbuf, wbuf = _buffers()
    rs: dict[int, memoryview] = {}
    ws: dict[int, memoryview] = {}
    out = []
    r = wl.records
    for w, a, s in zip(r.writes, r.addrs, r.sizes, strict=True):
        if s > MAX_ACCESS:
            raise ValueError(f"record {a:#x}+{s:#x} is larger than the lab's {MAX_ACCESS:#x} buffer")
        if w:
            m = ws.get(s)
            if m is None:
                m = ws[s] = wbuf[:s]
        else:
            m = rs.get(s)
            if m is None:
                m = rs[s] = rbuf[:s]
        out.append((bool(w), a, m))
    return out


def _timed_pass(
    recs: Sequence[tuple[bool, int, memoryview]],
    acc: Accessor,
    tick: Callable[[int], None],
) -> PassResult:
    """Time each call with ``perf_counter_ns``; only the call sits between the two reads.
    kvm's two entry points and dma_rw's one are both called positionally, nothing else."""
    clock = time.perf_counter_ns
    rd: array[int] = array("q")
    wd: array[int] = array("q")
    radd, wadd = rd.append, wd.append
    every = PROGRESS_EVERY - 1
    rw = acc.rw
    if rw is not None:
        for i, (w, a, m) in enumerate(recs):
            if w:
                t0 = clock()
                rw(a, m, True)
                t1 = clock()
                wadd(t1 - t0)
            else:
                t0 = clock()
                rw(a, m, False)
                t1 = clock()
                radd(t1 - t0)
            if not i & every:
                tick(i)
    else:
        read, write = acc.pair()
        for i, (w, a, m) in enumerate(recs):
            if w:
                t0 = clock()
                write(a, m)
                t1 = clock()
                wadd(t1 - t0)
            else:
                t0 = clock()
                read(a, m)
                t1 = clock()
                radd(t1 - t0)
            if not i & every:
                tick(i)
    return PassResult(ClassStats.of(rd), ClassStats.of(wd))


def _untimed_pass(recs: Sequence[tuple[bool, int, memoryview]], acc: Accessor) -> None:
    rw = acc.rw
    if rw is not None:
        for w, a, m in recs:
            rw(a, m, bool(w))
        return
    read, write = acc.pair()
    for w, a, m in recs:
        if w:
            write(a, m)
        else:
            read(a, m)


NATIVE_CHUNK = 16 * PROGRESS_EVERY  # records per C replay call in a timed pass (progress between)


def _native_buffer() -> bytearray:
    """The native replay's one buffer (its reads and writes share it), filled with the pattern."""
    return bytearray(_pattern())


def _native_timed_pass(wl: Workload, replay: Replayer, tick: Callable[[int], None]) -> PassResult:
    """The timed pass on the native core: the path's C replay times each call with the
    native counter; per-op ticks become ns at the counter's rate (timer not subtracted)."""
    r = wl.records
    n = len(r)
    buf = _native_buffer()
    ticks: array[int] = array("Q", bytes(8 * n))
    for lo in range(0, n, NATIVE_CHUNK):
        hi = min(n, lo + NATIVE_CHUNK)
        part = memoryview(ticks)[lo:hi]
        replay(r.writes[lo:hi], r.addrs[lo:hi], r.sizes[lo:hi], buf, part)
        tick(hi)
    ns_per_tick = 1e9 / _native_hz()
    rd = [t * ns_per_tick for t, w in zip(ticks, r.writes, strict=True) if not w]
    wd = [t * ns_per_tick for t, w in zip(ticks, r.writes, strict=True) if w]
    return PassResult(ClassStats.of(rd), ClassStats.of(wd))


def _native_hz() -> float:
    from .. import native

    return float(native.tsc_hz())


def native_timer_overhead_ns(samples: int = 20001) -> float:
    """Median cost of one back-to-back native counter pair, measured in C, in ns."""
    from .. import _native

    return float(_native.timer_overhead(samples)) * 1e9 / _native_hz()


def blocked_locks(run_block: Callable[[int], None], blocks: int = LOCK_BLOCKS) -> list[dict[str, Any]]:
    """Lock statistics over ``blocks`` separate :func:`dmarw.lockstat.collect` blocks
    (``run_block(k)`` runs block k): counts and times summed, and ``median_ns``, the median
    of the per-block averages, which a deschedule inside one block cannot move."""
    acc: dict[str, dict[str, Any]] = {}
    for k in range(blocks):
        with lockstat.collect() as s:
            run_block(k)
        for row in s.table():
            a = acc.setdefault(str(row["name"]), {"count": 0, "total_ns": 0, "block_avgs": []})
            a["count"] += int(row["count"])
            a["total_ns"] += int(row["total_ns"])
            a["block_avgs"].append(float(row["avg_ns"]))
    return [
        {"name": name, "count": a["count"], "total_ns": a["total_ns"],
         "median_ns": float(statistics.median(a["block_avgs"]))}
        for name, a in acc.items()
    ]


def mutex_probe(samples: int = 16000, core: str = "python") -> dict[str, float]:
    """The 2020 thread's uncontended-mutex figure: a fresh lock of the core's kind (a dmarw Mutex,
    or a native Lock timed with the native counter), timed the way lockstat times every lock
    (one timestamp pair around the acquire, the timer included)."""
    m: Any
    if core == "native":
        from .. import _native

        m = _native.Lock(lockstat.lock_class("lab.uncontended_mutex"))
    else:
        m = Mutex("lab.uncontended_mutex")
    per = max(samples // LOCK_BLOCKS, 1)

    def block(_k: int) -> None:
        for _ in range(per):
            m.acquire()
            m.release()

    for row in blocked_locks(block):
        if row["name"] == "lab.uncontended_mutex":
            ns = row["median_ns"]
            return {"avg_ns": ns, "avg_cycles": lockstat.ns_to_cycles(ns)}
    raise RuntimeError("the mutex probe recorded nothing")


def _vm_main(
    path: str,
    vm: int,
    wl: Workload,
    lock_ops: int,
    warmup: int,
    group_lock: Any,
    barrier: Any,
    progress: Any,
    conn: Connection,
    core: str | None = None,
) -> None:
    """One VM process: build, warm up, time, lock-stat pass, harvest, report on ``conn``."""
    _child_signals()
    try:
        set_group_lock(group_lock)  # the one host-wide lock, made before the fork
        t_start = time.perf_counter_ns()
        env = VmEnv(path, wl.ram_size, name=f"lab-vm{vm}", core=core)
        env.prefault()
        native = env.core == "native"
        total = len(wl.records)

        def tick(i: int) -> None:
            progress[vm] = i

        if native:  # every op and lock timed in C with the native counter
            replay = env.replayer()
            nbuf = _native_buffer()
            r = wl.records
            replay(r.writes[:warmup], r.addrs[:warmup], r.sizes[:warmup], nbuf)
            overhead = native_timer_overhead_ns()
        else:
            recs = _prepare(wl)
            acc = env.access()
            _untimed_pass(recs[:warmup], acc)
            overhead = lockstat.timer_overhead_ns()
        step = -(-min(lock_ops, total) // LOCK_BLOCKS) if lock_ops and total else 1

        def block(k: int) -> None:
            lo, hi = k * step, min((k + 1) * step, lock_ops, total)
            if lo >= hi:
                return
            if native:
                replay(r.writes[lo:hi], r.addrs[lo:hi], r.sizes[lo:hi], nbuf)
            else:
                _untimed_pass(recs[lo:hi], acc)

        gc.collect()
        gc.disable()
        try:
            barrier.wait(BARRIER_TIMEOUT)
            timed = _native_timed_pass(wl, replay, tick) if native else _timed_pass(recs, acc, tick)
            progress[vm] = total
            probe = mutex_probe(core=env.core)
            barrier.wait(BARRIER_TIMEOUT)
            all_locks = blocked_locks(block)
        finally:
            gc.enable()
        locks = [row for row in all_locks if not str(row["name"]).startswith("lab.")]
        dirty = env.dirty_pages()
        env.close()
        res = VmResult(
            vm, os.getpid(), wl.seed, timed, overhead, probe, locks, min(lock_ops, total), dirty,
            time.perf_counter_ns() - t_start,
        )
        conn.send(("ok", asdict(res)))
    except BaseException as e:  # report anything to the parent rather than die silently
        barrier.abort()  # release the other VMs at once
        conn.send(("error", f"VM {vm} ({path}): {_why(e)}"))
    finally:
        conn.close()


def _child_signals() -> None:
    """In a VM process: Ctrl-C is the parent's (it ends the VMs), and SIGTERM (how the
    parent ends one) kills at once, whatever handler the parent had installed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _why(e: BaseException) -> str:
    """A VM's failure for the parent: one line for an OSError (a refusal), else the traceback."""
    if isinstance(e, OSError):
        return str(e)
    return traceback.format_exc()


def _wait(
    procs: list[Any], conns: list[Connection], progress: Any, total: int, on_progress: Progress | None
) -> list[Any]:
    """Collect one message per VM, reporting progress; fail if a VM dies without one."""
    done = False
    try:
        got = _collect(procs, conns, progress, total, on_progress)
        done = True
    finally:  # on Ctrl-C or any error here the VMs are ended: no VM process outlives the run
        for p in procs:
            if not done and p.is_alive():
                p.terminate()
            p.join()
        for c in conns:
            c.close()
    errors = [msg for kind, msg in got if kind == "error"]
    if errors:
        raise RuntimeError("\n".join(errors))
    return [msg for _, msg in got]


def _collect(
    procs: list[Any], conns: list[Connection], progress: Any, total: int, on_progress: Progress | None
) -> list[Any]:
    got: list[Any] = [None] * len(conns)
    pending = set(range(len(conns)))
    while pending:
        for i in list(pending):
            if conns[i].poll(0.05):  # an I/O wait on the pipe, not a sleep
                try:
                    got[i] = conns[i].recv()
                except EOFError:
                    got[i] = ("error", f"VM {i} exited (code {procs[i].exitcode}) without a result")
                pending.discard(i)
            elif not procs[i].is_alive() and not conns[i].poll(0):
                got[i] = ("error", f"VM {i} exited (code {procs[i].exitcode}) without a result")
                pending.discard(i)
        if on_progress is not None:
            on_progress(sum(progress[:]), total)
    return got


def run(
    path: str,
    workloads: Sequence[Workload],
    *,
    lock_ops: int | None = None,
    warmup: int | None = None,
    on_progress: Progress | None = None,
    core: str | None = None,
) -> RunResult:
    """Run ``path`` with one VM process per workload, all at once; combine their results."""
    raw = run_raw(path, workloads, lock_ops=lock_ops, warmup=warmup, on_progress=on_progress, core=core)
    return combine(path, raw)


def run_raw(
    path: str,
    workloads: Sequence[Workload],
    *,
    lock_ops: int | None = None,
    warmup: int | None = None,
    on_progress: Progress | None = None,
    core: str | None = None,
) -> list[dict[str, Any]]:
    """:func:`run` without combining: one result dict per VM process (for :func:`combine`)."""
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r} (have {', '.join(PATHS)})")
    vms = len(workloads)
    if vms < 1:
        raise ValueError("need at least one VM")
    ops = max(w.ops for w in workloads)
    lock_ops = ops // 4 if lock_ops is None else lock_ops
    warmup = min(ops, 2000) if warmup is None else warmup
    group_lock = _group_lock(core)
    barrier = _ctx.Barrier(vms)
    progress = _ctx.Array("q", vms, lock=False)
    procs, conns = [], []
    for i, wl in enumerate(workloads):
        parent_end, child_end = _ctx.Pipe(duplex=False)
        p = _ctx.Process(
            target=_vm_main,
            args=(path, i, wl, lock_ops, warmup, group_lock, barrier, progress, child_end, core),
            name=f"dmarw-lab-vm{i}",
            daemon=True,  # never outlive an interrupted parent
        )
        p.start()
        child_end.close()
        procs.append(p)
        conns.append(parent_end)
    return _wait(procs, conns, progress, sum(w.ops for w in workloads), on_progress)


def _group_lock(core: str | None) -> Any:
    """The host-global ``vfio.group_lock`` for this run's VM processes, made before fork
    (:func:`dmarw.vfio.new_group_lock`: a native process-shared pthread mutex on the native
    core, else a ``multiprocessing.Lock`` behind dmarw's Python ``Mutex``); an unavailable
    core fails here, in the parent."""
    return new_group_lock(resolve_core(core))


def combine(path: str, results: list[dict[str, Any]], vms: int | None = None) -> RunResult:
    """Per-op averages over all VM processes (of every round, when a run was split into
    rounds; ``vms`` is then the VM count of each round): the mean of the ops not
    descheduled (see :class:`ClassStats`), each process's own timer overhead subtracted per
    op; counts are all ops.  A lock's ``avg_ns`` is the mean of each process's median block
    average."""
    vms = len(results) if vms is None else vms

    def cls(r: dict[str, Any], op: str) -> dict[str, Any]:
        c: dict[str, Any] = r["timed"][op]
        return c

    reads = sum(cls(r, "reads")["count"] for r in results)
    writes = sum(cls(r, "writes")["count"] for r in results)
    kept_r = sum(cls(r, "reads")["kept"] for r in results)
    kept_w = sum(cls(r, "writes")["kept"] for r in results)
    read_ns = sum(cls(r, "reads")["kept_ns"] - r["timer_overhead_ns"] * cls(r, "reads")["kept"] for r in results)
    write_ns = sum(cls(r, "writes")["kept_ns"] - r["timer_overhead_ns"] * cls(r, "writes")["kept"] for r in results)
    r_avg = read_ns / max(kept_r, 1)
    w_avg = write_ns / max(kept_w, 1)
    n = max(reads + writes, 1)
    acc: dict[str, dict[str, Any]] = {}
    for r in results:
        for row in r["locks"]:
            a = acc.setdefault(row["name"], {"count": 0, "total_ns": 0, "medians": []})
            a["count"] += row["count"]
            a["total_ns"] += row["total_ns"]
            a["medians"].append(row["median_ns"])
    lock_ops = max(sum(r["lock_ops"] for r in results), 1)
    locks = []
    for name, a in acc.items():
        avg_ns = sum(a["medians"]) / len(a["medians"])
        locks.append(
            {
                "name": name,
                "count": int(a["count"]),
                "per_op": a["count"] / lock_ops,
                "avg_ns": avg_ns,
                "avg_cycles": lockstat.ns_to_cycles(avg_ns),
                "mean_ns": a["total_ns"] / max(a["count"], 1),
            }
        )
    probe_ns = sum(r["mutex_probe"]["avg_ns"] for r in results) / len(results)
    dropped = sum(cls(r, op)["dropped"] for r in results for op in ("reads", "writes"))
    total_ns = sum(cls(r, op)["total_ns"] for r in results for op in ("reads", "writes"))
    dropped_ns = sum(cls(r, op)["dropped_ns"] for r in results for op in ("reads", "writes"))
    return RunResult(
        path=path,
        vms=vms,
        ops_per_vm=(reads + writes) // max(vms, 1),
        seeds=[r["seed"] for r in results[:vms]],
        reads=reads,
        writes=writes,
        read_ns=r_avg,
        write_ns=w_avg,
        avg_ns=(r_avg * reads + w_avg * writes) / n,
        timer_overhead_ns=sum(r["timer_overhead_ns"] for r in results) / len(results),
        uncontended_mutex_ns=probe_ns,
        uncontended_mutex_cycles=lockstat.ns_to_cycles(probe_ns),
        locks=locks,
        dirty_pages=[sum(r["dirty_pages"] for r in results[i::vms]) for i in range(vms)],
        dropped=dropped,
        dropped_share=dropped_ns / max(total_ns, 1),
        per_vm=[
            {
                "vm": r["vm"],
                "round": n // vms,
                "pid": r["pid"],
                "seed": r["seed"],
                "reads": cls(r, "reads"),
                "writes": cls(r, "writes"),
                "timer_overhead_ns": r["timer_overhead_ns"],
                "uncontended_mutex_ns": r["mutex_probe"]["avg_ns"],
                "dirty_pages": r["dirty_pages"],
                "wall_ns": r["wall_ns"],
            }
            for n, r in enumerate(results)
        ],
    )


# -- the size sweep ----------------------------------------------------------------------
SWEEP_MIN_ROUNDS = 4
SWEEP_SIZES = (1, 8, 64, 512, 2048, 4096, *(p * 4096 for p in (2, 3, 4, 5, 6, 8, 10, 12, 16, 20)))


def _sweep_main(
    vfio_path: str, ram_size: int, sizes: Sequence[int], reps: int, seed: int, progress: Any, conn: Connection,
    core: str | None = None,
) -> None:
    """One VM process: ``reps`` reads and writes of each size on kvm and on ``vfio_path``.
    Measured in rounds; each round times one block of 25 per size and path, so sizes and
    paths see the same machine state; each figure is the median of its block averages (a
    deschedule spoils one block, not the figure); the per-round figures go with it."""
    _child_signals()
    try:
        env = VmEnv(vfio_path, ram_size, name="lab-sweep", core=core)
        env.prefault()
        native = env.core == "native"
        rbuf, wbuf = _buffers()
        accs = {"kvm": env.access("kvm"), vfio_path: env.access(vfio_path)}
        rng = random.Random(seed)
        overhead = native_timer_overhead_ns() if native else lockstat.timer_overhead_ns()
        block = 25
        rounds = max(-(-reps // block), SWEEP_MIN_ROUNDS)  # the verdict needs an interval per size
        addrs = {
            size: [rng.randrange(0, (ram_size - size) // PAGE_SIZE + 1) * PAGE_SIZE for _ in range(block)]
            for size in sizes
        }
        views = {size: (rbuf[:size], wbuf[:size]) for size in sizes}
        blocks: dict[tuple[int, str, str], list[float]] = {
            (size, p, op): [] for size in sizes for p in accs for op in "rw"
        }
        if native:  # one C replay per block: a read then a write at each address, timed in C
            replays = {p: env.replayer(p) for p in accs}
            nbuf = _native_buffer()
            ns_per_tick = 1e9 / _native_hz()
            pairs = array("B", [0, 1] * block)

            def run_block(p: str, size: int, chunk: list[int]) -> tuple[float, float]:
                rc, rn, wc, wn = replays[p](
                    pairs, array("Q", [a for a in chunk for _ in (0, 1)]), array("I", [size] * (2 * block)), nbuf
                )
                return rc * ns_per_tick / rn, wc * ns_per_tick / wn
        else:
            clock = time.perf_counter_ns

            def run_block(p: str, size: int, chunk: list[int]) -> tuple[float, float]:
                rm, wm = views[size]
                rn = wn = 0
                rw = accs[p].rw
                if rw is not None:
                    for a in chunk:
                        t0 = clock()
                        rw(a, rm, False)
                        t1 = clock()
                        rw(a, wm, True)
                        t2 = clock()
                        rn += t1 - t0
                        wn += t2 - t1
                else:
                    rd, wr = accs[p].pair()
                    for a in chunk:
                        t0 = clock()
                        rd(a, rm)
                        t1 = clock()
                        wr(a, wm)
                        t2 = clock()
                        rn += t1 - t0
                        wn += t2 - t1
                return rn / block, wn / block

        for size in sizes:  # warm-up, untimed
            for p in accs:
                run_block(p, size, addrs[size])
        gc.collect()
        gc.disable()
        try:
            for k in range(rounds):
                for size in sizes:
                    chunk = addrs[size]
                    rng.shuffle(chunk)
                    for p in accs:
                        r_ns, w_ns = run_block(p, size, chunk)
                        blocks[(size, p, "r")].append(r_ns)
                        blocks[(size, p, "w")].append(w_ns)
                progress[0] = (k + 1) * len(sizes) // rounds
        finally:
            gc.enable()
        rows = []
        for size in sizes:
            row: dict[str, Any] = {"size": size}
            for p in accs:
                key = "kvm" if p == "kvm" else "vfio"
                r_ns = statistics.median(blocks[(size, p, "r")]) - overhead
                w_ns = statistics.median(blocks[(size, p, "w")]) - overhead
                row[f"{key}_read_ns"] = r_ns
                row[f"{key}_write_ns"] = w_ns
                row[f"{key}_ns"] = (r_ns + w_ns) / 2
                row[f"{key}_rounds_ns"] = [(a + b) / 2 - overhead for a, b in
                                           zip(blocks[(size, p, "r")], blocks[(size, p, "w")], strict=True)]
            rows.append(row)
        env.close()
        conn.send(("ok", {"rows": rows, "timer_overhead_ns": overhead, "reps": rounds * block}))
    except BaseException as e:
        conn.send(("error", f"size sweep ({vfio_path}): {_why(e)}"))
    finally:
        conn.close()


def sweep(
    vfio_path: str = "vfio-external-user",
    *,
    ram_size: int = 16 << 20,
    sizes: Sequence[int] = SWEEP_SIZES,
    reps: int = 400,
    seed: int = 0,
    on_progress: Progress | None = None,
    core: str | None = None,
) -> dict[str, Any]:
    """Access-size sweep, kvm vs ``vfio_path``, in one VM process.  Rows per size in ns and
    cycles (reads and writes equally weighted) and the crossover: the smallest size from
    which vfio is cheaper than kvm at every larger size measured."""
    progress = _ctx.Array("q", 1, lock=False)
    parent_end, child_end = _ctx.Pipe(duplex=False)
    p = _ctx.Process(
        target=_sweep_main,
        args=(vfio_path, ram_size, tuple(sizes), reps, seed, progress, child_end, core),
        name="dmarw-lab-sweep",
        daemon=True,
    )
    p.start()
    child_end.close()
    (res,) = _wait([p], [parent_end], progress, len(sizes), on_progress)
    for row in res["rows"]:
        for key in ("kvm_ns", "vfio_ns", "kvm_read_ns", "kvm_write_ns", "vfio_read_ns", "vfio_write_ns"):
            row[key.replace("_ns", "_cycles")] = lockstat.ns_to_cycles(row[key])
        row["diff_ns"] = row["vfio_ns"] - row["kvm_ns"]
        row["diff_cycles"] = lockstat.ns_to_cycles(row["diff_ns"])
        row["pages"] = row["size"] / PAGE_SIZE
    crossover = None
    for row in reversed(res["rows"]):
        if row["diff_ns"] < 0:
            crossover = row["size"]
        else:
            break
    res.update(path=vfio_path, crossover_bytes=crossover, sizes=list(sizes))
    return dict(res)
