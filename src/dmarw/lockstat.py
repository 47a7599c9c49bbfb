"""Lock statistics: named lock classes count acquisitions and, while collecting, time them.

Every lock on the DMA paths has a class name (``iommu.lock``, ``group.mutex`` ...), like a
lockdep class: all group mutexes share one entry.  Counting is always on: the Python locks
``next()`` an ``itertools.count``, the native ones increment a native counter attached to
the class (:meth:`LockClass.attach`), both atomic under the GIL.  The acquire time
(including any waiting) is measured only while at least one :func:`collect` block is open
anywhere in the process: opening the first block sets :data:`TIMING` (which the Python
locks test, one attribute load) and tells every registered backend
(:func:`on_timing_switch`: the native core sets its own C flag), and closing the last one
clears them.  Off, an acquisition costs the lock and its count; ``bench/lockstat_overhead.py``
shows the difference is below noise.

Time is reported in ns (``time.perf_counter_ns``) and in CPU cycles.  Cycles are derived as
``ns * cpu_hz / 1e9`` where ``cpu_hz`` is the TSC rate: measured by the native core against
``CLOCK_MONOTONIC`` when it is built and the CPU has an invariant TSC, else the frequency the
kernel reports (``tsc_freq_khz``, ``/proc/cpuinfo`` "cpu MHz" or the cpufreq maximum), see
:func:`cpu_hz` and :func:`cycles_source`.  :func:`timer_overhead_ns` measures the cost of one
timestamp pair, which the 2020 thread says adds ~20 cycles to each of its figures; ours is
reported, and the lab subtracts it.

A :func:`collect` block is a time window over the whole process: its table covers every
acquisition made, by any thread, between the block's entry and exit, and nothing made
before or after.  Blocks may nest (the outer one also sees the inner one's acquisitions)
and may be open in several threads at once (each sees its own window).
"""

from __future__ import annotations

import functools
import itertools
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

LOCK_NAMES = (
    "vfio.group_lock",
    "group.unbound_lock",
    "group.device_lock",
    "group.mutex",
    "iommu.lock",
    "iommu.rcu",
    "task_lock",
    "kvm.srcu",
    "kvm.slots_lock",
)


def count_value(counter: itertools.count[int]) -> int:
    """The next value ``counter`` would return, without consuming it."""
    return int(counter.__reduce__()[1][0])


class _Timing:
    """Whether acquisitions are timed now (a :func:`collect` block is open)."""

    __slots__ = ("on",)

    def __init__(self) -> None:
        self.on = False


TIMING = _Timing()


class LockClass:
    """Counters of one lock class.  ``count`` always; ``total_ns`` only while collecting.

    Python locks count with ``next()`` on ``_count``; a backend's locks count in counters of
    their own, attached with :meth:`attach` (anything with a ``value``; the native core's
    are C atomics it increments without a Python call); ``count`` is the sum."""

    __slots__ = ("name", "_count", "_attached", "_timed", "_total_ns", "_guard")

    def __init__(self, name: str) -> None:
        self.name = name
        self._count = itertools.count()
        self._attached: list[Any] = []
        self._timed = 0
        self._total_ns: float = 0  # int from the Python locks; native locks add float ns
        self._guard = threading.Lock()

    def hit(self) -> None:
        """Count one acquisition (atomic under the GIL: a C-level ``next``)."""
        next(self._count)

    def timed(self, ns: float) -> None:
        """Count one acquisition that took ``ns`` to acquire (the native locks pass their
        counter's ticks converted to ns, a float)."""
        next(self._count)
        with self._guard:
            self._timed += 1
            self._total_ns += ns

    def attach(self, counter: Any) -> None:
        """Count ``counter.value`` in this class too (a backend's own acquisition counter)."""
        with self._guard:
            self._attached.append(counter)

    @property
    def count(self) -> int:
        return count_value(self._count) + sum(int(c.value) for c in self._attached)

    def snapshot(self) -> tuple[int, int, float]:
        with self._guard:
            return self.count, self._timed, self._total_ns


_classes: dict[str, LockClass] = {}
_classes_lock = threading.Lock()
_active = 0  # number of collect() blocks open in the process
_active_lock = threading.Lock()
_timing_switches: list[Callable[[bool], None]] = []


def on_timing_switch(fn: Callable[[bool], None]) -> None:
    """Register ``fn(on)``, called under the collect lock when timing turns on (the first
    block opens) and off (the last one closes); called at once with True if a block is open
    now.  A backend with locks of its own (the native core) registers here."""
    with _active_lock:
        _timing_switches.append(fn)
        if _active:
            fn(True)


