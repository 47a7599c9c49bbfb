"""Run a path in one or more VM processes and time every access.

Each VM is a forked OS process with its own :class:`~dmarw.lab.paths.VmEnv` (guest RAM, Vm,
container, group).  The host-global ``vfio.group_lock`` is one ``multiprocessing.Lock``
made here and installed in every VM process with :func:`dmarw.set_group_lock`, so VMs
contend on it as on the kernel's.  VMs start each pass together (a barrier).

Per VM, in order: set up, prefault guest RAM, warm up (untimed), measure the timer's own
cost (:func:`dmarw.lockstat.timer_overhead_ns`), the timed pass (``perf_counter_ns``
around each call, reads and writes summed apart; the timer cost is subtracted per op when
results are combined), the uncontended-mutex probe, a lock-statistics pass
(:func:`dmarw.lockstat.collect`), and the dirty log harvest.  Nothing here waits on a
clock: the parent blocks on the result pipes.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import random
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from .. import lockstat
from ..locks import Mutex
from ..mm import PAGE_SIZE
from ..vfio import set_group_lock
from .paths import PATHS, Access, VmEnv
from .workload import Workload

MAX_ACCESS = 20 * PAGE_SIZE  # largest access any run makes (the size sweep's top)
PROGRESS_EVERY = 1024
BARRIER_TIMEOUT = 300.0  # a VM that died leaves the others a way out

_ctx = mp.get_context("fork")
Progress = Callable[[int, int], None]  # (done, total)


@dataclass
class PassResult:
    """Raw sums of one VM's timed pass (timer overhead not yet subtracted)."""

    reads: int = 0
    read_ns: int = 0
    writes: int = 0
    write_ns: int = 0


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


def _buffers() -> tuple[memoryview, memoryview]:
    """A read buffer and a write buffer (a non-zero pattern) of :data:`MAX_ACCESS` bytes."""
    rbuf = memoryview(bytearray(MAX_ACCESS))
    wbuf = memoryview(bytes(range(256)) * (MAX_ACCESS // 256))
    return rbuf, wbuf


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
    read: Access,
    write: Access,
    tick: Callable[[int], None],
) -> PassResult:
    """Time each call with ``perf_counter_ns``; only the call sits between the two reads."""
    clock = time.perf_counter_ns
    rn = wn = rc = wc = 0
    every = PROGRESS_EVERY - 1
    for i, (w, a, m) in enumerate(recs):
        if w:
            t0 = clock()
            write(a, m)
            t1 = clock()
            wn += t1 - t0
            wc += 1
        else:
            t0 = clock()
            read(a, m)
            t1 = clock()
            rn += t1 - t0
            rc += 1
        if not i & every:
            tick(i)
    return PassResult(rc, rn, wc, wn)


def _untimed_pass(recs: Sequence[tuple[bool, int, memoryview]], read: Access, write: Access) -> None:
    for w, a, m in recs:
        if w:
            write(a, m)
        else:
            read(a, m)


def mutex_probe(samples: int = 20000) -> dict[str, float]:
    """The seed's uncontended-mutex figure: a fresh dmarw Mutex, timed the way lockstat times
    every lock (one timestamp pair around the acquire, the timer included)."""
    m = Mutex("lab.uncontended_mutex")
    with lockstat.collect() as s:
        for _ in range(samples):
            m.acquire()
            m.release()
    for row in s.table():
        if row["name"] == "lab.uncontended_mutex":
            return {"avg_ns": float(row["avg_ns"]), "avg_cycles": float(row["avg_cycles"])}
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
) -> None:
    """One VM process: build, warm up, time, lock-stat pass, harvest, report on ``conn``."""
    try:
        set_group_lock(group_lock)
        t_start = time.perf_counter_ns()
        env = VmEnv(path, wl.ram_size, name=f"lab-vm{vm}")
        env.prefault()
        recs = _prepare(wl)
        read, write = env.access()
        _untimed_pass(recs[:warmup], read, write)
        overhead = lockstat.timer_overhead_ns()
        total = len(recs)

        def tick(i: int) -> None:
            progress[vm] = i

        gc.collect()
        gc.disable()
        try:
            barrier.wait(BARRIER_TIMEOUT)
            timed = _timed_pass(recs, read, write, tick)
            progress[vm] = total
            probe = mutex_probe()
            barrier.wait(BARRIER_TIMEOUT)
            with lockstat.collect() as stats:
                _untimed_pass(recs[:lock_ops], read, write)
        finally:
            gc.enable()
        locks = [row for row in stats.table() if not str(row["name"]).startswith("lab.")]
        dirty = env.dirty_pages()
        env.close()
        res = VmResult(
            vm, os.getpid(), wl.seed, timed, overhead, probe, locks, min(lock_ops, total), dirty,
            time.perf_counter_ns() - t_start,
        )
        conn.send(("ok", asdict(res)))
    except BaseException:  # report anything to the parent rather than die silently
        barrier.abort()  # release the other VMs at once
        conn.send(("error", f"VM {vm} ({path}): {traceback.format_exc()}"))
    finally:
        conn.close()


