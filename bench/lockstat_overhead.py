"""What lock statistics cost: off, nothing measurable beyond the lock itself; on, the timestamps.

Rows, all uncontended ``with lock: pass`` in one thread, interleaved in rounds, medians:

* ``threading.Lock``          the bare C lock (no Python frame at all)
* ``wrapper``                 a Python lock object shaped like :class:`dmarw.locks.Mutex`
                              (``__enter__`` takes the raw lock itself) with no statistics
* ``wrapper + count``         the same plus the acquisition counter (``next(itertools.count)``)
* ``Mutex, stats off``        the real :class:`dmarw.locks.Mutex`, no ``collect()`` block open
* ``Mutex, stats on``         the same inside ``dmarw.lockstat.collect()``

``stats off`` − ``wrapper + count`` is the cost of having statistics and not using them.  With
no block open the Mutex runs the counting wrapper's code plus one test of
``lockstat.TIMING.on`` (set while a ``collect()`` block is open).  It is taken per round (the two rows ran moments apart, so slow drift in the
machine's load cancels), and the median of those differences is printed with their p25–p75
band: when the band contains 0, the cost is not measurable above this run's noise.

Run: ``.venv/bin/python bench/lockstat_overhead.py [--rounds N] [--calls N] [--json FILE]``
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.table import Table

from dmarw import lockstat
from dmarw.locks import Mutex


class Wrapper:
    """A named-lock object with Mutex's shape and no statistics."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def acquire(self) -> None:
        self._lock.acquire()

    def __enter__(self) -> Wrapper:
        self._lock.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


class CountingWrapper:
    """:class:`Wrapper` plus the always-on acquisition counter, and no statistics flag."""

    __slots__ = ("_lock", "_count")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = itertools.count()

    def acquire(self) -> None:
        self._lock.acquire()
        next(self._count)

    def __enter__(self) -> CountingWrapper:
        self._lock.acquire()
        next(self._count)
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def loop(lock: Any, calls: int) -> None:
    for _ in range(calls):
        with lock:
            pass


ROWS = ("threading.Lock", "wrapper", "wrapper + count", "Mutex, stats off", "Mutex, stats on")


def make_runs() -> dict[str, Callable[[int], None]]:
    bare = threading.Lock()
    wrapper = Wrapper()
    counting = CountingWrapper()
    mutex = Mutex("bench.lockstat_overhead")

    def stats_on(calls: int) -> None:
        with lockstat.collect():
            loop(mutex, calls)

    return {
        "threading.Lock": lambda n: loop(bare, n),
        "wrapper": lambda n: loop(wrapper, n),
        "wrapper + count": lambda n: loop(counting, n),
        "Mutex, stats off": lambda n: loop(mutex, n),
        "Mutex, stats on": stats_on,
    }


def measure(rounds: int, calls: int, seed: int) -> dict[str, list[float]]:
    """ns/op samples per row; rows in a new random order each round, GC off while timing."""
    runs = make_runs()
    rng = random.Random(seed)
    clock = time.perf_counter_ns
    samples: dict[str, list[float]] = {r: [] for r in ROWS}
    for r in ROWS:  # warm-up
        runs[r](calls)
    for _ in range(rounds):
        order = list(ROWS)
        rng.shuffle(order)
        for r in order:
            fn = runs[r]
            gc.disable()
            try:
                t0 = clock()
                fn(calls)
                t1 = clock()
            finally:
                gc.enable()
            samples[r].append((t1 - t0) / calls)
    return samples


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--rounds", type=int, default=101, help="samples per row (default 101)")
    ap.add_argument("--calls", type=int, default=20000, help="acquisitions per sample (default 20000)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the interleaving order")
    ap.add_argument("--json", metavar="FILE", help="also write every number to FILE")
    args = ap.parse_args(argv)
    if args.rounds < 3 or args.calls < 1:
        ap.error("--rounds must be >= 3 and --calls >= 1")
    console = Console()
    if not console.is_terminal:
        console = Console(width=120)

    # counts are exact whatever the statistics state: check it on the real Mutex first
    probe = Mutex("bench.lockstat_overhead.probe")
    with lockstat.collect() as stats:
        loop(probe, 1000)
    assert stats.counts() == {probe.name: 1000}, stats.counts()

    samples = measure(args.rounds, args.calls, args.seed)
    med = {r: statistics.median(v) for r, v in samples.items()}
    quart = {r: statistics.quantiles(v, n=4) for r, v in samples.items()}
    base = med["threading.Lock"]

    t = Table(title="uncontended lock acquire + release: median ns/op, same run")
    for col, just in (("lock", "left"), ("ns/op", "right"), ("p25–p75 ns", "right"),
                      ("cycles", "right"), ("× threading.Lock", "right")):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for r in ROWS:
        q = quart[r]
        t.add_row(r, f"{med[r]:.1f}", f"{q[0]:.1f}–{q[2]:.1f}",
                  f"{lockstat.ns_to_cycles(med[r]):.0f}", f"{med[r] / base:.2f}")
    console.print(t)

    diffs = [a - b for a, b in zip(samples["Mutex, stats off"], samples["wrapper + count"], strict=True)]
    off_cost = statistics.median(diffs)
    d25, _, d75 = statistics.quantiles(diffs, n=4)
    on_cost = med["Mutex, stats on"] - med["Mutex, stats off"]
    verdict = (
        "not measurable: the band contains 0"
        if d25 <= 0 <= d75
        else "measurable: the band excludes 0"
    )
    console.print(
        f"statistics off vs the same lock with no statistics flag, per round: median "
        f"{off_cost:+.1f} ns/op ({lockstat.ns_to_cycles(off_cost):+.0f} cycles, "
        f"{off_cost / med['Mutex, stats off']:+.1%}), p25–p75 {d25:+.1f}…{d75:+.1f} ns: {verdict}."
    )
    console.print(
        f"statistics on: +{on_cost:.1f} ns/op ({lockstat.ns_to_cycles(on_cost):+.0f} cycles) "
        f"for two timestamps and the guarded sum; timer pair alone "
        f"{lockstat.timer_overhead_ns():.0f} ns."
    )
    console.print(
        f"{args.rounds} rounds × {args.calls} acquisitions, rows interleaved (seed {args.seed}); "
        f"{lockstat.cycles_source()}."
    )
    if args.json:
        out = {
            "rounds": args.rounds,
            "calls": args.calls,
            "cycles_source": lockstat.cycles_source(),
            "cpu_hz": lockstat.cpu_hz(),
            "median_ns": med,
            "quartiles_ns": quart,
            "stats_off_cost_ns": off_cost,
            "stats_on_cost_ns": on_cost,
            "stats_off_cost_p25_p75_ns": [d25, d75],
            "samples_ns": samples,
        }
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