def lock_class(name: str) -> LockClass:
    """The shared counters of lock class ``name`` (created on first use)."""
    cls = _classes.get(name)
    if cls is None:
        with _classes_lock:
            cls = _classes.setdefault(name, LockClass(name))
    return cls


def collecting() -> bool:
    """True while any :func:`collect` block is active."""
    return TIMING.on


@functools.cache
def _cpu_hz_and_source() -> tuple[float, str]:
    """The TSC rate (measured by the native core when built, else as the kernel reports it),
    and where it came from."""
    try:  # the native core times rdtsc against CLOCK_MONOTONIC (invariant TSC only)
        from . import _native

        if _native.counter_kind() == "rdtsc":
            return float(_native.tsc_hz()), "TSC rate measured by dmarw._native"
    except (ImportError, AttributeError):
        pass
    try:
        with open("/sys/devices/system/cpu/cpu0/tsc_freq_khz") as f:
            return float(f.read()) * 1e3, "tsc_freq_khz (TSC)"
    except (OSError, ValueError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return float(line.split(":")[1]) * 1e6, "/proc/cpuinfo cpu MHz"
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq") as f:
            return float(f.read()) * 1e3, "cpufreq cpuinfo_max_freq"
    except (OSError, ValueError):
        return 1e9, "no frequency reported: assumed 1 GHz"


def cpu_hz() -> float:
    """CPU (TSC) frequency in Hz, as the kernel reports it; 1 GHz if nothing says."""
    return _cpu_hz_and_source()[0]


def ns_to_cycles(ns: float) -> float:
    """Cycles at :func:`cpu_hz` for a duration in ns."""
    return ns * cpu_hz() / 1e9


def cycles_source() -> str:
    """One line saying how cycles are derived on this machine."""
    hz, source = _cpu_hz_and_source()
    return f"cycles = ns x {hz / 1e6:.1f} MHz ({source})"


def timer_overhead_ns(samples: int = 20001) -> float:
    """Median cost of one back-to-back ``perf_counter_ns`` pair (the timer's own cost)."""
    clock = time.perf_counter_ns
    deltas = []
    for _ in range(samples):
        t0 = clock()
        t1 = clock()
        deltas.append(t1 - t0)
    return float(statistics.median(deltas))


@dataclass
class Stats:
    """What one :func:`collect` block saw; :meth:`table` gives the per-lock rows."""

    start: dict[str, tuple[int, int, float]] = field(default_factory=dict)
    end: dict[str, tuple[int, int, float]] | None = None

    def _rows(self) -> dict[str, tuple[int, int, float]]:
        end = self.end if self.end is not None else _snapshot()
        rows: dict[str, tuple[int, int, float]] = {}
        for name, (count, timed, total) in end.items():
            c0, t0, n0 = self.start.get(name, (0, 0, 0))
            if count - c0 > 0:
                rows[name] = (count - c0, timed - t0, total - n0)
        return rows

    def table(self) -> list[dict[str, float | int | str]]:
        """One dict per lock class acquired during the block, in :data:`LOCK_NAMES` order."""
        order = {n: i for i, n in enumerate(LOCK_NAMES)}
        out: list[dict[str, float | int | str]] = []
        for name, (count, timed, total) in sorted(
            self._rows().items(), key=lambda kv: (order.get(kv[0], 99), kv[0])
        ):
            out.append(
                {
                    "name": name,
                    "count": count,
                    "total_ns": total,
                    "avg_ns": total / max(timed, 1),
                    "total_cycles": ns_to_cycles(total),
                    "avg_cycles": ns_to_cycles(total) / max(timed, 1),
                }
            )
        return out

    def counts(self) -> dict[str, int]:
        """Acquisitions per lock class during the block."""
        return {name: c for name, (c, _t, _n) in self._rows().items()}


def _snapshot() -> dict[str, tuple[int, int, float]]:
    with _classes_lock:
        classes = list(_classes.values())
    return {c.name: c.snapshot() for c in classes}


@contextmanager
def collect() -> Iterator[Stats]:
    """Turn timing on for the block; the yielded :class:`Stats` covers only the block."""
    global _active
    with _active_lock:
        _active += 1
        if _active == 1:
            TIMING.on = True
            for fn in _timing_switches:
                fn(True)
    stats = Stats(start=_snapshot())
    try:
        yield stats
    finally:
        stats.end = _snapshot()
        with _active_lock:
            _active -= 1
            if _active == 0:
                TIMING.on = False
                for fn in _timing_switches:
                    fn(False)