def _wait(
    procs: list[Any], conns: list[Connection], progress: Any, total: int, on_progress: Progress | None
) -> list[Any]:
    """Collect one message per VM, reporting progress; fail if a VM dies without one."""
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
    for p in procs:
        p.join()
    errors = [msg for kind, msg in got if kind == "error"]
    if errors:
        raise RuntimeError("\n".join(errors))
    return [msg for _, msg in got]


def run(
    path: str,
    workloads: Sequence[Workload],
    *,
    lock_ops: int | None = None,
    warmup: int | None = None,
    on_progress: Progress | None = None,
) -> RunResult:
    """Run ``path`` with one VM process per workload, all at once; combine their results."""
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r} (have {', '.join(PATHS)})")
    vms = len(workloads)
    if vms < 1:
        raise ValueError("need at least one VM")
    ops = max(w.ops for w in workloads)
    lock_ops = ops // 4 if lock_ops is None else lock_ops
    warmup = min(ops, 2000) if warmup is None else warmup
    group_lock = _ctx.Lock()
    barrier = _ctx.Barrier(vms)
    progress = _ctx.Array("q", vms, lock=False)
    procs, conns = [], []
    for i, wl in enumerate(workloads):
        parent_end, child_end = _ctx.Pipe(duplex=False)
        p = _ctx.Process(
            target=_vm_main,
            args=(path, i, wl, lock_ops, warmup, group_lock, barrier, progress, child_end),
            name=f"dmarw-lab-vm{i}",
        )
        p.start()
        child_end.close()
        procs.append(p)
        conns.append(parent_end)
    results = _wait(procs, conns, progress, sum(w.ops for w in workloads), on_progress)
    return combine(path, results)


def combine(path: str, results: list[dict[str, Any]]) -> RunResult:
    """Per-op averages over all VMs, each VM's own timer overhead subtracted per op."""
    reads = sum(r["timed"]["reads"] for r in results)
    writes = sum(r["timed"]["writes"] for r in results)
    read_ns = sum(r["timed"]["read_ns"] - r["timer_overhead_ns"] * r["timed"]["reads"] for r in results)
    write_ns = sum(r["timed"]["write_ns"] - r["timer_overhead_ns"] * r["timed"]["writes"] for r in results)
    n = max(reads + writes, 1)
    # locks: sum counts and times over VMs
    acc: dict[str, dict[str, float]] = {}
    order: list[str] = []
    for r in results:
        for row in r["locks"]:
            name = row["name"]
            if name not in acc:
                acc[name] = {"count": 0, "total_ns": 0.0}
                order.append(name)
            acc[name]["count"] += row["count"]
            acc[name]["total_ns"] += row["total_ns"]
    lock_ops = max(sum(r["lock_ops"] for r in results), 1)
    locks = []
    for name in order:
        a = acc[name]
        avg_ns = a["total_ns"] / max(a["count"], 1)
        locks.append(
            {
                "name": name,
                "count": int(a["count"]),
                "per_op": a["count"] / lock_ops,
                "avg_ns": avg_ns,
                "avg_cycles": lockstat.ns_to_cycles(avg_ns),
            }
        )
    probe_ns = sum(r["mutex_probe"]["avg_ns"] for r in results) / len(results)
    return RunResult(
        path=path,
        vms=len(results),
        ops_per_vm=max(r["timed"]["reads"] + r["timed"]["writes"] for r in results),
        seeds=[r["seed"] for r in results],
        reads=reads,
        writes=writes,
        read_ns=read_ns / max(reads, 1),
        write_ns=write_ns / max(writes, 1),
        avg_ns=(read_ns + write_ns) / n,
        timer_overhead_ns=sum(r["timer_overhead_ns"] for r in results) / len(results),
        uncontended_mutex_ns=probe_ns,
        uncontended_mutex_cycles=lockstat.ns_to_cycles(probe_ns),
        locks=locks,
        dirty_pages=[r["dirty_pages"] for r in results],
        per_vm=[
            {
                "vm": r["vm"],
                "pid": r["pid"],
                "seed": r["seed"],
                "reads": r["timed"]["reads"],
                "writes": r["timed"]["writes"],
                "read_ns": (r["timed"]["read_ns"] / max(r["timed"]["reads"], 1)) - r["timer_overhead_ns"],
                "write_ns": (r["timed"]["write_ns"] / max(r["timed"]["writes"], 1)) - r["timer_overhead_ns"],
                "timer_overhead_ns": r["timer_overhead_ns"],
                "dirty_pages": r["dirty_pages"],
                "wall_ns": r["wall_ns"],
            }
            for r in results
        ],
    )


