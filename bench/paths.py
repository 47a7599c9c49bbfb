"""ns/op of each guest-memory access path, as a ratio to the KVM path measured in the same run.

Paths (each the real dmarw code, set up by the lab's :class:`dmarw.lab.paths.VmEnv`: one
guest RAM, Vm and container per path, dirty logging on everywhere):

* ``kvm``                        ``Vm.read_guest_into`` / ``Vm.write_guest``, dirty log on
* ``vfio-mutex``                 per-call ``vfio_dma_rw``, ``Container(lock="mutex")``
* ``vfio-rwsem``                 per-call ``vfio_dma_rw``, ``Container(lock="rwsem")``
* ``vfio-external-user``         ``ExternalUser.dma_rw``, mutex, ``mm_ref="get_task_mm"``
* ``vfio-external-user-mmget``   ``ExternalUser.dma_rw``, mutex, ``mm_ref="mmget_not_zero"``
* ``vfio-rcu``                   ``ExternalUser.dma_rw``, ``lock="rcu"``, ``mmget_not_zero``

The per-call paths use ``get_task_mm`` like the 2020 kernel.  Each sample times a batch of calls with ``time.perf_counter_ns``; the paths are
interleaved (a fresh random order every round) and the median over the rounds is reported;
the ratio to kvm is the median of the per-round ratios (so slow drift in load cancels).

Run: ``.venv/bin/python bench/paths.py [--rounds N] [--passes N] [--json FILE]``
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.table import Table

from dmarw import PAGE_SIZE, ExternalUser, Vm, lockstat, vfio_dma_rw
from dmarw.lab.paths import PATHS as SPECS
from dmarw.lab.paths import VmEnv
from dmarw.vfio import Device

GUEST_RAM = 256 * PAGE_SIZE  # 1 MiB
NPAGES = 64  # accesses rotate over this many guest pages
SIZES = (64, PAGE_SIZE)
OPS = ("read", "write")
PATHS = tuple(SPECS)  # kvm first: every ratio is to it

Loop = Callable[[list[int], Any], None]  # (addresses, buffer): a bytearray to read into, bytes to write


# -- one timed loop per call shape: the loop body is a single direct call into dmarw ----------


def kvm_loops(vm: Vm) -> tuple[Loop, Loop]:
    read_into, write = vm.read_guest_into, vm.write_guest

    def read(addrs: list[int], buf: bytearray) -> None:
        for a in addrs:
            read_into(a, buf)

    def write_(addrs: list[int], buf: bytes) -> None:
        for a in addrs:
            write(a, buf)

    return read, write_


def per_call_loops(dev: Device) -> tuple[Loop, Loop]:
    def read(addrs: list[int], buf: bytearray) -> None:
        for a in addrs:
            vfio_dma_rw(dev, a, buf, False)

    def write(addrs: list[int], buf: bytes) -> None:
        for a in addrs:
            vfio_dma_rw(dev, a, buf, True)

    return read, write


def external_user_loops(user: ExternalUser) -> tuple[Loop, Loop]:
    rw = user.dma_rw

    def read(addrs: list[int], buf: bytearray) -> None:
        for a in addrs:
            rw(a, buf, False)

    def write(addrs: list[int], buf: bytes) -> None:
        for a in addrs:
            rw(a, buf, True)

    return read, write


def empty_loop(addrs: list[int], buf: bytes | bytearray) -> None:
    """The loop with a call to a no-op: what every path's figure includes besides dmarw."""
    for a in addrs:
        _noop(a, buf)


def _noop(a: int, buf: bytes | bytearray) -> None:
    pass


