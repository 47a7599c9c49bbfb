"""Where a run's accesses come from: one function per run gives each VM its records.

An :data:`AccessSource` is called as ``source(vm, seed)`` and returns VM ``vm``'s
:class:`~dmarw.lab.workload.Workload` (its records and guest RAM size) for a run drawn with
random seed ``seed``; the runner splits it into rounds and replays it through the path
under test.  The built-in sources are a generated profile and a trace file; another source
(for example records taken from a real guest's command ring) plugs in through
:attr:`dmarw.lab.measure.Options.access` without touching the runner.
"""

from __future__ import annotations

from collections.abc import Callable

from .workload import Workload, generate

AccessSource = Callable[[int, int], Workload]  # (vm index, random seed) -> that VM's records


def profile_source(profile: str, ops: int) -> AccessSource:
    """VM ``i`` of a run with seed ``s`` replays ``profile`` drawn with seed ``s + i`` (each
    seed drawn once per source: VM 1 of seed 0 and VM 0 of seed 1 share one workload)."""
    drawn: dict[int, Workload] = {}

    def source(vm: int, seed: int) -> Workload:
        if seed + vm not in drawn:
            drawn[seed + vm] = generate(profile, ops, seed + vm)
        return drawn[seed + vm]

    return source


def trace_source(trace: Workload, ops: int | None = None) -> AccessSource:
    """Every VM replays the same (already validated) trace, its first ``ops`` records."""
    if ops is not None:
        trace.records = trace.records[:ops]

    def source(vm: int, seed: int) -> Workload:
        return trace

    return source