# -- the size sweep ----------------------------------------------------------------------
SWEEP_SIZES = (1, 8, 64, 512, 2048, 4096, *(p * 4096 for p in (2, 3, 4, 5, 6, 8, 10, 12, 16, 20)))


def _sweep_main(
    vfio_path: str, ram_size: int, sizes: Sequence[int], reps: int, seed: int, progress: Any, conn: Connection
) -> None:
    """One VM process: for each size, ``reps`` reads and writes on kvm and on ``vfio_path``,
    interleaved in small blocks so both see the same machine state."""
    try:
        env = VmEnv(vfio_path, ram_size, name="lab-sweep")
        env.prefault()
        rbuf, wbuf = _buffers()
        paths = {"kvm": env.access("kvm"), vfio_path: env.access(vfio_path)}
        rng = random.Random(seed)
        overhead = lockstat.timer_overhead_ns()
        clock = time.perf_counter_ns
        rows = []
        block = 50
        gc.collect()
        gc.disable()
        try:
            for k, size in enumerate(sizes):
                top = (ram_size - size) // PAGE_SIZE
                addrs = [rng.randrange(0, top + 1) * PAGE_SIZE for _ in range(reps)]
                rm, wm = rbuf[:size], wbuf[:size]
                sums = {(p, op): 0 for p in paths for op in "rw"}
                for _ in range(2):  # warm-up block, untimed
                    for rd, wr in paths.values():
                        rd(addrs[0], rm)
                        wr(addrs[0], wm)
                for b in range(0, reps, block):
                    chunk = addrs[b : b + block]
                    for p, (rd, wr) in paths.items():
                        rn = wn = 0
                        for a in chunk:
                            t0 = clock()
                            rd(a, rm)
                            t1 = clock()
                            wr(a, wm)
                            t2 = clock()
                            rn += t1 - t0
                            wn += t2 - t1
                        sums[(p, "r")] += rn
                        sums[(p, "w")] += wn
                row: dict[str, Any] = {"size": size}
                for p in paths:
                    key = "kvm" if p == "kvm" else "vfio"
                    r_ns = sums[(p, "r")] / reps - overhead
                    w_ns = sums[(p, "w")] / reps - overhead
                    row[f"{key}_read_ns"] = r_ns
                    row[f"{key}_write_ns"] = w_ns
                    row[f"{key}_ns"] = (r_ns + w_ns) / 2
                rows.append(row)
                progress[0] = k + 1
        finally:
            gc.enable()
        env.close()
        conn.send(("ok", {"rows": rows, "timer_overhead_ns": overhead, "reps": reps}))
    except BaseException:
        conn.send(("error", f"size sweep ({vfio_path}): {traceback.format_exc()}"))
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
) -> dict[str, Any]:
    """Access-size sweep, kvm vs ``vfio_path``, in one VM process.  Rows per size in ns and
    cycles (reads and writes equally weighted) and the crossover: the smallest size from
    which vfio is cheaper than kvm at every larger size measured."""
    progress = _ctx.Array("q", 1, lock=False)
    parent_end, child_end = _ctx.Pipe(duplex=False)
    p = _ctx.Process(
        target=_sweep_main,
        args=(vfio_path, ram_size, tuple(sizes), reps, seed, progress, child_end),
        name="dmarw-lab-sweep",
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