def build() -> tuple[dict[str, VmEnv], dict[str, tuple[Loop, Loop]]]:
    """One prefaulted :class:`VmEnv` per path, and its (read, write) loops."""
    envs: dict[str, VmEnv] = {}
    loops: dict[str, tuple[Loop, Loop]] = {}
    try:
        for path in PATHS:
            env = envs[path] = VmEnv(path, GUEST_RAM, name=f"bench-paths-{path}")
            env.prefault()
            kind = env.spec.kind
            if kind == "kvm":
                loops[path] = kvm_loops(env.vm)
            elif kind == "percall":
                loops[path] = per_call_loops(env.device)
            else:
                assert env.user is not None
                loops[path] = external_user_loops(env.user)
    except BaseException:
        close(envs)
        raise
    return envs, loops


def close(envs: dict[str, VmEnv]) -> None:
    for env in envs.values():
        env.close()


def addresses(size: int) -> list[int]:
    """One access per page over NPAGES pages; a sub-page access moves within its page."""
    if size >= PAGE_SIZE:
        return [p * PAGE_SIZE for p in range(NPAGES)]
    return [p * PAGE_SIZE + (p * size) % PAGE_SIZE for p in range(NPAGES)]


def check(envs: dict[str, VmEnv], loops: dict[str, tuple[Loop, Loop]]) -> None:
    """Before timing: each path's write lands in host memory and reads back through it."""
    for i, path in enumerate(PATHS):
        env = envs[path]
        data = bytes([i + 1]) * 64
        loops[path][1]([0x3000], data)
        buf = bytearray(64)
        loops[path][0]([0x3000], buf)
        if bytes(buf) != data or env.space.read(env.hva + 0x3000, 64) != data:
            raise SystemExit(f"{path}: a write is not read back / not in host memory")
        if env.dirty_pages() != 1:  # get-and-clear: proves the dirty log is on
            raise SystemExit(f"{path}: the write was not logged dirty")


def time_batch(loop: Loop, addrs: list[int], buf: bytes | bytearray, passes: int) -> float:
    """ns per call of ``passes`` runs of ``loop`` over ``addrs`` (GC off while timing)."""
    clock = time.perf_counter_ns
    gc.disable()
    try:
        t0 = clock()
        for _ in range(passes):
            loop(addrs, buf)
        t1 = clock()
    finally:
        gc.enable()
    return (t1 - t0) / (passes * len(addrs))


def measure(loops: dict[str, tuple[Loop, Loop]], rounds: int, passes: int, seed: int) -> dict[tuple[str, str, int], list[float]]:
    """Samples of ns/op per (path, op, size); paths interleaved in a new order each round."""
    rng = random.Random(seed)
    samples: dict[tuple[str, str, int], list[float]] = {}
    cases = [(op, size) for size in SIZES for op in OPS]
    bufs = {
        ("read", size): bytearray(size) for size in SIZES
    } | {("write", size): bytes([0xA5]) * size for size in SIZES}
    addrs = {size: addresses(size) for size in SIZES}
    for op, size in cases:  # warm-up: one untimed pass of everything
        for path in PATHS:
            loops[path][OPS.index(op)](addrs[size], bufs[op, size])
    for _ in range(rounds):
        order = list(PATHS)
        rng.shuffle(order)
        for op, size in cases:
            for path in order:
                loop = loops[path][OPS.index(op)]
                ns = time_batch(loop, addrs[size], bufs[op, size], passes)
                samples.setdefault((path, op, size), []).append(ns)
    for _ in range(rounds):
        samples.setdefault(("loop", "-", 0), []).append(
            time_batch(empty_loop, addrs[64], bufs["read", 64], passes)
        )
    return samples


def results(samples: dict[tuple[str, str, int], list[float]]) -> list[dict[str, object]]:
    med = {k: statistics.median(v) for k, v in samples.items()}
    out: list[dict[str, object]] = []
    for size in SIZES:
        for path in PATHS:
            for op in OPS:
                ns = med[path, op, size]
                kvm = med["kvm", op, size]
                # the ratio is taken per round (kvm ran moments apart), then the median
                ratios = [
                    a / b for a, b in zip(samples[path, op, size], samples["kvm", op, size], strict=True)
                ]
                q = statistics.quantiles(samples[path, op, size], n=4)
                out.append(
                    {
                        "path": path,
                        "op": op,
                        "size": size,
                        "ns": ns,
                        "cycles": lockstat.ns_to_cycles(ns),
                        "ratio_to_kvm": statistics.median(ratios),
                        "inc_ns": ns - kvm,
                        "p25_ns": q[0],
                        "p75_ns": q[2],
                        "samples_ns": samples[path, op, size],
                    }
                )
    return out


def render(console: Console, rows: list[dict[str, object]], meta: dict[str, object]) -> None:
    for size in SIZES:
        t = Table(title=f"{size}-byte access: median ns/op (cycles), ratio to kvm — same run")
        t.add_column("path")
        for op in OPS:
            t.add_column(f"{op} ns", justify="right")
            t.add_column(f"{op} cycles", justify="right")
            t.add_column(f"{op} ×kvm", justify="right")
        for path in PATHS:
            cells: list[str] = [path]
            for op in OPS:
                (r,) = [x for x in rows if x["path"] == path and x["op"] == op and x["size"] == size]
                cells += [f"{r['ns']:.0f}", f"{r['cycles']:.0f}", f"{r['ratio_to_kvm']:.2f}"]
            t.add_row(*cells)
        console.print(t)
    console.print(
        f"core: {meta['core']} ("
        + ("every path one C call, the per-call group layer included" if meta["core"] == "native"
           else "every step interpreted")
        + "); "
        f"{meta['rounds']} rounds × {meta['calls_per_sample']} calls per sample, medians; "
        f"paths interleaved in a random order each round (seed {meta['seed']})."
    )
    console.print(
        f"{meta['cycles_source']}; timer pair {meta['timer_overhead_ns']:.0f} ns "
        f"(amortised over each batch); loop + call overhead included in every figure: "
        f"{meta['loop_overhead_ns']:.0f} ns/op."
    )
    dirty = meta["dirty_pages_logged"]
    assert isinstance(dirty, dict)
    console.print(
        "dirty pages in each path's log after the run (tracking on): "
        + ", ".join(f"{p} {n}" for p, n in dirty.items())
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--rounds", type=int, default=101, help="samples per path and case (default 101)")
    ap.add_argument("--passes", type=int, default=8, help=f"passes over {NPAGES} pages per sample (default 8)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the interleaving order")
    ap.add_argument("--json", metavar="FILE", help="also write every number to FILE")
    ap.add_argument(
        "--core",
        choices=("python", "native"),
        help="container/Vm core (default: $DMARW_CORE, else native when built)",
    )
    args = ap.parse_args(argv)
    if args.rounds < 3 or args.passes < 1:
        ap.error("--rounds must be >= 3 and --passes >= 1")
    if args.core:
        os.environ["DMARW_CORE"] = args.core  # VmEnv resolves the core from it
    console = Console()
    if not console.is_terminal:
        console = Console(width=120)
    envs, loops = build()
    try:
        cores = {getattr(env, "core", "python") for env in envs.values()}
        check(envs, loops)
        started = time.perf_counter()
        samples = measure(loops, args.rounds, args.passes, args.seed)
        elapsed = time.perf_counter() - started
        dirty = {path: env.dirty_pages() for path, env in envs.items()}
    finally:
        close(envs)
    rows = results(samples)
    meta: dict[str, object] = {
        "core": "/".join(sorted(cores)),
        "rounds": args.rounds,
        "calls_per_sample": args.passes * NPAGES,
        "seed": args.seed,
        "cpu_hz": lockstat.cpu_hz(),
        "cycles_source": lockstat.cycles_source(),
        "timer_overhead_ns": lockstat.timer_overhead_ns(),
        "loop_overhead_ns": statistics.median(samples["loop", "-", 0]),
        "elapsed_s": elapsed,
        "dirty_pages_logged": dirty,
        "python": sys.version.split()[0],
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
    }
    render(console, rows, meta)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=1)
        console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
